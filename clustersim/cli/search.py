"""``clustersim search``: the best ways to run a job on up to N devices, with why."""
from __future__ import annotations

import json
import sys
from collections import Counter

from clustersim import api, report
from clustersim.cli.args import count, scenario_args
from clustersim.cli.simulate import STALL_EXIT
from clustersim.search_space import OBJECTIVES

SHOWN = 10


def add(sub) -> None:
    s = sub.add_parser("search", help="the best splits and placements of a job on up to N devices")
    scenario_args(s)
    s.add_argument("--devices", type=count("--devices"), required=True)
    s.add_argument("--objective", default="time", choices=OBJECTIVES)
    s.add_argument("--target-hours", type=float, default=None,
                   help="with training.dataset_samples: the deadline (cheapest first that meets it); "
                        "default: the scenario's training.target_hours; 0: none")
    s.add_argument("--jobs", type=count("--jobs"), default=1, help="processes on this machine")
    s.add_argument("--mpi", action="store_true")
    s.set_defaults(func=run)


def run(args) -> int:
    from tqdm import tqdm
    bar = tqdm(unit="config", file=sys.stderr, disable=not sys.stderr.isatty(), dynamic_ncols=True)
    try:
        res = api.search(args.scenario, args.devices, args.set, objective=args.objective,
                         target_hours=args.target_hours, jobs=args.jobs, mpi=args.mpi,
                         on_point=lambda _p: bar.update(1))
    finally:
        bar.close()
    ranked = res["ranked"]
    code = STALL_EXIT if not ranked and res["stalled"] else 0      # every candidate that ran stalled
    if args.json:
        print(json.dumps(ranked, indent=2))
        if res["note"]:
            print(res["note"], file=sys.stderr)
        return code
    print(f"# {res['candidates']} configurations of {args.scenario} on <= {args.devices} devices, "
          f"{_not_ranked(res)} -- " + (f"best {min(SHOWN, len(ranked))} by {args.objective}:" if ranked else
                                        "none ranked"))
    columns = table_columns(ranked, args.objective)
    if ranked:
        print(report.table(ranked[:SHOWN], columns))
        for line in report.point_notes(ranked[:SHOWN]):
            print(line)
    if res["note"]:
        print(f"# {res['note']}")
    return code


def _not_ranked(res: dict) -> str:
    """What did not rank and why: refused before simulating (memory, shape, settings),
    failed or stalled when run."""
    stalled, failed = len(res["stalled"]), len(res["failed"])
    why = Counter(_refusal(p["error"]) for p in res["dropped"][:res["refused"]])
    parts = [f"{res['refused']} refused before simulating"
             + (f" ({', '.join(f'{n} {reason}' for reason, n in why.most_common())})" if why else "")]
    parts += [f"{failed} failed when run"] if failed else []
    parts += [f"{stalled} stalled"] if stalled else []
    return ", ".join(parts)


def _refusal(error: str) -> str:
    """A refusal's reason in a word or two: ``memory`` where the plan does not fit, else the
    field its one-line error names (``file: field: message``)."""
    if ": does not fit: device " in error:                 # plan.DoesNotFit's message
        return "for memory"
    parts = error.split(": ")
    return f"by {parts[1]}" if len(parts) > 2 else "other"


def table_columns(ranked: list[dict], objective: str) -> list[tuple[str, str]]:
    """(key, header) of the table of the best ``SHOWN`` rows: the optional columns only where
    a shown row sets them; ``x stages`` where a row is a pipeline of tensor slices (a
    replica is then per replica x stages devices)."""
    columns = [("parallel.replicas", "replicas"), ("parallel.model_parallel", "per replica"),
               ("parallel.split", "split"), ("parallel.micro_batches", "micro"), ("parallel.ps_shards", "shards")]
    shown = ranked[:SHOWN]
    if any(p.get("parallel.pipeline", 1) > 1 for p in shown):
        columns.insert(2, ("parallel.pipeline", "x stages"))
    columns += [("parallel.sequence_parallel", "seq par")] if any(p.get("parallel.sequence_parallel")
                                                                   for p in shown) else []
    columns += [("training.recompute", "recompute")] if any("training.recompute" in p for p in shown) else []
    columns.append(("samples_per_s", "samples/s"))
    if any("failure_overhead" in p for p in ranked):       # the ranking's stretch of samples/s
        columns.append(("failure_overhead", "failures (x)"))
    if objective == "time-to-accuracy":
        columns += [("time_to_accuracy_s", "to accuracy (s)"), ("accuracy", "accuracy")]
    if any(p.get("usd_per_hour") for p in ranked):
        columns.append(("usd_per_hour", "$/h"))
    columns += [(k, h) for k, h in (("time_to_train_s", "to train (s)"), ("cost_usd", "cost ($)"))
                if any(k in p for p in ranked)]
    columns += [("meets_target", "in time")] if any("meets_target" in p for p in ranked) else []
    columns.append(("why", "why"))
    return columns
