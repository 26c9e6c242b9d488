"""Collective algorithms as phases of transfers, run on any network backend.

A ``Phase`` is a set of (src, dst) pairs each moving ``nbytes``; a *coupled* phase moves
in lockstep (one ring: it advances at the pace of its slowest hop), otherwise its
transfers are independent and the phase ends when the last one does.

Closed forms on a uniform ring of n ranks with per-hop latency a and bandwidth B
(message size S): ring allreduce 2(n-1)a + 2(n-1)/n S/B; ring reduce-scatter and
allgather (n-1)a + (n-1)/n S/B; pipelined ring broadcast (n-1)a + S/B.  The binary tree
is pipelined as NCCL's is: chunks stream up and back down at once, so an allreduce over
a tree of depth d costs 2d a plus the time its busiest link needs: with one link per
rank, an interior rank's carries three streams out (to its parent and two children), 3 S/B.
Ranks are placed in list order (heap-ordered); NCCL's topology-aware trees (one rank per
node across nodes) and its second, complementary tree are not modelled.  ``ps`` is a parameter server sharded over the n ranks: everyone
pushes S/n to every shard, then fetches S/n from every shard.
"""
from __future__ import annotations

from collections.abc import Callable

import simpy

from clustersim.core.collective import ALGOS, OPS, Phase, bus_factor, phases  # noqa: F401  (the simulator's collective API)
from sim.network import Network, Pair

Record = Callable[[Pair, float, float, float], None]   # (pair, bytes, start_s, end_s)


def run(env: simpy.Environment, network: Network, schedule: list[Phase], record: Record | None = None):
    """A simpy process body: runs the phases one after another."""
    for ph in schedule:
        start = env.now
        if ph.coupled:
            yield network.send(ph.pairs, ph.nbytes, ph.messages)
            ends = [env.now] * len(ph.pairs)
        else:
            events = [network.send([p], ph.nbytes, ph.messages) for p in ph.pairs]
            ends = [0.0] * len(events)
            for i, ev in enumerate(events):
                ev.callbacks.append(lambda _e, i=i: ends.__setitem__(i, env.now))
            yield env.all_of(events)
        if record:
            for pair, end in zip(ph.pairs, ends):
                record(pair, ph.nbytes, start, end)
