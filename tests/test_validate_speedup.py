"""``clustersim validate --against``: a speedup, B over A, run interleaved.  The ratios'
arithmetic is checked on a fake runner (closed forms), the calibration per rank count on a
fake calibrate, and the command end to end on real ranks with a checked-in topology (the
structure of its answer only: this host's noise is larger than any bound worth testing)."""
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

import clustersim
from clustersim import api
from clustersim.compare import validate as cv
from clustersim.core.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TOPOLOGY = ROOT / "tests" / "data" / "host-2-ranks.toml"
TINY = ('name = "tiny"\n[cluster]\ntopology = "dgx-h100"\n[model]\nname = "mlp-digits"\nbatch_size = 16\n'
        '[training]\nsteps = 20\n')


@pytest.fixture
def tiny(tmp_path):
    f = tmp_path / "tiny.toml"
    f.write_text(TINY)
    return f


def test_sides_alternate_and_every_other_round_starts_with_b():
    assert cv.speedup_order(3) == [(0, "a"), (0, "b"), (1, "b"), (1, "a"), (2, "a"), (2, "b")]
    assert cv.speedup_order(1) == [(0, "a"), (0, "b")]


def test_measured_speedup_is_the_median_of_the_rounds_ratios(tiny):
    rates = {"a": iter([100.0, 50.0, 100.0]), "b": iter([150.0, 100.0, 220.0])}   # ratios 1.5, 2.0, 2.2
    calls = []

    def run(scenario, items):
        side = "b" if "parallel.replicas=2" in items else "a"
        calls.append(side)
        rate = next(rates[side])
        return {"samples_per_s": rate, "step_time_s": 16 / rate, "quiet_step_time_s": 8 / rate}

    def predict(scenario, items):
        b = "parallel.replicas=2" in items
        return {"samples_per_s": 180.0 if b else 100.0, "step_time_s": 0.1, "ranks": 2 if b else 1}

    out = cv.speedup(str(tiny), [], ["parallel.replicas=2"], {"a": [str(TOPOLOGY)], "b": [str(TOPOLOGY)]}, 3,
                     predict=predict, run=run)
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert out["measured_speedups"] == [1.5, 2.0, 2.2]
    assert out["measured_speedup"] == 2.0
    assert out["predicted_speedup"] == 1.8
    assert out["speedup_error_pct"] == pytest.approx(-10.0)
    assert out["speedup_spread_pct"] == pytest.approx((2.2 - 1.5) / 2.0 * 100)
    assert out["quiet_speedup"] == 2.0                  # every run's quiet step is half its step
    assert out["a"]["measured_samples_per_s"] == statistics.median([100.0, 50.0, 100.0])
    assert (out["a"]["ranks"], out["b"]["ranks"]) == (1, 2)
    assert out["b"]["set"] == ["parallel.replicas=2"] and out["a"]["set"] == []


def test_the_quiet_hosts_prediction_is_checked_against_the_runs_quiet_windows(tiny):
    def run(scenario, items):
        rate = 200.0 if "parallel.replicas=2" in items else 100.0
        return {"samples_per_s": rate, "step_time_s": 16 / rate, "quiet_step_time_s": 8 / rate}

    def predict(scenario, items):          # replayed noise slows B more than A; quietly B is 2x
        b = "parallel.replicas=2" in items
        return {"samples_per_s": 120.0 if b else 90.0, "step_time_s": 0.1, "ranks": 1 + b,
                "quiet_samples_per_s": 200.0 if b else 100.0}
    out = cv.speedup(str(tiny), [], ["parallel.replicas=2"], {"a": ["t"], "b": ["t"]}, 1, predict=predict, run=run)
    assert out["predicted_speedup"] == pytest.approx(120.0 / 90.0)
    assert out["quiet_predicted_speedup"] == 2.0 and out["quiet_speedup"] == 2.0
    assert out["quiet_speedup_error_pct"] == 0.0


def test_a_checks_calibrations_are_rewritten_with_their_pooled_noise(tiny, monkeypatch):
    written = {}

    def calibrate(n, out, models):
        return {"core_slowdowns": {0: [float(n)], 1: [2.0 * n]}}
    monkeypatch.setattr(api, "calibrate_for", calibrate)
    monkeypatch.setattr(api, "_write_host", lambda out, ranks, res: written.__setitem__(Path(out).name, res["noise"]))
    monkeypatch.setattr(cv, "speedup", lambda *a, **k: {})
    clustersim.validate(tiny, against={"parallel.replicas": 2}, rounds=1, calibrations=2)
    # calibrated 1, 2, 2, 1 ranks: cores 0 and 1 pooled as [1, 2, 2, 1] and [2, 4, 4, 2]
    assert written["this-host-1-ranks-0.toml"] == [[1.5, 3.0, 3.0, 1.5]]
    assert written["this-host-2-ranks-1.toml"] == [[1.0, 2.0, 2.0, 1.0], [2.0, 4.0, 4.0, 2.0]]


def test_without_a_topology_each_rank_count_is_calibrated_in_alternating_rounds(tiny, monkeypatch):
    calibrated, given = [], {}

    def calibrate(n, out, models):
        assert models == ["mlp-digits"]
        calibrated.append(n)
        shutil.copy(TOPOLOGY, out)

    def speedup(scenario, items, more, topologies, rounds):
        given.update(topologies=topologies, items=items, more=more, rounds=rounds)
        return {}

    monkeypatch.setattr(api, "calibrate_for", calibrate)
    monkeypatch.setattr(cv, "speedup", speedup)
    clustersim.validate(tiny, ["training.steps=10"], against={"parallel.replicas": 2}, rounds=3)
    assert calibrated == [1, 2, 2, 1, 1, 2]                     # three each by default, alternating
    assert [Path(f).name for f in given["topologies"]["a"]] == [f"this-host-1-ranks-{k}.toml" for k in range(3)]
    assert [Path(f).name for f in given["topologies"]["b"]] == [f"this-host-2-ranks-{k}.toml" for k in range(3)]
    assert (given["items"], given["more"], given["rounds"]) == (["training.steps=10"], ["parallel.replicas=2"], 3)
    calibrated.clear()
    clustersim.validate(tiny, ["faults.host_noise=true"], against={"parallel.replicas": 2}, rounds=1,
                        calibrations=1)     # replayed on the calibrations: the scenario's own topology has none
    assert calibrated == [1, 2] and given["items"] == ["faults.host_noise=true"]
    calibrated.clear()
    for bad, field in ((["faults.host_noise_windows_s=0.01"], "host_noise_windows_s"),
                       (["faults.host_noise=maybe"], "faults.host_noise")):
        with pytest.raises(ConfigError, match=field):          # before any calibration
            clustersim.validate(tiny, bad, against={"parallel.replicas": 2}, rounds=1, calibrations=1)
    assert calibrated == []
    calibrated.clear()
    clustersim.validate(tiny, against=["training.learning_rate=0.05"], rounds=1, calibrations=2)   # 1 rank each
    assert calibrated == [1, 1]
    assert given["topologies"]["a"] == given["topologies"]["b"]


def test_a_side_is_predicted_as_the_median_over_its_calibrations(tiny):
    """One calibration a neighbour slowed (A's 50) moves neither side's median: the
    predicted speedup is B's median over A's, not a median of per-calibration ratios."""
    predicted = {"a0": 100.0, "a1": 50.0, "a2": 104.0, "b0": 130.0, "b1": 150.0, "b2": 140.0}
    runs = []

    def predict(scenario, items):
        topo = next(i for i in items if i.startswith("cluster.topology="))
        key = Path(topo.split('"')[1]).name
        return {"samples_per_s": predicted[key], "step_time_s": 1 / predicted[key], "ranks": 1 + (key[0] == "b")}

    def run(scenario, items):
        runs.append(next(i for i in items if i.startswith("cluster.topology=")))
        return {"samples_per_s": 10.0, "step_time_s": 0.1, "quiet_step_time_s": 0.1}

    out = cv.speedup(str(tiny), [], ["parallel.replicas=2"], {"a": ["a0", "a1", "a2"], "b": ["b0", "b1", "b2"]}, 2,
                     predict=predict, run=run)
    assert out["predicted_speedup"] == pytest.approx(140.0 / 100.0)  # per-pair ratios' median: 1.35
    assert out["a"]["predicted_samples_per_s"] == 100.0 and out["b"]["predicted_samples_per_s"] == 140.0
    assert out["a"]["predicted_calibrations_samples_per_s"] == [100.0, 50.0, 104.0]
    assert out["a"]["predicted_spread_pct"] == pytest.approx((104.0 - 50.0) / 100.0 * 100)
    assert out["calibrations"] == 3
    assert all(Path(t.split('"')[1]).name in ("a0", "b0") for t in runs)      # the runs read the first


def test_sides_on_the_same_calibrations_pair_them_and_steps_follow_the_median_rate(tiny):
    """Both sides on one rank count share each calibration: the ratio per calibration
    (2.0, 1.15, 1.19 -> 1.19), not the ratio of medians (1.46).  With an even count of
    calibrations a side's step time is the one its median rate gives."""
    predicted = {"t0": (100.0, 200.0), "t1": (130.0, 150.0), "t2": (160.0, 190.0), "t3": (170.0, 10.0)}

    def predict(scenario, items):
        key = Path(next(i for i in items if i.startswith("cluster.topology=")).split('"')[1]).name
        rate = predicted[key]["parallel.replicas=2" in items]
        return {"samples_per_s": rate, "step_time_s": 16 / rate, "ranks": 1}

    def run(scenario, items):
        return {"samples_per_s": 10.0, "step_time_s": 0.1, "quiet_step_time_s": 0.1}
    out = cv.speedup(str(tiny), [], ["parallel.replicas=2"], {"a": ["t0", "t1", "t2"], "b": ["t0", "t1", "t2"]}, 1,
                     predict=predict, run=run)
    assert out["predicted_speedup"] == pytest.approx(190.0 / 160.0)
    out = cv.speedup(str(tiny), [], ["parallel.replicas=2"], {"a": ["t0", "t1", "t2", "t3"], "b": ["t0"]}, 1,
                     predict=predict, run=run)
    assert out["a"]["predicted_samples_per_s"] == 145.0            # (130 + 160) / 2
    assert out["a"]["predicted_step_time_s"] == pytest.approx(16 / 145.0)
    steps = {"t0": 0.5, "t1": 0.2, "t2": 0.3}              # asynchronous: samples a step differ

    def predict_async(scenario, items):
        key = Path(next(i for i in items if i.startswith("cluster.topology=")).split('"')[1]).name
        return {"samples_per_s": predicted[key][0], "step_time_s": steps[key], "ranks": 1}
    out = cv.speedup(str(tiny), [], ["parallel.replicas=2"], {"a": ["t0", "t1", "t2"], "b": ["t0"]}, 1,
                     predict=predict_async, run=run)
    assert out["a"]["predicted_step_time_s"] == 0.3


@pytest.mark.parametrize("args, field", [(["--rounds", "0"], "--rounds"), (["--calibrations", "0"], "--calibrations"),
                                         (["--against", "parallel.nope=2"], "nope"),
                                         (["--plot", "x.png"], "--plot"), (["--ops"], "--ops"),
                                         (["--repeats", "2"], "--repeats"), (["--device", "gpu"], "--device")])
def test_bad_speedup_input_is_one_line_and_exit_2(tiny, args, field):
    """U44: --repeats with --against, and --device gpu, were silently ignored."""
    base = ["--against", "parallel.replicas=2"] if "--against" not in args else []
    proc = subprocess.run([sys.executable, "-m", "clustersim", "validate", str(tiny), "--topology", str(TOPOLOGY),
                           *base, *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and field in proc.stderr


def test_two_replicas_against_two_pipeline_stages_on_real_ranks(tiny):
    """One round (the order and the median over rounds: the fake runner's test above), both
    sides on the 2-rank calibration they were measured for."""
    proc = subprocess.run([sys.executable, "-m", "clustersim", "validate", str(tiny), "--topology", str(TOPOLOGY),
                           "--set", "parallel.replicas=2", "--against", "parallel.replicas=1",
                           "--against", "parallel.model_parallel=2", "--against", 'parallel.split="layers"',
                           "--rounds", "1", "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    a, b = out["a"], out["b"]
    assert (a["ranks"], b["ranks"]) == (2, 2) and a["unmeasured_ops"] == b["unmeasured_ops"] == []
    assert len(a["measured_runs_samples_per_s"]) == len(b["measured_runs_samples_per_s"]) == 1
    assert out["predicted_speedup"] == pytest.approx(b["predicted_samples_per_s"] / a["predicted_samples_per_s"])
    ratios = [rb / ra for ra, rb in zip(a["measured_runs_samples_per_s"], b["measured_runs_samples_per_s"])]
    assert out["measured_speedups"] == pytest.approx(ratios)
    assert out["speedup_error_pct"] == pytest.approx(cv.error_pct(out["predicted_speedup"], out["measured_speedup"]))
    # sync: samples/s is batch x replicas over the step, in both runners
    assert a["predicted_samples_per_s"] == pytest.approx(2 * 16 / a["predicted_step_time_s"])
    assert b["predicted_samples_per_s"] == pytest.approx(16 / b["predicted_step_time_s"])


@pytest.mark.parametrize("sets, against, words", [
    ([], ["parallel.replicas=2"], "was calibrated for 2 ranks; the run (side A) takes 1"),
    (["parallel.replicas=2", "parallel.ps_shards=1"], [], "was calibrated for 2 ranks; the run takes 3")])
def test_a_topology_calibrated_for_other_ranks_is_refused(tiny, sets, against, words):
    """U44: a 1-rank side predicted on a 2-rank calibration (+35% speedup error), a shard
    placed on a worker's calibrated device (-75%), without a word."""
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        clustersim.validate(tiny, sets, topology=TOPOLOGY, against=against, **({"rounds": 1} if against else {}))


def test_ops_calibrate_never_measured_are_named():
    """U44: resnet_digits on a dense-only calibration was predicted 7x fast, silently."""
    from clustersim.core.plan import plan
    from clustersim.core.scenario import scenario_from_dict
    p = plan(scenario_from_dict({"cluster": {"topology": str(TOPOLOGY), "machines": 0},
                                 "model": {"name": "resnet-digits", "batch_size": 16}}, "t.toml"))
    keys = cv.unmeasured_ops(p)
    assert "conv2d" in keys and "conv2d.backward" in keys and "dense" not in keys
    dense = plan(scenario_from_dict({"cluster": {"topology": str(TOPOLOGY), "machines": 0},
                                     "model": {"name": "mlp-digits", "batch_size": 16}}, "t.toml"))
    assert cv.unmeasured_ops(dense) == []
    assert cv.unmeasured_ops(plan(scenario_from_dict({"cluster": {"topology": "dgx-h100"},
                                                      "model": {"name": "resnet-digits"}}, "t.toml"))) == []


def test_a_hand_written_topology_with_message_costs_is_no_calibration():
    """Review R42: distbelief-2012's send and receive costs made it a 32-rank
    calibration, refusing an 8-rank job; only calibrate's step cost marks one."""
    api._calibrated_for("distbelief-2012", 8)
    with pytest.raises(ConfigError, match="was calibrated for 2 ranks"):
        api._calibrated_for(TOPOLOGY, 8)


@pytest.mark.parametrize("option", ["--rounds", "--calibrations"])
def test_a_speedup_option_without_against_is_refused(tiny, option, capsys):
    """U44: --rounds and --calibrations without --against were silently ignored."""
    from clustersim.cli import main
    assert main(["validate", str(tiny), "--topology", str(TOPOLOGY), option, "2"]) == 2
    assert capsys.readouterr().err.startswith(f"clustersim: error: {option}: 2: counts a speedup check's runs")
    with pytest.raises(ConfigError, match="only with --against"):        # the API says the same (R45)
        clustersim.validate(tiny, topology=TOPOLOGY, **{option[2:]: 2})
    with pytest.raises(ConfigError, match="each side runs --rounds times"):
        clustersim.validate(tiny, topology=TOPOLOGY, against={"parallel.replicas": 2}, repeats=2)
