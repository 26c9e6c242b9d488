"""Time to accuracy: the digits MLP trained by six algorithms on the same simulated
DistBelief-era cluster (8 replicas, 2 parameter-server shards, 1 GbE), each co-simulated
so that asynchrony shows in accuracy, not only in seconds per step.

    .venv/bin/python scenarios/time_to_accuracy.py            # writes out/time_to_accuracy.{json,png}

Learning rates: sync averages 8 gradients per update, so it takes a larger step than the
asynchronous algorithms, where every push moves the shared parameters.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import clustersim  # noqa: E402

TIME_LIMIT_S = 0.3            # simulated seconds per run
EVAL_POINTS = 150             # accuracy every 2 ms of it: time to 90% is the first evaluation past it
OUT_JSON = Path("out/time_to_accuracy.json")
OUT_PNG = Path("out/time_to_accuracy.png")
RUNS = {   # label: (scenario file, overrides)
    "sync": ("downpour.toml", ["training.algorithm=sync", "training.learning_rate=0.4"]),
    "downpour": ("downpour.toml", []),
    "downpour+adagrad": ("downpour.toml", ["training.optimizer=adagrad", "training.learning_rate=0.02"]),
    "dcasgd": ("dcasgd.toml", []),
    "sandblaster": ("sandblaster.toml", ["faults.slowdown={}"]),
    "local (k=10)": ("local.toml", []),
}


def run_all(time_limit_s: float = TIME_LIMIT_S) -> dict:
    results = {}
    for label, (file, sets) in RUNS.items():
        summary = clustersim.simulate(HERE / file, sets + [f"training.time_limit_s={time_limit_s}",
                                                           f"training.eval_points={EVAL_POINTS}"], speedup=False).data
        results[label] = {k: summary.get(k) for k in ("accuracy", "loss", "time_to_accuracy_s", "target_accuracy",
                                                      "accuracy_curve", "step_time_s", "samples_per_s",
                                                      "staleness_mean", "sim_time_s", "wall_s")}
    return results


def plot(results: dict, path: Path) -> None:
    import matplotlib.pyplot as plt
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, r in results.items():
        t = [p[0] * 1e3 for p in r["accuracy_curve"]]
        ax.plot(t, [p[1] * 100 for p in r["accuracy_curve"]], marker=".", label=label)
        ax2.plot(t, [p[2] for p in r["accuracy_curve"]], marker=".", label=label)
    ax.set_xlabel("simulated time (ms)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.axhline(next(iter(results.values()))["target_accuracy"] * 100, color="grey", linestyle=":", linewidth=1)
    ax2.set_xlabel("simulated time (ms)")
    ax2.set_ylabel("test loss")
    ax2.set_yscale("log")
    ax.legend(fontsize=8)
    fig.suptitle("mlp-digits, 8 replicas on distbelief-2012 (1 GbE), co-simulated")
    fig.tight_layout()
    clustersim.save_figure(fig, path)


def main() -> None:
    results = run_all()
    clustersim.write_atomic(OUT_JSON, json.dumps(results, indent=2))
    plot(results, OUT_PNG)
    print(f"{'algorithm':<18} {'accuracy':>9} {'to 90%':>10} {'step':>10} {'staleness':>9}")
    for label, r in results.items():
        tta = f"{r['time_to_accuracy_s'] * 1e3:.1f} ms" if r["time_to_accuracy_s"] is not None else "-"
        st = f"{r['staleness_mean']:.2f}" if r.get("staleness_mean") is not None else "-"
        print(f"{label:<18} {r['accuracy']:>9.2%} {tta:>10} {r['step_time_s'] * 1e3:>8.3f}ms {st:>9}")
    print(f"wrote {OUT_JSON} and {OUT_PNG}")


if __name__ == "__main__":
    main()
