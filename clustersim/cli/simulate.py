"""``clustersim simulate``: where does the time go?"""
from __future__ import annotations

import json
from contextlib import contextmanager

from clustersim import api, report
from clustersim.cli.args import plot_arg, scenario_args
from clustersim.core.config import ConfigError
from clustersim.core.trace import write_chrome

STALL_EXIT = 3


def add(sub) -> None:
    s = sub.add_parser("simulate", help="simulate a scenario and summarise where the time goes")
    scenario_args(s)
    s.add_argument("--trace", metavar="FILE", help="write a Chrome/Perfetto trace (JSON)")
    plot_arg(s, "write a Gantt of one step and utilisation (PNG, SVG, PDF, ...)")
    s.add_argument("--no-speedup", action="store_true", help="skip the one-device baseline")
    s.set_defaults(func=run)


@contextmanager
def named(option: str, path: str):
    """An output that cannot be written, named by the option that asked for it."""
    try:
        yield
    except ConfigError as exc:
        if exc.file != str(path):
            raise
        raise ConfigError(option, str(path), exc.message) from None


def run(args) -> int:
    res = api.simulate(args.scenario, args.set, speedup=not args.no_speedup)
    summary = res.data
    if args.trace:
        with named("--trace", args.trace):
            write_chrome(res.trace, args.trace)
    if args.plot:
        from clustersim.plots import plot_step
        with named("--plot", args.plot):
            plot_step(res.trace, res.plan, summary, args.plot)
    print(json.dumps(summary, indent=2) if args.json else report.summary_text(summary))
    if not args.json:
        for what, path in (("trace", args.trace), ("plot", args.plot)):
            if path:
                print(f"  wrote {what}: {path}")
    return STALL_EXIT if "stalled_at_s" in summary else 0
