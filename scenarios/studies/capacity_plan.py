"""Capacity planning: the cheapest cluster and split that train a job by a deadline, with
the runner-up and why it lost.  ResNet-50 (bf16) on ImageNet-1k (1,281,167 images, 90
epochs, a global batch of 2,048) within TARGET_HOURS, on up to four DGX H100 or four DGX
A100 nodes, each priced at its topology's list price per machine-hour (AWS p5.48xlarge
and p4d.24xlarge on demand, see topologies/dgx-h100.toml and dgx-a100.toml).

    .venv/bin/python scenarios/studies/capacity_plan.py    # out/capacity_plan.{json,png}

``clustersim.search`` with ``objective="cost"`` tries every split of the fixed global
batch on each cluster's devices (replicas x tensor or pipeline stages, allreduce or a
parameter server), refuses what does not fit in memory, simulates one step of the rest
and ranks them: those meeting the deadline first, cheapest first.  The plan puts both
clusters' rows together: the cheapest that meets the deadline wins; the runner-up is the
next cheapest that meets it; the cheapest that misses it says what the deadline costs.
A cost is machines used x price x time to train, so the fewest machines that are busy
computing are cheapest, and the deadline decides how few that can be.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))

import clustersim  # noqa: E402
from study_output import save  # noqa: E402

CLUSTERS = (("dgx-h100-fat-tree", 4, 32), ("dgx-a100-fat-tree", 4, 32))   # (topology, machines, GPUs searched)
MODEL, DTYPE = "resnet-50", "bf16"
BATCH, REPLICAS = 64, 32             # global batch 2,048 (Goyal et al. 2017 train ResNet-50 to 8k)
DATASET_SAMPLES = 1_281_167          # ImageNet-1k training images
EPOCHS = 90
TARGET_HOURS = 0.5
JOBS = min(8, os.cpu_count() or 1)   # candidates simulated in parallel
ROW_KEYS = ("parallel.replicas", "parallel.model_parallel", "parallel.split", "parallel.micro_batches",
            "parallel.ps_shards", "model.batch_size", "machines_used", "usd_per_hour", "samples_per_s",
            "time_to_train_s", "cost_usd", "energy_kwh", "meets_target", "why")
OUT_JSON = Path("out/capacity_plan.json")
OUT_PNG = Path("out/capacity_plan.png")


def job(model: str = MODEL, batch: int = BATCH, replicas: int = REPLICAS, dtype: str = DTYPE,
        dataset_samples: int = DATASET_SAMPLES, epochs: int = EPOCHS) -> dict:
    """The job as a scenario without its cluster: ``batch`` x ``replicas`` is the global batch."""
    return {"name": "capacity-plan", "model": {"name": model, "batch_size": batch, "dtype": dtype},
            "parallel": {"replicas": replicas},
            "training": {"algorithm": "sync", "dataset_samples": dataset_samples, "epochs": epochs}}


def plan_cluster(topology: str, machines: int, devices: int, spec: dict, target_hours: float,
                 jobs: int = 1) -> dict:
    """The cost-ranked search on up to ``devices`` of one cluster's GPUs: its rows
    (``ROW_KEYS``), how many candidates were refused before simulating, and search's note."""
    sc = spec | {"cluster": {"topology": topology, "machines": machines}}
    found = clustersim.search(sc, devices, objective="cost", target_hours=target_hours, jobs=jobs)
    rows = [{"cluster": topology} | {k: r[k] for k in ROW_KEYS} for r in found["ranked"]]
    return {"cluster": topology, "machines": machines, "devices": devices, "candidates": found["candidates"],
            "dropped": len(found["dropped"]), "note": found["note"], "rows": rows}


def why_lost(winner: dict, other: dict) -> str:
    """One line: what the other row costs and takes beside the winner, the samples a
    dollar buys on each, and the other row's ``why``."""
    per_usd = lambda r: r["samples_per_s"] * 3600 / r["usd_per_hour"]      # noqa: E731
    return (f"${other['cost_usd']:,.2f} ({other['cost_usd'] / winner['cost_usd']:.2f}x) in "
            f"{other['time_to_train_s'] / 3600:.2f} h ({other['time_to_train_s'] / winner['time_to_train_s']:.2f}x) "
            f"on {other['machines_used']} machines at ${other['usd_per_hour']:,.2f}/h: {per_usd(other):,.0f} samples "
            f"per dollar against {per_usd(winner):,.0f}; {other['why']}")


def run(clusters=CLUSTERS, spec: dict | None = None, target_hours: float = TARGET_HOURS, jobs: int = 1) -> dict:
    """Every cluster's search, and the plan across them: ``best`` (the cheapest row that
    meets the deadline), ``runner_up`` (the next cheapest), ``cheapest_missing`` (what
    the deadline costs), None where there is none; each cluster's own ``best`` and, for
    the others than the winner's, ``why_lost``."""
    spec = spec or job()
    found = [plan_cluster(t, m, d, spec, target_hours, jobs) for t, m, d in clusters]
    rows = [r for f in found for r in f["rows"]]
    meeting = sorted((r for r in rows if r["meets_target"]), key=lambda r: r["cost_usd"])
    missing = sorted((r for r in rows if not r["meets_target"]), key=lambda r: r["cost_usd"])
    best = meeting[0] if meeting else None
    runner_up = meeting[1] if len(meeting) > 1 else None
    for f in found:
        f["best"] = next((r for r in meeting if r["cluster"] == f["cluster"]), None)
        f["why_lost"] = why_lost(best, f["best"]) if f["best"] and f["best"] is not best else ""
    return {"target_hours": target_hours, "clusters": found, "best": best, "runner_up": runner_up,
            "why_lost": why_lost(best, runner_up) if runner_up else "",
            "cheapest_missing": missing[0] if missing else None}


def split_name(row: dict) -> str:
    kind = (f"{row['parallel.model_parallel']}-way {row['parallel.split']}"
            + (f" x {row['parallel.micro_batches']} micro" if row["parallel.micro_batches"] > 1 else "")
            if row["parallel.model_parallel"] > 1 else "data parallel")
    exchange = f"{row['parallel.ps_shards']} PS shards" if row["parallel.ps_shards"] else "allreduce"
    return f"{row['parallel.replicas']} replicas x {row['model.batch_size']}, {kind}, {exchange}"


def plot(result: dict, path: Path) -> None:
    import matplotlib.pyplot as plt
    fig, (scatter, bars) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, f in enumerate(result["clusters"]):
        rows = f["rows"]
        scatter.scatter([r["time_to_train_s"] / 3600 for r in rows], [r["cost_usd"] for r in rows], s=12,
                        color=f"C{i}", alpha=0.6, label=f"{f['cluster']} (up to {f['machines']} machines)")
        per_machines = {}
        for r in rows:                                  # the cheapest row per machines used
            if r["machines_used"] not in per_machines or r["cost_usd"] < per_machines[r["machines_used"]]["cost_usd"]:
                per_machines[r["machines_used"]] = r
        ms = sorted(per_machines)
        xs = [m + (i - 0.5) * 0.35 for m in ms]
        bars.bar(xs, [per_machines[m]["cost_usd"] for m in ms], width=0.35, color=f"C{i}", label=f["cluster"])
        for x, m in zip(xs, ms):
            r = per_machines[m]
            bars.annotate(f"{r['time_to_train_s'] / 3600:.2f} h" + ("" if r["meets_target"] else "\nlate"),
                          (x, r["cost_usd"]), ha="center", va="bottom", fontsize=7)
    scatter.axvline(result["target_hours"], color="grey", linestyle=":", label="deadline")
    marks = [("best", result["best"], "*"), ("runner-up", result["runner_up"], "P")]
    marks += [("its best", f["best"], "X") for f in result["clusters"]
              if f["best"] not in (result["best"], result["runner_up"])]
    for name, r, marker in marks:
        if r:
            scatter.scatter([r["time_to_train_s"] / 3600], [r["cost_usd"]], s=140, marker=marker, color="black",
                            label=f"{r['cluster']} {name}: {r['machines_used']} machines, ${r['cost_usd']:,.0f}")
    scatter.set_xscale("log")
    scatter.set_yscale("log")
    scatter.set_xlabel("time to train (h)")
    scatter.set_ylabel("cost (USD)")
    scatter.legend(fontsize=7)
    bars.set_xlabel("machines used")
    bars.set_ylabel("cost of the cheapest split (USD)")
    bars.set_xticks(sorted({r["machines_used"] for f in result["clusters"] for r in f["rows"]}))
    bars.legend(fontsize=7)
    for ax in (scatter, bars):
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"{MODEL}, {EPOCHS} epochs of ImageNet-1k within {result['target_hours']:g} h: every split, "
                 f"cost against time")
    fig.tight_layout()
    clustersim.save_figure(fig, path)


def main() -> None:
    result = run(jobs=JOBS)
    for f in result["clusters"]:
        print(f"{f['cluster']}: {f['machines']} machines, {f['candidates']} candidates, {f['dropped']} refused"
              + (f"; {f['note']}" if f["note"] else ""))
    rows = [(key, result[key]) for key in ("best", "runner_up", "cheapest_missing")]
    rows += [(f"{f['cluster'].split('-')[1]} best", f["best"]) for f in result["clusters"]]
    print(f"{'':16s} {'cluster':18s} {'machines':>8} {'hours':>6} {'USD':>9}  split")
    for key, r in rows:
        if r:
            print(f"{key:16s} {r['cluster']:18s} {r['machines_used']:8d} {r['time_to_train_s'] / 3600:6.2f} "
                  f"{r['cost_usd']:9.2f}  {split_name(r)}")
    if result["runner_up"]:
        print(f"runner-up lost: {result['why_lost']}")
    for f in result["clusters"]:
        if f["why_lost"]:
            print(f"{f['cluster']} lost: {f['why_lost']}")
    save(result, OUT_JSON, plot, OUT_PNG)


if __name__ == "__main__":
    main()
