"""The verbs a script calls: ``load``, ``simulate``, ``sweep``, ``execute``, ``validate``,
``calibrate``.  Each returns a result whose attributes are the ``--json`` keys of the
command of the same name (``r.step_time_s``), plus the Trace where there is one.

A scenario is a path to a TOML file or a dict of the same tables; ``overrides`` are
``{"parallel.model_parallel": 8}`` or ``["parallel.model_parallel=8"]``, as ``--set``.
Bad input raises ``ConfigError`` naming the file and field.
"""
from __future__ import annotations

import itertools
import os
import json
import math
import numbers
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from clustersim.core.config import ConfigError
from clustersim.core.metrics import machines_used, summarize
from clustersim.core.models import Model
from clustersim.core.nccl import VERSION as NCCL_VERSION, supported
from clustersim.core.plan import DoesNotFit, Plan, plan
from clustersim.core.scenario import (NothingToShard, Scenario, apply_overrides, builtin_scenario_folder, parse_set,
                                     read_toml, scenario_file, scenario_from_dict)
from clustersim.core.schedule import ranks_needed
from clustersim.core.topogen import load_topology
from clustersim.core.trace import Trace, write_atomic

Source = str | Path | Mapping
Overrides = Mapping[str, Any] | Iterable[str | tuple[str, Any]] | None

__all__ = ["ConfigError", "Result", "load", "simulate", "sweep", "search", "execute", "validate", "calibrate", "collective",
           "combine", "ranks_needed", "save_figure", "write_atomic", "published", "published_score",
           "import_onnx"]


class Result:
    """A command's JSON as attributes (``r.samples_per_s``), ``r.data`` the dict itself,
    ``r.trace`` and ``r.plan`` where the run has them."""

    def __init__(self, data: dict, trace: Trace | None = None, plan: Plan | None = None) -> None:
        self.data, self.trace, self.plan = data, trace, plan

    def __getattr__(self, name: str) -> Any:
        data = self.__dict__.get("data")      # absent while pickle and copy build one
        if data is None or name not in data:
            raise AttributeError(f"{type(self).__name__} has no {name!r}"
                                 + (f" (keys: {', '.join(data)})" if data is not None else ""))
        return data[name]

    def __repr__(self) -> str:
        keys = ("step_time_s", "samples_per_s", "stalled_at_s", "error_pct")
        shown = ", ".join(f"{k}={self.data[k]!r}" for k in keys if k in self.data)
        return f"{type(self).__name__}({shown})"


def _a_file_or_dict(source, verb: str) -> None:
    """``verb`` applies each candidate's values to the scenario's tables, which a loaded
    Scenario no longer is."""
    if isinstance(source, Scenario):
        raise ConfigError(source.file, "", f"{verb} takes a scenario file or dict (it sets each candidate's values "
                                           f"in it); got a loaded Scenario")


def _pairs(overrides: Overrides) -> list[tuple[str, Any]]:
    if overrides is None:
        return []
    if isinstance(overrides, (str, bytes)):           # else split into characters
        raise ConfigError("overrides", "", f"a dict or a list of KEY=VALUE strings; got the string {overrides!r}")
    if isinstance(overrides, Mapping):
        return [(str(k), v) for k, v in overrides.items()]
    return [x if isinstance(x, tuple) else parse_set([str(x)])[0] for x in overrides]


def load(source: Source, overrides: Overrides = None) -> Scenario:
    """The validated Scenario of a file or dict with ``overrides`` applied."""
    if isinstance(source, Mapping):
        return scenario_from_dict(_raw(source, overrides), "<dict>")
    return scenario_from_dict(_raw(source, overrides), str(scenario_file(source)))


def _raw(source: Source, overrides: Overrides = None) -> dict:
    """The scenario's tables with ``overrides`` applied, not yet validated."""
    if isinstance(source, Mapping):
        return apply_overrides(dict(source), _pairs(overrides))
    return apply_overrides(read_toml(scenario_file(source)), _pairs(overrides))


def simulate(source: Source | Scenario, overrides: Overrides = None, *, speedup: bool = True) -> Result:
    """Simulates the scenario: its summary (``clustersim simulate --json``), Trace and Plan.
    ``speedup`` also simulates the one-device baseline (without faults).  A run that cannot
    go on (a failure nothing gets past) has ``stalled_at_s`` and ``stalled_reason`` and no
    ``step_time_s``, ``samples_per_s`` or ``speedup``."""
    from sim.baseline import one_device_short, one_device_step_time
    from sim.engine import simulate as run
    if isinstance(source, Scenario) and overrides:      # a loaded Scenario has nowhere to take them
        raise ConfigError(source.file, "", "overrides apply to a scenario file or dict; this Scenario is loaded "
                                           "already (load it with them: clustersim.load(file, overrides))")
    sc = source if isinstance(source, Scenario) else load(source, overrides)
    p = plan(sc)
    res = run(p)
    summary = summarize(p, res, one_device_step_time(p) if speedup and res.stalled_at_s is None else None)
    if "speedup" in summary and (short := one_device_short(p)):
        summary["one_device_short"] = short
    if sc.training.cosim and res.stalled_at_s is None:
        from clustersim.compare.cosim import cosimulate
        summary.update(cosimulate(p, res))
        if "diverged_at_s" in summary:
            summary.setdefault("notes", []).append(
                f"the co-simulated training diverged: no finite loss from {summary['diverged_at_s']:.4g} s of "
                f"simulated time on (its steps overflowed the weights: training.learning_rate = "
                f"{sc.training.learning_rate:g}" + (f", dcasgd_lambda = {sc.training.dcasgd_lambda:g}"
                                                    if sc.training.algorithm == "dcasgd" else "") + ")")
    return Result(summary, res.trace, p)


SWEEP_KEYS = ("step_time_s", "samples_per_s", "devices", "sim_time_s", "sim_events", "wall_s", "bytes_per_step",
              "epoch_time_s", "time_to_train_s", "cost_usd", "energy_kwh", "meets_target",
              "accuracy", "loss", "time_to_accuracy_s", "staleness_mean",    # these four where co-simulated
              "diverged_at_s",                                              # and the loss stopped being finite
              "failure_overhead", "checkpoint_every_best",                  # sync restarting under an MTBF
              "failures_in_time_to_train",                                  # false: failures not in the time
              "notes")                                                      # what the figures leave out
STALLED = "stalled: "           # a point's error when its run stalled


def _sweep_point(source: Source, pairs: list[tuple[str, Any]]) -> dict:
    """One point's metrics, or its one-line reason when it cannot be planned."""
    try:
        summary = simulate(source, pairs, speedup=False).data
    except ConfigError as exc:
        return {"error": str(exc)}
    if "stalled_at_s" in summary:
        return {"error": STALLED + summary["stalled_reason"], "stalled_at_s": summary["stalled_at_s"]}
    return {k: summary[k] for k in SWEEP_KEYS if k in summary}


def sweep(source: Source, vary: Mapping[str, Iterable[Any]], overrides: Overrides = None, *, jobs: int = 1,
          mpi: bool = False, done: Mapping[tuple, dict] | None = None,
          on_point: Callable[[dict], None] | None = None) -> list[dict]:
    """Every combination of ``vary``'s values: a list of points holding the varied keys
    (dotted), the metrics and ``speedup`` against the first feasible point.  A point that
    cannot be planned holds ``error`` instead; when no point can, the first point's
    ConfigError is raised (bad input that they share).  Points run in ``jobs`` processes,
    or on the ranks of ``mpiexec`` with ``mpi`` (mpi4py.futures); ``done`` maps ``point_key``
    of a combination's values to a point already run (``--resume``); ``on_point`` is called
    with each point as it finishes (a progress bar)."""
    _a_file_or_dict(source, "sweep")
    base = _pairs(overrides)
    for key, values in vary.items():                   # each a list: one line, not Python's TypeError
        if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Iterable):
            raise ConfigError("--vary", str(key), f"give a list of values to vary it over; got {values!r}")
    axes = [[(key, v) for v in values] for key, values in vary.items()]
    for key, values in zip(vary, axes):
        if not values:
            raise ConfigError("--vary", str(key), "give at least one value to vary it over")
    combos = [list(c) for c in itertools.product(*axes)]
    try:
        load(source, base)                                 # bad shared input fails here, once
    except ConfigError:                                    # unless the varied keys mend it (a key only an
        if not any(_loads(source, base + combo) for combo in combos):    # algorithm of --vary reads)
            raise
    done = done or {}
    results: list[dict | None] = [None] * len(combos)
    todo = []
    for i, combo in enumerate(combos):
        key = point_key(v for _, v in combo)
        if key in done:
            results[i] = {k: v for k, v in done[key].items() if k not in vary and k != "speedup"}
        else:
            todo.append(i)
    for n, result in _each(_sweep_point, [(source, base + combos[i]) for i in todo], jobs, mpi):
        i = todo[n]
        results[i] = result
        if on_point:
            on_point({k: v for k, v in combos[i]} | result)
    if all("error" in r and "stalled_at_s" not in r for r in results):
        plan(load(source, base + combos[0]))               # raises the first point's ConfigError
    first = next((r for r in results if "error" not in r), None)
    points = []
    for combo, res in zip(combos, results):
        point = {k: v for k, v in combo} | res
        if "error" not in res and first is not None:
            point["speedup"] = res["samples_per_s"] / first["samples_per_s"] if first["samples_per_s"] else 0.0
        points.append(point)
    return points


SEARCH_KEYS = SWEEP_KEYS + ("machines_used",)


def _search_point(source: Source, pairs: list[tuple[str, Any]]) -> dict:
    """One candidate's metrics and why, or its one-line reason."""
    from clustersim.search_space import why
    try:
        res = simulate(source, pairs, speedup=False)
    except ConfigError as exc:
        return {"error": str(exc)}
    summary = res.data
    if "stalled_at_s" in summary:
        return {"error": STALLED + summary["stalled_reason"]}
    out = {k: summary[k] for k in SEARCH_KEYS if k in summary}
    out["machines_used"] = machines_used(res.plan)     # the summary has it only with dataset_samples
    price = res.plan.scenario.topology.price_usd_per_hour
    out["usd_per_hour"] = out["machines_used"] * price if price else None     # None: the topology has no price
    out["why"] = why(summary)
    return out


def search(source: Source, devices: int, overrides: Overrides = None, *, objective: str = "time",
           target_hours: float | None = None, jobs: int = 1, mpi: bool = False,
           on_point: Callable[[dict], None] | None = None) -> dict:
    """The ways to run the job on at most ``devices`` devices (``clustersim.search_space``), the
    global batch fixed: candidates that cannot fit in memory are dropped before simulating,
    the rest simulated (sync: one step, every step being alike) and ranked by ``objective``
    (a route the plan cannot find shows when the candidate runs: failed, not refused).
    Returns ``ranked`` (best first: the chosen keys, the metrics, ``why``), ``dropped``
    (candidates that did not rank, each with its ``error``: refused before simulating, or
    failed or stalled when run), ``failed`` and ``stalled`` (those of them that failed or
    stalled when run), ``refused`` (how many were refused before simulating) and ``note`` (a deadline or accuracy no candidate
    meets; where every candidate that ran stalled, why).  The deadline is ``target_hours``
    (0: none), or where it is None the scenario's ``training.target_hours``."""
    _a_file_or_dict(source, "search")
    if isinstance(devices, bool) or not isinstance(devices, numbers.Integral):
        raise ConfigError("devices", "", f"a whole number of devices; got {devices!r}")
    from clustersim.search_space import OBJECTIVES, candidates, memory_tries, score, shown
    base = _pairs(overrides)
    zero = None                       # ZeRO asked of a one-replica scenario: the rows with replicas shard
    try:
        sc = load(source, base)
    except NothingToShard:
        zero = int(_raw(source, base)["training"]["zero"])
        sc = load(source, base + [("training.zero", 0)])
    n = len(sc.topology.compute_devices())
    if not 1 <= devices <= n:
        machines = len({sc.topology.machine_of(d) for d in sc.topology.compute_devices()})
        raise ConfigError("--devices", str(devices), f"must be 1..{n}: topology {sc.topology.name} has {n} compute "
                          f"devices on {machines} machines (cluster.machines)")
    if objective not in OBJECTIVES:
        raise ConfigError("--objective", objective, f"must be one of {', '.join(OBJECTIVES)}")
    if objective == "cost" and not sc.topology.price_usd_per_hour:
        raise ConfigError(sc.topology.name, "machine.price_usd_per_hour", "the cost objective needs a price "
                          "(price_usd_per_hour at the top of a topology of explicit devices)")
    target_hours = sc.training.target_hours if target_hours is None else target_hours
    if objective == "time-to-accuracy" and not sc.training.cosim:
        raise ConfigError(sc.file, "training.cosim", "time-to-accuracy needs the co-simulated model (cosim = true)")
    if not target_hours >= 0 or math.isinf(target_hours):        # nan fails the first test
        raise ConfigError("--target-hours", str(target_hours), "must be a finite number >= 0 (0: no deadline)")
    if target_hours and not sc.training.dataset_samples:
        raise ConfigError(sc.file, "training.dataset_samples", "a target in hours needs the data set's size")
    faulted = sc.faults.mtbf_s or sc.faults.machine_mtbf_s or sc.faults.checkpoint_every   # in the run's steps
    alike = (sc.training.algorithm == "sync" and objective != "time-to-accuracy" and not sc.training.cosim
             and not faulted)
    steps = [("training.steps", 1)] if alike else []       # sync steps are alike; training to accuracy is not
    if target_hours or sc.training.target_hours:         # 0 turns the scenario's deadline off
        steps.append(("training.target_hours", target_hours))
    trials, dropped, nearest = [], [], (math.inf, "")    # nearest: the refusal least short of memory (field: why)
    for cand in candidates(sc, devices, zero):
        fitted, error, short = _fitting(source, base + steps, cand, memory_tries(sc, cand))
        if error:
            dropped.append({**shown(cand), "error": error})
            nearest = min(nearest, short)
        trials += [(trial, base + steps + list(trial.items())) for trial in fitted]
    refused = len(dropped)
    points, failed, stalled = [], [], []
    for n, result in _each(_search_point, [(source, pairs) for _, pairs in trials], jobs, mpi):
        point = shown(trials[n][0]) | result | {"candidate": n}
        if "error" not in point:
            points.append(point)
        else:
            (stalled if point["error"].startswith(STALLED) else failed).append(point)
        if on_point:
            on_point(point)
    dropped += failed + stalled
    found = {"dropped": dropped, "failed": failed, "stalled": stalled, "refused": refused,
             "candidates": len(trials) + refused}
    if not points and stalled and not failed:              # they ran, and no job could go on
        return {"ranked": [], **found, "note": f"every configuration that ran stalled ({len(stalled)}); the "
                f"first: {stalled[0]['error'][len(STALLED):]}"}
    if not points and dropped:                             # bad input every candidate shares, or memory:
        if failed or nearest[0] == math.inf:               # the split nearest to fitting
            raise ConfigError(str(source), "", f"no configuration can run: {(failed or dropped)[0]['error']}")
        raise ConfigError(str(source), "", f"no configuration can run (the nearest to fitting needs {nearest[0]:.3g}x "
                                           f"its device's memory): {nearest[1]}")
    accurate = objective == "time-to-accuracy"             # none reached: the most accurate first
    ranked = sorted(points, key=lambda p: (score(p, objective), -(p.get("accuracy") or 0.0) if accurate else 0.0,
                                           p["candidate"]))
    notes = []
    counted = [p for p in ranked if p.get("failures_in_time_to_train") is not False]
    blind = [p for p in ranked if p.get("failures_in_time_to_train") is False] if counted else []
    ranked = counted or ranked                   # their failures cost what no closed form says: last
    if blind:
        notes.append(f"{len(blind)} configuration(s) whose failures are not in their time (sync with shards stops "
                     "at a failed one) ranked after the others")
        for p in blind:                          # nor is whether they meet a deadline known
            p.pop("meets_target", None)
    if accurate and ranked and all(p.get("time_to_accuracy_s") is None for p in ranked):
        notes.append(f"no configuration reaches {sc.training.target_accuracy:.0%} accuracy in {sc.training.steps} "
                     f"steps: ranked by the accuracy reached (best {ranked[0].get('accuracy', 0.0):.1%})")
    if target_hours:
        meeting = [p for p in ranked if p.get("meets_target")]
        if not meeting and ranked:
            fastest = min(ranked, key=lambda p: p.get("time_to_train_s", math.inf))   # none: never done
            notes.append(f"no configuration trains in {target_hours:g} h on {devices} devices: " +
                         (f"the fastest takes {fastest['time_to_train_s'] / 3600:.3g} h" if "time_to_train_s" in fastest
                          else "none finishes on average, its failures coming faster than it recovers"))
        elif len(meeting) < len(ranked):           # the order restarts at the first that misses: say so
            notes.append(f"ranked first: the {len(meeting)} that train in {target_hours:g} h (in time: yes), then "
                         f"the {len(ranked) - len(meeting)} that do not")
        ranked = meeting + [p for p in ranked if not p.get("meets_target")]
    note = "; ".join(notes)
    return {"ranked": ranked + blind, **found, "note": note}


def _fitting(source: Source, pairs: list[tuple[str, Any]], cand: dict,
             tries: list[list[dict]]) -> tuple[list[dict], str, tuple[float, str]]:
    """The candidate as it places and fits (no step graph yet: simulating builds it): as
    given where it fits; else, where its device would fit but for its activations, from
    each group of ``tries`` (more micro-batches; a recomputation) the first that fits, its
    keys joined to the candidate's -- each simulated, so the faster ranks.  Returns the
    trials and, where none fits, the last one-line error and, of the tries refused for
    memory, the least short of fitting: (need / have, its ``field: message``; inf where
    none was)."""
    short = [(math.inf, "")]

    def refusal(trial: dict) -> tuple[str, bool]:
        """(one-line error or "", whether anything could still help: only activations over)."""
        try:
            plan(load(source, pairs + list(trial.items())), ops=False)
            return "", False
        except DoesNotFit as exc:
            short[0] = min(short[0], (exc.need / exc.have, f"{exc.field}: {exc.message}"))
            return str(exc), exc.need - exc.activations <= exc.have
        except ConfigError as exc:
            return str(exc), False
    error, helps = refusal(cand)
    if not error or not helps:
        return ([] if error else [cand]), error, short[0]
    found = []
    for group in tries:
        for extra in group:
            trial = {**cand, **extra}
            error, helps = refusal(trial)
            if not error:
                found.append(trial)
            if not error or not helps:
                break
    return found, "" if found else error, short[0]


def _loads(source: Source, pairs: list) -> bool:
    try:
        load(source, pairs)
        return True
    except ConfigError:
        return False


def point_key(values) -> tuple:
    """A sweep point's varied values as a dict key (lists and tables as their JSON)."""
    return tuple(json.dumps(v, sort_keys=True) if isinstance(v, (list, dict)) else v for v in values)


def _each(fn, argsets: list[tuple], jobs: int, mpi: bool):
    """(index, fn(*args)) for every args of ``argsets``, each as soon as it is done: here in
    order (jobs = 1), or from a process pool / MPI ranks as they finish."""
    if jobs <= 1 and not mpi:
        for n, args in enumerate(argsets):
            yield n, fn(*args)
        return
    with _pool(jobs, mpi) as pool:
        futures = {pool.submit(fn, *args): n for n, args in enumerate(argsets)}
        for fut in as_completed(futures):
            yield futures[fut], fut.result()


def _pool(jobs: int, mpi: bool):
    if mpi:
        from mpi4py import MPI
        # no other rank and no process manager to spawn workers from (MPI's singleton start,
        # not under mpiexec): the spawn fails in the pool's thread and the pool waits for ever
        launched = any(v in os.environ for v in ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE"))
        if MPI.COMM_WORLD.Get_size() < 2 and not launched:
            raise ConfigError("--mpi", "", "no MPI ranks to run points on and no mpiexec to spawn them: start it "
                                           "as mpiexec -n N python -m mpi4py.futures -m clustersim ... --mpi "
                                           "(N - 1 workers)")
        from mpi4py.futures import MPIPoolExecutor
        return MPIPoolExecutor()
    return ProcessPoolExecutor(max_workers=jobs)


PLAN_FILE = "plan.json"          # in the run's workdir: the Plan every rank loads


def execute_command(path: str | Path, overrides: Overrides, *, workdir: str | Path, ranks: int = 0,
                    device: str = "cpu", json_out: bool = False, trace: str | None = None,
                    extra: list[str] = ()) -> tuple[list[str], dict[str, str]]:
    """The ``mpiexec`` command line that runs the scenario's ranks (``executor.ranks``) and
    the environment to run it in (each rank's share of the cores' BLAS threads).
    Checks the input and plans here, once (a bad scenario is one line, not N), and saves
    the Plan as ``workdir/plan.json`` for the ranks to load: the caller keeps ``workdir``
    until the command has ended, then removes it.  Raises ConfigError."""
    from clustersim.core.planio import save_plan
    from executor.checks import check
    from executor.launch import mpiexec, rank_env
    sc = load(path, overrides)
    n = ranks or ranks_needed(sc)
    check(sc, n)
    plan_file = Path(workdir) / PLAN_FILE
    save_plan(plan(sc), plan_file)              # a plan that cannot be made fails here, once
    cmd = [str(mpiexec()), "-n", str(n), sys.executable, "-m", "executor.ranks", str(path), "--plan", str(plan_file),
           "--device", device]
    if json_out:
        cmd.append("--json")
    if trace:
        cmd += ["--trace", str(trace)]
    return cmd + list(extra), rank_env(n)


def execute(path: str | Path, overrides: Overrides = None, *, ranks: int = 0, device: str = "cpu",
            timeout_s: float = 1800.0) -> Result:
    """Runs the scenario for real on MPI ranks: the summary of ``clustersim execute
    --json``, the merged Trace of all ranks and the Plan they ran.  Raises ConfigError for
    bad input, RuntimeError with the ranks' last line when the job fails."""
    from clustersim.core.planio import load_plan
    with tempfile.TemporaryDirectory(prefix="clustersim-execute-") as tmp:
        trace = Path(tmp) / "trace.json"
        cmd, env = execute_command(path, overrides, workdir=tmp, ranks=ranks, device=device, json_out=True,
                                   trace=str(trace))
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines()
            raise RuntimeError(lines[-1] if lines else f"execute failed with exit code {proc.returncode}")
        return Result(json.loads(proc.stdout), Trace.load(trace), load_plan(Path(tmp) / PLAN_FILE))


def _toml(value: Any) -> str:
    """A Python value as a TOML value for ``--set`` (booleans lower case, lists and tables)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_toml_key(str(k))} = {_toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def _toml_key(key: str) -> str:
    """A table's key as TOML reads it back as one key: bare where it may be, else quoted
    (a device name's dot would make a dotted key)."""
    return key if key and all(c.isascii() and (c.isalnum() or c in "_-") for c in key) else json.dumps(key)


def calibrate(ranks: int, out: str | Path, models: list[str] | None = None) -> dict:
    """Measures this host for a job of ``ranks`` ranks and writes the topology to ``out``;
    ``models``: probe the ops of these (``probe.probes_for``: a light zoo model of no probe
    of its own is probed itself), else every probe's."""
    from clustersim.calibration.host import calibrate as measure
    from clustersim.core.models import ZOO
    if not 1 <= ranks <= 256:
        raise ConfigError("--ranks", str(ranks), "must be 1..256")
    for name in models or ():
        if name not in ZOO:
            raise ConfigError("--models", name, "not a built-in model (clustersim model list); a model file's ops "
                                                "are timed by every probe")
    return _write_host(out, ranks, measure(ranks, models=models))


def calibrate_gpus(out: str | Path) -> dict:
    """Measures this machine's GPUs with CuPy and writes the topology to ``out``.  Under
    ``mpiexec`` with one rank per host (``calibration.hosts.launched_ranks`` > 1) every host
    measures its own GPUs and rank 0 the path to each other host, and writes one topology of
    all of them; the other ranks return {}."""
    from clustersim.calibration.gpu import calibrate_gpus as measure, cupy_backend, gpu_topology_text
    from clustersim.calibration.hosts import launched_ranks
    from executor.backend import cupy_or_none
    cp = cupy_or_none()
    if cp is None:
        raise ConfigError("--gpu", "", "needs CuPy and a visible GPU (pip install 'clustersim[gpu]' on a GPU host)")
    if launched_ranks(os.environ) > 1:
        return _calibrate_hosts(cp, out)
    res = measure(cupy_backend(cp))
    write_atomic(out, gpu_topology_text(Path(out).stem, res))
    load_topology(str(out))                             # what we wrote must load
    return res


def _calibrate_hosts(cp, out: str | Path) -> dict:
    """``calibrate_gpus`` on one rank per host (see ``clustersim.calibration.hosts``)."""
    from mpi4py import MPI

    from clustersim.calibration.gpu import calibrate_gpus as measure, cupy_backend
    from clustersim.calibration.hosts import calibrate_hosts, hosts_topology_text, nccl_exchange
    from executor.gpu import local_rank
    comm = MPI.COMM_WORLD
    if comm.allreduce(local_rank(comm, MPI.COMM_TYPE_SHARED)[1] > 1, op=MPI.LOR):   # every rank decides alike
        raise ConfigError("--gpu", "", "under mpiexec, start one rank per host (mpiexec -ppn 1): each "
                                       "rank measures every GPU of its host")
    got = calibrate_hosts(comm, lambda: measure(cupy_backend(cp)), nccl_exchange(cp, comm))
    if got is None:
        return {}
    results, pairs = got
    write_atomic(out, hosts_topology_text(Path(out).stem, results, pairs))
    load_topology(str(out))
    return {**results[0], "hosts": len(results), "host_pairs": pairs}


def validate(path: str | Path, overrides: Overrides = None, *, topology: str | Path | None = None,
             repeats: int | None = None, against: Overrides = None, rounds: int | None = None, device: str = "cpu",
             calibrations: int | None = None) -> Result:
    """Simulates and executes the scenario and compares them (``clustersim validate``);
    without ``topology`` this host is calibrated first (``device`` "gpu": the ranks run on
    GPUs, ``topology`` from ``calibrate_gpus`` required).  With ``against`` (overrides on
    top of ``overrides``) it checks a speedup instead: ``validate_speedup``, on
    ``calibrations`` calibrations per rank count.  Defaults: ``repeats`` 3, ``rounds`` 5,
    ``calibrations`` 3; one given where its mode would not use it is refused."""
    from clustersim.compare.validate import validate as compare
    from executor.checks import check
    if against:
        if device != "cpu":                    # its runs and calibrations are this host's cores'
            raise ConfigError("--device", device, "a speedup check runs on this host's cores: not with --against")
        if repeats is not None:
            raise ConfigError("--repeats", str(repeats), "with --against each side runs --rounds times")
        return validate_speedup(path, overrides, against, topology=topology, rounds=5 if rounds is None else rounds,
                                calibrations=3 if calibrations is None else calibrations)
    for option, given in (("--rounds", rounds), ("--calibrations", calibrations)):
        if given is not None:                  # it would be ignored: say so
            raise ConfigError(option, str(given), "counts a speedup check's runs: only with --against")
    repeats = 3 if repeats is None else repeats
    items = [f"{k}={_toml(v)}" for k, v in _pairs(overrides)]
    sc = load(path, _on_own_topology(items))
    check(sc, ranks_needed(sc))
    if repeats < 1:
        raise ConfigError("--repeats", str(repeats), "must be >= 1")
    if device not in ("cpu", "gpu"):
        raise ConfigError("--device", device, "must be cpu or gpu")
    if topology:
        _calibrated_for(topology, ranks_needed(sc))
    if not topology:
        if device == "gpu":
            raise ConfigError("--topology", "", "a GPU run is compared on a topology from calibrate --gpu")
        topology = Path(tempfile.mkdtemp()) / "this-host.toml"
        calibrate_for(ranks_needed(sc), topology, [sc.model.name])
    return Result(compare(str(path), str(topology), items, repeats, device))


def validate_speedup(path: str | Path, overrides: Overrides, against: Overrides, *,
                     topology: str | Path | None = None, rounds: int = 5, calibrations: int = 3) -> Result:
    """B (``overrides`` then ``against``) against A (``overrides``): predicted and measured
    speedup, A and B run alternately ``rounds`` times each (``clustersim validate --against``,
    ``clustersim.compare.validate.speedup``).  Without ``topology`` this host is calibrated
    ``calibrations`` times per rank count the two sides need, the counts alternating (1 2,
    2 1, ...), and each side is predicted on each of its own (decision 039)."""
    from clustersim.compare.validate import speedup
    from executor.checks import check
    items = [f"{k}={_toml(v)}" for k, v in _pairs(overrides)]
    more = [f"{k}={_toml(v)}" for k, v in _pairs(against)]
    if rounds < 1:
        raise ConfigError("--rounds", str(rounds), "must be >= 1")
    if calibrations < 1:
        raise ConfigError("--calibrations", str(calibrations), "must be >= 1")
    ranks, models = {}, set()
    for side, sc in (("a", load(path, _on_own_topology(items))), ("b", load(path, _on_own_topology(items + more)))):
        ranks[side] = ranks_needed(sc)
        models.add(sc.model.name)
        check(sc, ranks[side])
    counts = sorted(set(ranks.values()))
    if topology:
        for side in ("a", "b"):
            _calibrated_for(topology, ranks[side], f" (side {side.upper()})")
        files = {n: [Path(topology)] for n in counts}
    else:
        files: dict[int, list[Path]] = {n: [] for n in counts}
        where = Path(tempfile.mkdtemp())
        done = []
        for k in range(calibrations):
            for n in counts if k % 2 == 0 else counts[::-1]:
                files[n].append(where / f"this-host-{n}-ranks-{k}.toml")
                done.append((files[n][-1], n, calibrate_for(n, files[n][-1], sorted(models))))
        _share_noise(done)
    return Result(speedup(str(path), items, more, {side: [str(f) for f in files[n]] for side, n in ranks.items()},
                          rounds))


def suite_speedup(a_rounds: list[dict], b_rounds: list[dict]) -> dict:
    """B's speedup over A from two cases validated in the same rounds (``make validate``)."""
    from clustersim.compare.validate import suite_speedup as figures
    return figures(a_rounds, b_rounds)


def calibrate_for(ranks: int, out: str | Path, models: list[str]) -> dict:
    """``calibrate`` with the in-context op probes of ``models`` only (``probe.probes_for``: a
    light zoo model of no probe is probed itself; all the probes for a model file): a third
    of the time for mlp-digits alone."""
    from clustersim.calibration.host import calibrate as measure
    return _write_host(out, ranks, measure(ranks, models=models))


def _calibrated_for(topology: str | Path, ranks: int, side: str = "") -> None:
    """A ConfigError where ``topology`` is a host calibration (``calibrate``: a device per
    rank with the executor's measured step set-up among its op costs; a hand-written
    topology's send and receive costs do not count) for another number of ranks than the run takes: a rank's
    cores, BLAS threads and op costs depend on how many share the host, and a rank beyond
    them would be placed on another's device."""
    topo = load_topology(str(topology))
    hosts = [d for d in topo.devices.values() if d.kind == "cpu" and "step" in d.op_costs]    # what calibrate writes
    if hosts and len(hosts) != ranks:
        raise ConfigError("--topology", str(topology), f"was calibrated for {len(hosts)} ranks; the run{side} takes "
                                                       f"{ranks}: calibrate --ranks {ranks}, or leave --topology out "
                                                       "(validate then calibrates for each rank count)")


def _on_own_topology(items: list[str]) -> list[str]:
    """``items`` for loading a scenario on its own topology, before it is calibrated: with the
    replay of a calibrated topology's noise series (``faults.host_noise``) switched off there,
    every other item checked as given."""
    from clustersim.core.scenario import parse_set
    for key, value in parse_set(items):
        if key == "faults.host_noise" and not isinstance(value, bool):
            raise ConfigError("--set", key, f"must be true or false, got {value!r}")
    return [*items, "faults.host_noise=false"]


def _share_noise(calibrations: list[tuple[Path, int, dict]]) -> None:
    """Rewrites each calibration's topology with the noise of all of them, its cores' windows
    pooled (``hostspeed.pooled``) and mapped onto its ranks: both sides of a speedup check
    then replay one sample of the host's noise, not two taken minutes apart, whose spells
    differ more than the sides do (docs/decisions/048)."""
    from clustersim.calibration.hostspeed import noise_series, pooled
    measured = [res for _, _, res in calibrations if res and res.get("core_slowdowns")]
    if len(measured) == len(calibrations) > 1:
        shared = pooled([res["core_slowdowns"] for res in measured])
        for out, ranks, res in calibrations:
            _write_host(out, ranks, {**res, "noise": noise_series(shared, ranks)})


def _write_host(out: str | Path, ranks: int, res: dict) -> dict:
    """A host calibration ``res`` written as a topology to ``out`` (loaded back: what we
    wrote must load)."""
    from clustersim.calibration.host import topology_text
    write_atomic(out, topology_text(Path(out).stem, ranks, res["cores"], res["compute"],
                                    res["memory_bandwidth_bytes_per_s"], res["mpi"], res["op_costs"],
                                    res["cache_bytes"], res.get("noise")))
    load_topology(str(out))
    return res


def collective(topology: str | Path, op: str = "allreduce", algo: str = "auto", sizes: Iterable[int] = (2**20,),
               *, gpus: int = 0, machines: int = 0, network: str = "flow", protocol: str = "",
               nccl: str = "") -> list[dict]:
    """nccl-tests-style rows (``bytes``, ``time_s``, ``algbw_gbps``, ``busbw_gbps``, ``algo``,
    ``protocol``) of ``op`` by ``algo`` (``auto``: NCCL's tuner picks per size) over the first
    ``gpus`` compute devices (all by default); ``nccl``: the version whose kernels lay out
    NVLS chunks (default: the tuner's, ``nccl.VERSION``)."""
    from clustersim.core.collective import ALGOS, OPS
    from clustersim.core.nccl import PROTOCOLS
    from clustersim.core.scenario import NETWORKS
    from clustersim.core.topology import NoRoute
    from sim.collectives import table
    sizes = list(sizes)
    for option, value, choices in (("--op", op, OPS), ("--algo", algo, ALGOS), ("--network", network, NETWORKS),
                                   ("--protocol", protocol, ("",) + PROTOCOLS)):
        if value not in choices:
            raise ConfigError(option, str(value), f"one of {', '.join(c for c in choices if c)}")
    if op == "alltoall" and protocol not in ("", "Simple"):
        raise ConfigError("--protocol", protocol, "alltoall runs as NCCL's point-to-point sends, Simple only")
    if not sizes or any(isinstance(b, bool) or not hasattr(b, "__index__") or b < 1 for b in sizes):
        raise ConfigError("--bytes", str(sizes), "sizes are whole numbers of bytes >= 1")
    topo = load_topology(str(topology), Path("."), machines or None, ("--topology", ""))
    devices = topo.compute_devices()
    if len(devices) < 2:
        raise ConfigError("--topology", str(topology), f"topology {topo.name} has {len(devices)} compute device: "
                                                      f"a collective needs 2 or more (cluster.machines, --machines)")
    n = gpus or len(devices)
    if not 2 <= n <= len(devices):
        raise ConfigError("--gpus", str(gpus), f"must be 2..{len(devices)} for topology {topo.name}")
    if protocol and any(topo.devices[d].kind != "gpu" for d in devices[:n]):
        raise ConfigError("--protocol", protocol, f"NCCL's protocols run on GPUs; topology {topo.name}'s "
                          f"devices are {', '.join(sorted({topo.devices[d].kind for d in devices[:n]}))}")
    try:
        supported(nccl or NCCL_VERSION)
    except ValueError as exc:
        raise ConfigError("--nccl", nccl, str(exc)) from None
    try:
        return table(topo, op, algo, sizes, devices[:n], network, protocol, nccl or NCCL_VERSION)
    except NoRoute as exc:                             # the file as written: say where the ends are
        raise NoRoute(f"{exc}{topo.machines_note(*exc.ends) if exc.ends else ''}") from None
    except ValueError as exc:
        raise ConfigError("--algo", algo, str(exc)) from None


def published(directory: str | Path | None = None, *, jobs: int = 1) -> list[dict]:
    """Every published-measurement case (``scenarios/published``, installed with the package
    as ``clustersim.builtin_scenarios``) predicted, in file-name order, ``jobs`` cases at a
    time: rows with ``name``, ``metric``, ``unit``, ``predicted``, ``published``,
    ``error_pct``, ``source``."""
    from clustersim.compare.published import case_files, row
    paths = case_files(Path(directory) if directory else builtin_scenario_folder() / "published")
    rows = dict(_each(row, [(path,) for path in paths], jobs, False))
    return [rows[n] for n in range(len(paths))]


def published_score(rows: list[dict]) -> dict:
    """Median and worst |error| of the cases not fitted."""
    from clustersim.compare.published import score
    return score(rows)


def import_onnx(path: str | Path, out: str | Path | None = None) -> Model:
    """The clustersim model of an ONNX file (per sample: the batch is the scenario's
    ``model.batch_size``, as with ``model.file = "x.onnx"``); ``out`` also writes it as a
    model TOML, whole or not at all.  Raises ConfigError naming the file and the node."""
    from clustersim.core.onnx_import import load_onnx, model_toml
    model = load_onnx(Path(path))
    if out is not None:
        write_atomic(out, model_toml(model))
    return model


def combine(rounds: list[dict]) -> dict:
    """Several ``validate`` results of one case (rounds) as one: medians of predictions and runs."""
    from clustersim.compare.validate import combine as merge
    return merge(rounds)


def save_figure(fig, path: str | Path) -> None:
    """Writes a matplotlib figure whole or not at all, and closes it."""
    from clustersim.plots import save_figure as save
    save(fig, path)
