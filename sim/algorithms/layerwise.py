"""Layer-wise approximate training (the seed's algorithm): each of the G layer groups of
a ``split = "layers"`` plan is one worker on its own device that trains only its own
group's weights, holding the other groups' weights as they were at the last exchange.

Per step, worker g computes the whole forward (every layer, with its stale copy of the
other groups) and the backward from the loss down to its own group (the backward ops of
groups g..G-1: the layers below it need no gradient), then an SGD update of its own
group.  Worker 0 thus does a full step; the last group least.  At the plan's exchange
points (``Schedule.exchanges``: every ``comm_interval`` samples, rounded up to a step
boundary, and the last step) each worker sends its group's weights to every other
worker as it arrives there and goes on once it has every other group's weights; the
workers meet only there.  See docs/decisions/016-layerwise-approximate-training.md.

Update log (co-simulation replays it): ``layer_step`` (worker g takes step s on its copy;
info worker), ``exchange_send`` (g's group values leave; info worker, round) and
``exchange_recv`` (g takes in every other group's values of that round).  The job's step
s ends when the last worker has finished it (exchange included): ``replica_steps``.
"""
from __future__ import annotations

from sim.engine import Engine
from clustersim.core.plan import PARAM_BYTES, cost_key, reruns
from sim.kernel_model import op_work


def step_ops(plan, group: int) -> list:
    """The compute ops worker ``group`` runs in one step, in order: every forward op, then
    the backward ops of groups ``group`` and after (plan order: loss first)."""
    fwd = [op for op in plan.ops if op.kind == "fwd"]
    return fwd + [op for op in plan.ops if op.kind == "bwd" and op.slot >= group]


def run_layerwise(engine: Engine, steps: int):
    env, plan = engine.env, engine.plan
    groups, devices = plan.slots, plan.devices[0]
    points = [s for s in plan.schedule.exchanges if s < steps]
    if not points or points[-1] != steps - 1:
        points.append(steps - 1)                          # a shorter run ends exchanged too
    rounds = {s: k for k, s in enumerate(points)}
    inbox: dict[tuple[int, int, int], object] = {}       # (round, receiver, sender) -> arrived
    again = reruns(plan.scenario.model)                   # what a recomputation reruns, for op_work

    def arrived(k: int, h: int, g: int):
        return inbox.setdefault((k, h, g), env.event())

    finished = [0] * steps
    last_end = [0.0]

    def step_done(step: int) -> None:
        finished[step] += 1
        if finished[step] == groups:
            engine.trace.replica_steps.append((0, step, last_end[0], env.now))
            engine.trace.step_ends.append(env.now)
            last_end[0] = env.now

    def worker(g: int):
        dev, own = devices[g], plan.slot_params[g]
        ops = [(op, cost_key(plan, op), op_work(plan, op, again)) for op in step_ops(plan, g)]   # as the engine's
        for step in range(steps):
            engine.log("layer_step", 0, -1, step, worker=g)
            for op, key, work in ops:
                yield engine.compute_op(dev, op.flops, op.bytes, 0, step, f"{op.kind} L{op.layer}", op.kind, key=key,
                                        work=work)
            if own:
                yield engine.compute_op(dev, 2 * own, 3 * own * PARAM_BYTES, 0, step, "update", "update", "update",
                                        key="update")
            if step in rounds:
                k = rounds[step]
                engine.log("exchange_send", 0, -1, step, worker=g, round=k)
                for h in range(groups):
                    if h == g:
                        continue
                    if own:
                        sent = engine.transfer(dev, devices[h], own * PARAM_BYTES, 0, step, "weights", "exchange")
                        sent.callbacks.append(lambda _e, k=k, h=h: arrived(k, h, g).succeed())
                    else:
                        arrived(k, h, g).succeed()
                incoming = env.all_of([arrived(k, g, x) for x in range(groups) if x != g])
                yield engine.wait(incoming, dev, 0, step, "exchange")
                engine.log("exchange_recv", 0, -1, step, worker=g, round=k)
            step_done(step)

    yield env.all_of([env.process(worker(g)) for g in range(groups)])
