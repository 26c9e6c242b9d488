"""Numbers a user reads off a run, computed from the trace (and the plan for context)."""
from __future__ import annotations

import dataclasses
import statistics
from collections import defaultdict

from .engine import SimResult, simulate
from .plan import Plan, plan


def summarize(p: Plan, res: SimResult, baseline_step_s: float | None = None) -> dict:
    """JSON-ready summary: DESIGN.md's keys (step_time_s, samples_per_s, sim_time_s,
    sim_events, wall_s) plus utilisation, time by phase and speedup against one device."""
    sc = p.scenario
    tr = res.trace
    steps = tr.step_times()
    step_s = statistics.median(steps) if steps else 0.0
    samples = sc.batch_size * p.replicas
    makespan = res.sim_time_s or 1.0
    busy = tr.device_busy()
    by_phase: dict[str, float] = defaultdict(float)
    for s in tr.spans:
        by_phase[s.phase] += s.duration_s
    link_bytes = tr.link_bytes()
    cap = sc.topology.capacity
    link_util = {l: b / (cap[tuple(l.split(">"))] * makespan) for l, b in link_bytes.items()}
    out = {
        "name": sc.name, "topology": sc.topology.name, "model": sc.model.name,
        "parameters": sc.model.params, "batch_size": sc.batch_size, "dtype": sc.dtype,
        "model_parallel": p.slots, "split": sc.parallel.split, "replicas": p.replicas,
        "ps_shards": sc.parallel.ps_shards, "sync": p.sync, "algorithm": sc.training.algorithm,
        "network": sc.network, "steps": res.steps,
        "step_time_s": step_s,
        "samples_per_s": samples / step_s if step_s else 0.0,
        "sim_time_s": res.sim_time_s, "sim_events": res.sim_events, "wall_s": res.wall_s,
        "device_utilisation": {d: busy.get(d, 0.0) / makespan for row in p.devices for d in row},
        "link_utilisation": dict(sorted(link_util.items(), key=lambda kv: -kv[1])[:10]),
        "bytes_per_step": sum(s.bytes for s in tr.spans if s.kind == "transfer") / max(res.steps, 1),
        "time_by_phase_s": {k: v / max(res.steps, 1) for k, v in sorted(by_phase.items())},
    }
    if baseline_step_s:
        out["one_device_step_time_s"] = baseline_step_s
        out["speedup"] = out["samples_per_s"] / (sc.batch_size / baseline_step_s)
    return out


def one_device_step_time(p: Plan) -> float:
    """Step time of the same model and per-replica batch on the first device alone
    (memory not checked: the baseline is hypothetical when the model does not fit)."""
    sc = p.scenario
    solo = dataclasses.replace(sc, parallel=dataclasses.replace(sc.parallel, model_parallel=1, replicas=1,
                                                                ps_shards=0, micro_batches=1))
    res = simulate(plan(solo, check_memory=False), steps=1)
    return res.sim_time_s
