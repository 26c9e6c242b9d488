"""What a new user gives ``sweep``: list and table values to vary, ``--resume`` pointed at
another run's files (refused in one line, nothing overwritten), and two varied keys
plotted as a line per value of the second, efficiency only within a line."""
import json
import shutil
from pathlib import Path

import pytest

from clustersim.cli import main
from clustersim.cli.sweep import split_values
from clustersim.plots import sweep_series

ROOT = Path(__file__).resolve().parents[1]
QUICK = str(ROOT / "scenarios" / "quickstart.toml")
STEPS = ["--set", "training.steps=2"]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_vary_splits_only_at_top_level_commas_so_lists_and_tables_can_be_varied(capsys):
    code, out, err = run(capsys, "sweep", QUICK, *STEPS, "--set", "parallel.replicas=1", "--set",
                         "parallel.model_parallel=2", "--vary", "parallel.grid=[1,2],[2,1]", "--json")
    assert (code, err) == (0, "")
    assert [p["parallel.grid"] for p in json.loads(out)] == [[1, 2], [2, 1]]
    code, out, err = run(capsys, "sweep", QUICK, *STEPS, "--vary", 'faults.fail=[{device="m0.gpu0", at_s=0.0}],[]',
                         "--json")
    points = json.loads(out)
    assert [p["faults.fail"] for p in points] == [[{"device": "m0.gpu0", "at_s": 0.0}], []]
    assert not any("error" in p for p in points)
    # commas inside quotes stay too; each piece is then read as --set reads a value
    assert split_values('"a,b",\'c,[\',[{x=1,y=[2,3]}],4') == ['"a,b"', "'c,['", "[{x=1,y=[2,3]}]", "4"]
    assert split_values(r'"a\",b",c') == [r'"a\",b"', "c"]
    for bad, why in (("parallel.replicas=1,2,", "empty value"), ("parallel.replicas=1,,2", "empty value"),
                     ("parallel.grid=[1,2", "unclosed bracket"), ('model.name="gpt2', 'unclosed "')):
        code, out, err = run(capsys, "sweep", QUICK, *STEPS, "--vary", bad)      # ran a bad point, exit 0
        assert code == 2 and why in err and len(err.strip().splitlines()) == 1, bad


def test_a_resume_over_fewer_values_keeps_the_earlier_points(tmp_path, capsys):
    """Resuming with a smaller grid wrote only that grid: the other points already run were lost."""
    prefix = str(tmp_path / "run")
    assert main(["sweep", QUICK, *STEPS, "--vary", "parallel.replicas=1,2,4", "--out", prefix]) == 0
    assert main(["sweep", QUICK, *STEPS, "--vary", "parallel.replicas=1,2", "--out", prefix, "--resume"]) == 0
    capsys.readouterr()
    assert sorted(p["parallel.replicas"] for p in json.loads(Path(prefix + ".json").read_text())) == [1, 2, 4]


@pytest.fixture
def earlier(tmp_path, capsys):
    """A finished sweep of quickstart at ``tmp_path/out/run``: its prefix and its files' bytes."""
    prefix = str(tmp_path / "out" / "run")
    assert main(["sweep", QUICK, *STEPS, "--vary", "training.allreduce=ring,tree", "--out", prefix]) == 0
    capsys.readouterr()
    return prefix, files(tmp_path / "out")


def files(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in folder.iterdir()}


def test_resume_refuses_another_scenario_set_or_varied_key_in_one_line_and_keeps_the_files(earlier, tmp_path,
                                                                                            capsys):
    prefix, held = earlier
    other = tmp_path / "other.toml"
    shutil.copy(QUICK, other)
    for argv, says in [([str(other), *STEPS, "--vary", "training.allreduce=ring,tree"], f"scenario quickstart there, "
                        f"{other.resolve()} here"),
                       ([QUICK, "--set", "training.steps=3", "--vary", "training.allreduce=ring,tree"],
                        "--set training.steps=2 there, training.steps=3 here"),
                       ([QUICK, *STEPS, "--vary", "parallel.replicas=1,2"],
                        "--vary keys training.allreduce there, parallel.replicas here")]:
        code, out, err = run(capsys, "sweep", *argv, "--out", prefix, "--resume")
        assert (code, out) == (2, "")
        assert err.count("\n") == 1 and f"{prefix}.json: holds another run (" in err and says in err, err
        assert files(tmp_path / "out") == held


def test_resume_takes_the_same_run_by_builtin_name_and_the_last_set_of_a_key(earlier, capsys):
    prefix, _ = earlier
    points = json.loads(Path(prefix + ".json").read_text())
    Path(prefix + ".json").write_text(json.dumps([dict(p, wall_s=-1.0) for p in points]))
    code, out, _ = run(capsys, "sweep", "quickstart", "--set", "training.steps=1", *STEPS,
                       "--vary", "training.allreduce=ring,tree", "--out", prefix, "--resume", "--json")
    assert code == 0 and [p["wall_s"] for p in json.loads(out)] == [-1.0, -1.0]


def test_resume_refuses_points_with_no_record_of_their_run(earlier, capsys):
    """As a PREFIX.json written before the record was kept."""
    prefix, held = earlier
    Path(prefix + ".run.json").unlink(missing_ok=True)
    code, out, err = run(capsys, "sweep", QUICK, *STEPS, "--vary", "training.allreduce=ring,tree", "--out", prefix,
                         "--resume")
    assert (code, out) == (2, "") and err.count("\n") == 1
    assert f"{prefix}.json: cannot tell what run it holds" in err
    assert Path(prefix + ".json").read_bytes() == held["run.json"]


def test_a_fresh_run_over_another_drops_the_old_record_before_the_points_change(earlier, monkeypatch, capsys):
    """Cut short after its first file, a new run leaves no record that passes its points as the old run's."""
    from clustersim import api
    prefix, _ = earlier
    writes = []
    monkeypatch.setattr(api, "write_atomic", lambda path, text: writes.append(
        (Path(str(path)).name, Path(prefix + ".run.json").exists())))
    assert main(["sweep", QUICK, *STEPS, "--vary", "parallel.replicas=1", "--out", prefix]) == 0
    assert writes[:3] == [("run.json", False), ("run.csv", False), ("run.run.json", False)]


def points(rows):
    """Closed-form sweep points: replicas x batch, devices = replicas, 80% scaling per doubling."""
    return [{"parallel.replicas": r, "model.batch_size": b, "devices": r, "samples_per_s": b * r * 0.8 ** (r // 2)}
            for r, b in rows]


GRID = [(1, 32), (1, 512), (2, 32), (2, 512), (4, 32), (4, 512)]


def test_two_varied_keys_plot_a_line_per_value_of_the_second_and_efficiency_within_it():
    ticks, series = sweep_series(points(GRID), ["parallel.replicas", "model.batch_size"])
    assert ticks == ["1", "2", "4"]
    assert [s["label"] for s in series] == ["model.batch_size=32", "model.batch_size=512"]
    for s in series:
        assert s["x"] == [0, 1, 2]
        assert s["speedup"] == pytest.approx([1, 2 * 0.8, 4 * 0.64])
        assert s["efficiency"] == pytest.approx([1, 0.8, 0.64])
    # batch on the x axis: the devices do not change along a line, so no efficiency is claimed
    ticks, series = sweep_series(points(GRID), ["model.batch_size", "parallel.replicas"])
    assert ticks == ["32", "512"] and [s["label"] for s in series] == [f"parallel.replicas={r}" for r in (1, 2, 4)]
    assert [s["efficiency"] for s in series] == [None] * 3
    assert series[1]["speedup"] == pytest.approx([1, 16])
    # one key: one unlabelled line, as before
    (only,) = sweep_series(points([(1, 32), (2, 32), (4, 32)]), ["parallel.replicas"])[1]
    assert only["label"] == "" and only["efficiency"] == pytest.approx([1, 0.8, 0.64])


def test_the_sweep_command_plots_against_every_varied_key(tmp_path, monkeypatch, capsys):
    import clustersim.plots
    drawn = []
    monkeypatch.setattr(clustersim.plots, "plot_sweep", lambda pts, keys, path: drawn.append((len(pts), keys)))
    assert main(["sweep", QUICK, *STEPS, "--vary", "parallel.replicas=1,2", "--vary", "model.batch_size=32,512",
                 "--plot", str(tmp_path / "s.png")]) == 0
    assert drawn == [(4, ["parallel.replicas", "model.batch_size"])]
    monkeypatch.undo()
    png = tmp_path / "s.png"
    assert main(["sweep", QUICK, *STEPS, "--vary", "model.batch_size=32,512", "--vary", "parallel.replicas=1,2",
                 "--plot", str(png)]) == 0
    assert png.stat().st_size > 10_000


def test_a_shared_setting_only_a_varied_algorithm_reads_is_no_refusal(capsys):
    """``--set training.staleness=5 --vary training.algorithm=ssp,downpour`` on a Downpour
    scenario: the base alone is refused (Downpour would ignore the bound), the SSP point runs
    and the Downpour point carries the refusal; with no point that reads it, one line, exit 2."""
    downpour = str(ROOT / "scenarios" / "downpour.toml")
    code, out, err = run(capsys, "sweep", downpour, *STEPS, "--set", "training.staleness=5",
                         "--vary", "training.algorithm=ssp,downpour", "--json")
    points = json.loads(out)
    assert code == 0 and "error" not in points[0] and "staleness bound is SSP's" in points[1]["error"]
    code, out, err = run(capsys, "sweep", downpour, *STEPS, "--set", "training.staleness=5",
                         "--vary", "training.algorithm=downpour,dcasgd")
    assert code == 2 and err.count("\n") == 1 and "training.staleness" in err


def test_an_empty_list_of_values_is_one_line():
    from clustersim import ConfigError, sweep
    with pytest.raises(ConfigError, match="^--vary: parallel.replicas: give at least one value"):
        sweep(QUICK, {"parallel.replicas": []})
