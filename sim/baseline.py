"""The speedup baseline: the same model and per-replica batch on one device."""
from __future__ import annotations

import dataclasses

from clustersim.core.plan import Plan, plan
from clustersim.core.scenario import Faults
from sim.engine import simulate


def one_device_step_time(p: Plan) -> float:
    """Step time of the same model and per-replica batch on the first device alone, taking
    plain SGD steps (memory not checked: the baseline is hypothetical when the model does
    not fit).  Alone means no parameter server, so an algorithm that needs one (Downpour,
    Sandblaster, ...) is not the baseline's, and no faults: the baseline is the healthy job."""
    sc = p.scenario
    solo = dataclasses.replace(sc, parallel=dataclasses.replace(sc.parallel, model_parallel=1, pipeline=1, replicas=1,
                                                                ps_shards=0, micro_batches=1, grid=()),
                               training=dataclasses.replace(sc.training, algorithm="sync", backup_workers=0),
                               faults=Faults())
    res = simulate(plan(solo, check_memory=False), steps=1)
    return res.sim_time_s
