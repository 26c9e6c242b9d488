"""Calibration and validation: fits, round trips, error arithmetic, one end-to-end run."""
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from clustersim.calibration.host import fit_alpha_beta, topology_text
from clustersim.compare.validate import combine, error_pct, phase_times, spread_pct, waits
from clustersim.core.topogen import build_topology, load_topology
from clustersim.core.topology import Device

MPIEXEC = Path(sys.executable).parent / "mpiexec"


def test_error_arithmetic():
    assert error_pct(1.1, 1.0) == pytest.approx(10.0)
    assert error_pct(0.5, 2.0) == pytest.approx(-75.0)
    assert error_pct(0.0, 0.0) == 0.0 and error_pct(1.0, 0.0) is None
    # an op the runs have no span of (the step's software cost): a row strict JSON takes
    from clustersim.compare.validate import op_rows
    rows = op_rows({("rank0", "step"): 4e-5, ("rank0", "fwd L0"): 2e-5}, [{("rank0", "fwd L0"): 3e-5}])
    assert [r["error_pct"] for r in rows] == [pytest.approx(-100 / 3), None]
    json.dumps(rows, allow_nan=False)
    assert spread_pct([1.0, 1.2, 0.9]) == pytest.approx(30.0)
    spans = [("fwd L0", "fwd", "d0", 0.0, 2.0, 0), ("halo L1", "halo", "d0->d1", 2.0, 1.0, 0),
             ("fwd L0", "fwd", "d1", 0.0, 5.0, 0), ("update", "update", "d0", 3.0, 0.5, 0),
             ("fwd L0", "fwd", "d0", 4.0, 1.0, 1), ("fwd L1", "fwd", "d0", 5.0, 0.5, 1),
             ("fwd L0", "fwd", "d0", 6.0, 9.0, 2), ("serve", "ps_update", "d0", 0.0, 7.0, -1)]
    # per step: forward 2.0, 1.5, 9.0 -> median 2.0; transfers 1.0, 0, 0 -> 0; update 0.5, 0, 0 -> 0
    assert phase_times(spans, "d0") == {"forward": 2.0, "transfers": 0.0, "update": 0.0}
    assert phase_times([], "d0") == {}
    assert waits(3.0, {"forward": 2.0, "transfers": 0.5, "waits": 9.0}) == 0.5 and waits(1.0, {"forward": 2.0}) == 0.0


def test_an_executed_message_is_its_send_and_the_receive_after_it():
    from clustersim.compare.validate import messages
    spans = [("act L1 send", "activation", "d0->d1", 1.0, 0.1, 0),      # sent 1.0-1.1
             ("act L1 recv", "activation", "d0->d1", 0.5, 0.9, 0),      # waited from 0.5: arrived at 1.4
             ("act L1 send", "activation", "d0->d1", 1.2, 0.1, 0),      # the second micro-batch's, sent 1.2-1.3
             ("act L1 recv", "activation", "d0->d1", 2.0, 0.05, 0),     # its receiver came late: its copy only
             ("act L1 send", "activation", "d0->d1", 7.0, 0.2, 1),      # no receive traced: as it is
             ("fwd L0", "fwd", "d0", 0.0, 1.0, 0)]
    got = sorted(messages(spans), key=lambda sp: (sp[5], sp[3]))
    assert got[0] == ("fwd L0", "fwd", "d0", 0.0, 1.0, 0)
    assert [sp[:4] for sp in got[1:]] == [("act L1", "activation", "d0->d1", 1.0), ("act L1", "activation", "d0->d1", 1.2),
                                          ("act L1", "activation", "d0->d1", 7.0)]
    assert [sp[4] for sp in got[1:]] == pytest.approx([0.1 + 0.3, 0.1 + 0.05, 0.2])


def test_op_medians_leave_out_the_first_step_and_pair_messages():
    from clustersim.compare.validate import op_medians, op_rows
    spans = [("fwd L0", "fwd", "d0", 0.0, 9.0, 0),                      # the warm-up step: left out
             ("fwd L0", "fwd", "d0", 10.0, 1.0, 1), ("fwd L0", "fwd", "d0", 20.0, 3.0, 2),
             ("fwd L0", "fwd", "d0", 30.0, 2.0, 3),
             ("act L1 send", "activation", "d0->d1", 11.0, 0.1, 1),     # one message: send + receive after it
             ("act L1 recv", "activation", "d0->d1", 10.5, 0.9, 1)]
    got = op_medians(spans)
    assert got[("d0", "fwd L0")] == 2.0 and got[("d0->d1", "act L1")] == pytest.approx(0.4) and len(got) == 2
    assert op_medians([("update", "update", "d0", 0.0, 5.0, 0)]) == {("d0", "update"): 5.0}   # one step: kept
    rows = op_rows({("d0", "fwd L0"): 2.2, ("d0", "step"): 1.0}, [got, {("d0", "fwd L0"): 1.0}])
    assert [(r["where"], r["op"]) for r in rows] == [("d0", "fwd L0"), ("d0", "step"), ("d0->d1", "act L1")]
    assert rows[0]["measured_s"] == 1.5 and rows[0]["error_pct"] == pytest.approx(100 * (2.2 - 1.5) / 1.5)
    assert rows[1]["measured_s"] == 0.0 and rows[2]["predicted_s"] == 0.0 and rows[2]["measured_s"] == pytest.approx(0.4)
    assert "measured_mean_s" not in rows[0]
    means = op_medians(spans, statistics.fmean)           # fwd L0 over steps 1-3: 1, 3, 2
    assert means[("d0", "fwd L0")] == 2.0 and op_medians(spans[:3], statistics.fmean)[("d0", "fwd L0")] == 2.0
    rows = op_rows({("d0", "fwd L0"): 2.2}, [got, {("d0", "fwd L0"): 1.0}], [means, {("d0", "fwd L0"): 4.0}])
    assert rows[0]["measured_mean_s"] == 3.0 and rows[1]["measured_mean_s"] == pytest.approx(0.4)


def test_alpha_beta_fit_recovers_exact_parameters():
    sizes = [2**k for k in range(3, 25, 3)]
    times = [3e-6 + n / 8e9 for n in sizes]
    fit = fit_alpha_beta(sizes, times)
    assert fit["alpha_s"] == pytest.approx(3e-6, rel=1e-6)
    assert fit["beta_bytes_per_s"] == pytest.approx(8e9, rel=1e-6)
    assert fit["r2"] == pytest.approx(1.0) and fit["max_rel_error"] < 1e-6


def test_calibrated_topology_round_trips(tmp_path):
    comp = {"peak_flops": 50e9, "op_overhead_s": 10e-6, "efficiency_curve": [(1e4, 0.2), (1e8, 0.9), (1e10, 1.0)]}
    mpi = {"alpha_s": 4e-6, "beta_bytes_per_s": 6e9, "r2": 0.999}
    f = tmp_path / "host.toml"
    costs = {"dense": {"fixed_s": 12e-6, "flops_per_s": 100e9, "bytes_per_s": 10e9, "bytes_beyond_cache_per_s": 5e9},
             "send": {"fixed_s": 5e-6, "flops_per_s": 0.0, "bytes_per_s": 7e9},
             "allreduce": {"fixed_s": 1e-6, "flops_per_s": 0.0, "bytes_per_s": 1e9,
                           "curve": [[1e3, 100e-6], [1e5, 300e-6], [1e6, 1e-3]]}}
    f.write_text(topology_text("host", 4, 2, comp, 20e9, mpi, costs, cache=2**20))
    topo = load_topology(str(f))
    assert topo.compute_devices() == ["rank0", "rank1", "rank2", "rank3"]
    dev = topo.devices["rank0"]
    assert dev.flops_per_s("fp32") == pytest.approx(50e9)          # alone, a rank has its core ...
    assert topo.core_pools == {"core0": 1, "core1": 1}                # 4 ranks bound round-robin to 2 cores
    assert [topo.devices[f"rank{k}"].core_pool for k in range(4)] == ["core0", "core1", "core0", "core1"]
    assert dev.op_overhead == pytest.approx(10e-6)
    assert dev.cache_bytes == 2**20                                  # bytes beyond 1 MiB at 5 GB/s
    assert dev.op_time("dense", 1e9, 1e8) == pytest.approx(12e-6 + 1e9 / 100e9 + 2**20 / 10e9 + (1e8 - 2**20) / 5e9)
    assert dev.op_time("dense", 1e9, 1e5) == pytest.approx(12e-6 + 1e9 / 100e9 + 1e5 / 10e9)
    assert dev.op_time("send", 0.0, 7e6) == pytest.approx(5e-6 + 1e-3)
    assert dev.op_time("conv2d", 1e9, 1e8) is None
    # the allreduce's measured curve overrides its fit: straight in log(bytes) between points,
    # flat below the first, in proportion to the bytes beyond the last
    assert dev.measured("allreduce") and not dev.measured("conv2d")
    assert dev.op_time("allreduce", 0.0, 1e4) == pytest.approx(200e-6)
    assert dev.op_time("allreduce", 0.0, 10.0) == pytest.approx(100e-6)
    assert dev.op_time("allreduce", 0.0, 4e6) == pytest.approx(4e-3)
    route = topo.route("rank0", "rank3")
    assert topo.route_latency(route) == pytest.approx(4e-6) and topo.route_bandwidth(route) == pytest.approx(6e9)


def test_ranks_bound_to_one_core_share_it_busy_or_not():
    """3 ranks on 2 cores: rank0 and rank2 share core0 and run at half speed even when the
    other has nothing to do (it polls); rank1 has core1 to itself (closed form).  The
    measured allreduce already holds the sharing."""
    import simpy

    from sim.compute import Compute
    comp = {"peak_flops": 50e9, "op_overhead_s": 0.0, "efficiency_curve": []}
    costs = {"dense": {"fixed_s": 0.0, "flops_per_s": 1e9, "bytes_per_s": 0.0},
             "allreduce": {"fixed_s": 1e-3, "flops_per_s": 0.0, "bytes_per_s": 0.0}}
    topo = build_topology(__import__("tomllib").loads(topology_text("h", 3, 2, comp, 20e9, {
        "alpha_s": 1e-6, "beta_bytes_per_s": 1e9, "r2": 1.0}, costs)), "h.toml")
    env = simpy.Environment()
    compute = Compute(env, topo, "fp32")
    done = {}
    for k in range(3):
        compute.run(f"rank{k}", 1e9, 0.0, key="dense").callbacks.append(lambda _e, k=k: done.__setitem__(k, env.now))
    compute.run_seconds("rank2", 0.5).callbacks.append(lambda _e: done.__setitem__("msg", env.now))
    compute.run("rank0", 0.0, 0.0, key="allreduce").callbacks.append(lambda _e: done.__setitem__("ar", env.now))
    env.run()
    # at half speed 1 s of dense is 2 s of work; two jobs on one device share it besides
    assert done[1] == pytest.approx(1.0)
    assert done["msg"] == pytest.approx(2.0) and done[2] == pytest.approx(3.0)      # 2 s and 1 s of work, shared
    assert done["ar"] == pytest.approx(2e-3) and done[0] == pytest.approx(2.0 + 1e-3)  # 1 ms of allreduce, not slowed
    assert compute.share == {"rank0": 0.5, "rank1": 1.0, "rank2": 0.5}


def test_op_cost_fit_recovers_exact_costs_and_keeps_terms_non_negative():
    from clustersim.calibration.host import fit_op_cost
    pts = [[f, b, 8e-6 + f / 2e11 + b / 1e10] for f, b in [(1e4, 1e3), (1e6, 5e5), (1e8, 1e6), (1e9, 4e8), (3e9, 1e7)]]
    fit = fit_op_cost(pts)
    assert fit["fixed_s"] == pytest.approx(8e-6, rel=1e-6) and fit["flops_per_s"] == pytest.approx(2e11, rel=1e-6)
    assert fit["bytes_per_s"] == pytest.approx(1e10, rel=1e-6) and fit["max_rel_error"] < 1e-6
    knee = [[f, b, 8e-6 + f / 2e11 + min(b, 1e6) / 2e10 + max(b - 1e6, 0) / 5e9]
            for f, b in [(1e4, 1e3), (1e6, 5e5), (1e8, 9e5), (1e9, 4e8), (3e9, 1e7), (5e7, 3e6)]]
    fit = fit_op_cost(knee, cache=1e6)                      # a second byte rate beyond the cache
    assert fit["bytes_per_s"] == pytest.approx(2e10, rel=1e-6) and fit["bytes_beyond_cache_per_s"] == pytest.approx(
        5e9, rel=1e-6) and fit["flops_per_s"] == pytest.approx(2e11, rel=1e-6)
    falling = fit_op_cost([[0.0, 1e3, 2e-5], [0.0, 1e6, 1e-5]])      # more bytes, less time: no negative rate
    # a constant c fitted in relative error: sum(1/t) / sum(1/t^2)
    assert falling["bytes_per_s"] == 0.0 and falling["fixed_s"] == pytest.approx(1.5e5 / 1.25e10)


def test_efficiency_curve_interpolates_in_log_flops_and_is_validated():
    d = Device("x", "cpu", 0, {"fp32": 1e9}, efficiency_curve=((1e4, 0.2), (1e6, 0.6)))
    assert d.efficiency_at(1e2) == 0.2 and d.efficiency_at(1e8) == 0.6
    assert d.efficiency_at(1e5) == pytest.approx(0.4)
    bad = {"name": "t", "device": [{"name": "c", "kind": "cpu", "cores": 1, "core_gflops": 1, "memory_gib": 1,
                                    "memory_bandwidth_gbps": 1, "efficiency_curve": [[1e6, 0.5], [1e4, 0.9]]}]}
    with pytest.raises(Exception, match="efficiency_curve"):
        build_topology(bad, "t.toml")


@pytest.mark.slow             # calibrates this host first: ~2-4 minutes
@pytest.mark.skipif(not MPIEXEC.exists(), reason="the mpich wheel is not installed")
def test_validate_runs_end_to_end_with_finite_errors(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text('name = "tiny"\n[cluster]\ntopology = "dgx-h100"\n[model]\nname = "mlp-digits"\nbatch_size = 16\n'
                 '[parallel]\nreplicas = 2\n[training]\nsteps = 20\n')
    proc = subprocess.run([sys.executable, "-m", "clustersim", "validate", str(f), "--repeats", "1", "--json",
                           "--plot", str(tmp_path / "v.png")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["predicted_step_time_s"] > 0 and out["measured_step_time_s"] > 0
    assert math.isfinite(out["error_pct"]) and {"forward", "backward", "waits"} <= set(out["phases"])
    rows = [{w for w, *_ in out["timelines"][k]} for k in ("predicted", "measured")]
    assert rows[0] == rows[1] and len(rows[0]) == 2            # the Plan's two devices, in the run as in the simulation
    assert out["quiet_step_time_s"] > 0 and math.isfinite(out["quiet_error_pct"]) and len(out["quiet_runs_s"]) == 1
    assert (tmp_path / "v.png").read_bytes()[:4] == b"\x89PNG"


def test_validation_rounds_combine_into_medians():
    def rnd(pred, runs, fwd):
        return {"scenario": "s", "topology": f"t{pred}", "predicted_step_time_s": pred, "measured_runs_s": runs,
                "quiet_runs_s": [t / 2 for t in runs], "phases": {"forward": {"predicted_s": fwd, "measured_s": fwd * 2}}}
    out = combine([rnd(1.0, [2.0, 3.0], 0.1), rnd(4.0, [1.0, 9.0], 0.3), rnd(2.0, [5.0, 4.0], 0.2)])
    assert out["predicted_step_time_s"] == 2.0 and out["measured_step_time_s"] == 3.5     # medians of 3 and of 6
    assert out["error_pct"] == pytest.approx((2.0 - 3.5) / 3.5 * 100)
    assert out["spread_pct"] == pytest.approx((9.0 - 1.0) / 3.5 * 100) and out["rounds"] == 3
    assert out["phases"]["forward"] == {"predicted_s": 0.2, "measured_s": 0.4, "error_pct": pytest.approx(-50.0)}
    assert out["topology"] == ["t1.0", "t4.0", "t2.0"] and out["predicted_rounds_s"] == [1.0, 4.0, 2.0]
    assert out["quiet_step_time_s"] == 1.75 and out["quiet_error_pct"] == pytest.approx((2.0 - 1.75) / 1.75 * 100)
    assert out["quiet_spread_pct"] == pytest.approx((4.5 - 0.5) / 1.75 * 100)


def test_rank_env_gives_each_rank_its_share_of_the_cores(monkeypatch):
    from executor.launch import rank_env
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    two = rank_env(2, cores=8)
    assert two["OPENBLAS_NUM_THREADS"] == "4" and two["MALLOC_MMAP_MAX_"] == "0"
    assert rank_env(5, cores=2)["OPENBLAS_NUM_THREADS"] == "1"
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "3")                  # the caller's own setting wins
    assert rank_env(2, cores=8)["OPENBLAS_NUM_THREADS"] == "3"


def test_ranks_are_bound_to_their_share_of_the_cores():
    from executor.launch import cores_of
    cores = [0, 1, 2, 3]
    assert [cores_of(r, 1, cores) for r in range(1)] == [[0, 1, 2, 3]]
    assert [cores_of(r, 2, cores) for r in range(2)] == [[0, 1], [2, 3]]
    assert [cores_of(r, 3, cores) for r in range(3)] == [[0], [1], [2]]
    assert [cores_of(r, 6, cores) for r in range(6)] == [[0], [1], [2], [3], [0], [1]]
    import os
    mine = sorted(os.sched_getaffinity(0))
    code = "import os, sys; from executor.launch import pin; print(*pin(1, 3), '|', *sorted(os.sched_getaffinity(0)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,   # pytest stays unbound
                         cwd=Path(__file__).resolve().parents[1]).stdout.split("|")
    assert [int(x) for x in out[0].split()] == [int(x) for x in out[1].split()] == cores_of(1, 3, mine)


def test_probe_points_are_medians_and_a_messages_cost_its_lower_quartile():
    from clustersim.calibration.probe import merge
    waits = [1.0, 1.0, 1.0, 1.0, 9.0, 9.0, 9.0]                  # some receives waited for their sender
    passes = [{"dense": [(1e6, 1e3, [3.0, 1.0])], "recv": [(0.0, 64.0, waits[:4])]},
              {"dense": [(1e6, 1e3, [2.0])], "recv": [(0.0, 64.0, waits[4:])]}]
    out = merge(passes)
    assert out["dense"] == [[1e6, 1e3, 2.0]]                     # all samples of both passes: median
    assert out["recv"] == [[0.0, 64.0, statistics.quantiles(waits, n=4)[0]]] and out["recv"][0][2] == 1.0


def test_probe_step_counts_warm_up_then_time_a_stretch():
    from clustersim.calibration import probe
    assert (probe.WARM_S, probe.TIMED_S) == (0.01, 0.02)
    assert probe.step_counts(1e-3, 5) == (10, 20)                # a 1 ms step: 10 ms untimed, 20 ms timed
    assert probe.step_counts(0.1, 5) == (2, 5)                   # a slow step: at least 2 untimed, `repeats` timed
    assert probe.step_counts(3e-3, 7) == (4, 7)


def test_a_probe_times_only_the_steps_after_its_warm_up(monkeypatch):
    import numpy as np

    from clustersim.calibration import probe
    calls = []
    real = probe.run_step
    monkeypatch.setattr(probe, "step_counts", lambda second, repeats: (3, repeats + 2))
    monkeypatch.setattr(probe, "run_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = probe.time_plan(probe.probe_plan("mlp-digits", 8, 1), np.random.default_rng(0), repeats=4)
    assert len(calls) == 3 + 6                                     # 3 untimed steps, then 6 timed
    assert all(len(ts) == 6 for pts in out.values() for _f, _b, ts in pts)
    assert set(out) == {"dense", "dense.backward", "relu", "relu.backward", "softmax_xent",
                        "softmax_xent.backward", "step", "update"}


def test_a_step_s_set_up_is_timed_as_the_step_not_as_its_first_op(monkeypatch):
    """run_step's set-up (the walk's tables) precedes the first op and is the step's own
    cost: a set-up made 50 ms slow lands in ``step``, not in the first dense layer."""
    import time

    import numpy as np

    from clustersim.calibration import probe
    from executor import partitioned
    real = partitioned._Step.__init__
    DELAY = 0.05

    def slow(self, *a, **k):
        real(self, *a, **k)
        time.sleep(DELAY)
    monkeypatch.setattr(partitioned._Step, "__init__", slow)
    monkeypatch.setattr(probe, "step_counts", lambda second, repeats: (1, repeats))
    out = probe.time_plan(probe.probe_plan("mlp-digits", 8, 1), np.random.default_rng(0), repeats=3)
    first = next(pt for pt in out["dense"] if pt[0] == 2 * 8 * 64 * 128)   # layer 0 (64 -> 128), the first op
    assert max(first[2]) < DELAY / 2
    assert min(out["step"][0][2]) >= DELAY


def test_stages_of_whole_layers_are_probed_as_stages_only_on_two_ranks(monkeypatch):
    """A layers split's ops get ``.stage`` keys (the simulator asks for them, falling back
    to the whole layers'); op_times probes them only with a pair of ranks, since two
    stages in one process never wait for each other."""
    import numpy as np

    from clustersim.calibration import probe
    monkeypatch.setattr(probe, "step_counts", lambda second, repeats: (1, repeats))
    out = probe.time_plan(probe.probe_plan("mlp-digits", 8, 2, "layers"), np.random.default_rng(0), repeats=2)
    assert {"dense.stage", "dense.backward.stage", "softmax_xent.stage", "step.stage"} <= set(out)
    assert not {"send", "recv"} & set(out)      # a stage's receive holds its wait: not a message's cost
    alone = probe.op_times(repeats=2, passes=1, probes=(("mlp-digits", (8,)),))
    assert not any(key.endswith(".stage") for key in alone) and "dense.split" in alone


def test_three_ranks_probe_stages_on_the_pair_while_the_third_brackets_along():
    """Ranks 0 and 1 probe the stages; rank 2 has no pair and skips them, yet takes part in
    every quiet bracket (an allgather over all ranks), so no rank waits in a bracket the
    others skip."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    mpiexec = Path(sys.executable).parent / "mpiexec"
    if not mpiexec.exists():
        pytest.skip("the mpich wheel is not installed")
    proc = subprocess.run([str(mpiexec), "-n", "3", sys.executable, "-m", "clustersim.calibration.probe", "ops",
                           "1.0", '["mlp-digits"]'], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    keys = set(json.loads(proc.stdout))
    assert {"dense.stage", "relu.stage", "softmax_xent.backward.stage", "dense.split", "dense"} <= keys


def test_a_spatial_slice_has_its_own_op_costs_falling_back_to_the_whole_layers(tmp_path):
    from sim.engine import simulate
    from clustersim.core.metrics import summarize
    from clustersim.core.plan import cost_key, plan
    from clustersim.core.scenario import scenario_from_dict
    comp = {"peak_flops": 50e9, "op_overhead_s": 1e-6, "efficiency_curve": [(1e4, 1.0)]}
    mpi = {"alpha_s": 1e-6, "beta_bytes_per_s": 1e10, "r2": 1.0}
    costs = {"dense": {"fixed_s": 1e-3, "flops_per_s": 0.0, "bytes_per_s": 0.0},
             "dense.split": {"fixed_s": 1.0, "flops_per_s": 0.0, "bytes_per_s": 0.0}}
    f = tmp_path / "host.toml"
    f.write_text(topology_text("host", 2, 2, comp, 20e9, mpi, costs))
    dev = load_topology(str(f)).devices["rank0"]
    assert dev.op_time("dense.split", 1e6, 1e3) == 1.0 and dev.op_time("dense", 1e6, 1e3) == 1e-3
    dev.op_costs.pop("dense.split")
    assert dev.op_time("dense.split", 1e6, 1e3) == 1e-3            # not measured as a slice: the whole layer's
    assert dev.op_time("relu.split", 1e6, 1e3) is None

    def step(slots, split):
        sc = scenario_from_dict({"cluster": {"topology": str(f), "machines": 0},
                                 "model": {"name": "mlp-digits", "batch_size": 8},
                                 "parallel": {"model_parallel": slots, "split": split},
                                 "training": {"steps": 3}}, "t.toml")
        p = plan(sc)
        return p, summarize(p, simulate(p))["step_time_s"]
    p, t = step(2, "spatial")                                      # two dense layers forward, at 1 s each
    assert {cost_key(p, op) for op in p.ops if op.kind == "fwd"} >= {"dense.split", "relu.split"}
    assert 2.0 <= t < 2.1
    p, t = step(2, "layers")                  # stages of whole layers: not measured so, the whole layers' costs
    assert {cost_key(p, op) for op in p.ops if op.kind == "fwd"} == {"dense.stage", "relu.stage", "softmax_xent.stage"}
    assert t < 0.1
    assert dev.op_time("dense.stage", 1e6, 1e3) == 1e-3 and dev.op_time("relu.stage", 1e6, 1e3) is None
    p, t = step(1, "spatial")
    assert "dense" in {cost_key(p, op) for op in p.ops} and t < 0.1


def test_each_rank_takes_the_reference_of_the_cores_it_is_bound_to():
    from clustersim.calibration.hostspeed import rank_series
    series = {0: [1.0, 2.0], 1: [3.0, 3.0]}                        # window by window
    assert rank_series(series, 1) == [[3.0, 3.0]]                  # one rank on both cores: the slower
    assert rank_series(series, 2) == [[1.0, 2.0], [3.0, 3.0]]
    assert rank_series(series, 3) == [[1.0, 2.0], [3.0, 3.0], [1.0, 2.0]]   # round-robin beyond the cores


def test_every_core_is_timed_at_once_with_the_reference_step():
    import os

    from clustersim.calibration.hostspeed import core_series
    series = core_series(0.3)                                      # 50 ms windows from one start: six
    assert set(series) == set(os.sched_getaffinity(0)) and {len(v) for v in series.values()} == {6}
    assert all(0 < t < 1.0 for v in series.values() for t in v)


def test_a_window_where_no_step_ended_takes_the_step_that_spans_it():
    from clustersim.calibration.hostspeed import windows_of
    ends = [(0.01, 0.01), (0.03, 0.02), (0.12, 0.09), (0.16, 0.04)]     # (end, seconds)
    assert windows_of(ends, 0.15, 0.05) == [0.015, 0.09, 0.09]


def test_a_runs_quiet_step_is_a_low_percentile_of_its_windows_medians():
    from clustersim.core.metrics import quiet_time
    # windows of 1 s: [0.5, 0.5] -> 0.5; [1.0] -> 1.0; [0.25] * 4 -> 0.25; [2.0] -> 2.0; a short last [0.1] dropped
    times = [0.5, 0.5, 1.0, 0.25, 0.25, 0.25, 0.25, 2.0, 0.1]
    assert quiet_time(times, window=1.0, pct=0, least=1) == 0.25
    assert quiet_time(times, window=1.0, pct=50, least=1) == pytest.approx(0.75)
    assert quiet_time(times, window=1.0, pct=100, least=1) == 2.0
    # two steps a window at least: [0.5, 0.5] -> 0.5; [1.0, 0.25] -> 0.625; [0.25] * 3 + [2.0] (1 s after 4) -> 0.25
    assert sorted(quiet_time(times, window=1.0, pct=p, least=2) for p in (0, 50, 100)) == \
        pytest.approx([0.25, 0.5, 0.625])
    assert quiet_time([0.1, 0.3, 0.2], window=1.0, pct=10) == 0.2      # no whole window: the one there is
    assert quiet_time([]) == 0.0


def test_the_host_s_quiet_speed_is_a_low_percentile_of_every_core_s_windows():
    from clustersim.calibration.hostspeed import quiet_reference
    series = {0: [float(t) for t in range(1, 11)], 1: [float(t) for t in range(11, 21)]}
    assert quiet_reference(series) == pytest.approx(2.9)          # the 10th percentile of 1..20


def test_probes_wait_for_the_host_to_run_quietly():
    from clustersim.calibration.probe import QUIET_TOLERANCE, quiet_probe
    def probe(brackets):
        seen = iter(brackets)
        runs = []

        def run():
            runs.append(len(runs))
            return len(runs) - 1
        return run, lambda: next(seen), runs
    run, bracket, runs = probe([1.0, 1.0])                          # quiet at once: one attempt
    assert quiet_probe(run, bracket, 1.0) == 0 and runs == [0]
    run, bracket, runs = probe([2.0, 1.0, 1.0, 3.0, 1.0, 1.0])      # slow before, then slow after, then quiet
    assert quiet_probe(run, bracket, 1.0) == 2 and runs == [0, 1, 2]
    run, bracket, runs = probe([2.0, 2.0, 1.5, 1.4, 3.0, 3.0])      # never quiet: the quickest brackets count
    assert quiet_probe(run, bracket, 1.0, tries=3) == 1 and runs == [0, 1, 2]
    run, bracket, runs = probe([1.0, 1.0, 1.0, 1.0])                 # another rank was slow: everyone retries
    slowest = iter([2.0, 1.0])
    assert quiet_probe(run, bracket, 1.0, slowest=lambda t: max(t, next(slowest))) == 1
    run, bracket, runs = probe([QUIET_TOLERANCE * 0.99, 1.0])       # within the tolerance
    assert quiet_probe(run, bracket, 1.0) == 0
    run, bracket, runs = probe([])                                  # no quiet speed known: once, unbracketed
    assert quiet_probe(run, bracket, None) == 0 and runs == [0]


def test_a_calibration_for_some_models_probes_only_theirs():
    from clustersim.calibration.probe import PROBES, probes_for
    assert probes_for(["mlp-digits"]) == tuple(p for p in PROBES if p[0] == "mlp-digits")
    assert probes_for(None) == probes_for([]) == PROBES
    assert probes_for(["mlp-digits", "a-model-of-its-own"]) == PROBES     # its ops may be any probe's


def test_a_light_zoo_model_without_a_probe_is_probed_itself_and_its_ops_get_costs():
    """U44: resnet-digits' convolutions took the dense kernels' curve (predicted at 0.13 of
    its measured step). Asked for, a light zoo model is probed itself, beside every probe;
    a heavy one is not (minutes of CPU), and its ops stay with the curve."""
    from clustersim.calibration.probe import OWN_BATCHES, PROBES, op_times, probes_for
    assert probes_for(["resnet-digits"]) == PROBES + (("resnet-digits", OWN_BATCHES),)
    assert probes_for(["gpt-tiny", "mlp-digits"]) == PROBES + (("gpt-tiny", OWN_BATCHES),)
    assert probes_for(["alexnet"]) == PROBES
    keys = op_times(repeats=1, passes=1, probes=(("resnet-digits", (8,)),))
    assert {"conv2d", "conv2d.backward", "conv2d.split", "add"} <= set(keys)


def test_calibrate_names_a_model_it_does_not_know_in_one_line(capsys):
    from clustersim.cli import main
    assert main(["calibrate", "--ranks", "1", "--models", "resnet-digits,nope", "--out", "/tmp/never.toml"]) == 2
    assert capsys.readouterr().err.startswith("clustersim: error: --models: nope: not a built-in model")
