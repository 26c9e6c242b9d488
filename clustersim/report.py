"""Human-readable tables and summaries of results (no plotting: ``clustersim.plots``)."""
from __future__ import annotations

import statistics


def si(value: float, unit: str) -> str:
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def seconds(value: float) -> str:
    for factor, unit in ((86400.0, "days"), (3600.0, "h"), (1.0, "s"), (1e-3, "ms"), (1e-6, "us")):
        if abs(value) >= factor:
            return f"{value / factor:.4g} {unit}"
    return f"{value * 1e9:.4g} ns"


def _failures_ahead(s: dict) -> list[str]:
    """The expected cost of failures and checkpoints over the training (``reliability``), or
    that time to train leaves failures out where no closed form holds."""
    if s.get("failures_in_time_to_train") is False:
        return ["  failures ahead   not in time to train or cost: the expected overhead is worked out for "
                "sync jobs that restart from checkpoints"]
    if "failure_overhead" not in s:
        return []

    def times(f) -> str:
        return "never finishes on average" if f is None else f"expected x{f:.4g} the failure-free time"
    stretched = " (time to train and cost are so stretched)" if "time_to_train_s" in s else ""
    if "job_mtbf_s" not in s:                           # checkpoints, no failures
        return [f"  checkpoints ahead {times(s['failure_overhead'])}, writes of "
                f"{seconds(s['checkpoint_write_s'])} included{stretched}"]
    best = s["checkpoint_every_best"]
    return [f"  failures ahead   job MTBF {seconds(s['job_mtbf_s'])}, recovery {seconds(s['recovery_s'])}: "
            f"{times(s['failure_overhead'])}, checkpoints included{stretched}; "
            + ("no checkpoint interval lets it finish (a recovery outlasts the time between failures)"
               if best is None else (f"a checkpoint every {best} step(s): " if best else "no checkpoint at all: ")
               + times(s["failure_overhead_best"]))]


def _stages(s: dict) -> str:
    """A pipeline's stages (and their slots, where a stage is a tensor split's), micro-batches
    and schedule, for the summary's split line; without a pipeline, its micro-batches where a
    replica's batch runs in several (gradient accumulation), else ""."""
    stages, micro = s.get("pipeline_stages", 1), s.get("micro_batches", 1)
    if stages <= 1:              # layerwise's micro-batches flow through its layer groups
        accumulated = micro > 1 and s.get("split") != "layers"
        return f" ({micro} micro-batches, gradients accumulated)" if accumulated else ""
    slots = "" if s["split"] == "layers" else f" of {s['model_parallel'] // stages} slots"
    return f" ({stages} stages{slots}, {micro} micro-batch{'es' if micro > 1 else ''}, {s['schedule']})"


def _exchange(s: dict) -> str:
    """How the replicas exchange: "sync by allreduce", "downpour via ps", "layerwise"."""
    if s["algorithm"] == "sync":
        return f"sync by {s['sync']}"
    return s["algorithm"] + (f" via {s['sync']}" if s["sync"] != "none" else "")


def summary_text(s: dict) -> str:
    lines = [
        f"{s['name']}: {s['model']} ({si(s['parameters'], 'params')}) on {s['topology']}",
        f"  split {s['split']} x{s['model_parallel']}{_stages(s)}, replicas {s['replicas']}, {_exchange(s)}, "
        f"batch {s['batch_size']}/replica {s['dtype']}, network model {s['network']}",
        "",
    ]
    if "stalled_at_s" in s:
        lines += [f"  STALLED          at {seconds(s['stalled_at_s'])} after {s['steps']} steps: {s['stalled_reason']}",
                  "                   (no step time or throughput: the job did not run to its end)"]
    else:
        lines += [f"  step time        {seconds(s['step_time_s'])}",
                  f"  throughput       {s['samples_per_s']:.4g} samples/s"]
    if "speedup" in s:
        lines.append(f"  speedup          {s['speedup']:.3g}x against one device "
                     f"({seconds(s['one_device_step_time_s'])} per step"
                     + (f"; hypothetical: {s['one_device_short']}" if "one_device_short" in s else "") + ")")
    if "time_to_train_s" in s:
        extra = [f"${s['cost_usd']:,.2f} on {s['machines_used']} machine(s)"] if "cost_usd" in s else []
        extra += [f"{s['energy_kwh']:,.4g} kWh"] if "energy_kwh" in s else []
        extra += ["meets the target" if s["meets_target"] else "MISSES the target"] if "meets_target" in s else []
        lines.append(f"  to train         {seconds(s['time_to_train_s'])} ({seconds(s['epoch_time_s'])} an epoch)"
                     + (": " + ", ".join(extra) if extra else ""))
    lines += _failures_ahead(s)
    lines += [f"  note             {n}" for n in s.get("notes", ())]
    if "staleness_mean" in s:
        lines.append(f"  staleness        mean {s['staleness_mean']:.3g}, p90 {s['staleness_p90']:.3g}, "
                     f"max {s['staleness_max']} (shard updates missed)")
    if "shard_updates_per_s" in s:
        lines.append("  shards           " + ", ".join(f"{u:.4g}/s" for u in s["shard_updates_per_s"]) +
                     "  busy " + ", ".join(f"{v:.0%}" for v in s["shard_utilisation"].values()))
    if "lost_work_samples" in s:
        lines.append(f"  failures         {', '.join(s['failed_devices'] + s.get('failed_links', [])) or 'none named'}; "
                     f"{s['lost_work_samples']} samples of work lost"
                     + (f"; {s['run_samples_per_s']:.4g} samples/s over the whole run" if "run_samples_per_s" in s
                        and "stalled_at_s" not in s else ""))
    elif "run_samples_per_s" in s:                     # checkpoints without failures
        lines.append(f"  checkpoints      {s['run_samples_per_s']:.4g} samples/s over the whole run, writes included")
    if "accuracy" in s:
        tta = s["time_to_accuracy_s"]
        loss = "diverged" if s["loss"] is None else f"{s['loss']:.4g}"
        lines.append(f"  accuracy         {s['accuracy']:.2%} (loss {loss}); "
                     + (f"{s['target_accuracy']:.0%} reached by {seconds(tta)} (evaluated every "
                        f"{seconds(s['time_to_accuracy_resolution_s'])})" if tta is not None
                        else f"{s['target_accuracy']:.0%} not reached"))
    per = "per step" if s["steps"] else "in all, no step ended"      # a stall before the first: totals
    lines += [f"  traffic          {si(s['bytes_per_step'], 'B')} {per}",
              f"  simulated        {s['steps']} steps{' per replica' if s['algorithm'] not in ('sync', 'sandblaster') else ''}, {seconds(s['sim_time_s'])} in {s['sim_events']} events, "
              f"{s['wall_s']:.3g} s wall", "", f"  time by phase (device- or transfer-seconds {per}):"]
    for phase, t in sorted(s["time_by_phase_s"].items(), key=lambda kv: -kv[1]):
        lines.append(f"    {phase:<12} {seconds(t)}")
    util = s["device_utilisation"]
    if util:
        vals = sorted(util.values())
        lines.append(f"  device busy      min {vals[0]:.1%}  median {statistics.median(vals):.1%}  max {vals[-1]:.1%}"
                     f"  over {len(vals)} devices")
    if s["link_utilisation"]:
        lines.append("  busiest links:")
        for link, u in list(s["link_utilisation"].items())[:5]:
            lines.append(f"    {link:<32} {u:.1%}")
    return "\n".join(lines)


def point_notes(points: list[dict]) -> list[str]:
    """The distinct notes of a sweep's or search's points (``metrics.caveats``), each once
    with the count of points it holds for, as comment lines under their table."""
    seen: dict[str, int] = {}
    for p in points:
        for n in p.get("notes", ()):
            seen[n] = seen.get(n, 0) + 1
    return [f"# note ({k} of {len(points)}): {n}" for n, k in seen.items()]


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """Fixed-width table; ``columns`` is [(key, header)]."""
    cells = [[h for _, h in columns]] + [[_fmt(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells)


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)
