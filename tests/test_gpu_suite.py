"""make validate-gpu (scenarios/validation/gpu.py) where no GPU is: one line, exit 0; and
every case of its suite is a job the executor takes and the simulator plans."""
import importlib.util
from pathlib import Path

import pytest

import clustersim
from clustersim.core.plan import plan
from executor.checks import check

SCRIPT = Path(__file__).resolve().parents[1] / "scenarios" / "validation" / "gpu.py"


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("validation_gpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_without_a_gpu_it_says_so_in_one_line_and_exits_0(suite, monkeypatch, capsys):
    monkeypatch.setattr(suite, "visible_gpus", lambda: 0)
    assert suite.main() == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "no GPU is visible" in out


def test_the_suite_spans_1_to_8_gpus_and_every_case_plans(suite):
    needs = []
    for name, sets in suite.CASES:
        sc = clustersim.load(suite.BASE, sets)
        n = clustersim.ranks_needed(sc)
        check(sc, n)
        assert plan(sc).ops, name
        needs.append(n)
    assert {1, 2, 4, 8} <= set(needs) and max(needs) == 8


def test_measured_nccl_busbw_is_set_beside_the_model_on_the_calibrated_topology(suite, tmp_path):
    """Rows measured by calibrate --gpu (here: the model's own busbw scaled by 1.25) get the
    collective model's busbw on the written topology and the error in percent."""
    from clustersim.calibration.gpu import gpu_topology_text
    from test_gpucal import result
    path = tmp_path / "g4.toml"
    path.write_text(gpu_topology_text("g4", result(4)))
    sizes = [2**20, 2**26]
    model = clustersim.collective(path, "allreduce", "auto", sizes)
    measured = [{"bytes": m["bytes"], "busbw_gbps": 1.25 * m["busbw_gbps"]} for m in model]
    rows = suite.nccl_rows(measured, path)
    assert [r["bytes"] for r in rows] == sizes
    for r, m in zip(rows, model):
        assert r["predicted_busbw_gbps"] == pytest.approx(m["busbw_gbps"]) and r["algo"] == m["algo"]
        assert r["error_pct"] == pytest.approx(-20.0)
    assert suite.nccl_rows([], path) == []
