"""``Net``: a sim Model's layers over one flat parameter vector, for co-simulation and any
code that wants a whole network in one process.

The math is ``kernels.py``'s (each layer on its whole output box); this module only lays
the parameters out as one vector -- layer by layer, each layer's arrays in the kernels'
order (a dense layer's W (in, out), then b) -- so parameter-server shards are plain index
ranges of it, as in the Plan.
"""
from __future__ import annotations

from math import prod

import numpy as np

from clustersim.core.layers import full_box
from clustersim.core.models import Model

from executor import kernels


class Net:
    """Trainable view of a sim ``Model`` whose last layer is softmax_xent."""

    def __init__(self, model: Model, xp=np) -> None:
        if model.nodes[-1].layer.kind != "softmax_xent":
            raise ValueError("training needs a softmax_xent layer last")
        self.model, self.xp = model, xp
        self.layout: list[list[tuple[int, tuple]]] = []      # per layer: (offset, shape) of each array
        offset = 0
        for node in model.nodes:
            arrays = []
            for shape in node.layer.param_shapes(node.in_shape):
                arrays.append((offset, shape))
                offset += prod(shape)
            self.layout.append(arrays)
        self.size = offset

    def init(self, rng: np.random.Generator):
        """``kernels.init_params`` laid out flat (float32)."""
        full = kernels.init_params(self.model, rng, np.float32)
        flat = np.zeros(self.size, np.float32)
        for i, arrays in full.items():
            for (offset, shape), a in zip(self.layout[i], arrays):
                flat[offset:offset + prod(shape)] = a.ravel()
        return self.xp.asarray(flat)

    def params(self, flat, i: int) -> list:
        """Views of layer i's arrays inside ``flat``."""
        return [flat[o:o + prod(shape)].reshape(shape) for o, shape in self.layout[i]]   # each array's own shape

    def _run(self, kernel, node, args: list, boxes: list, *rest):
        """``kernel`` (kernels.forward or backward) on node's whole output: lists of the
        inputs' arrays and boxes for a kind that reads several, the one otherwise."""
        if node.layer.arity == 1:
            return kernel(self.xp, node.layer, node.in_shape, args[0], boxes[0], full_box(node.out_shape), *rest)
        return kernel(self.xp, node.layer, list(node.in_shapes), args, boxes, full_box(node.out_shape), *rest)

    def forward(self, flat, x, labels=None, train: bool = False, rng: np.random.Generator | None = None):
        """(mean loss or None, logits (B, classes) -- (B T, classes) for classes per
        position, labels (B, T) -- and caches).  Dropout is active only with
        ``train``.  Layers run in the graph's order, each on the outputs of its inputs."""
        xp = self.xp
        x = x.reshape(len(x), *self.model.input_shape)                   # (B, C, H, W)
        outs: list = []
        caches = []
        for i, node in enumerate(self.model.nodes[:-1]):
            xs = [x if src < 0 else outs[src] for src in node.inputs]
            mask = None
            if node.layer.kind == "dropout" and train and rng is not None:
                keep = 1.0 - node.layer.rate
                mask = xp.asarray((rng.random(xs[0].shape) < keep) / keep)
            y, cache = self._run(kernels.forward, node, xs, [full_box(s) for s in node.in_shapes],
                                 self.params(flat, i), mask)
            caches.append(([a.shape for a in xs], cache))
            outs.append(y)
        last = self.model.nodes[-1]
        h = x if last.inputs[0] < 0 else outs[last.inputs[0]]
        logits = h[:, :, :, 0].transpose(0, 2, 1).reshape(-1, h.shape[1])   # (B T, classes): a row per position
        if labels is None:
            return None, logits, caches
        loss, dlogits = kernels.softmax_xent_loss(xp, logits, labels.reshape(-1))
        return loss, logits, caches + [dlogits]

    def loss_and_grad(self, flat, x, labels, rng: np.random.Generator | None = None):
        """Mean loss over the batch and its gradient as a flat vector; a layer read by
        several others gets the sum of their gradients."""
        loss, logits, caches = self.forward(flat, x, labels, train=rng is not None, rng=rng)
        grad = self.xp.zeros_like(flat)
        nodes = self.model.nodes
        c, t, _ = nodes[-1].in_shape
        douts: dict[int, object] = {nodes[-1].inputs[0]: caches[-1].reshape(-1, t, c).transpose(0, 2, 1)[:, :, :, None]}
        for i in range(len(nodes) - 2, -1, -1):
            node = nodes[i]
            shapes, cache = caches[i]
            dxs, dparams = self._run(kernels.backward, node, shapes, [full_box(s) for s in node.in_shapes],
                                     self.params(flat, i), cache, douts.pop(i))
            for src, dx in zip(node.inputs, dxs if node.layer.arity != 1 else [dxs]):
                if src >= 0:
                    douts[src] = douts[src] + dx if src in douts else dx
            for (o, s), g in zip(self.layout[i], dparams):
                grad[o:o + prod(s)] = g.ravel()
        return float(loss), grad

    def evaluate(self, flat, x, labels) -> tuple[float, float]:
        """(accuracy, mean loss) without dropout; a sequence's labels are (B, T), one per position."""
        loss, logits, _ = self.forward(flat, x, labels)
        return float((logits.argmax(axis=1) == labels.reshape(-1)).mean()), float(loss)
