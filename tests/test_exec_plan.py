"""The launcher plans once and hands the Plan to the ranks (``--plan FILE``); ranks
started by a user's own ``mpiexec`` on a scenario file plan it themselves."""
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from clustersim import api
from clustersim.core.plan import plan
from clustersim.core.planio import load_plan, plan_to_dict, save_plan

MPIEXEC = Path(sys.executable).parent / "mpiexec"
needs_mpi = pytest.mark.skipif(not MPIEXEC.exists(), reason="the mpich wheel is not installed")
SCENARIO = """
name = "plan-once"
seed = 0
[cluster]
topology = "dgx-h100"
[model]
name = "mlp-digits"
batch_size = 16
[parallel]
model_parallel = 1
replicas = 2
[training]
steps = 3
learning_rate = 0.5
"""


def test_execute_command_saves_the_plan_in_workdir_and_passes_it_not_the_sets(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text(SCENARIO)
    work = tmp_path / "work"
    work.mkdir()
    cmd, _ = api.execute_command(f, ["training.steps=4"], workdir=work, json_out=True)
    at = cmd.index("--plan")
    assert cmd[at - 1] == str(f) and cmd[at + 1] == str(work / "plan.json") and "--set" not in cmd
    assert plan_to_dict(load_plan(work / "plan.json")) == plan_to_dict(plan(api.load(f, ["training.steps=4"])))


def _ranks(*args: str, cwd: Path) -> dict:
    proc = subprocess.run([str(MPIEXEC), "-n", "2", sys.executable, "-m", "executor.ranks", *args, "--json"],
                          cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


@needs_mpi
def test_ranks_run_the_saved_plan_without_reading_the_scenario(tmp_path):
    save_plan(plan(api.load(tomllib.loads(SCENARIO), ["training.steps=4"])), tmp_path / "p.json")
    out = _ranks("no-such-scenario.toml", "--plan", str(tmp_path / "p.json"), cwd=tmp_path)
    assert out["name"] == "plan-once" and out["steps"] == 4          # the Plan's steps, from nowhere else


@needs_mpi
def test_ranks_started_on_a_scenario_file_plan_it_themselves(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text(SCENARIO)
    out = _ranks(str(f), "--set", "training.steps=2", cwd=tmp_path)
    assert out["name"] == "plan-once" and out["steps"] == 2


@needs_mpi
def test_ranks_refuse_an_unreadable_plan_in_one_line(tmp_path):
    (tmp_path / "p.json").write_text("{}")
    proc = subprocess.run([str(MPIEXEC), "-n", "2", sys.executable, "-m", "executor.ranks", "s.toml", "--plan",
                           str(tmp_path / "p.json")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--plan" in proc.stderr, proc.stderr


@needs_mpi
def test_clustersim_execute_removes_the_plan_after_the_run(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text(SCENARIO)
    temp = tmp_path / "tmp"
    temp.mkdir()
    proc = subprocess.run([sys.executable, "-m", "clustersim", "execute", str(f), "--json"], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "TMPDIR": str(temp)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["steps"] == 3 and list(temp.iterdir()) == []


def test_a_model_with_two_losses_is_refused_by_execute_in_one_line():
    """bert-large-pretrain ends in the MLM and the NSP losses: the simulator times it, the
    executor (one loss) refuses it naming the field."""
    from clustersim import load
    from clustersim.core.config import ConfigError
    from executor.checks import check
    sc = load("scenarios/quickstart.toml", ['model.name="bert-large-pretrain"', "parallel.replicas=1"])
    with pytest.raises(ConfigError, match="model.name.*one loss"):
        check(sc, 1)
    check(load("scenarios/quickstart.toml", ["parallel.replicas=1"]), 1)       # one loss: fine


def test_a_saved_plan_reads_its_model_file_by_its_path_and_refuses_it_changed(tmp_path, monkeypatch):
    """U41: a plan saved from a scenario given by a relative path read its model file again
    from the loader's working directory (ConfigError elsewhere), and a model file changed
    since would have been run with the old ops. The path is absolute now, and a changed
    model is refused."""
    (tmp_path / "mf").mkdir()
    (tmp_path / "mf" / "m.toml").write_text('name = "tiny"\ninput = [8]\nclasses = 3\n'
                                            '[[layer]]\nkind = "dense"\nunits = 3\n[[layer]]\nkind = "softmax_xent"\n')
    (tmp_path / "mf" / "scen.toml").write_text(SCENARIO.replace('name = "mlp-digits"', 'file = "m.toml"'))
    (tmp_path / "other").mkdir()
    monkeypatch.chdir(tmp_path / "other")
    save_plan(plan(api.load("../mf/scen.toml")), tmp_path / "plan.json")
    monkeypatch.chdir("/")
    assert load_plan(tmp_path / "plan.json").scenario.model.params == 8 * 3 + 3
    (tmp_path / "mf" / "m.toml").write_text((tmp_path / "mf" / "m.toml").read_text().replace("[8]", "[9]"))
    with pytest.raises(ValueError, match="changed since the plan was made"):
        load_plan(tmp_path / "plan.json")


def test_a_plan_of_a_symlinked_scenario_reads_its_files_beside_the_link(tmp_path):
    """Review R39: the plan kept the link's target's path, so a model file named beside the
    link (where load and simulate look) was not found when the plan was loaded."""
    (tmp_path / "proj").mkdir()
    (tmp_path / "store").mkdir()
    (tmp_path / "proj" / "m.toml").write_text('name = "tiny"\ninput = [8]\nclasses = 3\n'
                                              '[[layer]]\nkind = "dense"\nunits = 3\n[[layer]]\nkind = "softmax_xent"\n')
    (tmp_path / "store" / "scen.toml").write_text(SCENARIO.replace('name = "mlp-digits"', 'file = "m.toml"'))
    (tmp_path / "proj" / "scen.toml").symlink_to(tmp_path / "store" / "scen.toml")
    save_plan(plan(api.load(tmp_path / "proj" / "scen.toml")), tmp_path / "plan.json")
    assert load_plan(tmp_path / "plan.json").scenario.model.params == 8 * 3 + 3
