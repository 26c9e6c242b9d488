"""One rank's part of a job (``RankJob``): a worker's steps by algorithm, a shard, or
Sandblaster's roles (``sandblaster_roles``), with the spans and step entries it records."""
from __future__ import annotations

import time

import numpy as np

from clustersim.core.collective import bus_factor
from clustersim.core.partition import even_cuts
from clustersim.core.plan import Plan
from clustersim.core.trace import Span

from executor.backend import device_sync, to_numpy
from executor.comm import LostWatch, MPITransport, ReplicaLost, barrier, wait_buffer
from executor.data import Batches
from clustersim.core.metrics import quiet_time
from executor.kernels import init_params, softmax_xent_loss
from executor.optim import replica_step
from executor.partitioned import _box_of, pieces, run_step, slot_params
from clustersim.core.schedule import apply_cost, update_cost
from executor.psrank import ShardClient, message_buffer, serve, shard_runs, slot_segments
from executor.checks import CHECKPOINT_EVERY, dataset, rank_role, serve_rule
from executor.comm import common_start
from executor.gpu import copy_stream, nccl_communicator
from executor.nccl_transport import NcclTransport, allreduce_sum
from executor.sandblaster_roles import SandblasterRoles


class RankJob(SandblasterRoles):
    """One rank's part of the job ``p``; ``nccl`` (``cupy.cuda.nccl`` or a module with its
    calls) carries a worker's messages and allreduces, None: MPI does (``choose_transport``)."""

    def __init__(self, p: Plan, world, xp, fail, args=None, nccl=None) -> None:
        from mpi4py import MPI
        self.p, self.sc, self.world, self.xp, self.nccl = p, p.scenario, world, xp, nccl
        self.flat_xp = xp if nccl is not None else np          # where a worker's flat collectives run
        sc = self.sc
        self.args = args
        self.data = getattr(args, "loaded", None)              # MNIST from --data, checked in main
        par = sc.parallel
        self.M, self.R, self.S = par.devices_per_replica, par.replicas, par.ps_shards   # M: slots per replica
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
        self.box_params = slot_params(self.p, full, contiguous=True)
        self.sizes = {key: [a.size for a in arrs] for key, arrs in self.box_params.items()}
        self.total = sum(sum(v) for v in self.sizes.values())
        self.spans: list[Span] = []
        self.steps: list[tuple[int, int, float, float]] = []   # (replica, step, start, end): the Trace's replica_steps

    # --- flat views of one slot's parameters ------------------------------------------------
    def keys(self, j: int) -> list[tuple[int, int]]:
        return [(i, jj) for i, sl in enumerate(self.p.slices) for jj, _ in sl if jj == j and (i, jj) in self.sizes]

    def flatten(self, arrays: dict, j: int, xp=np):
        """Slot j's arrays as one float32 vector of ``xp`` (the host's NumPy by default)."""
        parts = [(to_numpy(a) if xp is np else a).astype(np.float32, copy=False).ravel()
                 for key in self.keys(j) for a in arrays[key]]
        return xp.concatenate(parts) if parts else xp.zeros(0, np.float32)

    def unflatten(self, flat: np.ndarray, arrays: dict, j: int) -> None:
        held = [a for key in self.keys(j) for a in arrays[key]]
        for a, piece in zip(held, pieces(flat, held)):
            a[...] = self.xp.asarray(piece)

    def global_vector(self) -> np.ndarray:
        """Every box's parameters as one vector in the Plan's order (layer by layer, slot by
        slot): what the shards cut into even ranges."""
        return np.concatenate([a.ravel() for i, sl in enumerate(self.p.slices) for j, _ in sl
                               if (i, j) in self.box_params for a in self.box_params[(i, j)]])

    def join_nccl(self) -> None:
        """A worker's NCCL communicators (over its replica, and over its slot's replicas:
        collective, every worker calls this) and the copy stream they run on."""
        self.stream = self.rep_nccl = self.slot_nccl = None
        if self.nccl is not None:
            self.stream = copy_stream(self.xp)
            self.rep_nccl = nccl_communicator(self.rep, self.nccl) if self.M > 1 else None
            self.slot_nccl = nccl_communicator(self.slot, self.nccl) if self.R > 1 else None

    def transport(self, backward: bool = True):
        """The replica's messages of a step (``backward`` False: an evaluation's forward pass)."""
        if self.nccl is None:
            return MPITransport(self.rep, self.xp, self.lost if backward else None)
        return NcclTransport(self.p.ops, self.j, self.rep_nccl, self.nccl, self.xp, self.stream, backward)

    def replica_sum(self, flat):
        """``flat`` (a ``flat_xp`` vector) summed over the replicas' same slot: NCCL's allreduce
        on this rank's GPU, else MPI's on the host; a new vector."""
        if self.nccl is None:
            total = np.empty_like(flat)
            wait_buffer(self.slot.Iallreduce(flat, total))
        else:
            total = self.flat_xp.array(flat, copy=True)
            allreduce_sum(self.slot_nccl, self.nccl, total, self.xp, self.stream)
            if self.stream is not None:
                self.stream.synchronize()           # its span times the allreduce, not its queueing
        return total

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

    # --- roles ----------------------------------------------------------------------------------
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
        # a crashed rank's replica-mates stop with it (``comm.ReplicaLost``): none of them is
        # waited for (SSP's bound, the DONE count), as the simulator drops the whole replica
        crashed = self.crashed_replica()
        silent = set(range(crashed * self.M, (crashed + 1) * self.M)) if crashed >= 0 else set()
        # SSP waits for them until their last fetch before the crash: they run until then
        last = max((s for s in range(self.fail_step) if sched.fetches_before(s)), default=-1)
        out = serve(self.world, self.p, k, flat[lo:hi].copy(), runs, serve_rule(sched.rule),
                    sync_replicas=self.R if tr.algorithm == "sync" else 0, silent=silent,
                    staleness_bound=sched.staleness_bound, checkpoint=path,
                    checkpoint_every=(a.checkpoint_every or CHECKPOINT_EVERY) if a is not None else 0,
                    resume=bool(a is not None and a.resume), replica_of=lambda rank: rank // self.M,
                    quorum=sched.quorum if tr.algorithm == "sync" else 0, on_apply=applied,
                    silent_until=dict.fromkeys(silent, last))
        return {"role": "shard", "applied": out["applied"], "busy_s": out["busy_s"],
                "resumed_from": out["resumed_from"], "staleness": out["staleness"]}

    def worker(self) -> dict:
        sc, xp, p = self.sc, self.xp, self.p
        tr, sched = sc.training, p.schedule
        r, j = self.r, self.j
        params = {key: [xp.asarray(a) for a in arrs] for key, arrs in self.box_params.items() if key[1] == j}
        x_tr, y_tr, x_te, y_te = dataset(sc, sc.seed, self.data)
        batches = Batches(x_tr[r::self.R], y_tr[r::self.R], sc.batch_size, np.random.default_rng([sc.seed, r]))
        self.join_nccl()
        transport = self.transport()
        devices = p.devices[r]
        me = devices[j]
        client = ShardClient(self.world, [self.M * self.R + k for k in range(self.S)], self.runs_of(j),
                             sched.comm_bits) if self.S else None
        flat = self.flatten(params, j)
        sync = device_sync(xp)                                 # a GPU's spans time its work, not its queueing
        op_sync = device_sync(xp, "compute")                   # an op's: its transfers overlap on their stream
        acc = np.zeros_like(flat)
        adam: dict = {}                                        # sync's Adam: one per parameter array
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
                op_sync()
                now = time.perf_counter()
                op_log.append((op, part, step, last[0], now))
                last[0] = now
            def on_setup():
                op_sync()
                last[0] = time.perf_counter()
            try:
                res = run_step(p, {j}, params, xp.asarray(x), xp.asarray(y), transport, xp=xp, on_op=on_op,
                               on_setup=on_setup)
            except ReplicaLost:                                # a slot of this replica crashed: so has the replica
                break
            sync()
            t1 = time.perf_counter()
            if tr.algorithm == "sync" and not self.S:
                if self.R > 1:                          # one flat buffer for the collective, then in place
                    fx = self.flat_xp
                    g = self.flatten(res.grads, j, fx) if res.grads else fx.zeros(flat.size, np.float32)
                    total = self.replica_sum(g)
                    self.span("allreduce", "transfer", me, step, t1, time.perf_counter(),
                              g.nbytes * bus_factor("allreduce", self.R), 0.0, "allreduce")
                    self.unflatten(total, res.grads, j)
                t2 = time.perf_counter()
                replica_step(params, res.grads, tr.learning_rate, self.R, adam if tr.optimizer == "adam" else None)
                sync()
                flops, nbytes = update_cost(self.sc, flat.size)                 # as the simulator counts it
                self.span("update", "update", me, step, t2, time.perf_counter(), nbytes, flops, "update")
            elif tr.algorithm == "sync":
                g = self.flatten(res.grads, j) if res.grads else np.zeros_like(flat)
                self.push_grads(client, g, step, me, t1)
            elif tr.algorithm == "local":
                g = self.flatten(res.grads, j) if res.grads else np.zeros_like(flat)
                flat -= tr.learning_rate * g
                if sched.averages_after(step) and self.R > 1:
                    t2 = time.perf_counter()
                    flat = to_numpy(self.replica_sum(self.flat_xp.asarray(flat))) / self.R
                    self.span("average", "transfer", me, step, t2, time.perf_counter(),
                              flat.nbytes * bus_factor("allreduce", self.R), 0.0, "allreduce")
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
            sync()
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

    def crashed_replica(self) -> int:
        """The replica of the worker ``--fail`` crashes (-1: none)."""
        return self.failed_rank // self.M if 0 <= self.failed_rank < self.M * self.R else -1

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
        alive_rep = next(r for r in range(self.R) if r != self.crashed_replica())
        evaluating = self.r == alive_rep
        if client and evaluating:
            client.fetch(flat, final_fetch)
            self.unflatten(flat, params, j)
        if client and self.world.rank != self.failed_rank:
            client.done()
        acc = loss = None
        if evaluating:
            acc, loss = evaluate(p, params, x_te, y_te, j, self.rep, self.xp, self.transport(backward=False))
        med = float(np.median(step_times)) if step_times else 0.0
        quiet = quiet_time(step_times)
        sent = client.sent if client else 0
        return {"role": "worker", "rank": self.world.rank, "replica": self.r, "slot": j, "steps": steps_done,
                "step_time_s": med, "quiet_step_time_s": quiet, "wall_s": wall, "accuracy": acc if evaluating and j == 0 else None,
                "loss": loss if evaluating and j == 0 else None, "ps_bytes_sent": sent,
                "train_loss": float(np.mean(losses[-10:])) if losses else None,
                "transport": "nccl" if self.nccl is not None else "mpi",
                "crashed": self.world.rank == self.failed_rank}


def evaluate(p, params, x, y, j: int, rep, xp, transport=None) -> tuple[float, float]:
    """Accuracy and loss on held-out data (per position for a sequence model: labels
    (N, T)); gathered on the replica's slot 0.  ``transport``: MPI's over ``rep`` unless given."""
    transport = transport if transport is not None else MPITransport(rep, xp)
    res = run_step(p, {j}, params, xp.asarray(x), xp.asarray(y), transport, xp=xp, backward=False)
    last = len(p.slices) - 1
    pieces = rep.gather({key: to_numpy(arr) for key, arr in res.logits.items()}, root=0)
    if rep.rank != 0:
        return 0.0, 0.0
    micro = even_cuts(len(x), p.scenario.parallel.micro_batches)      # run_step's cut of x
    classes, positions, _ = p.scenario.model.nodes[-1].out_shape
    logits = np.zeros((len(x), classes, positions), np.float64)
    for part in pieces:
        for (c, m), arr in part.items():                  # slot c's classes and positions of micro-batch m
            (c0, c1), (t0, t1), _ = _box_of(p, last, c)
            lo, hi = micro[m]
            logits[lo:hi, c0:c1, t0:t1] = arr[:, :, :, 0]   # (b_m, classes of c, positions of c, 1)
    logits = logits.transpose(0, 2, 1).reshape(-1, classes)            # (N T, classes): a row per position
    labels = np.asarray(y).reshape(-1)
    loss, _ = softmax_xent_loss(np, logits, labels)
    return float((logits.argmax(axis=1) == labels).mean()), float(loss)
