"""Time to a fixed accuracy against workers: Downpour, Downpour+Adagrad and Sandblaster
L-BFGS (Dean et al. 2012), co-simulated, beside one GPU training alone.

    .venv/bin/python scenarios/studies/downpour_vs_sandblaster.py    # out/downpour_vs_sandblaster.{json,png}

Setting: co-simulation runs only mlp-digits (9.6k parameters), and on distbelief-2012's
1 GbE its 38 KB push and fetch take ~25x the step's compute, so one replica alone beats
every distributed method (scenarios/time_to_accuracy.py).  Here the cluster, not the
model, makes the step compute bound: DGX H100 GPUs (``dgx-h100-fat-tree``, 3 machines),
one replica per GPU, the two parameter-server shards on the next two GPUs -- over NVLink
up to 4 workers, over NDR InfiniBand from 8 (the replicas then fill machine 0).  "Compute"
on a GPU is, for a model this small, the kernels' fixed launch cost (~4 us each), not
FLOPs: a replica's step is ~32 us of forward and backward against ~3 us each way on
NVLink (``compute_share``).  So Sandblaster's work units (the default, 8 per replica: 4
samples each) each cost about a whole step of launches.  Every run trains on SAMPLES
samples in all, with scenarios/downpour.toml's and scenarios/sandblaster.toml's settings
(Adagrad at the learning rate of scenarios/time_to_accuracy.py; no slow machine), and
reaches TARGET_ACCURACY at the first of EVAL_POINTS evaluations at or above it.  The
single GPU is sync SGD with one replica and no parameter server, at Downpour's rate.
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))

import clustersim  # noqa: E402
from study_output import log2_axis, save  # noqa: E402

SCENARIOS = HERE.parent
METHODS = {   # name -> (scenario file, overrides)
    "downpour": ("downpour.toml", {}),
    "downpour+adagrad": ("downpour.toml", {"training.optimizer": "adagrad", "training.learning_rate": 0.02}),
    "sandblaster": ("sandblaster.toml", {"training.work_units": 0}),   # 0: 8 units per replica
}
ALONE = ("downpour.toml", {"training.algorithm": "sync", "parallel.ps_shards": 0})   # one GPU, no server
WORKERS = (1, 2, 4, 8, 16)
CLUSTER = {"cluster.topology": "dgx-h100-fat-tree", "cluster.machines": 3}   # 24 GPUs: 16 workers + 2 shards
SAMPLES = 25_600                     # ~18 passes over the 1,438 training digits
BATCH = 32                           # per replica step (both scenarios')
TARGET_ACCURACY = 0.9
EVAL_POINTS = 200                    # time to accuracy is known to 0.5% of a run
OUT_JSON = Path("out/downpour_vs_sandblaster.json")
OUT_PNG = Path("out/downpour_vs_sandblaster.png")


def point(method: str, workers: int, samples: int = SAMPLES, target: float = TARGET_ACCURACY,
          eval_points: int = EVAL_POINTS, seed: int = 0) -> dict:
    """One method on ``workers`` GPUs (``method`` "alone": one GPU, no parameter server)."""
    file, sets = ALONE if method == "alone" else METHODS[method]
    res = clustersim.simulate(SCENARIOS / file, {
        **CLUSTER, **sets, "seed": seed, "parallel.replicas": workers, "faults.slowdown": {},
        "training.time_limit_s": 0.0, "training.steps": samples // (BATCH * workers),
        "training.eval_points": eval_points, "training.target_accuracy": target}, speedup=False)
    phases = res.time_by_phase_s
    compute = phases.get("fwd", 0.0) + phases.get("bwd", 0.0)
    comm = sum(phases.get(k, 0.0) for k in ("fetch", "push", "control"))   # control: Sandblaster's coordinator
    return {"method": method, "workers": workers, "time_to_accuracy_s": res.time_to_accuracy_s,
            "accuracy": res.accuracy, "time_s": res.sim_time_s, "samples_per_s": res.samples_per_s,
            "compute_share": compute / (compute + comm), "staleness_mean": res.data.get("staleness_mean", 0.0)}


def run(workers: tuple[int, ...] = WORKERS, methods=tuple(METHODS), samples: int = SAMPLES,
        target: float = TARGET_ACCURACY, eval_points: int = EVAL_POINTS) -> list[dict]:
    """The single GPU first, then every method at every worker count."""
    return [point(m, w, samples, target, eval_points) for m, w in [("alone", 1)] + [(m, w) for m in methods
                                                                                      for w in workers]]


def plot(points: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt
    fig, (tta, rate) = plt.subplots(1, 2, figsize=(10, 4))
    alone = points[0]
    for method in METHODS:
        mine = [p for p in points if p["method"] == method and p["time_to_accuracy_s"] is not None]
        ws = [p["workers"] for p in mine]
        tta.plot(ws, [1e3 * p["time_to_accuracy_s"] for p in mine], marker="o", label=method)
        rate.plot(ws, [p["samples_per_s"] / 1e6 for p in mine], marker="o", label=method)
    if alone["time_to_accuracy_s"] is not None:
        tta.axhline(1e3 * alone["time_to_accuracy_s"], color="grey", linestyle=":", label="one GPU alone")
    rate.axhline(alone["samples_per_s"] / 1e6, color="grey", linestyle=":", label="one GPU alone")
    tta.set_ylabel(f"simulated time to {TARGET_ACCURACY:.0%} test accuracy (ms)")
    tta.set_yscale("log")
    rate.set_ylabel("samples/s (millions)")
    ws = sorted({p["workers"] for p in points[1:]})
    for ax in (tta, rate):
        log2_axis(ax, ws, "workers (one GPU each; +2 GPUs for the shards)")
    fig.suptitle("Downpour and Sandblaster: mlp-digits on DGX H100 GPUs, co-simulated")
    fig.tight_layout()
    clustersim.save_figure(fig, path)


def main() -> None:
    points = run()
    print(f"{'method':17s} {'workers':>7} {'to ' + format(TARGET_ACCURACY, '.0%'):>9} {'accuracy':>9} "
          f"{'samples/s':>10} {'compute':>8} {'staleness':>9}")
    for p in points:
        tta = f"{1e3 * p['time_to_accuracy_s']:.2f} ms" if p["time_to_accuracy_s"] is not None else "-"
        print(f"{p['method']:17s} {p['workers']:7d} {tta:>9} {100 * p['accuracy']:8.1f}% {p['samples_per_s']:10.0f} "
              f"{100 * p['compute_share']:7.0f}% {p['staleness_mean']:9.2f}")
    save(points, OUT_JSON, plot, OUT_PNG)


if __name__ == "__main__":
    main()
