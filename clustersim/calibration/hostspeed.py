"""How fast this host's cores run now, and how that varies, against calibration.

A shared VM's cores slow down on their own, each apart from the other, in spells of
seconds and regimes of minutes.  The reference: whole steps of mlp-digits at batch 32
(``run_step`` and SGD, after a warm-up) on one core, the median step in each 50 ms window;
``core_series`` times it on every core at once, one process bound to each (as a job's
ranks are bound), so the windows line up.  Calibration takes the host's quiet speed from
these windows (``quiet_reference``) and times its probes where the host runs at it;
validation compares the prediction with each run's quiet windows (``quiet_time``).
See docs/decisions/004-quiet-host-calibration.md (and the predictions tried and dropped).

    python -m clustersim.calibration.hostspeed CORE [SECONDS [START]]   # this core's reference step by 50 ms window, JSON
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from clustersim.core.metrics import QUIET_PCT, WINDOW_S
from executor.launch import cores_of, rank_env

REFERENCE = ("mlp-digits", 32)
WARM_S = 0.02
REFERENCE_S = 0.2         # a default sample: four windows
SERIES_S = 3.0            # each of calibration's two samples of the host's noise
BRACKET_S = 0.01          # a reference bracket around a probe
STARTUP_S = 1.5           # core_series' processes start timing this long after they are launched


class Reference:
    """The reference step, set up once in this process: ``step`` runs one, ``median``
    times them for a while."""

    def __init__(self) -> None:
        from clustersim.calibration.probe import probe_inputs, probe_plan
        self.plan = probe_plan(*REFERENCE, 1)
        self.params, self.data = probe_inputs(self.plan, np.random.default_rng(0))

    def step(self) -> float:
        from executor.optim import sgd_in_place
        from executor.partitioned import Mailbox, run_step
        start = time.perf_counter()
        x, y = self.data.next()
        sgd_in_place(self.params, run_step(self.plan, {0}, self.params, x, y, Mailbox()).grads, 1e-6)
        return time.perf_counter() - start

    def median(self, seconds: float = BRACKET_S, least: int = 3) -> float:
        """The median step over ``seconds`` (``least`` steps at least): how fast this core
        runs now."""
        times, start = [], time.perf_counter()
        while len(times) < least or time.perf_counter() - start < seconds:
            times.append(self.step())
        return statistics.median(times)


def reference_windows(seconds: float = REFERENCE_S, window: float = WINDOW_S, start: float | None = None) -> list[float]:
    """Median seconds of a whole reference step in this process, in each ``window`` of
    ``seconds`` from ``start`` (``time.monotonic``, one clock for every process: windows of
    several processes line up; default ``WARM_S`` from now), steps run before it to warm up.
    A window in which no step ended takes the step that spans it, so that window k is the
    same stretch of time on every core."""
    ref = Reference()
    ref.step()                                    # the first, cold, step never counts (a late start)
    start = time.monotonic() + WARM_S if start is None else start
    while time.monotonic() < start:
        ref.step()
    ends: list[tuple[float, float]] = []          # (end since start, seconds) of each timed step
    while not ends or ends[-1][0] < seconds:
        took = ref.step()
        ends.append((time.monotonic() - start, took))
    return windows_of(ends, seconds, window)


def windows_of(ends: list[tuple[float, float]], seconds: float, window: float) -> list[float]:
    """Each ``window`` of ``seconds``: the median of the steps that ended in it, or where none
    did the step that spans it (``ends``: (end, duration) in order, the last ending at or
    after ``seconds``)."""
    out, i = [], 0
    for k in range(max(1, round(seconds / window))):
        inside = []
        while i < len(ends) and ends[i][0] < (k + 1) * window:
            inside.append(ends[i][1])
            i += 1
        out.append(statistics.median(inside) if inside else ends[min(i, len(ends) - 1)][1])
    return out


def quiet_reference(series: dict[int, list[float]]) -> float:
    """The reference step on a quiet host: the ``QUIET_PCT``th percentile of every core's
    windows (a shared VM is slowed by its neighbours most of the time, at times all of it;
    see docs/decisions/004-quiet-host-calibration.md)."""
    return float(np.percentile([t for s in series.values() for t in s], QUIET_PCT))


def core_series(seconds: float = REFERENCE_S, cores: list[int] | None = None) -> dict[int, list[float]]:
    """Core -> its reference step window by window, every core timed at once (one process
    bound to each, all counting windows from one start ``STARTUP_S`` from now, after their
    imports); the same number of windows for each."""
    cores = sorted(os.sched_getaffinity(0)) if cores is None else cores
    env = rank_env(len(cores), len(cores))
    start = time.monotonic() + STARTUP_S          # one start for all: their windows line up
    procs = [subprocess.Popen([sys.executable, "-m", "clustersim.calibration.hostspeed", str(c), str(seconds),
                               repr(start)],
                              stdout=subprocess.PIPE, text=True, env=env, cwd=str(Path(__file__).resolve().parents[1]))
             for c in cores]
    out = {}
    for c, proc in zip(cores, procs):
        text, _ = proc.communicate(timeout=60 + 2 * seconds)
        if proc.returncode != 0:
            raise RuntimeError(f"clustersim.calibration.hostspeed on core {c} failed")
        out[c] = json.loads(text)
    n = min(len(v) for v in out.values())
    return {c: v[:n] for c, v in out.items()}


def rank_series(series: dict[int, list[float]], ranks: int) -> list[list[float]]:
    """Each rank's reference window by window: the slowest of the cores it is bound to
    (``cores_of``) -- a rank on several cores runs its GEMMs on a BLAS thread per core, and
    each GEMM waits for the last of them."""
    cores = sorted(series)
    return [[max(w) for w in zip(*(series[c] for c in cores_of(k, ranks, cores)))] for k in range(ranks)]


def noise_series(slowdowns: dict[int, list[float]], ranks: int) -> list[list[float]]:
    """Each rank's slowdown over the quiet host window by window (``Device.noise``, which
    ``faults.host_noise`` replays), from each core's (``slowdowns``: core -> its reference
    windows over the quiet step): the mean of its cores' -- a rank on several cores runs
    its Python on one of them at a time, wherever the scheduler puts it, and its large
    GEMMs on all (``rank_series`` takes their slowest, for the reference it reports).
    Ranks sharing a core share its series.  See docs/decisions/048."""
    cores = sorted(slowdowns)
    return [[statistics.fmean(w) for w in zip(*(slowdowns[c] for c in cores_of(k, ranks, cores)))]
            for k in range(ranks)]


def pooled(slowdowns: list[dict[int, list[float]]]) -> dict[int, list[float]]:
    """Several calibrations' core slowdowns as one longer sample, core by core (windows of
    one calibration stay lined up across cores)."""
    return {c: [x for s in slowdowns for x in s[c]] for c in slowdowns[0]}


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    os.sched_setaffinity(0, {int(args[0])})
    print(json.dumps(reference_windows(float(args[1]) if len(args) > 1 else REFERENCE_S,
                                       start=float(args[2]) if len(args) > 2 else None)))


if __name__ == "__main__":
    main()
