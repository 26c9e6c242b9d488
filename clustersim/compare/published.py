"""Predictions against published measurements: ``scenarios/published/*.toml``.

Each file is one public measurement: a ``[reference]`` table (source, hardware, software,
metric, unit, value; ``fitted = true`` when the figure set a model parameter, scored apart;
``note``) and what to predict, either
- ``[collective]``: topology, machines, op, algo (what the measurement ran: ``auto`` for
  NCCL's default), bytes, nccl (the NCCL version it ran, where the model depends on it:
  2.20.3 unless given); the metric is ``busbw_gbps`` or ``time_us`` of that size; or
- ``[scenario]``: file (beside this one), ``set`` (dotted keys), metric ``samples_per_s``,
  ``step_time_s``, ``speedup`` (samples/s over the same scenario with ``baseline`` set) or
  ``tflops_per_gpu``: the publication's own count of a step's FLOPs (``flops_per_step``, as
  its formula gives it: e.g. Megatron-LM's 96 B s l h^2 (1 + s / 6h + V / 16lh)) over the
  predicted step time and the devices the step uses, so that the prediction is scored in
  the measurement's unit whatever FLOPs the simulator itself counts.
A case's error is 100 x (predicted - published) / published.
"""
from __future__ import annotations

import statistics
import tomllib
from pathlib import Path

from clustersim.core import nccl
from clustersim.core.config import ConfigError, Table
from clustersim.core.collective import ALGOS, OPS
from clustersim.core.plan import plan
from clustersim.core.scenario import apply_overrides, read_toml, scenario_from_dict
from clustersim.core.topogen import load_topology
from sim import collectives
from sim.engine import simulate

COLLECTIVE_METRICS = ("busbw_gbps", "time_us")
SCENARIO_METRICS = ("samples_per_s", "step_time_s", "speedup", "tflops_per_gpu")


def load_case(path: Path) -> dict:
    """One case file read and checked (ConfigError naming the file and field)."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(str(path), "", f"cannot read: {exc}") from None
    top = Table(data, str(path))
    ref = top.table("reference")
    case = {"name": top.str("name", path.stem), "file": str(path),
            "source": ref.str("source"), "hardware": ref.str("hardware"), "software": ref.str("software", ""),
            "published": ref.float("value", positive=True), "unit": ref.str("unit"),
            "fitted": ref.bool("fitted", False), "note": ref.str("note", "")}
    ref.str("metric")
    ref.done()
    if top.has("collective") == top.has("scenario"):
        raise top.error("collective", "give exactly one of [collective] or [scenario]")
    if top.has("collective"):
        c = top.table("collective")
        case.update(kind="collective", topology=c.str("topology"), machines=c.int("machines", 0, lo=0),
                    op=c.str("op", "allreduce", choices=OPS), algo=c.str("algo", "auto", choices=ALGOS),
                    bytes=c.int("bytes", lo=1), gpus=c.int("gpus", 0, lo=0), nccl=c.str("nccl", nccl.VERSION),
                    metric=c.str("metric", "busbw_gbps", choices=COLLECTIVE_METRICS))
        try:
            nccl.supported(case["nccl"])
        except ValueError as exc:
            raise c.error("nccl", str(exc)) from None
        c.done()
    else:
        s = top.table("scenario")
        case.update(kind="scenario", scenario=str(path.parent / s.str("file")),
                    set=dict(s.raw("set", {})), baseline=dict(s.raw("baseline", {})),
                    metric=s.str("metric", "samples_per_s", choices=SCENARIO_METRICS))
        if case["metric"] == "tflops_per_gpu":
            case["flops_per_step"] = s.float("flops_per_step", positive=True)
        s.done()
    top.done()
    return case


def _simulated(path: str, overrides: dict) -> dict:
    from clustersim.core.metrics import summarize
    sc = scenario_from_dict(apply_overrides(read_toml(Path(path)), list(overrides.items())), path)
    p = plan(sc)
    res = simulate(p)
    if res.stalled_at_s is not None:
        raise ConfigError(path, "", f"stalled: {res.stalled_reason}")
    return summarize(p, res, None)


def predict(case: dict) -> float:
    if case["kind"] == "collective":
        topo = load_topology(case["topology"], Path(case["file"]).parent, case["machines"] or None)
        devices = topo.compute_devices()
        devices = devices[:case["gpus"]] if case["gpus"] else devices
        [row] = collectives.table(topo, case["op"], case["algo"], [case["bytes"]], devices, version=case["nccl"])
        return row["busbw_gbps"] if case["metric"] == "busbw_gbps" else row["time_s"] * 1e6
    run = _simulated(case["scenario"], case["set"])
    if case["metric"] == "speedup":
        return run["samples_per_s"] / _simulated(case["scenario"], {**case["set"], **case["baseline"]})["samples_per_s"]
    if case["metric"] == "tflops_per_gpu":
        return case["flops_per_step"] / (run["devices"] * run["step_time_s"]) / 1e12
    return run[case["metric"]]


def case_files(directory: Path) -> list[Path]:
    """The case files of ``directory``, sorted by name (ConfigError where there are none)."""
    paths = sorted(Path(directory).glob("*.toml"))
    if not paths:
        raise ConfigError(str(directory), "", "no published-measurement cases (*.toml) there")
    return paths


def row(path: Path) -> dict:
    """One case predicted: ``name``, ``metric``, ``unit``, ``predicted``, ``published``,
    ``error_pct``, ``source``, ``hardware``, ``fitted``, ``note``."""
    case = load_case(path)
    predicted = predict(case)
    return {"name": case["name"], "metric": case["metric"], "unit": case["unit"], "predicted": predicted,
            "published": case["published"], "error_pct": 100 * (predicted - case["published"]) / case["published"],
            "source": case["source"], "hardware": case["hardware"], "fitted": case["fitted"], "note": case["note"]}


def score(rows: list[dict]) -> dict:
    """Median and worst |error| over the cases not fitted (and how many there are)."""
    errors = [abs(r["error_pct"]) for r in rows if not r["fitted"]]
    return {"cases": len(errors), "median_abs_error_pct": statistics.median(errors) if errors else 0.0,
            "worst_abs_error_pct": max(errors, default=0.0)}
