"""The validation suite: every scenario in this folder in ROUNDS rounds, each calibrating
this host afresh for each rank count the cases need (then those cases, one after another),
simulating on that topology and executing for real (REPEATS runs); the
median prediction against the median of all runs (``clustersim.compare.validate.combine``), and
against the runs' quiet windows (the prediction is the host without its neighbours:
calibrate probes where it runs quietly; ``clustersim.calibration.hostspeed``).  Then the
speedups of PAIRS of these cases (B's samples/s over A's, each round's runs against each
other: the rounds interleave every case, ``clustersim.compare.validate.suite_speedup``).

    make validate        # writes out/validation.json and prints the table
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

import clustersim  # noqa: E402
from clustersim.api import suite_speedup  # noqa: E402

ROUNDS = 3      # calibrate, predict, run: the host drifts over minutes
REPEATS = 4     # a whole run can fall in a slow spell (mlp-1rank, 4,000 steps: 284 us a step in one run, 195-215 in five)
OUT = Path("out/validation.json")
PAIRS = [                                   # (A, B): B's speedup over A
    ("mlp-1rank", "mlp-allreduce-2"), ("mlp-1rank", "mlp-spatial-2"), ("mlp-1rank", "mlp-layers-2"),
    ("mlp-1rank", "mlp-ps-2"), ("mlp-1rank", "mlp-downpour-2x1"),
    ("mlp-allreduce-2", "mlp-ps-2"),        # allreduce vs parameter server
    ("mlp-layers-2", "mlp-layers-2-micro4"),  # 1 vs 4 micro-batches
    ("mlp-allreduce-2", "mlp-oversubscribed-4"),
    ("speech-1rank", "speech-spatial-2"), ("speech-1rank", "speech-layers-2"),
]
CALIBRATION = Path("out/calibration")


def main() -> None:
    files = sorted(HERE.glob("*.toml"))
    by_ranks: dict[int, list[Path]] = {}
    for f in files:
        by_ranks.setdefault(clustersim.ranks_needed(clustersim.load(f)), []).append(f)
    rounds: dict[Path, list[dict]] = {f: [] for f in files}
    for i in range(ROUNDS):
        for n, cases in sorted(by_ranks.items()):
            path = CALIBRATION / f"host-{n}-ranks.toml"
            clustersim.calibrate(n, path)      # just before its cases' runs: this shared host drifts by minutes
            for f in cases:
                r = clustersim.validate(f, topology=path, repeats=REPEATS).data
                rounds[f].append(r)
                print(f"round {i + 1}: {r['scenario']:<22} error {r['error_pct']:+7.1f}%  quiet {r['quiet_error_pct']:+7.1f}%",
                      flush=True)
    rows = []
    for f in files:
        r = clustersim.combine(rounds[f])
        n = r["ranks"]
        rows.append(r)
        print(f"{r['scenario']:<22} ranks {n:>2}  "
              f"predicted {r['predicted_step_time_s'] * 1e3:8.3f} ms  measured {r['measured_step_time_s'] * 1e3:8.3f} ms"
              f"  error {r['error_pct']:+7.1f}%  spread {r['spread_pct']:5.1f}%"
              f"  quiet {r['quiet_step_time_s'] * 1e3:8.3f} ms {r['quiet_error_pct']:+7.1f}%"
              f" (spread {r['quiet_spread_pct']:5.1f}%)", flush=True)
    errors = [abs(r["error_pct"]) for r in rows]
    quiet = [abs(r["quiet_error_pct"]) for r in rows]
    summary = {"median_abs_error_pct": statistics.median(errors), "worst_abs_error_pct": max(errors),
               "quiet_median_abs_error_pct": statistics.median(quiet), "quiet_worst_abs_error_pct": max(quiet),
               "cases": rows}
    summary["speedups"] = speedups({f.stem: rounds[f] for f in files})
    clustersim.write_atomic(OUT, json.dumps(summary, indent=2))
    print(f"median |error| {summary['median_abs_error_pct']:.1f}%, worst {summary['worst_abs_error_pct']:.1f}% "
          f"(goal: <= 3% and <= 8%); against the runs' quiet windows: "
          f"{summary['quiet_median_abs_error_pct']:.1f}%, {summary['quiet_worst_abs_error_pct']:.1f}%; wrote {OUT}")



def speedups(rounds: dict[str, list[dict]]) -> dict:
    """The speedup of each pair in PAIRS whose cases both ran, printed as a table; with the
    median and worst |error| (goal: <= 3% and <= 8%)."""
    rows = []
    for a, b in PAIRS:
        if a in rounds and b in rounds:
            rows.append({"a": a, "b": b, **suite_speedup(rounds[a], rounds[b])})
    for r in rows:
        print(f"{r['a']:>16} -> {r['b']:<22} predicted {r['predicted_speedup']:6.3f}  measured "
              f"{r['measured_speedup']:6.3f}  error {r['speedup_error_pct']:+7.1f}%  spread {r['speedup_spread_pct']:5.1f}%"
              + (f"  quiet {r['quiet_speedup']:6.3f} {r['quiet_speedup_error_pct']:+7.1f}%" if "quiet_speedup" in r else ""))
    errors = [abs(r["speedup_error_pct"]) for r in rows]
    quiet = [abs(r["quiet_speedup_error_pct"]) for r in rows if "quiet_speedup_error_pct" in r]
    out = {"median_abs_error_pct": statistics.median(errors) if errors else None,
           "worst_abs_error_pct": max(errors) if errors else None,
           "quiet_median_abs_error_pct": statistics.median(quiet) if quiet else None,
           "quiet_worst_abs_error_pct": max(quiet) if quiet else None, "pairs": rows}
    if errors:
        print(f"speedups: median |error| {out['median_abs_error_pct']:.1f}%, worst {out['worst_abs_error_pct']:.1f}% "
              "(goal: <= 3% and <= 8%)" + (f"; against the runs' quiet windows {out['quiet_median_abs_error_pct']:.1f}%, "
                                           f"{out['quiet_worst_abs_error_pct']:.1f}%" if quiet else ""))
    return out


if __name__ == "__main__":
    main()
