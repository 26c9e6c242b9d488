"""Local SGD: each replica trains on its own copy and takes its own SGD step; every
``local_steps`` steps the copies are averaged (an allreduce per model slot across the
replicas), which is also where fast replicas wait for slow ones."""
from __future__ import annotations

from sim.engine import Engine
from clustersim.core.plan import PARAM_BYTES


def run_local(engine: Engine, steps: int):
    env, plan = engine.env, engine.plan
    tr = plan.scenario.training
    points = [s for s in plan.schedule.averages if s < steps]      # the plan's averaging points
    if not points or points[-1] != steps - 1:
        points.append(steps - 1)                                    # a shorter run ends averaged too
    rounds = {s: i for i, s in enumerate(points)}
    arrive = [[env.event() for _ in range(plan.replicas)] for _ in points]
    release = [env.event() for _ in points]
    stop = [False]

    def replica(r: int):
        devices = plan.devices[r]
        for step in range(steps):
            start = env.now
            engine.log("local", r, -1, step)
            yield engine.run_graph(r, step).done
            yield env.all_of([engine.compute_op(dev, 2 * n, 3 * n * PARAM_BYTES, r, step, "update", "update", "update",
                                                  key="update")
                              for dev, n in zip(devices, plan.slot_params) if n])
            if step in rounds:
                rnd = rounds[step]
                arrive[rnd][r].succeed()
                yield engine.wait(release[rnd], devices[0], r, step, "average")
            engine.trace.replica_steps.append((r, step, start, env.now))    # an averaging step ends averaged
            if stop[0]:
                return

    def coordinator():
        for rnd, step in enumerate(points):
            yield env.all_of(arrive[rnd])
            if plan.replicas > 1:
                yield env.all_of([engine.collective("allreduce", tr.allreduce, [row[j] for row in plan.devices],
                                                    n * PARAM_BYTES, -1, rnd, "average")
                                  for j, n in enumerate(plan.slot_params) if n])
            engine.log("average", -1, -1, step)
            engine.trace.step_ends.append(env.now)
            stop[0] = bool(tr.time_limit_s) and env.now >= tr.time_limit_s
            release[rnd].succeed()
            if stop[0]:
                return

    procs = [env.process(replica(r)) for r in range(plan.replicas)]
    yield env.all_of(procs + [env.process(coordinator())])
