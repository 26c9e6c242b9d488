"""The ``clustersim`` command.  Bad input anywhere: one line on stderr naming the file and
field, exit code 2, no traceback; files are written whole or not at all."""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import simpy

from . import collectives, report
from .engine import simulate
from .errors import ConfigError
from .metrics import one_device_step_time, summarize
from .network import BACKENDS
from .plan import plan
from .scenario import load_scenario, parse_set
from .topogen import builtin_topologies, load_topology
from .trace import write_atomic, write_chrome


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"clustersim: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("clustersim: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:            # output piped into `head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clustersim", description=__doc__.split(".")[0] if __doc__ else None)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("simulate", help="simulate a scenario and summarise where the time goes")
    s.add_argument("scenario")
    _common(s)
    s.add_argument("--trace", metavar="FILE", help="write a Chrome/Perfetto trace (JSON)")
    s.add_argument("--plot", metavar="FILE", help="write a Gantt of one step and utilisation (PNG)")
    s.add_argument("--no-speedup", action="store_true", help="skip the one-device baseline")
    s.set_defaults(func=cmd_simulate)

    c = sub.add_parser("collective", help="nccl-tests-style table of predicted collective times")
    c.add_argument("--topology", required=True)
    c.add_argument("--op", default="allreduce", choices=collectives.OPS)
    c.add_argument("--algo", default="ring", choices=collectives.ALGOS)
    c.add_argument("--gpus", type=int, default=0, help="ranks (default: every compute device)")
    c.add_argument("--machines", type=int, default=0, help="override the topology's machine count")
    c.add_argument("--bytes", default="8..1G", help="SIZE or MIN..MAX, doubling (8..1G)")
    c.add_argument("--network", default="flow", choices=sorted(BACKENDS))
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_collective)

    w = sub.add_parser("sweep", help="simulate a scenario over values of one or more keys")
    w.add_argument("scenario")
    w.add_argument("--vary", action="append", required=True, metavar="KEY=V1,V2,...")
    _common(w)
    w.add_argument("--jobs", type=int, default=1)
    w.add_argument("--plot", metavar="FILE")
    w.set_defaults(func=cmd_sweep)

    e = sub.add_parser("execute", help="run the scenario's partitioned network for real on MPI ranks")
    e.add_argument("scenario")
    e.add_argument("--ranks", type=int, default=0, help="MPI ranks (default: model_parallel x replicas)")
    e.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
    e.add_argument("--trace", metavar="FILE", help="write the merged Chrome trace of all ranks")
    e.add_argument("--fail", metavar="rank=K@step=S", help="worker rank K stops at step S like a crashed machine")
    e.add_argument("--checkpoint", metavar="DIR", help="parameter-server shards checkpoint here")
    e.add_argument("--checkpoint-every", type=int, default=100, metavar="N", help="updates between checkpoints")
    e.add_argument("--resume", action="store_true", help="start the shards from the checkpoints in --checkpoint")
    e.add_argument("--data", metavar="DIR", help="train on MNIST from its four IDX files in DIR (gzipped or not); "
                                                 "the model must take 784 inputs")
    _common(e)
    e.set_defaults(func=cmd_execute)

    c2 = sub.add_parser("calibrate", help="measure this host and write a topology the simulator can use")
    c2.add_argument("--ranks", type=int, default=2, help="ranks the host will run (how they share its cores)")
    c2.add_argument("--out", metavar="FILE", default="topologies/this-host.toml")
    c2.add_argument("--gpu", action="store_true",
                    help="measure this machine's GPUs (GEMM, pinned copies over PCIe, peer copies) with CuPy")
    c2.add_argument("--json", action="store_true")
    c2.set_defaults(func=cmd_calibrate)

    v = sub.add_parser("validate", help="simulate and execute one scenario and compare step times")
    v.add_argument("scenario")
    v.add_argument("--topology", help="a calibrated topology (default: calibrate this host now)")
    v.add_argument("--repeats", type=int, default=3)
    v.add_argument("--plot", metavar="FILE", help="predicted and measured time per phase")
    _common(v)
    v.set_defaults(func=cmd_validate)

    t = sub.add_parser("topology", help="inspect a topology")
    tsub = t.add_subparsers(dest="action", required=True)
    ts = tsub.add_parser("show")
    ts.add_argument("topology", nargs="?", help=f"built-in ({', '.join(builtin_topologies())}) or a path")
    ts.add_argument("--machines", type=int, default=0)
    ts.add_argument("--plot", metavar="FILE")
    ts.set_defaults(func=cmd_topology_show)

    pl = sub.add_parser("plan", help="show how a scenario is partitioned and placed")
    pl.add_argument("scenario")
    pl.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    pl.set_defaults(func=cmd_plan)
    return p


def _common(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a scenario key, e.g. parallel.model_parallel=8")
    sp.add_argument("--json", action="store_true", help="print JSON instead of a table")


# --- simulate ---------------------------------------------------------------------------------
def run_scenario(path: str, overrides: list, speedup: bool = True) -> tuple[dict, object, object]:
    sc = load_scenario(path, overrides)
    p = plan(sc)
    res = simulate(p)
    base = one_device_step_time(p) if speedup else None
    summary = summarize(p, res, base)
    if sc.training.cosim:
        from executor.cosim import cosimulate     # the real math lives in executor/ (lazy: sim/ stays free of it)
        summary.update(cosimulate(p, res))
    return summary, p, res


def cmd_simulate(args) -> int:
    summary, p, res = run_scenario(args.scenario, parse_set(args.set), not args.no_speedup)
    if args.trace:
        write_chrome(res.trace, args.trace)
    if args.plot:
        report.plot_step(res.trace, p, summary, args.plot)
    print(json.dumps(summary, indent=2) if args.json else report.summary_text(summary))
    if not args.json:
        for what, path in (("trace", args.trace), ("plot", args.plot)):
            if path:
                print(f"  wrote {what}: {path}")
    return 0


# --- execute ----------------------------------------------------------------------------------
def cmd_execute(args) -> int:
    """Checks the input here (one clean line on error), then starts ``mpiexec`` with one
    rank per replica slot running ``executor.ranks``."""
    import subprocess
    from executor.launch import mpiexec, rank_env   # lazy: sim/ does not need executor/ otherwise
    from executor.ranks import check, check_checkpoint, check_data, parse_fail, ranks_needed
    sc = load_scenario(args.scenario, parse_set(args.set))
    ranks = args.ranks or ranks_needed(sc)
    check(sc, ranks)
    plan(sc)                                    # every rank plans it: one that cannot be made fails here, once
    parse_fail(args.fail, sc)
    check_checkpoint(args, sc)
    check_data(args.data, sc)
    cmd = [str(mpiexec()), "-n", str(ranks), sys.executable, "-m", "executor.ranks", args.scenario,
           "--device", args.device]
    for item in args.set:
        cmd += ["--set", item]
    if args.json:
        cmd.append("--json")
    if args.trace:
        cmd += ["--trace", args.trace]
    if args.fail:
        cmd += ["--fail", args.fail]
    if args.checkpoint:
        cmd += ["--checkpoint", args.checkpoint, "--checkpoint-every", str(args.checkpoint_every)]
    if args.resume:
        cmd.append("--resume")
    if args.data:
        cmd += ["--data", str(Path(args.data).resolve())]
    return subprocess.run(cmd, env=rank_env(ranks), preexec_fn=_die_with_parent).returncode


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when this process dies (mpiexec then stops its
    ranks), so a killed ``clustersim execute`` leaves no ranks running."""
    import ctypes
    import signal
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)          # PR_SET_PDEATHSIG


# --- calibrate and validate ------------------------------------------------------------------------
def run_calibration(ranks: int, out: str) -> dict:
    from executor.calibrate import calibrate, topology_text   # lazy: executor/ is not needed to simulate
    if not 1 <= ranks <= 256:
        raise ConfigError("--ranks", str(ranks), "must be 1..256")
    res = calibrate(ranks)
    name = Path(out).stem
    write_atomic(out, topology_text(name, ranks, res["cores"], res["compute"], res["memory_bandwidth_bytes_per_s"],
                                    res["mpi"], res["op_costs"], res["cache_bytes"]))
    load_topology(out)                                  # what we wrote must load
    return res


def run_gpu_calibration(out: str) -> dict:
    from executor.backend import cupy_or_none
    from executor.gpucal import calibrate_gpus, cupy_backend, gpu_topology_text
    cp = cupy_or_none()
    if cp is None:
        raise ConfigError("--gpu", "", "needs CuPy and a visible GPU (pip install 'clustersim[gpu]' on a GPU host)")
    res = calibrate_gpus(cupy_backend(cp))
    write_atomic(out, gpu_topology_text(Path(out).stem, res))
    load_topology(out)                                  # what we wrote must load
    return res


def print_gpu_calibration(res: dict, out: str) -> None:
    gpu = res["gpu"]
    print(f"calibrated {res['devices']} GPUs -> {out}")
    print(f"  GPU compute  peak {gpu['peak_flops'] / 1e12:.4g} TFLOP/s, {gpu['op_overhead_s'] * 1e6:.3g} us per op; "
          "efficiency " + ", ".join(f"{f:.2g} FLOP: {e:.2f}" for f, e in gpu["efficiency_curve"]))
    print(f"  GPU memory   {res['gpu_memory_bandwidth_bytes_per_s'] / 1e9:.4g} GB/s (copy), "
          f"{res['gpu_memory_bytes'] / 2**30:.3g} GiB")
    for key, fit in res["copies"].items():
        what = {"h2d": "pinned host -> GPU 0", "d2h": "GPU 0 -> pinned host"}.get(key, f"GPU 0 -> GPU {key[3:]}")
        print(f"  {what:<22} alpha {fit['alpha_s'] * 1e6:.3g} us, beta {fit['beta_bytes_per_s'] / 1e9:.4g} GB/s; "
              f"fit R^2 {fit['r2']:.4f}, worst relative error {fit['max_rel_error']:.1%} over {len(fit['samples'])} sizes")


def cmd_calibrate(args) -> int:
    if args.gpu:
        res = run_gpu_calibration(args.out)
        if args.json:
            print(json.dumps({**res, "out": args.out}, indent=2))
        else:
            print_gpu_calibration(res, args.out)
        return 0
    res = run_calibration(args.ranks, args.out)
    if args.json:
        print(json.dumps({**res, "out": args.out}, indent=2))
        return 0
    comp, mpi = res["compute"], res["mpi"]
    print(f"calibrated {res['cores']} cores for {res['ranks']} ranks -> {args.out}")
    print(f"  compute      peak {comp['peak_flops'] / 1e9:.4g} GFLOP/s per rank, {comp['op_overhead_s'] * 1e6:.3g} us per op")
    print("  efficiency   " + ", ".join(f"{f:.2g} FLOP: {e:.2f}" for f, e in comp["efficiency_curve"]))
    print(f"  memory       {res['memory_bandwidth_bytes_per_s'] / 1e9:.4g} GB/s (copy)")
    print(f"  MPI          alpha {mpi['alpha_s'] * 1e6:.3g} us, beta {mpi['beta_bytes_per_s'] / 1e9:.4g} GB/s; fit R^2 "
          f"{mpi['r2']:.4f}, worst relative error {mpi['max_rel_error']:.1%} over {len(mpi['samples'])} sizes")
    slow = [sum(t > 1.3 * res["quiet_reference_s"] for t in s) / len(s) for s in res["reference_windows_s"]]
    print(f"  host speed   reference step {res['quiet_reference_s'] * 1e6:.0f} us quiet (ops probed at it), median "
          + ", ".join(f"{t * 1e6:.0f}" for t in res["references_s"])
          + " us by rank; windows over 1.3x quiet: " + ", ".join(f"{x:.0%}" for x in slow))
    print(f"  op costs     (the executor's ops in context: fixed + FLOPs / rate + bytes / rate, bytes beyond "
          f"{res['cache_bytes'] / 2**20:.3g} MiB of cache at their own rate)")
    for key, c in res["op_costs"].items():
        rates = [f"{c['flops_per_s'] / 1e9:.3g} GFLOP/s" if c["flops_per_s"] else "",
                 f"{c['bytes_per_s'] / 1e9:.3g} GB/s" if c["bytes_per_s"] else "",
                 f"{c['bytes_beyond_cache_per_s'] / 1e9:.3g} GB/s beyond" if c["bytes_beyond_cache_per_s"] else ""]
        print(f"    {key:<24} {c['fixed_s'] * 1e6:7.1f} us  {', '.join(r for r in rates if r):<44} "
              f"R^2 {c['r2']:.3f}, worst {c['max_rel_error']:.0%} over {c['points']} ops"
              + ("; the simulator interpolates the measured sizes" if "curve" in c else ""))
    return 0


def cmd_validate(args) -> int:
    import tempfile
    from executor.ranks import check, ranks_needed
    from executor.validate import validate
    sc = load_scenario(args.scenario, parse_set(args.set))
    check(sc, ranks_needed(sc))
    if args.repeats < 1:
        raise ConfigError("--repeats", str(args.repeats), "must be >= 1")
    topology = args.topology
    if not topology:
        topology = str(Path(tempfile.mkdtemp()) / "this-host.toml")
        run_calibration(ranks_needed(sc), topology)
    out = validate(args.scenario, topology, args.set, args.repeats)
    if args.plot:
        report.plot_validation(out, args.plot)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"{out['scenario']}: {out['ranks']} ranks, predicted on {Path(out['topology']).name}, "
          f"measured {len(out['measured_runs_s'])} runs (spread {out['spread_pct']:.1f}%)")
    rows = [{"what": k, **v} for k, v in out["phases"].items()]
    rows.append({"what": "step", "predicted_s": out["predicted_step_time_s"],
                 "measured_s": out["measured_step_time_s"], "error_pct": out["error_pct"]})
    rows.append({"what": "step, the runs' quiet windows", "predicted_s": out["predicted_step_time_s"],
                 "measured_s": out["quiet_step_time_s"], "error_pct": out["quiet_error_pct"]})
    print(report.table(rows, [("what", "per step"), ("predicted_s", "predicted (s)"), ("measured_s", "measured (s)"),
                              ("error_pct", "error %")]))
    return 0


# --- collective -------------------------------------------------------------------------------
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)B?\s*", text, re.IGNORECASE)
    if not m or int(m.group(1)) < 1:
        raise ConfigError("--bytes", text, "sizes look like 8, 64K, 1M or 1G")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def size_range(text: str) -> list[int]:
    lo, sep, hi = text.partition("..")
    a = parse_size(lo)
    b = parse_size(hi) if sep else a
    if b < a or b > 2**40:
        raise ConfigError("--bytes", text, "must be MIN..MAX with MIN <= MAX <= 1T")
    sizes = []
    while a <= b:
        sizes.append(a)
        a *= 2
    return sizes


def collective_time(topo, network: str, op: str, algo: str, devices: list[str], nbytes: float) -> float:
    env = simpy.Environment()
    net = BACKENDS[network](env, topo)
    try:
        schedule = collectives.phases(op, algo, devices, nbytes)
    except ValueError as exc:
        raise ConfigError("--algo", algo, str(exc)) from None
    env.process(collectives.run(env, net, schedule))
    env.run()
    return env.now


def cmd_collective(args) -> int:
    topo = load_topology(args.topology, Path("."), args.machines or None)
    devices = topo.compute_devices()
    n = args.gpus or len(devices)
    if not 2 <= n <= len(devices):
        raise ConfigError("--gpus", str(args.gpus), f"must be 2..{len(devices)} for topology {topo.name}")
    devices = devices[:n]
    rows = []
    for size in size_range(args.bytes):
        t = collective_time(topo, args.network, args.op, args.algo, devices, size)
        algbw = size / t / 1e9 if t else 0.0
        rows.append({"bytes": size, "time_s": t, "algbw_gbps": algbw,
                     "busbw_gbps": algbw * collectives.bus_factor(args.op, n)})
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"# {args.op} by {args.algo} over {n} ranks of {topo.name} ({args.network} network model)")
        shown = [{**r, "time_us": r["time_s"] * 1e6} for r in rows]
        print(report.table(shown, [("bytes", "size (B)"), ("time_us", "time (us)"),
                                   ("algbw_gbps", "algbw (GB/s)"), ("busbw_gbps", "busbw (GB/s)")]))
    return 0


# --- sweep ------------------------------------------------------------------------------------
def _sweep_point(path: str, overrides: list) -> dict:
    summary, _, _ = run_scenario(path, overrides, speedup=False)
    return {k: summary[k] for k in ("step_time_s", "samples_per_s", "sim_time_s", "sim_events", "wall_s",
                                    "bytes_per_step")}


def cmd_sweep(args) -> int:
    axes = []
    for item in args.vary:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise ConfigError("--vary", item, "must look like section.key=v1,v2,...")
        axes.append([(key.strip(), v) for _, v in parse_set([f"{key}={v}" for v in values.split(",")])])
    base = parse_set(args.set)
    combos = [list(c) for c in itertools.product(*axes)]
    load_scenario(args.scenario, base + combos[0])          # fail fast, in this process, on bad input
    if args.jobs > 1:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            results = list(pool.map(_sweep_point, [args.scenario] * len(combos), [base + c for c in combos]))
    else:
        results = [_sweep_point(args.scenario, base + c) for c in combos]
    points = []
    for combo, res in zip(combos, results):
        point = {k: v for k, v in combo}
        point.update(res)
        point["speedup"] = res["samples_per_s"] / results[0]["samples_per_s"] if results[0]["samples_per_s"] else 0.0
        points.append(point)
    if args.plot:
        report.plot_sweep(points, axes[0][0][0], args.plot)
    if args.json:
        print(json.dumps(points, indent=2))
    else:
        keys = [a[0][0] for a in axes]
        print(report.table(points, [(k, k) for k in keys] + [("step_time_s", "step (s)"),
                                                              ("samples_per_s", "samples/s"),
                                                              ("speedup", "speedup"),
                                                              ("wall_s", "wall (s)")]))
    return 0


# --- topology and plan ------------------------------------------------------------------------
def cmd_topology_show(args) -> int:
    if not args.topology:
        print("built-in topologies: " + ", ".join(builtin_topologies()))
        return 0
    topo = load_topology(args.topology, Path("."), args.machines or None)
    kinds: dict[str, int] = {}
    for d in topo.devices.values():
        kinds[d.kind] = kinds.get(d.kind, 0) + 1
    compute = topo.compute_devices()
    print(f"{topo.name}: {topo.description}")
    print("  devices: " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())))
    print(f"  links: {topo.graph.number_of_edges()} (full duplex)")
    first = topo.devices[compute[0]]
    print(f"  compute devices: {len(compute)} x {first.kind} ({report.si(first.flops_per_s('fp32'), 'FLOP/s')} "
          f"fp32 peak, efficiency {first.efficiency:g}, {report.si(first.memory_bytes, 'B')})")
    pairs = [(compute[0], c) for c in (compute[1:2] + compute[-1:]) if c != compute[0]]
    for a, b in dict.fromkeys(pairs):
        r = topo.route(a, b)
        hops = " > ".join([a] + [v for _, v in r])
        print(f"  route {hops}: {report.si(topo.route_bandwidth(r), 'B/s')}, "
              f"{report.seconds(topo.route_latency(r))}")
    if args.plot:
        report.plot_topology(topo, args.plot)
        print(f"  wrote plot: {args.plot}")
    return 0


def cmd_plan(args) -> int:
    sc = load_scenario(args.scenario, parse_set(args.set))
    p = plan(sc)
    print(f"{sc.name}: {sc.model.name}, {p.slots} slot(s) x {p.replicas} replica(s), split {sc.parallel.split}, "
          f"sync {p.sync}")
    for node, sl, axis in zip(sc.model.nodes, p.slices, p.axes):
        cut = ", ".join(f"{slot}:{'x'.join(str(b - a) for a, b in box)}" for slot, box in sl)
        print(f"  L{node.index:<3} {node.layer.kind:<18} out {'x'.join(map(str, node.out_shape)):<12} "
              f"params {node.params:<12} by {axis:<8} [{cut}]")
    totals: dict[str, float] = {}
    for op in p.ops:
        if op.kind == "xfer":
            totals[op.why] = totals.get(op.why, 0.0) + op.bytes
    print("  per replica and step: " + (", ".join(f"{k} {report.si(v, 'B')}" for k, v in sorted(totals.items()))
                                        or "no transfers inside a replica"))
    for r, row in enumerate(p.devices):
        print(f"  replica {r}: " + ", ".join(row))
    if p.ps:
        print("  parameter-server shards: " + ", ".join(f"{d} ({report.si(n, 'params')})"
                                                       for d, n in zip(p.ps.devices, p.ps.sizes)))
    for dev, use in p.memory.items():
        print(f"  memory {dev}: " + ", ".join(f"{k} {report.si(v, 'B')}" for k, v in use.items() if v))
    return 0


if __name__ == "__main__":
    sys.exit(main())
