"""Checks of a job's input before it starts, and the data it trains on: pure functions of
the scenario, run once by the launcher (one clean line on bad input) and by every rank."""
from __future__ import annotations

import re

import numpy as np

from clustersim.core.config import ConfigError
from clustersim.core.models import bundled_data, token_vocab
from clustersim.core.schedule import ranks_needed

from executor.data import for_model, mnist, synthetic

ALGORITHMS = ("sync", "downpour", "dcasgd", "ssp", "local", "sandblaster")


def rank_role(rank: int, model_parallel: int, replicas: int) -> tuple[str, int, int]:
    """("worker", replica, slot) or ("shard", shard, -1): pure, so tests need no MPI.
    ``model_parallel``: the slots of a replica (tensor slices x pipeline stages)."""
    workers = model_parallel * replicas
    if rank < workers:
        r, j = divmod(rank, model_parallel)
        return "worker", r, j
    return "shard", rank - workers, -1


def serve_rule(rule: str) -> str:
    """The Plan's shard rule as ``psrank.serve`` names it: serve builds one DC-ASGD for both
    "dcasgd" and "dcasgd_adaptive" (it reads ``training.dcasgd_adaptive`` itself)."""
    return "dcasgd" if rule.startswith("dcasgd") else rule


def parse_fail(text: str | None, sc) -> tuple[int, int] | None:
    """``K@S`` or ``rank=K@step=S`` -> (rank, step); ConfigError when malformed or not a worker."""
    if not text:
        return None
    m = re.fullmatch(r"(?:rank=)?(\d+)@(?:step=)?(\d+)", text.strip())
    workers = sc.parallel.devices_per_replica * sc.parallel.replicas
    if not m or int(m.group(1)) >= workers:
        raise ConfigError("--fail", text, f"must be rank=K@step=S with K a worker rank (0..{workers - 1})")
    if int(m.group(2)) >= sc.training.steps:
        raise ConfigError("--fail", text, f"step {m.group(2)} is past the run's last (training.steps = "
                                          f"{sc.training.steps}): nothing would fail")
    why = cannot_go_on(sc)
    if why:
        raise ConfigError("--fail", text, why)
    return int(m.group(1)), int(m.group(2))


def cannot_go_on(sc) -> str:
    """Why the job would wait for a crashed worker forever ("" when it goes on without it:
    a crashed slot takes its replica with it, and the other replicas carry on)."""
    par, tr = sc.parallel, sc.training
    if par.replicas == 1:
        return "the crashed rank's replica is the only one: nothing would be left to train"
    if tr.algorithm == "sync" and not par.ps_shards:
        return "sync SGD by allreduce waits for every replica: give parallel.ps_shards and training.backup_workers"
    if tr.algorithm == "sync" and not tr.backup_workers:
        return "sync SGD waits for every replica: give training.backup_workers >= 1"
    if tr.algorithm == "local":
        return "local SGD averages over every replica: it would wait for the crashed one"
    return ""


CHECKPOINT_EVERY = 100      # updates between a shard's checkpoints, where --checkpoint-every is not given


def check_checkpoint(args, sc) -> None:
    """``--checkpoint``, ``--checkpoint-every`` and ``--resume`` as one line each, before any
    rank starts (a folder that cannot be made would otherwise fail on a shard's rank)."""
    from pathlib import Path
    if (args.checkpoint or args.resume) and not sc.parallel.ps_shards:
        raise ConfigError("--checkpoint", args.checkpoint or "", "checkpoints are kept by parameter-server "
                          "shards: set parallel.ps_shards >= 1")
    if (args.checkpoint or args.resume) and sc.training.algorithm == "sandblaster":
        raise ConfigError("--checkpoint", args.checkpoint or "", "Sandblaster's shards keep no checkpoints (its "
                          "L-BFGS history lives on the shards between batches); the other shard algorithms do")
    if args.resume and not args.checkpoint:
        raise ConfigError("--resume", "", "needs --checkpoint DIR")
    if args.checkpoint_every is not None and not args.checkpoint:
        raise ConfigError("--checkpoint-every", str(args.checkpoint_every), "needs --checkpoint DIR")
    if args.checkpoint_every is not None and args.checkpoint_every < 1:
        raise ConfigError("--checkpoint-every", str(args.checkpoint_every), "must be >= 1")
    if args.checkpoint and Path(args.checkpoint).exists() and not Path(args.checkpoint).is_dir():
        raise ConfigError("--checkpoint", args.checkpoint, "is a file, not a folder")
    if args.resume:
        missing = [k for k in range(sc.parallel.ps_shards) if not (Path(args.checkpoint) / f"shard{k}.npz").exists()]
        if missing:
            raise ConfigError("--resume", args.checkpoint, f"no checkpoint of shard {missing[0]} there")
        for k in range(sc.parallel.ps_shards):
            readable_checkpoint(Path(args.checkpoint) / f"shard{k}.npz")


def readable_checkpoint(path) -> None:
    """ConfigError naming ``--resume`` where ``path`` is no shard checkpoint
    (``psrank.read_checkpoint``); whether it fits its shard the shard says (its size lives
    with the ranks)."""
    from executor.psrank import read_checkpoint
    try:
        read_checkpoint(path)
    except ValueError as exc:
        raise ConfigError("--resume", str(path), str(exc).replace(f"checkpoint {path} ", "", 1)) from None


def _folder(given: str, inside: bool):
    """The folder a path option writes into: ``given``, or with ``inside`` the one that
    holds the file ``given``."""
    from pathlib import Path
    return Path(given).absolute().parent if inside else Path(given).absolute()


def check_folder(option: str, given: str, inside: bool = False) -> None:
    """A ConfigError naming ``option`` where the folder ``make_folder`` would make cannot be
    made because a file stands in its path, before any folder is made (two folders to make:
    the second's refusal would leave the first behind)."""
    folder = _folder(given, inside)
    at = next(p for p in (folder, *folder.parents) if p.exists())
    if not at.is_dir():
        raise ConfigError(option, given, f"{'its folder ' if inside else ''}cannot be made ({at} is a file)")


def make_folder(option: str, given: str, inside: bool = False) -> None:
    """Makes the folder ``option`` writes into (``given``, or with ``inside`` the folder that
    holds the file ``given``) once every other check has passed, so that a refused run
    leaves none behind; the ranks would fail there on a path that cannot be made."""
    try:
        _folder(given, inside).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(option, given, f"{'its folder ' if inside else ''}cannot be made ({exc.strerror})") from None


def check(sc, size: int) -> None:
    need = ranks_needed(sc)
    if size != need:
        extra = " + 1 coordinator" if sc.training.algorithm == "sandblaster" else ""
        raise ConfigError("--ranks", str(size),
                          f"the scenario needs model_parallel x pipeline x replicas + ps_shards{extra} = "
                          f"{need} ranks")
    if sc.training.algorithm not in ALGORITHMS:
        raise ConfigError(sc.file, "training.algorithm",
                          f"execute runs {', '.join(ALGORITHMS)} so far; got {sc.training.algorithm}")
    if sc.training.algorithm != "sync" and sc.training.algorithm != "local" and not sc.parallel.ps_shards:
        raise ConfigError(sc.file, "parallel.ps_shards", f"{sc.training.algorithm} needs ps_shards >= 1")
    if sc.dtype != "fp32" or sc.gradient_bytes != 4:        # NumPy has no bf16; CuPy's fp16 is untried
        key, value = ("model.dtype", sc.dtype) if sc.dtype != "fp32" else ("training.gradient_dtype",
                                                                           sc.training.gradient_dtype)
        raise ConfigError(sc.file, key, f"execute computes and sends fp32; a {value} prediction would be checked "
                                        f"against fp32 arithmetic (set {key} = \"fp32\", or simulate it)")
    if sc.training.zero:
        raise ConfigError(sc.file, "training.zero", "execute keeps every replica's state whole (ZeRO is simulated "
                                                    "only); its run would not be the prediction's")
    unrun = simulated_only(sc)
    if unrun:
        raise ConfigError(sc.file, unrun[0], f"execute runs no {unrun[1]}: its run would go on without it "
                                             f"(remove it, or simulate the scenario)")
    if sum(not readers for readers in sc.model.consumers) > 1:
        raise ConfigError(sc.file, "model.name", f"execute trains a model with one loss; {sc.model.name} ends in "
                                                 "several (simulate it instead)")
    if any(n.layer.kind == "lm_head" and n.layer.tied for n in sc.model.nodes):
        raise ConfigError(sc.file, "model", f"execute runs an untied LM head only; {sc.model.name}'s lm_head is "
                                            f"tied to the word embeddings (tied = false in a model file, or "
                                            f"simulate it)")


def simulated_only(sc) -> tuple[str, str] | None:
    """The first setting the executor does not act on, as (field, what it is), or None: the
    simulator draws failures, stragglers and start offsets and stops at a time limit; a
    real run has its own (``--fail``, ``--checkpoint``), and validating a prediction that
    has them against a run that has not would compare two different jobs."""
    tr, f = sc.training, sc.faults
    for key, given, what in (
            ("faults.fail", f.failures, "scheduled failures (--fail crashes a worker)"),
            ("faults.mtbf_s", f.mtbf_s, "drawn failures"), ("faults.machine_mtbf_s", f.machine_mtbf_s, "drawn failures"),
            ("faults.slowdown", f.slowdown, "slowed devices"),
            ("faults.slowdown_sigma", f.slowdown_sigma, "drawn stragglers"),
            ("faults.on_failure", f.on_failure != "continue", "restarts from sync checkpoints"),
            ("faults.checkpoint_every", f.checkpoint_every, "sync checkpoints (--checkpoint keeps the shards')"),
            ("faults.shard_recovery", f.shard_recovery != "none", "shard restarts (--checkpoint and --resume)"),
            ("training.time_limit_s", tr.time_limit_s, "time limit (it runs training.steps)"),
            ("training.push_early", tr.push_early, "layer-by-layer pushes (a replica pushes once a step)"),
            ("training.warm_start_s", tr.warm_start_s, "warm start"),
            ("training.start_spread_s", tr.start_spread_s != -1.0, "start spread")):
        if given:
            return key, what
    return None


def check_data(folder: str | None, sc):
    """MNIST from the IDX files in ``folder`` shaped for the scenario's model, or None when no
    folder is given; ConfigError naming ``--data`` when it cannot be read or does not fit."""
    if not folder:
        return None
    from math import prod
    try:
        d = mnist(folder)
    except (OSError, ValueError) as exc:
        raise ConfigError("--data", folder, f"cannot read MNIST IDX files there ({exc})") from None
    features, classes = prod(sc.model.input_shape), sc.model.classes or sc.model.nodes[-1].out_shape[0]
    if d.x_train.shape[1] != features:
        raise ConfigError("--data", folder, f"its images have {d.x_train.shape[1]} values; model "
                                            f"{sc.model.name!r} takes {features}")
    if int(max(d.y_train.max(), d.y_test.max())) >= classes:
        raise ConfigError("--data", folder, f"labels go up to {int(max(d.y_train.max(), d.y_test.max()))}; model {sc.model.name!r} "
                                            f"has {classes} classes")
    shape = sc.model.input_shape
    return (d.x_train.reshape(len(d.x_train), *shape), d.y_train, d.x_test.reshape(len(d.x_test), *shape), d.y_test)


def data_source(sc, data=None) -> str:
    """Where ``dataset`` takes the data from: ``mnist`` (``--data``), the bundled set's name
    (``digits``, ``grammar``), or ``synthetic``."""
    return "mnist" if data is not None else bundled_data(sc.model) or "synthetic"


def dataset(sc, seed: int, data=None):
    """(x_train, y_train, x_test, y_test): ``data`` (from ``check_data``) when given, the
    data set the package bundles for the model (``data.for_model``: digits, the grammar
    corpus), else seeded synthetic inputs (``data_source`` names which)."""
    if data is not None:
        return data
    d = for_model(sc.model, seed)
    if d is None:
        classes = sc.model.classes or sc.model.nodes[-1].out_shape[0]
        d = synthetic(sc.model.input_shape, classes, 4 * sc.batch_size * sc.parallel.replicas,
                      np.random.default_rng(seed), token_vocab(sc.model), sc.model.nodes[-1].out_shape[1],
                      least=sc.parallel.micro_batches)
    return d.x_train, d.y_train, d.x_test, d.y_test
