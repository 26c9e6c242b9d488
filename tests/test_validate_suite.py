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


def test_every_verb_is_the_api_s_even_after_every_subpackage_is_imported():
    """A subpackage named like a verb would shadow it once imported (``clustersim.calibrate``
    did, and ``make validate`` failed on its first calibration)."""
    import pkgutil
    from clustersim import api
    for info in pkgutil.walk_packages(clustersim.__path__, "clustersim."):
        importlib.import_module(info.name)
    for verb in clustersim.VERBS:
        assert getattr(clustersim, verb) is getattr(api, verb), verb
