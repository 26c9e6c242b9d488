"""DistBelief's Figure 3 (Dean et al., NIPS 2012): training speed-up of one model instance
against the machines it is split over, for the speech model and three locally connected
image models, simulated on one cluster description (topologies/distbelief-2012.toml).

    .venv/bin/python scenarios/studies/distbelief_fig3.py    # out/distbelief_fig3.{json,png}

Each model is swept over machines per instance with the paper's setting (sync SGD, one
replica, 128-sample batches, a spatial split: fully connected layers by units, locally
connected ones in 2-D blocks chosen automatically).  Speed-up is samples/s against the
same model on one machine.  The cluster file states every machine's figures, among them
the kernel network stack's 15 us a message on each side (``[machine.cpu] op_costs``).
What bends each curve is in docs/decisions/011-*.md and 025-*.md.

The paper's points, from its text (section 5): the speech model "runs fastest on 8
machines, computing 2.2x faster than using a single machine", slower beyond 8; the 1.7B
model gives "a speedup of more than 12x using 81 machines".  Figure 3's other points are
not in the text and are not read off here.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))

import clustersim  # noqa: E402
from study_output import log2_axis, save  # noqa: E402

MACHINES = (1, 2, 4, 8, 16, 32, 64, 128)          # Figure 3's x axis
EXTRA_MACHINES = {"distbelief-image-1.7b": (81,)}  # where the paper's text gives a point
MODELS = ("distbelief-speech", "distbelief-image-80m", "distbelief-image-330m", "distbelief-image-1.7b")
PAPER = {"distbelief-speech": ((8, 2.2),),        # (machines, speed-up), from the paper's text
         "distbelief-image-1.7b": ((81, 12.0),)}  # "more than 12x": a lower bound
STEPS = 1            # sync, one replica: every step is the same
OUT_JSON = Path("out/distbelief_fig3.json")
OUT_PNG = Path("out/distbelief_fig3.png")


def scenario(model: str, machines: int) -> dict:
    """The paper's setting for ``model`` on a cluster of ``machines`` machines."""
    return {"name": "distbelief-fig3", "cluster": {"topology": "distbelief-2012", "machines": machines},
            "model": {"name": model, "batch_size": 128},
            "parallel": {"model_parallel": 1, "split": "spatial", "replicas": 1},
            "training": {"algorithm": "sync", "steps": STEPS}}


def sweep_model(model: str, machines: tuple[int, ...], jobs: int = 1) -> list[dict]:
    """Points of one model's sweep (``clustersim.sweep``): machines, speed-up against the
    first point (one machine), step time; and the sweep's wall time in seconds."""
    t0 = time.perf_counter()
    points = clustersim.sweep(scenario(model, max(machines)), {"parallel.model_parallel": list(machines)}, jobs=jobs)
    wall = time.perf_counter() - t0
    return [{"machines": p["parallel.model_parallel"], "speedup": p["speedup"], "step_time_s": p["step_time_s"],
             "sweep_wall_s": wall} for p in points]


def run(models: tuple[str, ...] = MODELS, machines: tuple[int, ...] = MACHINES, jobs: int = 1) -> dict:
    return {m: sweep_model(m, tuple(sorted(set(machines) | set(EXTRA_MACHINES.get(m, ())))), jobs) for m in models}


def plot(results: dict, path: Path) -> None:
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for model, points in results.items():
        line, = ax.plot([p["machines"] for p in points], [p["speedup"] for p in points], marker="o",
                        label=model.replace("distbelief-", ""))
        for m, s in PAPER.get(model, ()):
            ax.plot([m], [s], marker="*", markersize=14, color=line.get_color(), linestyle="none")
    ax.plot([], [], marker="*", markersize=10, color="grey", linestyle="none", label="paper (text)")
    log2_axis(ax, MACHINES, "machines per model instance")
    ax.set_ylabel("training speed-up (samples/s vs 1 machine)")
    ax.set_title("DistBelief Fig. 3, simulated on distbelief-2012 (1 GbE, 16 cores, 15 us a message)")
    fig.tight_layout()
    clustersim.save_figure(fig, path)


def main() -> None:
    results = run()
    for model, points in results.items():
        row = "  ".join(f"{p['machines']}:{p['speedup']:.2f}x" for p in points)
        print(f"{model:24s} {row}   ({points[0]['sweep_wall_s']:.0f} s)")
    save(results, OUT_JSON, plot, OUT_PNG)


if __name__ == "__main__":
    main()
