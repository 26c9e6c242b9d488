"""In-context op times for calibration: the executor's own step (``run_step``) on the
zoo's CPU-sized models, timed op by op, so the simulator predicts what the executor does
rather than what a bare kernel does (fresh arrays each step, region assembly, the op
walk, sigmoid's exponentials are all in the figures).

Probes: each model in ``PROBES`` at each of its batch sizes, whole (one slot) and cut in
two by channels (a slot on each of two ranks, messages through the executor's MPI
transport; with one rank both slots in this process and an in-process mailbox), so every
layer kind is timed at two sizes per batch; on two ranks also cut in two stages of whole
layers (keys ``.stage``: a stage's ops run between waits for the other stage, dearer than
in a whole step; decision 039).  Each point is (FLOPs, bytes, seconds)
with FLOPs and bytes as the Plan counts them; keys as the simulator looks them up
(``Device.op_costs``): ``<layer kind>`` and ``<layer kind>.backward``, with ``.split``
for a two-slot probe's ops (``clustersim.core.plan.split_key``); ``update`` (the
worker's SGD step: 2 FLOPs and 12 bytes per parameter); ``send`` and ``recv`` (a
message's software cost at the sender -- the bookkeeping and the copy out -- and at the
receiver; bytes only); ``send.reduction`` (softmax's max and sum of exponentials,
computed and sent) and ``recv.reduction``; ``step`` (what a step costs a rank besides
its ops: sampling the batch, the walk's set-up, the final flush; by the batch's bytes).

Run under ``mpiexec -n k python -m clustersim.calibration.probe ops`` every rank probes at once, so
ranks that share a host's memory bandwidth and caches are timed as they run: rank 0
prints the medians as JSON.  ``pingpong`` times the executor's transport between two
ranks; ``allreduce`` the sync workers' allreduce among all of them as it costs their step
(after and before a step's own work, not back to back).  Batch
sizes differ from the validation suite's on purpose: those are predicted by
interpolation, not read back.
"""
from __future__ import annotations

import json
import math
import statistics
import sys
import time
from collections import defaultdict

import numpy as np

from clustersim.core.models import ZOO, zoo_model
from clustersim.core.plan import Plan, cost_key, plan, split_key
from clustersim.core.scenario import scenario_from_dict

from executor.comm import MPITransport, barrier, wait_buffer
from executor.data import Batches
from executor.kernels import init_params
from executor.launch import pin
from executor.optim import sgd_in_place
from executor.partitioned import Mailbox, run_step, slot_params

PROBES = (("mlp-digits", (8, 32, 128)), ("distbelief-speech", (4, 32)))
OWN_PROBE_FLOPS = 100e6     # forward FLOPs a sample of a zoo model probed itself when asked for (the speech net: 84M)
OWN_BATCHES = (8, 32)
SPLITS = ((1, "spatial"), (2, "spatial"), (2, "layers"))   # (slots, split); layers only on two ranks
REPEATS = 5
WARM_S = 0.01
TIMED_S = 0.02
PASSES = 2
QUIET_TOLERANCE = 1.15    # a probe counts as timed on a quiet host when the reference around it ran within this of quiet
QUIET_TRIES = 3


def probe_plan(model: str, batch: int, slots: int, split: str = "spatial") -> Plan:
    sc = scenario_from_dict({"cluster": {"topology": "dgx-h100"},
                             "model": {"name": model, "batch_size": batch},
                             "parallel": {"model_parallel": slots, "split": split}}, "probe.toml")
    return plan(sc, check_memory=False)


def op_key(p: Plan, op, part: str) -> tuple[str, float, float]:
    """The op's key in ``Device.op_costs``, its FLOPs and bytes; ``part`` of an xfer is
    "send" or "recv"."""
    if op.kind == "xfer":
        return part + (".reduction" if op.why == "reduction" else ""), 0.0, op.bytes
    return cost_key(p, op), op.flops, op.bytes


def probe_inputs(p: Plan, rng: np.random.Generator) -> tuple[dict, Batches]:
    """Seeded parameters of every slot's boxes and four batches of random inputs and labels."""
    model = p.scenario.model
    full = init_params(model, rng, dtype=np.float32)
    params = slot_params(p, full, contiguous=True)
    batch = p.scenario.batch_size
    data = Batches(rng.standard_normal((4 * batch, *model.input_shape), dtype=np.float32),
                   rng.integers(0, model.nodes[-1].out_shape[0], 4 * batch), batch, rng)
    return params, data


def step_counts(second_s: float, repeats: int) -> tuple[int, int]:
    """(untimed, timed) steps of a probe whose second step took ``second_s``: warm for
    ``WARM_S`` (at least two steps), then time ``TIMED_S`` (at least ``repeats`` steps)."""
    return max(2, math.ceil(WARM_S / second_s)), max(repeats, math.ceil(TIMED_S / second_s))


def time_plan(p: Plan, rng: np.random.Generator, repeats: int = REPEATS, comm=None,
              xp=np, sync=lambda: None) -> dict[str, list[tuple]]:
    """(FLOPs, bytes, [seconds of each repeat]) of every op of one step of ``p`` and of each
    slot's update: all slots here (messages through a mailbox), or with ``comm`` (as many ranks
    as ``p`` has slots) this rank's slot, messages through the executor's MPI transport.
    On the arrays of ``xp`` (CuPy: a GPU), each op and update waited for with ``sync`` before
    its clock is read, as a GPU rank times its ops (``executor.job``).

    Timed in the steady state a run's median step sees: after untimed steps for ``WARM_S``
    (at least two), ``repeats`` steps or more, for ``TIMED_S`` at least (``step_counts``; by
    the second step's time, the slowest rank's, so every rank runs as many).  The first
    steps run slower than a run's and would make the ops dearer: see
    docs/decisions/005-probes-timed-in-steady-state.md."""
    params, data = probe_inputs(p, rng)
    if xp is not np:
        params = {key: [xp.asarray(a) for a in arrs] for key, arrs in params.items()}
    steps: list[float] = []
    per_op: dict[tuple, list[float]] = defaultdict(list)
    updates: dict[int, list[float]] = defaultdict(list)
    slots = {comm.rank} if comm is not None else set(range(p.slots))
    transport = MPITransport(comm) if comm is not None else Mailbox()
    warm, timed, rep = 2, repeats, 0
    while rep < warm + timed:
        counted = rep >= warm
        start = time.perf_counter()
        x, y = data.next()
        last = [time.perf_counter()]
        in_ops = [0.0]

        def on_op(op, part, counted=counted):
            sync()
            now = time.perf_counter()
            if counted:
                per_op[(op.id, part)].append(now - last[0])
                in_ops[0] += now - last[0]
            last[0] = now
        def on_setup():                               # the set-up stays out of the first op
            sync()
            last[0] = time.perf_counter()
        res = run_step(p, slots, params, xp.asarray(x), xp.asarray(y), transport, xp=xp, on_op=on_op,
                       on_setup=on_setup)
        if counted:                                   # sampling the batch, the step's set-up and flush
            steps.append((time.perf_counter() - start - in_ops[0]) / len(slots))
        for j in slots:
            mine = {key: g for key, g in res.grads.items() if key[1] == j}
            t = time.perf_counter()
            sgd_in_place(params, mine, 1e-6)
            sync()
            if counted:
                updates[j].append(time.perf_counter() - t)
        if rep == 1:                                  # the second step sets how many follow
            second = time.perf_counter() - start
            if comm is not None:
                second = max(comm.allgather(second))
            warm, timed = step_counts(second, repeats)
        rep += 1
    out: dict[str, list[tuple]] = defaultdict(list)
    stages = p.scenario.parallel.split == "layers"
    for (op_id, part), ts in per_op.items():
        if stages and p.ops[op_id].kind == "xfer":
            continue          # a stage's receive always holds its wait for the other stage (decision 039)
        key, flops, nbytes = op_key(p, p.ops[op_id], part)
        out[key].append((flops, nbytes, ts))
    out[split_key(p, "step")].append((0.0, float(x.nbytes), steps))
    for j, ts in updates.items():
        if p.slot_params[j]:
            out["update"].append((2.0 * p.slot_params[j], 12.0 * p.slot_params[j], ts))
    return out


def merge(passes: list[dict[str, list[tuple]]]) -> dict[str, list[list[float]]]:
    """The samples of one key with the same FLOPs and bytes (the same op shape, in one pass
    or several) become one point: their median, or for a message's send and receive their
    lower quartile -- a receive's time also holds the wait for its sender, which the
    simulator models itself, and the samples that did not wait are the cost."""
    same: dict[str, dict[tuple, list[float]]] = defaultdict(lambda: defaultdict(list))
    for points in passes:
        for key, pts in points.items():
            for flops, nbytes, ts in pts:
                same[key][(flops, nbytes)] += ts

    def point(key: str, ts: list[float]) -> float:
        if key.split(".")[0] in ("send", "recv") and len(ts) >= 4:
            return statistics.quantiles(ts, n=4)[0]
        return statistics.median(ts)
    return {key: [[f, b, point(key, ts)] for (f, b), ts in sorted(by.items())] for key, by in same.items()}


def quiet_probe(run, bracket, quiet: float | None, slowest=lambda t: t, tries: int = QUIET_TRIES):
    """``run()`` timed while the host ran at its quiet speed, as far as ``tries`` attempts
    find it: each attempt between two brackets (``bracket()``: the reference step's time
    now, ``clustersim.calibration.hostspeed``), and one whose slower bracket (the slowest rank's, by
    ``slowest``) is within ``QUIET_TOLERANCE`` of ``quiet`` ends the search; else the
    attempt with the quickest brackets counts.  A probe is far shorter than a spell of the
    host's neighbours, so its brackets say how it ran; scaling its times by them would not
    do, as a spell slows ops unevenly (docs/decisions/004-quiet-host-calibration.md).
    ``quiet`` None: one attempt, unbracketed."""
    if quiet is None:
        return run()
    best = None
    for _ in range(tries):
        before = bracket()
        out = run()
        seen = slowest(max(before, bracket()))
        if best is None or seen < best[0]:
            best = (seen, out)
        if seen <= quiet * QUIET_TOLERANCE:
            break
    return best[1]


def probes_for(models: list[str] | None) -> tuple:
    """The probes of ``models``: their ``PROBES`` entries; a zoo model of none that is light
    enough to time in a second (forward FLOPs a sample up to ``OWN_PROBE_FLOPS``:
    resnet-digits, gpt-tiny) is probed itself at ``OWN_BATCHES``, so its convolutions or
    attention get costs of their own instead of the dense kernels' curve (decision 073),
    beside every ``PROBES`` entry; all of them for None or a
    model of its own (a file: every probe's ops may be its ops)."""
    known = {name for name, _ in PROBES}
    if not models:
        return PROBES
    if set(models) <= known:
        return tuple((name, batches) for name, batches in PROBES if name in models)
    own = tuple((m, OWN_BATCHES) for m in sorted(set(models) - known)
                if m in ZOO and zoo_model(m).fwd_flops <= OWN_PROBE_FLOPS)
    return PROBES + own


def op_times(seed: int = 0, repeats: int = REPEATS, passes: int = PASSES,
             barrier=lambda: None, pair=None, quiet: float | None = None, slowest=lambda t: t,
             probes: tuple = PROBES, xp=np, sync=lambda: None) -> dict[str, list[list[float]]]:
    """Every probe, ``passes`` times over (a slow spell of a shared host then spoils one
    pass, not every figure); ``barrier`` is called before each probe, so concurrent ranks
    probe together.  With ``pair`` (a communicator of two ranks) the two-slot probes run
    one slot per rank, so messages cost what MPI makes them cost.  ``quiet`` (the
    reference step on a quiet host, seconds): each probe is retried until the host ran
    quietly around it (``quiet_probe``; ``slowest`` gives every rank's slowest bracket,
    so the ranks retry together).  ``xp`` and ``sync``: as ``time_plan``'s."""
    from clustersim.calibration.hostspeed import Reference
    rng = np.random.default_rng(seed)
    ref = Reference() if quiet is not None else None
    results = []
    for _ in range(passes):
        points: dict[str, list[tuple]] = defaultdict(list)
        for model, batches in probes:
            for batch in batches:
                for slots, split in SPLITS:
                    barrier()                   # every rank, every probe: a rank without a pair too
                    comm = pair if slots == 2 and pair is not None else None
                    if split == "layers" and comm is None:   # stages in one process would not wait:
                        quiet_probe(dict, lambda: ref.median(), quiet, slowest)   # bracket with the pair
                        continue                # (the brackets allgather over every rank)
                    p = probe_plan(model, batch, slots, split)
                    out = quiet_probe(lambda p=p, comm=comm: time_plan(p, rng, repeats, comm, xp, sync),
                                      lambda: ref.median(), quiet, slowest)
                    for key, pts in out.items():
                        points[key] += pts
        results.append(points)
    return merge(results)


def _timed(comm, reps: int, body) -> float:
    """Seconds per call of ``body`` on every rank at once: the median of 5 timed runs of
    ``reps`` calls, each started together after a barrier."""
    times = []
    for _ in range(5):
        comm.Barrier()
        start = time.perf_counter()
        for _ in range(reps):
            body()
        times.append((time.perf_counter() - start) / reps)
    return statistics.median(times)


def pingpong(comm, sizes: list[int]) -> list[list[float]]:
    """[bytes, one-way seconds] between ranks 0 and 1 through the executor's transport."""
    t = MPITransport(comm)
    out = []
    for n in sizes:
        a = np.ones(max(1, n // 4), np.float32)

        def round_trip(a=a):
            if comm.rank == 0:
                t.send(0, 1, ("a", 1, 0), a)
                t.flush()
                t.recv(1, 0, ("a", 2, 0), a.shape, a.dtype)
            else:
                t.recv(0, 1, ("a", 1, 0), a.shape, a.dtype)
                t.send(1, 0, ("a", 2, 0), a)
                t.flush()
        out.append([a.nbytes, _timed(comm, max(5, min(300, (2**25) // n)), round_trip) / 2])
    return out


def _sync_step_work(rng: np.random.Generator):
    """A sync worker's own step on a probe batch (mlp-digits at 8, whole): sampling, the op
    walk, the SGD update -- the work an allreduce follows and precedes in a step."""
    p = probe_plan("mlp-digits", 8, 1)
    params, data = probe_inputs(p, rng)

    def work():
        x, y = data.next()
        sgd_in_place(params, run_step(p, {0}, params, x, y, Mailbox()).grads, 1e-6)
    return work


def _sleep_until_done(req) -> None:
    """Waits for ``req`` in 1 ms sleeps: a rank that must not take its core's time meanwhile."""
    while not req.Test():
        time.sleep(1e-3)


def allreduce(comm, sizes: list[int], cores: int, steps: int = 300, passes: int = PASSES) -> list[list[float]]:
    """[0, bytes per rank, seconds] of an allreduce among every rank as it costs a sync step:
    each rank runs a step's own work (``_sync_step_work``) and then the allreduce as the sync
    workers run it (one flat buffer from two arrays, the polled non-blocking collective, back
    in place); the cost is that step's median time less its work on the busiest core, timed
    before with one rank per core (the rest asleep), and never less than the collective back
    to back.  Where ranks outnumber the cores this is several times the collective back to
    back: the ranks sharing a core leave it one after another, and the first out takes the
    core for its next step's work (docs/decisions/007-allreduce-as-a-step-costs-it.md)."""
    work = _sync_step_work(np.random.default_rng(comm.rank))
    first = comm.rank < cores                     # the first rank bound to each core (``cores_of``)
    busiest = -(-comm.size // cores)
    for _ in range(5):
        work()
    comm.Barrier()
    own = []
    if first:
        for _ in range(steps):
            t = time.perf_counter()
            work()
            own.append(time.perf_counter() - t)
        wait_buffer(comm.Ibarrier())
    else:
        _sleep_until_done(comm.Ibarrier())
    solo = statistics.median(x for r in comm.allgather(own) for x in r)
    half = lambda n: max(1, n // 8)               # noqa: E731 -- float32s in each of the two arrays
    times: dict[int, list[float]] = defaultdict(list)
    bare: dict[int, list[float]] = defaultdict(list)
    for _ in range(passes):                       # a slow spell of a shared host spoils one pass, not a size
        for n in sizes:
            parts = [np.ones(half(n), np.float32), np.ones(half(n), np.float32)]

            def collective(parts=parts):
                g = np.concatenate(parts)
                total = np.empty_like(g)
                wait_buffer(comm.Iallreduce(g, total))
                parts[0][...] = total[:len(parts[0])]
                parts[1][...] = total[len(parts[0]):]
            reps = max(10, min(steps, (2**27) // n))
            bare[n].append(_timed(comm, max(3, reps // 5), collective))
            barrier(comm)
            for _ in range(reps):
                t = time.perf_counter()
                work()
                collective()
                times[n].append(time.perf_counter() - t)
    out = []
    for n in sizes:                               # never less than the collective alone (a noisy step can be)
        step = statistics.median(statistics.median(r) for r in comm.allgather(times[n]))
        out.append([0.0, float(8 * half(n)), max(statistics.median(bare[n]), step - busiest * solo)])
    return out


def with_others(mine: dict, everyone: list[dict] | None) -> dict:
    """Rank 0's points, and those of other ranks at ops rank 0 did not run (a stage of whole
    layers holds its own ops: stage 1's are measured on rank 1 only); None off rank 0."""
    if everyone is None:
        return mine
    out = {key: list(pts) for key, pts in mine.items()}
    for theirs in everyone[1:]:
        for key, pts in theirs.items():
            have = {(f, b) for f, b, _t in out.setdefault(key, [])}
            out[key] += [pt for pt in pts if (pt[0], pt[1]) not in have]
    return out


def main(argv: list[str] | None = None) -> None:
    """``ops [QUIET_S [MODELS]]`` | ``pingpong SIZES`` | ``allreduce SIZES CORES`` (SIZES a JSON
    list of bytes; QUIET_S the reference step on a quiet host, probes wait for one, "-" for
    none; MODELS a JSON list of the models to probe, ``probes_for``)."""
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    pin(comm.rank, comm.size)                   # as the executor's ranks are
    args = sys.argv[1:] if argv is None else argv
    if args[0] == "ops":
        pair = comm.Split(color=comm.rank // 2, key=comm.rank)
        out = op_times(seed=comm.rank, barrier=comm.Barrier, pair=pair if pair.size == 2 else None,
                       quiet=float(args[1]) if len(args) > 1 and args[1] != "-" else None,
                       slowest=lambda t: max(comm.allgather(t)),
                       probes=probes_for(json.loads(args[2]) if len(args) > 2 else None))
        out = with_others(out, comm.gather(out))
    elif args[0] == "pingpong":
        out = pingpong(comm, json.loads(args[1]))
    else:
        out = allreduce(comm, json.loads(args[1]), int(args[2]))
    if comm.rank == 0:
        print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
