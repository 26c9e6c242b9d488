"""Both runners make the schedule's decisions: one Plan per algorithm, simulated and run
on real ranks (``--plan``), and per replica the (step, decision) pairs compared, decision
being fetch (parameters fetched before the step), push (gradients pushed after it) or
average (replicas' gradients or parameters averaged after it).

Where they are read: the simulator's update log (``snap`` -> fetch, ``send`` -> push,
``average``; sync, which logs no snap or send: ``apply`` -> push through shards or
average by allreduce for the replicas it applied, ``deliver`` -> fetch; Sandblaster's
pushes, which it does not log: its ``push`` spans), and the executor's spans (``fetch``,
``push``, ``average``; ``allreduce`` -> average).
"""
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from clustersim.core.plan import plan
from clustersim.core.planio import save_plan
from clustersim.core.schedule import ranks_needed
from clustersim.core.trace import Trace
from executor.launch import mpiexec, rank_env
from helpers import scenario
from sim.engine import simulate

ROOT = Path(__file__).parent.parent
pytestmark = pytest.mark.skipif(not (Path(sys.executable).parent / "mpiexec").exists(),
                                reason="the mpich wheel is not installed")
SHARD = {"ps_shards": 1}
CASES = {   # name: (parallel, training) on top of 2 replicas of one slot
    "sync-allreduce": ({}, {"steps": 3}),
    "sync-shards": (SHARD, {"steps": 3}),
    "downpour": (SHARD, {"algorithm": "downpour", "steps": 6, "n_fetch": 2, "n_push": 3}),
    "ssp": (SHARD, {"algorithm": "ssp", "steps": 4, "staleness": 1}),
    "dcasgd": (SHARD, {"algorithm": "dcasgd", "steps": 4}),
    "local": ({}, {"algorithm": "local", "steps": 7, "local_steps": 3}),
    "sandblaster": (SHARD, {"algorithm": "sandblaster", "steps": 3, "work_units": 6}),
}
EXECUTED = {"fetch": "fetch", "push": "push", "average": "average", "allreduce": "average"}


def executed(trace: Trace) -> dict[int, list]:
    out = defaultdict(set)
    for s in trace.spans:
        if s.name in EXECUTED and s.replica >= 0:
            out[s.replica].add((s.step, EXECUTED[s.name]))
    return {r: sorted(v) for r, v in out.items()}


def simulated(p, trace: Trace) -> dict[int, list]:
    alg, out = p.schedule.algorithm, defaultdict(set)
    for u in trace.updates:
        if u.kind == "snap":
            out[u.replica].add((u.step, "fetch"))
        elif u.kind == "send":
            out[u.replica].add((u.step, "push"))
        elif u.kind == "average":
            for r in range(p.replicas):
                out[r].add((u.step, "average"))
        elif alg == "sync" and u.kind == "apply":
            for r in u.info["replicas"]:
                out[r].add((u.step, "push" if p.sync == "ps" else "average"))
        elif alg == "sync" and p.sync == "ps" and u.kind == "deliver":   # step s's update: what s + 1 computes on
            out[u.replica].add((u.step + 1, "fetch"))
    if alg == "sandblaster":
        for s in trace.spans:
            if s.phase == "push" and s.replica >= 0:
                out[s.replica].add((s.step, "push"))
    return {r: sorted(v) for r, v in out.items()}


def scheduled(p) -> dict[int, list]:
    """What the Plan's schedule says every replica does."""
    s, seq = p.schedule, []
    for t in range(s.steps):
        if s.algorithm == "local":
            seq += [(t, "average")] if s.averages_after(t) else []
        elif s.algorithm == "sync" and p.sync != "ps":
            seq.append((t, "average"))
        else:                                   # through shards: sync, asynchronous, Sandblaster's batches
            seq += [(t, "fetch")] if s.fetches_before(t) else []
            seq += [(t, "push")] if s.pushes_after(t) else []
    return {r: seq for r in range(p.replicas)}


def execute(p, tmp: Path) -> Trace:
    """Runs the Plan itself on real ranks; its merged trace."""
    save_plan(p, tmp / "plan.json")
    n = ranks_needed(p.scenario)
    proc = subprocess.run([str(mpiexec()), "-n", str(n), sys.executable, "-m", "executor.ranks", "decisions",
                           "--plan", str(tmp / "plan.json"), "--trace", str(tmp / "t.json")],
                          cwd=ROOT, env=rank_env(n), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return Trace.load(tmp / "t.json")


@pytest.mark.parametrize("case", CASES)
def test_both_runners_fetch_push_and_average_where_the_plan_says(tmp_path, case):
    """Sync through shards differs at the ends, and only there: the executor fetches
    before every step, step 0 included (the initial values, the same on every rank); the
    simulator sends each step's update to the replicas as part of that step, the last
    one's too.  So the executor alone fetches at step 0, the simulator alone after the
    last step."""
    parallel, training = CASES[case]
    p = plan(scenario(batch=16, parallel={"replicas": 2, **parallel}, training={"learning_rate": 0.1, **training}))
    sim, run = simulated(p, simulate(p).trace), executed(execute(p, tmp_path))
    want = scheduled(p)
    if case == "sync-shards":
        steps = p.schedule.steps
        sim = {r: [d for d in seq if d != (steps, "fetch")] for r, seq in sim.items()}
        want = {r: [d for d in seq if d != (0, "fetch")] for r, seq in want.items()}
        run = {r: [d for d in seq if d != (0, "fetch")] for r, seq in run.items()}
    assert run == sim == want


def test_sandblaster_hands_out_every_unit_of_every_batch_in_both_runners(tmp_path):
    """Which replica runs which unit depends on timing; the units of each batch do not."""
    parallel, training = CASES["sandblaster"]
    p = plan(scenario(batch=16, parallel={"replicas": 2, **parallel}, training={"learning_rate": 0.05, **training}))
    sim_units, run_units = defaultdict(set), defaultdict(set)
    for u in simulate(p).trace.updates:
        if u.kind == "unit":
            sim_units[u.step].add(u.info["unit"])
    for s in execute(p, tmp_path).spans:
        if s.phase == "unit":
            run_units[s.step].add(int(s.name.split()[1]))
    every = {b: set(range(p.schedule.units)) for b in range(p.schedule.steps)}
    assert sim_units == run_units == every and p.schedule.units == 6
