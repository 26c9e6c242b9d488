"""Failures fail loudly: a run that cannot go on is a stall (time, reason, exit 3), never
throughput; the speedup baseline is the healthy job; a sweep keeps going past bad points."""
import dataclasses
import json
import statistics

import pytest

from clustersim.cli import main
from clustersim.core.config import ConfigError
from clustersim.core.metrics import summarize
from clustersim.core.plan import plan
from clustersim.core.scenario import Failure, scenario_from_dict
from clustersim.core.schedule import checkpoint_bytes
from sim.baseline import one_device_step_time
from sim.engine import simulate
from helpers import scenario

DOWNPOUR = "scenarios/downpour.toml"


def with_failure(sc, *failures):
    return dataclasses.replace(sc, faults=dataclasses.replace(sc.faults, failures=tuple(failures)))


def downpour(replicas=4, steps=30):
    return scenario(batch=32, parallel={"replicas": replicas, "ps_shards": 1},
                    training={"algorithm": "downpour", "steps": steps})


def test_a_failed_shard_stalls_downpour_at_its_last_event():
    sc = downpour()
    p = plan(sc)
    shard = p.ps.devices[0]
    healthy = simulate(p)
    t_fail = healthy.sim_time_s / 3
    res = simulate(plan(with_failure(sc, Failure(t_fail, (shard,)))))
    assert res.stalled_at_s is not None and t_fail <= res.stalled_at_s < healthy.sim_time_s
    assert res.stalled_at_s == res.sim_time_s
    assert f"parameter-server shard 0 on {shard}" in res.stalled_reason
    summary = summarize(p, res, baseline_step_s=1.0)
    assert summary["stalled_at_s"] == res.stalled_at_s
    assert not {"samples_per_s", "step_time_s", "speedup"} & set(summary)


def test_a_failed_worker_does_not_stall_downpour():
    sc = downpour()
    p = plan(sc)
    res = simulate(plan(with_failure(sc, Failure(simulate(p).sim_time_s / 3, (p.devices[3][0],)))))
    assert res.stalled_at_s is None and res.stalled_reason == ""
    assert sum(1 for r, *_ in res.trace.replica_steps if r == 0) == 30      # the others finish their steps


@pytest.mark.parametrize("algorithm", ["downpour", "dcasgd", "ssp"])
def test_every_replica_failed_stalls_the_async_job(algorithm):
    sc = scenario(batch=32, parallel={"replicas": 3, "ps_shards": 1}, training={"algorithm": algorithm, "steps": 30})
    p = plan(sc)
    t_fail = simulate(p).sim_time_s / 3
    workers = [row[0] for row in p.devices]
    res = simulate(plan(with_failure(sc, *(Failure(t_fail, (d,)) for d in workers))))
    assert res.stalled_at_s is not None
    assert all(f"replica {r}'s {d}" in res.stalled_reason for r, d in enumerate(workers))
    assert not {"samples_per_s", "step_time_s"} & set(summarize(p, res))
    # one replica left: it trains on to its end
    res = simulate(plan(with_failure(sc, *(Failure(t_fail, (d,)) for d in workers[1:]))))
    assert res.stalled_at_s is None and sum(1 for r, *_ in res.trace.replica_steps if r == 0) == 30


def test_local_sgd_with_a_failed_replica_stalls_at_the_average():
    sc = scenario(batch=32, parallel={"replicas": 3}, training={"algorithm": "local", "steps": 20, "local_steps": 5})
    p = plan(sc)
    res = simulate(plan(with_failure(sc, Failure(simulate(p).sim_time_s / 2, (p.devices[1][0],)))))
    assert res.stalled_at_s is not None and f"replica 1's {p.devices[1][0]}" in res.stalled_reason


def test_a_run_that_ends_before_its_first_step_is_a_stall_not_a_rate(capsys):
    """U39: every sync replica failed, the restart ran past the time limit, and the run
    ended with no step: it printed 0 s a step and 0 samples/s, exit 0."""
    sc = scenario(batch=32, parallel={"replicas": 2}, training={"steps": 10, "time_limit_s": 0.05},
                  faults={"restart_s": 1.0})
    p = plan(sc)
    res = simulate(plan(with_failure(sc, Failure(1e-6, tuple(row[0] for row in p.devices)))))
    assert res.stalled_at_s == res.sim_time_s > 1.0
    assert res.stalled_reason.startswith("no step finished within training.time_limit_s = 0.05 s (")
    assert not {"samples_per_s", "step_time_s"} & set(summarize(p, res))
    code = main(["simulate", DOWNPOUR, "--json", "--set", "training.algorithm=sync", "--set", "training.cosim=false",
                 "--set", "training.time_limit_s=0.05", "--set", "faults.mtbf_s=0.2"])   # U39's command
    out = json.loads(capsys.readouterr().out)
    assert code == 3 and out["stalled_reason"].startswith("no step finished within training.time_limit_s = 0.05 s (")
    assert out["steps"] == 0 and not {"samples_per_s", "step_time_s", "speedup"} & set(out)


def test_the_speedup_baseline_has_no_faults():
    sc = scenario(batch=64, parallel={"replicas": 2}, training={"steps": 3}, faults={"slowdown": {"m0.gpu0": 4.0}})
    healthy = scenario(batch=64, parallel={"replicas": 2}, training={"steps": 3})
    assert one_device_step_time(plan(sc)) == one_device_step_time(plan(healthy))


def test_simulate_exits_3_with_the_stall_in_its_json(capsys):
    code = main(["simulate", DOWNPOUR, "--json", "--set", "faults.fail=[{machine=8, at_s=0.01}]"])
    out = json.loads(capsys.readouterr().out)
    assert code == 3
    assert out["stalled_at_s"] >= 0.01 and "parameter-server shard 0 on m8.cpu" in out["stalled_reason"]
    assert not {"samples_per_s", "speedup", "step_time_s"} & set(out)


def test_a_sweep_reports_an_infeasible_point_and_goes_on(capsys):
    code = main(["sweep", "scenarios/quickstart.toml", "--json", "--set", "training.steps=2",
                 "--vary", "parallel.replicas=9,2,4"])             # dgx-h100 has 8 GPUs: 9 replicas cannot be placed
    points = json.loads(capsys.readouterr().out)
    assert code == 0 and [p["parallel.replicas"] for p in points] == [9, 2, 4]
    assert "error" in points[0] and "samples_per_s" not in points[0] and "speedup" not in points[0]
    assert points[1]["speedup"] == 1.0                                # against the first feasible point
    assert points[2]["speedup"] == pytest.approx(points[2]["samples_per_s"] / points[1]["samples_per_s"])


def test_a_sweep_whose_every_point_is_bad_is_bad_input(capsys):
    code = main(["sweep", "scenarios/quickstart.toml", "--set", "training.steps=2",
                 "--vary", "parallel.replicas=9,10"])
    assert code == 2 and "parallel" in capsys.readouterr().err


def test_a_sweep_point_that_stalls_is_a_row_with_its_time(capsys):
    code = main(["sweep", DOWNPOUR, "--json", "--set", "training.cosim=false",
                 "--set", "faults.fail=[{machine=8, at_s=0.01}]", "--vary", "training.time_limit_s=0.005,0.05"])
    points = json.loads(capsys.readouterr().out)
    assert code == 0 and "samples_per_s" in points[0]
    assert points[1]["stalled_at_s"] >= 0.01 and points[1]["error"].startswith("stalled: ")


def recovering(every=0, replicas=3, steps=40):
    return scenario(batch=32, parallel={"replicas": replicas, "ps_shards": 1},
                    training={"algorithm": "downpour", "steps": steps, "cosim": True},
                    faults={"shard_recovery": "checkpoint", "shard_checkpoint_every": every, "restart_s": 1e-4,
                            "checkpoint_gbps": 10.0})


@pytest.mark.parametrize("every", [0, 7])
def test_a_failed_shard_restarts_from_its_checkpoint(every):
    from clustersim.compare.cosim import cosimulate
    sc = recovering(every)
    p = plan(sc)
    shard = p.ps.devices[0]
    healthy = simulate(p)
    t_fail = healthy.sim_time_s / 2
    res = simulate(plan(with_failure(sc, Failure(t_fail, (shard,)))))
    assert res.stalled_at_s is None and res.sim_time_s > healthy.sim_time_s + 1e-4     # the restart took its time
    log = res.trace.updates
    [restore] = [u for u in log if u.kind == "restore"]
    saves = [u for u in log if u.kind == "checkpoint" and u.shard == 0 and u.t <= t_fail]
    applied_before = sum(1 for u in log if u.kind == "apply" and u.t <= t_fail)
    assert len(saves) == (applied_before // every if every else 0)       # one every `every` applies
    saved_version = len(saves) * every
    assert all(u.kind != "apply" or u.t <= t_fail or u.t >= restore.t for u in log)   # none while it is down
    assert res.engine.lost_samples == (applied_before - saved_version) * 32   # pushes since the checkpoint
    assert restore.t >= t_fail + 1e-4
    assert sum(1 for r, *_ in res.trace.replica_steps) == 3 * 40          # every replica finishes its steps
    assert 0.5 <= cosimulate(plan(sc), res)["accuracy"] <= 1.0
    assert min(res.trace.staleness) >= 0 and summarize(p, res)["failed_devices"] == [shard]


def test_shard_recovery_is_refused_where_a_shard_cannot_restart_alone():
    with pytest.raises(ConfigError, match="faults.shard_recovery"):
        scenario(parallel={"replicas": 2, "ps_shards": 1}, faults={"shard_recovery": "checkpoint"})


def test_an_async_replica_cut_off_by_a_link_stops_and_the_others_train_on():
    from clustersim import api
    base = {"training.cosim": False, "training.time_limit_s": 0, "training.steps": 20}
    cut = api.simulate(DOWNPOUR, {**base, "faults.fail": [{"link": ["m1.nic0", "switch"], "at_s": 0.001}]}).data
    assert "stalled_at_s" not in cut and cut["failed_transfers"] > 0
    assert cut["steps"] == 20                       # the median replica ends its 20 steps
    # the shard's own link: every replica is cut off, nothing trains on: a stall naming the routes
    shard = api.simulate(DOWNPOUR, {**base, "faults.fail": [{"link": ["m8.nic0", "switch"], "at_s": 0.001}]}).data
    assert shard["stalled_at_s"] is not None and "m8.cpu (a link cut)" in shard["stalled_reason"]


def test_a_sync_run_with_failures_reports_its_rate_over_the_whole_run():
    """One replica failed: the job restarts after ``restart_s`` and redoes the step, so its
    steady rate is the healthy one and its rate over the run is steps x batch / the run's
    time; eight replicas going on without one: each step counts the replicas it used."""
    from clustersim import api
    one = api.simulate("scenarios/quickstart.toml", {"parallel.replicas": 1,
                       "faults.fail": [{"device": "m0.gpu0", "at_s": 0.0001}]}).data
    assert one["sim_time_s"] > 30                                   # restart_s = 30
    assert one["run_samples_per_s"] == pytest.approx(20 * 128 / one["sim_time_s"])
    assert one["samples_per_s"] > 1000 * one["run_samples_per_s"]
    eight = api.simulate("scenarios/quickstart.toml", {"faults.fail": [{"device": "m0.gpu3", "at_s": 0.0001}]})
    applies = [u for u in eight.trace.updates if u.kind == "apply"]
    assert [len(u.info["replicas"]) for u in applies][-1] == 7
    assert eight.data["run_samples_per_s"] == pytest.approx(
        128 * sum(len(u.info["replicas"]) for u in applies) / eight.data["sim_time_s"])
    assert "run_samples_per_s" not in api.simulate("scenarios/quickstart.toml").data


def test_a_sync_job_going_on_without_a_replica_counts_only_the_live_ones():
    """Second sweep: with ``on_failure = "continue"`` the steady rate counted the dropped
    replica's samples (8 x 128 a step where 7 replicas were left)."""
    from clustersim import api
    out = api.simulate("scenarios/quickstart.toml", {"faults.fail": [{"device": "m0.gpu1", "at_s": 1e-5}],
                                                     "faults.detect_timeout_s": 0}).data
    assert out["samples_per_s"] * out["step_time_s"] == pytest.approx(7 * 128)
    restarted = api.simulate("scenarios/quickstart.toml", {"faults.fail": [{"device": "m0.gpu1", "at_s": 1e-5}],
                                                           "faults.on_failure": "restart", "faults.restart_s": 0}).data
    assert restarted["samples_per_s"] * restarted["step_time_s"] == pytest.approx(8 * 128)    # replaced


def test_a_sync_job_going_on_without_a_replica_reports_the_steps_it_runs_now():
    """Third sweep: the step time was the median over the whole run, mostly steps of all the
    replicas, times the replicas left: a rate of neither phase.  Now the steps after the drop."""
    from clustersim import api
    over = {"training.algorithm": "sync", "parallel.ps_shards": 0, "parallel.replicas": 4, "training.cosim": False,
            "training.time_limit_s": 0, "training.steps": 20, "faults.detect_timeout_s": 0.1}
    plain = api.simulate("scenarios/downpour.toml", over, speedup=False)
    ends = plain.trace.step_ends
    dropped = api.simulate("scenarios/downpour.toml", {**over, "faults.fail": [{"machine": 1, "at_s": ends[14] + 5e-6}]},
                           speedup=False)
    after = dropped.trace.step_times()[16:]             # step 15 waits out the detection
    assert dropped.data["step_time_s"] == pytest.approx(statistics.median(after), rel=1e-12)
    assert dropped.data["step_time_s"] < plain.data["step_time_s"]           # 3 replicas' allreduce is quicker
    assert dropped.data["samples_per_s"] == pytest.approx(3 * 32 / dropped.data["step_time_s"])


def test_failures_that_leave_fewer_replicas_than_the_quorum_wait_for_every_survivor():
    """Two replicas with one backup, one of them lost: the shards take the first R - b
    complete replicas, every survivor where fewer are left (never a step of nobody's
    gradients), so the run goes on at the one replica's pace, all its steps counted."""
    from clustersim import api
    over = {"parallel.replicas": 2, "parallel.ps_shards": 1, "training.backup_workers": 1, "training.steps": 100}
    plain = api.simulate("scenarios/quickstart.toml", over).data
    failed = api.simulate("scenarios/quickstart.toml",
                          {**over, "faults.fail": [{"device": "m0.gpu1", "at_s": 0.001}]}).data
    assert failed["steps"] == 100
    assert failed["step_time_s"] >= 0.9 * plain["step_time_s"] and failed["speedup"] <= 1.0


def test_totals_per_step_count_every_step_of_a_run_that_lost_a_replica():
    """The rate comes from the steps after the drop, but bytes and phase times are the whole
    run's, so they are divided by all its steps: between 7 and 8 replicas' figures."""
    from clustersim import api
    plain = api.simulate("scenarios/quickstart.toml", {}).data
    failed = api.simulate("scenarios/quickstart.toml", {"faults.fail": [{"device": "m0.gpu3", "at_s": 0.0003}],
                                                        "faults.detect_timeout_s": 0.0001}).data
    assert failed["steps"] == plain["steps"] == 20
    # a ring over R replicas moves 2 (R - 1) x the gradients in all: 12 with 7 left, 14 with 8
    assert 12 / 14 * plain["bytes_per_step"] < failed["bytes_per_step"] < plain["bytes_per_step"]
    assert failed["time_by_phase_s"]["bwd"] < plain["time_by_phase_s"]["bwd"]


def test_a_restart_when_none_is_left_brings_every_replica_back():
    """``on_failure = "continue"`` drops failed replicas; when the last ones fail the job
    restarts, and every replica comes back, the ones dropped before too: the rate after
    the restart is the healthy one. (Failed by hand: with ``mtbf_s`` the replacements fail
    again, decision 070.)"""
    from clustersim import api
    plain = api.simulate("scenarios/quickstart.toml", {}).data
    out = api.simulate("scenarios/quickstart.toml", {"faults.detect_timeout_s": 0.0001, "faults.fail": [
        {"device": f"m0.gpu{k}", "at_s": 0.0001 * (k + 1)} for k in range(8)]}).data
    assert len(out["failed_devices"]) == 8
    assert out["samples_per_s"] * out["step_time_s"] == pytest.approx(8 * 128)
    assert out["step_time_s"] == pytest.approx(plain["step_time_s"], rel=1e-6)


def test_a_backup_worker_absorbs_a_failure_while_its_push_is_in_flight():
    """Chen et al. 2016: with one backup the step goes on with the first three gradients.  A
    replica failing while its push was in flight still counted among them, and the step waited
    for its fetch until the detection timeout redid it (102.7 ms and 128 samples lost)."""
    from clustersim import api
    over = {"training.algorithm": "sync", "training.cosim": False, "training.time_limit_s": 0, "training.steps": 12,
            "parallel.replicas": 4, "parallel.ps_shards": 1, "training.backup_workers": 1,
            "faults.detect_timeout_s": 0.1}
    plain = api.simulate("scenarios/downpour.toml", over, speedup=False)
    [push] = [x for x in plain.trace.spans if x.phase == "push" and x.kind == "transfer" and x.step == 5
              and x.where.startswith("m1.")]
    failed = api.simulate("scenarios/downpour.toml",
                          {**over, "faults.fail": [{"machine": 1, "at_s": (push.start_s + push.end_s) / 2}]},
                          speedup=False)
    steps = failed.trace.step_times()
    assert len(steps) == 12 and failed.data.get("lost_work_samples", 0) == 0
    assert max(steps) < 1.5 * max(plain.trace.step_times())
    # the job goes on with three replicas: its rate counts three (R21: it counted four, and
    # losing a machine raised the throughput)
    assert failed.data["samples_per_s"] == pytest.approx(3 * 32 / failed.data["step_time_s"])
    # ... as the four did, whose fourth gradient a step dropped; three pushing to the
    # shard instead of four contend less, so the step may be shorter
    assert plain.data["samples_per_s"] == pytest.approx(3 * 32 / plain.data["step_time_s"])


def test_a_sync_replica_failing_in_its_fetch_is_waited_for_as_in_its_step():
    """U39: under on_failure = "continue", a replica failing during the step's compute was
    waited for (detect_timeout_s, then the step was lost and the job went on without it),
    one failing during the step's fetch was dropped at once: 1.07 s against 0.07 s of run
    for 0.5 ms between the two failures. Without backup workers the next step waits for it
    (README), so both now lose the step and the wait."""
    from clustersim import api
    over = {"training.algorithm": "sync", "training.cosim": False, "training.time_limit_s": 0, "training.steps": 12}
    plain = api.simulate(DOWNPOUR, over, speedup=False)
    [fwd] = [x for x in plain.trace.spans if x.step == 5 and x.where == "m2.cpu" and x.name == "fwd L0"]
    [fetch] = [x for x in plain.trace.spans if x.step == 5 and x.phase == "fetch" and x.where == "m8.cpu->m2.cpu"]
    for span in (fwd, fetch):
        out = api.simulate(DOWNPOUR, {**over, "faults.fail": [{"machine": 2, "at_s": (span.start_s + span.end_s) / 2}]},
                           speedup=False)
        assert out.data["lost_work_samples"] == 8 * 32 and len(out.trace.step_ends) == 12
        assert out.sim_time_s == pytest.approx(plain.sim_time_s + 1.0, abs=0.01)      # detect_timeout_s = 1


def test_a_cut_link_loses_the_work_a_failed_device_loses():
    """U39: replica 0 cut off from its shards at 10 ms (its next push finds no route) and
    replica 0's device failing at 10 ms both stop it after 7 pushes; the cut counted no lost
    work (the step whose push never arrived counted as pushed), the failure 32 samples."""
    from clustersim import api
    over = {"training.cosim": False, "training.time_limit_s": 0.02}
    out = {what: api.simulate(DOWNPOUR, {**over, "faults.fail": [{what: where, "at_s": 0.01}]}, speedup=False)
           for what, where in (("link", ["m0.nic0", "switch"]), ("device", "m0.cpu"))}
    assert out["link"].data["failed_transfers"] > 0 and out["device"].data["failed_devices"] == ["m0.cpu"]
    assert out["link"].data["lost_work_samples"] == out["device"].data["lost_work_samples"] == 32
    steps = {what: sum(1 for r, *_ in res.trace.replica_steps if r == 0) for what, res in out.items()}
    assert steps["link"] == steps["device"] == 7


def test_backups_go_on_past_a_failure_beside_a_late_replica():
    """Review R38: with a replica 60x slower (late every step, backup worker 1) and another
    failing anywhere in step 8, the late replica waited on its own step's event and the run
    stalled at step 8 or 9 of 20; it finishes."""
    from clustersim import api
    over = {"training.algorithm": "sync", "training.cosim": False, "training.time_limit_s": 0, "training.steps": 20,
            "parallel.replicas": 4, "parallel.ps_shards": 1, "training.backup_workers": 1,
            "faults.slowdown": {"m3.cpu": 60.0}}
    plain = api.simulate(DOWNPOUR, over, speedup=False)
    a, b = plain.trace.step_ends[7], plain.trace.step_ends[8]
    for k in range(0, 12, 3):
        out = api.simulate(DOWNPOUR, {**over, "faults.fail": [{"machine": 1, "at_s": a + (b - a) * k / 12}]},
                           speedup=False)
        assert "stalled_at_s" not in out.data and len(out.trace.step_ends) == 20


def test_a_stall_ends_at_its_last_event_not_at_later_failures():
    """Review R38: with ``mtbf_s`` the shards' failures, drawn after every replica had
    failed, moved the stall to the last of them (0.303 s where the job stopped at 0.082)."""
    from clustersim import api
    p = plan(api.load(DOWNPOUR, {"training.cosim": False, "faults.mtbf_s": 0.05}))
    res = simulate(p)
    replicas = {d for row in p.devices for d in row}
    last = max(t for d, t in res.engine.failed_ever.items() if d in replicas)
    assert res.stalled_at_s == res.sim_time_s and last <= res.sim_time_s < last + 0.001
    assert set(res.engine.failed_ever) <= replicas          # the shards' later failures did not happen


def test_mtbf_fails_the_shards_too():
    """U39: ``mtbf_s`` drew a failure for every replica device and none for the
    parameter-server shards on spare machines, so a failed shard never came from it."""
    from sim.engine import Engine
    sc = dataclasses.replace(downpour(), faults=dataclasses.replace(downpour().faults, mtbf_s=1.0))
    p = plan(sc)
    assert set(p.ps.devices).isdisjoint(d for row in p.devices for d in row)
    failed = {d for f in Engine(p).failures for d in f.devices}
    assert failed == {d for row in p.devices for d in row} | set(p.ps.devices)


def test_backups_and_restarts_together_run_to_the_end():
    """Review R21: a restart put machines back without clearing their loss events, so with a
    backup worker a restored replica counted as lost for good and the run stalled."""
    from clustersim import api
    over = {"training.algorithm": "sync", "training.cosim": False, "training.time_limit_s": 0, "training.steps": 12,
            "parallel.replicas": 4, "parallel.ps_shards": 1, "training.backup_workers": 1,
            "faults.detect_timeout_s": 0.1, "faults.on_failure": "restart", "faults.checkpoint_every": 4}
    plain = api.simulate("scenarios/downpour.toml", over, speedup=False)
    at = plain.trace.step_ends[4] + 5e-6
    out = api.simulate("scenarios/downpour.toml", {**over, "faults.fail": [{"machine": 1, "at_s": at},
                                                                           {"machine": 2, "at_s": at}]},
                       speedup=False)
    assert "stalled_at_s" not in out.data and len(out.trace.step_ends) >= 12


def test_the_rate_after_a_drop_skips_the_step_that_waited_for_detection():
    """Review R21: a replica failing in the last step left one step after the drop, the one
    that waited out the detection (100.7 ms a step); the rate is then the stretch before's."""
    from clustersim import api
    over = {"training.algorithm": "sync", "parallel.ps_shards": 0, "parallel.replicas": 4, "training.cosim": False,
            "training.time_limit_s": 0, "training.steps": 20, "faults.detect_timeout_s": 0.1}
    plain = api.simulate("scenarios/downpour.toml", over, speedup=False)
    late = api.simulate("scenarios/downpour.toml",
                        {**over, "faults.fail": [{"machine": 1, "at_s": plain.trace.step_ends[18] + 5e-6}]},
                        speedup=False)
    assert late.data["step_time_s"] == pytest.approx(plain.data["step_time_s"], rel=1e-9)
    assert late.data["samples_per_s"] == pytest.approx(plain.data["samples_per_s"], rel=1e-9)


def test_a_machine_failing_in_the_allreduce_computes_nothing_after():
    """Sync allreduce, restart from a checkpoint every 5 steps: a machine failing in step 12's
    allreduce ran that step's update on the dead machine, the step counted and 4 steps' samples
    were lost where 3 (10, 11 and the broken 12) were.  A failed device now starts nothing."""
    from clustersim import api
    over = {"training.algorithm": "sync", "training.cosim": False, "training.time_limit_s": 0, "training.steps": 20,
            "parallel.replicas": 4, "parallel.ps_shards": 0, "faults.checkpoint_every": 5, "faults.restart_s": 0.5,
            "faults.detect_timeout_s": 0.1, "faults.on_failure": "restart"}
    plain = api.simulate("scenarios/downpour.toml", over, speedup=False)
    [ar, *_] = [x for x in plain.trace.spans if x.step == 12 and x.kind == "transfer" and "m1." in x.where]
    at = (ar.start_s + ar.end_s) / 2
    failed = api.simulate("scenarios/downpour.toml", {**over, "faults.fail": [{"machine": 1, "at_s": at}]},
                          speedup=False)
    assert failed.data["lost_work_samples"] == 3 * 4 * 32
    assert not [x for x in failed.trace.spans if x.where.startswith("m1.") and x.kind in ("compute", "update")
                and at < x.start_s < at + 0.1]


def _cut_run(algorithm, machines, steps, at_s):
    from clustersim.core.scenario import scenario_from_dict
    d = {"cluster": {"topology": "distbelief-2012", "machines": machines},
         "model": {"name": "mlp-digits", "batch_size": 32}, "parallel": {"replicas": 2, "ps_shards": 1},
         "training": {"algorithm": algorithm, "steps": steps},
         "faults": {"fail": [{"at_s": at_s, "link": ["m1.nic0", "switch"]}]}}
    res = simulate(plan(scenario_from_dict(d, "cut.toml")))
    return res, {r: sum(1 for a, *_ in res.trace.replica_steps if a == r) for r in (0, 1)}


@pytest.mark.parametrize("algorithm, machines", [("downpour", 2), ("ssp", 3), ("ssp", 2)])
def test_a_cut_worker_link_stops_that_replica_only(algorithm, machines):
    """Review R17: on 2 machines the shard shares replica 0's device, and a cut marked both
    ends of the route, stopping replica 0 too (a false stall); SSP counted the cut replica
    as live and waited for it for ever.  The other replica ends its steps."""
    res, steps = _cut_run(algorithm, machines, 20, 0.0001)
    assert res.stalled_at_s is None and steps[0] == 20 and steps[1] < 20


def test_a_link_cut_as_host_messages_start_is_no_traceback():
    """Review R17: cut at 0 s, after ``transfer`` found a route and before the wire left
    (host ranks' messages leave after the instant's decisions): NoRoute was raised."""
    res, steps = _cut_run("downpour", 2, 4, 0.0)
    assert res.stalled_at_s is None and steps[0] == 4


def test_a_failure_after_the_last_step_drops_no_replica_from_the_rate():
    """Review R18: the live count came from the devices up at the run's end, so GPUs failing
    during the final checkpoint, after every step had used all 8, cut the rate (to 0 with
    all 8): the replicas the job went on with count, as ``run_samples_per_s`` does."""
    from clustersim import api
    faults = {"checkpoint_every": 20, "checkpoint_gbps": 0.001}
    healthy = api.simulate("scenarios/quickstart.toml", {"faults.checkpoint_every": 20,
                                                          "faults.checkpoint_gbps": 0.001}).data
    last = max(healthy["sim_time_s"] - 1e-4, healthy["sim_time_s"] * 0.999)
    late = api.simulate("scenarios/quickstart.toml", {**{f"faults.{k}": v for k, v in faults.items()},
                        "faults.fail": [{"device": f"m0.gpu{g}", "at_s": last} for g in range(8)]}).data
    assert late["samples_per_s"] == pytest.approx(healthy["samples_per_s"])
    assert late["run_samples_per_s"] == pytest.approx(20 * 8 * 128 / late["sim_time_s"])


def test_a_stalled_sync_run_reports_no_rate_over_the_run():
    from clustersim.core.scenario import scenario_from_dict
    d = {"cluster": {"topology": "distbelief-2012", "machines": 3}, "model": {"name": "mlp-digits", "batch_size": 32},
         "parallel": {"replicas": 2, "ps_shards": 1}, "training": {"algorithm": "sync", "steps": 20},
         "faults": {"fail": [{"at_s": 0.012, "link": ["m1.nic0", "switch"]}]}}
    p = plan(scenario_from_dict(d, "cut.toml"))
    out = summarize(p, simulate(p))
    assert "stalled_at_s" in out and not {"samples_per_s", "run_samples_per_s"} & set(out)


def test_a_sweep_whose_every_point_stalls_exits_3(capsys):
    """As simulate does for one stalled job; a sweep with one point that ran exits 0."""
    args = ["sweep", DOWNPOUR, "--json", "--set", "training.steps=50", "--vary", "parallel.ps_shards=1,2"]
    assert main(args + ["--set", "faults.fail=[{machine=8, at_s=0.01}]"]) == 3
    points = json.loads(capsys.readouterr().out)
    assert all("stalled_at_s" in p and "samples_per_s" not in p for p in points)
    assert main(args + ["--set", "faults.fail=[{machine=9, at_s=0.01}]"]) == 0     # shard 1 only with 2 shards
    assert ["stalled_at_s" in p for p in json.loads(capsys.readouterr().out)] == [False, True]



@pytest.mark.parametrize("at_s", [0.0095, 0.0102, 0.011])
def test_a_restart_job_restarts_when_the_step_finished_before_its_failure_was_seen(at_s):
    """A sync job with on_failure = "restart" and no backup workers whose replica failed
    after its gradient was in (messages in flight finish) went on with 3 replicas of 4 as
    if it had backups: no restore, no lost work, no restart cost, at 5 of 6 failure times."""
    from clustersim import api
    res = api.simulate("scenarios/downpour.toml", {
        "parallel.ps_shards": 1, "parallel.replicas": 4, "training.algorithm": "sync", "training.steps": 30,
        "training.time_limit_s": 0.0, "faults.detect_timeout_s": 0.005, "faults.on_failure": "restart",
        "faults.checkpoint_every": 5, "faults.restart_s": 0.01, "faults.fail": [{"machine": 1, "at_s": at_s}]},
        speedup=False)
    d = res.data
    assert [u.kind for u in res.trace.updates].count("restore") == 1 and d["lost_work_samples"] > 0
    assert d["samples_per_s"] * d["step_time_s"] == pytest.approx(4 * res.plan.scenario.batch_size)


@pytest.mark.parametrize("backups", [0, 1, 3])
def test_sync_throughput_counts_the_gradients_a_step_applies_not_the_backups_dropped(backups):
    """With b backup workers a step applies R - b gradients (Chen et al. 2016 drop the
    late ones), but samples_per_s counted all R: R / (R - b) too high (4x at b = 3)."""
    from clustersim import api
    res = api.simulate("scenarios/downpour.toml", {
        "parallel.ps_shards": 1, "parallel.replicas": 4, "training.algorithm": "sync", "training.steps": 10,
        "training.time_limit_s": 0.0, "training.backup_workers": backups}, speedup=False)
    applied = [len(u.info["replicas"]) for u in res.trace.updates if u.kind == "apply" and u.shard == -1]
    assert set(applied) == {4 - backups}
    d, batch = res.data, res.plan.scenario.batch_size
    assert d["samples_per_s"] * d["step_time_s"] == pytest.approx(batch * (4 - backups))


def test_a_hierarchical_allreduce_on_uneven_machines_is_refused_and_after_a_failure_runs_as_a_ring():
    """U43: 12 replicas on two DGX (8 + 4), or 16 after one failed under "continue" (8 + 7),
    ended in a 39-line traceback from the layout. Planned so: one line naming
    training.allreduce; left so by a failure: the group's allreduce runs as a ring."""
    from clustersim import api
    base = {"cluster.machines": 2, "training.allreduce": "hierarchical", "training.steps": 6}
    with pytest.raises(ConfigError, match="training.allreduce: hierarchical needs as many replicas on every machine"):
        plan(api.load("scenarios/alexnet-fat-tree.toml", {**base, "parallel.replicas": 12}))
    out = api.simulate("scenarios/alexnet-fat-tree.toml",
                       {**base, "parallel.replicas": 16, "faults.detect_timeout_s": 0.001,
                        "faults.fail": [{"device": "m1.gpu5", "at_s": 0.003}]}, speedup=False)
    assert "stalled_at_s" not in out.data and len(out.trace.step_ends) == 6
    assert out.data["failed_devices"] == ["m1.gpu5"]


@pytest.mark.parametrize("every", [1, 2, 3])
def test_a_checkpoint_write_is_in_the_runs_rate_not_the_steps(every):
    """U43: step_time_s read the write of every step's checkpoint as a 246 ms step (every 1),
    the mean of a short and a long step (every 2), or nothing (every 3 and up): throughput,
    time to train and cost jumped with checkpoint_every. The steps leave the writes out;
    run_samples_per_s, over the run, has them."""
    from clustersim import api
    base = {"cluster.machines": 2, "parallel.replicas": 16, "training.steps": 6}
    plain = api.simulate("scenarios/alexnet-fat-tree.toml", base, speedup=False).data
    out = api.simulate("scenarios/alexnet-fat-tree.toml", {**base, "faults.checkpoint_every": every},
                       speedup=False).data
    assert out["step_time_s"] == pytest.approx(plain["step_time_s"], rel=1e-9)
    writes = 6 // every
    write_s = 61_100_840 * 4 / 1e9                          # alexnet's parameters x 4 B at 1 GB/s
    assert out["sim_time_s"] == pytest.approx(plain["sim_time_s"] + writes * write_s, rel=1e-6)
    assert out["run_samples_per_s"] == pytest.approx(16 * 64 * 6 / out["sim_time_s"], rel=1e-9)


def test_mtbf_fails_a_replaced_device_again():
    """U43: each device failed once a run (one draw each), so a run of many MTBFs went
    failure-free after its first restarts: 8 restarts in 16 ms of a 212 ms run at 10 ms.
    A replacement draws its next failure from then on."""
    from clustersim import api
    res = api.simulate("scenarios/quickstart.toml", {"training.steps": 3000, "faults.mtbf_s": 0.01,
                                                     "faults.on_failure": "restart", "faults.restart_s": 0.0001,
                                                     "faults.detect_timeout_s": 0.00001,
                                                     "faults.checkpoint_every": 10}, speedup=False)
    fails = [s for s in res.trace.spans if s.phase == "failure"]
    per = {d: sum(1 for s in fails if s.where == d) for d in res.plan.devices[0] + tuple(r[0] for r in res.plan.devices)}
    late = [s for s in fails if s.start_s > res.sim_time_s / 2]
    assert len(fails) > 8 * res.sim_time_s / 0.01 / 2 and all(n > 3 for n in per.values()) and late


def test_a_cut_link_is_named_in_the_summary():
    """U43: a link cut that rerouted (GPU 0's NVLink port: its traffic over PCIe, the step
    1.55 -> 6.40 ms) was named nowhere in the summary or its JSON."""
    from clustersim import api
    from clustersim.report import summary_text
    out = api.simulate("scenarios/alexnet-fat-tree.toml", {"cluster.machines": 2, "parallel.replicas": 16,
                                                           "training.steps": 4,
                                                           "faults.fail": [{"link": ["m0.gpu0", "m0.nvswitch"],
                                                                            "at_s": 0.002}]}, speedup=False).data
    assert out["failed_links"] == ["m0.gpu0-m0.nvswitch"] and out["failed_devices"] == []
    assert "failures         m0.gpu0-m0.nvswitch; 0 samples of work lost" in summary_text(out)


@pytest.mark.parametrize("mode, extra", [("continue", {}), ("restart", {"faults.restart_s": 0.05})])
def test_mtbf_goes_on_failing_after_every_device_was_replaced(mode, extra):
    """Review R40: once no failure was pending (every device failed, then all replaced)
    the injector returned, and the replacements' draws never happened: 8 failures, the last
    at 16 ms of a 207 ms run, under "continue" and with a 50 ms restart alike."""
    from clustersim import api
    res = api.simulate("scenarios/quickstart.toml", {"training.steps": 600, "faults.mtbf_s": 0.01,
                                                     "faults.on_failure": mode, "faults.checkpoint_every": 10,
                                                     **extra}, speedup=False)
    fails = [s.start_s for s in res.trace.spans if s.phase == "failure"]
    assert len(fails) > 8 and max(fails) > res.sim_time_s / 2 and "stalled_at_s" not in res.data


def test_a_job_restarting_for_ever_is_a_stall():
    """Review R40: with failures renewed faster than a step, a restarting job without
    checkpoints went back to step 0 for ever (a run that never ended). After 100 restarts
    in a row to one checkpoint it is a stall, saying why, and which setting to move (U45:
    a recovery longer than the job's time between failures needs no other checkpoints)."""
    from clustersim import api
    from sim.algorithms.sync import RESTARTS_IN_VAIN
    quick = {"training.steps": 100, "faults.on_failure": "restart", "faults.restart_s": 0.00001,
             "faults.detect_timeout_s": 0.00001}
    res = api.simulate("scenarios/quickstart.toml", {**quick, "faults.mtbf_s": 0.001}, speedup=False)
    assert res.data["stalled_reason"] == (f"no progress: {RESTARTS_IN_VAIN} restarts in a row back to step 0's "
                                          "checkpoint (failures come faster than the run completes: no checkpoints)")
    assert sum(1 for s in res.trace.spans if s.where == "restart") == RESTARTS_IN_VAIN
    slow = api.simulate("scenarios/quickstart.toml", {**quick, "faults.mtbf_s": 0.01, "faults.restart_s": 0.01,
                                                      "faults.checkpoint_every": 1}, speedup=False)
    assert slow.data["stalled_reason"].endswith("(the job fails every 0.00125 s on average and a recovery takes "
                                                "0.01 s (detect_timeout_s + restart_s + reading the checkpoint at "
                                                "checkpoint_gbps): lower them, or use fewer devices or machines)")


def test_an_explicit_failure_does_not_add_a_second_mtbf_draw():
    """Review R40: each replacement pushed a new draw although the device's first was still
    to come, so a device failed by hand k times then failed k + 1 times as often."""
    from clustersim import api
    sc = api.load("scenarios/quickstart.toml", {"faults.mtbf_s": 100.0, "faults.on_failure": "restart",
                                                "faults.fail": [{"device": "m0.gpu0", "at_s": t} for t in
                                                                (0.001, 0.003, 0.005)]})
    res = simulate(plan(sc))
    due = [f.devices[0] for _, _, f, _ in res.engine._due]
    assert due.count("m0.gpu0") == 1 and len(due) == len(set(due)) == 8


def test_a_restart_loses_each_step_with_the_replicas_that_ran_it():
    """U43: after "continue" dropped a replica and the last one's failure restarted the job,
    the steps since the checkpoint counted every replica: 1,088 samples lost where 768 were
    (a steps by 2 replicas, b by 1, and the two steps in flight, 128 and 64)."""
    from clustersim import api
    res = simulate(plan(api.load("scenarios/alexnet-fat-tree.toml", {
        "cluster.machines": 1, "parallel.replicas": 2, "training.steps": 20, "faults.detect_timeout_s": 0.0001,
        "faults.restart_s": 1.0, "faults.fail": [{"device": "m0.gpu0", "at_s": 0.004},
                                                 {"device": "m0.gpu1", "at_s": 0.012}]})))
    [restart] = [s for s in res.trace.spans if s.where == "restart"]
    before = [e for e in res.trace.step_ends if e <= restart.start_s]
    a = res.engine.sync_phases[1][0]                     # steps done when the first replica was dropped
    b = len(before) - a
    assert a > 0 and b > 0
    assert res.engine.lost_samples == 64 * (2 * a + b) + 128 + 64 == 768


@pytest.mark.parametrize("optimizer, per_param", [("sgd", 4), ("adam", 12)])
def test_a_checkpoint_writes_the_optimizer_s_state_beside_the_weights(optimizer, per_param):
    """A checkpoint holds the fp32 master weights and each optimizer state value (Adam's two
    moments: 12 B a parameter, as Megatron's and DeepSpeed's checkpoints)."""
    from clustersim import api
    base = {"cluster.machines": 2, "parallel.replicas": 16, "training.steps": 4, "training.optimizer": optimizer}
    plain = api.simulate("scenarios/alexnet-fat-tree.toml", base, speedup=False).data
    out = api.simulate("scenarios/alexnet-fat-tree.toml", {**base, "faults.checkpoint_every": 2},
                       speedup=False).data
    assert out["sim_time_s"] == pytest.approx(plain["sim_time_s"] + 2 * 61_100_840 * per_param / 1e9, rel=1e-6)
    assert checkpoint_bytes(scenario_from_dict({"cluster": {"topology": "dgx-h100"}, "model": {"name": "alexnet"},
                                                "training": {"optimizer": optimizer}}, "t.toml")) == per_param


def test_a_stalled_summary_keeps_its_notes():
    """What the figures leave out holds for a stall's figures too (traffic, phases): the
    analytical network's note was dropped where the run stalled (decision 075's leftover)."""
    sc = dataclasses.replace(downpour(), network="analytical")
    p = plan(sc)
    res = simulate(plan(with_failure(sc, Failure(simulate(p).sim_time_s / 3, (p.ps.devices[0],)))))
    summary = summarize(p, res)
    assert "stalled_at_s" in summary
    assert any(n.startswith("cluster.network = analytical") for n in summary["notes"])
