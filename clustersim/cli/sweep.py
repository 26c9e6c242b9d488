"""``clustersim sweep``: one scenario over the values of one or more keys, in parallel,
with a progress bar, written as it goes (``--out``) and resumable (``--resume``)."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import sys
from pathlib import Path

from clustersim import api, report
from clustersim.cli.args import count, plot_arg, scenario_args
from clustersim.cli.simulate import STALL_EXIT
from clustersim.core.config import ConfigError
from clustersim.core.scenario import builtin_scenario_folder, parse_set, scenario_file
from clustersim.core.trace import check_writable as writable
from clustersim.core.trace import unwritable

METRICS = ("step_time_s", "samples_per_s", "speedup", "devices", "sim_time_s", "sim_events", "wall_s", "bytes_per_step",
           "epoch_time_s", "time_to_train_s", "cost_usd", "energy_kwh", "meets_target", "accuracy", "loss",
           "time_to_accuracy_s", "diverged_at_s", "staleness_mean", "failure_overhead", "checkpoint_every_best")
RUN = ".run.json"       # beside PREFIX.json: what run its points belong to (``--resume`` checks it)


def add(sub) -> None:
    w = sub.add_parser("sweep", help="simulate a scenario over values of one or more keys")
    scenario_args(w)
    w.add_argument("--vary", action="append", required=True, metavar="KEY=V1,V2,...")
    w.add_argument("--jobs", type=count("--jobs"), default=1, help="processes on this machine")
    w.add_argument("--mpi", action="store_true",
                   help="run points on MPI ranks (mpiexec -n N python -m mpi4py.futures -m clustersim sweep ...)")
    w.add_argument("--out", metavar="PREFIX",
                   help="write PREFIX.json and PREFIX.csv point by point, and PREFIX.run.json (what the run is)")
    w.add_argument("--resume", action="store_true",
                   help="skip the points already in PREFIX.json (refused for another scenario, --set or --vary keys)")
    plot_arg(w, "throughput, speedup and efficiency against the first varied key, a line per other values")
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
        try:
            pieces = split_values(values)
        except ValueError as exc:
            raise ConfigError("--vary", item, str(exc)) from None
        if any(not v.strip() for v in pieces):
            raise ConfigError("--vary", item, "has an empty value (a comma too many)")
        out[key.strip()] = [v for _, v in parse_set([f"{key}={v}" for v in pieces], "--vary")]
    return out


def split_values(text: str) -> list[str]:
    """``text`` cut at its top-level commas: not inside ``[]``, ``{}`` or a quoted string,
    so a value may be a list or a table (``[1,2],[2,1]``).  ValueError for an unclosed
    bracket or quote."""
    parts, depth, quote, start, i = [], 0, "", 0, 0
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\" and quote == '"':
                i += 1                                     # an escaped character, a quote too
            elif c == quote:
                quote = ""
        elif c in "\"'":
            quote = c
        elif c in "[{":
            depth += 1
        elif c in "]}":
            depth = max(depth - 1, 0)
        elif c == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
        i += 1
    if quote or depth:
        raise ValueError(f"has an unclosed {quote or 'bracket'}")
    return parts + [text[start:]]


def run_record(scenario: str, overrides: list[str], vary: dict) -> dict:
    """What a sweep is, for ``--resume`` to compare: the scenario (a built-in's name, else
    its absolute path) and the sha256 of its text (a file edited between the runs would put
    old points beside new; files it names are not hashed), the ``--set`` overrides
    (the last of a key wins, as in ``load``) and the varied keys; varied values may grow
    between runs."""
    path = scenario_file(scenario).resolve()
    builtin = path.parent == builtin_scenario_folder().resolve()
    try:
        content = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except OSError:
        content = ""                          # load reports it, naming the file
    record = {"scenario": path.stem if builtin else str(path), "content": content,
              "set": dict(parse_set(overrides)), "vary": sorted(vary)}
    return json.loads(json.dumps(record, default=str))   # as it reads back from the file


def previous(prefix: str, record: dict, vary: dict) -> dict[tuple, dict]:
    """The points of an earlier run (``PREFIX.json``) by the tuple of their varied values.
    Raises ConfigError when ``PREFIX.run.json`` is missing or names another run."""
    path, held = Path(prefix + ".json"), Path(prefix + RUN)
    if not path.exists():
        return {}
    earlier = _held(held)
    if earlier is None:
        raise ConfigError(str(path), "", f"cannot tell what run it holds (no record of it in {held}); "
                                         "rerun without --resume, or give another --out")
    differs = [f"{what} {_shown(earlier.get(key), record[key])} there, {_shown(record[key], earlier.get(key))} here"
               for key, what in (("scenario", "scenario"), ("content", "the scenario file's sha256"),
                                 ("set", "--set"), ("vary", "--vary keys"))
               if earlier.get(key) != record[key] and (key in earlier or key != "content")]   # older records: no hash
    if differs:
        raise ConfigError(str(path), "", f"holds another run ({'; '.join(differs)}); rerun without --resume, "
                                         "or give another --out")
    try:
        points = json.loads(path.read_text())
        if not isinstance(points, list) or not all(isinstance(p, dict) for p in points):
            raise ValueError("not a list of points")        # ``{}`` resumed as if it held none
        return {api.point_key(p[k] for k in vary): p for p in points}
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(str(path), "", f"cannot resume from it: {exc!r}") from None


def _held(path: Path) -> dict | None:
    """The run record in ``path``; None when there is none or it is not one."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _shown(value, other) -> str:
    """A record's field for the one-line refusal: of ``--set``, only the keys that differ."""
    if isinstance(value, dict):
        other = other if isinstance(other, dict) else {}
        return " ".join(f"{k}={json.dumps(v)}" for k, v in value.items() if other.get(k, ...) != v) or "none"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    return str(value)


def to_csv(points: list[dict], vary: dict) -> str:
    columns = list(vary) + [m for m in METRICS if any(m in p for p in points)] + \
        (["error"] if any("error" in p for p in points) else [])
    out = io.StringIO()
    writer = csv.DictWriter(out, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(points)
    return out.getvalue()


def save(prefix: str, points: list[dict], vary: dict, record: dict) -> None:
    """PREFIX.json and .csv, each whole (temp file, then rename), and PREFIX.run.json.  A
    record of another run goes first, so a run cut short never leaves one run's points
    beside the other's record (``--resume`` then refuses: it cannot tell)."""
    held = Path(prefix + RUN)
    if _held(held) != record:
        try:
            held.unlink(missing_ok=True)
        except OSError as exc:
            raise unwritable(held, exc) from None
    api.write_atomic(prefix + ".json", json.dumps(points, indent=2))
    api.write_atomic(prefix + ".csv", to_csv(points, vary))
    if not held.exists():
        api.write_atomic(held, json.dumps(record, indent=2))


def check_writable(prefix: str) -> None:
    """A PREFIX whose files cannot be written is one line before any point runs, and nothing
    is written yet (an earlier run's files stay until a point replaces them)."""
    for end in (".json", ".csv", RUN):
        writable(prefix + end)


def run(args) -> int:
    vary = parse_vary(args.vary)
    if args.resume and not args.out:
        raise ConfigError("--resume", "", "needs --out PREFIX (the run to resume)")
    record = run_record(args.scenario, args.set, vary)
    done = previous(args.out, record, vary) if args.resume else {}
    finished = list(done.values())
    total = 1
    for values in vary.values():
        total *= len(values)
    if args.out is not None and (not Path(args.out).name or args.out.endswith(("/", "\\")) or Path(args.out).is_dir()):
        raise ConfigError("--out", repr(args.out), ("is empty" if not args.out else "names a folder") +
                          "; give a file prefix (out/run writes out/run.json, out/run.csv and out/run.run.json)")
    if args.out:
        check_writable(args.out)
    bar = _progress(total, len(done))

    def on_point(point: dict) -> None:
        bar.update(1)
        if args.out:
            finished.append(point)
            # bad input everywhere (exit 2) writes nothing: the files wait for a point that ran
            if any("error" not in p or "stalled_at_s" in p for p in finished):
                save(args.out, finished, vary, record)
    try:
        points = api.sweep(args.scenario, vary, args.set, jobs=args.jobs, mpi=args.mpi, done=done, on_point=on_point)
    finally:
        bar.close()
    if args.out:                 # the earlier run's points outside this grid stay in the files
        ran = {api.point_key(p[k] for k in vary) for p in points}
        save(args.out, points + [p for key, p in done.items() if key not in ran], vary, record)
    drawn = [p for p in points if "error" not in p]
    if args.plot and drawn:
        from clustersim.plots import plot_sweep
        plot_sweep(drawn, list(vary), args.plot)
    elif args.plot:
        print(f"clustersim: no plot written to {args.plot}: no point ran to its end", file=sys.stderr)
    # every point stalled: the sweep ran, but no job could go on (simulate's exit for a stall)
    code = STALL_EXIT if points and all("stalled_at_s" in p for p in points) else 0
    if args.json:
        print(json.dumps(points, indent=2))
        return code
    columns = [(k, k) for k in vary] + [("step_time_s", "step (s)"), ("samples_per_s", "samples/s"),
                                        ("speedup", "speedup"), ("wall_s", "wall (s)")]
    columns += [(k, h) for k, h in (("time_to_train_s", "to train (s)"), ("cost_usd", "cost ($)"),
                                    ("accuracy", "accuracy"), ("time_to_accuracy_s", "to accuracy (s)"),
                                    ("staleness_mean", "staleness"), ("failure_overhead", "failures (x)"),
                                    ("checkpoint_every_best", "best interval"))
                if any(k in p for p in points)]
    if any("error" in p for p in points):
        columns.append(("error", "error"))
    print(report.table(points, columns))
    for line in report.point_notes(points):
        print(line)
    return code


def _progress(total: int, initial: int):
    """A tqdm bar on stderr, off when stderr is not a terminal."""
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, unit="point", file=sys.stderr, disable=not sys.stderr.isatty(),
                dynamic_ncols=True)
