"""Sandblaster L-BFGS (Dean et al. 2012): a coordinator cuts each batch of
``batch_size x replicas`` samples into ``work_units`` much smaller than 1/R of it and
hands each to whichever replica is free; near the end it hands out copies of unfinished
units (backup tasks) and keeps the first result.  Replicas fetch parameters once per
batch, each given units as soon as it has them, and push their accumulated gradients once
at its end.  The shards hold the
parameters and the L-BFGS history and run the vector operations (dot products, axpy)
on their own slices: (4m + 8) passes over the shard for a history of m; the coordinator
exchanges only scalars with them (2m + 2 numbers each way).

A replica that fails loses its unit: a backup copy replaces it, or, without backup
tasks, the coordinator re-queues it after the detection timeout.
"""
from __future__ import annotations

import dataclasses

from sim.engine import Engine
from sim.fluid import supersede, timeout_at
from clustersim.core.plan import PARAM_BYTES, plan as make_plan
from .ps import ParameterServer

CONTROL_BYTES = 64      # a unit assignment or a completion notice



def run_sandblaster(engine: Engine, steps: int):
    env, p = engine.env, engine.plan
    sc, tr = p.scenario, p.scenario.training
    ps = ParameterServer(engine, "sgd")
    engine.ps_server = ps
    n_units, unit_size = p.schedule.units, p.schedule.unit_size
    unit_plan = make_plan(dataclasses.replace(sc, batch_size=unit_size), check_memory=False)
    coord = ps.ps.devices[0]
    m = tr.lbfgs_history
    busy: set[int] = set()           # replicas computing a unit, kept across batches (a backup
    progress = [env.event()]         # copy may outlive its batch); fires when one finishes
    for r in range(p.replicas):      # or fails: the coordinator's detection timer starts then
        engine.lost(p.devices[r]).callbacks.append(lambda _e: _poke(progress))
    for batch in range(steps):
        if tr.time_limit_s and env.now >= tr.time_limit_s:
            break
        live = [r for r in range(p.replicas) if engine.alive(*p.devices[r])]
        if not live:
            break
        ready: set[int] = set()      # replicas holding this batch's parameters: each is given units
        for r in live:               # as soon as it has them, not once every replica has
            engine.wait(ps.fetch(r, batch, batch), p.devices[r][0], r, batch, "fetch").callbacks.append(
                _holds(r, ready, progress))
        yield from _hand_out(engine, batch, n_units, unit_plan, coord, busy, progress, ready)
        contributors = [r for r in live if engine.alive(*p.devices[r])]
        yield env.all_of([ev for r in contributors for k in range(len(ps.ps.devices))
                          for ev in ps._pieces(r, k, True, batch, "push")])
        yield env.all_of([env.process(_lbfgs_step(engine, ps, k, coord, batch, m)) for k in range(len(ps.ps.devices))])
        engine.log("lbfgs", -1, -1, batch)
        engine.trace.step_ends.append(env.now)


def _lbfgs_step(engine: Engine, ps: ParameterServer, k: int, coord: str, batch: int, m: int):
    dev, n = ps.ps.devices[k], ps.ps.sizes[k]
    scalars = (2 * m + 2) * 8.0
    passes = 4 * m + 8
    yield engine.compute_op(dev, 2.0 * passes * n, passes * n * PARAM_BYTES, -1, batch, "lbfgs", "ps_update", "update")
    yield engine.transfer(dev, coord, scalars, -1, batch, "scalars", "control")
    yield engine.transfer(coord, dev, scalars, -1, batch, "scalars", "control")
    ps.version[k] += 1
    ps.applies[k] += 1


def _holds(r: int, ready: set[int], progress: list):
    """A fetch's callback: replica r holds the batch's parameters; the coordinator looks again."""
    def fetched(_e) -> None:
        ready.add(r)
        _poke(progress)
    return fetched


def _poke(progress: list) -> None:
    """Wakes the coordinator's loop (``progress[0]``), once per wait."""
    if not progress[0].triggered:
        progress[0].succeed()


def _hand_out(engine: Engine, batch: int, n_units: int, unit_plan, coord: str, busy: set[int], progress: list,
              ready: set[int]):
    """The coordinator's loop for one batch: returns when every unit has a result.  A
    replica gets units once it holds the batch's parameters (``ready``); one still
    computing a backup copy from an earlier batch is ``busy`` until it is done: a worker
    computes one unit at a time."""
    env, p = engine.env, engine.plan
    tr = p.scenario.training
    queue = list(range(n_units))
    running: dict[int, list[int]] = {}       # unit -> replicas working on it
    finished: set[int] = set()

    def work(r: int, u: int):
        dev = p.devices[r][0]
        yield engine.transfer(coord, dev, CONTROL_BYTES, r, batch, "assign", "control")
        engine.log("unit", r, -1, batch, unit=u)
        yield engine.run_graph(r, batch, unit_plan).done
        yield engine.transfer(dev, coord, CONTROL_BYTES, r, batch, "done", "control")
        if u not in finished:
            finished.add(u)
            engine.log("won", r, -1, batch, unit=u)
        running[u].remove(r)
        busy.discard(r)
        _poke(progress)

    def detected_at(rs: list[int]) -> float:
        """When the coordinator knows every one of ``rs`` dead (inf: one is alive)."""
        if any(engine.alive(*p.devices[r]) for r in rs):
            return float("inf")
        return max(_failed_at(engine, r) for r in rs) + p.scenario.faults.detect_timeout_s

    while len(finished) < n_units:
        now = env.now
        pending = []                          # detections still to come
        for u, rs in running.items():        # units held only by replicas known to be dead
            if u not in finished and u not in queue and rs:
                at = detected_at(rs)
                if now >= at:
                    queue.append(u)
                    engine.lost_samples += p.schedule.unit_size       # its work is done again
                elif at < float("inf"):
                    pending.append(at)
        free = [r for r in range(p.replicas) if r in ready and r not in busy and engine.alive(*p.devices[r])]
        for r in free:
            if queue:
                u = queue.pop(0)
            elif tr.backup_tasks:
                spare = [u for u in running if u not in finished and r not in running[u]]
                if not spare:
                    break
                u = min(spare, key=lambda u: (len(running[u]), u))      # the least-covered, oldest unit
            else:
                break
            running.setdefault(u, []).append(r)
            busy.add(r)
            env.process(work(r, u))
        if len(finished) >= n_units:
            break
        # a timer only for a detection still to come, so that a job no one can go on with
        # runs dry and ends as a stall
        waits = [progress[0]] + ([timeout_at(env, min(pending))] if pending else [])
        yield env.any_of(waits)
        for timer in waits[1:]:               # progress came first: the detection timer has nothing to do
            supersede(timer)
        if progress[0].triggered:
            progress[0] = env.event()


def _failed_at(engine: Engine, r: int) -> float:
    return min(engine.failed.get(d, float("inf")) for d in engine.plan.devices[r])
