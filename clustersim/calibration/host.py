"""Microbenchmarks of this host -> a topology the simulator can use (``clustersim calibrate``).

Measured (medians of REPEATS):
- compute: the executor's dense kernels (forward and backward) at the zoo's shapes; the
  fastest rate is the peak, every shape's rate over the peak is a point of the efficiency
  curve (by FLOPs); the fixed per-op overhead is what a step of a tiny net through the
  executor's ``run_step`` costs per op (region assembly, the op walk), not a bare kernel call;
- memory bandwidth: a large copy (bytes read + written over time);
- MPI between two ranks: our transport's ping-pong by message size, fitted by least
  squares to alpha + bytes / beta (reported with R^2 and the worst relative error);
- the executor's ops in context (``probe.py``: each layer kind forward and
  backward, the update, a message's send and receive costs, a step's set-up), each
  fitted to a fixed cost plus FLOPs and bytes at fitted rates, bytes beyond a core's L2
  cache at their own rate (``op_costs``, ``cache_mib``); and an allreduce among all the
  job's ranks as it costs the sync workers' step, by size (``op_curves``, interpolated);
- cores, and how ranks share them: everything is measured with the BLAS threads, core
  binding and allocator settings a rank of the job gets (``executor/launch.py``, as
  ``clustersim execute`` sets them); ranks beyond the cores are bound round-robin, one
  core pool per core, whose members share it busy or polling;
- how fast each core ran meanwhile, and how that varies: ``hostspeed.py``'s
  reference step on every core at once for 3 s before the rest and 3 s after, by 50 ms
  window.  The first 3 s give the host's quiet speed (``quiet_reference``): the in-context
  probes are timed where the host ran at it (``probe.quiet_probe``), so the op costs are
  this host's without its neighbours; calibrate reports each rank's windows
  (``reference_windows_s``) and writes each rank's slowdown by window as its ``noise``
  series, which ``faults.host_noise`` replays (decision 048).

Why these choices: docs/decisions/004-quiet-host-calibration.md,
005-probes-timed-in-steady-state.md, 006-probes-in-separate-jobs.md and
007-allreduce-as-a-step-costs-it.md.

The topology has one ``cpu`` device per rank (its own machine index, so each is a compute
device, rank k = device k) on a ``switch`` standing for shared memory; each rank's link
carries half the latency, so a message pays alpha once.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from clustersim.core.layers import full_box
from clustersim.core.metrics import WINDOW_S
from clustersim.core.models import make_layer

from executor.kernels import backward, forward
from clustersim.calibration.hostspeed import SERIES_S, core_series, noise_series, quiet_reference, rank_series
from executor.launch import mpiexec, rank_env

REPEATS = 7
PROBE_JOBS = 3            # separate probe jobs (processes) whose figures are combined
DENSE_SHAPES = [(8, 64, 16), (16, 64, 128), (64, 64, 128), (128, 64, 128), (16, 440, 2560), (32, 440, 2560),
                (16, 2560, 2560), (128, 2560, 2560), (16, 2560, 8192), (128, 2560, 8192)]
MPI_SIZES = [2**k for k in range(3, 25, 3)]
ALLREDUCE_SIZES = [2**k for k in (6, 10, 12, 14, 15, 16, 17, 18, 20, 22, 24, 26)]


def median_time(fn, repeats: int = REPEATS, sync=lambda: None) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after one untimed; ``sync`` waits
    for the work ``fn`` queued (a GPU's stream), before the clock starts and stops."""
    fn()
    sync()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def measure_compute(rng: np.random.Generator, xp=np, sync=lambda: None) -> dict:
    """Per-op overhead (s), peak FLOP/s and the efficiency curve of the dense kernels, on
    the arrays of ``xp`` (NumPy here, CuPy on a GPU with its ``sync``)."""
    tiny = make_layer("dense", units=1)
    x1 = xp.ones((1, 1, 1, 1), np.float32)
    params1 = [xp.ones((1, 1), np.float32), xp.zeros(1, np.float32)]
    overhead = median_time(lambda: forward(xp, tiny, (1, 1, 1), x1, full_box((1, 1, 1)), full_box((1, 1, 1)), params1),
                           101, sync)
    points, back = [], []
    for b, n_in, n_out in DENSE_SHAPES:
        layer = make_layer("dense", units=n_out)
        x = xp.asarray(rng.standard_normal((b, n_in, 1, 1), dtype=np.float32))
        params = [xp.asarray(rng.standard_normal((n_in, n_out), dtype=np.float32)), xp.zeros(n_out, np.float32)]
        rin, box = full_box((n_in, 1, 1)), full_box((n_out, 1, 1))
        flops = 2.0 * b * n_in * n_out
        points.append((flops, median_time(lambda: forward(xp, layer, (n_in, 1, 1), x, rin, box, params),
                                          REPEATS, sync)))
        y, cache = forward(xp, layer, (n_in, 1, 1), x, rin, box, params)
        dy = xp.ones_like(y)
        back.append((2 * flops, median_time(
            lambda: backward(xp, layer, (n_in, 1, 1), x.shape, rin, box, params, cache, dy), REPEATS, sync)))
    peak = max(f / t for f, t in points + back)        # raw rates: the large shapes set it

    def curve_of(pts):                                 # the model is t = overhead + flops / (peak x eff)
        curve: dict[float, list[float]] = {}
        for flops, t in pts:
            curve.setdefault(flops, []).append(min(1.0, flops / (peak * max(t - overhead, 1e-12))))
        return sorted((f, float(np.mean(e))) for f, e in curve.items())
    return {"op_overhead_s": overhead, "peak_flops": peak, "efficiency_curve": curve_of(points),
            "backward_efficiency_curve": curve_of(back)}


def measure_step_overhead(rng: np.random.Generator, xp=np, sync=lambda: None) -> float:
    """Seconds the executor spends per op beyond its arithmetic: one step of a tiny dense
    net through ``run_step`` (region assembly, the op walk, bookkeeping), per op; on the
    arrays of ``xp`` (CuPy on a GPU, with its ``sync``: there each op launches several kernels,
    and the executor waits for each op's as it times it)."""
    import dataclasses

    from clustersim.core.models import build_model
    from clustersim.core.plan import plan
    from clustersim.core.scenario import scenario_from_dict

    from executor.kernels import init_params
    from executor.partitioned import Mailbox, run_step, slot_params
    model = build_model("tiny", (4, 1, 1), [make_layer("dense", units=4), make_layer("relu"),
                                            make_layer("dense", units=2), make_layer("softmax_xent")])
    sc = scenario_from_dict({"cluster": {"topology": "dgx-h100"}, "model": {"name": "mlp-digits", "batch_size": 1}},
                            "calibrate.toml")
    p = plan(dataclasses.replace(sc, model=model), check_memory=False)
    full = init_params(model, rng, dtype=np.float32)
    params = {key: [xp.asarray(a) for a in arrs] for key, arrs in slot_params(p, full).items()}
    x, y = xp.ones((1, 4, 1, 1), np.float32), xp.zeros(1, np.int64)
    t = median_time(lambda: run_step(p, {0}, params, x, y, Mailbox(), xp=xp, on_op=lambda *_: sync()), 51, sync)
    return t / len(p.ops)


def measure_memory_bandwidth(n_bytes: int = 256 * 2**20) -> float:
    a = np.ones(n_bytes // 8)
    b = np.empty_like(a)
    t = median_time(lambda: np.copyto(b, a), 5)
    return 2 * a.nbytes / t


def run_probe(ranks: int, env: dict, *args: str):
    """``mpiexec -n ranks python -m clustersim.calibration.probe ARGS``: what rank 0 printed, as JSON."""
    proc = subprocess.run([str(mpiexec()), "-n", str(ranks), sys.executable, "-m", "clustersim.calibration.probe", *args],
                          capture_output=True, text=True, timeout=1200, env=env,
                          cwd=str(Path(__file__).resolve().parents[1]))
    if proc.returncode != 0:
        raise RuntimeError(f"clustersim.calibration.probe {args[0]} on {ranks} ranks failed: {proc.stderr[-500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_allreduce(ranks: int, cores: int, sizes: list[int] = ALLREDUCE_SIZES, cache: float = 0.0) -> dict:
    """An allreduce among all ``ranks`` as it costs the executor's sync workers' step (flatten,
    the polled non-blocking collective, copy back, after and before a step's work), by bytes
    per rank; fitted like an op for the report, and kept as a curve of the measured times (the
    simulator interpolates it: the collective's algorithm, and so its cost in a step, changes
    with the size; see docs/decisions/007-allreduce-as-a-step-costs-it.md)."""
    points = run_probe(ranks, rank_env(ranks, cores), "allreduce", json.dumps(sizes), str(cores))
    return {**fit_op_cost(points, cache), "curve": [[b, t] for _, b, t in points]}


def measure_mpi(sizes: list[int] = MPI_SIZES) -> dict:
    """One-way message time by size on 2 ranks, and its alpha-beta fit."""
    rows = run_probe(2, rank_env(2, 2), "pingpong", json.dumps(sizes))
    return {"samples": rows, **fit_alpha_beta([r[0] for r in rows], [r[1] for r in rows])}


def fit_alpha_beta(sizes: list[float], times: list[float]) -> dict:
    """Least squares t = alpha + n / beta, weighted by 1/t so small and large messages count
    alike; returns alpha (s), beta (bytes/s), R^2 and the worst relative error."""
    n, t = np.asarray(sizes, float), np.asarray(times, float)
    w = 1.0 / t
    A = np.stack([np.ones_like(n), n], axis=1) * w[:, None]
    (alpha, inv_beta), *_ = np.linalg.lstsq(A, t * w, rcond=None)
    alpha, inv_beta = max(alpha, 0.0), max(inv_beta, 1e-15)
    pred = alpha + n * inv_beta
    ss_res = float(((t - pred) ** 2).sum())
    ss_tot = float(((t - t.mean()) ** 2).sum()) or 1.0
    return {"alpha_s": float(alpha), "beta_bytes_per_s": float(1.0 / inv_beta), "r2": 1.0 - ss_res / ss_tot,
            "max_rel_error": float(np.max(np.abs(pred - t) / t))}


def measure_op_costs(ranks: int, cores: int, cache: float = 0.0, jobs: int = PROBE_JOBS,
                     quiet: float | None = None, models: list[str] | None = None) -> dict:
    """The executor's ops timed in context (``probe.py``) by min(ranks, cores) ranks at
    once, each with the BLAS threads a rank of a ``ranks``-rank job gets, in ``jobs``
    separate jobs (a process's memory layout moves large ops, so one job's figures share its
    luck: docs/decisions/006-probes-in-separate-jobs.md) whose points' median is fitted per
    op key (bytes beyond ``cache`` at their own rate).  ``quiet``: the reference step on a
    quiet host; probes wait for the host to run at it (``probe.quiet_probe``).  ``models``:
    probe only theirs (``probe.probes_for``)."""
    quiet_args = [repr(quiet) if quiet is not None else "-"] + ([json.dumps(models)] if models else [])
    runs = [run_probe(max(1, min(ranks, cores)), rank_env(ranks, cores), "ops", *quiet_args) for _ in range(jobs)]
    points: dict[str, dict[tuple, list[float]]] = {}
    for run in runs:
        for key, pts in run.items():
            for f, b, t in pts:
                points.setdefault(key, {}).setdefault((f, b), []).append(t)
    return {key: fit_op_cost([[f, b, statistics.median(ts)] for (f, b), ts in sorted(by.items())], cache)
            for key, by in sorted(points.items())}


def fit_op_cost(points: list[list[float]], cache: float = 0.0) -> dict:
    """Least squares t = fixed + flops / flop_rate + min(bytes, cache) / byte_rate +
    max(bytes - cache, 0) / beyond_rate over (flops, bytes, seconds) points (``cache`` 0:
    one byte rate), weighted by 1/t (relative error counts), every term >= 0: of the fits
    on each subset of the terms, the best one whose coefficients are all non-negative.
    Returns the costs (a rate of 0 means no such term), R^2 and the worst relative error."""
    from itertools import combinations
    pts = np.asarray(points, float)
    flops, nbytes, t = pts[:, 0], pts[:, 1], pts[:, 2]
    inside = np.minimum(nbytes, cache) if cache > 0 else nbytes
    X = np.stack([np.ones(len(pts)), flops, inside, nbytes - inside], axis=1)
    w = 1.0 / t
    best = None
    for k in range(1, 5):
        for cols in combinations(range(4), k):
            cols = [c for c in cols if X[:, c].any()]
            if not cols:
                continue
            coef, *_ = np.linalg.lstsq(X[:, cols] * w[:, None], t * w, rcond=None)
            if (coef < 0).any():
                continue
            full = np.zeros(4)
            full[cols] = coef
            err = float(np.sum(((X @ full - t) * w) ** 2))
            if best is None or err < best[0] - 1e-15:
                best = (err, full)
    c = best[1]
    pred = X @ c
    ss_tot = float(((t - t.mean()) ** 2).sum()) or 1.0
    rate = lambda inv: float(1.0 / inv) if inv > 0 else 0.0     # noqa: E731
    return {"fixed_s": float(c[0]), "flops_per_s": rate(c[1]), "bytes_per_s": rate(c[2]),
            "bytes_beyond_cache_per_s": rate(c[3]) if cache > 0 else rate(c[2]), "points": len(pts),
            "r2": 1.0 - float(((t - pred) ** 2).sum()) / ss_tot, "max_rel_error": float(np.max(np.abs(pred - t) / t))}


def cache_bytes() -> float:
    """One core's level-2 cache (sysfs), where an op's working set stops fitting; 0 if unknown."""
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if (index / "level").read_text().strip() == "2":
                size = (index / "size").read_text().strip()
                return float(size[:-1]) * {"K": 2**10, "M": 2**20}[size[-1]] if size[-1] in "KM" else float(size)
        except (OSError, ValueError):
            return 0.0
    return 0.0


def op_costs_text(op_costs: dict) -> str:
    """``fit_op_cost`` results by key as the inside of a topology's ``op_costs`` table."""
    return ", ".join(f'"{key}" = [{c["fixed_s"] * 1e6:.6g}, {c["flops_per_s"] / 1e9:.6g}, {c["bytes_per_s"] / 1e9:.6g}, '
                     f'{c.get("bytes_beyond_cache_per_s", c["bytes_per_s"]) / 1e9:.6g}]'
                     for key, c in sorted(op_costs.items()))


def compute_lines(comp: dict) -> list[str]:
    """A device's measured compute (``measure_compute``) as topology lines, after its peak;
    efficiencies to 4 significant digits (a tiny op's on a GPU is 3e-05, which 4 decimals
    would write as 0, a value no topology takes)."""
    def curve(points):
        return "[" + ", ".join(f"[{f:.6g}, {e:.4g}]" for f, e in points) + "]"
    return ["efficiency = 1.0", f"op_overhead_us = {comp['op_overhead_s'] * 1e6:.4g}",
            f"efficiency_curve = {curve(comp['efficiency_curve'])}",
            f"backward_efficiency_curve = {curve(comp.get('backward_efficiency_curve', []))}"]


def topology_text(name: str, ranks: int, cores: int, comp: dict, mem_bw: float, mpi: dict,
                  op_costs: dict | None = None, cache: float = 0.0, noise: list[list[float]] | None = None) -> str:
    """``comp`` and ``op_costs`` were measured with the BLAS threads one rank gets (cores //
    ranks, at least 1), each rank bound to its own cores.  Ranks beyond the cores are bound
    round-robin (``executor.launch.cores_of``): each core is a core pool of 1, and the
    ranks bound to it its members.  ``noise``: each rank's slowdown by window
    (``hostspeed.noise_series``)."""
    costs = op_costs_text(op_costs or {})
    curves = ", ".join(f'"{key}" = [{", ".join(f"[{b:.6g}, {t * 1e6:.6g}]" for b, t in c["curve"])}]'
                       for key, c in sorted((op_costs or {}).items()) if "curve" in c)
    lines = [f'name = "{name}"',
             f'description = "calibrated on this host: {cores} cores, {ranks} ranks; '
             f'MPI alpha {mpi["alpha_s"] * 1e6:.2f} us, beta {mpi["beta_bytes_per_s"] / 1e9:.3g} GB/s (R^2 {mpi["r2"]:.4f})"',
             *([f"noise_window_ms = {WINDOW_S * 1e3:g}"] if noise else []), ""]
    if ranks > cores:
        lines += ["[core_pools]"] + [f"core{c} = 1" for c in range(cores)]
    for k in range(ranks):
        lines += ["", "[[device]]", f'name = "rank{k}"', 'kind = "cpu"', f"machine = {k}", "cores = 1",
                  f"core_gflops = {comp['peak_flops'] / 1e9:.6g}", "memory_gib = 16",
                  f"memory_bandwidth_gbps = {mem_bw / 1e9 / max(1, min(ranks, cores)):.6g}",
                  *compute_lines(comp),
                  *([f'core_pool = "core{k % cores}"'] if ranks > cores else []),
                  f"cache_mib = {cache / 2**20:.6g}", f"op_costs = {{ {costs} }}", f"op_curves = {{ {curves} }}",
                  *([f"noise = [{', '.join(f'{x:.4g}' for x in noise[k])}]"] if noise else [])]
    lines += ["", "[[device]]", 'name = "shm"', 'kind = "switch"']
    for k in range(ranks):
        lines += ["", "[[link]]", f'a = "rank{k}"', 'b = "shm"',
                  f"bandwidth_gbps = {mpi['beta_bytes_per_s'] / 1e9:.6g}", f"latency_us = {mpi['alpha_s'] * 1e6 / 2:.6g}"]
    return "\n".join(lines) + "\n"


def calibrate(ranks: int = 2, seed: int = 0, models: list[str] | None = None) -> dict:
    """Everything measured, with each rank's share of BLAS threads (as ``execute`` sets them);
    ``models``: the in-context op probes of these models only (``probe.probes_for``: a
    calibration for one scenario need not time another model's ops)."""
    from threadpoolctl import threadpool_limits
    cores = os.cpu_count() or 1
    before = core_series(SERIES_S)
    with threadpool_limits(limits=max(1, cores // ranks)):
        comp = measure_compute(np.random.default_rng(seed))
        kernel = comp["op_overhead_s"]
        comp["op_overhead_s"] = max(kernel, measure_step_overhead(np.random.default_rng(seed)))
        comp["kernel_overhead_s"] = kernel
    mem = measure_memory_bandwidth()
    mpi = measure_mpi()
    cache = cache_bytes()
    quiet = quiet_reference(before)
    costs = measure_op_costs(ranks, cores, cache, quiet=quiet, models=models)
    if ranks > 1:
        costs["allreduce"] = measure_allreduce(ranks, cores, cache=cache)
    after = core_series(SERIES_S)
    both = {c: before[c] + after[c] for c in before}
    slowdowns = {c: [t / quiet for t in ts] for c, ts in both.items()}
    series = rank_series(both, ranks)
    references = [statistics.median(s) for s in series]
    return {"cores": cores, "ranks": ranks, "compute": comp, "memory_bandwidth_bytes_per_s": mem, "mpi": mpi,
            "op_costs": costs, "cache_bytes": cache, "references_s": references, "quiet_reference_s": quiet,
            "reference_windows_s": series, "core_slowdowns": slowdowns, "noise": noise_series(slowdowns, ranks)}
