"""One executed job's Trace and summary, from its ranks' parts (on rank 0).

The Trace has what the simulator's has: every rank's spans, ``replica_steps`` and, for
jobs that step in lockstep (sync, Sandblaster's batches), ``step_ends``.  The summary is
``clustersim.core.metrics.summarize`` of that Trace plus what only a real run has
(accuracy, loss, quiet steps, bytes sent, the shards' and coordinator's counters).
"""
from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass

from clustersim.core.metrics import run_costs, step_samples, summarize
from clustersim.core.plan import Plan
from clustersim.core.scenario import LOCKSTEP
from clustersim.core.trace import Span, Trace

Step = tuple[int, int, float, float]          # (replica, step, start_s, end_s) on the job's common clock


@dataclass(frozen=True)
class Measured:
    """A run as ``summarize`` reads a simulator's result: the measured run time stands in
    for simulated time; there is no engine."""
    trace: Trace
    sim_time_s: float
    sim_events: int
    wall_s: float
    engine: None = None


def replica_steps(per_rank: list[list[Step]]) -> list[Step]:
    """One entry per (replica, step) from its slots' entries: the first slot's start to the
    last slot's end, in order of end (the simulator's order: it appends as steps end)."""
    spans: dict[tuple[int, int], tuple[float, float]] = {}
    for part in per_rank:
        for r, s, start, end in part:
            a, b = spans.get((r, s), (start, end))
            spans[(r, s)] = (min(a, start), max(b, end))
    return sorted(((r, s, a, b) for (r, s), (a, b) in spans.items()), key=lambda x: (x[3], x[0], x[1]))


def step_ends(steps: list[Step], quorum: int) -> list[float]:
    """When each step of a lockstep job ended: the ``quorum``-th earliest end among the
    replicas that ran it.  Not rank 0's view: a step is over when the replicas whose
    gradients it applies are done, which rank 0 alone does not see (its replica may be
    the late one, or crashed).  Not the plain max either: with backup workers the shards
    apply the first ``quorum`` replicas' gradients and the step goes on without the late
    ones, as in the simulator.  Without backups the quorum is every replica: the max."""
    ends: dict[int, list[float]] = defaultdict(list)
    for _, s, _, end in steps:
        ends[s].append(end)
    return [sorted(e)[min(quorum, len(e)) - 1] for _, e in sorted(ends.items())]


def merge_trace(p: Plan, spans: list[list[Span]], steps: list[list[Step]]) -> Trace:
    """The job's Trace from each rank's spans and step entries."""
    rs = replica_steps(steps)
    sched = p.schedule
    quorum = {"sync": sched.quorum, "sandblaster": p.replicas}
    ends = step_ends(rs, quorum[sched.algorithm]) if sched.algorithm in LOCKSTEP else []
    return Trace([sp for part in spans for sp in part], ends, [], [], rs)


def summary(p: Plan, trace: Trace, parts: list[dict]) -> dict:
    """``summarize`` of the merged trace (``sim_time_s`` = ``wall_s`` = the measured run:
    common start to the last worker's end).  ``step_time_s`` is the simulator's definition
    for replicas that step alone (Downpour, DC-ASGD, SSP, local SGD): ``summarize``'s
    ``metrics.replica_period`` of the trace's ``replica_steps``, each replica's first start
    to last end over its steps, waits included, median over replicas.  For the lockstep
    jobs (sync, Sandblaster) it is the median over the workers of their median step, and
    ``samples_per_s`` is batch x the gradients a step applies / step_time_s (Sandblaster: its
    units' samples, whichever replicas ran them), as the simulator's (``step_samples``).
    Then what only a run has: accuracy and loss on held-out data, training loss, quiet
    step, per-worker steps, which transport carried the workers' messages (nccl | mpi), the
    shards' updates and bytes pushed, the coordinator's counts.  The asynchronous shards'
    staleness of each apply joins the trace, so that ``staleness_*`` are summarize's."""
    workers = [s for s in parts if s["role"] == "worker"]
    shards = [s for s in parts if s["role"] == "shard"]
    coordinator = [s for s in parts if s["role"] == "coordinator"]
    stepped = [s for s in workers if s["steps"]]
    run_s = max(s["wall_s"] for s in workers)
    trace.staleness[:] = [n for s in shards for n in s.get("staleness", [])]    # the async shards' applies
    out = summarize(p, Measured(trace, run_s, len(trace.spans), run_s))
    if p.schedule.algorithm in LOCKSTEP:
        out["step_time_s"] = float(statistics.median(s["step_time_s"] for s in stepped)) if stepped else 0.0
    if p.schedule.algorithm in LOCKSTEP:      # a step's samples, whoever ran its units (Sandblaster), as simulated
        out["samples_per_s"] = step_samples(p, p.replicas) / out["step_time_s"] if out["step_time_s"] else 0.0
        out.update(run_costs(p, out["step_time_s"], out["samples_per_s"]))    # the training at that rate
    ev = next(s for s in workers if s["accuracy"] is not None)
    out.update(ranks=len(parts), workers=len(workers), accuracy=ev["accuracy"], loss=ev["loss"],
               transport="nccl" if any(s.get("transport") == "nccl" for s in workers) else "mpi",
               train_loss=train_loss(workers),
               quiet_step_time_s=float(statistics.median(s["quiet_step_time_s"] for s in stepped)) if stepped else 0.0,
               steps_per_worker=[s["steps"] for s in workers])
    crashed = sorted(p.devices[s["replica"]][s["slot"]] for s in workers if s.get("crashed"))
    if crashed:                                          # --fail: the device of the stopped worker, as simulate names it
        out["failed_devices"] = crashed
    if shards:
        out["shard_updates"] = [s["applied"] for s in shards]
        out["resumed_from_updates"] = [s["resumed_from"] for s in shards]
        out["ps_bytes_sent"] = sum(s["ps_bytes_sent"] for s in workers)
    if coordinator:
        out.update({k: v for k, v in coordinator[0].items() if k != "role"})
    return out


def train_loss(workers: list[dict]) -> float | None:
    """The mean over replicas of their last steps' training loss (a replica's loss is the
    sum of its slots' shares, as ``run_step`` returns each slot's share)."""
    per: dict[int, float] = defaultdict(float)
    for s in workers:
        if s["train_loss"] is not None:
            per[s["replica"]] += s["train_loss"]
    return statistics.fmean(per.values()) if per else None
