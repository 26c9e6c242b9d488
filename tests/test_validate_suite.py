"""make validate's speedup table (scenarios/validation/run.py): every pair names two cases
of the suite that differ in how they split the same model, and a pair's figures are
``suite_speedup``'s closed forms over the rounds."""
import importlib.util
from pathlib import Path

import pytest

import clustersim

HERE = Path(__file__).resolve().parents[1] / "scenarios" / "validation"


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("validation_run", HERE / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_pair_is_two_cases_of_one_model_and_batch(suite):
    for a, b in suite.PAIRS:
        sa, sb = (clustersim.load(HERE / f"{name}.toml") for name in (a, b))
        assert (sa.model.name, sa.batch_size) == (sb.model.name, sb.batch_size), (a, b)


def test_a_pair_s_speedup_is_the_median_of_its_rounds_ratios(suite, capsys):
    def rnd(pred, runs):
        return {"predicted_samples_per_s": pred, "measured_runs_samples_per_s": runs}
    rounds = {"mlp-1rank": [rnd(100.0, [90.0, 100.0, 110.0]), rnd(100.0, [50.0, 60.0]), rnd(110.0, [100.0])],
              "mlp-allreduce-2": [rnd(150.0, [150.0]), rnd(160.0, [100.0, 110.0, 140.0]), rnd(165.0, [220.0])]}
    out = suite.speedups(rounds)
    (row,) = out["pairs"]                      # only the pair whose cases both ran
    assert row["measured_speedups"] == [1.5, 110.0 / 55.0, 2.2]
    assert row["measured_speedup"] == 2.0
    assert row["predicted_speedup"] == 1.6         # B's median prediction over A's (160 / 100)
    assert row["speedup_error_pct"] == pytest.approx(-20.0)
    assert out["median_abs_error_pct"] == out["worst_abs_error_pct"] == pytest.approx(20.0)
    assert "mlp-1rank -> mlp-allreduce-2" in capsys.readouterr().out


def test_a_pair_s_quiet_speedup_is_its_rounds_runs_at_their_quiet_windows(suite):
    def rnd(pred, runs, quiet):          # runs' rates; each run's quiet step a fraction of its step
        return {"predicted_samples_per_s": pred, "measured_runs_samples_per_s": runs,
                "measured_runs_s": [1.0 / r for r in runs], "quiet_runs_s": [q / r for q, r in zip(quiet, runs)]}
    a = [rnd(100.0, [100.0], [0.5]), rnd(100.0, [80.0, 100.0], [0.5, 1.0])]     # quiet rates 200; 160 and 100
    b = [rnd(150.0, [150.0], [1.0]), rnd(150.0, [300.0], [0.75])]                # 150; 400
    out = suite.suite_speedup(a, b)
    assert out["quiet_speedup"] == pytest.approx((150.0 / 200.0 + 400.0 / 130.0) / 2)
    assert out["quiet_speedup_error_pct"] == pytest.approx((1.5 / out["quiet_speedup"] - 1) * 100)
    assert "quiet_speedup" not in suite.suite_speedup([{k: v for k, v in r.items() if k != "quiet_runs_s"} for r in a], b)


def test_cases_on_the_same_calibrations_pair_their_predictions_round_by_round(suite):
    """Two cases of one rank count share each round's calibration: the ratio per round
    cancels its error (A 100, 130, 160 against B 200, 150, 190: 2.0, 1.15, 1.19 -> 1.19),
    where the ratio of medians (190 / 130 = 1.46) would not."""
    def rnd(pred, topo):
        return {"predicted_samples_per_s": pred, "measured_runs_samples_per_s": [1.0], "topology": topo}
    a = [rnd(100.0, "t0"), rnd(130.0, "t1"), rnd(160.0, "t2")]
    b = [rnd(200.0, "t0"), rnd(150.0, "t1"), rnd(190.0, "t2")]
    assert suite.suite_speedup(a, b)["predicted_speedup"] == pytest.approx(190.0 / 160.0)
    b = [{**r, "topology": r["topology"] + "-other"} for r in b]
    assert suite.suite_speedup(a, b)["predicted_speedup"] == pytest.approx(190.0 / 130.0)


def test_every_verb_is_the_api_s_even_after_every_subpackage_is_imported():
    """A subpackage named like a verb would shadow it once imported (``clustersim.calibrate``
    did, and ``make validate`` failed on its first calibration)."""
    import pkgutil
    from clustersim import api
    for info in pkgutil.walk_packages(clustersim.__path__, "clustersim."):
        importlib.import_module(info.name)
    for verb in clustersim.VERBS:
        assert getattr(clustersim, verb) is getattr(api, verb), verb
