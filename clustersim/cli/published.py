"""``clustersim published``: predictions against published measurements, with the error per case."""
from __future__ import annotations

import json

from clustersim import api, report
from clustersim.cli.args import count, plot_arg


def add(sub) -> None:
    c = sub.add_parser("published", help="predicted against published measurements (scenarios/published)")
    c.add_argument("--dir", default="", help="a directory of case files (default: the built-in suite)")
    c.add_argument("--json", action="store_true")
    c.add_argument("--jobs", type=count("--jobs"), default=1, help="cases run at once, in processes on this machine")
    plot_arg(c, "predicted against published, one point per case")
    c.set_defaults(func=run)


def run(args) -> int:
    rows = api.published(args.dir or None, jobs=args.jobs)
    if args.plot:
        from clustersim.plots import plot_published
        plot_published(rows, args.plot)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    shown = [{**r, "fit": "fitted" if r["fitted"] else ""} for r in rows]
    print(report.table(shown, [("name", "case"), ("metric", "metric"), ("predicted", "predicted"),
                               ("published", "published"), ("unit", "unit"), ("error_pct", "error %"),
                               ("fit", "")]))
    s = api.published_score(rows)
    print(f"# {s['cases']} cases not fitted: median |error| {s['median_abs_error_pct']:.1f}%, "
          f"worst {s['worst_abs_error_pct']:.1f}%")
    if args.plot:
        print(f"# wrote plot: {args.plot}")
    return 0
