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
