"""The expected cost of failures and checkpoints to a synchronous job that restarts from its
last checkpoint (``faults.mtbf_s`` with ``on_failure = "restart"``), in closed form, so a
plan for weeks of training is not read off a simulated minute.

The job's N devices fail independently, each after an exponential time of mean
``mtbf_s`` (a replaced device draws anew, as the simulator does): the job fails at rate
lambda = N / mtbf_s.  Between checkpoints it works tau seconds and writes for delta; a
failure costs R before work goes on (detection, restart, reading the checkpoint back) and
the segment's work so far.  A segment of L = tau + delta seconds is tried until one try
runs L without a failure: e^(lambda L) - 1 failed tries are expected, each lasting 1/lambda
- L / (e^(lambda L) - 1) on average before its failure, plus R.  The expected time per
segment is (1/lambda + R)(e^(lambda L) - 1), per second of work divided by tau.  A second
failure while the job recovers is recovered from by the same restart, as the simulator
does (Daly's higher-order estimate, Future Generation Computer Systems 22(3), 2006,
restarts instead: a factor e^(lambda R) where this has 1 + lambda R).  The least overhead
is near Young's interval sqrt(2 delta / lambda) (CACM 17(9), 1974).
"""
from __future__ import annotations

import math

from clustersim.core.plan import Plan
from clustersim.core.schedule import checkpoint_bytes


def overhead(rate: float, work_s: float, write_s: float, recover_s: float) -> float:
    """Expected wall seconds per second of work (>= 1; ``math.inf`` where the exponent
    overflows: with no checkpoint for long enough the job never finishes on average).
    ``rate``: failures per second of the job; ``work_s``: work between checkpoints."""
    if rate <= 0:
        return (work_s + write_s) / work_s
    try:
        return (1 / rate + recover_s) * math.expm1(rate * (work_s + write_s)) / work_s
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


def failure_costs(p: Plan, step_s: float, work_s: float | None = None) -> dict:
    """For a sync job with ``faults.mtbf_s`` that restarts from checkpoints: its failure
    rate, checkpoint write and recovery seconds, the expected wall seconds per failure-free
    second (``failure_overhead``; every ``checkpoint_every`` steps, or once over ``work_s``
    -- the whole training -- where it never checkpoints) and the interval that would cost
    least (``checkpoint_every_best``, ``failure_overhead_best``).  {} for any other job."""
    sc = p.scenario
    faults = sc.faults
    if not (faults.mtbf_s > 0 and faults.on_failure == "restart" and sc.training.algorithm == "sync"
            and step_s > 0):
        return {}
    devices = {d for row in p.devices for d in row} | set(p.ps.devices if p.ps else ())
    rate = len(devices) / faults.mtbf_s
    write = sum(p.slot_params) * checkpoint_bytes(sc) / (faults.checkpoint_gbps * 1e9)
    recover = faults.detect_timeout_s + faults.restart_s + write
    if faults.checkpoint_every:
        factor = overhead(rate, faults.checkpoint_every * step_s, write, recover)
    else:
        factor = overhead(rate, work_s or sc.training.steps * step_s, 0.0, recover)
    best = best_interval(rate, step_s, write, recover)
    return {"job_mtbf_s": 1 / rate, "checkpoint_write_s": write, "recovery_s": recover,
            "failure_overhead": factor, "checkpoint_every_best": best,
            "failure_overhead_best": overhead(rate, best * step_s, write, recover)}
