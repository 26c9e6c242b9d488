"""The GPU part of calibration (``clustersim calibrate --gpu``) -> a topology of this machine.

Measured on the GPUs CuPy sees (medians, each timing waiting for the device's stream):
- compute: the executor's dense kernels forward and backward at the zoo's shapes on GPU 0
  (``calibrate.measure_compute`` on CuPy arrays): peak, efficiency curve, per-op overhead
  (a launch, or the executor's own per op where larger); on-device memory bandwidth (a large copy);
- the executor's own ops in context on GPU 0 (``probe.op_times`` on CuPy arrays, each op
  waited for as a GPU rank waits; ``GPU_PROBES``), fitted per op key as on a CPU host
  (``op_costs``): a GPU rank's op costs its launches and its Python beside the kernels,
  which the dense-kernel figures above miss (decision 074);
- host <-> device over PCIe: copies between pinned host memory and GPU 0, each direction,
  by size, fitted to alpha + bytes / beta (``calibrate.fit_alpha_beta``);
- device <-> device: ``memcpyPeer`` between every pair of GPUs (NVLink or peer PCIe,
  whichever joins that pair: machines mix them), by size and fitted the same way;
- NCCL allreduce over all GPUs (one communicator per GPU in this process,
  ``ncclCommInitAll``; nccl-tests' busbw = 2 (n - 1) / n x bytes / time), by size: not a
  topology term, but what ``make validate-gpu`` checks the collective model against;
- the host CPU as ``calibrate.measure_compute`` on NumPy, and its memory bandwidth.

The topology: the CPU, one PCIe switch, every GPU on it with the host <-> device fit (the
slower direction's, as a link has one rate both ways; each of the two hops carries half
the latency), and a direct link between each pair of GPUs with that pair's device <-> device
fit (so routing takes it over the switch).  Compute is GPU 0's, taken for every GPU; ops
of a kind no probe ran fall back to its peak, curve and per-op overhead.

Each piece runs on an array backend (``Backend``): CuPy on a GPU host; NumPy (a
"device" is host memory, a copy is a memcpy) in the tests, so the sequence, the fits and
the topology are checked on any machine.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from clustersim.calibration.host import (compute_lines, fit_alpha_beta, fit_op_cost, measure_compute,
                                         measure_memory_bandwidth, measure_step_overhead, median_time, op_costs_text)
from clustersim.core.topology import MESSAGE_KEYS

COPY_SIZES = [2**k for k in range(10, 29, 2)]      # 1 KiB .. 256 MiB
COPY_REPEATS = 9
ALLREDUCE_SIZES = [2**k for k in range(10, 31, 2)]   # 1 KiB .. 1 GiB, nccl-tests' range
ALLREDUCE_REPEATS = 5
# (model, batch sizes) probed on the GPU: batches a GPU is run at, none of the validation
# suite's (64, 256, 1024: those are predicted between the probed ones, not read back)
GPU_PROBES = (("mlp-digits", (32, 512, 4096)), ("distbelief-speech", (32, 128, 512, 2048)))
GPU_PROBE_REPEATS = 30        # timed steps a probe at least: a GPU step is milliseconds, and a GPU
GPU_PROBE_PASSES = 3          # rank's op is mostly the host's Python, as noisy as the host (decision 074)


@dataclass
class Backend:
    xp: Any                                        # numpy or cupy
    devices: int
    sync: Callable[[], None]                       # waits for every device's queued work
    use: Callable[[int], Any]                      # a context: device d is current
    pinned: Callable[[int], np.ndarray]            # n bytes of page-locked host memory
    h2d: Callable[[Any, np.ndarray], None]         # device array <- host array
    d2h: Callable[[np.ndarray, Any], None]         # host array <- device array
    peer: Callable[[Any, int, Any, int], None]     # (dst, its device, src, its device)
    memory_bytes: Callable[[], float]              # one device's memory
    allreduce: Callable[[list], None]              # sums one buffer per device into each, in place
    compute_capability: Callable[[], float] = lambda: 0.0   # device 0's (9.0 H100); 0: not a GPU
    sync_current: Callable[[], None] = lambda: None         # waits for the current device's work only


def pair_key(a: int, b: int) -> str:
    """The result key of the copies from GPU ``a`` to GPU ``b``."""
    return f"d2d{a}-{b}"


def numpy_backend(devices: int = 2) -> Backend:
    """Host memory standing in for ``devices`` GPUs (tests, and hosts without CuPy)."""
    def copy(dst, src, *_):
        np.copyto(dst, src)

    def allreduce(bufs):
        total = np.sum(bufs, axis=0)
        for b in bufs:
            np.copyto(b, total)
    return Backend(np, devices, lambda: None, lambda _d: nullcontext(), lambda n: np.empty(n, np.uint8),
                   copy, copy, lambda dst, _dd, src, _sd: np.copyto(dst, src),
                   lambda: float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")), allreduce)


def cupy_backend(cp) -> Backend:
    import cupyx
    n = cp.cuda.runtime.getDeviceCount()

    def sync():
        for d in range(n):
            with cp.cuda.Device(d):
                cp.cuda.runtime.deviceSynchronize()

    def peer(dst, dst_dev, src, src_dev):
        cp.cuda.runtime.memcpyPeer(dst.data.ptr, dst_dev, src.data.ptr, src_dev, src.nbytes)
    comms: list = []                               # made on first use: NCCL only where it is measured

    def allreduce(bufs):
        from cupy.cuda import nccl
        if not comms:
            comms.extend(nccl.NcclCommunicator.initAll(list(range(n))))
        nccl.groupStart()
        for d, (comm, b) in enumerate(zip(comms, bufs)):
            with cp.cuda.Device(d):
                comm.allReduce(b.data.ptr, b.data.ptr, b.size, nccl.NCCL_FLOAT32, nccl.NCCL_SUM,
                               cp.cuda.get_current_stream().ptr)
        nccl.groupEnd()
    return Backend(cp, n, sync, cp.cuda.Device, lambda k: cupyx.empty_pinned(k, np.uint8),
                   lambda dev, host: dev.set(host), lambda host, dev: dev.get(out=host), peer,
                   lambda: float(cp.cuda.runtime.memGetInfo()[1]), allreduce,
                   lambda: capability(cp.cuda.Device(0).compute_capability), lambda: cp.cuda.Device().synchronize())


def capability(digits: str) -> float:
    """CuPy's ``Device.compute_capability`` ("90", "80", "120") as the topology's number
    (9.0, 8.0, 12.0): NCCL's tuner picks protocols and per-channel caps by it."""
    return int(digits[:-1]) + int(digits[-1]) / 10


def measure_copies(be: Backend, sizes: list[int] = COPY_SIZES, repeats: int = COPY_REPEATS) -> dict:
    """One-way seconds by size: pinned host -> GPU 0, GPU 0 -> pinned host, and GPU a ->
    GPU b for every pair a < b (``pair_key``); each with its alpha-beta fit."""
    rows: dict[str, list[list[float]]] = {"h2d": [], "d2h": []}
    pairs = [(a, b) for a in range(be.devices) for b in range(a + 1, be.devices)]
    rows.update({pair_key(a, b): [] for a, b in pairs})
    for n in sizes:
        host = be.pinned(n)
        host[:] = 1
        bufs = []
        for d in range(be.devices):
            with be.use(d):
                bufs.append(be.xp.ones(n, np.uint8))
        rows["h2d"].append([n, median_time(lambda: be.h2d(bufs[0], host), repeats, be.sync)])
        rows["d2h"].append([n, median_time(lambda: be.d2h(host, bufs[0]), repeats, be.sync)])
        for a, b in pairs:
            rows[pair_key(a, b)].append([n, median_time(lambda: be.peer(bufs[b], b, bufs[a], a), repeats, be.sync)])
    return {key: {"samples": pts, **fit_alpha_beta([p[0] for p in pts], [p[1] for p in pts])}
            for key, pts in rows.items()}


def measure_allreduce(be: Backend, sizes: list[int] = ALLREDUCE_SIZES, repeats: int = ALLREDUCE_REPEATS,
                      limit: float | None = None) -> list[dict]:
    """nccl-tests' rows of a float32 sum-allreduce over all ``be.devices`` GPUs by size
    (``bytes``, ``time_s``, ``algbw_gbps``, ``busbw_gbps``); sizes whose buffers would not fit
    in ``limit`` bytes of one device (default: a quarter of its memory) are left out.  One GPU:
    no rows (nothing to reduce with)."""
    n = be.devices
    if n < 2:
        return []
    limit = be.memory_bytes() / 4 if limit is None else limit
    rows = []
    for size in (s for s in sizes if s <= limit):
        bufs = []
        for d in range(n):
            with be.use(d):
                bufs.append(be.xp.ones(size // 4, np.float32))
        t = median_time(lambda: be.allreduce(bufs), repeats, be.sync)
        rows.append({"bytes": size, "time_s": t, "algbw_gbps": size / t / 1e9,
                     "busbw_gbps": 2 * (n - 1) / n * size / t / 1e9})
    return rows


def measure_device_bandwidth(be: Backend, n_bytes: int = 256 * 2**20) -> float:
    with be.use(0):
        a = be.xp.ones(n_bytes // 4, np.float32)
        b = be.xp.empty_like(a)
        t = median_time(lambda: be.xp.copyto(b, a), 5, be.sync)
    return 2 * a.nbytes / t


def measure_op_costs(be: Backend, seed: int = 0, probes: tuple = GPU_PROBES) -> dict:
    """The executor's ops of ``probes`` timed in context on GPU 0, each waited for alone
    (``sync_current``), fitted per op key (``fit_op_cost``; no cache term).  Not the
    messages': the probe passes them through an in-process mailbox on one GPU, where GPU
    ranks use NCCL (or the host and MPI), so a GPU's messages stay network flows."""
    from clustersim.calibration.probe import op_times
    with be.use(0):
        points = op_times(seed, GPU_PROBE_REPEATS, GPU_PROBE_PASSES, probes=probes, xp=be.xp, sync=be.sync_current)
    return {key: fit_op_cost(pts) for key, pts in sorted(points.items())
            if key.split(".")[0] not in MESSAGE_KEYS}


def calibrate_gpus(be: Backend, seed: int = 0, probes: tuple = GPU_PROBES) -> dict:
    """Everything above.  The per-op overhead, as on a CPU host, is the larger of one dense
    forward's and the executor's own per op (``measure_step_overhead``: its region assembly
    and bookkeeping beside a layer's kernels); both wait for GPU 0 alone (``sync_current``),
    as a waiting rank does, not for every GPU of the host.  The probed ops' own costs
    (``measure_op_costs``) take precedence over both for their keys."""
    with be.use(0):
        gpu = measure_compute(np.random.default_rng(seed), be.xp, be.sync_current)
        kernel = gpu["op_overhead_s"]
        gpu["op_overhead_s"] = max(kernel, measure_step_overhead(np.random.default_rng(seed), be.xp,
                                                                 be.sync_current))
        gpu["kernel_overhead_s"] = kernel
    gpu["op_costs"] = measure_op_costs(be, seed, probes)
    return {"devices": be.devices, "gpu": gpu, "gpu_memory_bytes": be.memory_bytes(),
            "compute_capability": be.compute_capability(),
            "gpu_memory_bandwidth_bytes_per_s": measure_device_bandwidth(be), "copies": measure_copies(be),
            "nccl_allreduce": measure_allreduce(be),
            "cpu": measure_compute(np.random.default_rng(seed)), "cores": os.cpu_count() or 1,
            "cpu_vendor": cpu_vendor(_cpuinfo()),
            "cpu_memory_bandwidth_bytes_per_s": measure_memory_bandwidth()}


def cpu_vendor(cpuinfo: str) -> str:
    """"intel" or "amd" from /proc/cpuinfo's ``vendor_id`` ("": another maker, or nothing to
    read): the hosts' CPU as NCCL's tuner tells them apart (``Device.vendor``)."""
    for line in cpuinfo.splitlines():
        if line.startswith("vendor_id"):
            return {"GenuineIntel": "intel", "AuthenticAMD": "amd"}.get(line.partition(":")[2].strip(), "")
    return ""


def _cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:                 # not Linux
        return ""


def host_bus(res: dict) -> tuple[float, float]:
    """(rate, latency) of a host's PCIe path from ``calibrate_gpus``' copies: the slower
    direction's rate (a link has one rate both ways) and the larger alpha."""
    h2d, d2h = res["copies"]["h2d"], res["copies"]["d2h"]
    return min(h2d["beta_bytes_per_s"], d2h["beta_bytes_per_s"]), max(h2d["alpha_s"], d2h["alpha_s"])


def gpu_topology_text(name: str, res: dict) -> str:
    """``res`` from ``calibrate_gpus``: the machine as a topology file (see the module)."""
    cp, gpu, copies = res["cpu"], res["gpu"], res["copies"]
    h2d, d2h = copies["h2d"], copies["d2h"]
    bus, alpha = host_bus(res)
    lines = [f'name = "{name}"',
             f'description = "calibrated on this host: {res["devices"]} GPUs; pinned host->device alpha '
             f'{h2d["alpha_s"] * 1e6:.2f} us, beta {h2d["beta_bytes_per_s"] / 1e9:.3g} GB/s, device->host '
             f'{d2h["alpha_s"] * 1e6:.2f} us, {d2h["beta_bytes_per_s"] / 1e9:.3g} GB/s"',
             "", "[[device]]", 'name = "cpu"', 'kind = "cpu"', "machine = 0", f"cores = {res['cores']}",
             *([f'vendor = "{res["cpu_vendor"]}"'] if res.get("cpu_vendor") else []),
             f"core_gflops = {cp['peak_flops'] / 1e9 / res['cores']:.6g}", "memory_gib = 16",
             f"memory_bandwidth_gbps = {res['cpu_memory_bandwidth_bytes_per_s'] / 1e9:.6g}", *compute_lines(cp),
             "", "[[device]]", 'name = "pcie"', 'kind = "pcie_switch"', "machine = 0"]
    for g in range(res["devices"]):
        lines += ["", "[[device]]", f'name = "gpu{g}"', 'kind = "gpu"', "machine = 0",
                  f"peak_tflops_fp32 = {gpu['peak_flops'] / 1e12:.6g}",
                  f"memory_gib = {res['gpu_memory_bytes'] / 2**30:.6g}",
                  f"memory_bandwidth_gbps = {res['gpu_memory_bandwidth_bytes_per_s'] / 1e9:.6g}", *compute_lines(gpu)]
        if res.get("compute_capability"):
            lines.append(f"compute_capability = {res['compute_capability']:g}")
        if gpu.get("op_costs"):
            lines.append(f"op_costs = {{ {op_costs_text(gpu['op_costs'])} }}")
    for a in ["cpu"] + [f"gpu{g}" for g in range(res["devices"])]:
        lines += ["", "[[link]]", f'a = "{a}"', 'b = "pcie"', f"bandwidth_gbps = {bus / 1e9:.6g}",
                  f"latency_us = {alpha * 1e6 / 2:.6g}"]
    for g in range(res["devices"]):
        for h in range(g + 1, res["devices"]):
            fit = copies[pair_key(g, h)]
            lines += ["", "[[link]]", f'a = "gpu{g}"', f'b = "gpu{h}"',
                      f"bandwidth_gbps = {fit['beta_bytes_per_s'] / 1e9:.6g}", f"latency_us = {fit['alpha_s'] * 1e6:.6g}"]
    return "\n".join(lines) + "\n"
