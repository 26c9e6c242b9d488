"""Stragglers and failures as inputs: per-device slowdowns and a failure schedule, both
drawn from the generator passed in, so a seed reproduces them."""
from __future__ import annotations

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


def failure_schedule(sc: Scenario, devices: list[str], rng: np.random.Generator) -> list[Failure]:
    """Given failures plus, when ``mtbf_s`` > 0, one exponential failure time per device."""
    out = list(sc.faults.failures)
    if sc.faults.mtbf_s > 0:
        for dev in devices:
            out.append(Failure(float(rng.exponential(sc.faults.mtbf_s)), (dev,)))
    return sorted(out, key=lambda f: f.at_s)
