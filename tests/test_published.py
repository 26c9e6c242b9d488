"""The published-measurement suite: every case file is well formed and cites its source;
``clustersim published`` predicts a case as the collective and simulate commands do."""
from pathlib import Path

import pytest

from clustersim import api
from clustersim.cli import main
from clustersim.compare.published import load_case, score

SUITE = Path(__file__).resolve().parents[1] / "scenarios" / "published"
CASE = '''name = "tiny"
[reference]
source = "a test"
hardware = "none"
metric = "busbw"
unit = "GB/s"
value = 100.0
[collective]
topology = "dgx-h100"
op = "allreduce"
algo = "ring"
bytes = 1048576
'''


@pytest.mark.parametrize("path", sorted(SUITE.glob("*.toml")), ids=lambda p: p.stem)
def test_every_case_names_its_source_hardware_and_value(path):
    case = load_case(path)
    assert case["source"] and case["hardware"] and case["published"] > 0 and case["unit"]
    assert case["kind"] in ("collective", "scenario")


def test_a_case_is_predicted_as_the_collective_command_does(tmp_path):
    (tmp_path / "tiny.toml").write_text(CASE)
    [row] = api.published(tmp_path)
    [ref] = api.collective("dgx-h100", "allreduce", "ring", [2**20])
    assert row["predicted"] == pytest.approx(ref["busbw_gbps"])
    assert row["error_pct"] == pytest.approx(100 * (ref["busbw_gbps"] - 100) / 100)
    assert score([row, {**row, "error_pct": -50.0, "fitted": True}]) == {
        "cases": 1, "median_abs_error_pct": abs(row["error_pct"]), "worst_abs_error_pct": abs(row["error_pct"])}


def test_cases_run_at_once_come_back_in_file_order(tmp_path):
    """``--jobs``: cases predicted in worker processes, rows in file-name order as one at a
    time gives them (the sizes make every row differ; the slowest case first in the files)."""
    for name, size in (("a", 2**30), ("b", 2**20), ("c", 2**10)):
        (tmp_path / f"{name}.toml").write_text(CASE.replace('"tiny"', f'"{name}"').replace("1048576", str(size)))
    one = api.published(tmp_path)
    assert [r["name"] for r in one] == ["a", "b", "c"] and len({r["predicted"] for r in one}) == 3
    assert api.published(tmp_path, jobs=2) == one
    assert main(["published", "--dir", str(tmp_path), "--jobs", "0"]) == 2


@pytest.mark.parametrize("old,new,field", [("value = 100.0", "value = -1", "reference.value"),
                                           ("bytes = 1048576", 'bytes = 1048576\nnccl = "2.x"', "collective.nccl")])
def test_a_bad_case_is_one_line_naming_the_field(tmp_path, capsys, old, new, field):
    (tmp_path / "bad.toml").write_text(CASE.replace(old, new))
    assert main(["published", "--dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"bad.toml: {field}" in err


def test_a_case_runs_the_nccl_version_it_names(tmp_path):
    """NVLS at 1 MiB on one DGX H100: NCCL 2.18 leaves half its channels idle there
    (decision 028), so the case naming 2.18.5 predicts a lower busbw than 2.20.3's."""
    nvls = CASE.replace('algo = "ring"', 'algo = "nvls"')
    (tmp_path / "a.toml").write_text(nvls)
    (tmp_path / "b.toml").write_text(nvls.replace('name = "tiny"', 'name = "old"') + 'nccl = "2.18.5"\n')
    rows = {r["name"]: r["predicted"] for r in api.published(tmp_path)}
    [new] = api.collective("dgx-h100", "allreduce", "nvls", [2**20])
    assert rows["tiny"] == pytest.approx(new["busbw_gbps"]) and rows["old"] < rows["tiny"]


def test_tflops_per_gpu_is_the_publications_flops_over_the_predicted_step_and_devices(tmp_path):
    """A scenario case scored in the paper's unit: its FLOPs per step (as the paper counts
    them) over the simulated step time and every device the step uses."""
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "base.toml").write_text((SUITE.parent / "quickstart.toml").read_text())
    sets = {"model.name": "mlp-digits", "parallel.replicas": 2, "training.steps": 2}
    case = CASE.split("[collective]")[0].replace('unit = "GB/s"', 'unit = "TFLOP/s"') + (
        '[scenario]\nfile = "s/base.toml"\nmetric = "tflops_per_gpu"\nflops_per_step = 3e9\nset = '
        + "{" + ", ".join(f'"{k}" = {v!r}' if isinstance(v, int) else f'"{k}" = "{v}"' for k, v in sets.items()) + "}\n")
    (tmp_path / "flops.toml").write_text(case)
    [row] = api.published(tmp_path)
    run = api.simulate(tmp_path / "s" / "base.toml", sets).data
    assert run["devices"] == 2
    assert row["predicted"] == pytest.approx(3e9 / (2 * run["step_time_s"]) / 1e12)
    (tmp_path / "flops.toml").write_text(case.replace("flops_per_step = 3e9\n", ""))
    assert main(["published", "--dir", str(tmp_path)]) == 2


def test_the_default_suite_is_found_outside_the_checkout(tmp_path, monkeypatch):
    """Installed, the cases were looked for at site-packages/scenarios/published (a new
    user's `clustersim published` found none): they ship as clustersim.builtin_scenarios,
    with the scenarios their ``file`` keys start from."""
    from importlib import resources
    packaged = Path(str(resources.files("clustersim.builtin_scenarios"))) / "published"
    assert sorted(p.name for p in packaged.glob("*.toml")) == sorted(p.name for p in SUITE.glob("*.toml"))
    for case in packaged.glob("*.toml"):
        for line in case.read_text().splitlines():
            if line.startswith("file = "):
                assert (case.parent / line.split('"')[1]).is_file(), case.name
    monkeypatch.chdir(tmp_path)
    seen = []
    monkeypatch.setattr("clustersim.compare.published.case_files", lambda d: seen.append(d) or [])
    assert api.published() == [] and seen == [packaged]


@pytest.mark.slow
def test_the_wheel_holds_the_published_cases_and_their_scenarios(tmp_path):
    """``pip wheel`` (make test-all): every case and every scenario a case starts from is in it."""
    import subprocess
    import sys
    import zipfile
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(tmp_path), str(root)],
                   check=True, capture_output=True, timeout=600)
    names = set(zipfile.ZipFile(next(tmp_path.glob("clustersim-*.whl"))).namelist())
    for case in SUITE.glob("*.toml"):
        assert f"clustersim/builtin_scenarios/published/{case.name}" in names
        for line in case.read_text().splitlines():
            if line.startswith("file = "):
                assert f"clustersim/builtin_scenarios/{line.split('/')[-1].rstrip(chr(34))}" in names
