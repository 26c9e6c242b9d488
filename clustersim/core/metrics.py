"""Numbers a user reads off a run, computed from the trace (and the plan for context).

``res`` is either runner's result: it has ``trace``, ``sim_time_s``, ``sim_events``,
``wall_s`` and ``engine`` (the simulator's, or None)."""
from __future__ import annotations

import bisect
import statistics
from collections import defaultdict

import numpy as np

from clustersim.core.plan import Plan, used_devices
from clustersim.core.reliability import failure_costs
from clustersim.core.scenario import ASYNC, LOCKSTEP
from clustersim.core.trace import union_length


def machines_used(p: Plan) -> int:
    """Machines holding a device of the plan (replica slots or parameter-server shards):
    what a job rents."""
    topo = p.scenario.topology
    used = used_devices(p)
    return len({topo.machine_of(d) for d in used})


def training_cost(p: Plan, samples_per_s: float, stretch: float = 1.0) -> dict:
    """With ``training.dataset_samples``: the time an epoch and the whole training take at
    this throughput, stretched by the expected failures and checkpoints where given
    (``reliability.failure_costs``' overhead); with the topology's machine price and power,
    what it costs (list price x machines used x hours) and the energy (machine power x
    machines x hours); with ``training.target_hours``, whether it meets it."""
    sc, tr = p.scenario, p.scenario.training
    if not tr.dataset_samples or samples_per_s <= 0:
        return {}
    epoch = tr.dataset_samples / samples_per_s * stretch
    hours = epoch * tr.epochs / 3600
    machines = machines_used(p)
    out = {"epoch_time_s": epoch, "time_to_train_s": epoch * tr.epochs, "machines_used": machines}
    if sc.topology.price_usd_per_hour:
        out["cost_usd"] = hours * machines * sc.topology.price_usd_per_hour
    if sc.topology.power_w:
        out["energy_kwh"] = hours * machines * sc.topology.power_w / 1000
    if tr.target_hours:
        out["meets_target"] = hours <= tr.target_hours
    return out


def run_costs(p: Plan, step_s: float, samples_per_s: float) -> dict:
    """What a whole training would take at this step and rate: the expected failures' and
    checkpoints' overhead (``reliability.failure_costs``) and ``training_cost`` stretched by
    it (none where the job never finishes on average)."""
    tr = p.scenario.training
    training_s = tr.dataset_samples * tr.epochs / samples_per_s if samples_per_s else 0.0
    out = failure_costs(p, step_s, training_s or None)
    stretch = out.get("failure_overhead", 1.0)
    if stretch is not None:
        out.update(training_cost(p, samples_per_s, stretch))
    return out


def summarize(p: Plan, res, baseline_step_s: float | None = None) -> dict:
    """JSON-ready summary: DESIGN.md's keys (step_time_s, samples_per_s, sim_time_s,
    sim_events, wall_s) plus utilisation, time by phase and speedup against one device."""
    sc = p.scenario
    tr = res.trace
    steps, replicas = sync_stretch(p, res)
    step_s = statistics.median(steps) if steps else 0.0
    samples_per_s = step_samples(p, replicas) / step_s if step_s else 0.0
    # replicas that step on their own; a lockstep job is read by its step ends (an executed
    # one's trace has its replicas' steps too, a crashed replica's fewer)
    alone = tr.replica_steps if sc.training.algorithm not in LOCKSTEP else []
    if alone:                   # each one's period, waits included; the samples of the
        step_s = replica_period(alone)                   # gradients that left (an async replica's pushes)
        samples_per_s = sc.batch_size * pushed_steps(p, alone) / (res.sim_time_s or 1.0)
    makespan = res.sim_time_s or 1.0
    busy = tr.device_busy()
    by_phase: dict[str, float] = defaultdict(float)        # device-seconds: an executed message's send
    for s in tr.spans:                                     # and receive halves both (the receiver's wait)
        by_phase[s.phase] += s.duration_s
    done = len(tr.step_times())              # steps run: every stretch of a run that lost replicas (the rate
                                             # is the last stretch's), steps redone after a restart included;
                                             # per replica when replicas step alone
    if alone:
        per = defaultdict(int)
        for r, *_ in alone:
            per[r] += 1
        done = int(statistics.median(per.values()))
    link_bytes = tr.link_bytes()
    relayed = relays(sc.topology)          # once: a set of the topology's NICs and switches
    cap = sc.topology.capacity
    link_util = {l: b / (cap[tuple(l.split(">"))] * makespan) for l, b in link_bytes.items()}
    out = {
        "name": sc.name, "topology": sc.topology.name, "model": sc.model.name,
        "parameters": sc.model.params, "batch_size": sc.batch_size, "dtype": sc.dtype,
        "model_parallel": p.slots, "split": sc.parallel.split, "replicas": p.replicas, "devices": p.slots * p.replicas,
        "pipeline_stages": 1 if sc.training.algorithm == "layerwise" else sc.parallel.stages,   # 016: whole forward
        "micro_batches": sc.parallel.micro_batches,
        "schedule": sc.parallel.schedule,
        "ps_shards": sc.parallel.ps_shards, "sync": p.sync, "algorithm": sc.training.algorithm,
        "network": sc.network, "steps": done,
        "step_time_s": step_s,
        "samples_per_s": samples_per_s,
        "sim_time_s": res.sim_time_s, "sim_events": res.sim_events, "wall_s": res.wall_s,
        "device_utilisation": {d: busy.get(d, 0.0) / makespan for row in p.devices for d in row},
        "link_utilisation": dict(sorted(link_util.items(), key=lambda kv: -kv[1])[:10]),
        "bytes_per_step": sum(s.bytes for s in tr.spans if is_message(s, relayed)) / max(done, 1),
        "time_by_phase_s": {k: v / max(done, 1) for k, v in sorted(by_phase.items())},
    }
    out.update(async_metrics(p, res))
    if getattr(res, "stalled_at_s", None) is not None:     # nothing is reported as if the job had run
        for key in ("step_time_s", "samples_per_s", "run_samples_per_s"):
            out.pop(key, None)
        out.update(stalled_at_s=res.stalled_at_s, stalled_reason=res.stalled_reason)
    else:
        out.update(run_costs(p, step_s, samples_per_s))
        if baseline_step_s:
            out["one_device_step_time_s"] = baseline_step_s
            out["speedup"] = out["samples_per_s"] / (sc.batch_size / baseline_step_s)
    notes = caveats(p)
    if notes:
        out["notes"] = notes
    return out


def caveats(p: Plan) -> list[str]:
    """What the figures leave out that their reader should know, a line each: GPUs at 100%
    of their datasheet peak (a topology written from a datasheet alone), local SGD's final
    average inside a window of part of a period, the analytical network's messages that
    share no link."""
    sc, out = p.scenario, []
    if sc.network == "analytical":
        out.append("cluster.network = analytical: every message has its route to itself (alpha-beta, no sharing), "
                   "so a link's utilisation can exceed 100% and contention is not in the step time (\"flow\" "
                   "shares links max-min)")
    bare = sorted(d for d in used_devices(p) if sc.topology.devices[d].at_datasheet_peak)
    if bare:
        out.append(f"{bare[0]}{f' and {len(bare) - 1} more' if len(bare) > 1 else ''}: efficiency 1 (the default) "
                   "and no efficiency curve, measured op costs, or sms and compute_capability, so every op runs at "
                   "100% of peak_tflops (the bundled GPUs give efficiency = 0.7; README: topology files)")
    tr = sc.training
    if tr.algorithm == "local" and p.replicas > 1 and tr.steps % tr.local_steps:
        out.append(f"training.steps = {tr.steps} is not a multiple of training.local_steps = {tr.local_steps}: the "
                   "job's final average weighs on the step time and bytes_per_step (simulate a multiple of it "
                   "for the steady state)")
    return out



def step_samples(p: Plan, replicas: int) -> int:
    """Samples a lockstep step of ``replicas`` trains on: sync applies at most its quorum's
    gradients (a backup worker's late one trains nothing); Sandblaster its units of whole
    samples (200 units of a batch of 256 train 200: units of 256 // 200 = 1)."""
    if p.scenario.training.algorithm == "sandblaster":
        return p.schedule.units * p.schedule.unit_size
    used = min(replicas, p.schedule.quorum) if p.scenario.training.algorithm == "sync" else replicas
    return p.scenario.batch_size * used


def sync_stretch(p: Plan, res) -> tuple[list[float], int]:
    """The step times a run's rate is read from, and the replicas that ran them.  Sync SGD
    that went on without failed replicas (``faults.on_failure = "continue"``, or backups
    that finished the step without one, which then stays out even under "restart" until no
    replica is left, when the restart brings every one back) runs in stretches
    (``Engine.sync_phases``): the last one with a step after its first (which waited out the
    detection, or finished without the failed replica).  A restart replaces the failed
    machines: one stretch.  Otherwise every step and every replica.  A step's checkpoint
    write (``faults.checkpoint_every``; its wait span at "checkpoint") is not its time: it is in
    the run's rate (``run_samples_per_s``), not the steps', whose median would otherwise
    take it in or not depending on ``checkpoint_every``."""
    steps = res.trace.step_times()
    if p.scenario.faults.checkpoint_every:
        ends = res.trace.step_ends
        for s in res.trace.spans:             # a write ends its step: the step whose end is its own
            if s.where == "checkpoint" and s.kind == "wait" and (k := bisect.bisect_left(ends, s.end_s)) < len(ends):
                steps[k] -= s.duration_s
    phases = getattr(getattr(res, "engine", None), "sync_phases", [(0, p.replicas)])
    if p.scenario.training.algorithm != "sync" or len(phases) < 2:
        return steps, p.replicas
    ends = [first for first, _ in phases[1:]] + [len(steps)]
    for (first, replicas), end in reversed(list(zip(phases, ends))):
        part = steps[first + (1 if first else 0):end]
        if part:
            return part, replicas
    return steps, phases[-1][1]


def pushed_steps(p: Plan, replica_steps: list[tuple[int, int, float, float]]) -> int:
    """The steps whose gradients left their replica: an asynchronous replica (Downpour,
    DC-ASGD, SSP) pushes what it accumulated after every ``n_push``-th step, so the steps
    after its last push -- a failed replica's, or a run's tail where ``n_push`` does not
    divide the steps it ran -- trained nothing.  Every step for the others."""
    if p.schedule.algorithm not in ASYNC:
        return len(replica_steps)
    last: dict[int, int] = defaultdict(lambda: -1)
    for r, step, *_ in replica_steps:
        if p.schedule.pushes_after(step):
            last[r] = max(last[r], step)
    return sum(step <= last[r] for r, step, *_ in replica_steps)


def replica_period(replica_steps: list[tuple[int, int, float, float]]) -> float:
    """The median over replicas of (last step's end - first step's start) / steps: a
    replica's time per step with every wait it met (averaging, fetches, staleness)."""
    spans: dict[int, list[float]] = {}
    for r, _, start, end in replica_steps:
        first, last, n = spans.get(r, (start, end, 0))
        spans[r] = (min(first, start), max(last, end), n + 1)
    return statistics.median((last - first) / n for first, last, n in spans.values())


def async_metrics(p: Plan, res) -> dict:
    """Staleness, parameter-server load, waiting and lost work (where they apply)."""
    tr, eng = res.trace, res.engine
    out: dict = {}
    makespan = res.sim_time_s or 1.0
    if tr.staleness:
        st = np.asarray(tr.staleness)
        out.update(staleness_mean=float(st.mean()), staleness_p50=float(np.percentile(st, 50)),
                   staleness_p90=float(np.percentile(st, 90)), staleness_p99=float(np.percentile(st, 99)),
                   staleness_max=int(st.max()),
                   staleness_histogram=np.bincount(np.minimum(st, 100)).tolist())
    server = getattr(eng, "ps_server", None)
    if server is not None:
        out["shard_updates_per_s"] = [n / makespan for n in server.applies]
        busy: dict[str, list] = defaultdict(list)
        for s in tr.spans:
            if s.phase == "ps_update":
                busy[s.where].append((s.start_s, s.end_s))
        out["shard_utilisation"] = {d: union_length(busy[d]) / makespan for d in dict.fromkeys(p.ps.devices)}
    waits: dict[int, float] = defaultdict(float)
    for s in tr.spans:
        if s.kind == "wait" and s.replica >= 0:
            waits[s.replica] += s.duration_s
    if waits:
        out["replica_wait_fraction"] = {r: waits.get(r, 0.0) / makespan for r in range(p.replicas)}
    if eng is not None and (eng.failed_ever or eng.lost_samples or eng.failed_transfers or eng.failed_links):
        out["failed_devices"] = sorted(eng.failed_ever)
        out["failed_links"] = list(eng.failed_links)     # a cut may reroute: named all the same
        out["lost_work_samples"] = eng.lost_samples
        out["failed_transfers"] = eng.failed_transfers
        if p.scenario.training.algorithm == "sync":
            out["run_samples_per_s"] = run_rate(p, tr, makespan)
    elif eng is not None and p.scenario.faults.checkpoint_every and p.scenario.training.algorithm == "sync":
        out["run_samples_per_s"] = run_rate(p, tr, makespan)    # the checkpoint writes' cost, which steps leave out
    return out


def run_rate(p: Plan, tr, makespan: float) -> float:
    """A synchronous run's samples per second over its whole simulated time, failures,
    restarts and steps done again included: each step's samples counted once, from the
    gradients its last completion applied (a backup worker's dropped gradient trained
    nothing; ``samples_per_s`` is the steady step's)."""
    used: dict[int, int] = {}
    for u in tr.updates:
        if u.kind == "apply" and u.shard == -1 and "replicas" in u.info:
            used[u.step] = len(u.info["replicas"])      # a step done again after a restart: its last
    return p.scenario.batch_size * sum(used.values()) / makespan


WINDOW_S = 0.05           # a run's steps are cut into windows of this length
QUIET_PCT = 10            # a quiet host: this percentile of the windows' median steps
QUIET_LEAST = 5           # steps in a run's window at least (a speech step outlasts a window)


def quiet_time(times: list[float], window: float = WINDOW_S, pct: float = QUIET_PCT,
               least: int = QUIET_LEAST) -> float:
    """A run's step on a quiet host: its steps cut into consecutive windows of ``window``
    seconds and ``least`` steps or more (a last, shorter one dropped unless it is the only
    one), each window's median step, and the ``pct``th percentile of those -- as
    ``quiet_reference`` is of the reference's windows.  With one step a window, the
    percentile of single steps sat 6-9% under distbelief-speech's median step: mostly the
    jitter of its steps, as its large GEMMs hardly feel the host's spells."""
    medians, current, spent = [], [], 0.0
    for t in times:
        current.append(t)
        spent += t
        if spent >= window and len(current) >= least:
            medians.append(statistics.median(current))
            current, spent = [], 0.0
    if current and not medians:
        medians.append(statistics.median(current))
    return float(np.percentile(medians, pct)) if medians else 0.0


def relays(topology) -> frozenset[str]:
    """The devices that pass messages on and send none of their own (NICs, switches)."""
    return frozenset(d for d, dev in topology.devices.items() if not dev.is_compute)


def is_message(span, relayed: frozenset[str] = frozenset()) -> bool:
    """A transfer span that is one message sent, counted once: not an executed message's
    receive span (``executor.job``: ``... recv``, the same message as its ``send`` span; its
    time is the receiver's and counts in the phase's device-seconds), and not a relay's
    hop (a ring channel crossing machines is GPU -> NIC -> next GPU, two spans of the
    same bytes, each counted on its own links by ``Trace.link_bytes``)."""
    return (span.kind == "transfer" and not span.name.endswith(" recv")
            and span.where.split("->", 1)[0] not in relayed)


def traffic_per_step(trace, relayed: frozenset[str] = frozenset()) -> dict[str, dict[str, float]]:
    """Per phase, the messages and bytes one step moves (medians over the steps), counted
    alike for both runners: transfer spans of a step that are messages (``is_message``;
    ``relayed``: the topology's ``relays``)."""
    per: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0, 0.0]))
    steps = set()
    for s in trace.spans:
        if s.step < 0:
            continue
        steps.add(s.step)
        if is_message(s, relayed):
            cell = per[s.phase][s.step]
            cell[0] += 1
            cell[1] += s.bytes
    return {phase: {"messages": statistics.median(by.get(t, [0, 0.0])[0] for t in steps),
                    "bytes": statistics.median(by.get(t, [0, 0.0])[1] for t in steps)}
            for phase, by in sorted(per.items())}
