"""The engine against hand-computed step times and its own invariants."""
import dataclasses

import pytest
import simpy

from sim.compute import Compute, op_seconds
from sim.engine import simulate
from clustersim.core.plan import PARAM_BYTES, cost_key, plan
from sim.kernel_model import op_work
from clustersim.core.topogen import build_topology
from helpers import gpu, link, nccl_ring_seconds, ring_topology, scenario


def chain_seconds(p, device, dtype="fp32"):
    topo = p.scenario.topology
    return sum(op_seconds(topo, device, op.flops, op.bytes, dtype, op.kind == "bwd", cost_key(p, op), op_work(p, op))
               for op in p.ops if op.kind != "xfer")


def update_seconds(topo, device, params, summed=1):
    return op_seconds(topo, device, (summed + 1) * params, (summed + 2) * params * PARAM_BYTES, "fp32")


def test_one_device_step_is_its_ops_in_a_row_plus_the_update():
    p = plan(scenario(batch=64, training={"steps": 3}))
    res = simulate(p)
    expected = chain_seconds(p, "m0.gpu0") + update_seconds(p.scenario.topology, "m0.gpu0", p.scenario.model.params)
    assert res.trace.step_times() == pytest.approx([expected] * 3, rel=1e-12)


@pytest.mark.parametrize("network", ["flow", "analytical"])
def test_data_parallel_step_is_compute_plus_ring_allreduce_plus_update(network):
    p = plan(scenario(batch=64, parallel={"replicas": 8}, cluster={"network": network},
                      training={"allreduce": "ring"}))
    topo = p.scenario.topology
    ring = nccl_ring_seconds(8, p.scenario.model.params * PARAM_BYTES)      # NCCL's ring on NVSwitch
    expected = chain_seconds(p, "m0.gpu0") + ring + update_seconds(topo, "m0.gpu0", p.scenario.model.params)
    assert simulate(p, steps=2).trace.step_times() == pytest.approx([expected] * 2, rel=1e-9)


def hetero(tflops=(1.0, 2.0), **sections):
    """Two GPUs of the given speeds joined by one 10 GB/s, 2 us link."""
    topo = build_topology({"name": "hetero", "device": [gpu("g0", tflops[0], 0), gpu("g1", tflops[1], 1)],
                           "link": [link("g0", "g1", 10.0, 2.0)]}, "hetero.toml")
    return dataclasses.replace(scenario(batch=256, **sections), topology=topo)


def test_sync_step_waits_for_the_slowest_replica():
    p = plan(hetero(parallel={"replicas": 2}))
    topo, params = p.scenario.topology, p.scenario.model.params
    slow = chain_seconds(p, "g0")
    assert slow > chain_seconds(p, "g1")
    ring = nccl_ring_seconds(2, params * PARAM_BYTES, link_gbps=10.0, machines=2)   # one machine each
    expected = slow + ring + update_seconds(topo, "g0", params)
    assert simulate(p, steps=1).sim_time_s == pytest.approx(expected, rel=1e-9)


def test_parameter_server_step_is_push_update_fetch():
    p = plan(hetero(tflops=(2.0, 2.0), parallel={"replicas": 2, "ps_shards": 1}))
    topo, params = p.scenario.topology, p.scenario.model.params
    assert p.ps.devices == ("g0",)                      # no spare device: the shard sits beside replica 0
    move = 2e-6 + params * PARAM_BYTES / 10e9           # g1's push, later the fetch back
    # the shard's update shares g0 with nothing (replica 0 is done by then)
    expected = chain_seconds(p, "g1") + move + update_seconds(topo, "g0", params, summed=2) + move
    assert simulate(p, steps=1).sim_time_s == pytest.approx(expected, rel=1e-9)


def test_ops_sharing_a_cpu_run_at_half_speed():
    sc = scenario()
    env = simpy.Environment()
    comp = Compute(env, sc.topology, "fp32")
    t_one = comp.seconds("m0.cpu", 1e12, 0)
    ends = []
    for _ in range(2):
        comp.run("m0.cpu", 1e12, 0).callbacks.append(lambda _e: ends.append(env.now))
    env.run()
    assert ends == pytest.approx([2 * t_one, 2 * t_one])


def test_a_gpu_runs_its_ops_one_after_the_other_in_the_order_given():
    """One kernel at a time: each op starts when the one before it ends, first come first
    served; an op given while the GPU is idle starts at once."""
    sc = scenario()
    env = simpy.Environment()
    comp = Compute(env, sc.topology, "fp32")
    size = {"a": 3e12, "b": 1e12, "c": 2e12}
    t = {k: comp.seconds("m0.gpu0", f, 0) for k, f in size.items()}
    log = []

    def give(name):
        comp.run("m0.gpu0", size[name], 0).callbacks.append(lambda e: log.append((name, e.value, env.now)))
    for name in "abc":
        give(name)
    env.run()
    ends = [t["a"], t["a"] + t["b"], t["a"] + t["b"] + t["c"]]
    assert [name for name, _, _ in log] == ["a", "b", "c"]
    assert [x for _, *times in log for x in times] == pytest.approx([0.0, ends[0], ends[0], ends[1], ends[1], ends[2]])
    env.timeout(1.0).callbacks.append(lambda _e: give("b"))
    env.run()
    assert log[-1][1:] == pytest.approx((ends[2] + 1.0, ends[2] + 1.0 + t["b"]))


def test_same_seed_same_scenario_identical_trace():
    sc = scenario(model="distbelief-image-80m", batch=4,
                  parallel={"model_parallel": 4, "replicas": 2}, training={"steps": 2})
    a, b = simulate(plan(sc)), simulate(plan(sc))
    assert a.trace.spans == b.trace.spans and a.sim_events == b.sim_events


def test_model_parallel_traffic_in_trace_equals_the_plan():
    p = plan(scenario(model="distbelief-speech", batch=16, parallel={"model_parallel": 4}))
    res = simulate(p, steps=1)
    in_plan = sum(op.bytes for op in p.ops if op.kind == "xfer")
    in_trace = sum(s.bytes for s in res.trace.spans if s.kind == "transfer")
    assert in_trace == pytest.approx(in_plan) and in_plan > 0


def costed(name, machine, costs):
    """A host rank with measured op costs, as calibrate writes it: a CPU of one core,
    whose ops share it (a GPU runs them in order)."""
    return {"name": name, "kind": "cpu", "machine": machine, "cores": 1, "core_gflops": 1000.0, "memory_gib": 16,
            "memory_bandwidth_gbps": 1000, "efficiency": 1.0, "op_overhead_us": 0.0, "op_costs": costs}


def _two_costed(pooled: bool = False):
    from sim.engine import Engine
    costs = {"send": [5.0, 0, 2.0], "recv": [3.0, 0, 4.0]}          # 5 us + bytes / 2 GB/s; 3 us + bytes / 4 GB/s
    pool = {"core_pool": "c"} if pooled else {}
    topo = build_topology({"name": "two", "device": [costed("g0", 0, costs), {**costed("g1", 1, costs), **pool},
                                                     *([{**gpu("g2", 1.0, 2), **pool}] if pooled else [])],
                           "link": [link("g0", "g1", 10.0, 2.0)], **({"core_pools": {"c": 1}} if pooled else {})},
                          "two.toml")
    return Engine(plan(dataclasses.replace(scenario(batch=8), topology=topo), check_memory=False))


def test_host_message_to_a_busy_receiver_pays_send_cost_wire_and_receive_cost():
    eng, n = _two_costed(), 1e6
    eng.compute.run_seconds("g1", 1.0)                               # g1 computes all along
    done = eng.transfer("g0", "g1", n, 0, 0, "m", "activation")
    eng.env.run(done)
    recv = 2 * (3e-6 + n / 4e9)                                      # shared with g1's work, at half speed
    assert eng.env.now == pytest.approx(5e-6 + n / 2e9 + 2e-6 + n / 10e9 + recv, rel=1e-9)


def test_host_message_to_a_waiting_receiver_arrives_with_the_send():
    eng, n = _two_costed(), 1e6
    done = eng.transfer("g0", "g1", n, 0, 0, "m", "activation")
    eng.env.run(done)                                                # the wire alongside the send cost, no receive cost
    assert eng.env.now == pytest.approx(max(5e-6 + n / 2e9, 2e-6 + n / 10e9), rel=1e-9)


def test_a_waiting_receiver_that_shares_its_core_still_copies_the_message_out():
    eng, n = _two_costed(pooled=True), 1e6                           # g1 and g2 bound to one core: half of it each
    assert not eng.compute.waiting("g1") and eng.compute.waiting("g0")
    done = eng.transfer("g0", "g1", n, 0, 0, "m", "activation")
    eng.env.run(done)
    assert eng.env.now == pytest.approx(5e-6 + n / 2e9 + 2e-6 + n / 10e9 + 2 * (3e-6 + n / 4e9), rel=1e-9)


@pytest.mark.parametrize("kind", ["cpu", "gpu"])
def test_a_measured_step_cost_comes_before_the_first_op(kind):
    """On a host rank, and on a GPU calibrated by ``calibrate --gpu`` (whose ops run in
    order: a lane, once a chain given at once, which the step's start must hold back)."""
    costs = {"step": [40.0, 0, 0]}
    dev = costed("g0", 0, costs) if kind == "cpu" else {**gpu("g0", 1.0, 0), "op_costs": costs}
    topo = build_topology({"name": "one", "device": [dev]}, "one.toml")
    p = plan(dataclasses.replace(scenario(batch=16, training={"steps": 2}), topology=topo), check_memory=False)
    expected = 40e-6 + chain_seconds(p, "g0") + update_seconds(topo, "g0", p.scenario.model.params)
    assert simulate(p).trace.step_times() == pytest.approx([expected] * 2, rel=1e-9)


def test_a_measured_host_allreduce_costs_each_member_its_fitted_time():
    costs = {"allreduce": [30.0, 0, 1.0]}                          # 30 us + bytes / 1 GB/s on every member
    topo = build_topology({"name": "two", "device": [costed("g0", 0, costs), costed("g1", 1, costs)],
                           "link": [link("g0", "g1", 10.0, 2.0)]}, "two.toml")
    p = plan(dataclasses.replace(scenario(batch=16, parallel={"replicas": 2}, training={"steps": 2}), topology=topo),
             check_memory=False)
    nbytes = p.scenario.model.params * PARAM_BYTES
    expected = chain_seconds(p, "g0") + 30e-6 + nbytes / 1e9 + update_seconds(topo, "g0", p.scenario.model.params)
    assert simulate(p).trace.step_times() == pytest.approx([expected] * 2, rel=1e-9)


def test_a_trace_saved_loads_back_whole(tmp_path):
    from clustersim.core.trace import Trace
    sc = scenario(batch=64, parallel={"replicas": 2, "ps_shards": 1}, training={"algorithm": "downpour", "steps": 3})
    tr = simulate(plan(sc)).trace
    tr.save(tmp_path / "t.json")
    back = Trace.load(tmp_path / "t.json")
    def fields(spans):                    # times go through microseconds: equal to rounding
        return sorted((s.name, s.kind, s.where, s.replica, s.step, s.bytes, s.flops, s.phase, s.links,
                       round(s.start_s, 12), round(s.end_s, 12)) for s in spans)
    assert len(back.spans) == len(tr.spans) > 0 and fields(back.spans) == fields(tr.spans)
    assert back.step_ends == tr.step_ends and back.staleness == tr.staleness
    assert back.replica_steps == tr.replica_steps
    (tmp_path / "bad.json").write_text('{"traceEvents": []}')
    with pytest.raises(ValueError, match="not a clustersim trace"):
        Trace.load(tmp_path / "bad.json")


def test_gradient_buckets_cover_every_layer_once_from_the_last():
    from clustersim.core.plan import buckets
    sc = scenario(model="distbelief-speech", batch=16, parallel={"replicas": 2, "model_parallel": 2},
                  training={"bucket_mb": 20})
    p = plan(sc)
    for j in range(p.slots):
        bs = buckets(p, j)
        layers = [i for ls, _ in bs for i in ls]
        assert layers == sorted(layers, reverse=True) and len(set(layers)) == len(layers)
        assert sum(n for _, n in bs) == p.slot_params[j]
        for ls, n in bs[:-1]:                     # each closed by the layer that filled it
            node = sc.model.nodes[ls[-1]]
            last = node.layer.slice_params(node.in_shape, dict(p.slices[ls[-1]])[j])
            assert (n - last) * PARAM_BYTES < 20 * 2**20 <= n * PARAM_BYTES
    whole = plan(scenario(model="distbelief-speech", batch=16, parallel={"replicas": 2}, training={"bucket_mb": 0}))
    assert len(buckets(whole, 0)) == 1


def test_bucketed_allreduce_overlaps_the_backward_and_moves_the_same_bytes():
    def run(bucket_mb):
        sc = dataclasses.replace(scenario(model="distbelief-speech", batch=64, parallel={"replicas": 2},
                                          training={"steps": 2, "bucket_mb": bucket_mb}),
                                 topology=ring_topology(2, gbps=2.0, lat_us=0.0))
        res = simulate(plan(sc))
        spans = [s for s in res.trace.spans if s.step == 1]
        reduce = [s for s in spans if s.phase == "allreduce"]
        return res, reduce, max(s.end_s for s in spans if s.phase == "bwd")
    whole, reduce0, _ = run(0)
    split, reduce1, last_bwd = run(16)
    assert len(reduce1) > len(reduce0) == 2                                # several buckets, each a ring of 2
    assert sum(s.bytes for s in reduce1) == pytest.approx(sum(s.bytes for s in reduce0))
    assert min(s.start_s for s in reduce1) < last_bwd                      # the first starts inside the backward
    assert split.trace.step_times()[1] < whole.trace.step_times()[1]


def test_an_op_beside_a_collective_runs_on_the_sms_it_leaves():
    """NCCL takes one SM per channel (24 on one node): an op of t seconds that runs wholly
    beside a collective on an H100 (132 SMs) takes t x 132 / 108; one whose collective ends
    at t/2 has done (t/2)(108/132) of its work by then and does the rest at full speed."""
    from clustersim.core import nccl
    from clustersim.core.topogen import load_topology
    topo = load_topology("dgx-h100")
    env = simpy.Environment()
    comp = Compute(env, topo, "fp16")
    share = nccl.sm_share(1, 8, 132)
    assert share == pytest.approx(24 / 132)
    t = comp.seconds("m0.gpu0", 1e12, 0)
    ends = {}
    release = comp.hold(["m0.gpu0", "m0.gpu1"], share)
    comp.run("m0.gpu0", 1e12, 0).callbacks.append(lambda _e: ends.setdefault("whole", env.now))

    def later():
        yield env.timeout(t / 2)
        release()
    env.process(later())
    env.run()
    # released at t/2: the op had done (t/2)(108/132) of its t; the rest at full speed
    assert ends["whole"] == pytest.approx(t / 2 + (t - t / 2 * 108 / 132), rel=1e-12)
    env = simpy.Environment()
    comp = Compute(env, topo, "fp16")
    comp.hold(["m0.gpu0"], share)
    comp.run("m0.gpu0", 1e12, 0).callbacks.append(lambda _e: ends.setdefault("beside", env.now))
    env.run()
    assert ends["beside"] == pytest.approx(t * 132 / 108, rel=1e-12)


def test_time_and_cost_to_train_follow_from_throughput_price_and_power():
    """epoch = samples / throughput; cost = hours x machines used x list price; energy =
    hours x machines x machine power (dgx-h100: AWS p5.48xlarge's $98.32/h, 10.2 kW)."""
    from clustersim.core.metrics import summarize
    p = plan(scenario(batch=64, parallel={"replicas": 8},
                      training={"dataset_samples": 1_000_000, "epochs": 3, "target_hours": 1e-9, "steps": 2}))
    s = summarize(p, simulate(p))
    epoch = 1_000_000 / s["samples_per_s"]
    assert s["epoch_time_s"] == pytest.approx(epoch) and s["time_to_train_s"] == pytest.approx(3 * epoch)
    assert s["machines_used"] == 1
    assert s["cost_usd"] == pytest.approx(3 * epoch / 3600 * 98.32)
    assert s["energy_kwh"] == pytest.approx(3 * epoch / 3600 * 10.2)
    assert s["meets_target"] is False
    from clustersim.report import summary_text
    assert f"${s['cost_usd']:,.2f} on 1 machine(s)" in summary_text(s)      # cents: a $0.02 job read "$0"


def test_the_one_device_baseline_has_no_pipeline_and_no_grid():
    """The speedup baseline of a pipelined or blocked run is the model on one device."""
    from sim.baseline import one_device_step_time
    flat = plan(scenario(batch=32))
    piped = plan(scenario(batch=32, parallel={"model_parallel": 2, "pipeline": 2}))
    assert one_device_step_time(piped) == pytest.approx(one_device_step_time(flat), rel=1e-12)


@pytest.mark.parametrize("algorithm, sync, words", [("sync", "ps", "sync by ps"), ("downpour", "ps", "downpour via ps"),
                                                    ("local", "allreduce", "local via allreduce"),
                                                    ("layerwise", "none", "layerwise")])
def test_the_summary_header_names_the_algorithm(algorithm, sync, words):
    """U39: every parameter-server algorithm's header read "sync by ps", layerwise's "sync by none"."""
    from clustersim.report import _exchange
    assert _exchange({"algorithm": algorithm, "sync": sync}) == words
