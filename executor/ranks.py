"""The executor's ranks: ``mpiexec -n N python -m executor.ranks SCENARIO --plan FILE [...]``.

``clustersim execute`` plans once, writes the Plan (``clustersim.core.planio``) and starts
this itself on one machine; every rank loads that Plan (SCENARIO then only names the job,
as in ``ps``).  On a cluster, start the same module with your own ``mpiexec``/``srun``,
with a saved ``--plan`` or with SCENARIO and ``--set`` alone: then each rank plans the
scenario itself (the same Plan everywhere: planning is deterministic).  Ranks: one per device slot of every replica
(rank = replica x model_parallel + slot), then one per parameter-server shard.  Each step
a worker runs its slot's share of the Plan's op graph (activations over the replica's
communicator), then, by algorithm:

- ``sync`` without shards: average its slot's gradients with the same slot of the other
  replicas (non-blocking allreduce, polled) and take an SGD step;
- ``sync`` with shards: push the gradient; the shards apply the replicas' mean (with
  ``backup_workers`` b: of the first R - b replicas, dropping the late pushes); fetch;
- ``downpour`` / ``dcasgd`` / ``ssp``: fetch every n_fetch steps, push what it accumulated
  every n_push steps, never waiting for the others (Adagrad or DC-ASGD on the shards;
  under SSP a shard holds back the fetch of a worker more than ``staleness`` steps ahead);
- ``local``: its own SGD steps, parameters averaged every ``local_steps`` steps and after
  the last;
- ``sandblaster``: units of each batch from a coordinator rank, L-BFGS on the shards
  (``executor/sandblaster.py``; a replica of several slots talks through its slot 0).

``--fail K@S``: worker rank K stops at step S as a crashed machine would (it sends
nothing more); asynchronous training carries on without it.  Rank 0 alone prints and
writes files.  Spans are named by the Plan's devices, so executed and simulated traces
line up.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time

import numpy as np

from clustersim.core.config import ConfigError
from clustersim.core.partition import even_cuts
from clustersim.core.plan import Plan, plan
from clustersim.core.planio import load_plan
from clustersim.core.scenario import load_scenario, parse_set
from clustersim.core.schedule import ranks_needed
from clustersim.core.trace import Span

from executor.backend import get_xp, to_numpy
from executor.comm import LostWatch, MPITransport, ReplicaLost, barrier, wait_buffer
from executor.data import Batches, digits, mnist, synthetic
from clustersim.core.metrics import quiet_time
from executor.kernels import init_params, softmax_xent_loss
from executor.launch import pin
from executor.optim import sgd_in_place
from executor.partitioned import _box_of, box_index, run_step
from clustersim.core.schedule import apply_cost
from executor.psrank import ShardClient, message_buffer, serve, shard_runs, slot_segments
from executor.summary import LOCKSTEP, merge_trace, summary

ALGORITHMS = ("sync", "downpour", "dcasgd", "ssp", "local", "sandblaster")


def rank_role(rank: int, model_parallel: int, replicas: int) -> tuple[str, int, int]:
    """("worker", replica, slot) or ("shard", shard, -1): pure, so tests need no MPI."""
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
    workers = sc.parallel.model_parallel * sc.parallel.replicas
    if not m or int(m.group(1)) >= workers:
        raise ConfigError("--fail", text, f"must be rank=K@step=S with K a worker rank (0..{workers - 1})")
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


def check_checkpoint(args, sc) -> None:
    from pathlib import Path
    if (args.checkpoint or args.resume) and not sc.parallel.ps_shards:
        raise ConfigError("--checkpoint", args.checkpoint or "", "checkpoints are kept by parameter-server "
                          "shards: set parallel.ps_shards >= 1")
    if args.resume and not args.checkpoint:
        raise ConfigError("--resume", "", "needs --checkpoint DIR")
    if args.checkpoint_every < 1:
        raise ConfigError("--checkpoint-every", str(args.checkpoint_every), "must be >= 1")
    if args.resume:
        missing = [k for k in range(sc.parallel.ps_shards) if not (Path(args.checkpoint) / f"shard{k}.npz").exists()]
        if missing:
            raise ConfigError("--resume", args.checkpoint, f"no checkpoint of shard {missing[0]} there")


def check(sc, size: int) -> None:
    need = ranks_needed(sc)
    if size != need:
        extra = " + 1 coordinator" if sc.training.algorithm == "sandblaster" else ""
        raise ConfigError("--ranks", str(size),
                          f"the scenario needs model_parallel x replicas + ps_shards{extra} = {need} ranks")
    if sc.training.algorithm not in ALGORITHMS:
        raise ConfigError(sc.file, "training.algorithm",
                          f"execute runs {', '.join(ALGORITHMS)} so far; got {sc.training.algorithm}")
    if sc.training.algorithm != "sync" and sc.training.algorithm != "local" and not sc.parallel.ps_shards:
        raise ConfigError(sc.file, "parallel.ps_shards", f"{sc.training.algorithm} needs ps_shards >= 1")


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


def dataset(sc, seed: int, data=None):
    """(x_train, y_train, x_test, y_test): ``data`` (from ``check_data``) when given, the
    bundled digits for mlp-digits, else seeded synthetic inputs."""
    if data is not None:
        return data
    if sc.model.name == "mlp-digits":
        d = digits(seed)
        return (d.x_train.reshape(len(d.x_train), *sc.model.input_shape), d.y_train,
                d.x_test.reshape(len(d.x_test), *sc.model.input_shape), d.y_test)
    classes = sc.model.classes or sc.model.nodes[-1].out_shape[0]
    d = synthetic(sc.model.input_shape, classes, 4 * sc.batch_size * sc.parallel.replicas, np.random.default_rng(seed))
    return d.x_train, d.y_train, d.x_test, d.y_test


def main(argv: list[str] | None = None) -> int:
    from mpi4py import MPI
    ap = argparse.ArgumentParser(prog="executor.ranks")
    ap.add_argument("scenario", help="the scenario file; with --plan it only names the job")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--plan", help="the Plan as clustersim.core.planio saves it (the scenario is not read)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--trace")
    ap.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
    ap.add_argument("--fail")
    ap.add_argument("--checkpoint", help="folder where each shard keeps shard<k>.npz")
    ap.add_argument("--checkpoint-every", type=int, default=100)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--data", help="folder with MNIST's four IDX files")
    args = ap.parse_args(argv)
    world = MPI.COMM_WORLD
    pin(world.rank, world.size)
    try:
        p = plan_of(args)
        sc = p.scenario
        check(sc, world.size)
        fail = parse_fail(args.fail, sc)
        check_checkpoint(args, sc)
        args.loaded = check_data(args.data, sc)
        xp = get_xp(args.device)
    except (ConfigError, ValueError) as exc:
        if world.rank == 0:
            print(f"clustersim: error: {exc}", file=sys.stderr)
        return 2
    try:
        parts = world.gather(RankJob(p, world, xp, fail, args).go(), root=0)
        if world.rank == 0:
            trace = merge_trace(p, [spans for _, spans, _ in parts], [steps for _, _, steps in parts])
            out = summary(p, trace, [part for part, _, _ in parts])
            if args.trace:
                trace.save(args.trace)
            print(json.dumps(out, indent=2) if args.json else _text(out))
    except Exception as exc:            # the other ranks would wait for this one forever: end them all
        abort(world, exc)
    return 0


def abort(world, exc: BaseException) -> None:
    """Ends the whole job for ``exc`` raised on this rank: its one line on stderr, then
    MPI_Abort (the other ranks would wait for this one forever)."""
    print(error_line(world.rank, exc), file=sys.stderr, flush=True)
    _quiet_stderr()                     # MPI_Abort's own line would say only that it was called
    world.Abort(1)


def plan_of(args) -> Plan:
    """The Plan from ``--plan``, else the scenario's (with ``--set``) planned here;
    ConfigError naming ``--plan`` for a file that cannot be read as one."""
    if not args.plan:
        return plan(load_scenario(args.scenario, parse_set(args.set)))
    if args.set:
        raise ConfigError("--set", args.set[0], "the Plan is made already: give --set where it is planned")
    try:
        return load_plan(args.plan)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError("--plan", args.plan, f"cannot read a Plan there ({exc})") from None


def _quiet_stderr() -> None:
    import os
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)


def error_line(rank: int, exc: BaseException) -> str:
    """One line for an exception that ends the job: the rank, the exception and where it
    was raised (the innermost frame)."""
    import traceback
    from pathlib import Path
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""
    text = " ".join(str(exc).split())
    return f"clustersim: error: rank {rank}: {type(exc).__name__}{': ' + text if text else ''}{where}"


class RankJob:
    """One rank's part of the job ``p``."""

    def __init__(self, p: Plan, world, xp, fail, args=None) -> None:
        from mpi4py import MPI
        self.p, self.sc, self.world, self.xp = p, p.scenario, world, xp
        sc = self.sc
        self.args = args
        self.data = getattr(args, "loaded", None)              # MNIST from --data, checked in main
        par = sc.parallel
        self.M, self.R, self.S = par.model_parallel, par.replicas, par.ps_shards
        self.role, self.r, self.j = rank_role(world.rank, self.M, self.R)
        if sc.training.algorithm == "sandblaster" and world.rank == world.size - 1:
            self.role, self.r = "coordinator", -1
        self.failed_rank, self.fail_step = fail if fail else (-1, -1)
        is_worker = self.role == "worker"
        self.workers = world.Split(color=0 if is_worker else MPI.UNDEFINED, key=world.rank)
        self.rep = world.Split(color=self.r if is_worker else MPI.UNDEFINED, key=self.j)
        self.slot = world.Split(color=self.j if is_worker else MPI.UNDEFINED, key=self.r)
        self.shards = world.Split(color=0 if self.role == "shard" else MPI.UNDEFINED, key=world.rank)
        self.lost = LostWatch(self.rep) if fail and is_worker and self.M > 1 else None
        full = init_params(sc.model, np.random.default_rng(sc.seed), dtype=np.float32)
        self.box_params = {}
        for i, sl in enumerate(self.p.slices):
            if i in full:
                kind = sc.model.nodes[i].layer.kind
                for j, box in sl:
                    self.box_params[(i, j)] = [np.ascontiguousarray(a[idx]) for a, idx in zip(full[i], box_index(kind, box))]
        self.sizes = {key: [a.size for a in arrs] for key, arrs in self.box_params.items()}
        self.total = sum(sum(v) for v in self.sizes.values())
        self.spans: list[Span] = []
        self.steps: list[tuple[int, int, float, float]] = []   # (replica, step, start, end): the Trace's replica_steps

    # --- flat views of one slot's parameters ------------------------------------------------
    def keys(self, j: int) -> list[tuple[int, int]]:
        return [(i, jj) for i, sl in enumerate(self.p.slices) for jj, _ in sl if jj == j and (i, jj) in self.sizes]

    def flatten(self, arrays: dict, j: int) -> np.ndarray:
        parts = [to_numpy(a).astype(np.float32, copy=False).ravel() for key in self.keys(j) for a in arrays[key]]
        return np.concatenate(parts) if parts else np.zeros(0, np.float32)

    def unflatten(self, flat: np.ndarray, arrays: dict, j: int) -> None:
        pos = 0
        for key in self.keys(j):
            for a in arrays[key]:
                a[...] = self.xp.asarray(flat[pos:pos + a.size].reshape(a.shape))
                pos += a.size

    def global_vector(self) -> np.ndarray:
        """Every box's parameters as one vector in the Plan's order (layer by layer, slot by
        slot): what the shards cut into even ranges."""
        return np.concatenate([a.ravel() for i, sl in enumerate(self.p.slices) for j, _ in sl
                               if (i, j) in self.box_params for a in self.box_params[(i, j)]])

    def runs_of(self, j: int) -> list:
        return shard_runs(slot_segments(self.p, j, self.sizes), self.total, self.S)

    def span(self, name, kind, where, step, start, end, nbytes=0.0, flops=0.0, phase="", replica=None):
        """A span of this rank's, times by perf_counter; ``replica``: this rank's unless given."""
        self.spans.append(Span(name, kind, where, self.r if replica is None else replica, step, start - self.t0,
                               end - self.t0, nbytes, flops, phase or name))

    def stepped(self, step: int, start: float, end: float) -> None:
        """This slot's part of its replica's ``step`` ran from ``start`` to ``end`` (perf_counter)."""
        self.steps.append((self.r, step, start - self.t0, end - self.t0))

    def fetch_params(self, client: ShardClient, flat: np.ndarray, step: int, me: str) -> None:
        """Fetches this slot's parameters into ``flat``: a "fetch" span of the replies' bytes."""
        t = time.perf_counter()
        client.fetch(flat, step)
        bits = self.p.schedule.comm_bits
        nbytes = sum(message_buffer(sum(run.size for run in runs), bits).nbytes
                     for runs in self.runs_of(self.j) if runs)
        self.span("fetch", "transfer", f"{self.p.ps.devices[0]}->{me}", step, t, time.perf_counter(), nbytes, 0.0,
                  "fetch")

    def push_grads(self, client: ShardClient, grad: np.ndarray, step: int, me: str, start: float) -> None:
        """Pushes ``grad`` to the shards: a "push" span from ``start`` of the bytes sent."""
        sent = client.sent
        client.push(grad, step)
        self.span("push", "transfer", me, step, start, time.perf_counter(), float(client.sent - sent), 0.0, "push")

    # --- roles ------------------------------------------------------------------------------
    def go(self) -> tuple[dict, list[Span], list[tuple[int, int, float, float]]]:
        """This rank's counters, spans and step entries.  The job's clock starts once every
        worker has its data and is about to step (``common_start``, once on every rank):
        loading the data is not part of the run's time."""
        if self.role == "coordinator":
            self.t0 = common_start(self.world)
            out = self.coordinator()
        elif self.role == "shard":
            self.t0 = common_start(self.world)
            out = self.shard()
        elif self.sc.training.algorithm == "sandblaster":
            out = self.sandblaster_worker()
        else:
            out = self.worker()
        return out, self.spans, self.steps

    # --- sandblaster ---------------------------------------------------------------------------
    def coordinator(self) -> dict:
        from executor.coordinator_state import shard_pushes
        from executor.sandblaster import coordinate
        units = self.p.schedule.units
        W = self.M * self.R
        out = coordinate(self.world, [r * self.M for r in range(self.R)], [W + k for k in range(self.S)],
                         self.sc.training.steps, units, self.sc.training.backup_tasks, self.sc.faults.detect_timeout_s,
                         shard_pushes=shard_pushes(self.p.ps.share), acks=self.M > 1 and self.failed_rank >= 0)
        return {"role": "coordinator", **out}

    def sandblaster_worker(self) -> dict:
        """Slot 0 of a replica (its leader) talks to the coordinator and passes each ASSIGN
        and END on to the replica's other slots (a non-blocking broadcast, polled); every
        slot runs its share of each unit's step and pushes its part of the won units' sum."""
        import dataclasses
        from executor.comm import probe
        from executor.sandblaster import ACK, ASSIGN, END, READY, RESULT
        sc, xp, p, tr, j = self.sc, self.xp, self.p, self.sc.training, self.j
        units, unit_size = p.schedule.units, p.schedule.unit_size
        unit_plan = plan(dataclasses.replace(sc, batch_size=unit_size), check_memory=False)
        params = {key: [xp.asarray(a) for a in arrs] for key, arrs in self.box_params.items() if key[1] == j}
        x_tr, y_tr, x_te, y_te = dataset(sc, sc.seed, self.data)
        whole = Batches(x_tr, y_tr, sc.batch_size * self.R, np.random.default_rng([sc.seed, self.R]))
        coord, lead = self.world.size - 1, j == 0
        client = ShardClient(self.world, [self.M * self.R + k for k in range(self.S)], self.runs_of(j),
                             p.schedule.comm_bits)
        flat = self.flatten(params, j)
        from mpi4py import MPI
        status = MPI.Status()
        me = p.devices[self.r][j]
        cmd = np.zeros(units + 2, np.int64)                    # [ASSIGN, unit] or [END, n, won units...]
        step_times, batches = [], 0
        self.t0 = common_start(self.world)
        for b in range(tr.steps):
            xb, yb = whole.next()
            if self.lost is not None:
                self.lost.step = b
            if self.world.rank == self.failed_rank and b >= self.fail_step:
                self.crash(b)
                break
            start = time.perf_counter()
            self.fetch_params(client, flat, b, me)
            self.unflatten(flat, params, j)
            if lead:
                self.world.Send(np.zeros(1, np.int64), dest=coord, tag=READY)
            grads: dict[int, np.ndarray] = {}
            gone = False
            while True:
                if lead:
                    _, tag = probe(self.world, status, coord, MPI.ANY_TAG)
                    if tag == ASSIGN:                  # [batch, unit]
                        msg = np.empty(2, np.int64)
                        self.world.Recv(msg, source=coord, tag=ASSIGN)
                        cmd[:2] = ASSIGN, msg[1]
                    else:                              # [n, the n units this replica won]
                        self.world.Recv(cmd[1:], source=coord, tag=END)
                        cmd[0] = END
                try:
                    if self.M > 1:
                        wait_buffer(self.rep.Ibcast(cmd, root=0), self.lost)
                    if cmd[0] == ASSIGN:
                        u = int(cmd[1])
                        t = time.perf_counter()
                        xs, ys = xb[u * unit_size:(u + 1) * unit_size], yb[u * unit_size:(u + 1) * unit_size]
                        res = run_step(unit_plan, {j}, params, xp.asarray(xs), xp.asarray(ys),
                                       MPITransport(self.rep, xp, self.lost), xp=xp)
                    elif self.lost is not None:        # END: do all slots have it (will all push)?
                        wait_buffer(self.rep.Ibarrier(), self.lost)
                except ReplicaLost:                    # a slot of this replica crashed: so has the replica
                    if lead:
                        self.world.Send(np.array([b, 0], np.int64), dest=coord, tag=ACK)
                    gone = True
                    break
                if cmd[0] == ASSIGN:
                    grads[u] = self.flatten(res.grads, j)
                    self.span(f"unit {u}", "compute", me, b, t, time.perf_counter(), 0.0, 0.0, "unit")
                    if lead:
                        self.world.Send(np.array([b, u], np.int64), dest=coord, tag=RESULT)
                else:
                    if lead and self.lost is not None:
                        self.world.Send(np.array([b, 1], np.int64), dest=coord, tag=ACK)
                    won = [int(u) for u in cmd[2:2 + int(cmd[1])]]
                    total = sum((grads[u] for u in won), np.zeros_like(flat))
                    self.push_grads(client, total, b, me, time.perf_counter())
                    break
            if gone:
                break
            end = time.perf_counter()
            step_times.append(end - start)
            self.stepped(b, start, end)
            batches += 1
        return self.finish(params, flat, client, x_te, y_te, step_times, [], batches, final_fetch=tr.steps)

    def shard(self) -> dict:
        k = self.r
        if self.sc.training.algorithm == "sandblaster":
            return self.lbfgs_shard(k)
        lo, hi = even_cuts(self.total, self.S)[k]
        flat = self.global_vector()
        runs = {rank: self.runs_of(rank % self.M)[k] for rank in range(self.M * self.R)}
        runs = {rank: rr for rank, rr in runs.items() if rr}
        tr, sched = self.sc.training, self.p.schedule
        a = self.args
        path = None
        if a is not None and a.checkpoint:
            from pathlib import Path
            Path(a.checkpoint).mkdir(parents=True, exist_ok=True)
            path = Path(a.checkpoint) / f"shard{k}.npz"
        where, size = self.p.ps.devices[k], hi - lo

        def applied(replica: int, step: int, start: float, end: float, summed: int) -> None:
            """One span per apply, as the simulator's: an asynchronous push's "apply"
            (phase ps_update), or sync's "update" of the replicas' mean (phase update)."""
            flops, nbytes = apply_cost(sched.rule, size, summed)
            name, phase = ("update", "update") if summed else ("apply", "ps_update")
            self.span(name, "update", where, step, start, end, nbytes, flops, phase, replica=replica)
        out = serve(self.world, self.p, k, flat[lo:hi].copy(), runs, serve_rule(sched.rule),
                    sync_replicas=self.R if tr.algorithm == "sync" else 0, silent={self.failed_rank},
                    staleness_bound=sched.staleness_bound, checkpoint=path,
                    checkpoint_every=a.checkpoint_every if a is not None else 0,
                    resume=bool(a is not None and a.resume), replica_of=lambda rank: rank // self.M,
                    quorum=sched.quorum if tr.algorithm == "sync" else 0, on_apply=applied)
        return {"role": "shard", "applied": out["applied"], "busy_s": out["busy_s"],
                "resumed_from": out["resumed_from"]}

    def lbfgs_shard(self, k: int) -> dict:
        from executor.optim import LBFGS, LBFGS_MAX_STEP_FACTOR
        from executor.sandblaster import ShardDot, serve_lbfgs
        lo, hi = even_cuts(self.total, self.S)[k]
        flat = self.global_vector()
        runs = {rank: self.runs_of(rank % self.M)[k] for rank in range(self.M * self.R)}
        tr = self.sc.training
        lbfgs = LBFGS(lr=1.0, history=tr.lbfgs_history, first_step=tr.learning_rate, dot=ShardDot(self.shards),
                      max_step=LBFGS_MAX_STEP_FACTOR * tr.learning_rate)
        sched = self.p.schedule
        out = serve_lbfgs(self.world, flat[lo:hi].copy(), runs, sched.units, lbfgs, sched.comm_bits,
                          silent={self.failed_rank})
        return {"role": "shard", "applied": out["applied"], "busy_s": 0.0, "resumed_from": 0}

    def worker(self) -> dict:
        sc, xp, p = self.sc, self.xp, self.p
        tr, sched = sc.training, p.schedule
        r, j = self.r, self.j
        params = {key: [xp.asarray(a) for a in arrs] for key, arrs in self.box_params.items() if key[1] == j}
        x_tr, y_tr, x_te, y_te = dataset(sc, sc.seed, self.data)
        batches = Batches(x_tr[r::self.R], y_tr[r::self.R], sc.batch_size, np.random.default_rng([sc.seed, r]))
        transport = MPITransport(self.rep, xp, self.lost)
        devices = p.devices[r]
        me = devices[j]
        client = ShardClient(self.world, [self.M * self.R + k for k in range(self.S)], self.runs_of(j),
                             sched.comm_bits) if self.S else None
        flat = self.flatten(params, j)
        acc = np.zeros_like(flat)
        step_times, losses, steps_done = [], [], 0
        self.t0 = common_start(self.world)
        op_log: list[tuple] = []
        for step in range(tr.steps):
            if self.lost is not None:
                self.lost.step = step
            if self.world.rank == self.failed_rank and step >= self.fail_step:
                self.crash(step)
                break                                          # crashed: silent from here on
            start = time.perf_counter()
            if client and sched.fetches_before(step):
                self.fetch_params(client, flat, step, me)
                self.unflatten(flat, params, j)
            x, y = batches.next()
            last = [time.perf_counter()]

            def on_op(op, part, step=step):        # cheap: spans are made after the last step
                now = time.perf_counter()
                op_log.append((op, part, step, last[0], now))
                last[0] = now
            try:
                res = run_step(p, {j}, params, xp.asarray(x), xp.asarray(y), transport, xp=xp, on_op=on_op)
            except ReplicaLost:                                # a slot of this replica crashed: so has the replica
                break
            t1 = time.perf_counter()
            if tr.algorithm == "sync" and not self.S:
                if self.R > 1:                          # one flat buffer for the collective, then in place
                    g = self.flatten(res.grads, j) if res.grads else np.zeros_like(flat)
                    total = np.empty_like(g)
                    wait_buffer(self.slot.Iallreduce(g, total))
                    self.span("allreduce", "transfer", me, step, t1, time.perf_counter(), g.nbytes, 0.0, "allreduce")
                    self.unflatten(total, res.grads, j)
                t2 = time.perf_counter()
                sgd_in_place(params, res.grads, tr.learning_rate / self.R)
                self.span("update", "update", me, step, t2, time.perf_counter(), 0.0, 2.0 * flat.size, "update")
            elif tr.algorithm == "sync":
                g = self.flatten(res.grads, j) if res.grads else np.zeros_like(flat)
                self.push_grads(client, g, step, me, t1)
            elif tr.algorithm == "local":
                g = self.flatten(res.grads, j) if res.grads else np.zeros_like(flat)
                flat -= tr.learning_rate * g
                if sched.averages_after(step) and self.R > 1:
                    t2 = time.perf_counter()
                    total = np.empty_like(flat)
                    wait_buffer(self.slot.Iallreduce(flat, total))
                    flat = total / self.R
                    self.span("average", "transfer", me, step, t2, time.perf_counter(), flat.nbytes, 0.0, "allreduce")
                self.unflatten(flat, params, j)
            else:
                g = self.flatten(res.grads, j) if res.grads else np.zeros_like(flat)
                acc += g
                if sched.fetch_every > 1:                       # move on the local copy between fetches
                    flat -= tr.learning_rate * g
                    self.unflatten(flat, params, j)
                if sched.pushes_after(step):
                    self.push_grads(client, acc, step, me, t1)
                    acc[...] = 0
            end = time.perf_counter()
            step_times.append(end - start)
            self.stepped(step, start, end)
            losses.append(res.loss)
            steps_done += 1
        for op, part, step, t0, t1 in op_log:
            if op.kind == "xfer":
                self.span(f"{op.why} L{op.layer} {part}", "transfer", f"{devices[op.slot]}->{devices[op.dst]}", step,
                          t0, t1, op.bytes, 0.0, op.why)
            else:
                self.span(f"{op.kind} L{op.layer}", "compute", me, step, t0, t1, 0.0, op.flops, op.kind)
        return self.finish(params, flat, client, x_te, y_te, step_times, losses, steps_done)

    def crash(self, step: int) -> None:
        """This rank stops as a crashed machine would, at ``step``; the other slots of its
        replica are told (``comm.LostWatch``)."""
        if self.lost is not None:
            self.lost.tell(step)

    def finish(self, params, flat, client, x_te, y_te, step_times, losses, steps_done, final_fetch=-1,
               slot=None) -> dict:
        """Replica 0's slots (or the first replica with no failed rank) fetch the final
        parameters and evaluate on held-out data; everyone then tells the shards DONE."""
        p, j = self.p, (self.j if slot is None else slot)
        self.params = params                            # the slot's final parameters, for checks
        barrier(self.workers)
        wall = time.perf_counter() - self.t0
        alive_rep = next(r for r in range(self.R) if not (r * self.M <= self.failed_rank < (r + 1) * self.M))
        evaluating = self.r == alive_rep
        if client and evaluating:
            client.fetch(flat, final_fetch)
            self.unflatten(flat, params, j)
        if client and self.world.rank != self.failed_rank:
            client.done()
        acc = loss = None
        if evaluating:
            acc, loss = evaluate(p, params, x_te, y_te, j, self.rep, self.xp)
        med = float(np.median(step_times)) if step_times else 0.0
        quiet = quiet_time(step_times)
        sent = client.sent if client else 0
        return {"role": "worker", "rank": self.world.rank, "replica": self.r, "slot": j, "steps": steps_done,
                "step_time_s": med, "quiet_step_time_s": quiet, "wall_s": wall, "accuracy": acc if evaluating and j == 0 else None,
                "loss": loss if evaluating and j == 0 else None, "ps_bytes_sent": sent,
                "train_loss": float(np.mean(losses[-10:])) if losses else None}


def common_start(world) -> float:
    """The job's time zero for its spans, after a barrier: rank 0's clock reading where every
    rank runs on one host (``perf_counter`` is the host's monotonic clock, so a message's
    send on one rank and its receipt on another line up: validation pairs them), else
    each rank's own."""
    from mpi4py import MPI
    one_host = len(set(world.allgather(MPI.Get_processor_name()))) == 1
    barrier(world)
    t0 = time.perf_counter()
    return world.bcast(t0, root=0) if one_host else t0


def evaluate(p, params, x, y, j: int, rep, xp) -> tuple[float, float]:
    """Accuracy and loss on held-out data; gathered on the replica's slot 0."""
    res = run_step(p, {j}, params, xp.asarray(x), xp.asarray(y), MPITransport(rep, xp), xp=xp, backward=False)
    last = len(p.slices) - 1
    pieces = rep.gather({key: to_numpy(arr) for key, arr in res.logits.items()}, root=0)
    if rep.rank != 0:
        return 0.0, 0.0
    micro = even_cuts(len(x), p.scenario.parallel.micro_batches)      # run_step's cut of x
    logits = np.zeros((len(x), p.scenario.model.nodes[-1].out_shape[0]), np.float64)
    for part in pieces:
        for (c, m), arr in part.items():                  # slot c's classes of micro-batch m
            (c0, c1), (lo, hi) = _box_of(p, last, c)[0], micro[m]
            logits[lo:hi, c0:c1] = arr[:, :, 0, 0]          # (b_m, classes of c, 1, 1) -> (b_m, classes of c)
    loss, _ = softmax_xent_loss(np, logits, np.asarray(y))
    return float((logits.argmax(axis=1) == np.asarray(y)).mean()), float(loss)


def _text(s: dict) -> str:
    how = "median over workers" if s["algorithm"] in LOCKSTEP else "a replica's period, waits included"
    return (f"{s['name']}: executed {s['algorithm']} training of {s['model']} on {s['ranks']} ranks "
            f"({s['workers']} workers, {s['ps_shards']} shards)\n"
            f"  step time        {s['step_time_s'] * 1e3:.4g} ms ({how})\n"
            f"  throughput       {s['samples_per_s']:.4g} samples/s\n"
            f"  accuracy         {s['accuracy']:.2%} (test loss {s['loss']:.4g})\n"
            f"  wall             {s['wall_s']:.3g} s")


if __name__ == "__main__":
    sys.exit(main())
