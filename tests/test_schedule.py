"""The training schedule is decided once, in the Plan, and the simulator follows it."""
import pytest

from clustersim.core.plan import plan
from clustersim.core.scenario import scenario_from_dict
from sim.engine import simulate
from helpers import scenario


def test_schedule_closed_forms():
    local = plan(scenario(parallel={"replicas": 2}, training={"algorithm": "local", "steps": 7, "local_steps": 3}))
    assert local.schedule.averages == (2, 5, 6) and local.schedule.rule == "none"
    down = plan(scenario(parallel={"replicas": 2, "ps_shards": 1},
                         training={"algorithm": "downpour", "steps": 6, "n_fetch": 2, "n_push": 3,
                                   "optimizer": "adagrad", "comm_bits": 8}))
    s = down.schedule
    assert [s.fetches_before(t) for t in range(6)] == [True, False, True, False, True, False]
    assert [s.pushes_after(t) for t in range(6)] == [False, False, True, False, False, True]
    assert s.rule == "adagrad" and s.comm_bits == 8 and s.staleness_bound is None
    sync = plan(scenario(parallel={"replicas": 4, "ps_shards": 2}, training={"backup_workers": 1}))
    assert sync.schedule.quorum == 3 and sync.schedule.rule == "sgd" and sync.schedule.fetches_before(5)
    blaster = plan(scenario(batch=10, parallel={"replicas": 3, "ps_shards": 1},
                            training={"algorithm": "sandblaster", "work_units": 7}))
    assert (blaster.schedule.units, blaster.schedule.unit_size, blaster.schedule.rule) == (7, 4, "lbfgs")
    dc = plan(scenario(parallel={"replicas": 2, "ps_shards": 1}, training={"algorithm": "dcasgd", "dcasgd_adaptive": True}))
    ssp = plan(scenario(parallel={"replicas": 2, "ps_shards": 1}, training={"algorithm": "ssp", "staleness": 2}))
    assert dc.schedule.rule == "dcasgd_adaptive" and ssp.schedule.staleness_bound == 2


def test_the_simulator_fetches_pushes_and_averages_where_the_plan_says():
    down = plan(scenario(parallel={"replicas": 2, "ps_shards": 1},
                         training={"algorithm": "downpour", "steps": 6, "n_fetch": 2, "n_push": 3}))
    log = simulate(down).trace.updates
    for r in range(2):
        assert sorted({u.step for u in log if u.kind == "snap" and u.replica == r}) == [0, 2, 4]
        assert [u.step for u in log if u.kind == "send" and u.replica == r] == [2, 5]
    local = plan(scenario(parallel={"replicas": 2}, training={"algorithm": "local", "steps": 7, "local_steps": 3}))
    assert [u.step for u in simulate(local).trace.updates if u.kind == "average"] == [2, 5, 6]


@pytest.mark.parametrize("steps, k, points", [(6, 3, [2, 5]), (1, 10, [0]), (10, 1, list(range(10)))])
def test_local_averages_every_k_steps_and_at_the_end(steps, k, points):
    p = plan(scenario(parallel={"replicas": 2}, training={"algorithm": "local", "steps": steps, "local_steps": k}))
    assert list(p.schedule.averages) == points


@pytest.mark.parametrize("dtype, gradients, optimizer, zero, per_param", [
    ("fp32", "", "sgd", 0, 4 + 2 * 4),                    # read g; read and write w
    ("fp32", "", "adam", 0, 4 + 2 * 4 * 3),               # and both moments
    ("bf16", "fp32", "adam", 0, 4 + 2 * 4 * 3 + 2),       # fp32 master and moments, the bf16 copy written
    ("fp16", "", "sgd", 0, 2 + 2 * 4 + 2),
    ("fp64", "", "adam", 0, 8 + 2 * 8 * 3),               # 8-byte values throughout
    ("fp32", "", "adam", 1, 4 + 2 * 4 * 3)])              # ZeRO: each replica steps its half
def test_a_replicas_update_moves_what_its_optimizer_reads_and_writes(dtype, gradients, optimizer, zero, per_param):
    """The sync update was fp32 SGD's 12 bytes a parameter whatever the optimizer, dtype or
    ZeRO stage (Adam and fp64 took 3.009 ms like SGD)."""
    p = plan(scenario_from_dict({"cluster": {"topology": "dgx-h100"},
                                 "model": {"name": "mlp-digits", "batch_size": 32, "dtype": dtype},
                                 "parallel": {"replicas": 2}, "training": {"optimizer": optimizer, "zero": zero,
                                                                           "steps": 1, "gradient_dtype": gradients}},
                                "test.toml"))
    params = -(-p.slot_params[0] // 2) if zero else p.slot_params[0]
    res = simulate(p)
    updates = [s for s in res.trace.spans if s.name == "update"]
    assert len(updates) == 2 and {s.bytes for s in updates} == {per_param * params}
    assert {s.flops for s in updates} == {(12 if optimizer == "adam" else 2) * params}
