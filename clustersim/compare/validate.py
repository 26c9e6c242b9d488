"""Predictions checked against real runs (``clustersim validate``).

One Plan: simulated on the calibrated topology of this host, and executed for real
``repeats`` times.  Compared: the step time (the median of the measured runs'
``step_time_s`` against the simulated one: for sync and Sandblaster a median step, for
replicas that step alone -- Downpour, DC-ASGD, SSP, local SGD -- in both runners each
replica's period with its waits, median over replicas,
``clustersim.core.metrics.replica_period``) and, on the first rank's device, the time per
step spent in each phase (forward, backward, transfers, updates, waits: the rest of that
step time), and two steps of each timeline for the plot.  Errors are (predicted -
measured) / measured in percent; the spread of the measurements ((max - min) / median)
says how much of an error is noise.

Calibration times the ops where the host ran at its quiet speed (``clustersim.calibration.hostspeed``):
the prediction is the step on this host without its neighbours.  Each run's quiet step
(``quiet_step_time_s``: the 10th percentile of its 50 ms windows' median steps,
``clustersim.core.metrics.quiet_time``) is what it is compared with (``quiet_error_pct``);
the run's step time holds however much of it the neighbours slowed.  Why, and the
predictions tried and dropped: docs/decisions/004-quiet-host-calibration.md.
"""
from __future__ import annotations

import dataclasses
import json
import math
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from sim.engine import simulate
from clustersim.core.metrics import relays, summarize, traffic_per_step
from clustersim.core.plan import plan, used_devices
from clustersim.core.scenario import load_scenario
from clustersim.core.trace import Trace

from clustersim.core.schedule import ranks_needed

PHASES = {"fwd": "forward", "bwd": "backward", "update": "update", "activation": "transfers", "halo": "transfers",
          "gradient": "transfers", "reduction": "transfers", "stage": "transfers", "allreduce": "transfers",
          "push": "transfers", "fetch": "transfers"}


NOISE_WINDOW_STEPS = 40     # quiet steps a replayed noise window holds in a speedup prediction (decision 048)
MAX_NOISE_STEPS = 2_000_000   # steps such a prediction may replay


def error_pct(predicted: float, measured: float) -> float | None:
    """(predicted - measured) / measured x 100; None (JSON's null) where nothing was
    measured and something predicted (an op the executor has no span for: JSON has no inf)."""
    if measured == 0:
        return 0.0 if predicted == 0 else None
    return (predicted - measured) / measured * 100.0


def _row(predicted: float, measured: float) -> dict:
    return {"predicted_s": predicted, "measured_s": measured, "error_pct": error_pct(predicted, measured)}


def spread_pct(values: list[float]) -> float:
    return (max(values) - min(values)) / statistics.median(values) * 100.0 if values else 0.0


def phase_times(spans, device: str) -> dict[str, float]:
    """Seconds per step by phase on ``device`` (its compute spans and the transfers it
    sends): each phase's total in every step, the median over the steps (as the step time
    is a median, so a first step's page faults count in neither).  ``spans``: (name,
    phase, where, start, duration, step); an executed message's two halves are made one
    first (``messages``)."""
    per_step: dict[str, dict[int, float]] = defaultdict(lambda: defaultdict(float))
    steps = set()
    for _name, phase, where, _start, dur, step in messages(spans):
        steps.add(step)
        group = PHASES.get(phase)
        if group and (where == device or where.startswith(device + "->")):
            per_step[group][step] += dur
    steps.discard(-1)
    return {g: statistics.median(by_step.get(s, 0.0) for s in steps) for g, by_step in per_step.items()} if steps else {}


def waits(step_s: float, phases: dict[str, float]) -> float:
    """What of a step the device spends on none of its phases: waiting for a message, a
    shard, a collective's last member (the step's median less the phases' medians, at least 0)."""
    return max(0.0, step_s - sum(v for k, v in phases.items() if k != "waits"))


def messages(spans) -> list[tuple]:
    """An executed message between slots is two spans, "<name> send" on the sender and
    "<name> recv" on the receiver, from its previous op's end to the message's arrival
    (waiting for the sender included).  As the simulator counts a message (the sender's
    cost, the wire, the receiver's), it is the send and the part of the receive after the
    send was done; a receiver that came late pays only its own copy.  The halves pair up in
    order per name, route and step (the spans share one clock: ``executor.comm.common_start``)."""
    halves: dict[tuple, dict[str, list]] = defaultdict(lambda: {"send": [], "recv": []})
    out = []
    for sp in spans:
        name, phase, where, start, dur, step = sp
        base, _, part = name.rpartition(" ")
        if part in ("send", "recv"):
            halves[(base, phase, where, step)][part].append((start, dur))
        else:
            out.append(sp)
    for (base, phase, where, step), h in halves.items():
        sends, recvs = sorted(h["send"]), sorted(h["recv"])
        for (s0, sd), (r0, rd) in zip(sends, recvs):
            after = max(0.0, r0 + rd - max(r0, s0 + sd))
            out.append((base, phase, where, s0, sd + after, step))
        for start, dur in sends[len(recvs):] + recvs[len(sends):]:
            out.append((base, phase, where, start, dur, step))
    return out


def op_medians(spans, stat=statistics.median) -> dict[tuple[str, str], float]:
    """(where, name) -> the median duration (or ``stat`` of the durations) of that op or
    message over the run's steps after its first (the warm-up), messages counted as
    ``messages`` pairs them: what ``--ops`` sets beside each other to find the ops a
    prediction misses."""
    spans = messages(spans)
    first = min((sp[5] for sp in spans if sp[5] >= 0), default=0)
    later = any(sp[5] > first for sp in spans)
    times: dict[tuple[str, str], list[float]] = defaultdict(list)
    for name, _phase, where, _start, dur, step in spans:
        if step > first or (step == first and not later):
            times[(where, name)].append(dur)
    return {key: stat(ts) for key, ts in times.items()}


def op_rows(predicted: dict[tuple[str, str], float], runs: list[dict[tuple[str, str], float]],
            run_means: list[dict[tuple[str, str], float]] = ()) -> list[dict]:
    """A row per op or message in the prediction or the runs: its predicted median, the median
    of the runs' medians (0 where a side has none), the error, and with ``run_means`` the
    median of the runs' means (``measured_mean_s``: an op whose mean stands well above its
    median has a long tail, which a sum of medians leaves out; decision 047)."""
    rows = []
    for where, name in sorted(set(predicted) | {key for run in runs for key in run}):
        key = (where, name)
        measured = [run[key] for run in runs if key in run]
        row = {"where": where, "op": name,
               **_row(predicted.get(key, 0.0), statistics.median(measured) if measured else 0.0)}
        if run_means:
            means = [run[key] for run in run_means if key in run]
            row["measured_mean_s"] = statistics.median(means) if means else 0.0
        rows.append(row)
    return rows


def timeline(spans, steps: int = 2) -> list[list]:
    """[where, phase, start, duration] of the spans of ``steps`` steps from the middle of a
    run (start from the first one's start), for the plot of predicted and measured
    timelines; ``spans`` as for ``phase_times``."""
    spans = messages(spans)
    numbers = sorted({sp[5] for sp in spans if sp[5] >= 0})
    if not numbers:
        return []
    first = numbers[len(numbers) // 2 - (steps - 1) // 2 if len(numbers) > steps else 0]
    shown = [sp for sp in spans if first <= sp[5] < first + steps]
    t0 = min(sp[3] for sp in shown)
    return [[where, phase, start - t0, dur] for _name, phase, where, start, dur, _step in sorted(shown, key=lambda sp: sp[3])]


def pieces(trace: Trace) -> list[tuple]:
    """A trace's spans as (name, phase, where, start, duration, step)."""
    return [(s.name, s.phase, s.where, s.start_s, s.duration_s, s.step) for s in trace.spans]


def validate(scenario: str, topology: str, set_items: list[str], repeats: int = 3, device: str = "cpu") -> dict:
    """``set_items``: ``key=value`` overrides, applied to both the simulation and the runs;
    ``device``: where the runs' ranks compute (cpu, or gpu: one GPU each)."""
    from clustersim.core.scenario import parse_set
    items = _side_items(set_items, topology)
    sc = load_scenario(scenario, parse_set(items))
    p = plan(sc)
    res = simulate(p)
    summary = summarize(p, res)
    first = p.devices[0][0]
    sim_spans = pieces(res.trace)
    relayed = relays(sc.topology)
    traffic = {"predicted": traffic_per_step(res.trace, relayed)}
    predicted_phases = phase_times(sim_spans, first)
    predicted_phases["waits"] = waits(summary["step_time_s"], predicted_phases)
    measured, quiet, phases, rates, ops, op_means = [], [], [], [], [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            trace = Path(tmp) / "t.json"
            out = execute_side(scenario, items, "--trace", str(trace), "--device", device)
            measured.append(out["step_time_s"])
            rates.append(out["samples_per_s"])
            quiet.append(out["quiet_step_time_s"])
            run_trace = Trace.load(trace)
            run_spans = pieces(run_trace)
            traffic["measured"] = traffic_per_step(run_trace, relayed)
            ph = phase_times(run_spans, first)
            ph["waits"] = waits(out["step_time_s"], ph)
            phases.append(ph)
            ops.append(op_medians(run_spans))
            op_means.append(op_medians(run_spans, statistics.fmean))
    meas = statistics.median(measured)
    table = {}
    for group in sorted(set(predicted_phases) | {g for ph in phases for g in ph}):
        m = statistics.median(ph.get(group, 0.0) for ph in phases)
        pr = predicted_phases.get(group, 0.0)
        table[group] = _row(pr, m)
    return {"scenario": sc.name, "file": scenario, "topology": topology, "ranks": ranks_needed(sc),
            "unmeasured_ops": unmeasured_ops(p),
            "predicted_step_time_s": summary["step_time_s"], "measured_step_time_s": meas,
            "error_pct": error_pct(summary["step_time_s"], meas), "measured_runs_s": measured,
            "predicted_samples_per_s": summary["samples_per_s"], "measured_runs_samples_per_s": rates,
            "spread_pct": spread_pct(measured), "phases": table, "ops": op_rows(op_medians(sim_spans), ops, op_means),
            "timelines": {"predicted": timeline(sim_spans), "measured": timeline(run_spans)}, "traffic": traffic,
            **quiet_row(summary["step_time_s"], quiet)}


def quiet_row(predicted: float, quiet_runs: list[float]) -> dict:
    """The prediction against the runs' quiet steps (their median), with their spread."""
    q = statistics.median(quiet_runs)
    return {"quiet_step_time_s": q, "quiet_error_pct": error_pct(predicted, q), "quiet_runs_s": quiet_runs,
            "quiet_spread_pct": spread_pct(quiet_runs)}


def combine(rounds: list[dict]) -> dict:
    """One case validated in rounds (each: a fresh calibration, its prediction, its runs):
    the median prediction against the median of all the rounds' runs, per phase and whole;
    the spread over all runs.  On a host whose speed drifts over minutes, rounds spread
    both sides of the comparison over the same stretch of time."""
    runs = [t for r in rounds for t in r["measured_runs_s"]]
    pred = statistics.median(r["predicted_step_time_s"] for r in rounds)
    meas = statistics.median(runs)
    phases = {}
    for group in sorted({g for r in rounds for g in r["phases"]}):
        pr = statistics.median(r["phases"].get(group, {}).get("predicted_s", 0.0) for r in rounds)
        m = statistics.median(r["phases"].get(group, {}).get("measured_s", 0.0) for r in rounds)
        phases[group] = _row(pr, m)
    return {**rounds[0], "topology": [r["topology"] for r in rounds], "rounds": len(rounds),
            "predicted_step_time_s": pred, "measured_step_time_s": meas, "error_pct": error_pct(pred, meas),
            "measured_runs_s": runs, "predicted_rounds_s": [r["predicted_step_time_s"] for r in rounds],
            "spread_pct": spread_pct(runs), "phases": phases,
            **quiet_row(pred, [t for r in rounds for t in r["quiet_runs_s"]])}


def speedup_order(rounds: int) -> list[tuple[int, str]]:
    """The runs of a speedup check as (round, side): A and B alternate, and every other
    round starts with B (A B, B A, A B, ...), so a host that drifts steadily over the check
    slows each side's runs alike instead of always the one that runs second."""
    return [(r, side) for r in range(rounds) for side in (("a", "b") if r % 2 == 0 else ("b", "a"))]


def _side_items(set_items: list[str], topology: str) -> list[str]:
    """A side's overrides on ``topology``: a file as its absolute path (the runs start in
    other folders), a built-in name as given."""
    where = Path(topology).resolve() if Path(topology).exists() else topology
    return list(set_items) + [f'cluster.topology="{where}"', "cluster.machines=0", "training.cosim=false"]


def unmeasured_ops(p) -> list[str]:
    """The op cost keys of the plan's compute ops that a calibrated device of it has no
    measured cost for (``Device.op_time`` None where it holds ``op_costs``): their times come
    from the dense kernels' efficiency curve, which calibrate fitted on dense layers only --
    a convolution or attention step can be several times off (decision 073).  [] on
    topologies that were not calibrated."""
    from clustersim.core.plan import cost_key
    devices = p.scenario.topology.devices
    missing = set()
    for op in p.ops:
        if op.kind in ("fwd", "bwd"):
            dev = devices[p.devices[0][op.slot]]
            key = cost_key(p, op)
            if dev.op_costs and dev.op_time(key, 0.0, 0.0) is None:
                missing.add(key)
    return sorted(missing)


def predicted_side(scenario: str, items: list[str]) -> dict:
    """The simulator's ``samples_per_s`` and ``step_time_s`` of one side of a speedup check,
    the ranks it runs on, and ``quiet_samples_per_s``: the quiet host's.  With
    ``faults.host_noise`` the first are with the calibrated noise replayed, each window
    ``NOISE_WINDOW_STEPS`` quiet steps long where it holds more (``host_noise_window_s``: the
    median step of a window's steady state and the steps a window holds keep their
    proportions, at a fraction of the simulated steps), over whole passes of the series:
    a pass is the steps the windows hold at the slowest used rank's speed in each (exact
    for one rank; ranks that meet go at about the slower one's), so that every window
    weighs once whichever the replay starts from (docs/decisions/048)."""
    from clustersim.core.config import ConfigError
    from clustersim.core.scenario import parse_set
    sc = load_scenario(scenario, parse_set(items))
    quiet_sc = dataclasses.replace(sc, faults=dataclasses.replace(sc.faults, host_noise=False))
    p = plan(quiet_sc)
    s = summarize(p, simulate(p))
    out = {"samples_per_s": s["samples_per_s"], "step_time_s": s["step_time_s"], "ranks": ranks_needed(sc),
           "quiet_samples_per_s": s["samples_per_s"], "unmeasured_ops": unmeasured_ops(p)}
    if sc.faults.host_noise and s["step_time_s"] > 0:
        used = used_devices(p)
        series = [sc.topology.devices[d].noise for d in sorted(used) if sc.topology.devices[d].noise]
        window = sc.faults.host_noise_window_s or min(sc.topology.noise_window_s, NOISE_WINDOW_STEPS * s["step_time_s"])
        one_pass = math.ceil(sum(window / max(w) for w in zip(*series)) / s["step_time_s"]) if series else 1
        steps = one_pass * math.ceil(sc.training.steps / one_pass)
        if steps > MAX_NOISE_STEPS:
            field = "training.steps" if sc.training.steps > MAX_NOISE_STEPS else "faults.host_noise_window_s"
            raise ConfigError(scenario, field, f"the replay of the host's noise would take {steps} steps "
                                               f"(at most {MAX_NOISE_STEPS})")
        noisy = dataclasses.replace(sc, faults=dataclasses.replace(sc.faults, host_noise_window_s=window),
                                    training=dataclasses.replace(sc.training, steps=steps))
        p = plan(noisy)
        s = summarize(p, simulate(p))
        out.update(samples_per_s=s["samples_per_s"], step_time_s=s["step_time_s"])
    return out


def execute_side(scenario: str, items: list[str], *extra: str) -> dict:
    """One real run (``clustersim execute --json`` with ``items`` as ``--set``, then
    ``extra``): its summary; RuntimeError with the run's last line when it fails.  Its step
    time is the median step, so the first steps' warm-up counts in no comparison."""
    set_args = [a for item in items for a in ("--set", item)]
    proc = subprocess.run([sys.executable, "-m", "clustersim", "execute", scenario, "--json", *set_args, *extra],
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "execute failed")
    return json.loads(proc.stdout)


def quiet_rate(run: dict) -> float:
    """A run's samples/s at its quiet step (``quiet_step_time_s``) rather than its median step."""
    return at_quiet(run["samples_per_s"], run["step_time_s"], run.get("quiet_step_time_s") or 0.0)


def at_quiet(rate: float, step: float, quiet: float) -> float:
    """Samples/s ``rate`` at median step ``step`` as at step ``quiet`` (0: unknown, ``rate``)."""
    return rate * step / quiet if quiet else rate


def speedup(scenario: str, set_items: list[str], against_items: list[str], topologies: dict[str, list[str]],
            rounds: int = 5, predict=predicted_side, run=execute_side) -> dict:
    """How much faster B (``set_items`` then ``against_items``) trains than A (``set_items``):
    B's samples/s over A's, predicted on each of each side's calibrated topologies
    (``topologies``: side "a"/"b" -> files; a side's prediction is the median over them, so
    one calibration that a neighbour slowed does not set the ratio: decision 039) and
    measured in ``rounds`` rounds of one run each, interleaved (``speedup_order``).  The
    measured speedup is the median of the rounds' ratios (each round's two runs share a
    stretch of the host's time), its spread their (max - min) / median in percent; the
    error is (predicted - measured) / measured in percent.  The same figures predicted for
    the quiet host (``quiet_samples_per_s``) against the runs' quiet windows are ``quiet_*``."""
    given = {"a": list(set_items), "b": list(set_items) + list(against_items)}
    items = {side: [_side_items(given[side], f) for f in topologies[side]] for side in given}
    predicted = {side: [predict(scenario, its) for its in items[side]] for side in ("a", "b")}
    runs: dict[str, list[dict]] = {"a": [None] * rounds, "b": [None] * rounds}
    for r, side in speedup_order(rounds):
        runs[side][r] = run(scenario, items[side][0])
    rates = {side: [x["samples_per_s"] for x in predicted[side]] for side in ("a", "b")}
    figures = speedup_figures(rates["a"], rates["b"], [x["samples_per_s"] for x in runs["a"]],
                              [x["samples_per_s"] for x in runs["b"]], paired=topologies["a"] == topologies["b"])
    quiet = speedup_figures([x.get("quiet_samples_per_s", x["samples_per_s"]) for x in predicted["a"]],
                            [x.get("quiet_samples_per_s", x["samples_per_s"]) for x in predicted["b"]],
                            [quiet_rate(x) for x in runs["a"]], [quiet_rate(x) for x in runs["b"]],
                            paired=topologies["a"] == topologies["b"])

    def side_row(side: str) -> dict:
        measured = [x["samples_per_s"] for x in runs[side]]
        rate = statistics.median(rates[side])
        return {"set": given[side], "topology": topologies[side], "ranks": predicted[side][0]["ranks"],
                "predicted_samples_per_s": rate,
                "predicted_calibrations_samples_per_s": rates[side],
                "predicted_spread_pct": spread_pct(rates[side]),
                "predicted_step_time_s": step_of(predicted[side], rate),
                "measured_samples_per_s": statistics.median(measured), "measured_runs_samples_per_s": measured,
                "measured_step_time_s": statistics.median(x["step_time_s"] for x in runs[side]),
                "spread_pct": spread_pct(measured), "unmeasured_ops": predicted[side][0].get("unmeasured_ops", [])}
    return {"scenario": load_scenario(scenario).name, "file": scenario, "against": list(against_items),
            "rounds": rounds, "calibrations": max(len(topologies["a"]), len(topologies["b"])),
            "a": side_row("a"), "b": side_row("b"), **figures,
            "quiet_predicted_speedup": quiet["predicted_speedup"], "quiet_speedup": quiet["measured_speedup"],
            "quiet_speedup_error_pct": quiet["speedup_error_pct"],
            "quiet_speedup_spread_pct": quiet["speedup_spread_pct"]}


def step_of(predicted: list[dict], rate: float) -> float:
    """A side's predicted step time beside its median samples/s ``rate``: samples a step
    over the rate where every prediction has the same samples a step (synchronous runs;
    the two then stay one figure for an even count of calibrations), else the median of
    the steps (asynchronous replicas: samples/s comes from the whole run)."""
    per_step = [x["samples_per_s"] * x["step_time_s"] for x in predicted]
    if max(per_step) - min(per_step) <= 1e-9 * max(per_step):
        return per_step[0] / rate
    return statistics.median(x["step_time_s"] for x in predicted)


def speedup_figures(predicted_a: list[float], predicted_b: list[float], measured_a: list[float],
                    measured_b: list[float], paired: bool = False) -> dict:
    """B's samples/s over A's: predicted and measured, the error in percent, and the spread
    of the measured ratios ((max - min) / median, percent).  Measured: the median of the
    rounds' ratios (round r's B over round r's A, which ran beside it).  Predicted: the
    median of B's predictions over the median of A's, where each side has calibrations of
    its own (a median per side drops one outlier where a ratio per pair keeps it);
    ``paired`` (both sides predicted on the same calibrations, in order): the median of
    the per-calibration ratios, where one calibration's error cancels."""
    ratios = [b / a for a, b in zip(measured_a, measured_b)]
    pred = (statistics.median(b / a for a, b in zip(predicted_a, predicted_b)) if paired
            else statistics.median(predicted_b) / statistics.median(predicted_a))
    meas = statistics.median(ratios)
    return {"predicted_speedup": pred, "measured_speedup": meas, "speedup_error_pct": error_pct(pred, meas),
            "speedup_spread_pct": spread_pct(ratios), "measured_speedups": ratios}


def suite_speedup(a_rounds: list[dict], b_rounds: list[dict]) -> dict:
    """``speedup_figures`` of two cases validated in the same rounds (``validate`` results,
    round by round): each round's prediction, and the median of each round's runs; paired
    where the two cases ran on the same calibrations (the same rank count).  Where the
    rounds carry their runs' quiet steps, also ``quiet_speedup`` (each round's runs at their
    quiet windows) and the prediction's error against it."""
    paired = (all("topology" in r for r in a_rounds + b_rounds)
              and [r["topology"] for r in a_rounds] == [r["topology"] for r in b_rounds])
    predicted = ([r["predicted_samples_per_s"] for r in a_rounds], [r["predicted_samples_per_s"] for r in b_rounds])
    out = speedup_figures(*predicted,
                          [statistics.median(r["measured_runs_samples_per_s"]) for r in a_rounds],
                          [statistics.median(r["measured_runs_samples_per_s"]) for r in b_rounds], paired=paired)
    if all("quiet_runs_s" in r for r in a_rounds + b_rounds):
        def quiet(r: dict) -> float:
            return statistics.median(map(at_quiet, r["measured_runs_samples_per_s"], r["measured_runs_s"],
                                         r["quiet_runs_s"]))
        q = speedup_figures(*predicted, [quiet(r) for r in a_rounds], [quiet(r) for r in b_rounds], paired=paired)
        out.update(quiet_speedup=q["measured_speedup"], quiet_speedup_error_pct=q["speedup_error_pct"])
    return out
