"""Collective algorithms as phases: which device pairs move how many bytes, in what order.

A ``Phase`` is a set of (src, dst) pairs each moving ``nbytes``; a *coupled* phase moves
in lockstep (one ring: it advances at the pace of its slowest hop), otherwise its
transfers are independent and the phase ends when the last one does.  The plan reads
these to check routes, the simulator runs them on a network (``sim.collectives``).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

Pair = tuple[str, str]

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
