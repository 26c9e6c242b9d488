"""Host noise replayed (``faults.host_noise``, docs/decisions/048): each host rank's measured
slowdown by window, as calibrate writes it.  Closed forms on a checked-in calibration: a
constant factor scales a one-rank run exactly, two windows give the time their work
takes, ranks that meet run as the slower one's static slowdown would, a replay with
nothing to change leaves the run (and a stall's time) untouched."""
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clustersim.calibration.host import topology_text
from clustersim.calibration.hostspeed import noise_series, pooled
from clustersim.compare import validate as cv
from clustersim.core.config import ConfigError
from clustersim.core.metrics import summarize
from clustersim.core.plan import plan
from clustersim.core.scenario import scenario_from_dict
from clustersim.core.topogen import load_topology
from sim.engine import simulate

HOST = Path(__file__).resolve().parent / "data" / "host-2-ranks.toml"


def noisy(tmp_path: Path, rank0: list[float], rank1: list[float], window_ms: float = 50.0) -> Path:
    """The checked-in 2-rank calibration with a noise series on each rank."""
    text = HOST.read_text().replace("\n\n", f"\nnoise_window_ms = {window_ms!r}\n\n", 1)
    for rank, series in (("rank0", rank0), ("rank1", rank1)):
        head, tail = text.split(f'name = "{rank}"\n', 1)
        text = head + f'name = "{rank}"\nnoise = {series!r}\n' + tail
    f = tmp_path / "noisy.toml"
    f.write_text(text)
    return f


def run(topology: Path, slots: int = 1, steps: int = 20, shortcut: bool = True, parallel=None, training=None,
        seed: int = 0, **faults):
    sc = scenario_from_dict({"cluster": {"topology": str(topology), "machines": 0},
                             "model": {"name": "mlp-digits", "batch_size": 16},
                             "parallel": {"model_parallel": slots, "split": "spatial", **(parallel or {})},
                             "training": {"steps": steps, **(training or {})}, "faults": faults}, "t.toml")
    p = plan(sc)
    return p, simulate(p, shortcut=shortcut, rng=np.random.default_rng(seed))


def test_a_constant_factor_scales_a_one_rank_run(tmp_path):
    _, quiet = run(HOST)
    _, slow = run(noisy(tmp_path, [2.0], [2.0]), host_noise=True)
    assert slow.sim_time_s == pytest.approx(2 * quiet.sim_time_s, rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_two_windows_take_the_time_their_work_needs(tmp_path, seed):
    """Work T (seconds on a quiet host), windows of W = T / 1.5 at 1x then 2x slower: W of
    work by W, the other 0.5 W at half speed by 2 W -- and 2 W from either window first
    (the seeds draw both)."""
    _, quiet = run(HOST)
    window = quiet.sim_time_s / 1.5
    _, noisy_run = run(noisy(tmp_path, [1.0, 2.0], [1.0, 2.0], window * 1e3), host_noise=True, seed=seed)
    assert noisy_run.sim_time_s == pytest.approx(2 * window, rel=1e-9)
    assert noisy_run.engine.noise_first == [1, 0, 1, 1][seed]          # both windows come first


def test_ranks_that_meet_run_at_the_slower_ones_speed(tmp_path):
    """One window for the whole run, rank0 2x slow in the first and rank1 in the second:
    the run is the one with that rank slowed statically (the replay's next window never
    moves the clock: the run ends long before it)."""
    topo = noisy(tmp_path, [2.0, 1.0], [1.0, 2.0], 1e6)
    p, replayed = run(topo, slots=2, host_noise=True)
    ends = {run(topo, slots=2, slowdown={rank: 2.0})[1].sim_time_s for rank in ("rank0", "rank1")}
    _, quiet = run(topo, slots=2)
    assert replayed.sim_time_s in ends
    assert min(ends) > 1.2 * quiet.sim_time_s
    assert summarize(p, replayed)["step_time_s"] > summarize(p, quiet)["step_time_s"]


def test_a_replay_with_nothing_to_change_leaves_runs_and_stalls_alone(tmp_path):
    topo = noisy(tmp_path, [1.0, 1.0], [1.0, 1.0], 0.05)
    local = {"parallel": {"replicas": 2}, "training": {"algorithm": "local", "local_steps": 5}}

    def endless(*_):
        raise TimeoutError("the replay kept a stalled run going")
    signal.signal(signal.SIGALRM, endless)
    signal.alarm(60)
    try:
        for faults in ({}, {"fail": [{"device": "rank1", "at_s": 2e-3}]}):
            _, quiet = run(topo, slots=1, **local, **faults)
            _, replayed = run(topo, slots=1, host_noise=True, **local, **faults)
            assert replayed.sim_time_s == quiet.sim_time_s and replayed.stalled_at_s == quiet.stalled_at_s
            assert replayed.trace.step_times() == quiet.trace.step_times()
    finally:
        signal.alarm(0)
    assert replayed.stalled_at_s is not None             # the other replica waits at the average for ever


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_stalled_run_under_real_noise_ends_at_its_last_event(tmp_path, seed):
    """Speed changes leave superseded timers behind the replay's; they and its next window
    are all that is left after a stall, and none may move the clock."""
    topo = noisy(tmp_path, [0.7, 2.0, 1.1], [1.1, 2.0, 0.7], 0.05)
    _, res = run(topo, slots=1, seed=seed, host_noise=True, fail=[{"device": "rank1", "at_s": 2e-3}],
                 parallel={"replicas": 2}, training={"algorithm": "local", "local_steps": 5})
    assert res.stalled_at_s is not None
    assert res.stalled_at_s == res.sim_time_s == max(sp.end_s for sp in res.trace.spans)


def test_the_engines_shortcut_and_plain_paths_agree_under_noise(tmp_path):
    topo = noisy(tmp_path, [0.8, 2.0, 0.6, 1.7], [1.0, 0.7, 2.5, 0.9], 1.0)      # faster than quiet too
    fast = run(topo, slots=2, host_noise=True)[1]
    plain = run(topo, slots=2, host_noise=True, shortcut=False)[1]
    assert fast.trace.step_times() == plain.trace.step_times() and fast.sim_time_s == plain.sim_time_s


def test_noise_series_are_the_mean_of_a_ranks_cores():
    series = {0: [1.0, 2.0], 1: [3.0, 4.0]}
    assert noise_series(series, 1) == [[2.0, 3.0]]
    assert noise_series(series, 2) == [[1.0, 2.0], [3.0, 4.0]]
    assert noise_series(series, 3)[2] == [1.0, 2.0]              # rank 2 shares core 0
    assert pooled([series, {0: [5.0], 1: [6.0]}]) == {0: [1.0, 2.0, 5.0], 1: [3.0, 4.0, 6.0]}


def test_a_speedup_checks_calibrations_share_one_pooled_noise(tmp_path, monkeypatch):
    """Each rank count's calibrations replay every calibration's core windows, mapped onto
    their ranks: one sample of the host's noise for both sides."""
    from clustersim import api
    written = {}
    monkeypatch.setattr(api, "_write_host", lambda out, ranks, res: written.__setitem__(out, (ranks, res["noise"])))
    runs = [(tmp_path / "one", 1, {"core_slowdowns": {0: [1.0], 1: [3.0]}, "noise": [[2.0]]}),
            (tmp_path / "two", 2, {"core_slowdowns": {0: [1.5, 1.0], 1: [1.0, 2.5]}, "noise": [[1.5, 1.0], [1.0, 2.5]]})]
    api._share_noise(runs)
    assert written[tmp_path / "one"] == (1, [[2.0, 1.25, 1.75]])
    assert written[tmp_path / "two"] == (2, [[1.0, 1.5, 1.0], [3.0, 1.0, 2.5]])


def test_calibrate_writes_series_that_load(tmp_path):
    """A window a rank spent stalled (a 95 ms step against a 181 us quiet one, seen in a
    calibration) is a slowdown of 500 and must load."""
    comp = {"peak_flops": 50e9, "op_overhead_s": 1e-6, "efficiency_curve": [(1e4, 1.0)]}
    mpi = {"alpha_s": 1e-6, "beta_bytes_per_s": 1e10, "r2": 1.0}
    f = tmp_path / "host.toml"
    f.write_text(topology_text("host", 2, 2, comp, 20e9, mpi, {}, noise=[[1.0, 1.5], [507.3, 0.9]]))
    topo = load_topology(str(f))
    assert topo.devices["rank0"].noise == (1.0, 1.5) and topo.devices["rank1"].noise == (507.3, 0.9)
    assert topo.noise_window_s == 0.05


def test_a_speedup_side_is_predicted_with_the_noise_and_quiet(tmp_path):
    topo = noisy(tmp_path, [2.0], [2.0])
    items = [f'cluster.topology="{topo}"', "cluster.machines=0", "model.batch_size=16", "training.steps=20"]
    scenario = tmp_path / "s.toml"
    scenario.write_text('name = "s"\n[cluster]\ntopology = "dgx-h100"\n[model]\nname = "mlp-digits"\n')
    side = cv.predicted_side(str(scenario), [*items, "faults.host_noise=true"])
    assert side["samples_per_s"] == pytest.approx(side["quiet_samples_per_s"] / 2, rel=1e-9)
    assert cv.predicted_side(str(scenario), items)["samples_per_s"] == side["quiet_samples_per_s"]


def test_a_speedup_side_replays_whole_passes_whichever_window_comes_first(tmp_path):
    """Windows at 1x and 2x: a pass holds twice as many quiet steps as slow ones, so the
    median step is the quiet one from either start (the seeds draw both)."""
    topo = noisy(tmp_path, [1.0, 2.0], [1.0, 2.0])
    scenario = tmp_path / "s.toml"
    scenario.write_text('name = "s"\n[cluster]\ntopology = "dgx-h100"\n[model]\nname = "mlp-digits"\n')
    steps = []
    for seed in (0, 1):                     # first windows 1 and 0 (``Engine._replay_noise``)
        items = [f'cluster.topology="{topo}"', "cluster.machines=0", "model.batch_size=16", "training.steps=20",
                 "faults.host_noise=true", f"seed={seed}"]
        side = cv.predicted_side(str(scenario), items)
        steps.append(side["step_time_s"])
        assert side["step_time_s"] == pytest.approx(16 / side["quiet_samples_per_s"], rel=1e-9)
    assert steps[0] == pytest.approx(steps[1], rel=1e-9)


def test_a_replayed_window_can_be_set_shorter(tmp_path):
    """Windows [1, 2] of W, replayed W / 4 long: the run's work T = 1.5 W' ends at 2 W'."""
    _, quiet = run(HOST)
    window = quiet.sim_time_s / 1.5
    _, replayed = run(noisy(tmp_path, [1.0, 2.0], [1.0, 2.0], window * 4e3), host_noise=True,
                      host_noise_window_s=window)
    assert replayed.sim_time_s == pytest.approx(2 * window, rel=1e-9)


@pytest.mark.parametrize("edit, field", [
    (lambda t: t.replace('name = "rank0"\n', 'name = "rank0"\nnoise = [1.0, "x"]\n'), "noise"),
    (lambda t: t.replace('name = "rank0"\n', 'name = "rank0"\nnoise = [1.0, 0.0]\n'), "noise"),
    (lambda t: t.replace('name = "rank0"\n', 'name = "rank0"\nnoise = [1.0, 2e6]\n'), "noise"),
    (lambda t: t.replace('name = "rank0"\n', 'name = "rank0"\nnoise = [1.0]\n')
              .replace('name = "rank1"\n', 'name = "rank1"\nnoise = [1.0, 2.0]\n'), "device.noise"),
    (lambda t: t.replace('kind = "switch"\n', 'kind = "switch"\nnoise = [1.0]\n'), "noise"),
    (lambda t: t.replace('\n\n', '\nnoise_window_ms = 1e-9\n\n', 1), "noise_window_ms"),
])
def test_bad_series_name_the_field(tmp_path, edit, field):
    f = tmp_path / "bad.toml"
    f.write_text(edit(HOST.read_text()))
    with pytest.raises(ConfigError) as err:
        load_topology(str(f))
    assert field in str(err.value)


@pytest.mark.parametrize("faults, field", [("host_noise = true", "faults.host_noise"),
                                           ("host_noise_window_s = 1e-12", "faults.host_noise_window_s")])
def test_bad_replays_are_one_line_and_exit_2(tmp_path, faults, field):
    scenario = tmp_path / "s.toml"
    scenario.write_text(f'name = "s"\n[cluster]\ntopology = "{HOST}"\nmachines = 0\n'
                        f'[model]\nname = "mlp-digits"\n[faults]\n{faults}\n')
    proc = subprocess.run([sys.executable, "-m", "clustersim", "simulate", str(scenario)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and field in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
