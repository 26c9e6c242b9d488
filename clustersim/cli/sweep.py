"""``clustersim sweep``: one scenario over the values of one or more keys."""
from __future__ import annotations

import json

from clustersim import api, report
from clustersim.cli.args import scenario_args
from clustersim.core.config import ConfigError
from clustersim.core.scenario import parse_set


def add(sub) -> None:
    w = sub.add_parser("sweep", help="simulate a scenario over values of one or more keys")
    scenario_args(w)
    w.add_argument("--vary", action="append", required=True, metavar="KEY=V1,V2,...")
    w.add_argument("--jobs", type=int, default=1)
    w.add_argument("--plot", metavar="FILE")
    w.set_defaults(func=run)


def parse_vary(items: list[str]) -> dict[str, list]:
    """``KEY=V1,V2,...`` items -> {key: [values]} (each value read as ``--set`` reads it)."""
    out = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise ConfigError("--vary", item, "must look like section.key=v1,v2,...")
        out[key.strip()] = [v for _, v in parse_set([f"{key}={v}" for v in values.split(",")])]
    return out


def run(args) -> int:
    vary = parse_vary(args.vary)
    points = api.sweep(args.scenario, vary, args.set, jobs=args.jobs)
    if args.plot:
        from clustersim.plots import plot_sweep
        plot_sweep([p for p in points if "error" not in p], next(iter(vary)), args.plot)
    if args.json:
        print(json.dumps(points, indent=2))
        return 0
    columns = [(k, k) for k in vary] + [("step_time_s", "step (s)"), ("samples_per_s", "samples/s"),
                                        ("speedup", "speedup"), ("wall_s", "wall (s)")]
    if any("error" in p for p in points):
        columns.append(("error", "error"))
    print(report.table(points, columns))
    return 0
