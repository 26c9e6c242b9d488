"""A Plan survives JSON whole: the ranks get the launcher's decisions, not their own."""
import json

import pytest

from clustersim.core.plan import plan
from clustersim.core.planio import load_plan, plan_from_dict, plan_to_dict, save_plan
from helpers import scenario


@pytest.mark.parametrize("sections", [
    dict(parallel={"model_parallel": 2, "replicas": 2}),
    dict(model="distbelief-speech", parallel={"model_parallel": 2, "split": "layers", "micro_batches": 4}),
    dict(model="distbelief-speech", parallel={"model_parallel": 3, "split": "layers", "micro_batches": 3,
                                              "schedule": "gpipe"}),
    dict(parallel={"replicas": 3, "ps_shards": 2}, training={"algorithm": "downpour", "n_fetch": 2, "comm_bits": 8}),
    dict(parallel={"replicas": 2}, training={"algorithm": "local", "steps": 7, "local_steps": 3}),
    dict(parallel={"replicas": 2, "ps_shards": 1}, training={"algorithm": "sandblaster", "work_units": 5}),
    dict(parallel={"model_parallel": 2, "pipeline": 2, "replicas": 2, "micro_batches": 2},      # stages of tensor slices
         training={"optimizer": "adam", "zero": 3, "recompute": True}),
])
def test_a_plan_round_trips_through_json(sections, tmp_path):
    p = plan(scenario(**sections))
    back = plan_from_dict(json.loads(json.dumps(plan_to_dict(p))))
    for field in ("slices", "axes", "ops", "devices", "slot_params", "sync", "ps", "schedule", "memory"):
        assert getattr(back, field) == getattr(p, field), field
    assert back.scenario.raw == p.scenario.raw and back.scenario.model == p.scenario.model
    save_plan(p, tmp_path / "plan.json")
    assert load_plan(tmp_path / "plan.json").ops == p.ops          # the schedule's order with them


def test_other_data_is_not_a_plan():
    with pytest.raises(ValueError, match="not a clustersim plan"):
        plan_from_dict({"version": 0})
