"""Asynchronous replicas against a sharded parameter server: Downpour SGD (Dean et al.
2012), DC-ASGD (Zheng et al. 2017: the same traffic, a costlier apply and a per-worker
copy on the shards) and SSP (Ho et al. 2013: a replica more than ``staleness`` steps
ahead of the slowest live replica waits).

Each replica, independently: every ``n_fetch`` steps it fetches parameters (waiting for
them, and first for its last push to be applied, so it reads its own writes); it computes
a gradient on what it holds; every ``n_push`` steps it pushes what it accumulated without
waiting.  Replica 0 starts alone when ``warm_start_s`` > 0.  A replica whose device fails
simply stops; the others carry on.  A failed shard holds every replica up: the run stalls.
"""
from __future__ import annotations

from sim.engine import Engine
from .ps import ParameterServer, rule_of


def run_async(engine: Engine, steps: int):
    env, plan = engine.env, engine.plan
    tr = plan.scenario.training
    ps = ParameterServer(engine, rule_of(tr))
    done = [0] * plan.replicas
    progress = [env.event()]                   # fires (and is replaced) whenever any replica ends a step

    def slowest_live() -> int:
        live = [done[r] for r in range(plan.replicas) if engine.alive(*plan.devices[r])]
        return min(live) if live else max(done)

    def replica(r: int):
        devices = plan.devices[r]
        if r > 0 and tr.warm_start_s:
            yield engine.wait(env.timeout(tr.warm_start_s), devices[0], r, 0, "warm start")
        last_push, captured, fetches, pushes = None, None, 0, 0
        for step in range(steps):
            if tr.time_limit_s and env.now >= tr.time_limit_s:
                break
            start = env.now
            if tr.algorithm == "ssp":
                while step - slowest_live() > tr.staleness:
                    yield engine.wait(progress[0], devices[0], r, step, "staleness bound")
            if step % tr.n_fetch == 0:
                if last_push is not None:
                    yield engine.wait(last_push, devices[0], r, step, "own push")
                yield engine.wait(ps.fetch(r, step, fetches), devices[0], r, step, "fetch")
                fetches += 1
            engine.log("grad", r, -1, step)
            if captured is None:
                captured = list(ps.held[r])
            yield engine.run_graph(r, step).done
            engine.trace.replica_steps.append((r, step, start, env.now))
            done[r] = step + 1
            progress[0].succeed()
            progress[0] = env.event()
            if (step + 1) % tr.n_push == 0:
                engine.log("send", r, -1, step, push=pushes)
                last_push = ps.push(r, step, pushes, captured)
                pushes += 1
                captured = None
        if last_push is not None:
            yield last_push

    procs = [env.process(replica(r)) for r in range(plan.replicas)]
    engine.ps_server = ps
    yield env.all_of([env.any_of([proc, engine.lost(plan.devices[r])]) for r, proc in enumerate(procs)])
