"""Synchronous SGD: every replica computes its gradient on the same parameters; gradients
are combined (allreduce per model slot across replicas, or a sharded parameter server),
parameters updated, and only then does the next step start -- so a step takes as long
as the slowest replica plus the exchange.

Update cost: SGD reads w and g and writes w (3 x 4 bytes, 2 FLOPs per parameter); a
parameter-server shard also sums the R pushed gradients first.
"""
from __future__ import annotations

from ..engine import Engine
from ..plan import PARAM_BYTES


def run_sync(engine: Engine, steps: int):
    env, plan = engine.env, engine.plan
    for step in range(steps):
        graphs = [engine.run_graph(r, step) for r in range(plan.replicas)]
        if plan.sync == "ps":
            exchange = [env.process(_ps_exchange(engine, graphs, step))]
        else:
            exchange = [env.process(_slot_exchange(engine, graphs, j, step)) for j in range(plan.slots)]
        yield env.all_of([g.done for g in graphs] + exchange)
        engine.trace.step_ends.append(env.now)


def _update(engine: Engine, device: str, params: int, replica: int, step: int, summed: int = 1):
    return engine.compute_op(device, (summed + 1) * params, (summed + 2) * params * PARAM_BYTES,
                             replica, step, "update", "update", kind="update")


def _slot_exchange(engine: Engine, graphs, j: int, step: int):
    """Allreduce of slot j's gradients over the replicas, then every replica updates."""
    env, plan = engine.env, engine.plan
    params = plan.slot_params[j]
    yield env.all_of([g.slot_ready[j] for g in graphs])
    if not params:
        return
    if plan.sync == "allreduce":
        devices = [row[j] for row in plan.devices]
        yield engine.collective("allreduce", plan.scenario.training.allreduce, devices,
                                params * PARAM_BYTES, -1, step, "allreduce")
    yield env.all_of([_update(engine, row[j], params, r, step) for r, row in enumerate(plan.devices)])


def _ps_exchange(engine: Engine, graphs, step: int):
    """Each (replica, slot) pushes its gradient pieces to the shards as soon as its backward
    is done; a shard sums all R pushes, updates, and sends the new parameters back."""
    env, plan = engine.env, engine.plan
    ps = plan.ps
    pushed = {(r, j, k): env.event() for r in range(plan.replicas) for j in range(plan.slots)
              for k in range(len(ps.devices)) if ps.share[j][k]}

    def push(r: int, j: int):
        yield graphs[r].slot_ready[j]
        for k, n in enumerate(ps.share[j]):
            if n:
                ev = engine.transfer(plan.devices[r][j], ps.devices[k], n * PARAM_BYTES, r, step, "push", "push")
                ev.callbacks.append(lambda _e, key=(r, j, k): pushed[key].succeed())

    def shard(k: int):
        yield env.all_of([ev for (r, j, kk), ev in pushed.items() if kk == k])
        yield _update(engine, ps.devices[k], ps.sizes[k], -1, step, summed=plan.replicas)
        fetches = [engine.transfer(ps.devices[k], plan.devices[r][j], ps.share[j][k] * PARAM_BYTES, r, step,
                                   "fetch", "fetch")
                   for (r, j, kk) in pushed if kk == k]
        yield env.all_of(fetches)

    for r in range(plan.replicas):
        for j in range(plan.slots):
            env.process(push(r, j))
    yield env.all_of([env.process(shard(k)) for k in range(len(ps.devices))])
