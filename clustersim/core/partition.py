"""How one replica of a model is cut over M device slots.

``spatial`` (DistBelief): every layer's output is cut into M boxes (rows or channels, as
the layer kind says); slot j computes box j of every layer.  ``layers`` (pipeline):
consecutive layers form M stages balanced by FLOPs; a layer's single box sits on its
stage's slot.  Either way the result is, per layer, a list of (slot, box); transfers and
parameters follow from boxes alone, so both splits share one mechanism.
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


def _cut(shape: Shape, axis: int, parts: int) -> list[Box]:
    boxes = []
    for lo, hi in even_cuts(shape[axis], parts):
        box = list(full_box(shape))
        box[axis] = (lo, hi)
        boxes.append(tuple(box))
    return boxes


def spatial_slices(model: Model, m: int, grid: tuple[int, ...] = ()) -> tuple[Slices, tuple[str, ...]]:
    """Per layer the M boxes (empty boxes dropped) and the axis each layer is cut on.
    ``grid`` (rows, cols): 2-D blocks where a layer is cut by rows (not yet: refused)."""
    if grid and grid[1] > 1:
        raise NotImplementedError("2-D blocks")
    out, axes = [], []
    axis = "rows" if model.input_shape[1] > 1 else "channels"
    for node in model.nodes:
        want = node.layer.split if node.layer.split != "follow" else axis
        if want == "rows" and node.out_shape[1] < 2:
            want = "channels"          # nothing left to cut by rows
        axis = want
        boxes = _cut(node.out_shape, AXIS[axis], m)
        out.append(tuple((slot, b) for slot, b in enumerate(boxes) if box_size(b)))
        axes.append(axis)
    return tuple(out), tuple(axes)


def balanced_stages(costs: list[float], m: int) -> list[int]:
    """Stage index per layer: contiguous groups, at most ``m``, minimising the largest
    group cost (linear partition by binary search on the bound; exact for these sizes)."""
    if not costs:
        return []

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


def layer_slices(model: Model, m: int) -> tuple[Slices, tuple[str, ...]]:
    costs = [n.fwd_flops * (1 + n.layer.bwd_ratio) + 1.0 for n in model.nodes]
    stages = balanced_stages(costs, m)
    slices = tuple(((stage, full_box(n.out_shape)),) for stage, n in zip(stages, model.nodes))
    return slices, tuple("channels" for _ in model.nodes)
