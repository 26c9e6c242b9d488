"""Scenario files: loading, ``--set`` overrides and validation in one place.

Everything a run needs is checked here or in ``plan()``; an error is a ``ConfigError``
naming the scenario file (or the topology/model file it points to) and the dotted field.
"""
from __future__ import annotations

import copy
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clustersim.core.config import ConfigError, Table, bundled_folder, bundled_names
from clustersim.core.models import BUNDLED_DATA, ZOO, Model, bundled_data, load_model_file, zoo_model
from clustersim.core.topogen import MAX_MACHINES, load_topology
from clustersim.core.topology import DTYPES, Topology

LOCKSTEP = ("sync", "sandblaster")      # replicas whose steps end together (Trace.step_ends)
ASYNC = ("downpour", "dcasgd", "ssp")   # replicas step on their own against a parameter server

DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp64": 8}
ALGORITHMS = ("sync", "downpour", "dcasgd", "ssp", "local", "sandblaster", "layerwise")
OPTIMIZERS = ("sgd", "adagrad", "adam")
NETWORKS = ("flow", "analytical")
COLLECTIVE_ALGOS = ("auto", "ring", "tree", "hierarchical")
PIPELINE_SCHEDULES = ("1f1b", "gpipe")
ATTENTION = ("eager", "fused", "flash")   # model.attention: how the framework runs attention's kernels


class NothingToShard(ConfigError):
    """ZeRO asked of one replica: bad for a run, but a search that picks the replicas itself
    applies it to the candidates that have several."""


def _grid(pt: Table) -> tuple[int, ...]:
    """``parallel.grid = [rows, cols]``: two integers >= 1, or absent."""
    value = pt.raw("grid", [])
    if not isinstance(value, list) or (value and (len(value) != 2 or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value))):
        raise pt.error("grid", f"must be two integers >= 1 as [rows, cols]; got {value!r}")
    return tuple(value)


@dataclass(frozen=True)
class Parallel:
    model_parallel: int = 1      # devices per replica (DistBelief: machines per model instance)
    split: str = "spatial"       # spatial (DistBelief: each device a slice of every layer) | tensor
                                 # (Megatron-LM: replicated norms, allreduced partial sums) | layers (pipeline)
    replicas: int = 1
    ps_shards: int = 0           # 0: gradients are summed by allreduce
    ps_placement: str = "spare"  # spare: shards on the compute devices the job leaves free, else host CPUs |
                                 # local: on the machines the replicas use, in turn (their free devices,
                                 # then CPUs; else the replicas' own devices)
    micro_batches: int = 1       # pipeline (layers split): micro-batches per step
    schedule: str = "1f1b"       # pipeline: gpipe (all forwards, then all backwards) | 1f1b
    grid: tuple[int, ...] = ()   # spatial split: (rows, cols) blocks of every layer; (): chosen from model_parallel
    pipeline: int = 1            # spatial split: pipeline stages, each of model_parallel (tensor) slots
    sequence_parallel: bool = False   # tensor split: norms and sums cut by positions (Korthikanti et al. 2022)

    @property
    def stages(self) -> int:
        """Pipeline stages: ``layers`` with model_parallel = M is M stages of one device."""
        return self.model_parallel if self.split == "layers" else self.pipeline

    @property
    def tensor(self) -> int:
        """Devices each layer is cut over (1 under a layers split)."""
        return 1 if self.split == "layers" else self.model_parallel

    @property
    def devices_per_replica(self) -> int:
        return self.stages * self.tensor


@dataclass(frozen=True)
class Training:
    algorithm: str = "sync"
    steps: int = 20              # per replica (sandblaster: batches)
    learning_rate: float = 0.1
    allreduce: str = "auto"      # auto (NCCL's tuner, per bucket) | ring | tree | hierarchical, when ps_shards = 0
    bucket_mb: float = 25.0      # sync allreduce: gradient buckets (MiB, as PyTorch DDP's bucket_cap_mb); 0: one
    gradient_dtype: str = ""     # gradients as kept and allreduced: "" the model's dtype; fp32 as AMP keeps them
    time_limit_s: float = 0.0    # > 0: no replica starts a step after this simulated time
    optimizer: str = "sgd"       # sgd | adagrad: the rule shards apply (downpour, ssp); adam: sync (memory: 2 moments)
    zero: int = 0                # sync: ZeRO stage, sharding over replicas 1 optimizer state, 2 + gradients, 3 + weights
    recompute: str = ""          # "full": activations at checkpoints only (plan.checkpoints), the backward reruns the
                                 # forward; "selective": attention's scores rerun (Korthikanti et al. 2022); "none"
                                 # (false): none; "": none, not set (search may try recomputation)
    n_fetch: int = 1             # downpour/dcasgd/ssp: fetch parameters every n_fetch steps
    n_push: int = 1              # ... and push accumulated gradients every n_push steps
    warm_start_s: float = 0.0    # downpour: replica 0 alone until then, the others join after
    start_spread_s: float = -1.0  # async: replicas start at seeded offsets in [0, this); -1: a parameter round trip
    backup_workers: int = 0      # sync: go on with the first (replicas - backup_workers) gradients
    push_early: bool = False     # sync with shards: push each layer's gradients as its backward ends
    dcasgd_lambda: float = 0.04  # dcasgd: lambda (lambda0 when adaptive), the paper's range
    dcasgd_adaptive: bool = False
    staleness: int = 3           # ssp: a replica more than this many steps ahead waits
    local_steps: int = 10        # local: average parameters every k steps
    work_units: int = 0          # sandblaster: units per batch (0: 8 per replica)
    backup_tasks: bool = True    # sandblaster: duplicate unfinished units near the end
    lbfgs_history: int = 10      # sandblaster: (s, y) pairs the shards keep
    comm_bits: int = 32          # 32 | 8: parameter and gradient messages
    cosim: bool = False          # run the real math on the simulated clock (models with bundled data)
    eval_points: int = 20        # cosim: accuracy evaluations over the run
    target_accuracy: float = 0.9  # cosim: time_to_accuracy_s is when this is first reached
    dataset_samples: int = 0     # > 0: report epoch_time_s, time_to_train_s (and cost, energy where priced)
    epochs: float = 1.0          # passes over dataset_samples
    target_hours: float = 0.0    # > 0: report whether time_to_train_s meets it
    comm_interval: int = 10      # layerwise: samples between weight exchanges (the seed's interval)


@dataclass(frozen=True)
class Failure:
    at_s: float
    devices: tuple[str, ...] = ()         # compute devices that stop (one, or a whole machine's)
    link: tuple[str, str] | None = None   # a link that goes down


@dataclass(frozen=True)
class Faults:
    slowdown: dict = field(default_factory=dict)   # device -> factor (2.0: twice as slow)
    slowdown_sigma: float = 0.0        # > 0: every compute device also slowed by lognormal(0, sigma), >= 1
    failures: tuple[Failure, ...] = ()
    mtbf_s: float = 0.0                # > 0: each device the job uses (replicas, shards) fails after an exponential time
    machine_mtbf_s: float = 0.0        # > 0: each machine it uses fails as a whole (all its devices) likewise
    detect_timeout_s: float = 1.0      # how long sync waits for a silent replica
    on_failure: str = "continue"       # sync: continue without it | restart from the last checkpoint
    checkpoint_every: int = 0          # sync restart: steps between checkpoints (0: never)
    checkpoint_gbps: float = 1.0       # checkpoint storage bandwidth, 10^9 bytes/s
    restart_s: float = 30.0            # sync restart: replacing the machine and relaunching
    shard_recovery: str = "none"       # async: a failed shard stalls the job | restarts from its "checkpoint"
    shard_checkpoint_every: int = 0    # shard_recovery: applies between a shard's checkpoints (0: the start only)
    host_noise: bool = False           # replay the topology's measured noise series (host ranks' speed over time)
    host_noise_window_s: float = 0.0   # > 0: replay each window of those series this long (0: as measured)


@dataclass(frozen=True)
class Scenario:
    file: str
    name: str
    seed: int
    topology: Topology
    network: str                 # flow (max-min sharing) | analytical (alpha-beta)
    model: Model
    batch_size: int              # per replica
    dtype: str
    parallel: Parallel
    training: Training
    faults: Faults
    raw: dict                    # the validated TOML, for reports and sweeps
    attention: str = "eager"     # how attention's kernels run: eager | fused (softmax) | flash

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def gradient_bytes(self) -> int:
        """Bytes of one gradient value, in memory and in the replicas' allreduce: the model's
        dtype (Megatron-LM and DeepSpeed in fp16), or ``training.gradient_dtype`` (fp32:
        PyTorch AMP's fp32 parameters, Megatron-LM's bf16 with fp32 gradient accumulation)."""
        return DTYPE_BYTES[self.training.gradient_dtype or self.dtype]


def read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(Path(path).read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), "", f"malformed TOML: {exc}") from None
    except (OSError, ValueError) as exc:           # ValueError: undecodable, or a NUL in the name
        names = "" if Path(path).suffix else "; built-in scenarios: " + ", ".join(builtin_scenarios())
        raise ConfigError(str(path), "", f"cannot read file ({exc.__class__.__name__}){names}") from None


def builtin_scenarios() -> list[str]:
    """The names ``scenario_file`` takes for the scenarios shipped with the package."""
    return bundled_names("clustersim.builtin_scenarios")


def parse_set(items: list[str], option: str = "--set") -> list[tuple[str, Any]]:
    """``key=value`` pairs; the value is read as a TOML value (``8``, ``true``, ``"x"``,
    ``[1, 2]``) and, failing that, as a bare string.  ``option``: what a bad one is named."""
    out = []
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
            raise ConfigError(option, item, "must look like section.key=value")
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        if isinstance(value, float) and not math.isfinite(value):    # TOML's nan and inf: no setting takes them,
            raise ConfigError(option, item, "must be a finite number")  # and JSON rows could not hold them
        out.append((key.strip(), value))
    return out


def apply_overrides(data: dict, overrides: list[tuple[str, Any]]) -> dict:
    data = copy.deepcopy(data)
    for key, value in overrides:
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError("--set", key, f"{part} is not a table")
        node[parts[-1]] = value
    return data


def scenario_file(ref: str | Path) -> Path:
    """``ref`` as a path; a bare name with no such file (``quickstart``) is the built-in
    scenario of that name (``scenarios/``, shipped as ``clustersim.builtin_scenarios``), so
    an installed package runs its examples from any folder."""
    path = Path(ref)
    if path.exists() or path.suffix or len(path.parts) != 1:
        return path
    builtin = builtin_scenario_folder() / f"{path.name}.toml"
    return builtin if builtin.is_file() else path


def builtin_scenario_folder() -> Path:
    """Where the scenarios shipped with the package are (``scenarios/`` in the checkout)."""
    return bundled_folder("clustersim.builtin_scenarios")


def load_scenario(path: str | Path, overrides: list[tuple[str, Any]] = ()) -> Scenario:
    path = scenario_file(path)
    return scenario_from_dict(apply_overrides(read_toml(path), list(overrides)), str(path))


def scenario_from_dict(data: dict, file: str) -> Scenario:
    base_dir = Path(file).parent
    if "reference" in data and ("scenario" in data or "collective" in data or "cluster" not in data):
        raise ConfigError(file, "reference", "a published case, not a scenario: `clustersim published` runs the "
                          "built-in ones, `--dir FOLDER` a folder of them (its [scenario] or [collective] table "
                          "says what it simulates)")
    if "cluster" not in data and any(k in data for k in ("device", "machine", "network", "link")):
        raise ConfigError(file, "", "a topology file, not a scenario: a scenario names it in cluster.topology")
    top = Table(data, file)
    top.only(("name", "description", "seed", "cluster", "model", "parallel", "training", "faults"))
    name = top.str("name", Path(file).stem)
    top.str("description", "")
    seed = top.int("seed", 0, lo=0, hi=2**63 - 1)

    ct = top.table("cluster")
    machines = ct.int("machines", 0, lo=0, hi=MAX_MACHINES)
    topology = load_topology(ct.str("topology"), base_dir, machines or None, (file, "cluster.topology"))
    network = ct.str("network", "flow", choices=NETWORKS)
    ct.done()

    mt = top.table("model")
    mt.data = {k: v for k, v in mt.data.items() if not (k in ("name", "file") and v == "")}   # --set model.name=
    if mt.has("file") == mt.has("name"):
        raise mt.error("name", "give exactly one of model.name (built-in) or model.file")
    if mt.has("name"):
        model = zoo_model(mt.str("name", choices=ZOO))
    else:
        path = base_dir / mt.str("file")
        if not path.exists():
            raise mt.error("file", f"{path} does not exist (a model file is read beside the scenario that names it)")
        model = load_model_file(path)
    batch = mt.int("batch_size", 32, lo=1, hi=1_000_000)
    dtype = mt.str("dtype", "fp32", choices=DTYPES)
    attention = mt.str("attention", "eager", choices=ATTENTION)
    if mt.has("sequence"):
        if not mt.has("name"):
            raise mt.error("sequence", "sets a built-in transformer's positions; a model file gives its input shape")
        try:
            model = zoo_model(model.name, mt.int("sequence", lo=1, hi=10_000_000))
        except ValueError as exc:
            raise mt.error("sequence", str(exc)) from None
    positions = model.attention_positions
    if mt.has("attention") and not positions:
        raise mt.error("attention", f"{model.name} has no attention layers")
    if attention in ("flash", "fused") and dtype not in ("fp16", "bf16"):     # Megatron-LM's FusedScaleMaskSoftmax
        kernel = "FlashAttention" if attention == "flash" else "the fused softmax kernel"    # needs 16-bit input
        raise mt.error("attention", f"{kernel} runs in fp16 or bf16; model.dtype is {dtype}")
    mt.done()

    pt = top.table("parallel", {})
    par = Parallel(model_parallel=pt.int("model_parallel", 1, lo=1, hi=65536),
                   split=pt.str("split", "spatial", choices=("spatial", "tensor", "layers")),
                   replicas=pt.int("replicas", 1, lo=1, hi=65536),
                   ps_shards=pt.int("ps_shards", 0, lo=0, hi=65536),
                   ps_placement=pt.str("ps_placement", "spare", choices=("spare", "local")),
                   micro_batches=pt.int("micro_batches", 1, lo=1, hi=4096),
                   schedule=pt.str("schedule", "1f1b", choices=PIPELINE_SCHEDULES),
                   grid=_grid(pt), pipeline=pt.int("pipeline", 1, lo=1, hi=65536),
                   sequence_parallel=pt.bool("sequence_parallel", False))
    if par.pipeline > 1 and par.split == "layers":
        raise pt.error("pipeline", "a layers split is model_parallel pipeline stages of one device; for stages of "
                                   "slices use split = \"tensor\" (Megatron-LM's) or \"spatial\" with pipeline")
    if par.pipeline > len(model.nodes):
        raise pt.error("pipeline", f"at most {len(model.nodes)} stages (one per layer); got {par.pipeline}")
    if par.micro_batches > batch:
        raise pt.error("micro_batches", f"must be <= model.batch_size ({batch})")
    if par.grid and par.split != "spatial":
        raise pt.error("grid", f"blocks are a spatial split; split is {par.split!r}")
    if par.grid and par.grid[0] * par.grid[1] != par.model_parallel:
        raise pt.error("grid", f"{par.grid[0]} x {par.grid[1]} blocks need model_parallel = "
                               f"{par.grid[0] * par.grid[1]}; got {par.model_parallel}")
    if par.sequence_parallel and par.split != "tensor":
        raise pt.error("sequence_parallel", f"cuts a tensor split's norms by positions; split is {par.split!r}")
    if par.sequence_parallel and positions % par.tensor:     # Megatron-LM asserts it (tensor_parallel/mappings.py)
        where = "model.sequence" if mt.has("name") else "the model file's input"
        raise pt.error("sequence_parallel", f"cuts positions evenly over the {par.tensor} tensor slots; "
                                            f"{model.name}'s {positions} are not a multiple of {par.tensor} "
                                            f"(set {where})")
    if par.ps_placement != "spare" and not par.ps_shards:
        raise pt.error("ps_placement", "places parameter-server shards; ps_shards = 0 has none")
    if par.split == "tensor" and par.ps_shards:
        raise pt.error("ps_shards", "a tensor split keeps norms on every slot, synced by allreduce; set ps_shards = 0")
    pt.done()

    tr = _training(top.table("training", {}))
    faults = _faults(top.table("faults", {}), topology)
    top.done()
    if tr.algorithm in ("downpour", "dcasgd", "ssp", "sandblaster") and not par.ps_shards:
        raise ConfigError(file, "parallel.ps_shards", f"{tr.algorithm} needs a parameter server: set ps_shards >= 1")
    if tr.backup_workers and tr.backup_workers >= par.replicas:
        raise ConfigError(file, "training.backup_workers", f"must be < parallel.replicas ({par.replicas})")
    if tr.push_early and (tr.algorithm != "sync" or not par.ps_shards or tr.backup_workers):
        raise ConfigError(file, "training.push_early", "pushes layer by layer are sync SGD's with ps_shards >= 1 "
                                                       "and no backup workers")
    if tr.backup_workers and not par.ps_shards:
        raise ConfigError(file, "training.backup_workers",
                          "needs parallel.ps_shards >= 1 (the shards drop the late replicas' pushes)")
    if faults.shard_recovery != "none" and tr.algorithm not in ("downpour", "dcasgd", "ssp"):
        raise ConfigError(file, "faults.shard_recovery", f"shards restart from checkpoints in Downpour, DC-ASGD "
                          f"and SSP; {tr.algorithm} stops at a failed shard")
    if tr.comm_bits == 8 and not par.ps_shards and tr.algorithm not in ("local", "layerwise"):   # those: below
        raise ConfigError(file, "training.comm_bits", f"8-bit messages are the parameter server's pushes and fetches; "
                          f"{tr.algorithm} without ps_shards sends 32-bit (set comm_bits = 32 or ps_shards >= 1)")
    if tr.algorithm == "layerwise":             # one replica of G layer groups, exchanging weights directly
        for key, bad in (("split", par.split != "layers"), ("replicas", par.replicas != 1),
                         ("ps_shards", par.ps_shards != 0)):
            if bad:
                raise ConfigError(file, f"parallel.{key}", "layerwise needs split = \"layers\", replicas = 1 "
                                  f"and ps_shards = 0 (one worker per layer group); got {getattr(par, key)!r}")
    # settings an algorithm would silently ignore are bad input (docs/decisions/052)
    for key, bad, why in (
            ("training.optimizer", tr.optimizer == "adagrad" and tr.algorithm not in ("downpour", "ssp"),
             "adagrad is the rule Downpour's and SSP's shards apply"),
            ("training.optimizer", tr.optimizer == "adam" and tr.algorithm == "sync" and par.ps_shards,
             "adam is stepped by sync's replicas after their allreduce (ps_shards = 0); parameter-server shards "
             "apply sgd"),
            ("training.n_push" if tr.n_push != 1 else "training.n_fetch",
             (tr.n_fetch != 1 or tr.n_push != 1) and tr.algorithm not in ASYNC,
             "fetching and pushing every n steps is Downpour's, DC-ASGD's and SSP's"),
            ("training.backup_workers", tr.backup_workers and tr.algorithm != "sync",
             "backup workers are sync SGD's (Chen et al. 2016)"),
            ("training.comm_bits", tr.comm_bits == 8 and tr.algorithm not in ASYNC + ("sync", "sandblaster"),
             "8-bit messages are the parameter server's pushes and fetches (sync, Downpour, DC-ASGD, SSP, "
             "Sandblaster)"),
            ("training.staleness", tr.staleness != Training.staleness and tr.algorithm != "ssp",
             "a staleness bound is SSP's"),
            ("training.local_steps", tr.local_steps != Training.local_steps and tr.algorithm != "local",
             "averaging every k steps is local SGD's"),
            ("parallel.ps_shards", par.ps_shards and tr.algorithm == "local",
             "local SGD averages its replicas' weights by allreduce, with no parameter server"),
            ("training.allreduce", tr.allreduce != Training.allreduce
             and (par.ps_shards or tr.algorithm not in ("sync", "local")),
             "an allreduce algorithm is for the replicas' allreduce (sync or local SGD, ps_shards = 0)"),
            ("training.bucket_mb", tr.bucket_mb != Training.bucket_mb and (par.ps_shards or tr.algorithm != "sync"),
             "gradient buckets are sync SGD's allreduce (ps_shards = 0)"),
            ("training.dcasgd_lambda" if tr.dcasgd_lambda != Training.dcasgd_lambda else "training.dcasgd_adaptive",
             (tr.dcasgd_lambda != Training.dcasgd_lambda or tr.dcasgd_adaptive) and tr.algorithm != "dcasgd",
             "delay compensation is DC-ASGD's"),
            ("training.work_units" if tr.work_units else "training.lbfgs_history" if tr.lbfgs_history != Training.lbfgs_history
             else "training.backup_tasks",
             (tr.work_units or tr.lbfgs_history != Training.lbfgs_history or not tr.backup_tasks)
             and tr.algorithm != "sandblaster", "work units, backup tasks and L-BFGS history are Sandblaster's"),
            ("training.comm_interval", tr.comm_interval != Training.comm_interval and tr.algorithm != "layerwise",
             "a weight-exchange interval is the layer-wise algorithm's"),
            ("training.warm_start_s", tr.warm_start_s and tr.algorithm not in ASYNC,
             "a warm start is Downpour's, DC-ASGD's and SSP's"),
            ("faults.checkpoint_every" if faults.checkpoint_every else "faults.on_failure",
             (faults.checkpoint_every or faults.on_failure == "restart") and tr.algorithm != "sync",
             "restarting from checkpoints is sync SGD's (shards: faults.shard_recovery)"),
            ("training.start_spread_s", tr.start_spread_s != Training.start_spread_s and tr.algorithm not in ASYNC,
             "replicas starting apart are Downpour's, DC-ASGD's and SSP's"),
            ("training.time_limit_s", tr.time_limit_s and tr.algorithm == "layerwise",
             "a time limit is read where replicas start steps (every algorithm but layerwise)"),
            ("faults.detect_timeout_s", faults.detect_timeout_s != Faults.detect_timeout_s
             and tr.algorithm not in ("sync", "sandblaster"),
             "waiting for a silent replica is sync SGD's and Sandblaster's; the others go on without it"),
            ("faults.restart_s" if faults.restart_s != Faults.restart_s else "faults.checkpoint_gbps",
             (faults.restart_s != Faults.restart_s or faults.checkpoint_gbps != Faults.checkpoint_gbps)
             and tr.algorithm != "sync" and faults.shard_recovery == "none",
             "restarts and checkpoint writes are sync SGD's and faults.shard_recovery's"),
            ("faults.shard_checkpoint_every", faults.shard_checkpoint_every and faults.shard_recovery == "none",
             "a shard's checkpoints are for faults.shard_recovery = \"checkpoint\"")):
        if bad:
            raise ConfigError(file, key, f"{why}; {tr.algorithm} would ignore it")
    if tr.optimizer == "adam" and tr.algorithm != "sync":
        rule = {"downpour": "its shards apply sgd or adagrad", "ssp": "its shards apply sgd or adagrad",
                "dcasgd": "its shards apply delay-compensated sgd", "sandblaster": "its coordinator steps L-BFGS",
                "local": "its replicas step sgd", "layerwise": "its workers step sgd"}[tr.algorithm]
        raise ConfigError(file, "training.optimizer", f"adam is sync's optimizer; {tr.algorithm} would ignore it "
                                                      f"({rule})")
    total = batch * par.replicas
    if tr.work_units > total:
        raise ConfigError(file, "training.work_units", f"a unit is at least one sample: at most model.batch_size x "
                                                       f"parallel.replicas = {total}")
    if tr.algorithm == "sandblaster":       # a unit is what a replica computes, in its micro-batches
        unit = max(1, total // min(tr.work_units or 8 * par.replicas, total))     # as schedule.units_of
        if par.micro_batches > unit:
            raise ConfigError(file, "parallel.micro_batches", f"must be <= a work unit's {unit} samples (model."
                                                              f"batch_size x parallel.replicas / training.work_units)")

    if tr.zero and (tr.algorithm != "sync" or par.ps_shards):
        raise ConfigError(file, "training.zero", "ZeRO shards sync data parallelism's state over the replicas "
                                                 "(algorithm = \"sync\", ps_shards = 0)")
    if tr.zero and par.replicas == 1:
        raise NothingToShard(file, "training.zero", "ZeRO shards state over the replicas; parallel.replicas = 1 "
                                                    "has none to shard over")
    if tr.recompute == "selective" and not positions:
        raise ConfigError(file, "training.recompute", f"selective recomputation reruns attention's score matrices; "
                                                      f"{model.name} has no attention layers")
    if tr.cosim and bundled_data(model) is None:
        raise ConfigError(file, "training.cosim", f"co-simulation trains {', '.join(BUNDLED_DATA)} on their "
                          f"bundled data sets; got model {model.name}"
                          + (" of another input or classes than the built-in's" if model.name in BUNDLED_DATA else ""))
    lacking = dtype == "fp64" and next((d for d in topology.compute_devices()
                                        if "fp64" not in topology.devices[d].peak_flops), None)
    if lacking:
        raise ConfigError(file, "model.dtype", f"fp64 on {lacking} of topology {topology.name}, whose table gives "
                                               f"no peak_tflops_fp64 (GPUs run fp64 at 1/2 to 1/64 of fp32)")
    return Scenario(file, name, seed, topology, network, model, batch, dtype, par, tr, faults, data, attention)


RECOMPUTE_MODES = {False: "none", True: "full", "none": "none", "full": "full", "selective": "selective"}


def _recompute(tt: Table) -> str:
    """``training.recompute``: true or "full" (Megatron-LM's full recomputation), "selective"
    (its default: only attention's score matrices are rerun), false or "none" ("": not set,
    which search may fill)."""
    value = tt.raw("recompute", "")
    if value == "":
        return ""
    if isinstance(value, (bool, str)) and value in RECOMPUTE_MODES:
        return RECOMPUTE_MODES[value]
    raise tt.error("recompute", f'must be true, false, "full", "selective" or "none"; got {value!r}')


def _gradient_dtype(tt: Table) -> str:
    """``training.gradient_dtype``: one of the dtypes, or empty (the model's)."""
    value = tt.str("gradient_dtype", "")
    if value and value not in DTYPE_BYTES:
        raise tt.error("gradient_dtype", f"must be one of {', '.join(DTYPE_BYTES)} (or unset: the model's dtype); "
                                         f"got {value!r}")
    return value


def _training(tt: Table) -> Training:
    tr = Training(
        algorithm=tt.str("algorithm", "sync", choices=ALGORITHMS),
        steps=tt.int("steps", 20, lo=1, hi=10_000_000),
        learning_rate=tt.float("learning_rate", 0.1, positive=True),
        allreduce=tt.str("allreduce", "auto", choices=COLLECTIVE_ALGOS),
        bucket_mb=tt.float("bucket_mb", 25.0, lo=0.0, hi=1e6),
        gradient_dtype=_gradient_dtype(tt),
        time_limit_s=tt.float("time_limit_s", 0.0, lo=0.0),
        optimizer=tt.str("optimizer", "sgd", choices=OPTIMIZERS),
        n_fetch=tt.int("n_fetch", 1, lo=1, hi=1_000_000),
        n_push=tt.int("n_push", 1, lo=1, hi=1_000_000),
        warm_start_s=tt.float("warm_start_s", 0.0, lo=0.0),
        start_spread_s=tt.float("start_spread_s", -1.0, lo=-1.0),
        backup_workers=tt.int("backup_workers", 0, lo=0, hi=65535),
        push_early=tt.bool("push_early", False),
        dcasgd_lambda=tt.float("dcasgd_lambda", 0.04, lo=0.0),
        dcasgd_adaptive=tt.bool("dcasgd_adaptive", False),
        staleness=tt.int("staleness", 3, lo=0, hi=1_000_000),
        local_steps=tt.int("local_steps", 10, lo=1, hi=1_000_000),
        work_units=tt.int("work_units", 0, lo=0, hi=1_000_000),
        backup_tasks=tt.bool("backup_tasks", True),
        lbfgs_history=tt.int("lbfgs_history", 10, lo=1, hi=1000),
        comm_bits=tt.int("comm_bits", 32, lo=8, hi=32),
        cosim=tt.bool("cosim", False),
        eval_points=tt.int("eval_points", 20, lo=1, hi=10_000),
        target_accuracy=tt.float("target_accuracy", 0.9, lo=0.0, hi=1.0),
        dataset_samples=tt.int("dataset_samples", 0, lo=0, hi=10**15),
        epochs=tt.float("epochs", 1.0, positive=True, hi=1e6),
        target_hours=tt.float("target_hours", 0.0, lo=0.0, hi=1e7),
        comm_interval=tt.int("comm_interval", 10, lo=1, hi=10**12),
        zero=tt.int("zero", 0, lo=0, hi=3),
        recompute=_recompute(tt))
    if tr.start_spread_s < 0 and tr.start_spread_s != -1.0:
        raise tt.error("start_spread_s", f"must be >= 0, or -1 for a parameter round trip; got {tr.start_spread_s}")
    if tr.comm_bits not in (8, 32):
        raise tt.error("comm_bits", f"must be 32 or 8, got {tr.comm_bits}")
    if tr.epochs != 1.0 and not tr.dataset_samples:
        raise tt.error("epochs", "passes over training.dataset_samples, which is not given: nothing would use it")
    if tr.target_hours and not tr.dataset_samples:
        raise tt.error("target_hours", "a deadline needs training.dataset_samples (the data set's size) to be met")
    tt.done()
    return tr


def _faults(ft: Table, topology: Topology) -> Faults:
    devices = topology.devices
    slow = ft.table("slowdown", {})
    slowdown = {}
    for dev in list(slow.data):
        if dev not in devices or not devices[dev].is_compute:
            raise slow.error(dev, "is not a compute device of the topology")
        slowdown[dev] = slow.float(dev, lo=1e-3, hi=1e6)
    slow.done()
    failures = [_failure(t, topology) for t in ft.tables("fail")]
    faults = Faults(
        slowdown=slowdown, slowdown_sigma=ft.float("slowdown_sigma", 0.0, lo=0.0, hi=10.0),
        failures=tuple(sorted(failures, key=lambda f: f.at_s)), mtbf_s=ft.float("mtbf_s", 0.0, lo=0.0),
        machine_mtbf_s=ft.float("machine_mtbf_s", 0.0, lo=0.0),
        detect_timeout_s=ft.float("detect_timeout_s", 1.0, lo=0.0),
        on_failure=ft.str("on_failure", "continue", choices=("continue", "restart")),
        checkpoint_every=ft.int("checkpoint_every", 0, lo=0, hi=10_000_000),
        checkpoint_gbps=ft.float("checkpoint_gbps", 1.0, positive=True),
        restart_s=ft.float("restart_s", 30.0, lo=0.0),
        shard_recovery=ft.str("shard_recovery", "none", choices=("none", "checkpoint")),
        shard_checkpoint_every=ft.int("shard_checkpoint_every", 0, lo=0, hi=10_000_000),
        host_noise=ft.bool("host_noise", False), host_noise_window_s=ft.float("host_noise_window_s", 0.0, lo=0.0, hi=1e6))
    if 0 < faults.host_noise_window_s < 1e-6:
        raise ft.error("host_noise_window_s", f"must be 0 (as measured) or >= 1e-6 s, got {faults.host_noise_window_s:g}")
    if faults.host_noise_window_s and not faults.host_noise:
        raise ft.error("host_noise_window_s", "sets the window of the replayed host noise; host_noise is off, "
                                              "so it would be ignored")
    if faults.host_noise and not any(d.noise for d in devices.values()):
        raise ft.error("host_noise", "the topology has no noise series (calibrate writes them for its host ranks)")
    ft.done()
    return faults


def _failure(t: Table, topology: Topology) -> Failure:
    """One ``[[faults.fail]]``: at_s and exactly one of device, machine or link."""
    at = t.float("at_s", lo=0.0)
    given = [k for k in ("device", "machine", "link") if t.has(k)]
    if len(given) != 1:
        raise t.error("device", "give exactly one of device, machine or link")
    devices = topology.devices
    if given[0] == "device":
        dev = t.str("device")
        if dev not in devices or not devices[dev].is_compute:
            raise t.error("device", f"{dev!r} is not a compute device of the topology")
        out = Failure(at, (dev,))
    elif given[0] == "machine":
        m = t.int("machine", lo=0)
        devs = tuple(d for d in topology.compute_devices() if devices[d].machine == m)
        if not devs:
            raise t.error("machine", f"the topology has no machine {m}")
        out = Failure(at, devs)
    else:
        ends = t.raw("link")
        if (not isinstance(ends, list) or len(ends) != 2 or not all(isinstance(e, str) for e in ends)
                or not all(e in devices for e in ends) or not topology.graph.has_edge(*ends)):
            raise t.error("link", "must name the two ends of one link, e.g. ['m0.nic0', 'switch']")
        out = Failure(at, (), (ends[0], ends[1]))
    t.done()
    return out
