"""Collective algorithms as phases: which device pairs move how many bytes, in what order.

A ``Phase`` is a set of (src, dst) pairs each moving ``nbytes``; a *coupled* phase moves
in lockstep (one ring: it advances at the pace of its slowest hop), otherwise its
transfers are independent and the phase ends when the last one does.  Phases of one
``wave`` run at once (the channels of a multi-channel ring); waves run one after another.
The plan reads these to check routes, the simulator runs them on a network
(``sim.collectives``).

The algorithms are NCCL's (``src/graph/rings.cc``, ``trees.cc``, ``connect.cc``):
- ``ring``: one ring per channel.  Over several machines there is one channel per NIC
  (rail): it enters every machine by its NIC and leaves by the same one (``ring_channels``).
  On one machine it is a single ring in the given order.
- ``tree``: NCCL's double binary tree across machines, a chain inside each; two trees
  (each carries half the data) per rail, chunks streaming up and down at once.
- ``hierarchical``: reduce-scatter inside every machine, an allreduce of each 1/G shard
  across machines on the G rails at once (one ring per rail), all-gather inside.
- ``nvls`` (NVLink SHARP, one machine): every GPU reads its 1/n shard reduced by the
  NVSwitch from all n GPUs (``multimem.ld_reduce``), then writes it once to all of them
  (``multimem.st``), the two pipelined: each GPU's link to the switch carries its S to the
  others' reductions plus its own shard's S/n each way, S (n+1)/n, where a ring carries
  2 (n-1)/n S (as NCCL's NVLS search charges it: each channel's head twice, the others
  once, ``ncclTopoSearchTryNvls`` in ``src/graph/search.cc``).
- ``nvls_tree`` (NVLS_TREE, several machines): NVLS inside every machine, each rail's
  shard S/G reduced to the GPU by rail G's NIC (its head), a double binary tree of the
  heads across machines (each tree half the shard), multicast back; all pipelined.
- ``ps``: a parameter server sharded over the n ranks (push S/n to every shard, fetch back).
- ``auto``: NCCL's tuner picks ring, tree or NVLS per size (``clustersim.core.nccl``, run by the
  simulator); as phases it is every pair either may use (what a route check needs).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

Pair = tuple[str, str]
Port = tuple[str, str, str]      # one rail of a machine: (its NIC, the device entering by it, the one leaving)

OPS = ("allreduce", "allgather", "reducescatter", "broadcast", "alltoall")
ALGOS = ("auto", "ring", "tree", "nvls", "nvls_tree", "hierarchical", "ps")


@dataclass(frozen=True)
class Phase:
    pairs: tuple[Pair, ...]
    nbytes: float            # per pair
    messages: int = 1        # steps in sequence: latency is paid per step
    coupled: bool = True
    wave: int = 0            # phases of one wave run at once; waves one after another
    path: tuple[Pair, ...] = ()   # hops one chunk crosses in sequence (latency); (): ``messages`` mean hops


def bus_factor(op: str, n: int) -> float:
    """busbw / algbw as nccl-tests defines it (PERFORMANCE.md)."""
    if n < 2:
        return 1.0
    return {"allreduce": 2 * (n - 1) / n, "broadcast": 1.0}.get(op, (n - 1) / n)


def binary_tree(n: int) -> list[int]:
    """Parent of every rank 0..n-1 (-1: the root) in NCCL's in-order binary tree: rank r's
    parent flips r's lowest set bit b off and sets the next one, (r ^ b) | 2b, or just
    clears b when that rank does not exist.  Depth is ceil(log2 n)."""
    parents = [-1] * n
    for r in range(1, n):
        low = r & -r
        up = (r ^ low) | (low << 1)
        parents[r] = up if up < n else r ^ low
    return parents


def double_binary_tree(n: int) -> tuple[list[int], list[int]]:
    """NCCL's two complementary trees (Sanders et al.'s double binary tree as NCCL builds
    it): the second is the first mirrored (n even) or shifted by one (n odd), so a rank
    that is interior in one tree is a leaf in the other."""
    first = binary_tree(n)
    if n % 2:
        shift = [-1] * n
        for r, p in enumerate(first):
            shift[(r + 1) % n] = -1 if p < 0 else (p + 1) % n
        return first, shift
    return first, [-1 if first[n - 1 - r] < 0 else n - 1 - first[n - 1 - r] for r in range(n)]


def depth(parents: list[int]) -> int:
    def up(r: int) -> int:
        d = 0
        while parents[r] >= 0:
            r, d = parents[r], d + 1
        return d
    return max((up(r) for r in range(len(parents))), default=0)


def _machines(devices: list[str], nodes: Sequence[int] | None) -> list[list[str]]:
    """Devices grouped by machine, machines in order of first appearance."""
    if nodes is None:
        return [devices]
    groups: dict[int, list[str]] = {}
    for dev, node in zip(devices, nodes):
        groups.setdefault(node, []).append(dev)
    return list(groups.values())


def _chain(local: list[str], entry: int, leave: int) -> list[str]:
    """Every device of a machine once, starting at index ``entry`` and ending at ``leave``;
    where ``leave`` is ``entry`` on a machine of several, back at the entry after the others
    (PXN: the last sends to the NIC through the member beside it, ``sim.collectives.ports``)."""
    g = len(local)
    middle = [k % g for k in range(entry + 1, entry + g) if k % g != leave]
    return [local[entry]] + [local[k] for k in middle] + ([local[leave]] if leave != entry or g > 1 else [])


def ring_channels(devices: Sequence[str], nodes: Sequence[int] | None = None,
                  ports: Sequence[Sequence[Port]] | None = None) -> list[list[Pair]]:
    """The hops of every ring channel, in ring order.  With ``ports`` (per machine, in order
    of first appearance: (nic, entry, exit) per rail) and several machines, channel c enters
    every machine at rail c's entry device, visits the others, and leaves from rail c's exit
    device through rail c's NIC to the next machine's entry: ``(exit, nic), (nic, entry)``,
    so every NIC carries one channel each way and traffic stays on its rail (NCCL's rings on
    rail-optimised fabrics).  Otherwise one ring in the given order."""
    d = list(devices)
    groups = _machines(d, nodes)
    if len(groups) == 1 or not ports or len(ports) != len(groups):
        return [[(d[i], d[(i + 1) % len(d)]) for i in range(len(d))]]
    channels = []
    for c in range(min(len(p) for p in ports)):
        chains = [_chain(local, local.index(ports[i][c][1]), local.index(ports[i][c][2]))
                  for i, local in enumerate(groups)]
        hops: list[Pair] = []
        for i, chain in enumerate(chains):
            hops += list(zip(chain, chain[1:]))
            nic, nxt = ports[i][c][0], chains[(i + 1) % len(chains)][0]
            hops += [(chain[-1], nic), (nic, nxt)]
        channels.append(hops)
    return channels


def _ring(op: str, hops: list[Pair], n: int, nbytes: float, wave: int = 0) -> Phase:
    """One ring channel of ``n`` ranks over ``hops`` (a closed ring; NIC relays take no step)."""
    pairs = tuple(hops)
    if op == "allreduce":
        return Phase(pairs, 2 * (n - 1) / n * nbytes, 2 * (n - 1), wave=wave)
    if op == "broadcast":
        return Phase(pairs[:-1], nbytes, n - 1, wave=wave)
    return Phase(pairs, (n - 1) / n * nbytes, n - 1, wave=wave)


def _loop(order: list[str]) -> list[Pair]:
    return [(order[i], order[(i + 1) % len(order)]) for i in range(len(order))]


def _trees(op: str, groups: list[list[str]], nbytes: float, ports: Sequence[Sequence[Port]] | None) -> list[Phase]:
    """Double binary trees across machines on every rail, a chain inside each machine
    headed by the device nearest the rail's NIC."""
    use = ports if ports and len(ports) == len(groups) else None
    channels = min(len(p) for p in use) if use else 1
    out = []
    for c in range(channels):
        heads = [local.index(use[i][c][1]) if use else 0 for i, local in enumerate(groups)]
        chains = [local[h:] + local[:h] for h, local in zip(heads, groups)]
        intra = [(ch[k + 1], ch[k]) for ch in chains for k in range(len(ch) - 1)]
        for parents in (double_binary_tree(len(groups)) if len(groups) > 1 else ([-1],)):
            inter = [(chains[r][0], chains[p][0]) for r, p in enumerate(parents) if p >= 0]
            up = tuple(intra + inter)
            down = tuple((b, a) for a, b in up)
            path_up = [(chains[0][k + 1], chains[0][k]) for k in range(len(chains[0]) - 1)]
            path_up += _deepest_path(parents, chains)
            share = nbytes / channels / (2 if len(groups) > 1 else 1)
            steps = len(path_up)
            if op == "allreduce":
                path = tuple(path_up) + tuple((b, a) for a, b in reversed(path_up))
                out.append(Phase(up + down, share, 2 * steps, path=path))
            else:                                                    # broadcast: down only
                out.append(Phase(down, share, steps, path=tuple((b, a) for a, b in reversed(path_up))))
    return out


def _deepest_path(parents: list[int], chains: list[list[str]]) -> list[Pair]:
    """The tree hops from the deepest rank up to the root."""
    best: list[Pair] = []
    for r in range(len(parents)):
        hops, x = [], r
        while parents[x] >= 0:
            hops.append((chains[x][0], chains[parents[x]][0]))
            x = parents[x]
        if len(hops) > len(best):
            best = hops
    return best


def phases(op: str, algo: str, devices: Sequence[str], nbytes: float,
           nodes: Sequence[int] | None = None, ports: Sequence[Sequence[Port]] | None = None,
           switches: Sequence[str] | None = None) -> list[Phase]:
    """The schedule of ``op`` by ``algo`` over ``devices`` (rank order = list order).
    ``nodes``: the machine of every device (None: one machine); ``ports``: every machine's
    rails (``ring_channels``); ``switches``: every machine's NVSwitch (NVLS).  Raises
    ValueError for a combination that does not exist."""
    if op not in OPS or algo not in ALGOS:
        raise ValueError(f"unknown collective {op}/{algo}")
    n = len(devices)
    if n < 2 or nbytes <= 0:
        return []
    d = list(devices)
    if op == "alltoall" or algo == "ps":
        everyone = tuple((a, b) for a in d for b in d if a != b)
    if op == "alltoall":
        if algo != "auto":
            raise ValueError(f"alltoall runs as direct sends between every pair, as NCCL's does; not by {algo} "
                             f"(give auto)")
        return [Phase(everyone, nbytes / n, coupled=False)]
    if algo == "auto":
        both = phases(op, "ring", d, nbytes, nodes, ports)
        return both + (phases(op, "tree", d, nbytes, nodes, ports) if op in ("allreduce", "broadcast") else [])
    if algo == "ring":
        channels = ring_channels(d, nodes, ports)
        return [_ring(op, hops, n, nbytes / len(channels)) for hops in channels]
    if algo == "tree":
        if op not in ("allreduce", "broadcast"):
            raise ValueError(f"the tree algorithm does allreduce and broadcast, not {op}")
        return _trees(op, _machines(d, nodes), nbytes, ports)
    if algo == "hierarchical":
        return _hierarchical(op, _machines(d, nodes), nbytes)
    if algo in ("nvls", "nvls_tree"):
        return _nvls(op, algo, _machines(d, nodes), nbytes, ports, switches)
    push = Phase(everyone, nbytes / n, coupled=False)
    fetch = Phase(everyone, nbytes / n, coupled=False, wave=1)
    if op == "allreduce":
        return [push, fetch]
    if op == "reducescatter" or op == "allgather":
        return [push]
    return [Phase(tuple((d[0], b) for b in d[1:]), nbytes / n, coupled=False), fetch]   # broadcast


def _hierarchical(op: str, groups: list[list[str]], nbytes: float) -> list[Phase]:
    """Reduce-scatter inside each machine, allreduce of each shard across machines on its
    rail, all-gather inside (Horovod's and NCCL's hierarchical allreduce)."""
    if op != "allreduce":
        raise ValueError(f"the hierarchical algorithm does allreduce, not {op}")
    g = len(groups[0])
    if any(len(x) != g for x in groups):
        raise ValueError("the hierarchical algorithm needs the same number of ranks on every machine")
    out: list[Phase] = []
    if g > 1:
        out += [_ring("reducescatter", _loop(local), g, nbytes, wave=0) for local in groups]
    if len(groups) > 1:
        out += [_ring("allreduce", _loop([local[k] for local in groups]), len(groups), nbytes / g, wave=1)
                for k in range(g)]
    if g > 1:
        out += [_ring("allgather", _loop(local), g, nbytes, wave=2) for local in groups]
    return out


def _nvls(op: str, algo: str, groups: list[list[str]], nbytes: float, ports: Sequence[Sequence[Port]] | None,
          switches: Sequence[str] | None) -> list[Phase]:
    """NVLink SHARP: S (g+1)/g each way on every GPU's link to its machine's switch; with
    several machines, a double binary tree per rail over the rails' heads, S/G/2 per tree
    and direction, all in one wave (NCCL pipelines the in-switch and network parts)."""
    if op != "allreduce":
        raise ValueError(f"NVLS runs allreduce, not {op}")
    if algo == "nvls" and len(groups) > 1:
        raise ValueError("nvls runs inside one machine; across machines NCCL runs nvls_tree")
    if algo == "nvls_tree" and len(groups) < 2:
        raise ValueError("nvls_tree runs across machines; inside one NCCL runs nvls")
    if not switches or len(switches) != len(groups):
        raise ValueError("NVLS needs an NVSwitch in every machine")
    out = []
    for local, nvs in zip(groups, switches):
        g = len(local)
        out.append(Phase(tuple((x, nvs) for x in local) + tuple((nvs, x) for x in local), nbytes * (g + 1) / g))
    if len(groups) > 1:
        if not ports or len(ports) != len(groups):
            raise ValueError("nvls_tree needs every machine's NICs")
        rails = min(len(p) for p in ports)
        for c in range(rails):
            heads = [ports[i][c][1] for i in range(len(groups))]
            for parents in double_binary_tree(len(groups)):
                up = tuple((heads[r], heads[p]) for r, p in enumerate(parents) if p >= 0)
                out.append(Phase(up + tuple((b, a) for a, b in up), nbytes / rails / 2, 2 * depth(parents)))
    return out
