"""The clustersim command at its edges: stalled runs with --plot, plot file types,
topologies without routes, and counts that must be positive.  Each case runs the
command's main function and checks the exit code and what reaches stdout and stderr."""
import json
from pathlib import Path

import pytest

from clustersim import api
from clustersim.cli import main, topology

ROOT = Path(__file__).resolve().parents[1]
DOWNPOUR = str(ROOT / "scenarios" / "downpour.toml")
QUICK = str(ROOT / "scenarios" / "quickstart.toml")
STALL = "faults.fail=[{machine=8, at_s=0.01}]"     # the shard on m8 fails: Downpour waits on it forever
PNG = b"\x89PNG\r\n\x1a\n"


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_stalled_run_with_plot_prints_its_summary_draws_and_exits_3(tmp_path, capsys):
    plot = tmp_path / "stalled.png"
    code, out, err = run(capsys, "simulate", DOWNPOUR, "--set", STALL, "--plot", plot)
    assert code == 3, err
    assert "STALLED          at 11.17 ms after 8 steps" in out and f"wrote plot: {plot}" in out
    assert err == ""
    assert plot.read_bytes()[:8] == PNG


def test_a_sweep_with_no_finished_point_skips_its_plot_in_one_line(tmp_path, capsys):
    plot = tmp_path / "sweep.png"
    code, out, err = run(capsys, "sweep", DOWNPOUR, "--set", "faults.fail=[{machine=8, at_s=0.001}]",
                         "--vary", "training.steps=50,100", "--plot", plot)
    assert out.count("stalled: waiting forever on parameter-server shard 0") == 2
    assert err == f"clustersim: no plot written to {plot}: no point ran to its end\n"
    assert not plot.exists()
    assert code == 3          # every point stalled: simulate's exit for a stall (points are rows, not bad input)


SUPPORTED = ".avif, .eps, .gif, .jpeg, .jpg, .pdf"      # the start of matplotlib's list (pgf only with TeX)


@pytest.mark.parametrize("argv", [
    ["simulate", QUICK], ["sweep", QUICK, "--vary", "training.steps=1,2"], ["validate", QUICK],
    ["published"], ["topology", "show", "dgx-h100"]])
@pytest.mark.parametrize("name, why", [("x.xyz", "cannot draw a .xyz file"),
                                       ("x", "cannot draw a file without an extension")])
def test_a_plot_file_matplotlib_cannot_write_is_refused_before_any_work(tmp_path, capsys, monkeypatch, argv,
                                                                         name, why):
    def work(*_a, **_k):
        raise AssertionError("ran before refusing --plot")
    for where in ("simulate", "sweep", "validate", "published"):
        monkeypatch.setattr(api, where, work)
    monkeypatch.setattr(topology, "load_topology", work)
    plot = tmp_path / name
    code, out, err = run(capsys, *argv, "--plot", plot)
    assert code == 2 and out == ""
    assert err.startswith(f"clustersim: error: --plot: {plot}: {why}; give one of {SUPPORTED}")
    assert err.count("\n") == 1 and ".png, .ps" in err and ".svg" in err
    assert not plot.exists()


@pytest.mark.parametrize("argv, where", [
    (["plan", QUICK, "--save", "{f}/p.json"], "{f}/p.json"),
    (["simulate", QUICK, "--set", "training.steps=1", "--trace", "{d}"], "--trace: {d}"),
    (["simulate", QUICK, "--set", "training.steps=1", "--plot", "{f}/p.png"], "--plot: {f}/p.png"),
    (["sweep", QUICK, "--vary", "training.steps=1,2", "--out", "{f}/sw"], "{f}/sw.json: its folder cannot be made"),
    (["calibrate", "--out", "{f}/h.toml"], "--out: {f}/h.toml: its folder cannot be made"),
    (["calibrate", "--out", "{d}"], "--out: {d}: is a folder")])
def test_an_output_path_that_cannot_be_written_is_one_line_naming_it(tmp_path, capsys, argv, where):
    """A file where a folder should be, or a folder where a file should be: one line naming
    the path (and the option where one asked for it), exit 2, the file in the way untouched;
    before any work (calibrate measured for minutes, then refused)."""
    f = tmp_path / "taken"
    f.write_text("keep")
    code, out, err = run(capsys, *[a.format(f=f, d=tmp_path) for a in argv])
    assert code == 2 and err.count("\n") == 1
    where = where.format(f=f, d=tmp_path)
    assert err.startswith(f"clustersim: error: {where}" + ("" if where.endswith(("made", "folder")) else
                                                           ": cannot write there: "))
    assert f.read_text() == "keep" and sorted(q.name for q in tmp_path.iterdir()) == ["taken"]


def test_a_plot_extension_is_read_in_any_case(tmp_path, capsys):
    plot = tmp_path / "step.PNG"
    code, out, err = run(capsys, "simulate", QUICK, "--no-speedup", "--plot", plot)
    assert code == 0 and err == "" and f"wrote plot: {plot}" in out
    assert plot.read_bytes()[:8] == PNG


CPU = """
[[device]]
name = "{name}"
kind = "cpu"
cores = 2
core_gflops = 10
memory_gib = 4
memory_bandwidth_gbps = 10
"""


@pytest.mark.parametrize("argv, why", [
    (["topology", "show", "{topo}"], "no route from c0 to c1 in topology apart: its compute devices cannot send "
                                     "each other data"),
    (["collective", "--topology", "{topo}", "--bytes", "1M"], "no route from c0 to c1, and the allreduce sends "
                                                              "data between them")])
def test_compute_devices_without_a_route_are_one_line_naming_the_topology_file(tmp_path, capsys, argv, why):
    topo = tmp_path / "apart.toml"
    topo.write_text('name = "apart"\n' + CPU.format(name="c0") + CPU.format(name="c1"))    # no [[link]]
    code, out, err = run(capsys, *[a.format(topo=topo) for a in argv])
    assert (code, out) == (2, "")
    assert err == f"clustersim: error: {topo}: link: {why}\n"


@pytest.mark.parametrize("argv, option, value", [
    (["collective", "--topology", "dgx-h100", "--gpus", "0"], "--gpus", "0"),
    (["collective", "--topology", "dgx-h100", "--machines", "0"], "--machines", "0"),
    (["collective", "--topology", "dgx-h100", "--gpus", "two"], "--gpus", "two"),
    (["topology", "show", "dgx-h100-fat-tree", "--machines", "-2"], "--machines", "-2"),
    (["execute", QUICK, "--ranks", "0"], "--ranks", "0"),
    (["sweep", QUICK, "--vary", "training.steps=1,2", "--jobs", "0"], "--jobs", "0"),
    (["sweep", QUICK, "--vary", "training.steps=1,2", "--jobs", "-1"], "--jobs", "-1"),
    (["search", QUICK, "--devices", "0"], "--devices", "0"),
    (["search", QUICK, "--devices", "8", "--jobs", "0"], "--jobs", "0"),
    (["calibrate", "--ranks", "0"], "--ranks", "0")])
def test_a_count_below_1_is_refused_in_one_line_naming_the_option(capsys, monkeypatch, argv, option, value):
    def work(*_a, **_k):
        raise AssertionError("ran with a count below 1")
    for where in ("collective", "execute_command", "sweep", "search", "calibrate"):
        monkeypatch.setattr(api, where, work)
    monkeypatch.setattr(topology, "load_topology", work)
    code, out, err = run(capsys, *argv)
    assert (code, out) == (2, "")
    assert err == f"clustersim: error: {option}: {value}: must be a whole number >= 1\n"


@pytest.mark.parametrize("kw, line", [
    ({"sizes": [0]}, "--bytes: [0]: sizes are whole numbers of bytes >= 1"),
    ({"sizes": [-8]}, "--bytes: [-8]: sizes are whole numbers of bytes >= 1"),
    ({"sizes": []}, "--bytes: []: sizes are whole numbers of bytes >= 1"),
    ({"network": "fluid"}, "--network: fluid: one of flow, analytical"),
    ({"op": "allreduc"}, "--op: allreduc: one of allreduce, allgather"),
    ({"op": "alltoall", "algo": "tree"}, "--algo: tree: alltoall runs as direct sends between every pair"),
    ({"op": "alltoall", "algo": "ps"}, "--algo: ps: alltoall runs as direct sends between every pair"),
    ({"op": "alltoall", "protocol": "LL"}, "--protocol: LL: alltoall runs as NCCL's point-to-point sends"),
    ({"topology": "distbelief-2012", "protocol": "LL"}, "--protocol: LL: NCCL's protocols run on GPUs"),
    ({"topology": "distbelief-2012", "machines": 1},          # U36: "--gpus: 0: must be 2..1"
     "--topology: distbelief-2012: topology distbelief-2012 has 1 compute device: a collective needs 2")])
def test_collective_refuses_what_it_cannot_run_naming_the_option(kw, line):
    """From Python as from the command line: sizes of at least a byte, a known network and
    op named as themselves, alltoall only as the pairwise sends it is, protocols on GPUs."""
    from clustersim.core.config import ConfigError
    with pytest.raises(ConfigError) as err:
        api.collective(**{"topology": "dgx-h100", **kw})
    assert str(err.value).startswith(line)


def test_collective_sizes_reach_1t(capsys):
    code, out, err = run(capsys, "collective", "--topology", "dgx-h100", "--bytes", "512G..1T", "--json")
    assert code == 0 and [r["bytes"] for r in json.loads(out)] == [2**39, 2**40]
    for bad in ("1P", "100Gb", "8b"):                  # a lowercase b was read as bytes: 8x a size in bits
        code, out, err = run(capsys, "collective", "--topology", "dgx-h100", "--bytes", bad)
        assert code == 2 and f"--bytes: {bad}: sizes look like 8, 64K, 1M, 1G or 1T" in err
    code, out, err = run(capsys, "collective", "--topology", "dgx-h100", "--bytes", "1GiB..2GB", "--json")
    assert code == 0 and [r["bytes"] for r in json.loads(out)] == [2**30, 2**31]


def test_collective_without_gpus_still_runs_on_every_compute_device(capsys):
    code, out, err = run(capsys, "collective", "--topology", "dgx-h100", "--bytes", "1M", "--json")
    assert (code, err) == (0, "")
    assert len(json.loads(out)) == 1
    code, out, _ = run(capsys, "collective", "--topology", "dgx-h100", "--bytes", "1M")
    assert code == 0 and out.startswith("# allreduce by auto over all ranks of dgx-h100")


def test_execute_refuses_a_second_fail_before_starting_ranks(capsys, monkeypatch):
    def work(*_a, **_k):
        raise AssertionError("started ranks")
    monkeypatch.setattr(api, "execute_command", work)
    code, out, err = run(capsys, "execute", DOWNPOUR, "--fail", "rank=0@step=5", "--fail", "rank=1@step=5")
    assert (code, out) == (2, "")
    assert err == "clustersim: error: --fail: rank=1@step=5: give one --fail: a run crashes one worker\n"


def test_execute_still_checks_a_single_fail(capsys):
    code, _, err = run(capsys, "execute", DOWNPOUR, "--fail", "rank=99@step=5")
    assert code == 2
    assert err == "clustersim: error: --fail: rank=99@step=5: must be rank=K@step=S with K a worker rank (0..7)\n"


@pytest.mark.parametrize("extra, says", [
    (["--checkpoint", "{file}"], "--checkpoint: {file}: is a file, not a folder"),
    (["--checkpoint", "{file}/sub"], "--checkpoint: {file}/sub: cannot be made"),
    (["--checkpoint-every", "5"], "--checkpoint-every: 5: needs --checkpoint DIR"),
    (["--fail", "rank=1@step=500"], "--fail: rank=1@step=500: step 500 is past the run's last"),
    (["--trace", "{dir}"], "--trace: {dir}: is a folder: give a file name"),
    (["--trace", "{file}/t.json"], "--trace: {file}/t.json: its folder cannot be made")])
def test_execute_refuses_what_would_fail_on_a_rank_before_starting_ranks(tmp_path, capsys, monkeypatch, extra,
                                                                          says):
    """Second sweep: these failed inside a rank after the launch (exit 1, a rank's
    traceback line) or were ignored; now one line, exit 2, and no rank starts."""
    started = []
    monkeypatch.setattr(api, "execute_command", lambda *a, **k: (["true"], {}))
    monkeypatch.setattr("subprocess.run", lambda *a, **k: started.append(a))
    (tmp_path / "f").write_text("x")
    fill = {"file": tmp_path / "f", "dir": tmp_path}
    code, _, err = run(capsys, "execute", DOWNPOUR, "--set", "training.steps=20", "--set", "parallel.replicas=2",
                       "--set", "cluster.machines=0", "--set", "cluster.topology=dgx-h100",
                       *[a.format(**fill) for a in extra])
    assert code == 2 and not started
    assert err.startswith("clustersim: error: " + says.format(**fill)) and len(err.strip().splitlines()) == 1


def test_a_refused_execute_makes_no_checkpoint_folder(tmp_path, capsys, monkeypatch):
    """Review R18: the folder was made before later checks refused the run; review R36:
    also before ``execute_command``'s checks (downpour.toml's time limit, a dtype)."""
    monkeypatch.setattr("subprocess.run", lambda *a, **k: pytest.fail("started ranks"))
    (tmp_path / "afile").write_text("x")
    for extra in (["--resume"], ["--data", str(tmp_path / "none")], ["--trace", str(tmp_path)],
                  ["--trace", str(tmp_path / "t" / "x.json")], ["--set", "model.dtype=fp16"], [],
                  ["--set", "training.time_limit_s=0", "--set", "parallel.replicas=2", "--set", "cluster.machines=0",
                   "--set", "cluster.topology=dgx-h100", "--trace", str(tmp_path / "afile" / "t.json")]):
        code, _, _ = run(capsys, "execute", DOWNPOUR, "--checkpoint", tmp_path / "ck" / "a", *extra)
        assert code == 2 and not (tmp_path / "ck").exists() and not (tmp_path / "t").exists()


def test_sandblaster_checkpoints_are_refused_before_starting_ranks(tmp_path, capsys, monkeypatch):
    """U50: Sandblaster's shards wrote no checkpoint and --resume then found none there;
    refused in one line before any rank starts, no folder made."""
    monkeypatch.setattr("subprocess.run", lambda *a, **k: pytest.fail("started ranks"))
    sandblaster = str(Path(DOWNPOUR).with_name("sandblaster.toml"))
    for extra in ([], ["--resume"]):
        code, _, err = run(capsys, "execute", sandblaster, "--checkpoint", tmp_path / "ck", *extra)
        assert code == 2 and not (tmp_path / "ck").exists()
        assert err.startswith("clustersim: error: --checkpoint") and "Sandblaster" in err
        assert len(err.strip().splitlines()) == 1


def test_execute_on_gpus_without_cupy_is_one_line_before_starting_ranks(capsys, monkeypatch):
    from executor.backend import cupy_or_none
    if cupy_or_none() is not None:                     # pragma: no cover - GPU hosts
        pytest.skip("a GPU is visible here")
    monkeypatch.setattr(api, "execute_command", lambda *a, **k: pytest.fail("started ranks"))
    code, _, err = run(capsys, "execute", QUICK, "--device", "gpu", "--set", "parallel.replicas=2")
    assert code == 2 and err.startswith("clustersim: error: --device: gpu: needs CuPy and a visible GPU")


@pytest.mark.parametrize("command", ["execute", "validate"])
def test_zero_which_the_executor_does_not_shard_is_refused(capsys, monkeypatch, command):
    """Execute kept every replica's state whole under training.zero while
    simulate timed each replica's 1/R update: validate would compare unlike runs."""
    monkeypatch.setattr("subprocess.run", lambda *a, **k: pytest.fail("started ranks or a calibration"))
    code, _, err = run(capsys, command, QUICK, "--set", "training.zero=1", "--set", "parallel.replicas=2")
    assert code == 2 and err.startswith(f"clustersim: error: {QUICK}: training.zero: execute keeps every replica's")


@pytest.mark.parametrize("command", ["execute", "validate"])
@pytest.mark.parametrize("setting", [
    "faults.fail=[{at_s = 0.001, device = \"m0.gpu1\"}]", "faults.mtbf_s=10", "faults.machine_mtbf_s=10",
    "faults.slowdown={\"m0.gpu1\" = 2.0}",
    "faults.slowdown_sigma=0.5", "faults.on_failure=\"restart\"", "faults.checkpoint_every=5",
    "training.time_limit_s=0.1"])
def test_a_setting_the_executor_does_not_act_on_is_refused(capsys, monkeypatch, command, setting):
    """Execute ran scheduled failures, stragglers and time limits as if they were not there
    (a run of 20 steps with m0.gpu1 failing at 1 ms trained every step), and validate
    compared that run with a prediction that had them."""
    monkeypatch.setattr("subprocess.run", lambda *a, **k: pytest.fail("started ranks or a calibration"))
    code, _, err = run(capsys, command, QUICK, "--set", "parallel.replicas=2", "--set", setting)
    key = setting.split("=")[0]
    assert code == 2 and err.startswith(f"clustersim: error: {QUICK}: {key}: ") and "its run would go on without it" in err


@pytest.mark.parametrize("command", ["execute", "validate"])
def test_the_asynchronous_start_settings_are_refused_by_execute_too(capsys, monkeypatch, command):
    monkeypatch.setattr("subprocess.run", lambda *a, **k: pytest.fail("started ranks or a calibration"))
    for setting in ("training.warm_start_s=0.01", "training.start_spread_s=0.01", "faults.shard_recovery=\"checkpoint\""):
        code, _, err = run(capsys, command, DOWNPOUR, "--set", "training.time_limit_s=0", "--set", "parallel.replicas=2",
                           "--set", "cluster.machines=0", "--set", "cluster.topology=dgx-h100", "--set", setting)
        assert code == 2 and f": {setting.split('=')[0]}: " in err and "its run would go on without it" in err, err


@pytest.mark.parametrize("command", ["execute", "validate"])
@pytest.mark.parametrize("setting, key", [("model.dtype=fp16", "model.dtype"), ("model.dtype=bf16", "model.dtype"),
                                          ("training.gradient_dtype=fp16", "training.gradient_dtype")])
def test_a_run_the_executor_would_do_in_fp32_is_refused(capsys, monkeypatch, command, setting, key):
    """The executor computes and sends fp32 whatever the model's dtype: a 16-bit scenario was
    executed (and validated against its 16-bit prediction) in fp32 without a word."""
    monkeypatch.setattr("subprocess.run", lambda *a, **k: pytest.fail("started ranks or a calibration"))
    code, _, err = run(capsys, command, QUICK, "--set", setting)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"clustersim: error: {QUICK}: {key}: execute computes and sends fp32"), err


def test_resuming_from_a_file_that_is_no_checkpoint_is_one_line(tmp_path, capsys, monkeypatch):
    """Second sweep: a junk shard0.npz failed on the shard's rank (exit 1)."""
    monkeypatch.setattr(api, "execute_command", lambda *a, **k: pytest.fail("started ranks"))
    (tmp_path / "shard0.npz").write_text("junk")
    code, _, err = run(capsys, "execute", DOWNPOUR, "--set", "parallel.ps_shards=1", "--checkpoint", tmp_path,
                       "--resume")
    assert code == 2 and err.startswith(f"clustersim: error: --resume: {tmp_path / 'shard0.npz'}: is not a shard")


def test_a_built_in_scenario_runs_by_name_from_any_folder(tmp_path, capsys, monkeypatch):
    """Installed, the examples live in the package (clustersim.builtin_scenarios): a bare
    name with no such file is the built-in scenario; an unknown one lists the names."""
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(capsys, "simulate", "quickstart", "--json", "--no-speedup", "--set", "training.steps=2")
    assert code == 0 and json.loads(out)["name"] == "quickstart"
    assert api.load("downpour").training.algorithm == "downpour"
    code, _, err = run(capsys, "simulate", "nosuch")
    assert code == 2 and "nosuch: cannot read file (FileNotFoundError); built-in scenarios: " in err
    assert "quickstart" in err and "downpour" in err
    (tmp_path / "quickstart").write_text('[cluster]\ntopology = "dgx-h100"\n[model]\nname = "mlp-digits"\n'
                                         'batch_size = 4\n')
    assert api.load("quickstart").batch_size == 4          # a file of that name comes first


def test_a_bad_against_is_named_as_itself(capsys):
    """A bad ``--against`` pair is named ``--against``, before any run."""
    code, out, err = run(capsys, "validate", QUICK, "--against", "foo")
    assert code == 2 and err == "clustersim: error: --against: foo: must look like section.key=value\n"


def test_an_unknown_topology_to_show_is_named_as_the_argument_it_is(capsys):
    """``topology show``'s topology is a positional argument: the error names the command."""
    code, out, err = run(capsys, "topology", "show", "nosuch")
    assert code == 2 and err.startswith("clustersim: error: topology show: 'nosuch' is neither a built-in topology")


@pytest.mark.parametrize("version", ["2.10.0", "2.17.1", "9.9.9"])
def test_an_nccl_version_the_model_does_not_lay_out_is_refused(capsys, version):
    """The model lays NVLS out as NCCL 2.18 and later 2.x do (2.17 first ran it): other
    versions are refused, later 2.x ones taken."""
    code, out, err = run(capsys, "collective", "--topology", "dgx-h100", "--bytes", "1M", "--nccl", version)
    assert code == 2 and err.startswith(f"clustersim: error: --nccl: {version}: NCCL {version} is not modelled")
    code, out, err = run(capsys, "collective", "--topology", "dgx-h100", "--bytes", "1M", "--nccl", "2.24.3")
    assert code == 0


def test_a_table_passed_on_as_a_set_keeps_a_dotted_key_whole():
    """validate passes its overrides on as --set text: {"m0.gpu1" = 2.0} came back as the
    dotted key m0.gpu1 (a table m0), so a slowed device was "faults.slowdown.m0"."""
    import tomllib
    value = {"m0.gpu1": 2.0, "plain_key-1": {"with space": "x", "é": [1, True]}}
    assert tomllib.loads(f"v = {api._toml(value)}")["v"] == value


def test_topology_show_finds_a_compute_device_no_link_reaches(tmp_path, capsys):
    """U36: it tried routes from the first device to the second and the last only, and
    showed a file with an unlinked GPU in between as sound (exit 0)."""
    f = tmp_path / "t.toml"
    gpu = 'kind = "gpu"\nmachine = 0\npeak_tflops_fp32 = 10\nmemory_gib = 16\nmemory_bandwidth_gbps = 900\n'
    f.write_text(f'base = "pcie-4gpu"\n[[device]]\nname = "m0.gpu4"\n{gpu}[[device]]\nname = "m0.gpu5"\n{gpu}'
                 '[[link]]\na = "m0.gpu5"\nb = "m0.pcie0"\nbandwidth_gbps = 16\nlatency_us = 1\n')
    from clustersim.core.topogen import load_topology
    compute = load_topology(str(f)).compute_devices()
    assert compute.index("m0.gpu4") == 4 and len(compute) == 6     # not the first, the second nor the last
    code, _, err = run(capsys, "topology", "show", str(f))
    assert code == 2 and ": link: no links join m0.gpu4 to m0.gpu0" in err and len(err.splitlines()) == 1


def test_execute_refuses_a_tied_lm_head_before_starting_ranks(tmp_path, capsys, monkeypatch):
    """Review R36: a model file's tied head with its embedding passed every check and failed
    on a rank (exit 1: "the executor runs untied lm_head layers only")."""
    from test_exec_data import TINY_GPT
    monkeypatch.setattr("subprocess.run", lambda *a, **k: pytest.fail("started ranks"))
    (tmp_path / "gpt.toml").write_text(TINY_GPT.replace("tied = false\n", ""))
    (tmp_path / "s.toml").write_text('[cluster]\ntopology = "dgx-h100"\n[model]\nfile = "gpt.toml"\nbatch_size = 4\n')
    code, _, err = run(capsys, "execute", str(tmp_path / "s.toml"))
    assert code == 2 and ": model: execute runs an untied LM head only; my-gpt's lm_head is tied" in err


def test_a_device_on_the_wrong_machine_is_named_with_its_machine_by_simulate(tmp_path, capsys):
    """Review R37: the machines reached topology show and collective but not plan or
    simulate, whose route check writes its own message."""
    f = tmp_path / "wrong.toml"
    f.write_text('base = "ethernet-cluster"\n[[device]]\nname = "m1.gpu4"\nkind = "gpu"\nmachine = 5\n'
                 'peak_tflops_fp32 = 10\nmemory_gib = 16\nmemory_bandwidth_gbps = 900\n'
                 '[[link]]\na = "m1.gpu4"\nb = "m1.pcie0"\nbandwidth_gbps = 16\nlatency_us = 1\n')
    from clustersim.core.topogen import load_topology
    n = len(load_topology(str(f)).compute_devices())
    code, _, err = run(capsys, "simulate", QUICK, "--set", f"cluster.topology={f}", "--set", f"parallel.replicas={n}")
    assert code == 2 and "no route from m1.gpu4 to " in err and "(on machines 5 and " in err, err


def test_an_output_through_a_symlink_or_to_a_fifo_is_written_there(tmp_path):
    """U41: ``--trace`` to a symlink replaced the link with a file (its target untouched),
    to a FIFO or a device (/dev/full) replaced that with a file too. A symlink's target is
    written now and a FIFO gets the bytes; the link and the FIFO stay what they were."""
    import os
    import stat
    import threading

    from clustersim.core.trace import replace_atomic
    target = tmp_path / "t.json"
    target.write_text("old")
    (tmp_path / "link.json").symlink_to("t.json")
    replace_atomic(tmp_path / "link.json", lambda tmp: Path(tmp).write_text("new"))
    assert (tmp_path / "link.json").is_symlink() and target.read_text() == "new"

    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()), daemon=True)
    reader.start()
    replace_atomic(fifo, lambda path: Path(path).write_text("through"))
    reader.join(timeout=10)
    assert got == ["through"] and stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_dev_stdout_is_written_through_and_a_dangling_links_folder_is_not_made(tmp_path, capfd):
    """Review R39: /dev/stdout (a link into /proc) resolved to a path that was not there, or,
    redirected to a file, replaced that file; a dangling symlink had its target's missing
    folders made. /dev and /proc paths are written in place through the path given, and a
    dangling link whose folder is missing is refused as the shell's ``>`` refuses it."""
    from clustersim.core.config import ConfigError
    from clustersim.core.trace import write_atomic
    write_atomic("/dev/stdout", "to stdout\n")
    assert capfd.readouterr().out == "to stdout\n"
    (tmp_path / "dangling").symlink_to("nowhere/deep/t.txt")
    with pytest.raises(ConfigError, match="dangling: cannot write there"):
        write_atomic(tmp_path / "dangling", "x")
    assert sorted(q.name for q in tmp_path.iterdir()) == ["dangling"]


def test_a_dangling_link_whose_folder_is_missing_is_refused_before_the_work(tmp_path):
    """Review R42: the check probed the nearest existing folder, the write then failed: a
    link's target folder is never made."""
    from clustersim.core.config import ConfigError
    from clustersim.core.trace import check_writable
    link = tmp_path / "out.toml"
    link.symlink_to(tmp_path / "nowhere" / "target.toml")
    with pytest.raises(ConfigError, match="its link's folder .*nowhere does not exist"):
        check_writable(link, "--out")
    (tmp_path / "nowhere").mkdir()
    check_writable(link, "--out")
    assert not (tmp_path / "nowhere" / "target.toml").exists()


def test_a_terminated_execute_stops_its_ranks_and_leaves_no_temporary_folder(tmp_path):
    """U44: SIGTERM (timeout, a job scheduler) left /tmp/clustersim-execute-*/plan.json
    behind. The signal goes on to mpiexec, whose end is waited out; the folder goes."""
    import os
    import signal
    import subprocess
    import sys
    import time
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "clustersim", "execute", QUICK, "--set", "training.steps=1000000",
                             "--set", "parallel.replicas=2"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not any(tmp_path.glob("clustersim-execute-*/plan.json")) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)                                   # the ranks are up and stepping
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    assert not list(tmp_path.glob("clustersim-execute-*"))


@pytest.mark.parametrize("argv, says", [
    (["search", "scenarios/quickstart.toml", "--devices", "4", "--target-hours", "abc"],
     "argument --target-hours: invalid float value: 'abc' (see clustersim search --help)"),
    (["collective", "--topology", "dgx-h100", "--op", "foo"], "argument --op: invalid choice: 'foo'"),
    (["model", "import"], "the following arguments are required: "),
    (["simulate", "scenarios/quickstart.toml", "--no-such-option"], "unrecognized arguments: --no-such-option")])
def test_argparses_refusals_are_one_line(argv, says, capsys):
    """U51: an option of the wrong type or a choice not offered printed argparse's usage
    block above its error (five lines): one line, exit 2, as every other refusal."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("clustersim: error: ") and says in err, err


def test_plan_save_of_an_empty_path_is_refused(capsys):
    """U51: --save '' exited 0 having written nothing and said nothing."""
    code, out, err = run(capsys, "plan", QUICK, "--save", "")
    assert code == 2 and out == "" and err == "clustersim: error: --save: '': is empty; give the file to write the Plan to\n"


@pytest.mark.parametrize("command", ["execute", "validate"])
def test_layer_by_layer_pushes_are_refused_by_execute(capsys, monkeypatch, command):
    """U52: execute pushed once a step under training.push_early (2 pushes a replica-step
    simulated, 1 executed): a validation would compare two different jobs."""
    monkeypatch.setattr("subprocess.run", lambda *a, **k: pytest.fail("started ranks or a calibration"))
    code, _, err = run(capsys, command, QUICK, "--set", "parallel.replicas=2", "--set", "parallel.ps_shards=1",
                       "--set", "training.push_early=true")
    assert code == 2 and err.startswith(f"clustersim: error: {QUICK}: training.push_early: execute runs no "
                                        "layer-by-layer pushes"), err
