"""Delay compensation (DC-ASGD, Zheng et al. ICML 2017) against plain asynchronous SGD
(Downpour) and synchronous SGD, with 4, 8 and 16 workers: co-simulated accuracy of the
digits MLP after the same samples, and the simulated time they take.

    .venv/bin/python scenarios/studies/dcasgd.py    # out/dcasgd.{json,png}

Setting: scenarios/dcasgd.toml (distbelief-2012, 1 GbE, 32 samples per worker step, 2
parameter-server shards, learning rate 0.05, lambda 0.04), every run trained on
SAMPLES samples in all (steps per worker = SAMPLES / (32 x workers)).  Sync applies the
mean of the workers' gradients once per step, so with more workers it takes fewer,
larger steps; the asynchronous shards apply every push, each delayed by about the other
workers' pushes (``staleness_mean``), which the compensation corrects for.  The
asynchronous runs' times move more with the replicas' start phases on the shared links
(docs/decisions/008) than with the compensation's dearer apply.
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))

import clustersim  # noqa: E402
from study_output import log2_axis, save  # noqa: E402

SCENARIO = HERE.parent / "dcasgd.toml"
WORKERS = (4, 8, 16)
METHODS = {"sync": {"training.algorithm": "sync"},                     # name -> overrides
           "asgd": {"training.algorithm": "downpour"},
           "dc-asgd": {"training.algorithm": "dcasgd", "training.dcasgd_adaptive": False},
           "dc-asgd adaptive": {"training.algorithm": "dcasgd", "training.dcasgd_adaptive": True}}
SAMPLES = 25_600                     # ~18 passes over the 1,438 training digits
BATCH = 32                           # per worker step (the scenario's)
OUT_JSON = Path("out/dcasgd.json")
OUT_PNG = Path("out/dcasgd.png")


def point(method: str, workers: int, samples: int = SAMPLES, seed: int = 0) -> dict:
    """One method with ``workers`` workers on one machine each (shards on two more)."""
    res = clustersim.simulate(SCENARIO, {**METHODS[method], "seed": seed, "cluster.machines": workers + 2,
                                         "parallel.replicas": workers, "training.time_limit_s": 0.0,
                                         "training.steps": samples // (BATCH * workers)}, speedup=False)
    return {"method": method, "workers": workers, "accuracy": res.accuracy, "loss": res.loss,
            "time_s": res.sim_time_s, "samples_per_s": res.samples_per_s,
            "staleness_mean": res.data.get("staleness_mean", 0.0)}


def run(workers: tuple[int, ...] = WORKERS, methods=tuple(METHODS), samples: int = SAMPLES) -> list[dict]:
    return [point(m, w, samples) for w in workers for m in methods]


def plot(points: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt
    fig, (acc, time) = plt.subplots(1, 2, figsize=(10, 4))
    for method in METHODS:
        mine = [p for p in points if p["method"] == method]
        ws = [p["workers"] for p in mine]
        acc.plot(ws, [100 * p["accuracy"] for p in mine], marker="o", label=method)
        time.plot(ws, [1e3 * p["time_s"] for p in mine], marker="o", label=method)
    acc.set_ylabel(f"test accuracy after {SAMPLES:,} samples (%)")
    time.set_ylabel(f"simulated time for {SAMPLES:,} samples (ms)")
    for ax in (acc, time):
        log2_axis(ax, WORKERS, "workers")
    fig.suptitle("Sync SGD, ASGD and DC-ASGD: mlp-digits on distbelief-2012 (1 GbE), co-simulated")
    fig.tight_layout()
    clustersim.save_figure(fig, path)


def main() -> None:
    points = run()
    print(f"{'method':17s} {'workers':>7} {'accuracy':>9} {'loss':>7} {'time ms':>8} {'staleness':>9}")
    for p in points:
        print(f"{p['method']:17s} {p['workers']:7d} {100 * p['accuracy']:8.1f}% {p['loss']:7.3f} "
              f"{1e3 * p['time_s']:8.1f} {p['staleness_mean']:9.2f}")
    save(points, OUT_JSON, plot, OUT_PNG)


if __name__ == "__main__":
    main()
