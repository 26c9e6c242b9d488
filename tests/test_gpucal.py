"""GPU calibration: its sequence on the NumPy backend, its topology in closed form, and the
CuPy path where a GPU is visible."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from executor.backend import cupy_or_none
import numpy as np

from clustersim.calibration.gpu import (capability, gpu_topology_text, measure_allreduce, measure_copies,
                                        numpy_backend, pair_key)
from clustersim.calibration.host import measure_step_overhead
from clustersim.core.topogen import load_topology


def fit(alpha_us: float, beta_gbps: float) -> dict:
    return {"alpha_s": alpha_us * 1e-6, "beta_bytes_per_s": beta_gbps * 1e9, "r2": 1.0, "max_rel_error": 0.0,
            "samples": [[1024, alpha_us * 1e-6 + 1024 / (beta_gbps * 1e9)]]}


def result(devices: int) -> dict:
    comp = {"op_overhead_s": 5e-6, "peak_flops": 40e12, "efficiency_curve": [[1e6, 0.1], [1e10, 0.8]],
            "backward_efficiency_curve": [[2e6, 0.1], [2e10, 0.7]]}
    cpu = {**comp, "op_overhead_s": 1e-6, "peak_flops": 100e9}
    pairs = {pair_key(a, b): fit(8.0 + a, 150.0 * (b - a)) for a in range(devices) for b in range(a + 1, devices)}
    copies = {"h2d": fit(10.0, 25.0), "d2h": fit(12.0, 20.0), **pairs}
    return {"devices": devices, "gpu": comp, "gpu_memory_bytes": 80 * 2**30, "gpu_memory_bandwidth_bytes_per_s": 2e12,
            "copies": copies, "cpu": cpu, "cores": 4, "cpu_memory_bandwidth_bytes_per_s": 50e9}


def test_gpu_topology_routes_host_copies_over_pcie_and_gpu_copies_over_their_link(tmp_path):
    path = tmp_path / "gpus.toml"
    path.write_text(gpu_topology_text("gpus", result(3)))
    topo = load_topology(str(path))
    assert topo.compute_devices() == ["gpu0", "gpu1", "gpu2"]
    assert topo.devices["gpu1"].peak_flops["fp32"] == pytest.approx(40e12)
    assert topo.devices["gpu1"].efficiency_at(1e10) == pytest.approx(0.8)
    assert topo.devices["gpu0"].op_overhead == pytest.approx(5e-6)
    assert topo.devices["cpu"].peak_flops["fp32"] == pytest.approx(100e9)
    host = topo.route("cpu", "gpu2")                     # through the switch: both hops' latency, the slower rate
    assert [ln[1] for ln in host] == ["pcie", "gpu2"]
    assert topo.route_latency(host) == pytest.approx(12e-6)
    assert topo.route_bandwidth(host) == pytest.approx(20e9)
    peer = topo.route("gpu1", "gpu2")                    # the direct link, not the switch, with that pair's fit
    assert len(peer) == 1 and topo.route_latency(peer) == pytest.approx(9e-6)
    assert topo.route_bandwidth(peer) == pytest.approx(150e9)
    far = topo.route("gpu0", "gpu2")
    assert len(far) == 1 and topo.route_latency(far) == pytest.approx(8e-6)
    assert topo.route_bandwidth(far) == pytest.approx(300e9)


@pytest.mark.parametrize("digits, cc", [("90", 9.0), ("80", 8.0), ("86", 8.6), ("120", 12.0)])
def test_cupy_s_compute_capability_digits_are_the_topology_s_number(digits, cc):
    assert capability(digits) == cc


def test_the_compute_capability_is_written_where_known_for_nccl_s_tuner(tmp_path):
    path = tmp_path / "h100.toml"
    path.write_text(gpu_topology_text("h100", {**result(2), "compute_capability": 9.0}))
    assert {load_topology(str(path)).devices[g].compute_capability for g in ("gpu0", "gpu1")} == {9.0}
    path.write_text(gpu_topology_text("unknown", result(2)))      # NumPy's stand-in: not given, 0
    assert load_topology(str(path)).devices["gpu0"].compute_capability == 0.0
    assert numpy_backend(2).compute_capability() == 0.0


def test_an_efficiency_far_below_a_ten_thousandth_is_written_as_measured(tmp_path):
    """A small backward op on an H200 measured 3e-05 of the peak (its launches dominate)."""
    res = result(1)
    res["gpu"]["backward_efficiency_curve"] = [[3e4, 3.1e-5], [5e5, 4e-4], [2e10, 1.0]]
    path = tmp_path / "gpus.toml"
    path.write_text(gpu_topology_text("gpus", res))
    assert load_topology(str(path)).devices["gpu0"].efficiency_at(3e4, backward=True) == pytest.approx(3.1e-5)


def test_one_gpu_has_no_peer_link(tmp_path):
    path = tmp_path / "one.toml"
    path.write_text(gpu_topology_text("one", result(1)))
    topo = load_topology(str(path))
    assert topo.compute_devices() == ["gpu0"] and len(topo.route("cpu", "gpu0")) == 2


def test_copies_are_measured_each_way_and_between_every_pair_on_the_numpy_backend():
    out = measure_copies(numpy_backend(3), sizes=[2**10, 2**16, 2**22], repeats=3)
    assert sorted(out) == ["d2d0-1", "d2d0-2", "d2d1-2", "d2h", "h2d"]
    for key, f in out.items():
        assert [s[0] for s in f["samples"]] == [2**10, 2**16, 2**22]
        assert all(s[1] > 0 for s in f["samples"]) and f["beta_bytes_per_s"] > 0 and f["alpha_s"] >= 0
        assert f["samples"][-1][1] > f["samples"][0][1]          # 4 MiB takes longer than 1 KiB


def test_the_allreduce_of_the_numpy_backend_sums_every_buffer_into_each():
    bufs = [np.full(5, float(d + 1), np.float32) for d in range(3)]
    numpy_backend(3).allreduce(bufs)
    assert all(np.array_equal(b, np.full(5, 6.0)) for b in bufs)


def test_allreduce_rows_are_nccl_tests_rows_by_size_within_the_memory_limit():
    rows = measure_allreduce(numpy_backend(4), sizes=[2**12, 2**16, 2**20], repeats=3, limit=2**16)
    assert [r["bytes"] for r in rows] == [2**12, 2**16]          # 1 MiB is over the limit
    for r in rows:                                               # nccl-tests: busbw = algbw x 2 (n - 1) / n
        assert r["algbw_gbps"] == pytest.approx(r["bytes"] / r["time_s"] / 1e9)
        assert r["busbw_gbps"] == pytest.approx(r["algbw_gbps"] * 2 * 3 / 4)
    assert measure_allreduce(numpy_backend(1), sizes=[2**12]) == []


@pytest.mark.skipif(cupy_or_none() is not None, reason="CuPy sees a GPU here")
def test_calibrate_gpu_without_a_gpu_is_refused_in_one_line(tmp_path):
    out = tmp_path / "g.toml"
    proc = subprocess.run([sys.executable, "-m", "clustersim", "calibrate", "--gpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--gpu" in proc.stderr, proc.stderr
    assert not out.exists()


@pytest.mark.skipif(cupy_or_none() is None, reason="needs CuPy and a GPU")
def test_calibrate_gpu_writes_a_topology_that_loads(tmp_path):
    out = tmp_path / "g.toml"
    proc = subprocess.run([sys.executable, "-m", "clustersim", "calibrate", "--gpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    topo = load_topology(str(out))
    gpus = topo.compute_devices()
    assert gpus and all(topo.devices[g].kind == "gpu" for g in gpus)
    assert topo.route_bandwidth(topo.route("cpu", gpus[0])) > 1e9          # PCIe moves more than 1 GB/s


def test_a_gpu_op_costs_the_executor_s_own_overhead_where_that_exceeds_a_launch(monkeypatch):
    """As on a CPU host: op_overhead_s is the larger of one dense forward's and the
    executor's per op (``measure_step_overhead``), both timed waiting for the current GPU
    alone; the launch stays as kernel_overhead_s."""
    from clustersim.calibration import gpu
    waits = []
    be = dataclasses.replace(numpy_backend(1), sync_current=lambda: waits.append("current"))

    def compute(rng, xp=np, sync=lambda: None):
        sync()
        return {"op_overhead_s": 4e-6 if xp is be.xp and sync is be.sync_current else 1e-6, "peak_flops": 1e12}

    def step(rng, xp=np, sync=lambda: None):
        sync()
        return 3e-5
    monkeypatch.setattr(gpu, "measure_compute", compute)
    monkeypatch.setattr(gpu, "measure_step_overhead", step)
    for name in ("measure_device_bandwidth", "measure_memory_bandwidth"):
        monkeypatch.setattr(gpu, name, lambda *a: 1e9)
    monkeypatch.setattr(gpu, "measure_copies", lambda be: {})
    monkeypatch.setattr(gpu, "measure_op_costs", lambda be, seed, probes: {})
    res = gpu.calibrate_gpus(be)
    assert res["gpu"]["op_overhead_s"] == 3e-5 and res["gpu"]["kernel_overhead_s"] == 4e-6
    assert waits == ["current", "current"]
    monkeypatch.setattr(gpu, "measure_step_overhead", lambda rng, xp, sync: 2e-6)
    assert gpu.calibrate_gpus(be)["gpu"]["op_overhead_s"] == 4e-6


def test_the_executor_s_step_overhead_is_measured_on_the_array_module_given():
    """``measure_step_overhead`` waits with ``sync`` after each op of the step (as a GPU
    rank times its ops) and after each call, 51 timed and one untimed: the tiny net's
    four layers forward and backward, 8 ops and the step's end, 52 times."""
    calls = []
    t = measure_step_overhead(np.random.default_rng(0), np, lambda: calls.append(1))
    assert 0 < t < 0.01 and len(calls) == 52 * (8 + 1)


@pytest.mark.parametrize("devices", [1, 2])
def test_the_executor_s_ops_probed_on_the_gpu_are_its_op_costs_and_are_printed(tmp_path, monkeypatch, capsys, devices):
    """``calibrate --gpu`` probes the executor's ops in context (here on the NumPy backend,
    mlp-digits at two batches): every op key of the probe gets a fit, the GPUs of the
    topology carry them (an op's time is the fit's closed form), still run their ops in
    order, and the report prints them -- with one GPU too (no peer copies)."""
    from clustersim.calibration import gpu
    from clustersim.cli.calibrate import print_gpu
    from sim.compute import op_seconds, runs_in_order
    monkeypatch.setattr(gpu, "measure_compute", lambda rng, xp=np, sync=lambda: None: dict(result(1)["gpu"]))
    monkeypatch.setattr(gpu, "measure_step_overhead", lambda rng, xp=np, sync=lambda: None: 1e-6)
    for name in ("measure_device_bandwidth", "measure_memory_bandwidth"):
        monkeypatch.setattr(gpu, name, lambda *a: 1e9)
    monkeypatch.setattr(gpu, "measure_copies", lambda be: result(devices)["copies"])
    monkeypatch.setattr(gpu, "measure_allreduce", lambda be: [])   # host memory up to 1 GiB a buffer: 20 s
    monkeypatch.setattr(gpu, "GPU_PROBE_REPEATS", 3)            # a test's, not a GPU's, statistics
    res = gpu.calibrate_gpus(numpy_backend(devices), probes=(("mlp-digits", (8, 32)),))
    costs = res["gpu"]["op_costs"]
    assert {"dense", "dense.backward", "relu", "softmax_xent", "step", "update"} <= set(costs)
    assert not any(key.startswith(("send", "recv")) for key in costs)   # a mailbox is no GPU rank's transport
    path = tmp_path / "gpus.toml"
    path.write_text(gpu_topology_text("gpus", res))
    topo = load_topology(str(path))
    dense = costs["dense"]
    flops, nbytes = 3e8, 4e6
    expect = (dense["fixed_s"] + (flops / dense["flops_per_s"] if dense["flops_per_s"] else 0.0)
              + (nbytes / dense["bytes_per_s"] if dense["bytes_per_s"] else 0.0))
    for g in topo.compute_devices():
        assert set(topo.devices[g].op_costs) == set(costs) and runs_in_order(topo.devices[g])
        assert op_seconds(topo, g, flops, nbytes, "fp32", key="dense") == pytest.approx(expect, rel=1e-5)
    print_gpu(res, str(path))
    out = capsys.readouterr().out
    assert "pinned host -> GPU 0" in out and ("GPU 0 -> GPU 1" in out) == (devices == 2)
    assert all(f"    {key} " in out for key in costs)


def test_the_hosts_cpu_maker_is_written_as_nccl_tells_them_apart(tmp_path):
    from clustersim.calibration.gpu import cpu_vendor
    assert cpu_vendor("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 23\n") == "amd"
    assert cpu_vendor("processor\t: 0\nvendor_id\t: GenuineIntel\n") == "intel"
    assert cpu_vendor("processor\t: 0\nvendor_id\t: HygonGenuine\n") == ""
    assert cpu_vendor("") == ""                                  # an ARM host's cpuinfo has no vendor_id
    path = tmp_path / "amd.toml"
    path.write_text(gpu_topology_text("amd", {**result(2), "cpu_vendor": "amd"}))
    assert load_topology(str(path)).devices["cpu"].vendor == "amd"
    path.write_text(gpu_topology_text("none", {**result(2), "cpu_vendor": ""}))
    assert load_topology(str(path)).devices["cpu"].vendor == ""
