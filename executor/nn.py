"""Layers forward and backward in ``xp`` (NumPy or CuPy), each backward next to its
forward, and ``Net``: a sim Model's layers over one flat parameter vector.

The flat vector is laid out layer by layer (a dense layer's W row-major (in, out), then
b), so parameter-server shards are plain index ranges of it, as in the Plan.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod

import numpy as np

from sim.models import Model

SUPPORTED = ("dense", "relu", "sigmoid", "tanh", "dropout", "softmax_xent")


# --- layer kinds: forward returns (y, cache); backward returns (dx, grads) --------------------
def dense_forward(x, W, b):
    # x (B, in), W (in, out), b (out,) -> (B, out)
    return x @ W + b, x


def dense_backward(cache, dy, W):
    x = cache
    return dy @ W.T, (x.T @ dy, dy.sum(axis=0))          # dx (B, in), dW (in, out), db (out,)


def relu_forward(x):
    return x * (x > 0), x > 0


def relu_backward(mask, dy):
    return dy * mask


def sigmoid_forward(x, xp):
    y = 1.0 / (1.0 + xp.exp(-x))
    return y, y


def sigmoid_backward(y, dy):
    return dy * y * (1.0 - y)


def tanh_forward(x, xp):
    y = xp.tanh(x)
    return y, y


def tanh_backward(y, dy):
    return dy * (1.0 - y * y)


def softmax_xent_forward(logits, labels, xp):
    """Mean cross-entropy over the batch; cache holds the probabilities."""
    z = logits - logits.max(axis=1, keepdims=True)        # (B, C), stable
    p = xp.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    n = logits.shape[0]
    loss = -xp.log(p[xp.arange(n), labels] + 1e-12).mean()
    return loss, (p, labels)


def softmax_xent_backward(cache, xp):
    p, labels = cache
    g = p.copy()
    g[xp.arange(len(labels)), labels] -= 1.0
    return g / len(labels)                                 # d(mean loss)/d logits


# --- a whole network ------------------------------------------------------------------------
@dataclass(frozen=True)
class Slot:
    kind: str
    start: int          # offset of this layer's parameters in the flat vector
    shapes: tuple       # parameter shapes, in layout order


class Net:
    """Trainable view of a sim ``Model`` (flat inputs, dense-style layers)."""

    def __init__(self, model: Model, xp=np) -> None:
        self.model, self.xp = model, xp
        self.slots: list[Slot] = []
        offset = 0
        for node in model.nodes:
            kind = node.layer.kind
            if kind not in SUPPORTED:
                raise ValueError(f"layer {node.index} ({kind}) has no executor implementation yet; "
                                 f"supported: {', '.join(SUPPORTED)}")
            shapes = ((prod(node.in_shape), node.out_shape[0]), (node.out_shape[0],)) if kind == "dense" else ()
            self.slots.append(Slot(kind, offset, shapes))
            offset += sum(prod(s) for s in shapes)
        if model.nodes[-1].layer.kind != "softmax_xent":
            raise ValueError("training needs a softmax_xent layer last")
        self.size = offset

    def init(self, rng: np.random.Generator):
        """Glorot-uniform weights, zero biases (float32)."""
        w = np.zeros(self.size, np.float32)
        for slot in self.slots:
            if slot.shapes:
                fan_in, fan_out = slot.shapes[0]
                limit = np.sqrt(6.0 / (fan_in + fan_out))
                n = fan_in * fan_out
                w[slot.start:slot.start + n] = rng.uniform(-limit, limit, n)
        return self.xp.asarray(w)

    def _params(self, flat, slot: Slot):
        (fi, fo), _ = slot.shapes
        W = flat[slot.start:slot.start + fi * fo].reshape(fi, fo)
        b = flat[slot.start + fi * fo:slot.start + fi * fo + fo]
        return W, b

    def forward(self, flat, x, labels=None, train: bool = False, rng: np.random.Generator | None = None):
        """(loss or None, logits, caches).  Dropout is active only with ``train``."""
        xp, caches = self.xp, []
        h = x.reshape(len(x), -1)
        for slot, node in zip(self.slots, self.model.nodes):
            if slot.kind == "dense":
                h, c = dense_forward(h, *self._params(flat, slot))
            elif slot.kind == "relu":
                h, c = relu_forward(h)
            elif slot.kind == "sigmoid":
                h, c = sigmoid_forward(h, xp)
            elif slot.kind == "tanh":
                h, c = tanh_forward(h, xp)
            elif slot.kind == "dropout":
                keep = 1.0 - node.layer.rate
                c = (xp.asarray(rng.random(h.shape) < keep) / keep) if train and rng is not None else None
                h = h * c if c is not None else h
            else:   # softmax_xent: the loss
                if labels is None:
                    return None, h, caches
                loss, c = softmax_xent_forward(h, labels, xp)
                caches.append(c)
                return loss, h, caches
            caches.append(c)
        raise AssertionError("unreachable: the last layer is softmax_xent")

    def loss_and_grad(self, flat, x, labels, rng: np.random.Generator | None = None):
        """Mean loss over the batch and its gradient as a flat vector."""
        xp = self.xp
        loss, _, caches = self.forward(flat, x, labels, train=rng is not None, rng=rng)
        grad = xp.zeros_like(flat)
        dy = None
        for slot, cache in zip(reversed(self.slots), reversed(caches)):
            if slot.kind == "softmax_xent":
                dy = softmax_xent_backward(cache, xp)
            elif slot.kind == "dense":
                W, _ = self._params(flat, slot)
                dy, (dW, db) = dense_backward(cache, dy, W)
                n = dW.size
                grad[slot.start:slot.start + n] = dW.ravel()
                grad[slot.start + n:slot.start + n + db.size] = db
            elif slot.kind == "relu":
                dy = relu_backward(cache, dy)
            elif slot.kind == "sigmoid":
                dy = sigmoid_backward(cache, dy)
            elif slot.kind == "tanh":
                dy = tanh_backward(cache, dy)
            elif slot.kind == "dropout" and cache is not None:
                dy = dy * cache
        return float(loss), grad

    def evaluate(self, flat, x, labels) -> tuple[float, float]:
        """(accuracy, mean loss) without dropout."""
        loss, logits, _ = self.forward(flat, x, labels)
        pred = logits.argmax(axis=1)
        return float((pred == labels).mean()), float(loss)
