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

    def forward(self, flat, x, labels=None, train: bool = False, rng: np.random.Generator | None = None):
        """(mean loss or None, logits (B, classes), caches).  Dropout is active only with ``train``."""
        xp = self.xp
        h = x.reshape(len(x), *self.model.input_shape)                   # (B, C, H, W)
        caches = []
        for i, node in enumerate(self.model.nodes[:-1]):
            mask = None
            if node.layer.kind == "dropout" and train and rng is not None:
                keep = 1.0 - node.layer.rate
                mask = xp.asarray((rng.random(h.shape) < keep) / keep)
            rin, box = full_box(node.in_shape), full_box(node.out_shape)
            y, cache = kernels.forward(xp, node.layer, node.in_shape, h, rin, box, self.params(flat, i), mask)
            caches.append((h.shape, cache))
            h = y
        logits = h.reshape(len(h), -1)                                   # (B, classes)
        if labels is None:
            return None, logits, caches
        loss, dlogits = kernels.softmax_xent_loss(xp, logits, labels)
        return loss, logits, caches + [dlogits]

    def loss_and_grad(self, flat, x, labels, rng: np.random.Generator | None = None):
        """Mean loss over the batch and its gradient as a flat vector."""
        loss, logits, caches = self.forward(flat, x, labels, train=rng is not None, rng=rng)
        grad = self.xp.zeros_like(flat)
        dy = caches[-1].reshape(len(logits), *self.model.nodes[-1].in_shape)   # (B, classes, 1, 1)
        for i in range(len(self.model.nodes) - 2, -1, -1):
            node = self.model.nodes[i]
            shape, cache = caches[i]
            rin, box = full_box(node.in_shape), full_box(node.out_shape)
            dy, dparams = kernels.backward(self.xp, node.layer, node.in_shape, shape, rin, box,
                                           self.params(flat, i), cache, dy)
            for (o, s), g in zip(self.layout[i], dparams):
                grad[o:o + prod(s)] = g.ravel()
        return float(loss), grad

    def evaluate(self, flat, x, labels) -> tuple[float, float]:
        """(accuracy, mean loss) without dropout."""
        loss, logits, _ = self.forward(flat, x, labels)
        return float((logits.argmax(axis=1) == labels).mean()), float(loss)
