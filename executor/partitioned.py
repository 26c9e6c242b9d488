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

A tensor split's allreduces are the Plan's reduce-scatter and all-gather sends: a slot sums
the pieces it receives into its own piece before it sends that on, and every slot reads the
whole sum -- of a layer's partial sums (forward) or of the gradients its cut readers give
back (backward; an all-gather alone where each slot's readers give back only its piece).
A send that waits for received pieces is made at its place in the Plan's order, after
receiving them, so ranks walking the same order never wait in a circle.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from clustersim.core.layers import Box, box_intersect
from clustersim.core.partition import even_cuts
from clustersim.core.plan import RECOMPUTE, Plan, allreduce_pieces, edges, grad_allreduced, param_index, part_of, reads

from executor import kernels


AR_TAGS = {"reduce-scatter": "rs", "all-gather": "ag", "gradient reduce-scatter": "grs", "gradient all-gather": "gag",
           "weight gradient reduce-scatter": "wrs", "weight gradient all-gather": "wag"}


def tag_of(op) -> tuple:
    """The tag transfer ``op``'s message carries: (kind, layer, micro-batch)."""
    if op.why in AR_TAGS:
        return AR_TAGS[op.why], op.producer, op.micro
    if op.why == "reduction":
        return "r", op.layer, op.micro
    return ("g" if op.why == "gradient" else "a"), op.producer, op.micro


def skipped(op, backward: bool) -> bool:
    """Whether ``run_step`` leaves ``op`` out: the backward's ops in a forward-only pass, and
    always the recomputed forward's allreduces (``training.recompute``): the executor keeps
    every activation and does not rerun the forward, so it has nothing to send again."""
    return op.why in RECOMPUTE or (
        not backward and (op.kind == "bwd" or op.why == "reduction" or op.why.startswith(("gradient", "weight"))))


def waits_for_messages(ops, op) -> bool:
    """Whether transfer ``op`` forwards received pieces: ``run_step`` sends it at its place in
    the Plan's order, after taking them, rather than as soon as its compute is done."""
    return any(ops[d].kind == "xfer" for d in op.deps)


def pieces(flat, arrays) -> list:
    """``flat`` cut into views shaped as ``arrays``, one after the other."""
    out, pos = [], 0
    for a in arrays:
        out.append(flat[pos:pos + a.size].reshape(a.shape))
        pos += a.size
    return out


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
    model = p.scenario.model
    return {(i, j): [np.ascontiguousarray(a[ix]) if contiguous else a[ix]
                     for a, ix in zip(full[i], param_index(model, p.parts, i, j, box))]
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
        model = p.scenario.model
        self.edges = edges(model, p.slices, p.parts, p.scenario.parallel.tensor)
        self.parts = {(i, j): part_of(model, p.parts, i, j) for i, sl in enumerate(p.slices) for j, _ in sl}
        self.ar_readers = [grad_allreduced(model, p.slices, p.axes, i) for i in range(len(self.nodes))]
        self.ar: dict[tuple, object] = {}           # (kind, layer, slot, micro) -> the whole buffer being allreduced
        self.ar_in: dict[tuple, list] = {}          # (kind, layer, slot, micro) -> reduce-scatter pieces not yet summed
        self.wbuf: dict[tuple, object] = {}         # (layer, slot) -> its parameters' gradients flat, being allreduced
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
        return reads(self.p.scenario.model, self.p.parts, i, j, self.boxes[i][j])

    def _kernel(self, fn, node, args: list, regions, box, *rest, part=None):
        """``fn`` (kernels.forward / backward) with lists for a kind reading several inputs;
        a tensor split's ``part`` runs its own layer on its part of the input."""
        if part is not None:
            return fn(self.xp, part.layer, part.in_shape, args[0], regions[0], box, *rest)
        if node.layer.arity == 1:
            return fn(self.xp, node.layer, node.in_shape, args[0], regions[0], box, *rest)
        return fn(self.xp, node.layer, list(node.in_shapes), args, list(regions), box, *rest)

    # --- a tensor split's allreduces ---------------------------------------------------------
    def _member(self, op) -> tuple[int, int]:
        """(the tensor group's size, the index of the member whose piece an allreduce transfer
        carries: the receiver's in a reduce-scatter, the sender's in an all-gather)."""
        group = [j for j, _ in self.p.slices[op.producer]]
        return len(group), group.index(op.dst if op.why.endswith("reduce-scatter") else op.slot)

    def _piece(self, op) -> Box:
        """The piece of the whole output an allreduce transfer carries (``_member``)."""
        n, k = self._member(op)
        return allreduce_pieces(self.nodes[op.producer].out_shape, n, self.p.axes[op.producer] == "scattered")[k]

    def _buffer(self, kind: str, i: int, j: int, m: int):
        """Slot j's whole buffer of layer i's allreduce (``a``: its partial sum, the output;
        ``g``: its cut readers' gradients of it on j, summed), with the pieces received so
        far added to its own piece (an all-gather's pieces overwrite theirs in ``recv``)."""
        key = (kind, i, j, m)
        if key not in self.ar:
            if kind == "a":
                self.ar[key] = self.out[(i, j, m)]
            else:
                buf = self.xp.zeros_like(self.out[(i, j, m)])
                for c in self.ar_readers[i]:
                    if (c, j, m) in self.dins:
                        self._add_dins(buf, self.boxes[i][j], i, c, j, m)
                self.ar[key] = buf
        buf = self.ar[key]
        for piece, arr in self.ar_in.pop(key, []):
            buf[_rel(piece, self.boxes[i][j])] += arr
        return buf

    def _weights(self, op, j: int) -> tuple:
        """(slot j's flat parameter gradients with the pieces received so far summed in, the
        range of them ``op`` carries) of a weight-gradient allreduce (sequence parallelism)."""
        key = (op.producer, j)
        if key not in self.wbuf:
            self.wbuf[key] = self.xp.concatenate([g.ravel() for g in self.grads[key]])
        flat = self.wbuf[key]
        for (lo, hi), arr in self.ar_in.pop(("w",) + key, []):
            flat[lo:hi] += arr
        n, k = self._member(op)
        return flat, even_cuts(len(flat), n)[k]

    def unflatten_weights(self) -> None:
        """The allreduced parameter gradients back into ``grads``."""
        for key, flat in self.wbuf.items():
            self.grads[key] = pieces(flat, self.grads[key])

    def _add_dins(self, buf, box: Box, i: int, c: int, j: int, m: int) -> None:
        """Adds reader c's (on slot j) gradients of layer i's output inside ``box`` to ``buf``."""
        regions, dxs = self.dins[(c, j, m)]
        for s, region, dx in zip(self.nodes[c].inputs, regions, dxs):
            ov = box_intersect(box, region)
            if s == i and all(b > a for a, b in ov):
                buf[_rel(ov, box)] += dx[_rel(ov, region)]

    # --- messages: exactly what the Plan counted ---------------------------------------------
    def output(self, i: int, j: int, m: int):
        """Layer i's output on slot j: a partial sum once its allreduce has reached j."""
        return self._buffer("a", i, j, m) if self.parts.get((i, j)) else self.out[(i, j, m)]

    def send(self, op) -> None:
        m = op.micro
        if op.why.startswith("weight"):
            flat, (lo, hi) = self._weights(op, op.slot)
            self.transport.send(op.slot, op.dst, tag_of(op), flat[lo:hi])
        elif op.why in AR_TAGS:
            i, box = op.producer, self.boxes[op.producer][op.slot]
            buf = self._buffer("g" if op.why.startswith("gradient") else "a", i, op.slot, m)
            self.transport.send(op.slot, op.dst, tag_of(op), buf[_rel(self._piece(op), box)])
        elif op.why == "reduction":            # softmax: this slice's max and sum of exponentials per position
            z = self.out[(op.layer, op.slot, m)][:, :, :, 0]                     # (b, c, t)
            mx = z.max(axis=1)
            se = self.xp.exp(z - mx[:, None]).sum(axis=1)
            self.transport.send(op.slot, op.dst, tag_of(op), self.xp.stack([mx, se], axis=2))
        elif op.why != "gradient":           # the part of the producer's box the readers on dst read
            src = op.producer
            e, own = self.edges[(src, op.slot, op.dst)], self.boxes[src][op.slot]
            self.transport.send(op.slot, op.dst, tag_of(op), self.output(src, op.slot, m)[_rel(e.box, own)])
        else:                                # the readers' gradients of it, summed, to its owner op.dst
            src = op.producer
            e = self.edges[(src, op.dst, op.slot)]
            buf = self.xp.zeros(_shape(self.micro[m][1] - self.micro[m][0], e.box), dtype=self.x.dtype)
            for c in e.readers:
                self._add_dins(buf, e.box, src, c, op.slot, m)
            self.transport.send(op.slot, op.dst, tag_of(op), buf)

    def recv(self, op) -> None:
        m = op.micro
        lo, hi = self.micro[m]
        dtype = self.x.dtype
        if op.why.startswith("weight"):
            flat, (a, b) = self._weights(op, op.dst)
            arr = self.transport.recv(op.slot, op.dst, tag_of(op), (b - a,), flat.dtype)
            if op.why.endswith("reduce-scatter"):
                self.ar_in.setdefault(("w", op.producer, op.dst), []).append(((a, b), arr))
            else:
                flat[a:b] = arr
        elif op.why in AR_TAGS:
            i, piece = op.producer, self._piece(op)
            kind = "g" if op.why.startswith("gradient") else "a"
            arr = self.transport.recv(op.slot, op.dst, tag_of(op), _shape(hi - lo, piece), dtype)
            if op.why.endswith("reduce-scatter"):     # summed into the receiver's piece when it is next used
                self.ar_in.setdefault((kind, i, op.dst, m), []).append((piece, arr))
            else:                                     # the sender's piece, summed
                self._buffer(kind, i, op.dst, m)[_rel(piece, self.boxes[i][op.dst])] = arr
        elif op.why == "reduction":
            t = self.nodes[op.layer].out_shape[1]
            self.red.setdefault((op.layer, op.dst, m), []).append(
                self.transport.recv(op.slot, op.dst, tag_of(op), (hi - lo, t, 2), dtype))
        elif op.why != "gradient":
            e = self.edges[(op.producer, op.slot, op.dst)]
            self.recv_act.setdefault((op.producer, op.dst, m), []).append(
                (e.box, self.transport.recv(op.slot, op.dst, tag_of(op), _shape(hi - lo, e.box), dtype)))
        else:
            e = self.edges[(op.producer, op.dst, op.slot)]
            self.recv_grad.setdefault((op.producer, op.dst, m), []).append(
                (e.box, self.transport.recv(op.slot, op.dst, tag_of(op), _shape(hi - lo, e.box), dtype)))

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
                    pieces.append((self.boxes[src][j], self.output(src, j, m)))
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
        y, c = self._kernel(kernels.forward, node, xrs, regions, box, params, mask, part=self.parts[(i, j)])
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
            for c in self.consumers[i]:      # the readers on this slot (cut ones: allreduced or gathered)
                if (c, j, m) in self.dins and c not in self.ar_readers[i]:
                    self._add_dins(dy, box, i, c, j, m)
            if self.ar_readers[i]:
                dy += self._buffer("g", i, j, m)
            for pbox, arr in pieces:
                dy[_rel(pbox, box)] += arr
        regions, c, shapes = self.cache.pop((i, j, m))
        dxs, dpar = self._kernel(kernels.backward, node, shapes, regions, box, params, c, dy, node.input_grad,
                                 part=self.parts[(i, j)])
        self.dins[(i, j, m)] = (regions, dxs if node.layer.arity != 1 else [dxs])
        if dpar:                                     # the first micro-batch's gradients are the accumulator
            if (i, j) not in self.grads:
                self.grads[(i, j)] = list(dpar)
            else:
                for a, g in zip(self.grads[(i, j)], dpar):
                    a += g


def run_step(p: Plan, slots: set[int], params: dict[tuple[int, int], list], x, labels, transport,
             xp=np, dropout: Callable[[int, tuple], object] | None = None,
             on_op: Callable | None = None, backward: bool = True,
             on_setup: Callable[[], None] | None = None) -> StepResult:
    """One forward and backward pass of the whole batch ``x`` (B, C, H, W) for the slots
    held here.  ``params[(layer, slot)]`` are the box's parameters; ``dropout(layer, shape)``
    gives the keep mask of the whole layer output for the batch (scaled), or None.
    ``backward=False`` runs the forward pass only (evaluation).  ``on_op(op, part)`` is
    called as each op ends; ``on_setup()`` once the step's set-up is done, before the first
    op, so that a timer of ops does not charge the set-up to the first of them: it is the
    step's own cost (the ``step`` key, as the simulator has it; decision 039)."""
    step = _Step(p, x, labels, transport, xp, dropout)
    def skip(op) -> bool:
        return skipped(op, backward)
    sends_after: dict[int, list] = {}        # a compute op -> the messages it completes (sent at once)
    in_order: set[int] = set()               # messages waiting for messages: sent at their place in the order
    received: set[int] = set()
    for op in p.ops:
        if op.kind == "xfer" and op.slot in slots and not skip(op):
            if waits_for_messages(p.ops, op):
                in_order.add(op.id)
            else:
                sends_after.setdefault(max(op.deps), []).append(op)

    def take(op) -> None:
        """Receives the messages ``op`` needs, in order, that have not come yet."""
        for d in op.deps:
            msg = p.ops[d]
            if msg.kind == "xfer" and d not in received and not skip(msg):
                received.add(d)
                step.recv(msg)
                if on_op is not None:
                    on_op(msg, "recv")
    if on_setup is not None:
        on_setup()
    for op in p.ops:
        if op.id in in_order:
            take(op)
            step.send(op)
            if on_op is not None:
                on_op(op, "send")
        if skip(op) or op.kind == "xfer" or op.slot not in slots:
            continue
        take(op)
        run = step.forward if op.kind == "fwd" else step.backward
        run(op.layer, op.slot, op.micro, params.get((op.layer, op.slot), []))
        if on_op is not None:
            on_op(op, "")
        for x_op in sends_after.get(op.id, ()):
            step.send(x_op)
            if on_op is not None:
                on_op(x_op, "send")
    for op in p.ops:                         # messages no op waits for (the weight gradients' all-gather)
        if op.kind == "xfer" and op.dst in slots and op.id not in received and not skip(op):
            received.add(op.id)
            step.recv(op)
            if on_op is not None:
                on_op(op, "recv")
    transport.flush()
    step.unflatten_weights()
    return StepResult(float(step.loss), step.grads, step.logits)


def _softmax_grad(xp, p: Plan, y, box: Box, others: list, labels, batch: int):
    """Gradient of the mean cross-entropy (over samples and positions) for this slice of the
    logits, and its share of the loss; ``labels`` (b,) or (b, T), ``others`` the other
    slices' (max, sum of exponentials) per sample and position.  No index array is built from
    the data (``nonzero``, boolean masks) and the share stays an array: on a GPU nothing here
    waits for the device (the step's loss is read once, at its end)."""
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
    inside = (labels >= c0) & (labels < c1)                   # (b, t): the label's logit is in this slice
    at = xp.where(inside, labels - c0, 0)[:, :, None]         # its place there (0 where not: masked)
    hit = (xp.arange(z.shape[2]) == at) & inside[:, :, None]   # (b, t, c) one-hot of the labels here
    picked = xp.take_along_axis(prob, at, axis=2)[:, :, 0]
    part = -xp.where(inside, xp.log(picked + 1e-30), 0.0).sum() / count
    prob -= hit                                                # prob is this call's own: the gradient in place
    prob /= count
    return prob.transpose(0, 2, 1)[:, :, :, None], part.astype(xp.float64)
