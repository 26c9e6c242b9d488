"""``clustersim validate``: simulate and execute one scenario and compare them."""
from __future__ import annotations

import json
from pathlib import Path

from clustersim import api, report
from clustersim.cli.args import scenario_args


def add(sub) -> None:
    v = sub.add_parser("validate", help="simulate and execute one scenario and compare step times")
    scenario_args(v)
    v.add_argument("--topology", help="a calibrated topology (default: calibrate this host now)")
    v.add_argument("--repeats", type=int, default=3)
    v.add_argument("--plot", metavar="FILE", help="predicted and measured time per phase")
    v.set_defaults(func=run)


def run(args) -> int:
    out = api.validate(args.scenario, args.set, topology=args.topology, repeats=args.repeats).data
    if args.plot:
        from clustersim.plots import plot_validation
        plot_validation(out, args.plot)
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
