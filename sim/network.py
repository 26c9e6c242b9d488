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

from collections.abc import Sequence

import simpy

from sim.flows import link_weights
from sim.fluid import Fluid
from clustersim.core.topology import DirLink, Topology

Pair = tuple[str, str]


class Network:
    def __init__(self, env: simpy.Environment, topology: Topology) -> None:
        self.env, self.topology = env, topology

    def routes(self, pairs: Sequence[Pair]) -> list[tuple[DirLink, ...]]:
        return [self.topology.route(s, d) for s, d in pairs]

    def latency(self, routes: list[tuple[DirLink, ...]], messages: int) -> float:
        return messages * max((self.topology.route_latency(r) for r in routes), default=0.0)

    def send(self, pairs: Sequence[Pair], nbytes: float, messages: int = 1) -> simpy.Event:
        raise NotImplementedError


class FlowNetwork(Network):
    def __init__(self, env: simpy.Environment, topology: Topology) -> None:
        super().__init__(env, topology)
        self.fluid = Fluid(env, topology.capacity)

    def send(self, pairs, nbytes, messages=1):
        routes = self.routes(pairs)
        return self.env.process(self._send(routes, nbytes, messages))

    def _send(self, routes, nbytes, messages):
        delay = self.latency(routes, messages)
        if delay:
            yield self.env.timeout(delay)
        yield self.fluid.start(link_weights(routes), nbytes)


class AnalyticalNetwork(Network):
    def send(self, pairs, nbytes, messages=1):
        routes = self.routes(pairs)
        bw = min((self.topology.route_bandwidth(r) for r in routes), default=float("inf"))
        return self.env.timeout(self.latency(routes, messages) + (nbytes / bw if routes and nbytes else 0.0))


BACKENDS = {"flow": FlowNetwork, "analytical": AnalyticalNetwork}
