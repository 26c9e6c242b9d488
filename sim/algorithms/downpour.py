"""Asynchronous replicas against a sharded parameter server: Downpour SGD (Dean et al.
2012), DC-ASGD (Zheng et al. 2017: the same traffic, a costlier apply and a per-worker
copy on the shards) and SSP (Ho et al. 2013: a replica more than ``staleness`` steps
ahead of the slowest live replica waits; a step counts once its push is applied, so a
replica at clock c reads every update of clocks up to c - staleness - 1: staleness 0 is
bulk-synchronous; with ``n_push`` > 1 a step that does not push counts at once, so the
guarantee covers the steps whose pushes have gone, and with ``n_fetch`` > 1 a replica reads
only at its fetches).

Each replica, independently: every ``n_fetch`` steps it fetches parameters (waiting for
them, and first for its last push to be applied, so it reads its own writes); it computes
a gradient on what it holds; every ``n_push`` steps it pushes what it accumulated, waiting
until its bytes have arrived (as the executor's send does; a replica pushing faster than
its links drain would otherwise keep ever more pushes in flight), not for their apply.
Replica 0 starts alone when ``warm_start_s`` > 0; the others start at seeded
offsets within ``start_spread_s`` (default: a round trip of a replica's parameters on its
route to shard 0), as launched jobs do: replicas started in the same instant stay in
lockstep under fair sharing, pushing together and fetching together (docs/decisions/008).
A replica whose device fails, or whose messages find no route (a link cut), simply stops;
the others carry on; the step it was in and those it had not pushed are its lost work
(``lost_work_samples``; ``samples_per_s`` counts pushed steps only, ``metrics.pushed_steps``).
A failed shard holds every replica up, and a job whose every replica stopped before its
end has nothing left to train on: the run stalls.
"""
from __future__ import annotations

from sim.engine import Engine
from clustersim.core.metrics import pushed_steps
from clustersim.core.schedule import message_bytes
from .ps import ParameterServer


def start_offsets(engine: Engine) -> list[float]:
    """Each replica's start: 0 for replica 0, a seeded uniform draw in [0, spread) for the
    others; spread -1 is a push and a fetch of a replica's parameters on its route alone."""
    plan, tr = engine.plan, engine.plan.scenario.training
    spread = tr.start_spread_s
    if spread < 0:
        topo = plan.scenario.topology
        dev, shard = plan.devices[0][0], plan.ps.devices[0]
        rate = topo.route_bandwidth(topo.route(dev, shard)) if dev != shard else float("inf")
        spread = 2 * message_bytes(sum(plan.slot_params), tr.comm_bits) / rate
    draws = engine.rng.uniform(0.0, spread, plan.replicas) if spread > 0 else [0.0] * plan.replicas
    return [0.0] + [float(t) for t in draws[1:]]


def run_async(engine: Engine, steps: int):
    env, plan = engine.env, engine.plan
    tr = plan.scenario.training
    ps = ParameterServer(engine, plan.schedule.rule)
    done = [0] * plan.replicas
    progress = [env.event()]                   # fires (and is replaced) whenever any replica ends a step

    def slowest_live() -> int:
        live = [done[r] for r in range(plan.replicas)
                if engine.alive(*plan.devices[r]) and not engine.cut_off(r).triggered]
        return min(live) if live else max(done)

    def advance(r: int, clock: int) -> None:
        """Replica r has ended ``clock`` steps (under SSP: its updates applied)."""
        done[r] = max(done[r], clock)
        moved(None)

    def moved(_e) -> None:
        """A replica's clock advanced or it stopped (failed or cut off): the slowest live
        one may be another now, so SSP's waits look again."""
        if not progress[0].triggered:
            progress[0].succeed()
            progress[0] = env.event()
    if tr.algorithm == "ssp":
        for r in range(plan.replicas):
            engine.lost(plan.devices[r]).callbacks.append(moved)
            engine.cut_off(r).callbacks.append(moved)

    offsets = start_offsets(engine)
    began = [0] * plan.replicas                # steps each replica started computing
    sent: list[list] = [[] for _ in range(plan.replicas)]   # per replica, its pushes not yet arrived (each
                                                            # with its steps' replica_steps entries)

    def replica(r: int):
        devices = plan.devices[r]
        if offsets[r]:
            yield env.timeout(offsets[r])
        if r > 0 and tr.warm_start_s:
            yield engine.wait(env.timeout(tr.warm_start_s), devices[0], r, 0, "warm start")
        last_push, captured, fetches, pushes, carried = None, None, 0, 0, []
        for step in range(steps):
            if tr.time_limit_s and env.now >= tr.time_limit_s:
                break
            start = env.now
            if tr.algorithm == "ssp":
                while step - slowest_live() > tr.staleness:
                    yield engine.wait(progress[0], devices[0], r, step, "staleness bound")
            if plan.schedule.fetches_before(step):
                if last_push is not None:
                    yield engine.wait(last_push, devices[0], r, step, "own push")
                yield engine.wait(ps.fetch(r, step, fetches), devices[0], r, step, "fetch")
                fetches += 1
            engine.log("grad", r, -1, step)
            began[r] += 1
            if captured is None:
                captured = list(ps.held[r])
            yield engine.run_graph(r, step).done
            carried.append(len(engine.trace.replica_steps))
            engine.trace.replica_steps.append((r, step, start, env.now))
            pushing = plan.schedule.pushes_after(step)
            if pushing:
                engine.log("send", r, -1, step, push=pushes)
                delivered, last_push = ps.push(r, step, pushes, captured)
                sent[r] = [x for x in sent[r] if not x[0].triggered] + [(last_push, tuple(carried))]
                carried = []
                pushes += 1
                captured = None
            if tr.algorithm == "ssp" and pushing:       # Ho et al.: a clock's updates, applied, end it
                last_push.callbacks.append(lambda _e, r=r, clock=step + 1: advance(r, clock))
            else:
                advance(r, step + 1)
            if pushing and step + 1 < steps and not plan.schedule.fetches_before(step + 1):
                yield engine.wait(delivered, devices[0], r, step, "push sent")   # a fetch would wait longer
        if last_push is not None:
            yield last_push

    procs = [env.process(replica(r)) for r in range(plan.replicas)]
    engine.ps_server = ps
    yield env.all_of([env.any_of([proc, engine.lost(plan.devices[r]), engine.cut_off(r)])
                      for r, proc in enumerate(procs)])
    # a stopped replica's push that had not arrived when the job ended (one that found no
    # route: a cut link) trained nothing: its steps are dropped from the replica's steps and
    # counted lost below, as a failed replica's step in flight is
    lost = {i for proc, pushes in zip(procs, sent) if not proc.triggered
            for push, entries in pushes if not push.triggered for i in entries}
    if lost:
        engine.trace.replica_steps[:] = [s for i, s in enumerate(engine.trace.replica_steps) if i not in lost]
    for r, proc in enumerate(procs):          # a stopped replica's unpushed steps and the one it was in
        if not proc.triggered:
            mine = [s for s in engine.trace.replica_steps if s[0] == r]
            engine.lost_samples += plan.scenario.batch_size * (began[r] - pushed_steps(plan, mine))
    if not any(proc.triggered for proc in procs):
        # every replica stopped before its end: nothing trains on, a stall -- once the
        # shards' restarts under way are done (further failures would restart them forever)
        engine.stop_failures()
        yield env.event()

