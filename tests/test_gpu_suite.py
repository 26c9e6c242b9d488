"""make validate-gpu (scenarios/validation/gpu.py) where no GPU is: one line, exit 0; and
every case of its suite is a job the executor takes and the simulator plans."""
import importlib.util
import json
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
        check(sc, clustersim.ranks_needed(sc))
        assert plan(sc).ops, name
        needs.append(suite.gpus_needed(sc))
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


def test_a_failing_case_is_named_and_the_others_still_run_and_are_saved(suite, monkeypatch, tmp_path, capsys):
    """A one-shot run on a lent GPU host: a case that fails is one FAILED line and exit 1,
    the cases after it run, and the JSON holds every case that ran (saved after each)."""
    from clustersim.core.config import ConfigError
    monkeypatch.setattr(suite, "OUT", tmp_path / "v.json")
    monkeypatch.setattr(suite, "visible_gpus", lambda: 2)
    costs = {"dense": {"fixed_s": 2e-4, "flops_per_s": 5e13, "bytes_per_s": 0.0}}
    monkeypatch.setattr(suite.clustersim, "calibrate_gpus", lambda out: {"nccl_allreduce": [], "gpu": {"op_costs": costs}})
    ran = []

    def validate(path, sets, **kw):
        ran.append(sets)
        if len(ran) == 2:
            raise RuntimeError("rank 0: Traceback ...\ncupy.cuda.memory.OutOfMemoryError: out of memory")
        step = 0.01 * len(ran)
        return clustersim.Result({"predicted_step_time_s": step, "measured_step_time_s": step * 1.1,
                                  "error_pct": -100 / 11, "quiet_step_time_s": step, "quiet_error_pct": 0.0,
                                  "phases": {"compute": {"predicted_s": step}}, "ops": [{"op": "dense", "predicted_s": step}]})
    monkeypatch.setattr(suite.clustersim, "validate", validate)
    assert suite.main() == 1
    out = capsys.readouterr().out
    fits = [name for name, sets in suite.CASES if suite.gpus_needed(clustersim.load(suite.BASE, sets)) <= 2]
    assert len(ran) == len(fits) > 2
    saved = json.loads((tmp_path / "v.json").read_text())
    assert [c["case"] for c in saved["cases"]] == fits[:1] + fits[2:] and saved["op_costs"] == costs
    assert saved["cases"][0]["ops"] == [{"op": "dense", "predicted_s": 0.01}] and "compute" in saved["cases"][0]["phases"]
    assert saved["failed"] == [f"{fits[1]}: RuntimeError: cupy.cuda.memory.OutOfMemoryError: out of memory"]
    assert f"FAILED {saved['failed'][0]}" in out and saved["median_abs_error_pct"] == pytest.approx(100 / 11)
    assert all("needs" in s and "2 visible" in s for s in saved["skipped"])
    monkeypatch.setattr(suite.clustersim, "calibrate_gpus", lambda out: (_ for _ in ()).throw(ConfigError("--gpu", "", "no")))
    assert suite.main() == 1 and json.loads((tmp_path / "v.json").read_text())["cases"] == []
