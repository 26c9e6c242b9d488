"""Asynchronous algorithms, stragglers and failures: each test can fail."""
import dataclasses
import math
import statistics
from pathlib import Path

import numpy as np
import pytest

from clustersim.compare.cosim import cosimulate
from executor.data import Batches, digits
from executor.nn import Net
from executor.optim import SGD, Adam
from sim.compute import op_seconds
from sim.engine import simulate
from clustersim.core.metrics import summarize
from clustersim.core.plan import PARAM_BYTES, cost_key, plan
from sim.kernel_model import op_work
from clustersim.core.config import ConfigError
from clustersim.core.scenario import Failure
from clustersim.core.topogen import build_topology
from helpers import gpu, link, nccl_ring_seconds, scenario


def fast_star(n, gbps=1e6, lat_us=0.0):
    """n worker GPUs and one spare GPU (where the shard goes) on a switch: no network to speak of."""
    devs = [gpu(f"w{i}", machine=i) for i in range(n)] + [gpu("ps", machine=n), {"name": "sw", "kind": "switch"}]
    links = [link(f"w{i}", "sw", gbps, lat_us) for i in range(n)] + [link("ps", "sw", gbps, lat_us)]
    return build_topology({"name": "star", "device": devs, "link": links}, "star.toml")


def on(topo, **sections):
    return dataclasses.replace(scenario(batch=64, **sections), topology=topo)


@pytest.mark.parametrize("replicas", [2, 3, 5])
def test_identical_replicas_one_shard_no_network_staleness_is_r_minus_1(replicas):
    sc = on(fast_star(replicas), parallel={"replicas": replicas, "ps_shards": 1},
            training={"algorithm": "downpour", "steps": 40})
    p = plan(sc)
    assert p.ps.devices == ("ps",)
    st = simulate(p).trace.staleness
    steady = st[5 * replicas:]
    assert steady and set(steady) == {replicas - 1}


def test_failed_downpour_replica_leaves_the_others_rate_unchanged():
    base = dict(parallel={"replicas": 4, "ps_shards": 1}, training={"algorithm": "downpour", "steps": 60})
    healthy = simulate(plan(on(fast_star(4), **base)))
    t_fail = healthy.sim_time_s / 3
    sc = on(fast_star(4), **base)
    sc = dataclasses.replace(sc, faults=dataclasses.replace(sc.faults, failures=(Failure(t_fail, ("w3",)),)))
    failed = simulate(plan(sc))

    def step_ends(res, r):
        return [end for rr, _, _, end in res.trace.replica_steps if rr == r]
    for r in range(3):      # the survivors do the same steps at the same times
        assert step_ends(failed, r) == pytest.approx(step_ends(healthy, r), rel=1e-9)
    assert len(step_ends(failed, 3)) < 30 and failed.engine.failed == {"w3": pytest.approx(t_fail)}


@pytest.mark.parametrize("algorithm", ["downpour", "dcasgd", "ssp"])
def test_an_async_replicas_unpushed_steps_train_nothing_and_a_failure_loses_them(algorithm):
    """U35: a failed replica's steps since its last push (n_push = 4 here) and the step it
    was in counted in ``samples_per_s`` and in no lost work; a run's tail past its last push
    counted too.  Now only pushed steps count, and a failure loses the rest."""
    base = dict(parallel={"replicas": 4, "ps_shards": 1},
                training={"algorithm": algorithm, "steps": 30, "n_push": 4, "start_spread_s": 0.0})
    healthy_p = plan(on(fast_star(4), **base))
    healthy = simulate(healthy_p)
    out = summarize(healthy_p, healthy)
    assert "lost_work_samples" not in out
    batch = healthy_p.scenario.batch_size
    assert out["samples_per_s"] == pytest.approx(batch * 4 * 28 / healthy.sim_time_s)   # steps 28, 29: never pushed
    t_fail = healthy.sim_time_s / 2 + 1e-9
    sc = on(fast_star(4), **base)
    sc = dataclasses.replace(sc, faults=dataclasses.replace(sc.faults, failures=(Failure(t_fail, ("w3",)),)))
    p = plan(sc)
    failed = simulate(p)
    out = summarize(p, failed)
    ran = sorted(step for r, step, *_ in failed.trace.replica_steps if r == 3)
    began = sum(u.kind == "grad" and u.replica == 3 for u in failed.trace.updates)
    pushed = 4 * (len(ran) // 4)
    assert began - len(ran) in (0, 1) and len(ran) % 4            # maybe inside a step; pushes outstanding
    assert out["lost_work_samples"] == batch * (began - pushed)
    others = sum(1 for r, step, *_ in failed.trace.replica_steps if r < 3 and step < 28)
    assert out["samples_per_s"] == pytest.approx(batch * (others + pushed) / failed.sim_time_s)


def test_sync_step_is_the_slowest_workers_and_backup_workers_cut_it():
    sc = scenario(batch=256, parallel={"replicas": 4}, training={"steps": 2, "allreduce": "ring"},
                  faults={"slowdown": {"m0.gpu2": 3.0}})
    p = plan(sc)
    topo, params = sc.topology, sc.model.params
    chain = sum(op_seconds(topo, "m0.gpu2", op.flops, op.bytes, "fp32", op.kind == "bwd", cost_key(p, op), op_work(p, op))
                for op in p.ops if op.kind != "xfer")
    ring = nccl_ring_seconds(4, params * PARAM_BYTES)
    update = op_seconds(topo, "m0.gpu2", 2 * params, 3 * params * PARAM_BYTES, "fp32")
    assert simulate(p).trace.step_times() == pytest.approx([3 * chain + ring + 3 * update] * 2, rel=1e-9)

    ps = dict(parallel={"replicas": 4, "ps_shards": 2}, training={"steps": 4}, faults={"slowdown": {"m0.gpu2": 3.0}})
    without = simulate(plan(scenario(batch=256, **ps))).trace.step_times()
    with_backup = simulate(plan(scenario(batch=256, **{**ps, "training": {"steps": 4, "backup_workers": 1}})))
    assert max(with_backup.trace.step_times()) < 0.6 * min(without)


def test_sandblaster_backup_tasks_shorten_a_batch_with_a_slow_replica():
    common = dict(parallel={"replicas": 4, "ps_shards": 1}, faults={"slowdown": {"m0.gpu3": 8.0}})
    times = {}
    for backups in (True, False):
        sc = scenario(batch=256, training={"algorithm": "sandblaster", "steps": 2, "work_units": 16,
                                           "backup_tasks": backups}, **common)
        times[backups] = simulate(plan(sc)).trace.step_times()
    assert max(times[True]) < 0.9 * min(times[False])


def test_sandblaster_gives_units_to_each_replica_as_soon_as_it_has_the_parameters():
    """On distbelief-2012 a machine 50x slow held its backup copy past the batch's end, its
    fetch came late, and every replica waited for it before any unit was handed out: backup
    tasks made batches slower (6.86 ms against 5.66 without; a new-user sweep)."""
    from clustersim import api
    times = {bt: api.simulate(Path(__file__).resolve().parents[1] / "scenarios" / "sandblaster.toml",
                              {"training.backup_tasks": bt, "faults.slowdown": {"m3.cpu": 50.0}, "training.steps": 4},
                              speedup=False).data["step_time_s"] for bt in (True, False)}
    assert times[True] < times[False]


def test_sandblaster_reassigns_the_units_of_a_failed_replica():
    sc = scenario(batch=256, parallel={"replicas": 4, "ps_shards": 1},
                  training={"algorithm": "sandblaster", "steps": 3, "work_units": 16, "backup_tasks": False},
                  faults={"fail": [{"device": "m0.gpu1", "at_s": 1e-5}], "detect_timeout_s": 1e-4})
    res = simulate(plan(sc))
    won = [u for u in res.trace.updates if u.kind == "won"]
    assert len(res.trace.step_ends) == 3 and len(won) == 3 * 16
    assert {u.info["unit"] for u in won if u.step == 0} == set(range(16))
    requeued = len([u for u in res.trace.updates if u.kind == "unit"]) - 3 * 16     # handed out twice
    p = plan(sc)
    assert requeued >= 1 and summarize(p, res)["lost_work_samples"] == requeued * p.schedule.unit_size


def test_sandblaster_whose_every_replica_failed_stalls_at_the_last_detection():
    """Every replica dead mid-batch: the coordinator re-queues their units once it knows
    (the last failure + the detection timeout) and then has no one to give them to: a
    stall there.  Its detection timer was re-armed while any busy replica was dead, so
    the run went on forever (U49: simulated time past 2e6 s)."""
    fails = [{"device": f"m0.gpu{i}", "at_s": t} for i, t in ((0, 1e-5), (1, 2e-5), (2, 3e-5), (3, 4e-5))]
    sc = scenario(batch=256, parallel={"replicas": 4, "ps_shards": 1},
                  training={"algorithm": "sandblaster", "steps": 3, "work_units": 16, "backup_tasks": False},
                  faults={"fail": fails, "detect_timeout_s": 1e-4})
    res = simulate(plan(sc))
    assert res.stalled_at_s == pytest.approx(4e-5 + 1e-4, rel=1e-12)
    assert not res.trace.step_ends


@pytest.mark.parametrize("algorithm", ["downpour", "dcasgd", "ssp"])
def test_an_async_job_whose_replicas_all_failed_stalls_while_its_shards_restart(algorithm):
    """The only replica dead, shards that restart from checkpoints kept failing and
    restarting (each restart draws its next failure), so the run never ended (U49).  Once
    every replica has stopped, failures stop: the stall comes when the restarts under way
    are done, at most one restart after the replica's failure."""
    import clustersim
    sc = clustersim.load(Path(__file__).resolve().parents[1] / "scenarios" / "downpour.toml",
                         {"training.algorithm": algorithm, "parallel.replicas": 1, "parallel.ps_shards": 4,
                          "faults.mtbf_s": 0.001, "faults.shard_recovery": "checkpoint"})
    res = simulate(plan(sc))
    died = res.engine.failed["m0.cpu"]
    assert res.stalled_at_s is not None and not res.trace.replica_steps
    assert died < res.stalled_at_s <= died + sc.faults.restart_s + 1.0      # + reading a checkpoint


def test_a_diverging_co_simulation_says_so_in_valid_json_without_warnings():
    """DC-ASGD at learning rate 100 overflows: the summary printed NaN (no JSON parser
    takes it) and numpy's RuntimeWarnings (U49).  Now: null losses from the first
    evaluation with none finite, ``diverged_at_s`` there, and a note."""
    import json
    import warnings
    from clustersim import api
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = api.simulate(Path(__file__).resolve().parents[1] / "scenarios" / "dcasgd.toml",
                           {"training.learning_rate": 100.0}, speedup=False)
    s = res.data
    json.dumps(s, allow_nan=False)
    first = next(t for t, _, loss in s["accuracy_curve"] if loss is None)
    assert s["diverged_at_s"] == first and s["loss"] is None
    assert all(loss is None for t, _, loss in s["accuracy_curve"] if t >= first)
    assert any("diverged" in n for n in s["notes"])
    calm = api.simulate(Path(__file__).resolve().parents[1] / "scenarios" / "dcasgd.toml", speedup=False).data
    assert "diverged_at_s" not in calm and math.isfinite(calm["loss"])


def reference_sgd(sc, steps, rule=None):
    """Plain SGD (or ``rule``) on one replica's batch stream, outside the simulator."""
    net, d = Net(sc.model), digits(sc.seed)
    w = net.init(np.random.default_rng(sc.seed))
    rule = rule(w) if rule else SGD(sc.training.learning_rate)
    batches = Batches(d.x_train[0::1], d.y_train[0::1], sc.batch_size, np.random.default_rng([sc.seed, 0]))
    for _ in range(steps):
        x, y = batches.next()
        rule.step(w, net.loss_and_grad(w, x, y)[1])
    return net, d, w


@pytest.mark.parametrize("algorithm, ps", [("downpour", 1), ("downpour", 3), ("sync", 0), ("ssp", 2)])
def test_cosimulation_of_one_replica_equals_plain_sgd_exactly(algorithm, ps):
    sc = scenario(batch=32, parallel={"replicas": 1, "ps_shards": ps},
                  training={"algorithm": algorithm, "steps": 25, "cosim": True, "learning_rate": 0.2})
    p = plan(sc)
    out = cosimulate(p, simulate(p))
    net, d, w = reference_sgd(sc, 25)
    acc, loss = net.evaluate(w, d.x_test, d.y_test)
    assert out["accuracy"] == acc and out["loss"] == loss


def test_cosimulation_of_sync_adam_on_one_replica_equals_plain_adam_exactly():
    """Co-simulation stepped sync's server by SGD whatever training.optimizer said."""
    sc = scenario(batch=32, training={"steps": 25, "cosim": True, "learning_rate": 0.01, "optimizer": "adam"})
    p = plan(sc)
    out = cosimulate(p, simulate(p))
    net, d, w = reference_sgd(sc, 25, lambda w0: Adam(0.01, w0))
    assert (out["accuracy"], out["loss"]) == net.evaluate(w, d.x_test, d.y_test)


def test_same_seed_same_trace_and_another_seed_differs():
    def run(seed):
        sc = scenario(batch=64, parallel={"replicas": 4, "ps_shards": 2},
                      training={"algorithm": "downpour", "steps": 15}, faults={"slowdown_sigma": 0.5, "mtbf_s": 0.001})
        return simulate(plan(dataclasses.replace(sc, seed=seed)))
    a, b, c = run(1), run(1), run(2)
    assert a.trace.spans == b.trace.spans and a.trace.updates == b.trace.updates
    assert a.trace.spans != c.trace.spans


@pytest.mark.parametrize("k", [1, 5, 10, 100, 1000])
def test_local_sgd_averages_every_k_steps(k):
    steps = 20
    sc = scenario(batch=32, parallel={"replicas": 3}, training={"algorithm": "local", "steps": steps,
                                                                "local_steps": k, "cosim": True, "eval_points": 2})
    p = plan(sc)
    res = simulate(p)
    assert sum(u.kind == "average" for u in res.trace.updates) == math.ceil(steps / k)
    assert sum(u.kind == "local" for u in res.trace.updates) == 3 * steps
    assert 0.0 <= cosimulate(p, res)["accuracy"] <= 1.0


def test_ssp_never_runs_more_than_s_steps_ahead():
    s = 2
    sc = scenario(batch=64, parallel={"replicas": 3, "ps_shards": 1},
                  training={"algorithm": "ssp", "steps": 30, "staleness": s}, faults={"slowdown": {"m0.gpu0": 4.0}})
    res = simulate(plan(sc))
    def max_lead(res):
        """Largest (step begun) - (steps the slow replica 0 had finished) over all step starts."""
        ends0 = [end for r, _, _, end in res.trace.replica_steps if r == 0]
        return max(u.step - sum(1 for e in ends0 if e <= u.t) for u in res.trace.updates if u.kind == "grad")
    assert max_lead(res) == s
    free = simulate(plan(dataclasses.replace(sc, training=dataclasses.replace(sc.training, algorithm="downpour"))))
    assert max_lead(free) > 3 * s      # without the bound the fast replicas do run ahead


def test_ssp_at_staleness_0_reads_every_update_of_the_step_before():
    """Ho et al. 2013: at clock c a replica sees every update of clocks <= c - s - 1; s = 0 is
    bulk-synchronous, so an apply misses at most the other replicas' pushes of its own clock.
    A waiting replica was let go when the slow one finished computing, before its push was
    applied: applies then missed up to 14 versions with 8 replicas (a new-user sweep)."""
    from clustersim import api
    over = {"training.algorithm": "ssp", "training.staleness": 0, "faults.slowdown": {"m0.cpu": 20.0},
            "training.steps": 20, "training.cosim": False, "training.time_limit_s": 0}
    res = api.simulate(Path(__file__).resolve().parents[1] / "scenarios" / "downpour.toml", over, speedup=False)
    replicas, shards = res.plan.replicas, len(res.plan.ps.devices)
    assert len(res.trace.staleness) == replicas * 20 * shards and max(res.trace.staleness) == replicas - 1


@pytest.mark.parametrize("algorithm, backups", [("downpour", 0), ("sync", 0), ("sync", 1)])
def test_eight_bit_messages_carry_a_quarter_of_the_bytes_and_a_header(algorithm, backups):
    def phase_bytes(bits, phase):
        sc = scenario(batch=64, parallel={"replicas": 3, "ps_shards": 1},
                      training={"algorithm": algorithm, "steps": 4, "comm_bits": bits, "backup_workers": backups})
        res = simulate(plan(sc))
        return sum(s.bytes for s in res.trace.spans if s.phase == phase), res
    for phase in ("push", "fetch"):
        b32, _ = phase_bytes(32, phase)
        b8, res8 = phase_bytes(8, phase)
        messages = sum(1 for s in res8.trace.spans if s.phase == phase and s.bytes)
        assert b32 > 0 and b8 == pytest.approx(b32 / 4 + 8 * messages)     # a code a value + min and step
    names = [s.name for s in res8.trace.spans]
    assert "quantise" in names and "dequantise" in names


@pytest.mark.parametrize("training", [{"algorithm": "sync"}, {"algorithm": "local"}])
def test_eight_bit_messages_without_a_parameter_server_are_refused(training):
    with pytest.raises(ConfigError, match="training.comm_bits"):
        scenario(parallel={"replicas": 2}, training={**training, "comm_bits": 8})


def test_dcasgd_keeps_a_copy_per_worker_on_the_shard():
    def shard_bytes(alg, adaptive=False):
        sc = scenario(batch=64, parallel={"replicas": 4, "ps_shards": 1},
                      training={"algorithm": alg, "steps": 2, "dcasgd_adaptive": adaptive})
        p = plan(sc)
        return p.memory[p.ps.devices[0]]["ps_shards"], sc.model.params * PARAM_BYTES
    down, size = shard_bytes("downpour")
    assert shard_bytes("dcasgd")[0] - down == 4 * size
    assert shard_bytes("dcasgd", True)[0] - down == 5 * size


def test_sync_restart_loses_the_steps_since_the_checkpoint():
    sc = scenario(batch=64, parallel={"replicas": 4}, training={"steps": 6, "cosim": True},
                  faults={"fail": [{"device": "m0.gpu2", "at_s": 1e-4}], "detect_timeout_s": 1e-3,
                          "on_failure": "restart", "checkpoint_every": 2, "restart_s": 0.01})
    p = plan(sc)
    res = simulate(p)
    summary = summarize(p, res)
    [restore] = [u for u in res.trace.updates if u.kind == "restore"]
    done = sum(1 for t in res.trace.step_ends if t < restore.t)      # steps finished before the restart
    redo = done - restore.step                                       # finished since the checkpoint
    assert summary["lost_work_samples"] == (redo + 1) * 64 * 4       # ... plus the broken step
    assert sum(u.kind == "apply" for u in res.trace.updates) == 6 + redo
    assert len(res.trace.step_ends) == 6 + redo and res.engine.failed == {}
    assert summary["failed_devices"] == ["m0.gpu2"]                 # replaced by the restart, still reported
    assert 0.0 <= cosimulate(p, res)["accuracy"] <= 1.0


def test_a_failed_link_reroutes_and_a_cut_link_fails_the_transfers():
    devs = [gpu("a", machine=0), gpu("b", machine=1), {"name": "s1", "kind": "switch"}, {"name": "s2", "kind": "switch"}]
    two_paths = build_topology({"name": "two", "device": devs, "link": [
        link("a", "s1", 10, 1), link("s1", "b", 10, 1), link("a", "s2", 5, 1), link("s2", "b", 5, 1)]}, "two.toml")
    sc = dataclasses.replace(scenario(batch=64, parallel={"replicas": 2}, training={"steps": 3},
                                      faults={}), topology=two_paths)
    healthy = simulate(plan(sc))
    broken = dataclasses.replace(sc, faults=dataclasses.replace(sc.faults, failures=(Failure(0.0, (), ("a", "s1")),)))
    res = simulate(plan(broken))
    assert len(res.trace.step_ends) == 3 and res.sim_time_s > healthy.sim_time_s       # slower path, still there
    assert all("a>s1" not in s.links for s in res.trace.spans if s.kind == "transfer")
    one_path = build_topology({"name": "one", "device": devs[:3], "link": [link("a", "s1", 10, 1), link("s1", "b", 10, 1)]},
                              "one.toml")
    cut = dataclasses.replace(broken, topology=one_path)
    res = simulate(plan(cut))
    assert res.engine.failed_transfers > 0 and not res.trace.step_ends
    assert res.stalled_at_s is not None and "a link cut" in res.stalled_reason


def test_eight_bit_sync_through_shards_trains_on_quantised_values():
    def cosim(bits):
        sc = scenario(batch=32, parallel={"replicas": 2, "ps_shards": 1},
                      training={"algorithm": "sync", "steps": 40, "comm_bits": bits, "learning_rate": 0.3})
        p = plan(sc)
        return cosimulate(p, simulate(p))["loss"]
    l32, l8 = cosim(32), cosim(8)
    assert l8 != l32 and abs(l8 - l32) < 0.1 * l32          # quantised, and still the same training


def test_co_simulated_eight_bit_values_are_the_executors_messages_shard_by_shard():
    """The executor sends one 8-bit message a shard, each with its own minimum and step
    (psrank.encode); the co-simulation quantised the whole vector with one (decision 052)."""
    from clustersim.compare.cosim import Replay
    from executor.psrank import decode, encode
    sc = scenario(batch=32, parallel={"replicas": 2, "ps_shards": 2},
                  training={"algorithm": "sync", "steps": 2, "comm_bits": 8})
    replay = Replay(plan(sc))
    x = np.random.default_rng(0).normal(size=replay.net.size) * np.linspace(0.1, 10.0, replay.net.size)
    want = np.concatenate([decode(encode(x[lo:hi], 8), 8) for lo, hi in replay.ranges])
    assert len(replay.ranges) == 2
    assert np.allclose(replay._q(x), want, rtol=1e-5, atol=1e-5 * np.abs(x).max())


def test_async_replicas_start_spread_within_a_parameter_round_trip():
    from sim.algorithms.downpour import start_offsets
    from sim.engine import Engine
    sc = scenario(topology="distbelief-2012", batch=32, parallel={"replicas": 6, "ps_shards": 1},
                  training={"algorithm": "downpour", "steps": 3})
    p = plan(sc)
    topo = sc.topology
    round_trip = 2 * sc.model.params * PARAM_BYTES / topo.route_bandwidth(topo.route(p.devices[0][0], p.ps.devices[0]))
    offsets = start_offsets(Engine(p))
    assert offsets[0] == 0.0 and all(0.0 < t < round_trip for t in offsets[1:])
    assert offsets == start_offsets(Engine(p))                          # seeded
    first = sorted(start for r, step, start, _ in simulate(p).trace.replica_steps if step == 0)
    assert first == pytest.approx(sorted(offsets))
    lockstep = dataclasses.replace(sc, training=dataclasses.replace(sc.training, start_spread_s=0.0))
    assert start_offsets(Engine(plan(lockstep))) == [0.0] * 6


@pytest.mark.parametrize("n_push", [1, 3])
def test_a_replica_that_fetches_rarely_has_one_push_in_flight(n_push):
    """Pushes over a slow link take ~20x a step's compute: with fetches only at the start the
    replica waits for each push's bytes to arrive (as the executor's send does), so its pushes
    never overlap and each step after a push starts when that push has arrived -- the step
    period is compute plus the push in closed form.  Without the wait, pushes piled up."""
    sc = on(fast_star(1, gbps=0.2), parallel={"replicas": 1, "ps_shards": 1},
            training={"algorithm": "downpour", "steps": 12, "n_fetch": 1000, "n_push": n_push,
                      "start_spread_s": 0.0})
    p = plan(sc)
    res = simulate(p)
    pushes = sorted((s.start_s, s.end_s) for s in res.trace.spans if s.phase == "push" and s.kind == "transfer")
    assert len(pushes) == 12 // n_push
    assert all(b[0] >= a[1] for a, b in zip(pushes, pushes[1:]))
    steps = sorted(res.trace.replica_steps, key=lambda s: s[1])
    topo = sc.topology
    push_s = sc.model.params * PARAM_BYTES / topo.route_bandwidth(topo.route("w0", "ps"))
    compute = steps[1][3] - steps[1][2]
    assert push_s > 10 * compute
    for (_, step, _, end), (_, _, start, _) in zip(steps, steps[1:]):
        if (step + 1) % n_push == 0:
            assert start == pytest.approx(end + push_s, rel=1e-6)
        else:
            assert start == pytest.approx(end, abs=1e-12)


@pytest.mark.parametrize("bits", [32, 8])
def test_a_push_holds_its_replica_until_its_bytes_arrive_not_until_the_shard_decodes(bits):
    """Eight replicas on one shard, fetching rarely: each "push sent" wait ends when that
    push's transfer ends -- with 8-bit messages too, whose dequantise runs on the shard
    behind its queued applies (R49: the replica was held up to ~2.5 applies longer)."""
    sc = on(fast_star(8), parallel={"replicas": 8, "ps_shards": 1},
            training={"algorithm": "downpour", "steps": 30, "n_fetch": 1000, "comm_bits": bits})
    res = simulate(plan(sc))
    arrived = {(s.replica, s.step): s.end_s for s in res.trace.spans if s.phase == "push" and s.kind == "transfer"}
    waits = [s for s in res.trace.spans if s.name == "push sent"]
    assert waits and all(s.end_s == arrived[(s.replica, s.step)] for s in waits)


@pytest.mark.parametrize("bits", [32, 8])
def test_a_push_whose_shard_failed_in_flight_is_not_sent_until_the_retry_arrives(bits):
    """A shard fails while pushes to it are on the wire (they still land: a message in
    flight arrives); it restarts from its checkpoint and the replicas send again.  No push
    counts as sent while the shard is down (R50: the 8-bit form released seven replicas
    then, and a replica had two pushes in flight after the retry)."""
    from clustersim import api
    o = {"training.n_fetch": 4, "training.cosim": False, "training.time_limit_s": 0.02, "training.comm_bits": bits,
         "faults.fail": [{"device": "m8.cpu", "at_s": 0.001988}], "faults.shard_recovery": "checkpoint",
         "faults.restart_s": 0.001}
    res = api.simulate(Path(__file__).resolve().parents[1] / "scenarios" / "downpour.toml", o, speedup=False)
    back = min(u.t for u in res.trace.updates if u.kind == "restore")
    sent = [s for s in res.trace.spans if s.name == "push sent"]
    assert sent and not [s for s in sent if 0.001988 < s.end_s < back]


def test_a_negative_start_spread_other_than_auto_is_refused():
    with pytest.raises(ConfigError, match="training.start_spread_s"):
        scenario(parallel={"replicas": 2, "ps_shards": 1}, training={"algorithm": "downpour", "start_spread_s": -0.5})


def test_local_sgd_step_time_holds_the_averaging_wait():
    sc = scenario(topology="distbelief-2012", batch=32, parallel={"replicas": 4},
                  training={"algorithm": "local", "steps": 20, "local_steps": 5})
    p = plan(sc)
    res = simulate(p)
    summary = summarize(p, res)
    averages = [s for s in res.trace.spans if s.name == "average" and s.kind == "transfer"]
    assert averages                                          # four rounds of allreduce over 1 GbE
    assert summary["step_time_s"] == pytest.approx(res.sim_time_s / 20, rel=1e-9)   # every replica ends averaged
    assert summary["samples_per_s"] == pytest.approx(4 * 32 / summary["step_time_s"])
    compute_only = statistics.median(e - s for _, step, s, e in res.trace.replica_steps if (step + 1) % 5)
    assert summary["step_time_s"] > 2 * compute_only


def test_push_early_sends_each_layer_as_its_backward_ends():
    """Sync with a shard: with push_early the last layer's gradients leave while the earlier
    layers' backward still runs; the bytes pushed are the same, and the step no longer."""
    def run(early):
        sc = scenario(model="alexnet", batch=32, parallel={"replicas": 2, "ps_shards": 1},
                      training={"steps": 1, "push_early": early})
        return simulate(plan(sc))
    late, early = run(False), run(True)

    def pushes(res):
        return [s for s in res.trace.spans if s.phase == "push"]
    last_bwd = max(s.end_s for s in early.trace.spans if s.phase == "bwd" and s.replica == 0)
    assert min(s.start_s for s in pushes(early) if s.replica == 0) < last_bwd
    assert min(s.start_s for s in pushes(late) if s.replica == 0) >= max(
        s.end_s for s in late.trace.spans if s.phase == "bwd" and s.replica == 0)
    assert sum(s.bytes for s in pushes(early)) == pytest.approx(sum(s.bytes for s in pushes(late)))
    assert len(pushes(early)) > len(pushes(late))
    assert early.sim_time_s <= late.sim_time_s


def test_push_early_is_refused_outside_sync_with_shards():
    with pytest.raises(ConfigError, match="push_early"):
        scenario(parallel={"replicas": 2}, training={"push_early": True})


def test_a_late_backup_replica_computes_one_step_at_a_time():
    """Backup workers: a replica three times slower is late every step; it starts its next
    step only when its last one's graph is done, even where that graph was still waiting
    to start when the shards applied (its steps' compute spans do not interleave)."""
    sc = scenario(batch=256, parallel={"replicas": 4, "ps_shards": 2},
                  training={"steps": 12, "backup_workers": 1}, faults={"slowdown": {"m0.gpu2": 3.0}})
    res = simulate(plan(sc))
    by_step: dict[int, list] = {}
    for s in res.trace.spans:
        if s.where == "m0.gpu2" and s.kind == "compute":
            by_step.setdefault(s.step, []).append(s)
    assert len(by_step) >= 3
    steps = sorted(by_step)
    for a, b in zip(steps, steps[1:]):
        assert max(s.end_s for s in by_step[a]) <= min(s.start_s for s in by_step[b])


@pytest.mark.parametrize("slow", [60.0, 100.0])
def test_a_late_backup_replica_keeps_computing_to_the_end(slow):
    """Review R38: a late replica's process for a step read ``free`` after its previous graph
    was done; where this step's apply had set it by then, it held this step's own event and
    waited on itself for good: at 60x the replica computed steps 0-3 of 40, then nothing.
    It must still be computing in the last third of the run."""
    from clustersim import api
    over = {"training.algorithm": "sync", "training.cosim": False, "training.time_limit_s": 0, "training.steps": 40,
            "parallel.replicas": 4, "parallel.ps_shards": 1, "training.backup_workers": 1,
            "faults.slowdown": {"m3.cpu": slow}}
    res = api.simulate("scenarios/downpour.toml", over, speedup=False)
    starts = [s.start_s for s in res.trace.spans if s.where == "m3.cpu" and s.kind == "compute"]
    assert len(res.trace.step_ends) == 40 and max(starts) > 2 / 3 * res.sim_time_s


def test_a_late_backup_replica_skips_the_steps_that_passed_it():
    """U39: a replica 200 times slower, with a backup worker, was given every step and
    computed them one after another, so the run lasted until that backlog was done (0.47 s
    for 73 ms of steps, a wait fraction of 17). Now a step that is over by the time the
    replica is free is skipped (its gradient would be dropped, Chen et al. 2016): the run
    ends with its last step, and each step it computes began while that step was current
    (here 4 of 20: 0, 4, 8 and 13; all 20 one after another before)."""
    sc = scenario(batch=256, parallel={"replicas": 4, "ps_shards": 2},
                  training={"steps": 20, "backup_workers": 1}, faults={"slowdown": {"m0.gpu2": 5.0}})
    p = plan(sc)
    res = simulate(p)
    ends = res.trace.step_ends
    assert len(ends) == 20 and res.sim_time_s == ends[-1] and res.stalled_at_s is None
    begun: dict[int, float] = {}
    for s in res.trace.spans:
        if s.where == "m0.gpu2" and s.kind == "compute":
            begun[s.step] = min(begun.get(s.step, s.start_s), s.start_s)
    chain = sum(s.duration_s for s in res.trace.spans if s.where == "m0.gpu2" and s.kind == "compute"
                and s.step == min(begun))                               # one step's graph, 5x
    assert 2 <= len(begun) <= 1 + res.sim_time_s / chain
    for step, start in begun.items():
        assert start < ends[step]                                       # current when it began
    summary = summarize(p, res)
    assert all(0 <= f <= 1 for f in summary.get("replica_wait_fraction", {}).values())


def test_a_sandblaster_replica_computes_one_unit_at_a_time():
    """Backup tasks: a replica eight times slower still runs a backup copy when its batch is
    done; it takes a unit of the next batch only once that copy ends (on each GPU one
    batch's compute ends before the next batch's starts)."""
    sc = scenario(batch=256, training={"algorithm": "sandblaster", "steps": 3, "work_units": 16,
                                       "backup_tasks": True},
                  parallel={"replicas": 4, "ps_shards": 1}, faults={"slowdown": {"m0.gpu3": 8.0}})
    res = simulate(plan(sc))
    by_batch: dict[str, dict[int, list]] = {}
    for s in res.trace.spans:
        if s.kind == "compute" and s.replica >= 0:
            by_batch.setdefault(s.where, {}).setdefault(s.step, []).append(s)
    assert len(by_batch["m0.gpu3"]) >= 2
    for where, batches in by_batch.items():
        steps = sorted(batches)
        for a, b in zip(steps, steps[1:]):
            assert max(s.end_s for s in batches[a]) <= min(s.start_s for s in batches[b]), where
