"""Network backends behind one small interface (ASTRA-sim's idea): ``send``.

``send(pairs, nbytes, messages)`` moves ``nbytes`` from each ``src`` to its ``dst`` and
returns an event that fires when all have arrived.  The pairs move in lockstep (a ring
round advances at its slowest hop), and each pair pays its route's latency once per
message (a ring allreduce of n ranks is 2(n-1) messages).

- ``FlowNetwork``: every send is a fluid job over the directed links of its routes;
  bandwidth is shared max-min fairly with all other traffic, re-solved on every change.
- ``AnalyticalNetwork``: alpha-beta, no contention: latency + bytes / route bandwidth.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from operator import truediv

import simpy

from sim.flows import link_weights
from sim.fluid import Fluid
from clustersim.core.topology import DirLink, Topology

Pair = tuple[str, str]


class Network:
    def __init__(self, env: simpy.Environment, topology: Topology, shortcut: bool = True) -> None:
        """``shortcut``: handed to the flow model's ``Fluid`` (a lone job solved at once)."""
        self.env, self.topology = env, topology

    def routes(self, pairs: Sequence[Pair]) -> list[tuple[DirLink, ...]]:
        return [self.topology.route(s, d) for s, d in pairs]

    def latency(self, routes: list[tuple[DirLink, ...]], messages: int) -> float:
        return messages * max((self.topology.route_latency(r) for r in routes), default=0.0)

    def send(self, pairs: Sequence[Pair], nbytes: float, messages: int = 1,
             latency: float | None = None, speed: Callable[[DirLink], float] | None = None) -> simpy.Event:
        """``latency``: seconds before the bytes flow, given by the caller (a collective's
        model); None: ``messages`` x the slowest route's latency.  ``speed``: the share of
        each link's capacity this traffic reaches (NCCL's link speeds); None: all of it."""
        raise NotImplementedError


class FlowNetwork(Network):
    def __init__(self, env: simpy.Environment, topology: Topology, shortcut: bool = True) -> None:
        super().__init__(env, topology, shortcut)
        self.fluid = Fluid(env, topology.capacity, shortcut)
        # per distinct tuple of pairs: [the links they load, their slowest route's latency or None]
        self._patterns: dict[tuple[Pair, ...], list] = {}
        self._patterns_of: Topology | None = None     # the topology they were routed on

    def send(self, pairs, nbytes, messages=1, latency=None, speed=None):
        pattern = self._pattern(pairs)
        weights = pattern[0]
        if speed is not None:                       # n / speed(link), link by link, in C loops
            weights = dict(zip(weights, map(truediv, weights.values(), map(speed, weights))))
        if latency is None:
            if pattern[1] is None:                  # only sends without a model's latency need it
                pattern[1] = self.latency(self.routes(pairs), 1)
            latency = messages * pattern[1]
        return self.env.process(self._send(weights, nbytes, latency))

    def _pattern(self, pairs: Sequence[Pair]) -> list:
        """[the links ``pairs`` load, their slowest route's latency (None until asked)],
        routed once per distinct set of pairs (a collective's rounds repeat the same ones)
        and topology (a cut link gives the engine a new one)."""
        if self._patterns_of is not self.topology:
            self._patterns, self._patterns_of = {}, self.topology
        key = tuple(pairs)
        found = self._patterns.get(key)
        if found is None:
            found = self._patterns[key] = [link_weights(self.routes(pairs)), None]
        return found

    def _send(self, weights, nbytes, delay):
        if delay:
            yield self.env.timeout(delay)
        yield self.fluid.start(weights, nbytes)


class AnalyticalNetwork(Network):
    def send(self, pairs, nbytes, messages=1, latency=None, speed=None):
        routes = self.routes(pairs)
        bw = min((self.topology.capacity[ln] * (speed(ln) if speed else 1.0) for r in routes for ln in r),
                 default=float("inf"))
        delay = self.latency(routes, messages) if latency is None else latency
        return self.env.timeout(delay + (nbytes / bw if routes and nbytes else 0.0))


BACKENDS = {"flow": FlowNetwork, "analytical": AnalyticalNetwork}
