"""Stragglers and failures as inputs: per-device slowdowns and a failure schedule, both
drawn from the generator passed in, so a seed reproduces them."""
from __future__ import annotations

from collections.abc import Hashable

import numpy as np

from clustersim.core.scenario import Failure, Scenario


def slowdowns(sc: Scenario, rng: np.random.Generator) -> dict[str, float]:
    """Factor per compute device: the fixed ones times, when ``slowdown_sigma`` > 0, a draw
    of exp(|N(0, sigma)|) >= 1 for every device (in device order, so seeds are stable)."""
    f = sc.faults
    out = dict(f.slowdown)
    if f.slowdown_sigma > 0:
        for dev in sc.topology.compute_devices():
            out[dev] = out.get(dev, 1.0) * float(np.exp(abs(rng.normal(0.0, f.slowdown_sigma))))
    return out


def failure_schedule(sc: Scenario, devices: list[str], rng: np.random.Generator) -> list[tuple[Failure, Hashable]]:
    """Each failure with the key of the draw it is (None: one the scenario gives): with
    ``mtbf_s``, one exponential time per device (key: the device), then with
    ``machine_mtbf_s`` one per machine of ``devices``, failing its devices of the job at once
    (key: ("machine", m)); in time order."""
    out: list[tuple[Failure, Hashable]] = [(f, None) for f in sc.faults.failures]
    if sc.faults.mtbf_s > 0:
        for dev in devices:
            out.append((Failure(float(rng.exponential(sc.faults.mtbf_s)), (dev,)), dev))
    for m, devs in job_machines(sc, devices).items():
        out.append((Failure(float(rng.exponential(sc.faults.machine_mtbf_s)), devs), ("machine", m)))
    return sorted(out, key=lambda fk: fk[0].at_s)


def job_machines(sc: Scenario, devices: list[str]) -> dict[int, tuple[str, ...]]:
    """With ``machine_mtbf_s``: each machine holding some of ``devices``, and those devices
    (what fails when it does); {} without."""
    out: dict[int, list[str]] = {}
    if sc.faults.machine_mtbf_s > 0:
        for dev in devices:
            if (m := sc.topology.machine_of(dev)) is not None:      # a device of no machine fails alone
                out.setdefault(m, []).append(dev)
    return {m: tuple(devs) for m, devs in sorted(out.items())}
