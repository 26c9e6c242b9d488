"""The clustersim command: outputs, and one clean line with exit code 2 for bad input."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from clustersim.cli import main
from clustersim.core.scenario import load_scenario

ROOT = Path(__file__).resolve().parents[1]
QUICK = str(ROOT / "scenarios" / "quickstart.toml")

GOOD = """
name = "t"
[cluster]
topology = "{topology}"
[model]
{model}
batch_size = 8
[parallel]
model_parallel = {mp}
replicas = {replicas}
[training]
steps = 2
"""


def write_scenario(tmp_path, topology="dgx-h100", model='name = "mlp-digits"', mp=1, replicas=1, extra=""):
    f = tmp_path / "s.toml"
    f.write_text(GOOD.format(topology=topology, model=model, mp=mp, replicas=replicas) + extra)
    return f


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_simulate_json_has_the_documented_keys(capsys):
    code, out, _ = run(capsys, "simulate", QUICK, "--json", "--set", "training.steps=3")
    assert code == 0
    data = json.loads(out)
    for key in ("step_time_s", "samples_per_s", "sim_time_s", "sim_events", "wall_s", "speedup"):
        assert key in data
    assert data["steps"] == 3 and data["samples_per_s"] == pytest.approx(8 * 128 / data["step_time_s"])


def test_set_overrides_reach_the_plan(capsys):
    _, out1, _ = run(capsys, "simulate", QUICK, "--json", "--no-speedup")
    _, out2, _ = run(capsys, "simulate", QUICK, "--json", "--no-speedup", "--set", "parallel.replicas=2")
    assert json.loads(out1)["replicas"] == 8 and json.loads(out2)["replicas"] == 2


def test_trace_and_plot_files(tmp_path, capsys):
    trace, plot = tmp_path / "t.json", tmp_path / "p.png"
    code, out, _ = run(capsys, "simulate", QUICK, "--trace", trace, "--plot", plot)
    assert code == 0 and "step time" in out
    events = json.loads(trace.read_text())["traceEvents"]
    spans = [e for e in events if e["ph"] == "X"]
    assert spans and all(e["dur"] >= 0 for e in spans)
    # ts is in microseconds: the last span ends at the simulated time
    summary = json.loads(run(capsys, "simulate", QUICK, "--json", "--no-speedup")[1])
    assert max(e["ts"] + e["dur"] for e in spans) == pytest.approx(summary["sim_time_s"] * 1e6)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*tmp"))


def test_sweep_points_hold_dotted_keys_and_speedup_against_the_first(capsys):
    code, out, _ = run(capsys, "sweep", QUICK, "--vary", "parallel.replicas=1,2,4", "--json",
                       "--set", "training.steps=2")
    points = json.loads(out)
    assert code == 0 and [p["parallel.replicas"] for p in points] == [1, 2, 4]
    assert points[0]["speedup"] == 1.0
    assert points[2]["speedup"] == pytest.approx(points[2]["samples_per_s"] / points[0]["samples_per_s"])


def test_collective_rows(capsys):
    code, out, _ = run(capsys, "collective", "--topology", "dgx-h100", "--op", "allreduce", "--bytes", "1K..1M", "--json")
    rows = json.loads(out)
    assert code == 0 and [r["bytes"] for r in rows] == [2**k for k in range(10, 21)]
    assert [r["algo"] for r in rows] == ["ring"] * 10 + ["nvls"]  # the algorithm each row ran: NVLS at 1 MiB (NCCL 2.20's tuner)
    for r in rows:
        assert r["algbw_gbps"] == pytest.approx(r["bytes"] / r["time_s"] / 1e9)
        assert r["busbw_gbps"] == pytest.approx(r["algbw_gbps"] * 2 * 7 / 8)
    assert rows[-1]["busbw_gbps"] < 450                 # never above NVLink's per-direction rate


def test_topology_show_names_every_kind_of_compute_device(tmp_path, capsys):
    """It described all compute devices by the first: a 5 TFLOP/s GPU beside a 20 TFLOP/s one,
    or a CPU-only host beside GPUs, never showed."""
    from helpers import dump_toml, gpu, link
    devices = [gpu("fast", tflops=20.0, machine=0), gpu("slow", tflops=5.0, machine=0),
               {"name": "host", "kind": "cpu", "machine": 1, "cores": 4, "core_gflops": 10.0, "memory_gib": 32,
                "memory_bandwidth_gbps": 100}, {"name": "sw", "kind": "switch"}]
    f = tmp_path / "mixed.toml"
    f.write_text(dump_toml({"name": "mixed", "device": devices,
                            "link": [link(d, "sw", 10.0, 1.0) for d in ("fast", "slow", "host")]}))
    code, out, _ = run(capsys, "topology", "show", f)
    assert code == 0 and "compute devices: 1 x gpu (20 TFLOP/s fp32 peak, efficiency 1, 16 GiB), 1 x gpu (5 TFLOP/s " \
                         "fp32 peak, efficiency 1, 16 GiB), 1 x cpu (40 GFLOP/s fp32 peak, efficiency 1, 32 GiB)" in out


def test_a_replicas_micro_batches_show_without_a_pipeline(capsys):
    """4 micro-batches without a pipeline (gradient accumulation) changed memory and time
    but neither the plan's nor the summary's header said so."""
    quick = str(Path(__file__).resolve().parents[1] / "scenarios" / "quickstart.toml")
    layerwise = ["--set", "training.algorithm=layerwise", "--set", "parallel.split=layers", "--set",
                 "parallel.model_parallel=2", "--set", "parallel.replicas=1"]
    for command in ("plan", "simulate"):
        code, out, _ = run(capsys, command, quick, "--set", "parallel.micro_batches=4", "--set", "training.steps=1")
        assert code == 0 and "4 micro-batches" in out.splitlines()[0 if command == "plan" else 1]
        code, out, _ = run(capsys, command, quick, "--set", "parallel.micro_batches=4", "--set", "training.steps=1",
                           *layerwise)        # its micro-batches flow through the layer groups
        assert code == 0 and "accumulated" not in out


def test_topology_show_and_plan_print(tmp_path, capsys):
    code, out, _ = run(capsys, "topology", "show", "dgx-h100", "--plot", tmp_path / "t.png")
    assert code == 0 and "8 gpu" in out and (tmp_path / "t.png").exists()
    code, out, _ = run(capsys, "plan", write_scenario(tmp_path, model='name = "distbelief-speech"', mp=2))
    assert code == 0 and "activation" in out and "m0.gpu1" in out
    from clustersim import api                       # memory in GiB with its total, as the memory check says it
    from clustersim.core.plan import GIB, plan
    p = plan(api.load(write_scenario(tmp_path, model='name = "distbelief-speech"', mp=2)))
    use = p.memory["m0.gpu1"]
    assert f"memory m0.gpu1: {sum(use.values()) / GIB:.4g} GiB of 80 (weights {use['weights'] / GIB:.4g}" in out


BAD_TOPOLOGY = """
name = "bad"
[[device]]
name = "g0"
kind = "gpu"
peak_tflops_fp32 = 10
memory_gib = 16
memory_bandwidth_gbps = 100
[[device]]
name = "g1"
kind = "gpu"
peak_tflops_fp32 = 10
memory_gib = 16
memory_bandwidth_gbps = 100
"""


@pytest.mark.parametrize("case, field", [
    ("malformed", "malformed TOML"),
    ("unknown_key", "parallel.replcias: unknown key"),
    ("misspelt_table", "modle: unknown key"),
    ("topology_as_scenario", "a topology file, not a scenario"),
    ("zero_bandwidth", "link[0].bandwidth_gbps: must be > 0"),
    ("negative_latency", "link[0].latency_us: must be >= 0"),
    ("ghost_link", "link[0].b: no device named 'g9'"),
    ("no_route", "cluster.topology: no route from g0 to g1"),
    ("too_many_partitions", "parallel: model_parallel x replicas = 16 devices"),
    ("bad_layer_shape", "layer[0]: layer 0 (conv2d): conv2d kernel 9 does not fit"),
    ("does_not_fit", "parallel.model_parallel: does not fit"),
    ("bad_set", "--set: parallel: must look like section.key=value"),
    ("zero_flops", "device[0].peak_tflops_fp32: must be > 0"),
    ("missing_file", "cannot read file"),
])
def test_bad_input_is_one_line_naming_file_and_field(tmp_path, capsys, case, field):
    argv = ["simulate"]
    topo = tmp_path / "topo.toml"
    if case == "malformed":
        f = tmp_path / "s.toml"
        f.write_text("name = [unclosed\n")
    elif case == "topology_as_scenario":
        f = tmp_path / "topo.toml"
        f.write_text(BAD_TOPOLOGY)
    elif case in ("unknown_key", "misspelt_table"):
        f = write_scenario(tmp_path).with_name("s.toml")
        f.write_text(f.read_text().replace("replicas =", "replcias =") if case == "unknown_key"
                     else f.read_text().replace("[model]", "[modle]"))
    elif case in ("zero_bandwidth", "negative_latency", "ghost_link", "no_route", "zero_flops"):
        bw, lat, b = {"zero_bandwidth": (0, 1, "g1"), "negative_latency": (1, -1, "g1"),
                      "ghost_link": (1, 1, "g9")}.get(case, (1, 1, "g1"))
        text = BAD_TOPOLOGY + ("" if case in ("no_route", "zero_flops") else
                               f'[[link]]\na = "g0"\nb = "{b}"\nbandwidth_gbps = {bw}\nlatency_us = {lat}\n')
        if case == "zero_flops":
            text = text.replace("peak_tflops_fp32 = 10", "peak_tflops_fp32 = 0", 1)
        topo.write_text(text)
        f = write_scenario(tmp_path, topology="topo.toml", replicas=2)
    elif case == "too_many_partitions":
        f = write_scenario(tmp_path, mp=2, replicas=8)
    elif case == "bad_layer_shape":
        (tmp_path / "m.toml").write_text('input = [1, 4, 4]\n[[layer]]\nkind = "conv2d"\nfilters = 2\nkernel = 9\n')
        f = write_scenario(tmp_path, model='file = "m.toml"')
    elif case == "does_not_fit":
        f = write_scenario(tmp_path, topology="pcie-4gpu", model='name = "distbelief-image-1.7b"')
        f.write_text(f.read_text().replace("batch_size = 8", "batch_size = 100000"))
    elif case == "bad_set":
        f = write_scenario(tmp_path)
        argv += ["--set", "parallel"]
    else:
        f = tmp_path / "nope.toml"
    code, out, err = run(capsys, *argv, f)
    assert code == 2, (out, err)
    assert err.count("\n") == 1 and "Traceback" not in err
    assert field in err
    if case not in ("bad_set",):
        assert ".toml" in err


def test_console_script_exits_2_without_traceback(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text("[cluster]\ntopology = 'dgx-h100'\n[model]\nname = 'no-such-model'\n")
    proc = subprocess.run([sys.executable, "-m", "clustersim", "simulate", str(f)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "model.name: must be one of" in proc.stderr


@pytest.mark.parametrize("name, stale", [("downpour", True), ("dcasgd", True), ("sandblaster", False), ("local", False)])
def test_async_scenarios_report_staleness_and_accuracy(capsys, name, stale):
    code, out, _ = run(capsys, "simulate", ROOT / "scenarios" / f"{name}.toml", "--json", "--no-speedup",
                       "--set", "training.time_limit_s=0.02", "--set", "training.eval_points=3")
    data = json.loads(out)
    assert code == 0 and 0.0 <= data["accuracy"] <= 1.0 and len(data["accuracy_curve"]) == 4
    assert ("staleness_mean" in data) == stale
    assert data["sim_time_s"] < 0.03


@pytest.mark.parametrize("name", ["downpour", "dcasgd", "sandblaster"])
def test_a_parameter_server_scenario_has_a_speedup_against_one_device_alone(capsys, name):
    code, out, _ = run(capsys, "simulate", ROOT / "scenarios" / f"{name}.toml", "--json",
                       "--set", "training.time_limit_s=0.02", "--set", "training.eval_points=1")
    data = json.loads(out)
    _, solo, _ = run(capsys, "simulate", ROOT / "scenarios" / f"{name}.toml", "--json", "--no-speedup",
                     "--set", "training.algorithm=sync", "--set", "parallel.ps_shards=0", "--set", "parallel.replicas=1",
                     "--set", "parallel.model_parallel=1", "--set", "training.steps=1",
                     "--set", "training.work_units=0", "--set", "training.dcasgd_adaptive=false")   # else refused: sync ignores them
    assert code == 0 and data["one_device_step_time_s"] == pytest.approx(json.loads(solo)["sim_time_s"])
    batch = load_scenario(ROOT / "scenarios" / f"{name}.toml").batch_size
    assert data["speedup"] == pytest.approx(data["samples_per_s"] * data["one_device_step_time_s"] / batch)


@pytest.mark.parametrize("sets, message", [
    (["training.algorithm=downpour"], "parallel.ps_shards: downpour needs a parameter server"),
    (["training.cosim=true", "model.name=alexnet"], "training.cosim: co-simulation trains mlp-digits"),
    (["faults.slowdown={ghost = 2.0}"], "faults.slowdown.ghost: is not a compute device"),
    (["faults.fail=[{at_s = 1.0}]"], "faults.fail[0].device: give exactly one of device, machine or link"),
    (["faults.fail=[{at_s = 1.0, link = ['m0.gpu0', 'm0.gpu1']}]"], "faults.fail[0].link: must name the two ends"),
    (["training.comm_bits=16"], "training.comm_bits: must be 32 or 8"),
    (["training.backup_workers=2"], "training.backup_workers: must be < parallel.replicas"),
])
def test_bad_training_and_fault_settings(capsys, sets, message):
    argv = ["simulate", QUICK, "--set", "parallel.replicas=2"]
    for s in sets:
        argv += ["--set", s]
    code, _, err = run(capsys, *argv)
    assert code == 2 and message in err and err.count("\n") == 1


def test_plan_save_writes_the_plan_the_ranks_load(tmp_path, capsys):
    from clustersim.core.plan import plan
    from clustersim.core.planio import load_plan
    out = tmp_path / "p.json"
    assert main(["plan", QUICK, "--set", "parallel.replicas=2", "--save", str(out)]) == 0
    assert f"--plan {out}" in capsys.readouterr().out
    p = plan(load_scenario(QUICK, [("parallel.replicas", 2)]))
    back = load_plan(out)
    assert back.ops == p.ops and back.devices == p.devices and back.schedule == p.schedule
