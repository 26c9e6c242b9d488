"""How one replica of a model is cut over M device slots.

``spatial`` (DistBelief): every layer's output is cut into M boxes (2-D blocks of rows
and columns, or channels, as the layer kind says); slot j computes box j of every layer.
``layers`` (pipeline): consecutive layers (in the graph's topological order) form M
stages balanced by FLOPs; a layer's single box sits on its stage's slot.  ``spatial``
with ``pipeline`` P > 1: P such stages, each layer cut spatially over its stage's M slots.
``tensor`` (Megatron-LM, ``tensor_slices``): whole outputs on every slot between blocks,
partial sums allreduced where a layer sums over a cut input or its words, the rest cut as
``spatial``.  Either way the result is, per layer, a list of (slot, box); transfers and
parameters follow from boxes (and a partial sum's part) alone, so the splits share one mechanism.
"""
from __future__ import annotations

from clustersim.core.layers import Box, Shape, box_size, full_box
from clustersim.core.models import Model

Slices = tuple[tuple[tuple[int, Box], ...], ...]     # per layer: ((slot, box), ...)

AXIS = {"channels": 0, "rows": 1}


def even_cuts(size: int, parts: int) -> list[tuple[int, int]]:
    """[0, size) in ``parts`` contiguous ranges differing by at most one (numpy.array_split)."""
    q, r = divmod(size, parts)
    cuts, lo = [], 0
    for i in range(parts):
        hi = lo + q + (1 if i < r else 0)
        cuts.append((lo, hi))
        lo = hi
    return cuts


def cut_along(shape: Shape, axis: int, parts: int, unit: int = 1) -> list[Box]:
    """``parts`` boxes along ``axis``, cut between groups of ``unit`` (attention heads)."""
    boxes = []
    for lo, hi in even_cuts(shape[axis] // unit, parts):
        lo, hi = lo * unit, hi * unit
        box = list(full_box(shape))
        box[axis] = (lo, hi)
        boxes.append(tuple(box))
    return boxes


def _blocks(shape: Shape, rows: int, cols: int) -> list[Box]:
    """rows x cols blocks of (H, W), every channel; block (a, b) is slot a * cols + b."""
    return [((0, shape[0]), hr, wc) for hr in even_cuts(shape[1], rows) for wc in even_cuts(shape[2], cols)]


def _axes(model: Model, cols: int) -> list[str]:
    """The axis each layer is cut on: its kind's, a ``follow`` layer its first input's; a
    layer cut by rows with nothing left to cut spatially goes by channels."""
    axes: list[str] = []
    first = "rows" if model.input_shape[1] > 1 or (cols > 1 and model.input_shape[2] > 1) else "channels"
    for node in model.nodes:
        src = node.inputs[0] if node.inputs else node.index - 1
        want = node.layer.split if node.layer.split != "follow" else (first if src < 0 else axes[src])
        _, h, w = node.out_shape
        if want == "rows" and h < 2 and (cols == 1 or w < 2):
            want = "channels"          # nothing left to cut by rows (or columns)
        axes.append(want)
    return axes


def auto_grid(model: Model, m: int) -> tuple[int, int]:
    """(rows, cols) blocks for the layers cut by rows when no ``parallel.grid`` is given:
    among the factorisations r x c = m, the one whose cuts are shortest -- the least
    Σ C (r-1) W + C (c-1) H over those layers' outputs (C, H, W), i.e. the least halo
    perimeter, so r/c follows the layers' aspect ratio H/W -- among the grids that leave
    the most blocks of the first such layer non-empty (more rows or columns than it has
    would leave slots idle); ties go to more rows (the 1-D cut's axis).
    One grid serves every layer, so consecutive layers' blocks line up on their slots."""
    shapes = [n.out_shape for n, a in zip(model.nodes, _axes(model, 2)) if a == "rows"]
    if not shapes or m == 1:
        return (m, 1)
    grids = [(r, m // r) for r in range(m, 0, -1) if m % r == 0]
    _, h0, w0 = shapes[0]

    def idle_then_perimeter(grid: tuple[int, int]) -> tuple[int, int]:
        r, c = grid
        return (-min(r, h0) * min(c, w0),
                sum(ch * ((min(r, h) - 1) * w + (min(c, w) - 1) * h) for ch, h, w in shapes))
    return min(grids, key=idle_then_perimeter)      # min keeps the first of equals: more rows


def spatial_slices(model: Model, m: int, grid: tuple[int, ...] = ()) -> tuple[Slices, tuple[str, ...]]:
    """Per layer the M boxes (empty boxes dropped) and the axis each layer is cut on.
    Layers cut by rows are cut in ``grid`` = (rows, cols) blocks of (H, W) (DistBelief's
    2-D blocks; ``auto_grid`` when not given, axis ``blocks`` when cols > 1); layers cut
    by channels stay 1-D."""
    rows, cols = tuple(grid) if grid else auto_grid(model, m)
    out, axes = [], []
    for node, axis in zip(model.nodes, _axes(model, cols)):
        if axis == "rows":
            boxes = _blocks(node.out_shape, rows, cols)
            axis = "blocks" if cols > 1 else "rows"
        else:
            boxes = cut_along(node.out_shape, AXIS[axis], m, node.layer.unit(node.in_shape) if axis == "channels" else 1)
        out.append(tuple((slot, b) for slot, b in enumerate(boxes) if box_size(b)))
        axes.append(axis)
    return tuple(out), tuple(axes)


def balanced_stages(costs: list[float], m: int) -> list[int]:
    """Stage index per layer: contiguous groups minimising the largest group cost (linear
    partition by binary search on the bound; exact for these sizes), then the costliest
    group of several layers cut in two at its most even point until there are ``m`` groups
    or every group is one layer: a stage the bound leaves empty (one layer, such as a
    language model's head, costing more than the rest of its share) still gets layers, as
    a pipeline of m devices uses all m, and no group grows."""
    if not costs:
        return []
    assign = _bounded_stages(costs, m)
    groups = [[i for i, s in enumerate(assign) if s == g] for g in range(assign[-1] + 1)]
    while len(groups) < m:
        wide = [g for g in groups if len(g) > 1]
        if not wide:
            break
        g = max(wide, key=lambda g: sum(costs[i] for i in g))
        cut = min(range(1, len(g)), key=lambda k: max(sum(costs[i] for i in g[:k]), sum(costs[i] for i in g[k:])))
        at = groups.index(g)
        groups[at:at + 1] = [g[:cut], g[cut:]]
    return [s for s, g in enumerate(groups) for _ in g]


def _bounded_stages(costs: list[float], m: int) -> list[int]:
    """``balanced_stages``'s first pass: at most ``m`` groups under the least bound."""

    def groups_needed(bound: float) -> list[int]:
        stage, acc, assign = 0, 0.0, []
        for c in costs:
            if acc and acc + c > bound:
                stage, acc = stage + 1, 0.0
            acc += c
            assign.append(stage)
        return assign

    lo, hi = max(costs), sum(costs)
    for _ in range(100):
        mid = (lo + hi) / 2
        if groups_needed(mid)[-1] + 1 <= m:
            hi = mid
        else:
            lo = mid
    return groups_needed(hi)


def stage_cost(node) -> float:
    """A layer's weight in balancing pipeline stages: its forward and backward FLOPs, and 1
    so that layers without FLOPs still count."""
    return node.fwd_flops * (1 + node.bwd_ratio) + 1.0


def _stages(model: Model, m: int) -> list[int]:
    """Each layer's pipeline stage: ``m`` contiguous groups balanced by FLOPs (fewer only
    where the model has fewer layers)."""
    return balanced_stages([stage_cost(n) for n in model.nodes], m)


def layer_slices(model: Model, m: int) -> tuple[Slices, tuple[str, ...]]:
    stages = _stages(model, m)
    slices = tuple(((stage, full_box(n.out_shape)),) for stage, n in zip(stages, model.nodes))
    return slices, tuple("channels" for _ in model.nodes)


def pipeline_slices(model: Model, stages: int, m: int, grid: tuple[int, ...] = ()) -> tuple[Slices, tuple[str, ...]]:
    """``stages`` pipeline stages (balanced as a layers split balances them), each layer cut
    over its stage's ``m`` slots as the spatial split cuts it: slot ``stage * m + j`` holds
    box j, so a stage's slots are consecutive (one machine's GPUs, as Megatron places them)."""
    stage = _stages(model, stages)
    slices, axes = spatial_slices(model, m, grid)
    return tuple(tuple((stage[i] * m + j, box) for j, box in sl) for i, sl in enumerate(slices)), axes


# --- tensor (Megatron-LM) split: docs/decisions/019 ------------------------------------------
Parts = tuple[tuple[tuple[int, int, int], ...], ...]  # per layer: ((slot, lo, hi), ...) of a partial sum; () if none


def _position_wise(node, m: int) -> bool:
    """Whether a row (position) cut of the layer's output in ``m`` reads the same rows of
    each input: norms, sums and element-wise kinds of a sequence, cut by sequence parallelism."""
    shape = node.out_shape
    if shape[1] < m or any(s[1] != shape[1] for s in node.in_shapes):
        return False
    return all(need[1] == box[1] for box in cut_along(shape, 1, m)
               for need in node.layer.input_boxes(node.in_shapes, box))


def tensor_states(model: Model, m: int, cut: Slices, axes: tuple[str, ...], sequence: bool = False) -> list[str]:
    """Each layer's output under Megatron's split of M slots, from kinds and edges alone:
    ``partial`` (every slot a partial sum of the whole output, allreduced before it is read:
    a conv2d reading a channel-cut input -- the row-parallel projection after attention or
    the MLP's down projection -- or an embedding over its slot's words), ``rep`` (every slot
    the whole output: norms and element-wise layers whose inputs are whole), ``seq`` (with
    ``sequence`` parallelism, those of them that act per position, cut by positions instead),
    or ``cut`` (as the spatial split cuts it, ``cut`` and ``axes``: column-parallel
    attention, dense and conv2d layers reading a whole input, element-wise layers on their
    cut, the head and its softmax by words).  A replicated layer never reads a cut one (its
    gradient would come back from every slot), and a partial sum's readers are all cut by
    positions or none is (``seq`` is withdrawn from the others until that holds)."""
    barred: set[int] = set()
    while True:
        states = _states(model, m, cut, axes, sequence, barred)
        mixed = {c for i, s in enumerate(states) if s == "partial" for c in model.consumers[i]
                 if states[c] == "seq" and any(states[o] != "seq" for o in model.consumers[i])}
        if not mixed:
            return states
        barred |= mixed


def _states(model: Model, m: int, cut: Slices, axes: tuple[str, ...], sequence: bool, barred: set[int]) -> list[str]:
    states: list[str] = []
    for node in model.nodes:
        ins = ["rep" if src < 0 else states[src] for src in node.inputs]
        layer, src = node.layer, node.inputs[0]
        if m > 1 and layer.reduces == "vocab" and "cut" not in ins and layer.reduced(node.in_shape) >= m:
            states.append("partial")
        elif m > 1 and layer.reduces == "inputs" and ins == ["cut"] and axes[src] == "channels" and len(cut[src]) == m:
            states.append("partial")
        elif layer.split == "follow" or layer.replicate:
            if sequence and node.index not in barred and "cut" not in ins and _position_wise(node, m):
                states.append("seq")
            else:
                states.append("rep" if set(ins) <= {"rep", "partial"} else "cut")
        else:
            states.append("cut")
    return states


def _scattered(model: Model, states: list[str]) -> list[bool]:
    """Per layer, whether it is a partial sum read only by layers cut by positions: its
    allreduce is a reduce-scatter by positions alone (sequence parallelism)."""
    return [s == "partial" and bool(model.consumers[i]) and all(states[c] == "seq" for c in model.consumers[i])
            for i, s in enumerate(states)]


def _cuts_allowed(model: Model, states: list[str], scattered: list[bool], alone: bool = False) -> list[bool]:
    """Per layer, whether a pipeline stage may end after it: only its own output crosses (a
    block's output, never a residual beside a branch: both would travel), not inside a
    repeated block (Megatron gives each stage whole transformer layers), and with several
    slots a stage (``alone`` False) that output is whole on every slot (after its
    allreduce) or cut by positions, read by no partial sum (a row-parallel layer reads its
    input cut), so a tensor group's allreduces stay in one stage: a post-norm block (BERT)
    ends in a layer norm the next block's column-parallel attention reads whole."""
    ok, inside = [], False              # inside: a block's inner layer since the last block end
    for i in range(len(model.nodes)):
        crossing = [(src, c) for src in range(i + 1) for c in model.consumers[src] if c > i]
        inside = inside or i in model.inner
        whole = all(src == i for src, _ in crossing) and i not in model.inner and (inside or not model.inner)
        ok.append(whole and (alone or all(states[src] != "cut" and not scattered[src] and states[c] != "partial"
                                          for src, c in crossing)))
        inside = inside and not ok[-1]
    return ok


def tensor_slices(model: Model, stages: int, m: int, sequence: bool = False) -> tuple[Slices, tuple[str, ...], Parts]:
    """Megatron-LM's split of each of ``stages`` pipeline stages over ``m`` slots (slot
    ``stage * m + j``): ``cut`` layers' boxes are the spatial split's (1-D), ``seq`` layers'
    positions in m even rows, ``rep`` and ``partial`` layers have the whole output on every
    slot of their stage, and a partial layer's slot j sums over its input's channels on slot
    j (no transfer) or over words ``even_cuts(vocab, m)[j]``.  Stages end only where
    ``_cuts_allowed``; axes name the state of the layers not cut as ``spatial`` cuts them
    (``replicated``, ``partial``, ``scattered``: a partial sum reduce-scattered by positions,
    ``positions``: a ``seq`` layer)."""
    cut, axes = spatial_slices(model, m, (m, 1))
    states = tensor_states(model, m, cut, axes, sequence)
    scattered = _scattered(model, states)
    allowed = _cuts_allowed(model, states, scattered, alone=m == 1)
    groups, costs = [], []                       # contiguous runs of layers ending where a cut is allowed
    for i, node in enumerate(model.nodes):
        if not groups or allowed[i - 1]:
            groups.append([])
            costs.append(0.0)
        groups[-1].append(i)
        costs[-1] += stage_cost(node)
    stage = [0] * len(model.nodes)
    for g, s in zip(groups, balanced_stages(costs, stages)):
        for i in g:
            stage[i] = s
    if len(set(stage)) < stages:
        raise ValueError(f"a pipeline stage ends only between whole blocks (transformer layers), where only the "
                         f"block's output crosses and a tensor group's allreduces are done: this model gives "
                         f"{len(groups)} pieces, which fill {len(set(stage))} of {stages} stages")
    slices, names, parts = [], [], []
    for i, (node, state) in enumerate(zip(model.nodes, states)):
        base = stage[i] * m
        if state in ("cut", "seq"):
            boxes = cut[i] if state == "cut" else tuple(enumerate(cut_along(node.out_shape, 1, m)))
            slices.append(tuple((base + j, box) for j, box in boxes))
            names.append(axes[i] if state == "cut" else "positions")
            parts.append(())
            continue
        slices.append(tuple((base + j, full_box(node.out_shape)) for j in range(m)))
        names.append("replicated" if state == "rep" else "scattered" if scattered[i] else "partial")
        if state == "rep":
            parts.append(())
        elif node.layer.reduces == "vocab":
            words = even_cuts(node.layer.reduced(node.in_shape), m)
            parts.append(tuple((base + j, lo, hi) for j, (lo, hi) in enumerate(words)))
        else:
            src = cut[node.inputs[0]]
            parts.append(tuple((base + j, box[0][0], box[0][1]) for j, box in src))
    return tuple(slices), tuple(names), tuple(parts)
