"""``clustersim calibrate``: measure this host (or its GPUs) and write a topology."""
from __future__ import annotations

import json

from clustersim import api
from clustersim.cli.args import count
from clustersim.core.config import ConfigError
from clustersim.core.trace import check_writable


def add(sub) -> None:
    c = sub.add_parser("calibrate", help="measure this host and write a topology the simulator can use")
    c.add_argument("--ranks", type=count("--ranks"), default=2, help="ranks the host will run (how they share its cores)")
    c.add_argument("--out", metavar="FILE", default="topologies/this-host.toml")
    c.add_argument("--gpu", action="store_true",
                   help="measure this machine's GPUs (GEMM, pinned copies over PCIe, peer copies, NCCL allreduce) "
                        "with CuPy; under mpiexec -ppn 1 across hosts, also the path between hosts")
    c.add_argument("--models", metavar="NAME[,NAME]", type=lambda v: [m for m in v.split(",") if m],
                   help="probe these built-in models' ops (a light one without a probe of its own, such as "
                        "resnet-digits or gpt-tiny, is probed itself); default: the dense probes")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=run)


def run(args) -> int:
    check_writable(args.out, "--out")     # before minutes of measuring, not after
    if args.gpu and args.models:
        raise ConfigError("--models", ",".join(args.models), "probes host ranks' ops: not with --gpu")
    res = api.calibrate_gpus(args.out) if args.gpu else api.calibrate(args.ranks, args.out, args.models)
    if args.gpu and not res:              # one of several hosts' ranks: rank 0 reports
        return 0
    if args.json:
        print(json.dumps({**res, "out": args.out}, indent=2))
    elif args.gpu:
        print_gpu(res, args.out)
    else:
        print_host(res, args.out)
    return 0


def print_gpu(res: dict, out: str) -> None:
    gpu = res["gpu"]
    if "hosts" in res:
        print(f"calibrated {res['hosts']} hosts -> {out}; host 0's GPUs below; host 0 <-> i: " + ", ".join(
            f"{i}: alpha {f['alpha_s'] * 1e6:.3g} us, beta {f['beta_bytes_per_s'] / 1e9:.4g} GB/s"
            for i, f in sorted(res["host_pairs"].items())))
    print(f"calibrated {res['devices']} GPUs -> {out}")
    print(f"  GPU compute  peak {gpu['peak_flops'] / 1e12:.4g} TFLOP/s, {gpu['op_overhead_s'] * 1e6:.3g} us per op; "
          "efficiency " + ", ".join(f"{f:.2g} FLOP: {e:.2g}" for f, e in gpu["efficiency_curve"]))
    print(f"  GPU memory   {res['gpu_memory_bandwidth_bytes_per_s'] / 1e9:.4g} GB/s (copy), "
          f"{res['gpu_memory_bytes'] / 2**30:.3g} GiB")
    for key, fit in res["copies"].items():
        what = {"h2d": "pinned host -> GPU 0", "d2h": "GPU 0 -> pinned host"}.get(key) or "GPU {} -> GPU {}".format(
            *key[3:].split("-"))
        print(f"  {what:<22} alpha {fit['alpha_s'] * 1e6:.3g} us, beta {fit['beta_bytes_per_s'] / 1e9:.4g} GB/s; "
              f"fit R^2 {fit['r2']:.4f}, worst relative error {fit['max_rel_error']:.1%} over {len(fit['samples'])} sizes")
    if gpu.get("op_costs"):
        print("  op costs     (the executor's ops in context on GPU 0: fixed + FLOPs / rate + bytes / rate)")
        print_op_costs(gpu["op_costs"])
    if res.get("nccl_allreduce"):
        print(f"  NCCL allreduce over {res['devices']} GPUs, busbw: " + ", ".join(
            f"{r['bytes'] / 2**20:g} MiB {r['busbw_gbps']:.4g} GB/s" for r in res["nccl_allreduce"]))


def print_host(res: dict, out: str) -> None:
    comp, mpi = res["compute"], res["mpi"]
    print(f"calibrated {res['cores']} cores for {res['ranks']} ranks -> {out}")
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
    print_op_costs(res["op_costs"])


def print_op_costs(costs: dict) -> None:
    """One line per op key: the fitted fixed cost and rates, the fit's quality; a byte rate
    beyond the cache only where it differs from the one within."""
    for key, c in costs.items():
        beyond = c["bytes_beyond_cache_per_s"]
        rates = [f"{c['flops_per_s'] / 1e9:.3g} GFLOP/s" if c["flops_per_s"] else "",
                 f"{c['bytes_per_s'] / 1e9:.3g} GB/s" if c["bytes_per_s"] else "",
                 f"{beyond / 1e9:.3g} GB/s beyond" if beyond and beyond != c["bytes_per_s"] else ""]
        print(f"    {key:<24} {c['fixed_s'] * 1e6:7.1f} us  {', '.join(r for r in rates if r):<44} "
              f"R^2 {c['r2']:.3f}, worst {c['max_rel_error']:.0%} over {c['points']} ops"
              + ("; the simulator interpolates the measured sizes" if "curve" in c else ""))
