"""The partitioned network for one training step, as data: both runners consume it.

``plan(scenario)`` decides everything about partitioning once: the boxes each device slot
computes, the per-replica op graph (forward, backward, transfers, with dependencies), the
devices every (replica, slot) and parameter-server shard is placed on, how gradients are
combined, what each device must hold in memory, and the training schedule (``schedule``).

Ops name *slots* (0..M-1), not devices, so one graph serves every replica; the engine
maps slot j of replica r to ``plan.devices[r][j]``.  ``plan.ops`` is topological, and each
slot's compute ops come in it in the order the slot's device runs them: the pipeline
schedule's (``parallel.schedule``; ``slot_sequence``), which both runners follow.
"""
from __future__ import annotations

import dataclasses
import functools
import heapq
from dataclasses import dataclass, field
from math import ceil, prod, sqrt

from clustersim.core.config import ConfigError
from clustersim.core.layers import Box, Part, Shape, box_hull, box_intersect, box_overlap, box_size
from clustersim.core.models import Model, tied_embedding
from clustersim.core.partition import (Parts, Slices, cut_along, even_cuts, layer_slices, pipeline_slices,
                                       spatial_slices, tensor_slices)
from clustersim.core.scenario import Scenario
from clustersim.core.schedule import (PARAM_BYTES, Schedule, micro_batches_held,  # noqa: F401  (PARAM_BYTES: plan's users)
                                      optimizer_bytes, schedule_of, stage_units)
from clustersim.core.topology import SPLIT, STAGE

RECOMPUTE = ("recompute reduce-scatter", "recompute all-gather")   # a recomputed forward's allreduces
GIB = 2**30


@dataclass(frozen=True)
class Op:
    """One node of the per-replica step graph.

    kind: ``fwd`` / ``bwd`` (compute on ``slot``) or ``xfer`` (``slot`` -> ``dst``).
    why (xfer): ``activation`` (full exchange), ``halo`` (rows a neighbour's receptive
    fields read), ``gradient`` (the backward of either), ``reduction`` (softmax or
    batch-norm statistics), ``stage`` (pipeline boundary); a tensor split's allreduces
    (``allreduce``): ``reduce-scatter`` and ``all-gather`` of a partial sum, ``gradient
    reduce-scatter`` and ``gradient all-gather`` of a whole input's gradient, and with
    full ``training.recompute`` the forward's again (``RECOMPUTE``: the simulator's cost of rerunning
    it; the executor, keeping activations, leaves them out).
    An activation, halo, stage or gradient transfer carries (the gradient of) a part of
    layer ``producer``'s output (``Edge``); its ``layer`` is the first layer reading it.
    """

    id: int
    kind: str
    layer: int
    micro: int
    slot: int
    dst: int = -1
    flops: float = 0.0       # compute: FLOPs
    bytes: float = 0.0       # compute: memory traffic; xfer: payload
    why: str = ""
    deps: tuple[int, ...] = ()
    producer: int = -1       # xfer: the layer whose output (or its gradient) it carries; -1: a reduction


@dataclass(frozen=True)
class PSLayout:
    devices: tuple[str, ...]                # per shard
    sizes: tuple[int, ...]                  # parameters per shard
    share: tuple[tuple[int, ...], ...]      # [slot][shard]: parameters of the slot kept on the shard


@dataclass(frozen=True)
class Plan:
    scenario: Scenario
    slices: Slices
    axes: tuple[str, ...]
    ops: tuple[Op, ...]                     # topological; each slot's compute ops in the order its device runs them
    devices: tuple[tuple[str, ...], ...]    # [replica][slot]
    slot_params: tuple[int, ...]
    sync: str                               # none | allreduce | ps
    ps: PSLayout | None
    schedule: Schedule                      # when replicas fetch, push, average; shard rules; units; quorum
    memory: dict[str, dict[str, float]] = field(default_factory=dict)
    parts: Parts = ()                       # tensor split: per layer, (slot, lo, hi) of each partial sum

    @property
    def slots(self) -> int:
        return len(self.slot_params)

    @property
    def replicas(self) -> int:
        return len(self.devices)


def plan(sc: Scenario, check_memory: bool = True, ops: bool = True) -> Plan:
    """Raises ConfigError (naming the scenario file and field) when the split cannot be
    placed on the topology or does not fit in memory.  ``ops=False``: placement and memory
    only (no step graph, no route check), what search asks before it simulates."""
    par, model = sc.parallel, sc.model
    m = par.model_parallel
    if par.split == "layers":
        if m > len(model.nodes):
            raise ConfigError(sc.file, "parallel.model_parallel",
                              f"a layers split has at most {len(model.nodes)} stages (one per layer); got {m}")
        slices, axes = layer_slices(model, m)
    elif par.split == "tensor":
        for node in model.nodes:                 # Megatron-LM gives each slot whole heads, as many on each
            if node.layer.kind == "attention" and node.layer.heads % m:
                raise ConfigError(sc.file, "parallel.model_parallel",
                                  f"the tensor split gives every slot the same whole heads: attention layer "
                                  f"{node.name} has {node.layer.heads} heads, which do not divide by {m}")
        try:
            slices, axes, parts = tensor_slices(model, par.pipeline, m, par.sequence_parallel)
        except ValueError as exc:
            raise ConfigError(sc.file, "parallel.pipeline", str(exc)) from None
    elif par.pipeline > 1:
        slices, axes = pipeline_slices(model, par.pipeline, m, par.grid)
    else:
        slices, axes = spatial_slices(model, m, par.grid)
    if par.split != "tensor":
        parts = ()
    slot_params = [0] * par.devices_per_replica
    for i, layer_slices_ in enumerate(slices):
        for slot, box in layer_slices_:
            slot_params[slot] += params_of(model, parts, i, slot, box)
    for _, slot, _, n in table_copies(model, slices, par.tensor):
        slot_params[slot] += n
    devices, ps = _place(sc, slices, slot_params)
    if sc.training.allreduce == "hierarchical" and not ps and par.replicas > 1:
        uneven = next((j for j in range(par.devices_per_replica)
                       if not sc.topology.even_machines([row[j] for row in devices])), None)
        if uneven is not None:                      # the layout could not lay it out at the first allreduce
            raise ConfigError(sc.file, "training.allreduce",
                              f"hierarchical needs as many replicas on every machine; slot {uneven}'s "
                              f"{par.replicas} sit unevenly on {sc.topology.name}'s machines (set ring, tree or auto)")
    sync = "ps" if par.ps_shards else ("allreduce" if par.replicas > 1 else "none")
    p = Plan(sc, slices, axes, (), devices, tuple(slot_params), sync, ps, schedule_of(sc), parts=parts)
    p.memory.update(memory_use(p))                   # needs no ops: a plan that does not fit says so at once
    if check_memory:
        _check_memory(p)
    if not ops:
        return p
    p = dataclasses.replace(p, ops=tuple(_ops(sc, slices, axes, parts)))
    _check_routes(p)
    return p


# --- what a slot computes and reads -----------------------------------------------------------
def part_of(model: Model, parts: Parts, i: int, slot: int) -> Part | None:
    """Layer i's partial sum on ``slot`` under a tensor split (``Layer.part``), or None."""
    for s, lo, hi in parts[i] if parts else ():
        if s == slot:
            node = model.nodes[i]
            return node.layer.part(node.in_shape, lo, hi, s == parts[i][0][0])
    return None


def reads(model: Model, parts: Parts, i: int, slot: int, box: Box) -> tuple[Box, ...]:
    """Per input of layer i, the box of it that ``slot`` (computing ``box``) reads."""
    part = part_of(model, parts, i, slot)
    node = model.nodes[i]
    return (part.reads,) if part else node.layer.input_boxes(node.in_shapes, box)


def params_of(model: Model, parts: Parts, i: int, slot: int, box: Box) -> int:
    """Parameters layer i keeps on ``slot`` (every copy counted: a replicated norm's on each)."""
    part = part_of(model, parts, i, slot)
    node = model.nodes[i]
    return part.layer.params(part.in_shape) if part else node.layer.slice_params(node.in_shape, box)


def table_copies(model: Model, slices: Slices, tensor: int) -> list[tuple[int, int, int, int]]:
    """(head, slot, partner, elements) for each slice of a tied LM head on a slot that holds
    no slice of the embedding it is tied to (a later pipeline stage): Megatron-LM keeps a copy
    of the table there (its words' rows), counted in the slot's parameters, and after the
    backward allreduces the copy's gradient with the embedding's slot of the same tensor rank
    (``partner``; Megatron's embedding group, ``_allreduce_embedding_grads``)."""
    out = []
    for node, layer_slices_ in zip(model.nodes, slices):
        if node.layer.kind != "lm_head" or not node.layer.tied:
            continue
        holders = [k for k, _ in slices[tied_embedding(model.nodes, node)]]
        for slot, box in layer_slices_:
            if slot not in holders:
                partner = next((k for k in holders if k % tensor == slot % tensor), holders[0])
                out.append((node.index, slot, partner, (box[0][1] - box[0][0]) * node.in_shape[0]))
    return out


def param_index(model: Model, parts: Parts, i: int, slot: int, box: Box) -> list:
    """Where ``slot``'s parameters of layer i sit inside the whole layer's arrays (in order;
    fewer than the layer's arrays where a part leaves the bias to another slot)."""
    part = part_of(model, parts, i, slot)
    return part.index if part else model.nodes[i].layer.box_index(box)


def replicated(layer_slices_) -> bool:
    """Whether every slot holds the same box (the whole output: a tensor split's norms,
    residual sums and partial sums)."""
    return len(layer_slices_) > 1 and layer_slices_[0][1] == layer_slices_[1][1]


def sources(layer_slices_, reader: int, tensor: int):
    """The (slot, box) a layer's reader on slot ``reader`` takes its input from: every box;
    of a replicated layer one copy, the reader's own or else its tensor rank's in the
    stage holding it (Megatron's pipeline sends between equal ranks)."""
    if not replicated(layer_slices_):
        return layer_slices_
    mine = [(k, b) for k, b in layer_slices_ if k == reader] or \
        [(k, b) for k, b in layer_slices_ if k % tensor == reader % tensor]
    return mine[:1] or layer_slices_[:1]


def grad_allreduced(model: Model, slices: Slices, axes: tuple[str, ...], i: int) -> list[int]:
    """The readers whose gradients of layer i are combined over i's slots before its backward:
    of a layer whole on every slot (replicated, or a partial sum: a row-parallel layer's
    backward reads its whole output's gradient) those that cut their output, allreduced
    (a column-parallel reader's input gradients are partial sums: Megatron's allreduce in its
    backward) or all-gathered (``grad_gathered``); of a ``scattered`` partial sum every
    reader (each gives its positions), all-gathered; [] where there are none."""
    if axes[i] == "scattered":
        return list(model.consumers[i])
    if not replicated(slices[i]):
        return []
    return [c for c in model.consumers[i] if not replicated(slices[c])]


def grad_gathered(model: Model, slices: Slices, parts: Parts, axes: tuple[str, ...], i: int) -> bool:
    """Whether layer i's readers' gradients (``grad_allreduced``) need only an all-gather:
    a scattered sum's, and a whole layer's whose readers on each slot read inside that
    slot's piece of it (an add cut by channels) -- each piece's gradient is then complete
    on its slot, and summing it over the slots (a reduce-scatter) would add zeros."""
    readers = grad_allreduced(model, slices, axes, i)
    if axes[i] == "scattered" or not readers:
        return bool(readers)
    group = [j for j, _ in slices[i]]
    pieces = allreduce_pieces(model.nodes[i].out_shape, len(group))
    for c in readers:
        for k, box in slices[c]:
            for src, need in zip(model.nodes[c].inputs, reads(model, parts, c, k, box)):
                if src == i and box_size(need) and (k not in group or
                                                    box_intersect(need, pieces[group.index(k)]) != need):
                    return False
    return True


def allreduce_pieces(shape: Shape, n: int, rows: bool = False) -> list[Box]:
    """The n pieces (by channels; by ``rows``, positions, for sequence parallelism) an
    allreduce of a whole output scatters and gathers."""
    return cut_along(shape, 1 if rows else 0, n)


# --- the op graph ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Edge:
    """What the layers on slot ``reader`` read of layer ``src``'s box on slot ``owner``:
    ``box``, the smallest box holding every such read (each read where there is one
    reader, as in a chain), sent once whatever the number of readers; ``full`` when a
    reader reads src's whole output; ``readers`` the reading layers, in order."""

    box: Box
    full: bool
    readers: tuple[int, ...]

    @functools.cached_property
    def size(self) -> int:
        """Elements per sample of ``box`` (asked per micro-batch)."""
        return box_size(self.box)


def edges(model: Model, slices: Slices, parts: Parts = (), tensor: int = 1) -> dict[tuple[int, int, int], Edge]:
    """Every (src layer, owner slot, reader slot) whose edge crosses slots: the forward
    sends ``box`` from owner to reader, the backward the gradient of it back (a replicated
    layer from one copy, ``sources``)."""
    found: dict[tuple[int, int, int], tuple[Box, bool, list[int]]] = {}
    for c, node in enumerate(model.nodes):
        for j, box in slices[c]:
            for src, need in zip(node.inputs, reads(model, parts, c, j, box)):
                if src < 0 or not box_size(need):
                    continue
                full = box_size(need) == prod(model.nodes[src].out_shape)
                for k, kbox in sources(slices[src], j, tensor):
                    if k == j or not box_overlap(kbox, need):
                        continue
                    part = box_intersect(kbox, need)
                    if (src, k, j) in found:
                        hull, was_full, readers = found[(src, k, j)]
                        found[(src, k, j)] = (box_hull(hull, part), was_full or full,
                                              readers + ([c] if readers[-1] != c else []))
                    else:
                        found[(src, k, j)] = (part, full, [c])
    return {key: Edge(b, f, tuple(r)) for key, (b, f, r) in found.items()}


def _ops(sc: Scenario, slices: Slices, axes: tuple[str, ...], parts: Parts = ()) -> list[Op]:
    """The step graph: per micro-batch every layer's forward on each slot after its inputs
    (from its own slot, or by one transfer per ``Edge``), then the backward in reverse, each
    layer's after the gradients of every layer that reads it (summed where they land).  A
    tensor split's partial sums are allreduced before they are read, and the gradients a
    whole layer (replicated, or a partial sum) gets from readers that cut it are allreduced
    or all-gathered before its backward (``_allreduce``, ``grad_gathered``)."""
    model, db = sc.model, sc.dtype_bytes
    ops: list[Op] = []
    fwd: dict[tuple[int, int, int], int] = {}        # (layer, slot, micro) -> op id
    bwd: dict[tuple[int, int, int], int] = {}
    red_fwd: dict[tuple[int, int, int], list[int]] = {}   # reductions (and allreduces) into (layer, slot, micro)
    red_bwd: dict[tuple[int, int, int], list[int]] = {}
    tensor = sc.parallel.tensor                      # slot j is in pipeline stage j // tensor
    crossing = edges(model, slices, parts, tensor)
    redo = 1 if sc.training.recompute == "full" else 0       # the forward again before the backward
    kept = checkpoints(model) if redo else []
    rerun_layer = reruns(model, kept) if redo else [False] * len(model.nodes)
    rerun = [node.layer.rerun_share(node.in_shape) if sc.training.recompute == "selective" else float(rerun_layer[i])
             for i, node in enumerate(model.nodes)]             # its share (selective: attention's scores)

    def add(**kw) -> int:
        ops.append(Op(id=len(ops), **kw))
        return len(ops) - 1

    def backward(i: int, j: int, mb: int, deps: list[int]) -> int:
        """Layer i's backward on slot j (and with recompute its forward, or its share that
        selective recomputation reruns, again) after ``deps``."""
        f = ops[fwd[(i, j, mb)]]
        return add(kind="bwd", layer=i, micro=mb, slot=j, flops=f.flops * (model.nodes[i].bwd_ratio + rerun[i]),
                   bytes=(2 + rerun[i]) * f.bytes, deps=tuple(deps))

    def needs_of(c: int, k: int, box: Box, src: int) -> list[Box]:
        return [need for s, need in zip(model.nodes[c].inputs, reads(model, parts, c, k, box)) if s == src]

    def source_of(src: int, k: int, j: int) -> bool:
        return any(s == k for s, _ in sources(slices[src], j, tensor))

    # what a slot's forward of a layer reads, from which slots, and its work per sample: the same
    # for every micro-batch, so found once (a micro-batch's ops differ only in size and ids)
    fwd_recipe: dict[tuple[int, int], tuple] = {}
    for i, node in enumerate(model.nodes):
        for j, box in slices[i]:
            needs = reads(model, parts, i, j, box)
            inputs = [(src, [k for k, kbox in sources(slices[src], j, tensor)
                             if any(box_overlap(kbox, need) for need in needs_of(i, j, box, src))])
                      for src in dict.fromkeys(node.inputs) if src >= 0]
            part = part_of(model, parts, i, j)
            per_out = part.layer.flops_per_out(part.in_shape) if part else node.layer.flops_per_out(node.in_shape)
            fwd_recipe[(i, j)] = (inputs, per_out * box_size(box), sum(map(box_size, needs)) + box_size(box),
                                  params_of(model, parts, i, j, box) * PARAM_BYTES)
    micro_sizes = [hi - lo for lo, hi in even_cuts(sc.batch_size, sc.parallel.micro_batches)]
    for mb, b in enumerate(micro_sizes):
        sent: dict[tuple[int, int, int], int] = {}     # (src, owner, reader) -> its transfer
        for i, node in enumerate(model.nodes):
            for j, box in slices[i]:
                deps: list[int] = []
                inputs, flops, elements, param_bytes = fwd_recipe[(i, j)]
                for src, ks in inputs:
                    for k in ks:
                        if k == j:
                            d = fwd[(src, k, mb)]
                        elif (src, k, j) in sent:
                            d = sent[(src, k, j)]
                        else:
                            e = crossing[(src, k, j)]
                            d = sent[(src, k, j)] = add(
                                kind="xfer", layer=e.readers[0], micro=mb, slot=k, dst=j,
                                bytes=e.size * b * db, producer=src,
                                deps=(fwd[(src, k, mb)], *red_fwd.get((src, k, mb), [])),
                                why="stage" if k // tensor != j // tensor else ("activation" if e.full else "halo"))
                        if d not in deps:
                            deps.append(d)
                    deps += red_fwd.get((src, j, mb), [])
                fwd[(i, j, mb)] = add(kind="fwd", layer=i, micro=mb, slot=j, flops=flops * b,
                                      bytes=elements * b * db + param_bytes, deps=tuple(deps))
            _reductions(slices[i], node, axes[i], b, i, mb, fwd, red_fwd, red_bwd, add)
            if parts and parts[i]:
                into = _partial_sum(add, node, [j for j, _ in slices[i]], axes[i], b * db, i, mb,
                                    ("reduce-scatter", "all-gather"), lambda j, i=i, mb=mb: (fwd[(i, j, mb)],))
                for j, ids in into.items():
                    red_fwd.setdefault((i, j, mb), []).extend(ids)
    readers_ar = [grad_allreduced(model, slices, axes, i) for i in range(len(model.nodes))]
    gathered = [bool(readers_ar[i]) and grad_gathered(model, slices, parts, axes, i) for i in range(len(model.nodes))]
    # with recompute the backward reruns the forward, a tensor split's allreduces of partial sums
    # included (Megatron's recomputation): each partial sum not kept at a checkpoint is allreduced
    # again before its backward, after what that backward waits for (``kept``, above)
    # the slots whose backward of each reader sends layer i's slot j its gradient: found once
    bwd_recipe = {(i, j): [(c, [k for k, kbox in slices[c]
                                if source_of(i, j, k) and any(box_overlap(box, need) for need in needs_of(c, k, kbox, i))])
                           for c in model.consumers[i]]
                  for i in range(len(model.nodes)) for j, box in slices[i]}
    for mb, b in enumerate(micro_sizes):
        sent = {}
        for i in range(len(model.nodes) - 1, -1, -1):
            node = model.nodes[i]
            waits: dict[int, list[int]] = {}                # a recomputed partial sum's backward: deps first
            into = {}
            if readers_ar[i]:
                def partial_deps(j: int, i=i, mb=mb) -> tuple[int, ...]:
                    return tuple(bwd[(c, j, mb)] for c in readers_ar[i] if (c, j, mb) in bwd) or (fwd[(i, j, mb)],)
                rows = axes[i] == "scattered"
                into = _allreduce(add, [j for j, _ in slices[i]], _sizes(node.out_shape, len(slices[i]), rows),
                                  b * db, i, mb, ("gradient reduce-scatter", "gradient all-gather"), partial_deps,
                                  scatter=not gathered[i])
            for j, box in slices[i]:
                f = ops[fwd[(i, j, mb)]]
                deps = [f.id]
                if not model.consumers[i]:                 # the output: after the loss's reductions
                    deps += red_fwd.get((i, j, mb), [])
                for c, ks in bwd_recipe[(i, j)]:
                    for k in ks:
                        if k == j:
                            d = bwd[(c, k, mb)]
                        elif (i, j, k) in sent:
                            d = sent[(i, j, k)]
                        else:
                            e = crossing[(i, j, k)]
                            d = sent[(i, j, k)] = add(
                                kind="xfer", layer=e.readers[0], micro=mb, slot=k, dst=j, producer=i,
                                bytes=e.size * b * db, why="gradient",
                                deps=tuple(bwd[(r, k, mb)] for r in e.readers))
                        if d not in deps:
                            deps.append(d)
                    deps += [d for d in red_bwd.get((c, j, mb), []) if d not in deps]
                deps += into.get(j, [])
                if kept and parts and parts[i] and not kept[i] and rerun_layer[i]:
                    waits[j] = deps
                    continue
                bwd[(i, j, mb)] = backward(i, j, mb, deps)
            if waits:
                again = _partial_sum(add, node, list(waits), axes[i], b * db, i, mb, RECOMPUTE,
                                     lambda j, waits=waits: waits[j])
                for j, deps in waits.items():
                    bwd[(i, j, mb)] = backward(i, j, mb, deps + again[j])
    last = len(micro_sizes) - 1
    for i in weights_allreduced(model, slices, parts, axes):      # sequence parallelism's norms
        group = [j for j, _ in slices[i]]
        _allreduce(add, group, [hi - lo for lo, hi in even_cuts(params_of(model, parts, i, group[0], slices[i][0][1]),
                                                                len(group))],
                   db, i, last, ("weight gradient reduce-scatter", "weight gradient all-gather"),
                   lambda j, i=i: tuple(bwd[(i, j, mb)] for mb in range(last + 1)))
    for i, slot, partner, n in table_copies(model, slices, tensor):      # the tied head's copy of the table
        e = tied_embedding(model.nodes, model.nodes[i])
        _allreduce(add, [partner, slot], [hi - lo for lo, hi in even_cuts(n, 2)], sc.gradient_bytes, i, last,
                   ("embedding gradient reduce-scatter", "embedding gradient all-gather"),
                   lambda j, i=i, e=e, slot=slot: tuple(bwd[(i if j == slot else e, j, mb)] for mb in range(last + 1)))
    return _in_schedule_order(ops, _fix_reduction_deps(ops, bwd), sc, slices)


def weights_allreduced(model: Model, slices: Slices, parts: Parts, axes: tuple[str, ...]) -> list[int]:
    """Layers cut by positions under sequence parallelism that hold parameters (the norms):
    every slot keeps them whole and computes their gradient from its positions, so the
    gradients are allreduced over the tensor group after the backward, as Megatron does."""
    return [i for i, (sl, axis) in enumerate(zip(slices, axes))
            if axis == "positions" and len(sl) > 1 and params_of(model, parts, i, sl[0][0], sl[0][1])]


@functools.lru_cache(maxsize=4096)          # asked per layer and micro-batch, of few shapes
def _sizes(shape: Shape, n: int, rows: bool) -> tuple[int, ...]:
    """Elements per sample of each of the n pieces of a whole output's allreduce."""
    return tuple(box_size(piece) for piece in allreduce_pieces(shape, n, rows))


def _allreduce(add, group: list[int], sizes: list[int], elem_bytes: float, layer: int, mb: int,
               names: tuple[str, str], deps_of, scatter: bool = True, gather: bool = True) -> dict[int, list[int]]:
    """An allreduce over ``group`` of pieces of ``sizes`` elements (of layer's output, its
    gradient, or its parameters' gradient), as direct sends of the ring's volume: a
    reduce-scatter (slot j sends its sum's piece k to slot k), then an all-gather (slot k
    sends its summed piece to every other), 2 (p - 1) / p of the whole from each slot;
    ``names`` their ``why``.  ``deps_of(slot)``: what its sum waits for.  Without ``gather``
    (``scatter``) only the reduce-scatter (all-gather): sequence parallelism's halves.
    Returns per slot the transfers into it, which its readers wait for."""
    rs, ag = names
    into: dict[int, list[int]] = {j: [] for j in group}
    for j in group if scatter else ():
        for k, size in zip(group, sizes):
            if k != j and size:
                into[k].append(add(kind="xfer", layer=layer, micro=mb, slot=j, dst=k, why=rs, producer=layer,
                                   bytes=size * elem_bytes, deps=tuple(deps_of(j))))
    scattered = {k: tuple(ids) for k, ids in into.items()}
    for k, size in zip(group, sizes) if gather else ():
        for j in group:
            if j != k and size:
                into[j].append(add(kind="xfer", layer=layer, micro=mb, slot=k, dst=j, why=ag, producer=layer,
                                   bytes=size * elem_bytes, deps=tuple(deps_of(k)) + scattered[k]))
    return into


def _partial_sum(add, node, group: list[int], axis: str, elem_bytes: float, layer: int, mb: int,
                 names: tuple[str, str], deps_of) -> dict[int, list[int]]:
    """The allreduce of a tensor split's partial sum over ``group`` (``_allreduce``): under
    sequence parallelism (axis ``scattered``) only its reduce-scatter, by rows."""
    scattered = axis == "scattered"
    return _allreduce(add, group, _sizes(node.out_shape, len(group), scattered), elem_bytes, layer, mb, names,
                      deps_of, gather=not scattered)


def _reductions(layer_slices_, node, axis, b, i, mb, fwd, red_fwd, red_bwd, add) -> None:
    """Small all-to-all exchanges (softmax max/sum, batch-norm statistics) of layer i; none
    where every slot computes the whole output (a tensor split's replicated and partial layers)."""
    if len(layer_slices_) < 2 or replicated(layer_slices_):
        return
    for j, box in layer_slices_:
        f_floats, b_floats = node.layer.exchange_floats(node.in_shape, box, axis, b)
        for k, _ in layer_slices_:
            if k == j:
                continue
            if f_floats:
                red_fwd.setdefault((i, k, mb), []).append(
                    add(kind="xfer", layer=i, micro=mb, slot=j, dst=k, bytes=f_floats * 4.0,
                        why="reduction", deps=(fwd[(i, j, mb)],)))
            if b_floats:   # depends on the backward op of (i, j); patched once it exists
                red_bwd.setdefault((i, k, mb), []).append(
                    add(kind="xfer", layer=i, micro=mb, slot=j, dst=k, bytes=b_floats * 4.0,
                        why="reduction", deps=(-1 - i,)))


def _fix_reduction_deps(ops: list[Op], bwd: dict) -> list[int]:
    """Backward reductions were created before their source op: point them at it (in place)
    and return each op's rank in a topological order (a stable sort by the latest
    dependency), which ``_in_schedule_order`` follows among ready ops."""
    for n, op in enumerate(ops):
        if op.deps and op.deps[0] < 0:
            i = -1 - op.deps[0]
            ops[n] = _moved(op, op.id, (bwd[(i, op.slot, op.micro)],))
    order = sorted(range(len(ops)), key=lambda n: (max(ops[n].deps), 1, n) if ops[n].why == "reduction" else (n, 0, n))
    rank = [0] * len(ops)
    for r, n in enumerate(order):
        rank[n] = r
    return rank


def _moved(op: Op, id_: int, deps: tuple[int, ...]) -> Op:
    """``op`` with another id and dependencies (a plain copy of its fields: the plan makes
    one per op, so ``dataclasses.replace``'s checks would cost seconds on large plans)."""
    new = object.__new__(Op)
    new.__dict__.update(op.__dict__, id=id_, deps=deps)
    return new


def stages_of(sc: Scenario, slices: Slices) -> tuple[dict[int, int], int]:
    """Each slot's pipeline stage, and how many stages: a layers split's slots are its stages
    in layer order; a spatial split's slot j is in stage j // model_parallel (one stage
    without ``pipeline``)."""
    first: dict[int, int] = {}
    for i, layer_slices_ in enumerate(slices):
        for j, _ in layer_slices_:
            first.setdefault(j, i)
    if sc.parallel.split == "layers":
        return {j: n for n, j in enumerate(sorted(first, key=first.get))}, len(first)
    stage = {j: j // sc.parallel.tensor for j in first}
    return stage, len(set(stage.values()))


def _in_schedule_order(ops: list[Op], rank: list[int], sc: Scenario, slices: Slices) -> list[Op]:
    """The ops renumbered in a topological order of their dependencies plus one more per
    slot: each compute op after the one before it in the slot's schedule (``stage_units``;
    a unit's ops in layer order).  Among ready ops the lowest ``rank`` comes first, so a
    schedule the ranks already follow keeps it.  Raises ValueError when the schedule
    contradicts the dependencies (a pipeline that would deadlock)."""
    stage, stages = stages_of(sc, slices)
    by_rank = sorted(range(len(ops)), key=rank.__getitem__)
    groups: dict[tuple[int, str, int], list[int]] = {}
    for n in by_rank:
        op = ops[n]
        if op.kind != "xfer":
            groups.setdefault((op.slot, op.kind, op.micro), []).append(n)
    succ: list[list[int]] = [[] for _ in ops]
    indegree = [len(op.deps) for op in ops]
    for op in ops:
        for d in op.deps:
            succ[d].append(op.id)
    for j in sorted({slot for slot, _, _ in groups}):
        units = stage_units(sc.parallel.schedule, stage[j], stages, sc.parallel.micro_batches)
        seq = [i for kind, mb in units for i in groups.get((j, kind, mb), [])]
        for a, b in zip(seq, seq[1:]):
            succ[a].append(b)
            indegree[b] += 1
    ready = [rank[n] for n in range(len(ops)) if indegree[n] == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = by_rank[heapq.heappop(ready)]
        order.append(i)
        for s in succ[i]:
            indegree[s] -= 1
            if indegree[s] == 0:
                heapq.heappush(ready, rank[s])
    if len(order) < len(ops):
        raise ValueError(f"pipeline schedule {sc.parallel.schedule} contradicts the op graph")
    pos = [0] * len(ops)
    for new, old in enumerate(order):
        pos[old] = new
    at = pos.__getitem__
    return [_moved(ops[i], pos[i], tuple(map(at, ops[i].deps))) for i in order]


def slot_sequence(p: Plan, slot: int) -> list[Op]:
    """Slot ``slot``'s compute ops in the order its device runs them."""
    return [op for op in p.ops if op.kind != "xfer" and op.slot == slot]


def buckets(p: Plan, slot: int) -> list[tuple[tuple[int, ...], int]]:
    """Slot ``slot``'s gradients as sync data parallelism exchanges them: (layers, parameters)
    per bucket, from the last layer back, a bucket closed once it holds ``bucket_mb`` MiB (as
    PyTorch DDP fills its buckets in reverse layer order); each bucket's allreduce can start
    when its layers' backward is done.  ``bucket_mb = 0``: one bucket, after the backward."""
    cap = p.scenario.training.bucket_mb * 2**20
    model = p.scenario.model
    copies = {i: n for i, j, _, n in table_copies(model, p.slices, p.scenario.parallel.tensor) if j == slot}
    out, layers, size = [], [], 0
    for i in reversed(range(len(model.nodes))):
        box = dict(p.slices[i]).get(slot)
        n = params_of(model, p.parts, i, slot, box) + copies.get(i, 0) if box is not None else 0
        if not n:
            continue
        layers.append(i)
        size += n
        if cap and size * p.scenario.gradient_bytes >= cap:
            out.append((tuple(layers), size))
            layers, size = [], 0
    if layers:
        out.append((tuple(layers), size))
    return out


def used_devices(p: Plan) -> set[str]:
    """Every device the plan puts work on: its replicas' slots and its parameter-server
    shards (what a job rents, and what can fail under it)."""
    return {d for row in p.devices for d in row} | set(p.ps.devices if p.ps else ())


def cost_key(p: Plan, op: Op) -> str:
    """A compute op's key in a device's measured op costs (``Device.op_costs``): its layer
    kind, with ``.backward`` for backward ops (``split_key`` adds the plan's context)."""
    return split_key(p, p.scenario.model.nodes[op.layer].layer.kind + (".backward" if op.kind == "bwd" else ""))


def split_key(p: Plan, key: str) -> str:
    """``key`` with ``.split`` where each layer is cut over slots (a spatial split):
    calibration times a slice's ops apart from whole layers' (mlp-digits in two: each op
    4-8 us dearer than its FLOPs and bytes make it beside the whole layers -- the walk's
    messages around it); with ``.stage`` in a pipeline of whole layers (a layers split),
    whose ops cost more than the same ops of a whole step (ranks that wait for each other
    between ops; decision 039).  ``Device.op_time`` falls back to the key without either
    where it has no such costs."""
    par = p.scenario.parallel
    return key + (SPLIT if par.tensor > 1 else STAGE if par.stages > 1 else "")


def talking_pairs(p: Plan) -> set[tuple[str, str]]:
    """Every (src, dst) device pair the step sends data between."""
    from clustersim.core.collective import phases
    pairs = {(row[op.slot], row[op.dst]) for row in p.devices for op in p.ops if op.kind == "xfer"}
    if p.sync == "allreduce":
        for j in range(p.slots):
            group = [row[j] for row in p.devices]
            for ph in phases("allreduce", p.scenario.training.allreduce, group, 1.0):
                pairs.update(ph.pairs)
    if p.ps:
        for row in p.devices:
            for j, dev in enumerate(row):
                for k, n in enumerate(p.ps.share[j]):
                    if n:
                        pairs.update({(dev, p.ps.devices[k]), (p.ps.devices[k], dev)})
    return {(a, b) for a, b in pairs if a != b}


def _check_routes(p: Plan) -> None:
    """Every talking pair has a route: found together as link ids (``route_ids``, the form the
    simulator then reads them in); where one fails, pair by pair for the first in order."""
    topo = p.scenario.topology
    pairs = sorted(talking_pairs(p))
    try:
        topo.route_ids(pairs)
        return
    except LookupError:
        pass
    for a, b in pairs:
        try:
            topo.route_ids([(a, b)])
        except LookupError:
            raise ConfigError(p.scenario.file, "cluster.topology",
                              f"no route from {a} to {b}{topo.machines_note(a, b)} in topology {topo.name}, and "
                              f"this plan sends data between them") from None


# --- placement and memory -------------------------------------------------------------------
def _place(sc: Scenario, slices: Slices, slot_params: list[int]) -> tuple[tuple[tuple[str, ...], ...], PSLayout | None]:
    par, topo = sc.parallel, sc.topology
    compute = topo.compute_devices()
    per = par.devices_per_replica
    need = per * par.replicas
    if need > len(compute):
        what = "model_parallel x pipeline x replicas" if par.pipeline > 1 else "model_parallel x replicas"
        machines = len({topo.machine_of(d) for d in compute})
        raise ConfigError(sc.file, "parallel",
                          f"{what} = {need} devices, but topology {topo.name} has {len(compute)} compute devices "
                          f"on {machines} machine{'s' if machines > 1 else ''} (cluster.machines sets how many)")
    devices = tuple(tuple(compute[r * per + j] for j in range(per)) for r in range(par.replicas))
    if not par.ps_shards:
        return devices, None
    if par.ps_shards > sum(slot_params):                 # an empty shard holds nothing and serves nobody
        raise ConfigError(sc.file, "parallel.ps_shards", f"{par.ps_shards} shards for {sum(slot_params):,} "
                                                         "parameters would leave shards empty: at most one a parameter")
    spare = compute[need:] + [c for c in topo.host_cpus() if c not in compute]
    if par.ps_placement == "local":
        # on the machines the replicas use, one machine after another (shard k on machine k mod
        # their count): each machine's free devices, then its CPUs; else the replicas' own devices
        used = list(dict.fromkeys(topo.machine_of(d) for row in devices for d in row))
        free = [[c for c in spare if topo.machine_of(c) == m] for m in used]
        spare = [at[k] for k in range(max(map(len, free), default=0)) for at in free if k < len(at)]
    pool = spare or compute[:need]
    shard_devices = tuple(pool[k % len(pool)] for k in range(par.ps_shards))
    shard_ranges = even_cuts(sum(slot_params), par.ps_shards)
    share = [[0] * par.ps_shards for _ in slot_params]
    for _, slot, parts in param_layout(sc, slices):
        for k, n in enumerate(parts):
            share[slot][k] += n
    return devices, PSLayout(shard_devices, tuple(hi - lo for lo, hi in shard_ranges),
                             tuple(tuple(row) for row in share))


def param_layout(sc: Scenario, slices: Slices) -> list[tuple[int, int, tuple[int, ...]]]:
    """(layer, slot, parameters on each shard) of every layer slice: the parameter vector is
    laid out layer by layer, slot by slot, and cut into ``ps_shards`` even ranges."""
    sizes = [(i, slot, node.layer.slice_params(node.in_shape, box))
             for i, (node, layer_slices_) in enumerate(zip(sc.model.nodes, slices)) for slot, box in layer_slices_]
    ranges = even_cuts(sum(n for *_, n in sizes), sc.parallel.ps_shards)
    out, offset = [], 0
    for i, slot, n in sizes:
        out.append((i, slot, tuple(max(0, min(hi, offset + n) - max(lo, offset)) for lo, hi in ranges)))
        offset += n
    return out


def memory_use(p: Plan) -> dict[str, dict[str, float]]:
    """Bytes each device must hold, by term, as trainers count them (``state_bytes``):
    ``weights`` and ``gradients`` in the model's dtype, ``optimizer`` state (fp32 master
    weights under 16-bit training, Adam's two moments), ZeRO's sharding of these over the
    replicas; ``activations`` kept for the backward (``activation_elements``) of the most
    micro-batches its stage holds at once under the pipeline schedule (``micro_batches_held``:
    every one under GPipe, min(m, p - stage) under 1F1B; the largest micro-batches where they
    differ by one); parameter-server shards with their optimizer state."""
    sc = p.scenario
    use: dict[str, dict[str, float]] = {}
    stage, stages = stages_of(sc, p.slices)
    sizes = sorted((hi - lo for lo, hi in even_cuts(sc.batch_size, sc.parallel.micro_batches)), reverse=True)
    kept, work = activation_elements(p)
    per_param = state_bytes(sc)
    gather = [0] * p.slots                # ZeRO-3: the largest layer slice's weights, gathered whole
    for i, layer_slices_ in enumerate(p.slices):
        for slot, box in layer_slices_:
            gather[slot] = max(gather[slot], params_of(sc.model, p.parts, i, slot, box))
    for i, slot, _, n in table_copies(sc.model, p.slices, sc.parallel.tensor):
        gather[slot] = max(gather[slot], params_of(sc.model, p.parts, i, slot, dict(p.slices[i])[slot]) + n)

    def terms(dev: str) -> dict[str, float]:
        return use.setdefault(dev, {"weights": 0.0, "gradients": 0.0, "optimizer": 0.0, "activations": 0.0,
                                    "ps_shards": 0.0})
    for row in p.devices:
        for slot, dev in enumerate(row):
            u = terms(dev)
            for term, nbytes in per_param.items():
                u[term] += nbytes * p.slot_params[slot]
            if sc.training.zero >= 3:
                u["weights"] += gather[slot] * sc.dtype_bytes
            held = micro_batches_held(stage_units(sc.parallel.schedule, stage.get(slot, 0), stages,
                                                  sc.parallel.micro_batches))
            u["activations"] += (kept[slot] * sum(sizes[:held]) + work[slot] * sizes[0]) * sc.dtype_bytes
    if p.ps:
        copies = 2 + shard_state_copies(sc)
        for dev, size in zip(p.ps.devices, p.ps.sizes):
            terms(dev)["ps_shards"] += copies * size * PARAM_BYTES
    return use


def state_bytes(sc: Scenario) -> dict[str, float]:
    """Bytes per parameter a replica's device keeps: weights in the model's dtype, gradients
    in ``Scenario.gradient_bytes`` (the same unless ``training.gradient_dtype``), optimizer
    state (``schedule.optimizer_bytes``: 2 + 2 + 12 = 16 with Adam in fp16/bf16, as ZeRO's
    paper counts), and ZeRO stage z's sharding over the R replicas: the optimizer state
    from stage 1, the gradients from 2, the weights from 3."""
    db, zero, r = float(sc.dtype_bytes), sc.training.zero, sc.parallel.replicas
    optimizer = float(optimizer_bytes(sc))
    return {"weights": db / (r if zero >= 3 else 1), "gradients": sc.gradient_bytes / (r if zero >= 2 else 1),
            "optimizer": optimizer / (r if zero >= 1 else 1)}


def data_parallel_bytes(p: Plan) -> list[dict[str, float]]:
    """Per slot, bytes each of its devices sends per step in the collectives over the R
    replicas (ring volumes, (R - 1) / R of the data per pass): without ZeRO an allreduce of
    the gradients (two passes); ZeRO 1 and 2 a reduce-scatter of the gradients and an
    all-gather of the updated weights (the same two); ZeRO 3 all-gathers the weights before
    the forward and again before the backward instead (three passes, ZeRO's 1.5x).  Counted
    here and not in ``plan.ops``: the sim engine runs the gradient allreduce (the volume of
    stages 0-2); stage 3's extra all-gather is not simulated.  Local SGD averages its fp32
    weights every ``local_steps`` steps instead: per step, that allreduce over k."""
    sc = p.scenario
    r, db, gb = sc.parallel.replicas, sc.dtype_bytes, sc.gradient_bytes
    if r < 2 or p.sync != "allreduce":
        return [{} for _ in range(p.slots)]
    share = (r - 1) / r
    out = []
    for n in p.slot_params:
        if sc.training.algorithm == "local":      # fp32 weights averaged every local_steps steps (sim.algorithms.local)
            out.append({"weight average": 2 * share * n * PARAM_BYTES / sc.training.local_steps})
        elif sc.training.zero >= 3:
            out.append({"gradient reduce-scatter": share * n * gb, "weight all-gather": 2 * share * n * db})
        elif sc.training.zero:
            out.append({"gradient reduce-scatter": share * n * gb, "weight all-gather": share * n * db})
        else:
            out.append({"gradient allreduce": 2 * share * n * gb})
    return out


def boundaries(model: Model) -> list[bool]:
    """Per layer, whether it is a layer boundary: no edge of the graph passes over it (in the
    topological order), so its output alone carries everything later layers read of what
    came before -- a residual stream's sums, every layer of a chain."""
    furthest = -1                            # the furthest reader of any layer before this one
    out = []
    for i, node in enumerate(model.nodes):
        out.append(furthest <= i)
        furthest = max([furthest] + list(model.consumers[i]))
    return out


def checkpoints(model: Model) -> list[bool]:
    """Per layer, whether full recomputation keeps its output.  A graph of repeated blocks
    (``Model.inner``: the zoo's transformers) keeps every boundary not inside a block, so
    each layer's input, as Megatron-LM's full recomputation does (Korthikanti et al. 2022:
    2sbh a layer).  Other graphs keep every k-th of their n boundaries and the last, k =
    ceil(sqrt(n)) (Chen et al. 2016's sublinear memory; PyTorch's checkpoint_sequential in
    k segments): a checkpoint at every layer of a chain would keep each output that no
    backward reads (``activation_elements``), more than no recomputation at all."""
    cut = boundaries(model)
    if model.inner:
        return [b and i not in model.inner for i, b in enumerate(cut)]
    at = [i for i, b in enumerate(cut) if b]
    k = ceil(sqrt(len(at)))
    kept = set(at[k - 1::k]) | set(at[-1:])
    return [i in kept for i in range(len(cut))]


def reruns(model: Model, cut: list[bool] | None = None) -> list[bool]:
    """Per layer, whether full recomputation reruns its forward before its backward: in a
    graph of repeated blocks (``Model.inner``), the layers of a stretch between checkpoints
    that holds a block's inside -- Megatron-LM reruns its transformer layers, not the
    embedding, the final norm, the head or the loss, which keep what their backward reads
    (Narayanan et al. 2021's FLOPs count the head twice, not three times); in other graphs
    every layer.  ``cut``: ``checkpoints(model)``, where the caller has it."""
    n = len(model.nodes)
    if not model.inner:
        return [True] * n
    cut, out, start = checkpoints(model) if cut is None else cut, [], 0
    for i in range(n):
        if cut[i] or i == n - 1:
            out += [any(j in model.inner for j in range(start, i + 1))] * (i + 1 - start)
            start = i + 1
    return out


def activation_elements(p: Plan) -> tuple[list[float], list[float]]:
    """Per slot, elements per sample kept for the backward from each held micro-batch, and
    those of one micro-batch being worked on.  Without recomputation a layer slice keeps what
    backward passes read (``Layer.backward_reads``, as autograd saves them): its input reads
    where its backward reads its input, its output where its own backward or a reader's on
    that slot reads it, and what its kind saves (``Layer.saved``); a tensor split's replicated
    layers and partial sums count the whole box on every slot.  A GPT block then keeps
    Korthikanti et al. 2022's 34sbh + 5as^2b less its dropout masks (section 4.1): a
    projection's output, read only by the residual sum, is not kept.  With
    ``training.recompute = "selective"`` no attention keeps its score matrices: one layer's,
    rerun for its backward, are the working set of one micro-batch.  With "full" only the
    checkpoints' outputs are kept (``checkpoints``) and what a pipeline stage receives from
    another, and the backward reruns one stretch between them at a time: its largest
    stretch's elements are the working set of one micro-batch.  A read of a tensor its own slot
    produced is that tensor, counted once as the producer's output (as autograd saves one
    tensor for all its readers); a read from another slot, or of the model's input, is a
    buffer of its own -- except the all-gather of a sequence-parallel layer's positions,
    which Megatron-LM keeps as the local piece and gathers again in the backward
    (Korthikanti et al. 2022, section 4.2.2; that second gather is not in the Plan's bytes)."""
    sc = p.scenario
    model = sc.model
    kept, work = [0.0] * p.slots, [0.0] * p.slots
    stretch = [0.0] * p.slots
    full, scores = sc.training.recompute == "full", sc.training.recompute != "selective"
    db = sc.dtype_bytes                              # a dropout's mask: bytes, as elements of the dtype
    cut = checkpoints(model) if full else [False] * len(model.nodes)
    again = reruns(model, cut) if full else [False] * len(model.nodes)
    tensor = sc.parallel.tensor                      # slot j is in pipeline stage j // tensor
    needs_of: dict[tuple[int, int], list] = {}
    received: dict[tuple[int, int], int] = {}        # (slot, layer): a stage's input from another, under "full"
    read_back: set[tuple[int, int]] = set()          # (layer, slot): a backward on that slot reads its output

    def gathered(src: int, slot: int) -> bool:
        """Whether ``slot`` reads ``src`` through an all-gather of positions within its own
        stage: it keeps its own piece (a stage's received input is a buffer of its own)."""
        return p.axes[src] == "positions" and any(k // tensor == slot // tensor for k, _ in p.slices[src])

    for i, node in enumerate(model.nodes):
        reads_input, reads_output = node.layer.backward_reads()
        for slot, box in p.slices[i]:
            needs_of[i, slot] = needs = list(zip(node.inputs, reads(model, p.parts, i, slot, box)))
            if reads_output:
                read_back.add((i, slot))
            if reads_input:
                read_back.update((src, slot) for src, need in needs if src >= 0 and (
                    gathered(src, slot) or _held(p.slices, src, slot, need)))
    for i, (node, layer_slices_, boundary) in enumerate(zip(model.nodes, p.slices, cut)):
        reads_input = node.layer.backward_reads()[0]
        for slot, box in layer_slices_:
            needs = needs_of[i, slot]
            read = sum(box_size(need) for src, need in needs if reads_input
                       and not _held(p.slices, src, slot, need) and (src < 0 or not gathered(src, slot)))
            saved = node.layer.saved(node.in_shape, box, sc.attention, scores)
            whole = ((i, slot) in read_back) * box_size(box) + read + saved + node.layer.mask_bytes(box) / db
            if not again[i]:
                kept[slot] += whole
                # selective: one layer's score matrices exist again while its backward runs
                work[slot] = max(work[slot], node.layer.saved(node.in_shape, box, sc.attention) - saved)
                continue
            # a checkpoint's output is kept once, not again in the working set of the stretch it ends
            stretch[slot] += whole - (boundary and (i, slot) in read_back) * box_size(box)
            if boundary:
                kept[slot] += box_size(box)
            # what a stage receives from another is its own checkpoint, once however many layers read
            # it (one transfer each): the stage reruns from it
            for src, need in needs:
                if src >= 0 and all(k // tensor != slot // tensor for k, _ in p.slices[src]):
                    received[slot, src] = max(received.get((slot, src), 0), box_size(need))
        if boundary:
            for slot in range(p.slots):
                work[slot], stretch[slot] = max(work[slot], stretch[slot]), 0.0
    for (slot, _), size in received.items():
        kept[slot] += size
    return kept, [max(w, s) for w, s in zip(work, stretch)]


def _held(slices: Slices, src: int, slot: int, need: Box) -> bool:
    """Whether ``slot`` itself produced all of ``need`` of layer ``src``'s output."""
    return src >= 0 and any(k == slot and box_intersect(kbox, need) == need for k, kbox in slices[src])


def shard_state_copies(sc: Scenario) -> int:
    """Arrays of a shard's size a parameter-server shard keeps besides the parameters and
    a gradient buffer: Adagrad's sum of squares, DC-ASGD's copy per worker (plus the mean
    square when adaptive), L-BFGS's history of 2m vectors."""
    tr = sc.training
    if tr.algorithm == "dcasgd":
        return sc.parallel.replicas + (1 if tr.dcasgd_adaptive else 0)
    if tr.algorithm == "sandblaster":
        return 2 * tr.lbfgs_history
    return 1 if tr.optimizer == "adagrad" and tr.algorithm in ("downpour", "ssp") else 0


ADVICE = {"weights": "raise model_parallel", "gradients": "raise model_parallel", "optimizer": "raise model_parallel",
          "activations": "raise model_parallel or lower model.batch_size",
          "ps_shards": "raise parallel.ps_shards"}
ZERO_STAGE = {"weights": 3, "gradients": 2, "optimizer": 1}   # the ZeRO stage that shards the term


def _advice(sc: Scenario, largest: str) -> str:
    """What would shrink the largest term, as the scenario allows: more stages where the
    split takes them, ZeRO where sync data parallelism has replicas to shard over (more
    replicas where the stage that shards the term is set), 1F1B over GPipe, more micro-batches
    where a smaller one shrinks what is held (1F1B holds at most the stages' count of them),
    the recomputations not set yet that the model has use for (flash keeps no scores)."""
    par, tr = sc.parallel, sc.training
    advice = ADVICE[largest]
    if largest in ZERO_STAGE:
        advice += "" if par.split == "layers" else " or pipeline"
        if tr.algorithm == "sync" and not par.ps_shards and par.replicas > 1:
            advice += (f", or set training.zero = {ZERO_STAGE[largest]}" if tr.zero < ZERO_STAGE[largest]
                       else ", or raise parallel.replicas (ZeRO shards over them)")
    if largest != "activations":
        return advice
    if sc.batch_size == 1:
        advice = advice.replace(" or lower model.batch_size", "")
    stages = 1 if tr.algorithm == "layerwise" else par.stages
    if stages > 1 and par.schedule == "gpipe" and par.micro_batches > 1:
        advice += ', or set parallel.schedule = "1f1b"'       # it holds at most the stages' count of them
    elif par.micro_batches < sc.batch_size and (stages == 1 or par.schedule == "1f1b" and sc.batch_size > stages):
        advice += ", or raise parallel.micro_batches" + (f" past the {stages} stages" if stages > 1 else "")
    attention = sc.model.attention_positions and sc.attention != "flash"
    modes = [m for m in (("selective", "full") if attention else ("full",)) if m != tr.recompute]
    if tr.recompute != "full" and modes:
        advice += " (or set training.recompute = " + " or ".join(f'"{m}"' for m in modes) + ")"
    return advice


class DoesNotFit(ConfigError):
    """A plan's device needs more memory than it has: ``need`` and ``have`` bytes, of which
    ``activations`` (what recomputation could shrink)."""

    def __init__(self, file: str, field: str, message: str, need: float, have: float, activations: float) -> None:
        super().__init__(file, field, message)
        self.need, self.have, self.activations = need, have, activations


def _check_memory(p: Plan) -> None:
    """Raises DoesNotFit naming the first device that does not fit, its GiB by term, the
    largest term and what would shrink it."""
    sc = p.scenario
    for dev, parts in p.memory.items():
        have = sc.topology.devices[dev].memory_bytes
        need = sum(parts.values())
        if need > have:
            detail = ", ".join(f"{k} {v / GIB:.2f}" for k, v in parts.items() if v)
            largest = max(parts, key=parts.get)
            advice = _advice(sc, largest)
            raise DoesNotFit(sc.file, "parallel.model_parallel",
                             f"does not fit: device {dev} needs {need / GIB:.2f} GiB ({detail}) but has "
                             f"{have / GIB:.2f} GiB; largest: {largest}, so {advice}",
                             need, have, parts.get("activations", 0.0))
