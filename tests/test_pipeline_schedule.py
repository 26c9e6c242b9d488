"""Pipeline schedules (GPipe, 1F1B): the Plan's per-slot order against the published
schedules, the simulated step against the pipeline bubble's closed form, and the
activations each stage keeps against the schedule's count."""
import dataclasses

import pytest

from clustersim.core.models import build_model, make_layer
from clustersim.core.plan import PARAM_BYTES, plan, slot_sequence, stages_of
from clustersim.core.schedule import micro_batches_held, stage_units
from clustersim.core.topogen import build_topology
from sim.compute import op_seconds
from sim.engine import simulate
from helpers import gpu, link, scenario

P = 4                 # stages
LAYERS_PER_STAGE = 2
WIDTH = 512           # features in and out of every dense layer
BATCH = 64


@pytest.mark.parametrize("p", range(1, 6))
@pytest.mark.parametrize("m", range(1, 9))
def test_stage_units_run_every_micro_batch_once_and_hold_what_the_schedule_says(p, m):
    for i in range(p):
        gpipe, ofob = stage_units("gpipe", i, p, m), stage_units("1f1b", i, p, m)
        for units in (gpipe, ofob):
            assert sorted(units) == sorted([("fwd", k) for k in range(m)] + [("bwd", k) for k in range(m)])
            assert all(units.index(("fwd", k)) < units.index(("bwd", k)) for k in range(m))
            assert [k for kind, k in units if kind == "bwd"] == list(range(m))    # gradients add in one order
        assert gpipe == [("fwd", k) for k in range(m)] + [("bwd", k) for k in range(m)]
        warm = min(m, p - i - 1)                   # Megatron: num_warmup_microbatches
        assert ofob[:warm] == [("fwd", k) for k in range(warm)]
        steady, cool = ofob[warm:warm + 2 * (m - warm)], ofob[warm + 2 * (m - warm):]
        assert steady == [u for k in range(m - warm) for u in (("fwd", warm + k), ("bwd", k))]
        assert cool == [("bwd", k) for k in range(m - warm, m)]
        assert micro_batches_held(gpipe) == m and micro_batches_held(ofob) == min(m, p - i)


def test_unknown_schedule_or_stage_is_refused():
    with pytest.raises(ValueError, match="schedule"):
        stage_units("zigzag", 0, 2, 2)
    with pytest.raises(ValueError, match=r"stage\(=2\)"):
        stage_units("1f1b", 2, 2, 2)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("split, m", [("layers", 4), ("layers", 3), ("spatial", 1), ("spatial", 2)])
def test_each_slot_runs_its_ops_in_the_schedule_order_and_the_plan_stays_topological(schedule, split, m):
    p = plan(scenario(model="distbelief-speech", batch=12,
                      parallel={"model_parallel": 4, "split": split, "micro_batches": m, "schedule": schedule}))
    assert all(d < op.id for op in p.ops for d in op.deps)
    stage, stages = stages_of(p.scenario, p.slices)
    for j in range(p.slots):
        seq = slot_sequence(p, j)
        units = [(op.kind, op.micro) for op in seq]
        runs = [u for n, u in enumerate(units) if n == 0 or units[n - 1] != u]    # one unit: a run of ops
        assert runs == (stage_units(schedule, stage[j], stages, m) if seq else [])


def uniform_pipeline(m: int, schedule: str):
    """P stages of LAYERS_PER_STAGE identical dense layers on four equal GPUs: compute-bound
    (memory bandwidth far above need), no per-op overhead, stage messages all but free.  The
    first layer keeps its input's gradient here (``Node.input_grad`` patched), so that every
    stage is alike: a first layer computes none (decision 068), which would make stage 0's
    backward a third lighter."""
    from unittest import mock
    from clustersim.core.models import Node
    fast = {"efficiency": 1.0, "op_overhead_us": 0.0, "memory_bandwidth_gbps": 1e9}
    topo = build_topology({"name": "uniform", "device": [{**gpu(f"g{i}", 10.0, i), **fast} for i in range(P)]
                           + [{"name": "sw", "kind": "switch"}],
                           "link": [link(f"g{i}", "sw", 1e12, 0.0) for i in range(P)]}, "uniform.toml")
    model = build_model("dense-chain", (WIDTH, 1, 1),
                        [make_layer("dense", units=WIDTH) for _ in range(P * LAYERS_PER_STAGE)])
    sc = scenario(batch=BATCH, parallel={"model_parallel": P, "split": "layers", "micro_batches": m,
                                         "schedule": schedule}, training={"steps": 1})
    with mock.patch.object(Node, "input_grad", property(lambda node: True)):
        return plan(dataclasses.replace(sc, model=model, topology=topo), check_memory=False)


def held_in_trace(res, device: str) -> int:
    """The most micro-batches ``device`` held at once in a simulated step: from the start of
    a micro-batch's first forward op there to the end of its last backward op there."""
    spans = [s for s in res.trace.spans if s.where == device and s.phase in ("fwd", "bwd")]
    first = min(int(s.name.split("L")[1]) for s in spans)
    events = sorted([(s.start_s, 1) for s in spans if s.name == f"fwd L{first}"]
                    + [(s.end_s, -1) for s in spans if s.name == f"bwd L{first}"])   # a free before a take
    held = most = 0
    for _, change in events:
        held += change
        most = max(most, held)
    return most


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_uniform_pipeline_step_is_the_bubble_closed_form(schedule):
    """m micro-batches on p uniform stages take (m + p - 1) / (m p) of one micro-batch's
    pipeline (the bubble is (p - 1) / (m + p - 1) of it), under either schedule; the step
    adds stage 0's update, the last thing done."""
    m = 4
    one, many = uniform_pipeline(1, schedule), uniform_pipeline(m, schedule)
    assert [sum(1 for s in one.slices if s[0][0] == j) for j in range(P)] == [LAYERS_PER_STAGE] * P
    n = one.slot_params[0]
    update = op_seconds(one.scenario.topology, "g0", 2 * n, 3 * n * PARAM_BYTES, "fp32")
    t1 = simulate(one).trace.step_times()[0] - update
    compute = sum(op_seconds(one.scenario.topology, "g0", op.flops, op.bytes, "fp32") for op in one.ops
                  if op.kind != "xfer")
    assert t1 == pytest.approx(compute, rel=1e-9)          # one micro-batch: the stages one after another
    res = simulate(many)
    assert res.trace.step_times()[0] - update == pytest.approx((m + P - 1) / (m * P) * t1, rel=1e-9)
    for j, dev in enumerate(many.devices[0]):               # the device ran the Plan's order, one op at a time
        spans = sorted((s for s in res.trace.spans if s.where == dev and s.phase in ("fwd", "bwd")),
                       key=lambda s: s.start_s)
        assert [s.name for s in spans] == [f"{op.kind} L{op.layer}" for op in slot_sequence(many, j)]
        assert all(b.start_s >= a.end_s - 1e-15 for a, b in zip(spans, spans[1:]))


def test_1f1b_holds_fewer_activations_than_gpipe_as_memory_use_says():
    m = 4
    held, memory = {}, {}
    for schedule in ("gpipe", "1f1b"):
        p = uniform_pipeline(m, schedule)
        res = simulate(p)
        held[schedule] = [held_in_trace(res, dev) for dev in p.devices[0]]
        memory[schedule] = [p.memory[dev]["activations"] for dev in p.devices[0]]
    assert held["gpipe"] == [m] * P
    assert held["1f1b"] == [min(m, P - i) for i in range(P)] == [4, 3, 2, 1]
    for i in range(P):                 # activations in memory_use: in proportion to the micro-batches held
        assert memory["1f1b"][i] == pytest.approx(memory["gpipe"][i] * held["1f1b"][i] / m, rel=1e-12)
    assert memory["gpipe"] == [uniform_pipeline(1, "gpipe").memory[f"g{i}"]["activations"] for i in range(P)]


def test_memory_use_keeps_the_largest_micro_batches_where_they_differ():
    """Batch 10 in 4 micro-batches of 3, 3, 2, 2: a 1F1B stage holding two keeps 6 samples'."""
    def act(m, schedule):
        p = plan(scenario(model="distbelief-speech", batch=10,
                          parallel={"model_parallel": 2, "split": "layers", "micro_batches": m, "schedule": schedule}))
        return [p.memory[dev]["activations"] for dev in p.devices[0]]
    whole, ofob = act(1, "1f1b"), act(4, "1f1b")
    assert act(4, "gpipe") == whole
    assert ofob == pytest.approx([whole[0] * 6 / 10, whole[1] * 3 / 10], rel=1e-12)
