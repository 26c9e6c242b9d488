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

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import simpy

from .network import Network, Pair

OPS = ("allreduce", "allgather", "reducescatter", "broadcast", "alltoall")
ALGOS = ("ring", "tree", "ps")


@dataclass(frozen=True)
class Phase:
    pairs: tuple[Pair, ...]
    nbytes: float            # per pair
    messages: int = 1
    coupled: bool = True


def bus_factor(op: str, n: int) -> float:
    """busbw / algbw as nccl-tests defines it (PERFORMANCE.md)."""
    if n < 2:
        return 1.0
    return {"allreduce": 2 * (n - 1) / n, "broadcast": 1.0}.get(op, (n - 1) / n)


def _tree_edges(n: int) -> tuple[list[tuple[int, int]], int]:
    """(child, parent) pairs of a heap-ordered binary tree over ranks 0..n-1, and its depth."""
    return [(i, (i - 1) // 2) for i in range(1, n)], (n).bit_length() - 1


def phases(op: str, algo: str, devices: Sequence[str], nbytes: float) -> list[Phase]:
    """The schedule of ``op`` by ``algo`` over ``devices`` (rank order = list order).
    Raises ValueError for a combination that does not exist."""
    if op not in OPS or algo not in ALGOS:
        raise ValueError(f"unknown collective {op}/{algo}")
    n = len(devices)
    if n < 2 or nbytes <= 0:
        return []
    d = list(devices)
    ring = tuple((d[i], d[(i + 1) % n]) for i in range(n))
    if op == "alltoall" or algo == "ps":
        everyone = tuple((a, b) for a in d for b in d if a != b)
    if op == "alltoall":
        return [Phase(everyone, nbytes / n, coupled=False)]
    if algo == "ring":
        if op == "allreduce":
            return [Phase(ring, 2 * (n - 1) / n * nbytes, 2 * (n - 1))]
        if op == "broadcast":
            return [Phase(ring[:-1], nbytes, n - 1)]
        return [Phase(ring, (n - 1) / n * nbytes, n - 1)]
    if algo == "tree":
        edges, depth = _tree_edges(n)
        up = tuple((d[c], d[p]) for c, p in edges)
        down = tuple((d[p], d[c]) for c, p in edges)
        if op == "allreduce":
            return [Phase(up + down, nbytes, 2 * depth)]
        if op == "broadcast":
            return [Phase(down, nbytes, depth)]
        raise ValueError(f"the tree algorithm does allreduce and broadcast, not {op}")
    push = Phase(everyone, nbytes / n, coupled=False)
    if op == "allreduce":
        return [push, push]
    if op == "reducescatter" or op == "allgather":
        return [push]
    return [Phase(tuple((d[0], b) for b in d[1:]), nbytes / n, coupled=False), push]   # broadcast


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
