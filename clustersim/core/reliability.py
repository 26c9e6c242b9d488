"""The expected cost of failures and checkpoints to a synchronous job that restarts from its
last checkpoint (``faults.mtbf_s`` or ``machine_mtbf_s`` with ``on_failure = "restart"``),
in closed form, so a plan for weeks of training is not read off a simulated minute.

The job's N devices fail independently, each after an exponential time of mean
``mtbf_s``, and its M machines as a whole after one of mean ``machine_mtbf_s`` (a
replacement draws anew, as the simulator does): the job fails at rate lambda = N / mtbf_s +
M / machine_mtbf_s.  Between checkpoints it works tau seconds and writes for delta; a
failure costs R (detection, restart, reading the checkpoint back) and the segment's work
so far, and a failure during a recovery costs another recovery (the simulator replaces
only the devices already dead).  Daly's estimate for exponential failures (J. T. Daly, "A
higher order estimate of the optimum checkpoint interval for restart dumps", Future
Generation Computer Systems 22(3), 2006) is then the wall time per second of work:

    e^(lambda R) (e^(lambda (tau + delta)) - 1) / (lambda tau)

Against the simulator's failures (decision 072): 3% above them at lambda R = 0.2 (it
recovers once from failures that come during one detection), 9% below at lambda R = 1.1;
the same to first order where lambda R is small, as in practice (a job failing every few
hours, recovering in minutes).  The least overhead is near Young's interval
sqrt(2 delta / lambda) (CACM 17(9), 1974).
"""
from __future__ import annotations

import math

from clustersim.core.plan import Plan, used_devices
from clustersim.core.schedule import checkpoint_bytes


def overhead(rate: float, work_s: float, write_s: float, recover_s: float) -> float:
    """Expected wall seconds per second of work (>= 1; ``math.inf`` where the exponent
    overflows: with no checkpoint for long enough the job never finishes on average).
    ``rate``: failures per second of the job; ``work_s``: work between checkpoints."""
    if rate <= 0:
        return (work_s + write_s) / work_s
    try:
        return math.exp(rate * recover_s) * math.expm1(rate * (work_s + write_s)) / (rate * work_s)
    except OverflowError:
        return math.inf


def best_interval(rate: float, step_s: float, write_s: float, recover_s: float, most: int = 10**9) -> int:
    """The checkpoint interval in steps (1 .. ``most``) with the least ``overhead``: the
    overhead falls, then rises, with the interval, so the first step up is the minimum."""
    def cost(k: int) -> float:
        return overhead(rate, k * step_s, write_s, recover_s)
    lo, hi = 1, most
    while lo < hi:
        mid = (lo + hi) // 2
        if cost(mid + 1) < cost(mid):
            lo = mid + 1
        else:
            hi = mid
    return lo


def failure_rate(p: Plan) -> float:
    """Failures a second of the job: each device it uses (replica slots, shards) fails at
    1 / ``mtbf_s`` and each machine holding them, as a whole, at 1 / ``machine_mtbf_s``; 0
    without either."""
    faults, topo = p.scenario.faults, p.scenario.topology
    devices = used_devices(p)
    rate = len(devices) / faults.mtbf_s if faults.mtbf_s > 0 else 0.0
    machines = {topo.machine_of(d) for d in devices} - {None}
    return rate + (len(machines) / faults.machine_mtbf_s if faults.machine_mtbf_s > 0 else 0.0)


def checkpoint_seconds(p: Plan) -> float:
    """Seconds a checkpoint's write (or a restart's read) takes: the parameters of one
    replica's slots (``checkpoint_bytes`` each) at ``faults.checkpoint_gbps``."""
    return sum(p.slot_params) * checkpoint_bytes(p.scenario) / (p.scenario.faults.checkpoint_gbps * 1e9)


def failure_costs(p: Plan, step_s: float, work_s: float | None = None) -> dict:
    """The expected cost of failures and checkpoint writes over ``work_s`` seconds of
    failure-free work (the whole training; else the run's steps), for a sync job that
    checkpoints every ``checkpoint_every`` steps and, with ``mtbf_s``, restarts from its last
    checkpoint: the job's failure rate, write and recovery seconds, the expected wall
    seconds per failure-free second (``failure_overhead``; an interval as long as the job
    writes no checkpoint, as with none) and the interval that costs least
    (``checkpoint_every_best``, 0 where never checkpointing is cheapest, None where no
    interval lets the job finish; with its ``failure_overhead_best``).  An overhead past
    float range (no checkpoint for long enough: the job never finishes on average) is None.
    With drawn failures where no closed form holds (``on_failure = "continue"``,
    asynchronous algorithms, sync with shards, which stops at a failed one): only
    ``failures_in_time_to_train`` = False.  {} where nothing applies."""
    sc = p.scenario
    faults = sc.faults
    sync = sc.training.algorithm == "sync"
    if step_s <= 0:
        return {}
    drawn = faults.mtbf_s > 0 or faults.machine_mtbf_s > 0
    if drawn and not (sync and faults.on_failure == "restart" and not sc.parallel.ps_shards):
        return {"failures_in_time_to_train": False}       # a sync job's failed shard is not replaced: it stops
    if not (drawn or (sync and faults.checkpoint_every)):
        return {}
    work = work_s or sc.training.steps * step_s
    rate = failure_rate(p)
    write = checkpoint_seconds(p)
    recover = faults.detect_timeout_s + faults.restart_s + write

    def cost(every: int) -> float:
        if not every or every * step_s >= work:          # no checkpoint before the job's end
            return overhead(rate, work, 0.0, recover)
        return overhead(rate, every * step_s, write, recover)
    out = {"checkpoint_write_s": write, "failure_overhead": _finite(cost(faults.checkpoint_every))}
    if rate > 0:
        best = best_interval(rate, step_s, write, recover, max(1, math.ceil(work / step_s) - 1))
        least = cost(best)
        if cost(0) <= least:                                     # never checkpointing costs least
            best, least = 0, cost(0)
        out.update(job_mtbf_s=1 / rate, recovery_s=recover,      # None: no interval lets it finish
                   checkpoint_every_best=None if math.isinf(least) else best, failure_overhead_best=_finite(least))
    return out


def _finite(x: float) -> float | None:
    return None if math.isinf(x) else x
