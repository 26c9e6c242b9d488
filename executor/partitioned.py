"""One replica's training step of a Plan, run for real: the same op graph the simulator
runs, with real arrays and real messages.

Each process holds some device slots of the replica (all of them in one process, one each
under MPI) and walks ``plan.ops`` in order, so each slot runs its compute ops in its
pipeline schedule's order (GPipe or 1F1B), as the Plan lists them: a ``fwd``/``bwd`` op of
a slot it holds runs that layer's kernel on the slot's box; an ``xfer`` sends (when it holds the source) and
receives (when it holds the destination) exactly the elements the Plan counted: the
producer's box intersected with what the consumer's box reads, or back on the way down
the gradient of those elements.  The order is topological and sends do not block, so no
two ranks wait on each other; the receiver knows every message's shape from the Plan, so
a message is its payload alone.

Softmax over features cut by channels exchanges two numbers per sample (each slice's max
and sum of exponentials), as the Plan's ``reduction`` transfers say.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from clustersim.core.layers import Box
from clustersim.core.partition import even_cuts
from clustersim.core.plan import Plan

from executor import kernels


def _shape(batch: int, box: Box) -> tuple:
    return (batch, *[b - a for a, b in box])


def intersect(a: Box, b: Box) -> Box:
    return tuple((max(x0, y0), min(x1, y1)) for (x0, x1), (y0, y1) in zip(a, b))


def _rel(inner: Box, outer: Box) -> tuple:
    """Index of ``inner`` (absolute coordinates) inside an array that holds ``outer``."""
    return (slice(None),) + tuple(slice(a - o, b - o) for (a, b), (o, _) in zip(inner, outer))


def _box_of(p: Plan, layer: int, slot: int) -> Box | None:
    for s, box in p.slices[layer]:
        if s == slot:
            return box
    return None


# --- parameters of a box ------------------------------------------------------------------
def slot_params(p: Plan, full: dict[int, list], contiguous: bool = False) -> dict[tuple[int, int], list]:
    """Each (layer, slot)'s parameters, cut from the whole layers' arrays ``full`` (as
    ``init_params`` makes them) where the core layer's ``box_index`` says its box keeps them;
    ``contiguous`` copies each cut into an array of its own (a message's buffer)."""
    nodes = p.scenario.model.nodes
    return {(i, j): [np.ascontiguousarray(a[ix]) if contiguous else a[ix]
                     for a, ix in zip(full[i], nodes[i].layer.box_index(box))]
            for i, sl in enumerate(p.slices) if i in full for j, box in sl}


# --- transports ----------------------------------------------------------------------------
class Mailbox:
    """In-process transport: every slot in this process; a send is picked up by its receive."""

    def __init__(self) -> None:
        self.box: dict[tuple, object] = {}
        self.bytes = 0

    def send(self, src: int, dst: int, tag: tuple, array) -> None:
        self.box[(src, dst, tag)] = array.copy()
        self.bytes += array.nbytes

    def recv(self, src: int, dst: int, tag: tuple, shape: tuple = (), dtype=None):
        return self.box.pop((src, dst, tag))

    def flush(self) -> None:
        pass


# --- one step --------------------------------------------------------------------------------
@dataclass
class StepResult:
    loss: float                                   # this process's share of the mean loss
    grads: dict[tuple[int, int], list]            # (layer, slot) -> parameter gradients of the box
    logits: dict[tuple[int, int], object] = field(default_factory=dict)   # (slot, micro) -> its box of the logits


def run_step(p: Plan, slots: set[int], params: dict[tuple[int, int], list], x, labels, transport,
             xp=np, dropout: Callable[[int, tuple], object] | None = None,
             on_op: Callable | None = None, backward: bool = True) -> StepResult:
    """One forward and backward pass of the whole batch ``x`` (B, C, H, W) for the slots
    held here.  ``params[(layer, slot)]`` are the box's parameters; ``dropout(layer, shape)``
    gives the keep mask of the whole layer output for the batch (scaled), or None.
    ``backward=False`` runs the forward pass only (evaluation)."""
    model = p.scenario.model
    nodes = model.nodes
    last = len(nodes) - 1
    batch = len(x)
    micro = even_cuts(batch, p.scenario.parallel.micro_batches)
    masks: dict[int, object] = {}
    out: dict[tuple, object] = {}           # (layer, slot, micro) -> output box
    cache: dict[tuple, tuple] = {}          # (layer, slot, micro) -> (region, kernel cache, region shape)
    dins: dict[tuple, object] = {}          # (layer, slot, micro) -> gradient of its input region
    recv_act: dict[tuple, list] = {}        # (layer, dst, micro) -> [(box, array)]
    recv_grad: dict[tuple, list] = {}       # (layer, dst, micro) -> [(box, array)] gradients of its output
    red: dict[tuple, list] = {}             # (layer, dst, micro) -> [(max, sumexp)] of other slices
    grads: dict[tuple[int, int], list] = {}
    loss = 0.0
    logits = {}

    def needs(i, j):
        node = nodes[i]
        return node.layer.needs(node.in_shape, _box_of(p, i, j))

    def send(op) -> None:                    # this slot's part of an xfer: what the Plan counted
        i, m = op.layer, op.micro
        if op.why == "reduction":            # softmax: this slice's max and sum of exponentials
            z = out[(i, op.slot, m)][:, :, 0, 0]
            mx = z.max(axis=1)
            se = xp.exp(z - mx[:, None]).sum(axis=1)
            transport.send(op.slot, op.dst, ("r", i, m), xp.stack([mx, se], axis=1))
        elif op.why != "gradient":
            prev = _box_of(p, i - 1, op.slot)
            ov = intersect(prev, needs(i, op.dst))
            transport.send(op.slot, op.dst, ("a", i, m), out[(i - 1, op.slot, m)][_rel(ov, prev)])
        else:                                # gradient of layer i-1's output, to its owner op.dst
            region = needs(i, op.slot)
            ov = intersect(_box_of(p, i - 1, op.dst), region)
            transport.send(op.slot, op.dst, ("g", i, m), dins[(i, op.slot, m)][_rel(ov, region)])

    def recv(op) -> None:
        i, m = op.layer, op.micro
        lo, hi = micro[m]
        if op.why == "reduction":
            red.setdefault((i, op.dst, m), []).append(transport.recv(op.slot, op.dst, ("r", i, m),
                                                                     (hi - lo, 2), x.dtype))
        elif op.why != "gradient":
            ov = intersect(_box_of(p, i - 1, op.slot), needs(i, op.dst))
            recv_act.setdefault((i, op.dst, m), []).append(
                (ov, transport.recv(op.slot, op.dst, ("a", i, m), _shape(hi - lo, ov), x.dtype)))
        else:
            ov = intersect(_box_of(p, i - 1, op.dst), needs(i, op.slot))
            recv_grad.setdefault((i - 1, op.dst, m), []).append(
                (ov, transport.recv(op.slot, op.dst, ("g", i, m), _shape(hi - lo, ov), x.dtype)))

    skip = (lambda op: op.kind == "bwd" or op.why in ("gradient", "reduction")) if not backward else (lambda op: False)
    sends_after: dict[int, list] = {}        # a compute op -> the messages it completes (sent at once)
    for op in p.ops:
        if op.kind == "xfer" and op.slot in slots and not skip(op):
            sends_after.setdefault(max(op.deps), []).append(op)
    for op in p.ops:
        if skip(op) or op.kind == "xfer" or op.slot not in slots:
            continue
        for d in op.deps:                    # the messages this op needs, received just before it
            msg = p.ops[d]
            if msg.kind == "xfer":
                recv(msg)
                if on_op is not None:
                    on_op(msg, "recv")
        i, m = op.layer, op.micro
        lo, hi = micro[m]
        node = nodes[i]
        if op.kind == "fwd":
            j, box = op.slot, _box_of(p, i, op.slot)
            region = needs(i, j)
            xr = xp.zeros((hi - lo, *[b - a for a, b in region]), dtype=x.dtype)
            if i == 0:
                xr[...] = x[(slice(lo, hi),) + _rel(region, ((0, 0), (0, 0), (0, 0)))[1:]]
            else:
                own = _box_of(p, i - 1, j)
                pieces = recv_act.pop((i, j, m), [])
                if own is not None and (i - 1, j, m) in out:
                    pieces.append((own, out[(i - 1, j, m)]))
                for pbox, arr in pieces:
                    ov = intersect(pbox, region)
                    if all(b > a for a, b in ov):
                        xr[_rel(ov, region)] = arr[_rel(ov, pbox)]
            mask = None
            if node.layer.kind == "dropout" and dropout is not None:
                if i not in masks:
                    masks[i] = dropout(i, (batch, *node.out_shape))
                mask = masks[i][(slice(lo, hi),) + _rel(box, ((0, 0), (0, 0), (0, 0)))[1:]]
            y, c = kernels.forward(xp, node.layer, node.in_shape, xr, region, box, params.get((i, j), []), mask)
            out[(i, j, m)] = y
            cache[(i, j, m)] = (region, c, xr.shape)
            if i == last:
                logits[(j, m)] = y
        else:
            j, box = op.slot, _box_of(p, i, op.slot)
            y = out[(i, j, m)]
            if i == last:
                dy, part = _softmax_grad(xp, p, y, box, red.pop((i, j, m), []), labels[lo:hi], batch)
                loss += part
            else:
                dy = xp.zeros_like(y)
                pieces = recv_grad.pop((i, j, m), [])
                if (i + 1, j, m) in dins:        # this slot's own consumer
                    region = needs(i + 1, j)
                    ov = intersect(box, region)
                    if all(b > a for a, b in ov):
                        pieces.append((ov, dins[(i + 1, j, m)][_rel(ov, region)]))
                for pbox, arr in pieces:
                    dy[_rel(pbox, box)] += arr
            region, c, shape = cache.pop((i, j, m))
            dxr, dpar = kernels.backward(xp, node.layer, node.in_shape, shape, region, box,
                                         params.get((i, j), []), c, dy)
            if i > 0:
                dins[(i, j, m)] = dxr
            if dpar:                                     # the first micro-batch's gradients are the accumulator
                if (i, j) not in grads:
                    grads[(i, j)] = list(dpar)
                else:
                    for a, g in zip(grads[(i, j)], dpar):
                        a += g
        if on_op is not None:
            on_op(op, "")
        for x_op in sends_after.get(op.id, ()):
            send(x_op)
            if on_op is not None:
                on_op(x_op, "send")
    transport.flush()
    return StepResult(float(loss), grads, logits)


def _softmax_grad(xp, p: Plan, y, box: Box, others: list, labels, batch: int):
    """Gradient of the mean cross-entropy for this slice of the logits, and its share of the loss."""
    z = y[:, :, 0, 0]                                        # (b, c) logits of the slice
    mx = z.max(axis=1)
    se = xp.exp(z - mx[:, None]).sum(axis=1)
    M = mx
    for o in others:
        M = xp.maximum(M, o[:, 0])
    S = se * xp.exp(mx - M)
    for o in others:
        S = S + o[:, 1] * xp.exp(o[:, 0] - M)
    prob = xp.exp(z - M[:, None]) / S[:, None]
    c0, c1 = box[0]
    inside = (labels >= c0) & (labels < c1)
    g = prob.copy()
    rows = xp.arange(len(labels))[inside]
    g[rows, labels[inside] - c0] -= 1.0
    part = -xp.log(prob[rows, labels[inside] - c0] + 1e-30).sum() / batch
    return (g / batch)[:, :, None, None], float(part)
