"""The GPU validation suite: calibrate this machine's GPUs (``clustersim calibrate --gpu``),
compare the NCCL allreduce busbw it measured with the collective model's on the calibrated
topology (``clustersim collective``), then validate each case of ``CASES`` (one rank per GPU, ``--device gpu``) on that topology
and print a table of predicted and measured step times; writes out/validation-gpu.json (with
each case's phases and ops predicted beside measured, and the op costs calibrated).
Cases needing more GPUs than are visible are skipped with a note (NCCL, and the executor,
put no two ranks of one job on one GPU).  Made to finish within 5 minutes on a 1- or
8-GPU host.

    make validate-gpu     # exit 0; with no GPU visible it says so in one line and exits 0
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

import clustersim  # noqa: E402

BASE = HERE / "gpu" / "speech.toml"
OUT = Path("out/validation-gpu.json")
TOPOLOGY = Path("out/calibration/gpus.toml")
REPEATS = 1                    # a GPU step repeats far better than this shared CPU host's
CASES = [                      # (name, overrides): ranks = GPUs, from the Plan
    ("1 GPU", []),
    ("1 GPU, batch 64", ["model.batch_size=64"]),
    ("1 GPU, batch 1024", ["model.batch_size=1024"]),
    ("data parallel 2", ["parallel.replicas=2"]),
    ("data parallel 4", ["parallel.replicas=4"]),
    ("data parallel 8", ["parallel.replicas=8"]),
    ("spatial 2", ["parallel.model_parallel=2"]),
    ("spatial 4", ["parallel.model_parallel=4"]),
    ("pipeline 2, 4 micro-batches", ["parallel.model_parallel=2", 'parallel.split="layers"', "parallel.micro_batches=4"]),
    ("pipeline 4, 4 micro-batches", ["parallel.model_parallel=4", 'parallel.split="layers"', "parallel.micro_batches=4"]),
    ("parameter server 2 + 1", ["parallel.replicas=2", "parallel.ps_shards=1"]),
    ("parameter server 4 + 2", ["parallel.replicas=4", "parallel.ps_shards=2"]),
]


def visible_gpus() -> int:
    """GPUs CuPy sees (CUDA_VISIBLE_DEVICES applied); 0 without CuPy, a driver or a GPU."""
    try:
        import cupy
        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:          # no module, no driver, no device: all mean "no GPU here"
        return 0


def gpus_needed(sc) -> int:
    """The GPUs a case takes: one per worker rank (a parameter-server shard runs on the host)."""
    return sc.parallel.devices_per_replica * sc.parallel.replicas


def nccl_rows(measured: list[dict], topology: Path = TOPOLOGY) -> list[dict]:
    """The measured allreduce rows beside the collective model's busbw on the calibrated
    topology (NCCL's tuner picks the algorithm, as on the host), printed as they come."""
    if not measured:
        return []
    predicted = clustersim.collective(topology, "allreduce", "auto", [r["bytes"] for r in measured])
    rows = []
    for m, p in zip(measured, predicted):
        err = 100.0 * (p["busbw_gbps"] - m["busbw_gbps"]) / m["busbw_gbps"]
        rows.append({"bytes": m["bytes"], "measured_busbw_gbps": m["busbw_gbps"],
                     "predicted_busbw_gbps": p["busbw_gbps"], "algo": p["algo"], "error_pct": err})
        print(f"NCCL allreduce {m['bytes'] / 2**20:>9g} MiB  busbw measured {m['busbw_gbps']:8.2f} GB/s  "
              f"predicted {p['busbw_gbps']:8.2f} GB/s ({p['algo']})  error {err:+7.1f}%", flush=True)
    return rows


def main() -> int:
    gpus = visible_gpus()
    if gpus == 0:
        print("validate-gpu: no GPU is visible (needs CuPy and a GPU: pip install 'clustersim[gpu]'); nothing to do")
        return 0
    start = time.perf_counter()
    summary: dict = {"gpus": gpus, "nccl_allreduce": [], "cases": [], "failed": [], "skipped": []}
    try:
        cal = clustersim.calibrate_gpus(TOPOLOGY)
    except Exception as exc:           # a one-shot run on a lent host: say what broke, keep the rest
        summary["failed"].append(f"calibrate --gpu: {type(exc).__name__}: {exc}")
        return finish(summary, start)
    print(f"calibrated {gpus} GPUs -> {TOPOLOGY} ({time.perf_counter() - start:.0f} s)", flush=True)
    summary["nccl_allreduce"] = nccl_rows(cal.get("nccl_allreduce", []))
    summary["op_costs"] = cal["gpu"].get("op_costs", {})      # the fits the predictions use, R^2 and worst error
    save(summary, start)
    for name, sets in CASES:
        need = gpus_needed(clustersim.load(BASE, sets))
        if need > gpus:
            summary["skipped"].append(f"{name}: needs {need} GPUs, {gpus} visible")
            continue
        try:
            r = clustersim.validate(BASE, sets, topology=TOPOLOGY, repeats=REPEATS, device="gpu").data
        except Exception as exc:       # the next case may still run: each is its own job
            summary["failed"].append(f"{name}: {type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[-1]}")
            print(f"{name:<30} {need} GPUs  FAILED: {summary['failed'][-1]}", flush=True)
            save(summary, start)
            continue
        summary["cases"].append({"case": name, "gpus": need, **{k: r[k] for k in (
            "predicted_step_time_s", "measured_step_time_s", "error_pct", "quiet_step_time_s", "quiet_error_pct",
            "phases", "ops")}})
        print(f"{name:<30} {need} GPUs  predicted {r['predicted_step_time_s'] * 1e3:8.3f} ms  "
              f"measured {r['measured_step_time_s'] * 1e3:8.3f} ms  error {r['error_pct']:+7.1f}%", flush=True)
        save(summary, start)
    return finish(summary, start)


def save(summary: dict, start: float) -> None:
    """Writes what is known so far (a run cut short by its host still leaves its cases)."""
    errors = [abs(c["error_pct"]) for c in summary["cases"]]
    summary.update(median_abs_error_pct=statistics.median(errors) if errors else None,
                   worst_abs_error_pct=max(errors) if errors else None, wall_s=time.perf_counter() - start)
    clustersim.write_atomic(OUT, json.dumps(summary, indent=2))


def finish(summary: dict, start: float) -> int:
    """Saves, prints the skipped and failed cases and the errors' median and worst; 1 when
    anything failed."""
    save(summary, start)
    for note in summary["skipped"]:
        print(f"skipped {note}")
    for note in summary["failed"]:
        print(f"FAILED {note}")
    if summary["cases"]:
        print(f"median |error| {summary['median_abs_error_pct']:.1f}%, worst {summary['worst_abs_error_pct']:.1f}% "
              f"over {len(summary['cases'])} cases in {summary['wall_s']:.0f} s; wrote {OUT}")
    return 1 if summary["failed"] else 0

if __name__ == "__main__":
    sys.exit(main())
