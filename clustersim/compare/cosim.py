"""Time-to-accuracy by co-simulation: the real math of a small model on the simulated clock.

The simulator's update log (``Trace.updates``) says, in simulated order, when each replica
took a gradient, on which parameters (the ones it last received), when each shard applied
which push, and when fetches were read and delivered.  Performance does not depend on
the values, so replaying that log with real NumPy math gives exactly the gradients,
staleness and update order the simulated cluster produced.  Accuracy on the model's
held-out data (``executor.data.for_model``: the digits for mlp-digits and resnet-digits,
next-word accuracy on the grammar corpus for gpt-tiny) is evaluated at ``eval_points``
times spread over the run.

Data: the training set is split over the replicas (replica r takes every R-th sample)
and each replica draws seeded mini-batches of ``batch_size`` from its part; Sandblaster's
coordinator cuts batches of ``batch_size x replicas`` from the whole set into its units.
Layerwise: the layer groups are one replica, so every worker reads the same batch at step
s (the one replica's stream), each on its own copy of the weights.
"""
from __future__ import annotations

import math

import numpy as np

from sim.engine import SimResult
from clustersim.core.plan import Plan

from executor.data import Batches, for_model
from executor.nn import Net
from executor.optim import DCASGD, LBFGS, LBFGS_MAX_STEP_FACTOR, SGD, Adagrad, Adam, quantize8


def _shard_ranges(p: Plan, size: int) -> list[tuple[int, int]]:
    if p.ps is None:
        return [(0, size)]
    edges = np.cumsum([0, *p.ps.sizes])
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def group_ranges(p: Plan, net: Net) -> list[tuple[int, int]]:
    """Each slot's [lo, hi) in the flat parameter vector of a layers split (a group's
    layers are consecutive, and the vector is laid out layer by layer)."""
    lo, hi = [net.size] * p.slots, [0] * p.slots
    for i, arrays in enumerate(net.layout):
        for offset, shape in arrays:
            for slot, _ in p.slices[i]:
                lo[slot], hi[slot] = min(lo[slot], offset), max(hi[slot], offset + int(np.prod(shape)))
    return [(a, b) if b > a else (0, 0) for a, b in zip(lo, hi)]


def _rule(p: Plan, lo: int, hi: int):
    """The optimiser of the shard holding [lo, hi), as the plan's schedule names it."""
    tr, rule = p.scenario.training, p.schedule.rule
    if rule.startswith("dcasgd"):
        return DCASGD(tr.learning_rate, tr.dcasgd_lambda, hi - lo, rule == "dcasgd_adaptive")
    if rule == "adagrad":
        return Adagrad(tr.learning_rate, hi - lo)
    return SGD(tr.learning_rate)


class Replay:
    """State of the co-simulated cluster: the servers' and every replica's parameters."""

    def __init__(self, p: Plan) -> None:
        sc = self.sc = p.scenario
        self.p, self.tr = p, sc.training
        self.net = Net(sc.model)
        self.data = for_model(sc.model, sc.seed)
        if self.data is None:
            raise ValueError(f"co-simulation needs a model with a bundled data set; {sc.model.name} has none")
        w0 = self.net.init(np.random.default_rng(sc.seed))
        self.server = w0.copy()
        self.local = [w0.copy() for _ in range(p.replicas)]
        self.ranges = _shard_ranges(p, self.net.size)
        self.rules = [_rule(p, lo, hi) for lo, hi in self.ranges]
        self.sync_rule = Adam(self.tr.learning_rate, w0) if self.tr.optimizer == "adam" else SGD(self.tr.learning_rate)
        self.lbfgs = LBFGS(lr=1.0, history=self.tr.lbfgs_history, first_step=self.tr.learning_rate,
                           max_step=LBFGS_MAX_STEP_FACTOR * self.tr.learning_rate)
        R = p.replicas
        d = self.data
        self.batches = [Batches(d.x_train[r::R], d.y_train[r::R], sc.batch_size, np.random.default_rng([sc.seed, r]))
                        for r in range(R)]
        self.acc = [np.zeros_like(w0) for _ in range(R)]
        self.grads: dict[int, np.ndarray] = {}
        self.outbox: dict[tuple[int, int], np.ndarray] = {}
        self.pending: dict[tuple[int, int, int], np.ndarray] = {}
        self.stash: dict[tuple[int, int, int], np.ndarray] = {}
        self.batch_sum, self.batch_n = np.zeros_like(w0), 0
        self.checkpoint = w0.copy()
        self.sandblaster_batches: dict[int, tuple] = {}
        if self.tr.algorithm == "layerwise":     # one copy per layer group; one data stream
            self.groups = group_ranges(p, self.net)
            self.local = [w0.copy() for _ in self.groups]
            self.layer_batches: dict[int, list] = {}
            self.sent: dict[tuple[int, int], list] = {}
        if self.tr.algorithm == "sandblaster":
            self.units, self.unit_size = p.schedule.units, p.schedule.unit_size
            self.whole = Batches(d.x_train, d.y_train, sc.batch_size * R, np.random.default_rng([sc.seed, R]))

    def _q(self, x):
        """A whole vector as 8-bit messages deliver it: each shard's piece a message of its
        own, with its own minimum and step (as the executor sends one a shard; a replica of
        several slots sends finer pieces, one a slot and shard)."""
        if self.tr.comm_bits != 8:
            return x
        out = x.copy()
        for lo, hi in self.ranges:
            if hi > lo:
                out[lo:hi] = self._message(x[lo:hi])
        return out

    def _message(self, piece):
        """One push or fetch as its receiver sees it (8-bit: 256 levels of its own)."""
        return quantize8(piece) if self.tr.comm_bits == 8 else piece

    def _grad(self, w, x, y):
        return self.net.loss_and_grad(w, x, y)[1]

    def apply(self, u) -> None:
        kind, r, k = u.kind, u.replica, u.shard
        if kind == "grad":
            x, y = self.batches[r].next()
            g = self._grad(self.local[r], x, y)
            if self.tr.algorithm == "sync":
                self.grads[r] = self._q(g)       # 8-bit: pushed to the shards quantised
            else:
                self.acc[r] += g
                if self.tr.n_fetch > 1:          # between fetches the replica moves on its own copy
                    self.local[r] -= self.tr.learning_rate * g
        elif kind == "send":
            self.outbox[(r, u.info["push"])] = self._q(self.acc[r])
            self.acc[r] = np.zeros_like(self.acc[r])
        elif kind == "apply" and k >= 0:
            lo, hi = self.ranges[k]
            self.rules[k].step(self.server[lo:hi], self.outbox[(r, u.info["push"])][lo:hi], worker=r)
        elif kind == "apply":                    # sync: the mean of the gradients used
            used = u.info["replicas"]
            g = sum(self.grads[i] for i in used) / len(used)
            self.sync_rule.step(self.server, g)
            self.grads.clear()
        elif kind == "snap":
            lo, hi = self.ranges[k]
            self.pending[(r, u.info["fetch"], k)] = self._message(self.server[lo:hi].copy())
            if isinstance(self.rules[k], DCASGD):
                self.rules[k].fetched(r, self.server[lo:hi])
        elif kind == "deliver" and k >= 0:
            lo, hi = self.ranges[k]
            self.local[r][lo:hi] = self.pending.pop((r, u.info["fetch"], k))
        elif kind == "deliver":
            self.local[r] = self._q(self.server.copy())
        elif kind == "local":
            x, y = self.batches[r].next()
            self.local[r] -= self.tr.learning_rate * self._grad(self.local[r], x, y)
        elif kind == "average":
            self.server = sum(self.local) / len(self.local)
            self.local = [self.server.copy() for _ in self.local]
        elif kind == "unit":
            x, y = self._unit_data(u.step, u.info["unit"])
            self.stash[(r, u.step, u.info["unit"])] = self._grad(self.local[r], x, y)
        elif kind == "won":
            self.batch_sum += self.stash.pop((r, u.step, u.info["unit"]))
            self.batch_n += 1
        elif kind == "lbfgs":
            self.lbfgs.step(self.server, self.batch_sum / max(self.batch_n, 1))
            self.batch_sum, self.batch_n = np.zeros_like(self.batch_sum), 0
            self.stash.clear()
        elif kind == "layer_step":               # worker g's SGD step on its own group only
            g = u.info["worker"]
            lo, hi = self.groups[g]
            x, y = self._layer_batch(u.step)
            self.local[g][lo:hi] -= self.tr.learning_rate * self._grad(self.local[g], x, y)[lo:hi]
        elif kind == "exchange_send":
            g = u.info["worker"]
            lo, hi = self.groups[g]
            self.sent[(g, u.info["round"])] = [self.local[g][lo:hi].copy(), len(self.groups) - 1]
        elif kind == "exchange_recv":
            h, rnd = u.info["worker"], u.info["round"]
            for g, (lo, hi) in enumerate(self.groups):
                if g != h:
                    box = self.sent[(g, rnd)]
                    self.local[h][lo:hi] = box[0]
                    box[1] -= 1
                    if not box[1]:
                        del self.sent[(g, rnd)]
        elif kind == "checkpoint" and k >= 0:        # one shard's values (shard recovery)
            lo, hi = self.ranges[k]
            self.checkpoint[lo:hi] = self.server[lo:hi]
        elif kind == "restore" and k >= 0:           # a replacement shard starts from them
            lo, hi = self.ranges[k]
            self.server[lo:hi] = self.checkpoint[lo:hi]
        elif kind == "checkpoint":
            self.checkpoint = self.server.copy()
        elif kind == "restore":
            self.server = self.checkpoint.copy()
            self.local = [self.server.copy() for _ in self.local]

    def _unit_data(self, batch: int, unit: int):
        if batch not in self.sandblaster_batches:
            self.sandblaster_batches = {batch: self.whole.next()}
        x, y = self.sandblaster_batches[batch]
        lo = unit * self.unit_size
        return x[lo:lo + self.unit_size], y[lo:lo + self.unit_size]

    def _layer_batch(self, step: int):
        """Step ``step``'s batch of the one stream, drawn once and kept until every worker has read it."""
        if step not in self.layer_batches:           # workers go 0, 1, 2, ...: drawn in step order
            self.layer_batches[step] = [*self.batches[0].next(), len(self.groups)]
        entry = self.layer_batches[step]
        entry[2] -= 1
        if not entry[2]:
            del self.layer_batches[step]
        return entry[0], entry[1]

    def model(self):
        """The parameters a user would deploy now: the servers' (local SGD: the last
        average, the only model every replica holds, not a mean of copies no average has
        made yet; layerwise: each group's own weights, from the worker that trains it)."""
        if self.tr.algorithm == "layerwise":
            w = self.server.copy()
            for g, (lo, hi) in enumerate(self.groups):
                w[lo:hi] = self.local[g][lo:hi]
            return w
        return self.server

    def evaluate(self) -> tuple[float, float]:
        return self.net.evaluate(self.model(), self.data.x_test, self.data.y_test)


def cosimulate(p: Plan, res: SimResult) -> dict:
    """Replays ``res``'s update log with real math; returns accuracy, loss, the curve over
    simulated time and the time the target accuracy was first reached (None if never): the
    first evaluation at or above it, so up to ``time_to_accuracy_resolution_s`` (the time
    between evaluations, ``training.eval_points`` over the run) after the crossing.  A run
    whose weights overflow (too large a learning rate) has ``diverged_at_s``, the first
    evaluation with no finite loss, and null for each such loss (JSON has no NaN)."""
    replay = Replay(p)
    tr = p.scenario.training
    end = res.sim_time_s
    marks = [end * (i + 1) / tr.eval_points for i in range(tr.eval_points)]
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):     # said below, not warned
        curve = [[0.0, *replay.evaluate()]]
        for u in res.trace.updates:
            while marks and u.t > marks[0]:
                curve.append([marks.pop(0), *replay.evaluate()])
            replay.apply(u)
        for t in marks:
            curve.append([t, *replay.evaluate()])
    diverged = next((t for t, _, loss in curve if not math.isfinite(loss)), None)
    curve = [[t, acc, loss if math.isfinite(loss) else None] for t, acc, loss in curve]
    hit = next((t for t, acc, _ in curve if acc >= tr.target_accuracy), None)
    out = {"accuracy": curve[-1][1], "loss": curve[-1][2], "accuracy_curve": curve,
           "time_to_accuracy_s": hit, "target_accuracy": tr.target_accuracy,
           "time_to_accuracy_resolution_s": end / tr.eval_points}
    if diverged is not None:
        out["diverged_at_s"] = diverged
    return out
