"""A sharded parameter server on the simulated cluster (DistBelief's).

Each shard applies pushed gradients one at a time, in arrival order (a busy shard
queues them).  A fetch does not queue behind them: the shard sends its values as they
are when the request arrives (the request itself is taken as instant).  The replica
waits for its own last push to be applied before fetching, so it reads its own writes.
The shard's version counts its applies; a gradient's *staleness* is how many applies the
shard did between the replica's fetch of that shard and this gradient's apply -- R-1 in
the steady state of R identical replicas.

Costs per parameter of one apply (reads and writes of fp32 arrays): SGD 2 FLOPs, 12 B
(w, g in; w out); Adagrad 5 FLOPs, 20 B (+ h in and out); DC-ASGD 8 FLOPs, 24 B (+ the
worker's backup copy), adaptive 11 FLOPs, 32 B (+ the mean square); a DC-ASGD fetch also
writes that worker's backup copy (8 B).  8-bit messages cost a quantise pass at the
sender and a dequantise pass at the receiver (3 FLOPs, 5 B per element each).
"""
from __future__ import annotations

import simpy

from sim.engine import Engine
from clustersim.core.plan import PARAM_BYTES

APPLY_COST = {"sgd": (2.0, 12.0), "adagrad": (5.0, 20.0), "dcasgd": (8.0, 24.0),
              "dcasgd_adaptive": (11.0, 32.0)}
QUANT_COST = (3.0, 5.0)


def send_params(engine: Engine, src: str, dst: str, params: int, replica: int, step: int, phase: str, bits: int):
    """A simpy process body: one piece of parameters or gradients, quantised on the way when
    ``bits`` is 8 (a quantise pass at the sender, a quarter of the bytes, a dequantise pass)."""
    f, b = QUANT_COST
    if bits == 8:
        yield engine.compute_op(src, f * params, b * params, replica, step, "quantise", "quantise")
    yield engine.transfer(src, dst, params * PARAM_BYTES * bits / 32, replica, step, phase, phase)
    if bits == 8:
        yield engine.compute_op(dst, f * params, b * params, replica, step, "dequantise", "quantise")


class ParameterServer:
    def __init__(self, engine: Engine, rule: str) -> None:
        self.engine, self.env = engine, engine.env
        plan = engine.plan
        self.ps, self.devices = plan.ps, plan.devices
        self.rule = rule
        self.bits = plan.scenario.training.comm_bits
        self.queues = [simpy.Resource(self.env, capacity=1) for _ in self.ps.devices]
        self.version = [0] * len(self.ps.devices)
        self.applies = [0] * len(self.ps.devices)
        self.held = [[0] * len(self.ps.devices) for _ in self.devices]   # versions each replica holds

    # --- messages ----------------------------------------------------------------------------
    def _send(self, src: str, dst: str, params: int, replica: int, step: int, phase: str):
        return send_params(self.engine, src, dst, params, replica, step, phase, self.bits)

    def _pieces(self, r: int, k: int, to_shard: bool, step: int, phase: str) -> list[simpy.Event]:
        out = []
        for j, dev in enumerate(self.devices[r]):
            n = self.ps.share[j][k]
            if n:
                src, dst = (dev, self.ps.devices[k]) if to_shard else (self.ps.devices[k], dev)
                out.append(self.env.process(self._send(src, dst, n, r, step, phase)))
        return out

    # --- fetch -------------------------------------------------------------------------------
    def fetch(self, r: int, step: int, fetch_id: int) -> simpy.Event:
        """Every shard's current values to replica r; fires when all have arrived."""
        return self.env.all_of([self.env.process(self._fetch_shard(r, k, step, fetch_id))
                                for k in range(len(self.ps.devices))])

    def _fetch_shard(self, r: int, k: int, step: int, fetch_id: int):
        eng = self.engine
        eng.log("snap", r, k, step, fetch=fetch_id)
        version = self.version[k]
        if self.rule.startswith("dcasgd"):           # the shard keeps this worker's copy
            n = self.ps.sizes[k]
            yield eng.compute_op(self.ps.devices[k], 0.0, 2 * n * PARAM_BYTES, r, step, "backup copy", "ps_update",
                                 kind="update")
        yield self.env.all_of(self._pieces(r, k, False, step, "fetch"))
        eng.log("deliver", r, k, step, fetch=fetch_id)
        self.held[r][k] = version

    # --- push --------------------------------------------------------------------------------
    def push(self, r: int, step: int, push_id: int, versions: list[int]) -> simpy.Event:
        """Replica r's accumulated gradient to every shard, each applied in its turn."""
        return self.env.all_of([self.env.process(self._push_shard(r, k, step, push_id, versions[k]))
                                for k in range(len(self.ps.devices))])

    def _push_shard(self, r: int, k: int, step: int, push_id: int, version: int):
        eng = self.engine
        pieces = self._pieces(r, k, True, step, "push")
        if not pieces:
            return
        yield self.env.all_of(pieces)
        with self.queues[k].request() as turn:
            yield turn
            f, b = APPLY_COST[self.rule]
            n = self.ps.sizes[k]
            yield eng.compute_op(self.ps.devices[k], f * n, b * n, r, step, "apply", "ps_update", kind="update",
                                 key=f"apply.{self.rule}")
            eng.trace.staleness.append(self.version[k] - version)
            self.version[k] += 1
            self.applies[k] += 1
            eng.log("apply", r, k, step, push=push_id)
