"""Sweeps users leave running: written point by point, resumable, in parallel on real MPI
ranks with the same rows as in one process, the progress bar off when stderr is a file."""
import json
import os
import subprocess
import sys
from pathlib import Path

from clustersim.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUICK = str(ROOT / "scenarios" / "quickstart.toml")
ARGS = ["sweep", QUICK, "--vary", "parallel.replicas=1,2,4", "--vary", "training.allreduce=ring,tree",
        "--set", "training.steps=2"]


def rows(points):
    return [{k: v for k, v in p.items() if k != "wall_s"} for p in points]


def test_out_writes_json_and_csv_and_resume_runs_only_what_is_missing(tmp_path, capsys):
    prefix = str(tmp_path / "run")
    assert main(ARGS + ["--out", prefix]) == 0
    assert capsys.readouterr().err == ""                     # no progress bar on a non-terminal
    points = json.loads(Path(prefix + ".json").read_text())
    csv_lines = Path(prefix + ".csv").read_text().splitlines()
    assert len(points) == 6 and len(csv_lines) == 7
    assert csv_lines[0].startswith("parallel.replicas,training.allreduce,step_time_s,samples_per_s,speedup")
    # mark five points as run earlier, drop the sixth: a resumed sweep keeps the five
    kept = [dict(p, wall_s=-1.0) for p in points if (p["parallel.replicas"], p["training.allreduce"]) != (4, "tree")]
    Path(prefix + ".json").write_text(json.dumps(kept))
    assert main(ARGS + ["--out", prefix, "--resume", "--json"]) == 0
    resumed = json.loads(capsys.readouterr().out)
    assert [p["wall_s"] for p in resumed] == [-1.0] * 5 + [resumed[5]["wall_s"]] and resumed[5]["wall_s"] > 0
    assert rows(resumed) == rows(points)
    assert json.loads(Path(prefix + ".json").read_text()) == resumed


def test_resume_without_out_is_bad_input(capsys):
    assert main(ARGS + ["--resume"]) == 2
    assert "--resume" in capsys.readouterr().err


def test_mpi_ranks_give_the_rows_of_one_process(tmp_path, capsys):
    assert main(ARGS + ["--json"]) == 0
    local = json.loads(capsys.readouterr().out)
    bindir = Path(sys.executable).parent
    out = subprocess.run([str(bindir / "mpiexec"), "-n", "3", sys.executable, "-m", "mpi4py.futures", "-m",
                          "clustersim", *ARGS, "--mpi", "--json"], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert rows(json.loads(out.stdout)) == rows(local)


def test_points_say_their_devices_and_the_plot_has_efficiency_and_cost(tmp_path, capsys):
    png = tmp_path / "sweep.png"
    assert main(["sweep", QUICK, "--vary", "parallel.replicas=1,2,4", "--set", "training.steps=2",
                 "--set", "training.dataset_samples=100000", "--plot", str(png), "--json"]) == 0
    points = json.loads(capsys.readouterr().out)
    assert [p["devices"] for p in points] == [1, 2, 4]
    assert all(p["cost_usd"] > 0 for p in points)
    assert png.stat().st_size > 10_000


def test_one_process_reports_every_point_as_it_finishes_and_lists_vary_too(monkeypatch, capsys):
    """In one process a point is reported (and --out written) before the next one runs, so
    an interrupted sweep keeps what it finished."""
    from clustersim import api
    log, run = [], api._sweep_point

    def logged(source, pairs):
        log.append(("ran", dict(pairs)["parallel.replicas"]))
        return run(source, pairs)
    monkeypatch.setattr(api, "_sweep_point", logged)
    api.sweep(QUICK, {"parallel.replicas": [1, 2]}, {"training.steps": 1},
              on_point=lambda p: log.append(("reported", p["parallel.replicas"])))
    assert log == [("ran", 1), ("reported", 1), ("ran", 2), ("reported", 2)]
    monkeypatch.undo()
    assert main(["sweep", QUICK, "--vary", "parallel.grid=[]", "--set", "training.steps=1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["parallel.grid"] == []
    assert main(["sweep", QUICK, "--vary", "parallel.replicas=1,2", "--vary", "parallel.replicas=4"]) == 2
    assert "varied twice" in capsys.readouterr().err


def test_a_co_simulated_sweep_keeps_each_points_accuracy_as_simulate_gives_it():
    """A sweep of a co-simulated scenario ran the math and dropped its results: an accuracy
    study could not use sweep."""
    from clustersim import api
    over = {"training.cosim": True, "training.steps": 40, "training.time_limit_s": 0}
    points = api.sweep("scenarios/downpour.toml", {"parallel.replicas": [2, 4]}, over)
    for point in points:
        alone = api.simulate("scenarios/downpour.toml", {**over, "parallel.replicas": point["parallel.replicas"]},
                             speedup=False).data
        for key in ("accuracy", "loss", "time_to_accuracy_s", "staleness_mean"):
            assert point.get(key) == alone.get(key) and (key == "time_to_accuracy_s" or key in point)


def test_a_co_simulated_sweeps_table_shows_its_accuracy(capsys):
    """U39: the table of a co-simulated sweep had no accuracy, time to accuracy or staleness
    (only --json had them)."""
    from clustersim.cli import main
    code = main(["sweep", "scenarios/downpour.toml", "--vary", "parallel.replicas=2,4", "--set", "training.steps=20",
                 "--set", "training.time_limit_s=0", "--set", "training.target_accuracy=0.5"])
    header, *rows = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and header.split()[-5:] == ["accuracy", "to", "accuracy", "(s)", "staleness"] and len(rows) == 2


def test_a_sweep_refused_for_its_input_keeps_the_earlier_runs_files(tmp_path, capsys):
    """U41: a sweep to an existing --out whose input then proved bad (an unknown key, exit 2)
    left PREFIX.json as [] and PREFIX.csv as its header: the earlier points were gone."""
    from clustersim.cli import main
    prefix = str(tmp_path / "q")
    assert main(["sweep", "scenarios/quickstart.toml", "--vary", "parallel.replicas=1,2", "--set", "training.steps=2",
                 "--out", prefix]) == 0
    before = {suffix: Path(prefix + suffix).read_text() for suffix in (".json", ".csv", ".run.json")}
    assert main(["sweep", "scenarios/quickstart.toml", "--vary", "parallel.replicas=1,2", "--set", "parallel.replicaz=3",
                 "--out", prefix]) == 2
    assert {suffix: Path(prefix + suffix).read_text() for suffix in before} == before
    assert "unknown key" in capsys.readouterr().err


def test_resume_refuses_a_scenario_file_edited_since(tmp_path, capsys):
    """U41: --resume took a scenario file edited between the runs (another topology): the
    old points stood beside new ones and the speed-ups were against a stale first point."""
    from clustersim.cli import main
    mine = tmp_path / "mine.toml"
    mine.write_text(Path("scenarios/quickstart.toml").read_text())
    prefix = str(tmp_path / "r")
    assert main(["sweep", str(mine), "--vary", "parallel.replicas=1,2", "--set", "training.steps=2",
                 "--out", prefix]) == 0
    mine.write_text(mine.read_text().replace('"dgx-h100"', '"pcie-4gpu"'))
    code = main(["sweep", str(mine), "--vary", "parallel.replicas=1,2,4", "--set", "training.steps=2",
                 "--out", prefix, "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and "holds another run (the scenario file's sha256 " in err


def test_resume_takes_a_record_written_before_it_held_the_files_hash(tmp_path, capsys):
    """Records of sweeps run before the scenario file's sha256 was kept still resume."""
    from clustersim.cli import main
    prefix = str(tmp_path / "r")
    args = ["sweep", "scenarios/quickstart.toml", "--vary", "parallel.replicas=1,2", "--set", "training.steps=2",
            "--out", prefix]
    assert main(args) == 0
    record = json.loads(Path(prefix + ".run.json").read_text())
    del record["content"]
    Path(prefix + ".run.json").write_text(json.dumps(record))
    assert main(args[:3] + ["parallel.replicas=1,2,4"] + args[4:] + ["--resume"]) == 0
    assert "content" in json.loads(Path(prefix + ".run.json").read_text())


def test_mpi_without_ranks_is_one_line_not_a_hang(tmp_path):
    """U51: --mpi outside mpiexec printed a thread's traceback (MPI_Comm_spawn failed) and
    then waited for ever for workers.  Under mpiexec -n 1 mpi4py spawns them (R51): that
    still runs (test below)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE")}
    out = subprocess.run([sys.executable, "-m", "clustersim", *ARGS, "--mpi"], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).parent.parent, env=env)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.splitlines() == ["clustersim: error: --mpi: no MPI ranks to run points on and no mpiexec to spawn "
                                       "them: start it as mpiexec -n N python -m mpi4py.futures -m clustersim ... --mpi "
                                       "(N - 1 workers)"]


def test_nan_and_inf_are_refused_before_any_point(capsys):
    """U51: TOML reads nan and inf; a sweep over them printed NaN and Infinity in its JSON
    rows (no strict parser takes them) and exited 0."""
    assert main(["sweep", QUICK, "--vary", "training.learning_rate=0.1,nan", "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == ["clustersim: error: --vary: training.learning_rate=nan: must be a finite number"]
    assert main(["sweep", QUICK, "--vary", "parallel.replicas=1,2", "--set", "training.time_limit_s=inf"]) == 2
    assert "--set: training.time_limit_s=inf: must be a finite number" in capsys.readouterr().err


def test_a_sweep_of_bad_input_only_leaves_earlier_files_alone(tmp_path, capsys):
    """U51: every point refused (exit 2), yet PREFIX.json and .csv were replaced by the error
    rows and a PREFIX.run.json written: bad input writes nothing; a point that ran, or
    stalled, writes the files as before."""
    prefix = str(tmp_path / "keep")
    for end in (".json", ".csv"):
        Path(prefix + end).write_text("SENTINEL\n")
    assert main(["sweep", QUICK, "--vary", "parallel.replicas=0,1000", "--out", prefix]) == 2
    assert "parallel.replicas: must be >= 1, got 0" in capsys.readouterr().err
    assert [Path(prefix + end).read_text() for end in (".json", ".csv")] == ["SENTINEL\n"] * 2
    assert not Path(prefix + ".run.json").exists()
    assert main(["sweep", QUICK, "--vary", "parallel.replicas=0,1", "--set", "training.steps=2", "--out", prefix]) == 0
    assert ["error" in p for p in json.loads(Path(prefix + ".json").read_text())] == [True, False]


def test_an_out_prefix_that_is_a_folder_and_a_points_file_of_no_list_are_refused(tmp_path, capsys):
    """U51: --out dir/ wrote the hidden files dir/.json, .csv and .run.json; a PREFIX.json
    holding {} resumed as if it held no points."""
    for prefix in (str(tmp_path) + "/", str(tmp_path), ""):
        assert main(["sweep", QUICK, "--vary", "parallel.replicas=1,2", "--out", prefix]) == 2
        assert "give a file prefix" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    prefix = str(tmp_path / "run")
    assert main(ARGS + ["--out", prefix]) == 0
    capsys.readouterr()
    Path(prefix + ".json").write_text("{}")
    assert main(ARGS + ["--out", prefix, "--resume"]) == 2
    assert "cannot resume from it" in capsys.readouterr().err


def test_mpi_under_mpiexec_of_one_rank_spawns_its_workers(tmp_path, capsys):
    """R51: mpi4py.futures spawns workers where a process manager runs the one rank: the
    refusal above is only for a start with neither ranks nor mpiexec."""
    assert main(ARGS + ["--json"]) == 0
    local = json.loads(capsys.readouterr().out)
    bindir = Path(sys.executable).parent
    out = subprocess.run([str(bindir / "mpiexec"), "-n", "1", sys.executable, "-m", "clustersim", *ARGS, "--mpi",
                          "--json"], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**os.environ, "MPI4PY_FUTURES_MAX_WORKERS": "2"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert rows(json.loads(out.stdout)) == rows(local)
