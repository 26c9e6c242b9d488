"""The speedup baseline: the same model and per-replica batch on one device."""
from __future__ import annotations

import dataclasses

from clustersim.core.plan import GIB, DoesNotFit, Plan, plan
from clustersim.core.scenario import Faults, Scenario
from sim.engine import simulate


def _solo(sc: Scenario, micro_batches: int = 1) -> Scenario:
    """The same model and per-replica batch on the first device alone, plain SGD steps.
    Alone means no parameter server, so an algorithm that needs one (Downpour,
    Sandblaster, ...) is not the baseline's, no ZeRO (one device shards nothing) and no
    faults: the baseline is the healthy job."""
    return dataclasses.replace(sc, parallel=dataclasses.replace(sc.parallel, model_parallel=1, pipeline=1, replicas=1,
                                                                ps_shards=0, micro_batches=micro_batches, grid=()),
                               training=dataclasses.replace(sc.training, algorithm="sync", backup_workers=0, zero=0),
                               faults=Faults())


def one_device_step_time(p: Plan) -> float:
    """Step time of ``_solo`` (memory not checked: the baseline is hypothetical when the
    model does not fit, ``one_device_short``)."""
    res = simulate(plan(_solo(p.scenario), check_memory=False), steps=1)
    return res.sim_time_s


def one_device_short(p: Plan) -> str:
    """"" where the job's model and per-replica batch fit one device, else what it lacks
    ("needs 105.3 GiB, has 80.0"): ``_solo`` with the job's micro-batches (gradient
    accumulation is how such a job fits)."""
    try:
        plan(_solo(p.scenario, p.scenario.parallel.micro_batches), ops=False)
    except DoesNotFit as exc:
        return f"one device needs {exc.need / GIB:.1f} GiB, has {exc.have / GIB:.1f}"
    return ""
