"""Runs a Plan in simpy on the hardware model and records a Trace.

The engine knows how to run one replica's step graph, one transfer, one compute op and
one collective on the modelled cluster; the training algorithm (``algorithms/``) decides
how steps, gradient exchange and updates follow each other.  All state lives in the
``Engine`` and its ``env``; randomness comes from the generator passed in.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import simpy

from . import collectives
from .compute import Compute
from .network import BACKENDS
from .plan import Plan
from .trace import Span, Trace


class CountingEnvironment(simpy.Environment):
    """A simpy Environment that counts the events it processes."""

    def __init__(self, initial_time: float = 0) -> None:
        super().__init__(initial_time)
        self.events_processed = 0

    def step(self) -> None:
        self.events_processed += 1
        super().step()


@dataclass
class GraphRun:
    """One replica's step in flight: ``done`` fires when all its ops have; ``slot_ready[j]``
    when every backward op on slot j has (its gradients are final)."""

    done: simpy.Event
    slot_ready: list[simpy.Event] = field(default_factory=list)


class Engine:
    def __init__(self, plan: Plan, env: CountingEnvironment | None = None,
                 rng: np.random.Generator | None = None) -> None:
        sc = plan.scenario
        self.plan, self.env = plan, env or CountingEnvironment()
        self.rng = rng if rng is not None else np.random.default_rng(sc.seed)
        self.compute = Compute(self.env, sc.topology, sc.dtype)
        self.network = BACKENDS[sc.network](self.env, sc.topology)
        self.trace = Trace()
        ops = plan.ops
        self._succ: list[list[int]] = [[] for _ in ops]
        for op in ops:
            for d in op.deps:
                self._succ[d].append(op.id)
        self._bwd_per_slot = [sum(1 for op in ops if op.kind == "bwd" and op.slot == j) for j in range(plan.slots)]

    # --- primitives that record spans ----------------------------------------------------
    def compute_op(self, device: str, flops: float, nbytes: float, replica: int, step: int,
                   name: str, phase: str, kind: str = "compute") -> simpy.Event:
        start = self.env.now
        ev = self.compute.run(device, flops, nbytes)
        ev.callbacks.append(lambda _e: self.trace.add(
            Span(name, kind, device, replica, step, start, self.env.now, nbytes, flops, phase)))
        return ev

    def transfer(self, src: str, dst: str, nbytes: float, replica: int, step: int,
                 name: str, phase: str) -> simpy.Event:
        start = self.env.now
        ev = self.network.send([(src, dst)], nbytes)
        links = _link_names(self.network.topology.route(src, dst))
        ev.callbacks.append(lambda _e: self.trace.add(
            Span(name, "transfer", f"{src}->{dst}", replica, step, start, self.env.now, nbytes, 0.0, phase, links)))
        return ev

    def collective(self, op: str, algo: str, devices: list[str], nbytes: float, replica: int,
                   step: int, name: str) -> simpy.Event:
        schedule = collectives.phases(op, algo, devices, nbytes)
        route = self.network.topology.route

        def record(pair, nb, start, end):
            self.trace.add(Span(name, "transfer", f"{pair[0]}->{pair[1]}", replica, step, start, end, nb, 0.0,
                                op, _link_names(route(*pair))))
        return self.env.process(collectives.run(self.env, self.network, schedule, record))

    # --- one replica's step graph ----------------------------------------------------------
    def run_graph(self, replica: int, step: int) -> GraphRun:
        plan, env = self.plan, self.env
        ops, devices = plan.ops, plan.devices[replica]
        waiting = [len(op.deps) for op in ops]
        left = [len(ops)]
        slot_left = list(self._bwd_per_slot)
        run = GraphRun(env.event(), [env.event() for _ in range(plan.slots)])

        def launch(op) -> None:
            if op.kind == "xfer":
                ev = self.transfer(devices[op.slot], devices[op.dst], op.bytes, replica, step,
                                   f"{op.why} L{op.layer}", op.why)
            else:
                ev = self.compute_op(devices[op.slot], op.flops, op.bytes, replica, step,
                                     f"{op.kind} L{op.layer}", op.kind)
            ev.callbacks.append(lambda _e: finish(op))

        def finish(op) -> None:
            for s in self._succ[op.id]:
                waiting[s] -= 1
                if waiting[s] == 0:
                    launch(ops[s])
            if op.kind == "bwd":
                slot_left[op.slot] -= 1
                if slot_left[op.slot] == 0:
                    run.slot_ready[op.slot].succeed()
            left[0] -= 1
            if left[0] == 0:
                run.done.succeed()

        for j, n in enumerate(slot_left):
            if n == 0:
                run.slot_ready[j].succeed()
        if not ops:
            run.done.succeed()
        for op in ops:
            if not op.deps:
                launch(op)
        return run


def _link_names(route) -> tuple[str, ...]:
    return tuple(f"{u}>{v}" for u, v in route)


@dataclass
class SimResult:
    trace: Trace
    sim_time_s: float
    sim_events: int
    wall_s: float
    steps: int
    solves: int = 0


Algorithm = Callable[[Engine, int], object]


def simulate(plan: Plan, steps: int | None = None, rng: np.random.Generator | None = None) -> SimResult:
    """Runs ``steps`` training steps (default: the scenario's) with the scenario's algorithm."""
    from .algorithms import ALGORITHMS
    sc = plan.scenario
    steps = steps or sc.training.steps
    engine = Engine(plan, rng=rng)
    t0 = time.perf_counter()
    engine.env.process(ALGORITHMS[sc.training.algorithm](engine, steps))
    engine.env.run()
    wall = time.perf_counter() - t0
    solves = getattr(engine.network, "fluid", None)
    return SimResult(engine.trace, engine.env.now, engine.env.events_processed, wall, steps,
                     (solves.solves if solves else 0) + engine.compute.fluid.solves)
