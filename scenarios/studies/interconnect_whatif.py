"""Is a faster interconnect worth it?  One data-parallel job (VGG-16, bf16, 32 images
per GPU, synchronous SGD with bucketed allreduce) on four clusters, all their GPUs: one
PCIe server of 4 A100s (``pcie-4gpu``), two such servers on 100 GbE (``ethernet-cluster``,
2 machines), one DGX H100 (NVLink), and two DGX H100 nodes over NDR InfiniBand
(``dgx-h100-fat-tree``, 2 machines).

    .venv/bin/python scenarios/studies/interconnect_whatif.py    # out/interconnect_whatif.{json,png}

Where the time goes: each step splits into the compute of one GPU alone (the same job
with one replica: no allreduce) and the communication the backward does not hide (the
rest of the step).  What each upgrade buys: throughput against the cluster before it,
and the share of the no-communication ideal (GPUs x one GPU's samples/s) it reaches.
VGG-16's 138M parameters (553 MB of fp32 gradients a step) make the allreduce large
beside 32 images of compute, so the interconnect shows.
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))

import clustersim  # noqa: E402
from study_output import save  # noqa: E402

CLUSTERS = (("pcie-4gpu", 1, 4),            # (topology, machines, GPUs used): all of each cluster's GPUs
            ("ethernet-cluster", 2, 8),
            ("dgx-h100", 1, 8),
            ("dgx-h100-fat-tree", 2, 16))
MODEL, BATCH_PER_GPU, DTYPE = "vgg-16", 32, "bf16"
STEPS = 2                                    # sync: every step alike after the first
DATASET_SAMPLES = 1_281_167                  # one ImageNet-1k epoch: time and (where priced) cost
OUT_JSON = Path("out/interconnect_whatif.json")
OUT_PNG = Path("out/interconnect_whatif.png")


def scenario(topology: str, machines: int, gpus: int, model: str = MODEL, batch: int = BATCH_PER_GPU) -> dict:
    cluster = {"topology": topology} | ({"machines": machines} if machines > 1 else {})
    return {"name": "interconnect-whatif", "cluster": cluster,
            "model": {"name": model, "batch_size": batch, "dtype": DTYPE},
            "parallel": {"replicas": gpus},
            "training": {"algorithm": "sync", "steps": STEPS, "dataset_samples": DATASET_SAMPLES}}


def point(topology: str, machines: int, gpus: int, model: str = MODEL, batch: int = BATCH_PER_GPU) -> dict:
    """One cluster: step time split into one GPU's compute and exposed communication."""
    job = clustersim.simulate(scenario(topology, machines, gpus, model, batch), speedup=False)
    alone = clustersim.simulate(scenario(topology, machines, gpus, model, batch), {"parallel.replicas": 1},
                                speedup=False)
    busiest = next(iter(job.link_utilisation), "")
    return {"cluster": topology, "machines": machines, "gpus": gpus, "step_time_s": job.step_time_s,
            "compute_s": alone.step_time_s, "exposed_comm_s": job.step_time_s - alone.step_time_s,
            "samples_per_s": job.samples_per_s, "ideal_samples_per_s": gpus * batch / alone.step_time_s,
            "busiest_link": busiest, "busiest_link_utilisation": job.link_utilisation.get(busiest, 0.0),
            "epoch_time_s": job.epoch_time_s, "epoch_cost_usd": job.data.get("cost_usd")}


def run(clusters=CLUSTERS, model: str = MODEL, batch: int = BATCH_PER_GPU) -> list[dict]:
    points = [point(t, m, g, model, batch) for t, m, g in clusters]
    for before, p in zip([None] + points[:-1], points):
        p["efficiency"] = p["samples_per_s"] / p["ideal_samples_per_s"]
        p["buys"] = p["samples_per_s"] / before["samples_per_s"] if before else 1.0
    return points


def plot(points: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt
    fig, (where, rate) = plt.subplots(1, 2, figsize=(11, 4))
    names = [f"{p['cluster']}\n{p['gpus']} GPUs" for p in points]
    ms = lambda key: [1e3 * p[key] for p in points]        # noqa: E731
    where.bar(names, ms("compute_s"), label="one GPU's compute")
    where.bar(names, ms("exposed_comm_s"), bottom=ms("compute_s"), label="communication not hidden")
    where.set_ylabel("time per step (ms)")
    where.legend(fontsize=8)
    rate.bar(names, [p["ideal_samples_per_s"] for p in points], color="lightgrey", label="no-communication ideal")
    rate.bar(names, [p["samples_per_s"] for p in points], label="simulated")
    for i, p in enumerate(points):
        rate.annotate(f"{100 * p['efficiency']:.0f}%\n{p['buys']:.2f}x", (i, p["samples_per_s"]), ha="center",
                      va="bottom", fontsize=8)
    rate.set_ylabel("samples/s")
    rate.set_title("labels: share of the ideal; x the cluster before", fontsize=9)
    rate.legend(fontsize=8)
    for ax in (where, rate):
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle(f"{MODEL}, {DTYPE}, {BATCH_PER_GPU} images per GPU, sync SGD: what the interconnect costs")
    fig.tight_layout()
    clustersim.save_figure(fig, path)


def main() -> None:
    points = run()
    print(f"{'cluster':18s} {'GPUs':>4} {'step ms':>8} {'compute':>8} {'exposed':>8} {'samples/s':>10} "
          f"{'of ideal':>8} {'buys':>6}  busiest link")
    for p in points:
        print(f"{p['cluster']:18s} {p['gpus']:4d} {1e3 * p['step_time_s']:8.2f} {1e3 * p['compute_s']:8.2f} "
              f"{1e3 * p['exposed_comm_s']:8.2f} {p['samples_per_s']:10.0f} {100 * p['efficiency']:7.0f}% "
              f"{p['buys']:5.2f}x  {p['busiest_link']} ({100 * p['busiest_link_utilisation']:.0f}%)")
    save(points, OUT_JSON, plot, OUT_PNG)


if __name__ == "__main__":
    main()
