"""Update rules, each applied by one parameter-server shard to its slice of the parameters.

- ``SGD``:      w <- w - lr g
- ``Adagrad``:  h <- h + g*g;  w <- w - lr g / (sqrt(h) + eps)   (Duchi et al. 2011; per
                shard, as in DistBelief's Downpour)
- ``Adam``:     m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g*g;  w <- w - lr m^ / (sqrt(v^) + eps),
                m^ and v^ bias-corrected by 1 - b^t (Kingma & Ba 2015, Algorithm 1; PyTorch's
                defaults); sync's replicas apply it after the allreduce.
- ``DCASGD``:   g' = g + lam * g*g*(w - w_bak[worker]);  w <- w - lr g'   (Zheng et al.
                ICML 2017).  w_bak[worker] is the copy the worker last fetched, kept by the
                shard -- one copy per worker.  Adaptive lambda (DC-ASGD-a):
                ms <- m ms + (1 - m) g*g;  lam = lam0 / sqrt(ms + eps), element-wise.
- ``LBFGS``:    two-loop recursion over the last ``history`` (s, y) pairs (Nocedal &
                Wright, alg. 7.4), fixed step ``lr`` (~1) along the direction; with no
                history yet, a first step of ``first_step`` along the normalised gradient.
                With no line search, ``max_step`` caps a step's length (Sandblaster uses
                10 x first_step): uncapped, rounding differences between runs grew into
                accuracies from 67% to 91% on the digits.
- ``quantize8``: uniform 8-bit quantisation of a vector (min/max scaling), used for 8-bit
                communication; returns the dequantised values the receiver sees.

All take and return arrays of the caller's ``xp``; ``step`` updates ``w`` in place.
"""
from __future__ import annotations

from collections import deque

import numpy as np

LBFGS_MAX_STEP_FACTOR = 10.0   # Sandblaster caps an L-BFGS step at this many first steps (no line search)
ADAGRAD_EPS = 1e-8        # keeps the first steps finite when h is still ~0
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8     # torch.optim.Adam's defaults
DCASGD_MOMENTUM = 0.95    # m for the adaptive lambda's mean square (the paper's value)


def sgd_in_place(params: dict, grads: dict, lr: float) -> None:
    """A worker's SGD step, array by array: w -= lr g (the gradient arrays are scaled in
    place, so nothing is allocated)."""
    for key, gs in grads.items():
        for w, g in zip(params[key], gs):
            g *= lr
            w -= g


def replica_step(params: dict, grads: dict, lr: float, replicas: int, adam: dict | None = None) -> None:
    """A sync replica's update after the allreduce (``grads`` summed over ``replicas``):
    SGD, or where ``adam`` is given (kept between steps: one ``Adam`` per parameter
    array) Adam on the replicas' mean gradient.  In place; the gradients are scratch."""
    if adam is None:
        sgd_in_place(params, grads, lr / replicas)
        return
    for key, gs in grads.items():
        for i, (w, g) in enumerate(zip(params[key], gs)):
            g /= replicas
            if (key, i) not in adam:
                adam[(key, i)] = Adam(lr, w)
            adam[(key, i)].step(w, g)


class SGD:
    def __init__(self, lr: float) -> None:
        self.lr = lr

    def step(self, w, g, worker: int = 0) -> None:
        w -= self.lr * g


class Adagrad:
    def __init__(self, lr: float, size: int, xp=np) -> None:
        self.lr, self.h = lr, xp.zeros(size, dtype=np.float32)

    def step(self, w, g, worker: int = 0) -> None:
        self.h += g * g
        w -= self.lr * g / (self.h ** 0.5 + ADAGRAD_EPS)


class Adam:
    """Adam on an array shaped as ``like`` (a flat vector, or one layer's array)."""

    def __init__(self, lr: float, like, betas: tuple[float, float] = ADAM_BETAS, eps: float = ADAM_EPS) -> None:
        self.lr, (self.b1, self.b2), self.eps, self.t = lr, betas, eps, 0
        self.m, self.v = like * 0, like * 0

    def step(self, w, g, worker: int = 0) -> None:
        self.t += 1
        self.m *= self.b1
        self.m += (1 - self.b1) * g
        self.v *= self.b2
        self.v += (1 - self.b2) * g * g
        w -= self.lr / (1 - self.b1 ** self.t) * self.m / ((self.v / (1 - self.b2 ** self.t)) ** 0.5 + self.eps)


class DCASGD:
    """Delay-compensated ASGD; call ``fetched(worker, w)`` whenever a worker fetches."""

    def __init__(self, lr: float, lam: float, size: int, adaptive: bool = False, xp=np) -> None:
        self.lr, self.lam, self.adaptive, self.xp = lr, lam, adaptive, xp
        self.backup: dict[int, object] = {}
        self.ms = xp.zeros(size, dtype=np.float32)

    def fetched(self, worker: int, w) -> None:
        self.backup[worker] = w.copy()

    def step(self, w, g, worker: int = 0) -> None:
        lam = self.lam
        if self.adaptive:
            self.ms = DCASGD_MOMENTUM * self.ms + (1 - DCASGD_MOMENTUM) * g * g
            lam = self.lam / (self.ms + 1e-7) ** 0.5
        bak = self.backup.get(worker, w)
        w -= self.lr * (g + lam * g * g * (w - bak))


class LBFGS:
    def __init__(self, lr: float = 1.0, history: int = 10, first_step: float = 1e-2, dot=None,
                 max_step: float | None = None) -> None:
        self.lr, self.first_step, self.max_step = lr, first_step, max_step
        self.dot = dot or (lambda a, b: float((a * b).sum()))   # a shard passes a dot over all shards
        self.pairs: deque = deque(maxlen=history)
        self.prev: tuple | None = None          # (w, g) of the last step

    def direction(self, g):
        """-H g by the two-loop recursion; -g before any history."""
        q = g.copy()
        alphas = []
        for s, y, rho in reversed(self.pairs):
            a = rho * self.dot(s, q)
            q -= a * y
            alphas.append(a)
        if self.pairs:
            s, y, _ = self.pairs[-1]
            q *= self.dot(s, y) / self.dot(y, y)
        for (s, y, rho), a in zip(self.pairs, reversed(alphas)):
            b = rho * self.dot(y, q)
            q += (a - b) * s
        return -q

    def step(self, w, g, worker: int = 0) -> None:
        if self.prev is not None:
            s, y = w - self.prev[0], g - self.prev[1]
            sy = self.dot(s, y)
            if sy > 1e-10:                      # keep H positive definite
                self.pairs.append((s, y, 1.0 / sy))
        self.prev = (w.copy(), g.copy())
        if not self.pairs:                      # no curvature known: a small, safe first step
            w -= self.first_step * g / (self.dot(g, g) ** 0.5 + 1e-12)
        else:
            d = self.lr * self.direction(g)
            if self.max_step is not None:           # no line search: cap the step's length instead
                norm = self.dot(d, d) ** 0.5
                if norm > self.max_step:
                    d *= self.max_step / norm
            w += d


def quantize8(x):
    """What the receiver of an 8-bit message sees: 256 levels between min and max."""
    lo, hi = float(x.min()), float(x.max())
    if hi == lo:
        return x.copy()
    scale = (hi - lo) / 255.0
    return ((x - lo) / scale).round() * scale + lo
