"""``clustersim sweep``: one scenario over the values of one or more keys, in parallel,
with a progress bar, written as it goes (``--out``) and resumable (``--resume``)."""
from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

from clustersim import api, report
from clustersim.cli.args import count, plot_arg, scenario_args
from clustersim.cli.simulate import STALL_EXIT
from clustersim.core.config import ConfigError
from clustersim.core.scenario import parse_set

METRICS = ("step_time_s", "samples_per_s", "speedup", "devices", "sim_time_s", "sim_events", "wall_s", "bytes_per_step",
           "epoch_time_s", "time_to_train_s", "cost_usd", "energy_kwh", "meets_target")


def add(sub) -> None:
    w = sub.add_parser("sweep", help="simulate a scenario over values of one or more keys")
    scenario_args(w)
    w.add_argument("--vary", action="append", required=True, metavar="KEY=V1,V2,...")
    w.add_argument("--jobs", type=count("--jobs"), default=1, help="processes on this machine")
    w.add_argument("--mpi", action="store_true",
                   help="run points on MPI ranks (mpiexec -n N python -m mpi4py.futures -m clustersim sweep ...)")
    w.add_argument("--out", metavar="PREFIX", help="write PREFIX.json and PREFIX.csv, point by point")
    w.add_argument("--resume", action="store_true", help="skip the points already in PREFIX.json")
    plot_arg(w, "throughput, speedup and efficiency against the first varied key")
    w.set_defaults(func=run)


def parse_vary(items: list[str]) -> dict[str, list]:
    """``KEY=V1,V2,...`` items -> {key: [values]} (each value read as ``--set`` reads it)."""
    out = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise ConfigError("--vary", item, "must look like section.key=v1,v2,...")
        if key.strip() in out:
            raise ConfigError("--vary", item, f"{key.strip()} is varied twice; give its values in one --vary")
        out[key.strip()] = [v for _, v in parse_set([f"{key}={v}" for v in values.split(",")])]
    return out


def previous(prefix: str, vary: dict) -> dict[tuple, dict]:
    """The points of an earlier run (``PREFIX.json``) by the tuple of their varied values."""
    path = Path(prefix + ".json")
    if not path.exists():
        return {}
    try:
        points = json.loads(path.read_text())
        return {api.point_key(p[k] for k in vary): p for p in points}
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(str(path), "", f"cannot resume from it: {exc!r}") from None


def to_csv(points: list[dict], vary: dict) -> str:
    columns = list(vary) + [m for m in METRICS if any(m in p for p in points)] + \
        (["error"] if any("error" in p for p in points) else [])
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(points)
    return out.getvalue()


def save(prefix: str, points: list[dict], vary: dict) -> None:
    api.write_atomic(prefix + ".json", json.dumps(points, indent=2))
    api.write_atomic(prefix + ".csv", to_csv(points, vary))


def run(args) -> int:
    vary = parse_vary(args.vary)
    if args.resume and not args.out:
        raise ConfigError("--resume", "", "needs --out PREFIX (the run to resume)")
    done = previous(args.out, vary) if args.resume else {}
    finished = list(done.values())
    total = 1
    for values in vary.values():
        total *= len(values)
    bar = _progress(total, len(done))

    def on_point(point: dict) -> None:
        bar.update(1)
        if args.out:
            finished.append(point)
            save(args.out, finished, vary)
    try:
        points = api.sweep(args.scenario, vary, args.set, jobs=args.jobs, mpi=args.mpi, done=done, on_point=on_point)
    finally:
        bar.close()
    if args.out:
        save(args.out, points, vary)
    drawn = [p for p in points if "error" not in p]
    if args.plot and drawn:
        from clustersim.plots import plot_sweep
        plot_sweep(drawn, next(iter(vary)), args.plot)
    elif args.plot:
        print(f"clustersim: no plot written to {args.plot}: no point ran to its end", file=sys.stderr)
    # every point stalled: the sweep ran, but no job could go on (simulate's exit for a stall)
    code = STALL_EXIT if points and all("stalled_at_s" in p for p in points) else 0
    if args.json:
        print(json.dumps(points, indent=2))
        return code
    columns = [(k, k) for k in vary] + [("step_time_s", "step (s)"), ("samples_per_s", "samples/s"),
                                        ("speedup", "speedup"), ("wall_s", "wall (s)")]
    columns += [(k, h) for k, h in (("time_to_train_s", "to train (s)"), ("cost_usd", "cost ($)"))
                if any(k in p for p in points)]
    if any("error" in p for p in points):
        columns.append(("error", "error"))
    print(report.table(points, columns))
    return code


def _progress(total: int, initial: int):
    """A tqdm bar on stderr, off when stderr is not a terminal."""
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, unit="point", file=sys.stderr, disable=not sys.stderr.isatty(),
                dynamic_ncols=True)
