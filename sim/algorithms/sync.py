"""Synchronous SGD: every replica computes its gradient on the same parameters; gradients
are combined (allreduce per model slot across replicas, or a sharded parameter server),
parameters updated, and only then does the next step start -- so a step takes as long
as the slowest replica plus the exchange.

Backup workers (Chen et al. 2016, parameter-server mode): with b backups the shards apply
the first R - b complete gradients and drop the rest; a late replica starts the next step
when it has finished and received the new parameters.

Failures: a replica that stops stalls the step; after ``faults.detect_timeout_s`` the
step is redone either without it (``on_failure = "continue"``) or, after
``faults.restart_s`` and reading the last checkpoint, from that checkpoint with the
machine replaced (``"restart"``, and under ``"continue"`` when no replica is left).  Checkpoints every ``checkpoint_every`` steps write the
parameters at ``checkpoint_gbps``.

Update cost: SGD reads w and g and writes w (3 x 4 bytes, 2 FLOPs per parameter); a
parameter-server shard also sums the pushed gradients first.
"""
from __future__ import annotations

from sim.engine import Engine, first_n
from sim.fluid import supersede
from clustersim.core.plan import buckets, param_layout
from .ps import send_params
from clustersim.core.reliability import checkpoint_seconds, failure_rate
from clustersim.core.schedule import apply_cost, update_cost


RESTARTS_IN_VAIN = 100    # a sync job restarting this often without a new checkpoint is stalled


def run_sync(engine: Engine, steps: int):
    env, plan = engine.env, engine.plan
    sc = plan.scenario
    tr, faults = sc.training, sc.faults
    active = list(range(plan.replicas))
    free = {r: None for r in active}          # backup mode: when each replica is free again
    working: dict = {}                        # backup mode: replica -> its last step's graph done
    issued = [0]                              # backup mode: steps started so far (restarts go on counting)
    last_checkpoint, step = 0, 0
    in_vain = 0                               # restarts in a row back to the same checkpoint
    ran: dict[int, int] = {}                  # step -> the replicas that computed it (lost at a restart)
    engine.log("checkpoint", -1, -1, 0)
    while step < steps:
        if tr.time_limit_s and env.now >= tr.time_limit_s:
            break
        runs, finished = _start_step(engine, active, free, step, working, issued)
        if all(engine.alive(*plan.devices[r]) for r in active):
            yield env.any_of([finished, engine.failure_signal])
        if not finished.triggered:            # somebody has failed: does the step still finish?
            detect = env.timeout(faults.detect_timeout_s)
            yield env.any_of([finished, detect])
            supersede(detect)                 # finished first: the timer has nothing to do
        if not finished.triggered:
            for run in runs:
                run.cancelled = True
            engine.lost_samples += sc.batch_size * len(active)
            dead = [r for r in active if not engine.alive(*plan.devices[r])]
            if faults.on_failure == "restart" or len(dead) == len(active):
                if len(dead) == len(active) < plan.replicas:     # none left: every replica comes back,
                    dead = active = list(range(plan.replicas))   # the ones dropped before too
                    engine.sync_phases.append((len(engine.trace.step_ends), len(active)))
                yield from _restart(engine, step, last_checkpoint, dead, ran)
                step = last_checkpoint
                in_vain += 1
                if in_vain >= RESTARTS_IN_VAIN:   # failures faster than its checkpoints: it would restart for ever
                    engine.stall_note = (f"no progress: {in_vain} restarts in a row back to step {step}'s "
                                         f"checkpoint ({_why_in_vain(engine)})")
                    yield env.event()
            else:
                active = [r for r in active if r not in dead]
                engine.sync_phases.append((len(engine.trace.step_ends), len(active)))
            free = {r: None for r in active}
            working.clear()                   # the cancelled graphs' events never fire
            continue
        engine.log("apply", -1, -1, step, replicas=finished.value)
        ran[step] = len(active)
        for r in active:
            engine.log("deliver", r, -1, step)
        step += 1
        gone = [r for r in active if not engine.alive(*plan.devices[r])]
        # failed after its gradient was in (the step finished without it): with backup workers
        # the job goes on without it; else it stays in, so that the next step waits
        # detect_timeout_s for it, finds it gone and continues without it or restarts, as a
        # failure during its compute does
        if gone and plan.schedule.quorum < plan.replicas:
            active = [r for r in active if r not in gone]
            free = {r: free[r] for r in active}
            engine.sync_phases.append((len(engine.trace.step_ends), len(active)))   # from this step
        if faults.checkpoint_every and step % faults.checkpoint_every == 0:
            seconds = checkpoint_seconds(plan)
            yield engine.wait(env.timeout(seconds), "checkpoint", -1, step, "checkpoint")
            engine.log("checkpoint", -1, -1, step)
            last_checkpoint, in_vain = step, 0
        engine.trace.step_ends.append(env.now)


def _start_step(engine: Engine, active: list[int], free: dict, step: int, working: dict, issued: list[int]):
    """Starts one step; returns its graph runs and an event that fires, with the replicas
    whose gradients were used, when the new parameters are in place."""
    env, plan = engine.env, engine.plan
    backups = plan.replicas - plan.schedule.quorum      # the late gradients a step drops
    runs = []
    for r in active:
        engine.log("grad", r, -1, step)
    if not backups:
        for r in active:
            runs.append(engine.run_graph(r, step))
        if plan.sync == "ps":
            exchange = [env.process(_ps_exchange(engine, runs, active, step))]
        else:
            exchange = [env.process(_slot_exchange(engine, runs, active, j, step)) for j in range(plan.slots)]
        done = env.event()
        env.all_of([g.done for g in runs] + exchange).callbacks.append(lambda _e: done.succeed(list(active)))
        return runs, done
    delivered = []
    issued[0] += 1
    for r in active:
        busy, working[r] = working.get(r), env.event()
        delivered.append(env.process(_replica_with_push(engine, r, step, free, runs, working[r], busy, issued)))
    # the shards apply the first R - b complete replicas; where failures left fewer, every
    # survivor (never none: a step of nobody's gradients is no step)
    quorum = first_n(env, delivered, plan.schedule.quorum)
    done = env.event()

    def apply(_e):
        winners = [active[i] for i in quorum.value]
        proc = env.process(_ps_apply_and_fetch(engine, winners, active, step, free, working))
        proc.callbacks.append(lambda _p: done.succeed(winners))
    quorum.callbacks.append(apply)
    return runs, done


def _update(engine: Engine, device: str, cost: tuple[float, float], replica: int, step: int):
    """The update op of ``cost`` (FLOPs, bytes): a replica's optimizer step, or a shard's
    SGD on the sum of the pushes (``apply_cost``; parameter-server values are fp32)."""
    flops, nbytes = cost
    return engine.compute_op(device, flops, nbytes, replica, step, "update", "update", kind="update", key="update")


def _slot_exchange(engine: Engine, runs, active, j: int, step: int):
    """Allreduce of slot j's gradients over the replicas, bucket by bucket (``buckets``):
    each starts once every replica's backward of its layers is done and the bucket before
    it is through (one collective stream), so they overlap the rest of the backward; then
    every replica updates.  ZeRO-3 also gathers each bucket's weights a second time, as
    FSDP does before a layer's backward: here on the same stream after the bucket's
    reduce, so its time and bytes count, but no backward waits for it (a prefetch that is
    always early enough)."""
    env, plan = engine.env, engine.plan
    devices = [plan.devices[r][j] for r in active]
    sc = plan.scenario
    # ZeRO: a reduce-scatter of the gradients and an all-gather of the weights, timed as one
    # allreduce of the same ring volume (half a value of each dtype a pass)
    value_bytes = (sc.gradient_bytes + sc.dtype_bytes) / 2 if sc.training.zero else sc.gradient_bytes
    if len(devices) > 1 and plan.slot_params[j]:
        for layers, n in buckets(plan, j):
            yield env.all_of([ev for g in runs
                              for ev in g.layer_ready.waited([(j, i) for i in layers if (j, i) in g.layer_ready])])
            yield engine.collective("allreduce", sc.training.allreduce, devices, n * value_bytes, -1, step,
                                    "allreduce")
            if sc.training.zero >= 3:
                yield engine.collective("allgather", "auto", devices, n * sc.dtype_bytes, -1, step, "allgather")
    yield env.all_of([g.slot_ready[j] for g in runs])
    if plan.slot_params[j]:
        # ZeRO: each replica steps its 1/R of the weights (and states), then they are gathered
        params = -(-plan.slot_params[j] // len(devices)) if sc.training.zero else plan.slot_params[j]
        yield env.all_of([_update(engine, plan.devices[r][j], update_cost(sc, params), r, step) for r in active])


def _ps_exchange(engine: Engine, runs, active, step: int):
    """Each (replica, slot) pushes its gradient pieces to the shards as soon as its backward
    is done -- or, with ``training.push_early``, each layer's pieces as soon as that layer's
    backward is done, from the last layer back; a shard sums all pushes, updates, and sends
    the new parameters back."""
    env, plan = engine.env, engine.plan
    ps = plan.ps
    pieces = _push_pieces(plan)
    pushed = {(r, j, i, k): env.event() for r in active for j, i, k, _ in pieces}

    def push(run, r: int, j: int):
        for jj, i, k, n in pieces:
            if jj != j:
                continue
            yield run.layer_ready[(j, i)] if i >= 0 else run.slot_ready[j]
            ev = _params(engine, plan.devices[r][j], ps.devices[k], n, r, step, "push")
            ev.callbacks.append(lambda _e, key=(r, j, i, k): pushed[key].succeed())

    def shard(k: int):
        yield env.all_of([ev for (r, j, i, kk), ev in pushed.items() if kk == k])
        yield _update(engine, ps.devices[k], apply_cost("sgd", ps.sizes[k], len(active)), -1, step)
        yield env.all_of(_fetches(engine, k, active, step))

    for run, r in zip(runs, active):
        for j in range(plan.slots):
            env.process(push(run, r, j))
    yield env.all_of([env.process(shard(k)) for k in range(len(ps.devices))])


def _push_pieces(plan) -> list[tuple[int, int, int, int]]:
    """(slot, layer, shard, parameters) of every push, in the order a slot sends them: per
    slot and shard (layer -1: after the slot's whole backward), or with ``push_early`` per
    layer from the last back (as the backward frees them)."""
    if not plan.scenario.training.push_early:
        return [(j, -1, k, n) for j in range(plan.slots) for k, n in enumerate(plan.ps.share[j]) if n]
    layout = sorted(param_layout(plan.scenario, plan.slices), key=lambda x: (x[1], -x[0]))
    return [(j, i, k, n) for i, j, parts in layout for k, n in enumerate(parts) if n]


def _params(engine: Engine, src: str, dst: str, params: int, replica: int, step: int, phase: str):
    """A push or fetch of ``params`` values, 8-bit when the scenario says so."""
    bits = engine.plan.scenario.training.comm_bits
    return engine.env.process(send_params(engine, src, dst, params, replica, step, phase, bits))


def _fetches(engine: Engine, k: int, replicas, step: int):
    plan, ps = engine.plan, engine.plan.ps
    return [_params(engine, ps.devices[k], plan.devices[r][j], ps.share[j][k], r, step, "fetch")
            for r in replicas for j in range(plan.slots) if ps.share[j][k]]


def _replica_with_push(engine: Engine, r: int, step: int, free: dict, runs: list, computed, busy, issued):
    """Backup mode: replica r, once done with the graph it was last given (``busy``, late)
    and given the new parameters, computes and pushes its whole gradient; ``computed`` fires
    when its graph is done.  Where the step is over by then (``issued`` has moved on), it
    skips it: a late worker's gradient is dropped and it starts on the current step's
    parameters (Chen et al. 2016), so no backlog of old steps builds up behind it."""
    env, plan = engine.env, engine.plan
    ps = plan.ps
    # free[r] is read now: this step's apply replaces it, with this very step's ``computed``
    # in it, and waiting on that the replica would wait on itself for good
    mine, ready = issued[0], free[r]
    if busy is not None and not busy.triggered:
        yield busy                            # computing (not waiting): no wait span
    if issued[0] > mine:
        computed.succeed()
        return
    if ready is not None:
        yield engine.wait(ready, plan.devices[r][0], r, step, "late: previous step")
    run = engine.run_graph(r, step)
    runs.append(run)
    yield run.done
    computed.succeed()
    yield env.all_of([_params(engine, dev, ps.devices[k], ps.share[j][k], r, step, "push")
                      for j, dev in enumerate(plan.devices[r]) for k in range(len(ps.devices)) if ps.share[j][k]])


def _ps_apply_and_fetch(engine: Engine, winners, active, step: int, free: dict, working: dict):
    """Shards apply the first gradients; every replica is sent the new parameters and is
    free for the next step once it has them and has finished its own (maybe late) work:
    the graph of the step it was last given, started or still waiting (``working``), so
    that a replica never computes two steps at once."""
    env, plan = engine.env, engine.plan
    ps = plan.ps
    yield env.all_of([_update(engine, ps.devices[k], apply_cost("sgd", ps.sizes[k], len(winners)), -1, step)
                      for k in range(len(ps.devices))])
    for r in active:
        fetched = env.all_of([ev for k in range(len(ps.devices)) for ev in _fetches(engine, k, [r], step)])
        free[r] = fetched if r in winners else env.all_of([fetched, working[r]])
    # a winner that fails before its fetch arrives is not waited for: its gradient is in
    yield env.all_of([env.any_of([free[r], engine.lost(plan.devices[r])]) for r in winners])


def _why_in_vain(engine: Engine) -> str:
    """Why restarts make no progress, and the setting to move: a recovery longer than the
    job's time between failures (``reliability.failure_rate``: its devices and machines over
    their MTBFs) needs a faster restart or fewer of them, whatever the checkpoints; else
    the checkpoints come too seldom."""
    faults = engine.plan.scenario.faults
    failures = failure_rate(engine.plan)
    recovery = faults.detect_timeout_s + faults.restart_s + checkpoint_seconds(engine.plan)
    if failures and recovery * failures >= 1:
        return (f"the job fails every {1 / failures:.3g} s on average and a recovery takes {recovery:.3g} s "
                "(detect_timeout_s + restart_s + reading the checkpoint at checkpoint_gbps): lower them, or use "
                "fewer devices or machines")
    if faults.checkpoint_every:
        return f"failures come faster than checkpoint_every = {faults.checkpoint_every} steps complete"
    return "failures come faster than the run completes: no checkpoints"


def _restart(engine: Engine, step: int, checkpoint: int, dead: list[int], ran: dict[int, int]):
    """Replace the failed machines, relaunch, read the checkpoint; the steps since are lost,
    each with the replicas that computed it (fewer where "continue" had dropped some)."""
    env, plan = engine.env, engine.plan
    sc = plan.scenario
    engine.lost_samples += sc.batch_size * sum(ran.get(k, plan.replicas) for k in range(checkpoint, step))
    seconds = sc.faults.restart_s + checkpoint_seconds(plan)
    yield engine.wait(env.timeout(seconds), "restart", -1, step, "restart")
    for r in dead:
        for dev in plan.devices[r]:
            engine.replace(dev)
    engine.log("restore", -1, -1, checkpoint)
