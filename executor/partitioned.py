"""One replica's training step of a Plan, run for real: the same op graph the simulator
runs, with real arrays and real messages.

Each process holds some device slots of the replica (all of them in one process, one each
under MPI) and walks ``plan.ops`` in order, so each slot runs its compute ops in its
pipeline schedule's order (GPipe or 1F1B), as the Plan lists them: a ``fwd``/``bwd`` op of
a slot it holds runs that layer's kernel on the slot's box; an ``xfer`` sends (when it holds the source) and
receives (when it holds the destination) exactly the elements the Plan counted: the part
of the producer's box that the layers reading it on the destination read (``Edge``), or
back on the way down the sum of those readers' gradients of it.  The order is topological and sends do not block, so no
two ranks wait on each other; the receiver knows every message's shape from the Plan, so
a message is its payload alone.

Softmax over features cut by channels exchanges two numbers per sample (each slice's max
and sum of exponentials), as the Plan's ``reduction`` transfers say.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from clustersim.core.layers import Box, box_intersect
from clustersim.core.partition import even_cuts
from clustersim.core.plan import Plan, edges

from executor import kernels


def _shape(batch: int, box: Box) -> tuple:
    return (batch, *[b - a for a, b in box])


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


class _Step:
    """The arrays of one step on the slots held here, and what each op does to them.
    Keys are (layer, slot, micro).  A layer's input regions are assembled from its inputs'
    boxes (its own slot's, and those received); its output's gradient is the sum of what
    each layer reading it gives back (from its own slot, and received)."""

    def __init__(self, p: Plan, x, labels, transport, xp, dropout) -> None:
        self.p, self.x, self.labels, self.transport, self.xp, self.dropout = p, x, labels, transport, xp, dropout
        self.nodes = p.scenario.model.nodes
        self.consumers = p.scenario.model.consumers
        self.boxes = [dict(sl) for sl in p.slices]
        self.edges = edges(p.scenario.model, p.slices)
        self.micro = even_cuts(len(x), p.scenario.parallel.micro_batches)
        self.masks: dict[int, object] = {}
        self.out: dict[tuple, object] = {}          # output box
        self.cache: dict[tuple, tuple] = {}         # (input regions, kernel cache, region shapes)
        self.dins: dict[tuple, tuple] = {}          # (input regions, gradient of each)
        self.recv_act: dict[tuple, list] = {}       # (src layer, dst, micro) -> [(box, array)]
        self.recv_grad: dict[tuple, list] = {}      # (layer, owner, micro) -> [(box, array)] of its output's gradient
        self.red: dict[tuple, list] = {}            # (layer, dst, micro) -> [(max, sumexp)] of other slices
        self.grads: dict[tuple[int, int], list] = {}
        self.loss = 0.0
        self.logits: dict[tuple[int, int], object] = {}

    def regions(self, i: int, j: int) -> tuple[Box, ...]:
        node = self.nodes[i]
        return node.layer.input_boxes(node.in_shapes, self.boxes[i][j])

    def _kernel(self, fn, node, args: list, regions, box, *rest):
        """``fn`` (kernels.forward / backward) with lists for a kind reading several inputs."""
        if node.layer.arity == 1:
            return fn(self.xp, node.layer, node.in_shape, args[0], regions[0], box, *rest)
        return fn(self.xp, node.layer, list(node.in_shapes), args, list(regions), box, *rest)

    # --- messages: exactly what the Plan counted ---------------------------------------------
    def send(self, op) -> None:
        m = op.micro
        if op.why == "reduction":            # softmax: this slice's max and sum of exponentials per position
            z = self.out[(op.layer, op.slot, m)][:, :, :, 0]                     # (b, c, t)
            mx = z.max(axis=1)
            se = self.xp.exp(z - mx[:, None]).sum(axis=1)
            self.transport.send(op.slot, op.dst, ("r", op.layer, m), self.xp.stack([mx, se], axis=2))
        elif op.why != "gradient":           # the part of the producer's box the readers on dst read
            src = op.producer
            e, own = self.edges[(src, op.slot, op.dst)], self.boxes[src][op.slot]
            self.transport.send(op.slot, op.dst, ("a", src, m), self.out[(src, op.slot, m)][_rel(e.box, own)])
        else:                                # the readers' gradients of it, summed, to its owner op.dst
            src = op.producer
            e = self.edges[(src, op.dst, op.slot)]
            buf = self.xp.zeros(_shape(self.micro[m][1] - self.micro[m][0], e.box), dtype=self.x.dtype)
            for c in e.readers:
                regions, dxs = self.dins[(c, op.slot, m)]
                for s, region, dx in zip(self.nodes[c].inputs, regions, dxs):
                    ov = box_intersect(e.box, region)
                    if s == src and all(b > a for a, b in ov):
                        buf[_rel(ov, e.box)] += dx[_rel(ov, region)]
            self.transport.send(op.slot, op.dst, ("g", src, m), buf)

    def recv(self, op) -> None:
        m = op.micro
        lo, hi = self.micro[m]
        dtype = self.x.dtype
        if op.why == "reduction":
            t = self.nodes[op.layer].out_shape[1]
            self.red.setdefault((op.layer, op.dst, m), []).append(
                self.transport.recv(op.slot, op.dst, ("r", op.layer, m), (hi - lo, t, 2), dtype))
        elif op.why != "gradient":
            e = self.edges[(op.producer, op.slot, op.dst)]
            self.recv_act.setdefault((op.producer, op.dst, m), []).append(
                (e.box, self.transport.recv(op.slot, op.dst, ("a", op.producer, m), _shape(hi - lo, e.box), dtype)))
        else:
            e = self.edges[(op.producer, op.dst, op.slot)]
            self.recv_grad.setdefault((op.producer, op.dst, m), []).append(
                (e.box, self.transport.recv(op.slot, op.dst, ("g", op.producer, m), _shape(hi - lo, e.box), dtype)))

    # --- compute --------------------------------------------------------------------------------
    def forward(self, i: int, j: int, m: int, params: list) -> None:
        xp, node, box = self.xp, self.nodes[i], self.boxes[i][j]
        lo, hi = self.micro[m]
        regions = self.regions(i, j)
        xrs = []
        for src, region in zip(node.inputs, regions):
            xr = xp.zeros((hi - lo, *[b - a for a, b in region]), dtype=self.x.dtype)
            if src < 0:
                xr[...] = self.x[(slice(lo, hi),) + _rel(region, ((0, 0), (0, 0), (0, 0)))[1:]]
            else:
                pieces = list(self.recv_act.get((src, j, m), []))
                if j in self.boxes[src] and (src, j, m) in self.out:
                    pieces.append((self.boxes[src][j], self.out[(src, j, m)]))
                for pbox, arr in pieces:
                    ov = box_intersect(pbox, region)
                    if all(b > a for a, b in ov):
                        xr[_rel(ov, region)] = arr[_rel(ov, pbox)]
            xrs.append(xr)
        mask = None
        if node.layer.kind == "dropout" and self.dropout is not None:
            if i not in self.masks:
                self.masks[i] = self.dropout(i, (len(self.x), *node.out_shape))
            mask = self.masks[i][(slice(lo, hi),) + _rel(box, ((0, 0), (0, 0), (0, 0)))[1:]]
        y, c = self._kernel(kernels.forward, node, xrs, regions, box, params, mask)
        self.out[(i, j, m)] = y
        self.cache[(i, j, m)] = (regions, c, [xr.shape for xr in xrs])
        if not self.consumers[i]:
            self.logits[(j, m)] = y

    def backward(self, i: int, j: int, m: int, params: list) -> None:
        node, box = self.nodes[i], self.boxes[i][j]
        lo, hi = self.micro[m]
        y = self.out[(i, j, m)]
        if not self.consumers[i]:            # the loss
            dy, part = _softmax_grad(self.xp, self.p, y, box, self.red.pop((i, j, m), []), self.labels[lo:hi],
                                     len(self.x))
            self.loss += part
        else:
            dy = self.xp.zeros_like(y)
            pieces = self.recv_grad.pop((i, j, m), [])
            for c in self.consumers[i]:      # the readers on this slot
                if (c, j, m) not in self.dins:
                    continue
                regions, dxs = self.dins[(c, j, m)]
                for s, region, dx in zip(self.nodes[c].inputs, regions, dxs):
                    ov = box_intersect(box, region)
                    if s == i and all(b > a for a, b in ov):
                        pieces.append((ov, dx[_rel(ov, region)]))
            for pbox, arr in pieces:
                dy[_rel(pbox, box)] += arr
        regions, c, shapes = self.cache.pop((i, j, m))
        dxs, dpar = self._kernel(kernels.backward, node, shapes, regions, box, params, c, dy)
        self.dins[(i, j, m)] = (regions, dxs if node.layer.arity != 1 else [dxs])
        if dpar:                                     # the first micro-batch's gradients are the accumulator
            if (i, j) not in self.grads:
                self.grads[(i, j)] = list(dpar)
            else:
                for a, g in zip(self.grads[(i, j)], dpar):
                    a += g


def run_step(p: Plan, slots: set[int], params: dict[tuple[int, int], list], x, labels, transport,
             xp=np, dropout: Callable[[int, tuple], object] | None = None,
             on_op: Callable | None = None, backward: bool = True) -> StepResult:
    """One forward and backward pass of the whole batch ``x`` (B, C, H, W) for the slots
    held here.  ``params[(layer, slot)]`` are the box's parameters; ``dropout(layer, shape)``
    gives the keep mask of the whole layer output for the batch (scaled), or None.
    ``backward=False`` runs the forward pass only (evaluation)."""
    step = _Step(p, x, labels, transport, xp, dropout)
    skip = (lambda op: op.kind == "bwd" or op.why in ("gradient", "reduction")) if not backward else (lambda op: False)
    sends_after: dict[int, list] = {}        # a compute op -> the messages it completes (sent at once)
    received: set[int] = set()
    for op in p.ops:
        if op.kind == "xfer" and op.slot in slots and not skip(op):
            sends_after.setdefault(max(op.deps), []).append(op)
    for op in p.ops:
        if skip(op) or op.kind == "xfer" or op.slot not in slots:
            continue
        for d in op.deps:                    # the messages this op needs, received just before the first
            msg = p.ops[d]
            if msg.kind == "xfer" and d not in received:
                received.add(d)
                step.recv(msg)
                if on_op is not None:
                    on_op(msg, "recv")
        run = step.forward if op.kind == "fwd" else step.backward
        run(op.layer, op.slot, op.micro, params.get((op.layer, op.slot), []))
        if on_op is not None:
            on_op(op, "")
        for x_op in sends_after.get(op.id, ()):
            step.send(x_op)
            if on_op is not None:
                on_op(x_op, "send")
    transport.flush()
    return StepResult(float(step.loss), step.grads, step.logits)


def _softmax_grad(xp, p: Plan, y, box: Box, others: list, labels, batch: int):
    """Gradient of the mean cross-entropy (over samples and positions) for this slice of the
    logits, and its share of the loss; ``labels`` (b,) or (b, T), ``others`` the other
    slices' (max, sum of exponentials) per sample and position."""
    z = y[:, :, :, 0].transpose(0, 2, 1)                      # (b, t, c) logits of the slice
    labels = labels.reshape(len(z), -1)                      # (b, t)
    mx = z.max(axis=2)
    se = xp.exp(z - mx[:, :, None]).sum(axis=2)
    M = mx
    for o in others:
        M = xp.maximum(M, o[:, :, 0])
    S = se * xp.exp(mx - M)
    for o in others:
        S = S + o[:, :, 1] * xp.exp(o[:, :, 0] - M)
    prob = xp.exp(z - M[:, :, None]) / S[:, :, None]
    c0, c1 = box[0]
    count = batch * z.shape[1]
    inside = (labels >= c0) & (labels < c1)
    g = prob.copy()
    rows, pos = xp.nonzero(inside)
    g[rows, pos, labels[inside] - c0] -= 1.0
    part = -xp.log(prob[rows, pos, labels[inside] - c0] + 1e-30).sum() / count
    return (g / count).transpose(0, 2, 1)[:, :, :, None], float(part)
