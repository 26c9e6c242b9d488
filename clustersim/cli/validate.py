"""``clustersim validate``: simulate and execute one scenario and compare them."""
from __future__ import annotations

import json
from pathlib import Path

from clustersim import api, report
from clustersim.cli.args import plot_arg, scenario_args


def add(sub) -> None:
    v = sub.add_parser("validate", help="simulate and execute one scenario and compare step times")
    scenario_args(v)
    v.add_argument("--topology", help="a calibrated topology (default: calibrate this host now)")
    v.add_argument("--repeats", type=int, help="runs of the case (default 3; not with --against: see --rounds)")
    v.add_argument("--device", default="cpu", choices=("cpu", "gpu"),
                   help="where the runs compute (gpu: one GPU per rank; --topology from calibrate --gpu)")
    plot_arg(v, "predicted and measured time per phase")
    v.add_argument("--ops", action="store_true",
                   help="also a row per op and message: its predicted and measured median (--json has them always)")
    v.add_argument("--against", action="append", default=[], metavar="KEY=VALUE",
                   help="check a speedup: B is the scenario with these overrides too, A without them")
    v.add_argument("--rounds", type=int, help="with --against: runs of A and of B, interleaved (default 5)")
    v.add_argument("--calibrations", type=int,
                   help="with --against and no --topology: calibrations per rank count, alternating (default 3)")
    v.set_defaults(func=run)


def run(args) -> int:
    if args.against:
        from clustersim.core.scenario import parse_set
        parse_set(args.against, "--against")            # a bad one is named as itself, before any run
        return run_speedup(args)
    out = api.validate(args.scenario, args.set, topology=args.topology, repeats=args.repeats, device=args.device,
                       rounds=args.rounds, calibrations=args.calibrations).data
    if args.plot:
        from clustersim.plots import plot_validation
        plot_validation(out, args.plot)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"{out['scenario']}: {out['ranks']} ranks, predicted on {Path(out['topology']).name}, "
          f"measured {len(out['measured_runs_s'])} runs (spread {out['spread_pct']:.1f}%)")
    unmeasured_note(out["unmeasured_ops"])
    rows = [{"what": k, **v} for k, v in out["phases"].items()]
    rows.append({"what": "step", "predicted_s": out["predicted_step_time_s"],
                 "measured_s": out["measured_step_time_s"], "error_pct": out["error_pct"]})
    rows.append({"what": "step, the runs' quiet windows", "predicted_s": out["predicted_step_time_s"],
                 "measured_s": out["quiet_step_time_s"], "error_pct": out["quiet_error_pct"]})
    print(report.table(rows, [("what", "per step"), ("predicted_s", "predicted (s)"), ("measured_s", "measured (s)"),
                              ("error_pct", "error %")]))
    if args.ops:
        print(report.table(out["ops"], [("where", "where"), ("op", "op or message"), ("predicted_s", "predicted (s)"),
                                        ("measured_s", "measured (s)"), ("error_pct", "error %"),
                                        ("measured_mean_s", "measured mean (s)")]))
    return 0


def run_speedup(args) -> int:
    """``--against``: the predicted and measured speedup of B over A, a row per side."""
    from clustersim.core.config import ConfigError
    if args.plot:
        raise ConfigError("--plot", args.plot, "plots a single case: not with --against")
    if args.ops:
        raise ConfigError("--ops", "", "compares a single case's ops: not with --against")
    out = api.validate(args.scenario, args.set, topology=args.topology, against=args.against, rounds=args.rounds,
                       calibrations=args.calibrations, repeats=args.repeats, device=args.device).data
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"{out['scenario']}: B = A with {' '.join(out['against'])}; {out['rounds']} rounds each, interleaved; "
          f"predicted on {out['calibrations']} calibration(s) per side (spread A {out['a']['predicted_spread_pct']:.1f}%, "
          f"B {out['b']['predicted_spread_pct']:.1f}%)")
    unmeasured_note(sorted(set(out["a"]["unmeasured_ops"]) | set(out["b"]["unmeasured_ops"])))
    rows = [{"what": f"{side.upper()}: {out[side]['ranks']} ranks", "predicted": out[side]["predicted_samples_per_s"],
             "measured": out[side]["measured_samples_per_s"], "spread_pct": out[side]["spread_pct"]}
            for side in ("a", "b")]
    rows.append({"what": "speedup B / A", "predicted": out["predicted_speedup"], "measured": out["measured_speedup"],
                 "error_pct": out["speedup_error_pct"], "spread_pct": out["speedup_spread_pct"]})
    rows.append({"what": "speedup, quiet host and the runs' quiet windows", "predicted": out["quiet_predicted_speedup"],
                 "measured": out["quiet_speedup"], "error_pct": out["quiet_speedup_error_pct"],
                 "spread_pct": out["quiet_speedup_spread_pct"]})
    print(report.table(rows, [("what", "samples/s"), ("predicted", "predicted"), ("measured", "measured"),
                              ("error_pct", "error %"), ("spread_pct", "spread %")]))
    return 0


def unmeasured_note(keys: list[str]) -> None:
    """One line where the calibration has no cost for some of the run's ops."""
    if keys:
        print(f"note: calibrate measured no cost for {', '.join(keys)}: their times come from the dense kernels' "
              "efficiency curve and can be several times off (calibrate --models NAME times a light built-in "
              "model's own ops)")
