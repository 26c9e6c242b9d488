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

import numpy as np
import simpy

from sim.flows import link_weights
from sim.fluid import Fluid, fire_now, timeout_at
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
    """``shortcut``: the fluid's resources are the topology's link ids and a send's links are
    counted and weighted as int arrays (a collective's phase loads thousands); False keeps
    links as tuples of names, counted by ``link_weights`` -- the same weights in the same order.
    A speed that is a bound method of a table with ``at(ids)`` (``collectives``' NCCL speeds)
    gives a phase's speeds from it, kept by the table across networks; other functions' are
    kept by this network."""

    def __init__(self, env: simpy.Environment, topology: Topology, shortcut: bool = True) -> None:
        super().__init__(env, topology, shortcut)
        self.by_id = shortcut
        self.fluid = Fluid(env, list(topology.capacity.values()) if shortcut else topology.capacity, shortcut)
        # per distinct tuple of pairs: [the links they load, their slowest route's latency or None,
        # (link ids, counts) as arrays or None, weights by speed function]
        self._patterns: dict[tuple[Pair, ...], list] = {}
        self._patterns_of: Topology | None = None     # the topology they were routed on
        self._speeds: dict[Callable, np.ndarray] = {}      # a speed function -> its values by link id
        # shortcut: sends whose latency timers would sit next to each other in simpy's queue
        # (a tensor group's pieces) share one: [its time, the last send's event id, the sends]
        self._last: list | None = None

    def send(self, pairs, nbytes, messages=1, latency=None, speed=None):
        pattern = self._pattern(pairs)
        weights = pattern[0]
        if speed is not None:                       # n / speed(link), link by link, in C loops
            weighted = pattern[3]
            if speed in weighted:                   # a tensor group's pieces repeat their pairs
                weights = weighted[speed]
            elif not self.by_id:
                weights = dict(zip(weights, map(truediv, weights.values(), map(speed, weights))))
            elif pattern[2] is None:
                if len(weighted) >= _SPEED_TABLES:
                    weighted.clear()                # functions made per send: keep a few
                links = map(self.topology.links.__getitem__, weights)
                weights = weighted[speed] = dict(zip(weights, map(truediv, weights.values(), map(speed, links))))
            else:
                ids, counts = pattern[2]
                weights = dict(zip(weights, (counts / self._speed_at(speed, ids)).tolist()))
        if latency is None:
            if pattern[1] is None:                  # only sends without a model's latency need it
                pattern[1] = self.latency(self.routes(pairs), 1)
            latency = messages * pattern[1]
        if not latency:
            return self.fluid.start(weights, nbytes)
        # the latency, then the bytes: callbacks, where a process would cost two more events
        # a message (decision 049)
        done, fluid, env = self.env.event(), self.fluid, self.env
        if self.by_id:
            # the timer this send would arm sits next to the last send's in simpy's queue (the
            # same time, the next event id): ride on that one, in the order the sends were made
            eid, at = next(env._eid), env.now + latency          # as ``env.timeout(latency)`` schedules it
            last = self._last
            if last is not None and last[0] == at and last[1] == eid - 1:
                last[1] = eid
                last[2].append((weights, nbytes, done))
            else:
                due = [(weights, nbytes, done)]
                self._last = [at, eid, due]
                timeout_at(env, at, eid).callbacks.append(lambda _timer: self._start_due(due))
            return done

        def flow(_timer: simpy.Event) -> None:
            fluid.start(weights, nbytes).callbacks.append(lambda _e: fire_now(done, None))
        self.env.timeout(latency).callbacks.append(flow)
        return done

    def _start_due(self, due: list) -> None:
        """The bytes of sends whose timers would have fired one after another, now, each
        job firing its send's own event (``Fluid.start``'s ``event``)."""
        if self._last is not None and self._last[2] is due:
            self._last = None                       # fired: no later send joins it
        start = self.fluid.start
        for weights, nbytes, done in due:
            start(weights, nbytes, done)

    def _pattern(self, pairs: Sequence[Pair]) -> list:
        """[the links ``pairs`` load (link -> routes crossing it, in order of first use), their
        slowest route's latency (None until asked), (link ids, counts) as arrays (None: few
        links), a speed function -> those links' weights at its speeds (few links by id only:
        the speed functions a network meets are the engine's, kept for the run)], routed once
        per distinct set of pairs (a collective's rounds repeat the same ones) and topology (a
        cut link gives the engine a new one)."""
        if self._patterns_of is not self.topology:
            self._patterns, self._patterns_of = {}, self.topology
        key = tuple(pairs)
        found = self._patterns.get(key)
        if found is None:
            weights, arrays = link_counts(self.topology, pairs) if self.by_id else (link_weights(self.routes(pairs)), None)
            found = self._patterns[key] = [weights, None, arrays, {}]
        return found

    def _speed_at(self, speed: Callable[[DirLink], float], ids: np.ndarray) -> np.ndarray:
        """``speed`` of each link of ``ids``, each link's asked once per function and kept by id
        (a bound method of one table is one key: it hashes and compares by its table)."""
        at = getattr(getattr(speed, "__self__", None), "at", None)
        if at is not None:
            return at(ids)
        table = self._speeds.get(speed)
        if table is None:
            if len(self._speeds) >= _SPEED_TABLES:
                self._speeds.clear()                   # functions made per send: keep a few
            table = self._speeds[speed] = np.full(len(self.topology.links), np.nan)
        out = table[ids]
        missing = np.isnan(out)
        if missing.any():
            new = ids[missing]
            links = self.topology.links
            table[new] = out[missing] = list(map(speed, map(links.__getitem__, new.tolist())))
        return out

def link_counts(topology: Topology, pairs: Sequence[Pair]) -> tuple[dict[int, int], tuple | None]:
    """``link_weights`` of the pairs' routes by link id (the same counts in the same order:
    of first use), and, from ``_ARRAYS`` hops on, (ids, counts) as int arrays (counted by
    ``np.unique`` over all the routes' hops at once, for the phases of large groups)."""
    hops = np.frombuffer(topology.route_ids(pairs), dtype=np.int32)
    if len(hops) < _ARRAYS:
        return link_weights([hops.tolist()]), None
    ids, first, counts = np.unique(hops, return_index=True, return_counts=True)
    order = np.argsort(first)
    ids, counts = ids[order].astype(np.int64), counts[order]
    return dict(zip(ids.tolist(), counts.tolist())), (ids, counts)


# From this many links (or hops) on, a send's links are counted and weighted as arrays:
# below it the arrays' set-up costs more than the loops (a message crosses a few links).
_ARRAYS = 64

# Speed functions other than tables with ``at`` kept by link id at once per network
_SPEED_TABLES = 16


class AnalyticalNetwork(Network):
    def send(self, pairs, nbytes, messages=1, latency=None, speed=None):
        routes = self.routes(pairs)
        bw = min((self.topology.capacity[ln] * (speed(ln) if speed else 1.0) for r in routes for ln in r),
                 default=float("inf"))
        delay = self.latency(routes, messages) if latency is None else latency
        return self.env.timeout(delay + (nbytes / bw if routes and nbytes else 0.0))


BACKENDS = {"flow": FlowNetwork, "analytical": AnalyticalNetwork}
