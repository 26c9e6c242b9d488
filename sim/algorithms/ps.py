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
from clustersim.core.schedule import QUANT_COST, apply_cost, checkpoint_bytes, message_bytes



def send_params(engine: Engine, src: str, dst: str, params: int, replica: int, step: int, phase: str, bits: int,
                wire: simpy.Event | None = None):
    """A simpy process body: one piece of parameters or gradients, quantised on the way when
    ``bits`` is 8 (a quantise pass at the sender, a byte a value and the header, a dequantise pass).
    ``wire`` fires once its bytes have arrived, before the receiver's dequantise."""
    f, b = QUANT_COST
    if bits == 8:
        yield engine.compute_op(src, f * params, b * params, replica, step, "quantise", "quantise")
    yield engine.transfer(src, dst, message_bytes(params, bits), replica, step, phase, phase)
    if wire is not None:
        wire.succeed()
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
        faults = plan.scenario.faults
        self.recovery = faults.shard_recovery == "checkpoint"
        self.epoch = [0] * len(self.ps.devices)      # a shard's lives: a failure starts the next
        self.saved = [0] * len(self.ps.devices)      # the version of each shard's last checkpoint
        self.since = [0] * len(self.ps.devices)      # applies since it
        if self.recovery:
            for k in range(len(self.ps.devices)):
                self.env.process(self._restart_when_failed(k))

    # --- a failed shard restarts from its checkpoint -----------------------------------------
    def _restart_when_failed(self, k: int):
        """Each time shard k's device fails: its pushes since the last checkpoint are lost, a
        replacement starts after ``restart_s`` and reading the checkpoint, at its version."""
        eng, shard, plan = self.engine, self.ps.devices[k], self.engine.plan
        faults = plan.scenario.faults
        while True:
            yield eng.lost([shard])
            self.epoch[k] += 1
            eng.lost_samples += (self.version[k] - self.saved[k]) * plan.schedule.push_every * plan.scenario.batch_size
            written = self.ps.sizes[k] * checkpoint_bytes(plan.scenario)
            seconds = faults.restart_s + written / (faults.checkpoint_gbps * 1e9)
            yield eng.wait(self.env.timeout(seconds), shard, -1, -1, "shard restart")
            self.version[k], self.since[k] = self.saved[k], 0
            for held in self.held:                       # replicas ahead of the restored shard
                held[k] = min(held[k], self.saved[k])
            eng.log("restore", -1, k, -1)
            eng.replace(shard)

    def _survives(self, k: int, make):
        """A simpy process body: the events ``make()`` starts, done while shard k stays up;
        with recovery, a failure of the shard makes the replica wait for its replacement and
        start them again.  Returns the epoch they completed in."""
        eng, shard = self.engine, self.ps.devices[k]
        while True:
            if self.recovery and not eng.alive(shard):
                yield eng.recovered(shard)
            epoch = self.epoch[k]
            done = self.env.all_of(make())
            yield self.env.any_of([done, eng.lost([shard])]) if self.recovery else done
            if done.triggered and self.epoch[k] == epoch:
                return epoch

    # --- messages ----------------------------------------------------------------------------
    def _send(self, src: str, dst: str, params: int, replica: int, step: int, phase: str, wire=None):
        return send_params(self.engine, src, dst, params, replica, step, phase, self.bits, wire)

    def _pieces(self, r: int, k: int, to_shard: bool, step: int, phase: str,
                wires: list | None = None) -> list[simpy.Event]:
        """Replica r's pieces to or from shard k, one per slot that shares it; with ``wires``,
        an event per piece appended there, fired when its bytes have arrived."""
        out = []
        for j, dev in enumerate(self.devices[r]):
            n = self.ps.share[j][k]
            if n:
                src, dst = (dev, self.ps.devices[k]) if to_shard else (self.ps.devices[k], dev)
                wire = None
                if wires is not None:
                    wires.append(wire := self.env.event())
                out.append(self.env.process(self._send(src, dst, n, r, step, phase, wire)))
        return out

    # --- fetch -------------------------------------------------------------------------------
    def fetch(self, r: int, step: int, fetch_id: int) -> simpy.Event:
        """Every shard's current values to replica r; fires when all have arrived."""
        return self.env.all_of([self.env.process(self._fetch_shard(r, k, step, fetch_id))
                                for k in range(len(self.ps.devices))])

    def _fetch_shard(self, r: int, k: int, step: int, fetch_id: int):
        eng = self.engine
        version = [0]

        def read() -> list[simpy.Event]:              # the shard's values as they are now, sent
            eng.log("snap", r, k, step, fetch=fetch_id)
            version[0] = self.version[k]
            return [self.env.process(self._read(r, k, step))]
        yield self.env.process(self._survives(k, read))
        eng.log("deliver", r, k, step, fetch=fetch_id)
        self.held[r][k] = version[0]

    def _read(self, r: int, k: int, step: int):
        eng = self.engine
        if self.rule.startswith("dcasgd"):           # the shard keeps this worker's copy
            n = self.ps.sizes[k]
            yield eng.compute_op(self.ps.devices[k], 0.0, 2 * n * PARAM_BYTES, r, step, "backup copy", "ps_update",
                                 kind="update")
        yield self.env.all_of(self._pieces(r, k, False, step, "fetch"))

    # --- push --------------------------------------------------------------------------------
    def push(self, r: int, step: int, push_id: int, versions: list[int]) -> tuple[simpy.Event, simpy.Event]:
        """Replica r's accumulated gradient to every shard, each applied in its turn: (sent,
        applied), the first firing once every shard has received its piece."""
        arrived = [self.env.event() for _ in self.ps.devices]
        applied = self.env.all_of([self.env.process(self._push_shard(r, k, step, push_id, versions[k], arrived[k]))
                                   for k in range(len(self.ps.devices))])
        return self.env.all_of(arrived), applied

    def _push_shard(self, r: int, k: int, step: int, push_id: int, version: int, arrived: simpy.Event):
        eng = self.engine
        if not any(self.ps.share[j][k] for j in range(len(self.devices[r]))):
            arrived.succeed()
            return
        def pieces() -> list[simpy.Event]:
            """A try's pieces; an 8-bit push is sent once a try's bytes have all arrived at a
            shard still in the life they were sent to (its dequantise on the shard comes after;
            a 32-bit push is sent when ``_survives`` returns, at its last byte)."""
            if self.bits != 8:
                return self._pieces(r, k, True, step, "push")
            wires: list = []
            out, life = self._pieces(r, k, True, step, "push", wires), self.epoch[k]
            self.env.all_of(wires).callbacks.append(
                lambda _e: None if arrived.triggered or self.epoch[k] != life else arrived.succeed())
            return out
        epoch = yield self.env.process(self._survives(k, pieces))
        if not arrived.triggered:
            arrived.succeed()
        with self.queues[k].request() as turn:
            yield turn
            if self.epoch[k] != epoch:                  # queued when the shard failed: lost with it
                return
            flops, nbytes = apply_cost(self.rule, self.ps.sizes[k])
            yield eng.compute_op(self.ps.devices[k], flops, nbytes, r, step, "apply", "ps_update", kind="update",
                                 key=f"apply.{self.rule}")
            if self.epoch[k] != epoch:                  # the shard failed while applying it
                return
            eng.trace.staleness.append(max(0, self.version[k] - version))   # < 0: read before a restore
            self.version[k] += 1
            self.applies[k] += 1
            eng.log("apply", r, k, step, push=push_id)
            yield from self._checkpoint(k, r, step)

    def _checkpoint(self, k: int, r: int, step: int):
        """With recovery, every ``shard_checkpoint_every`` applies the shard writes its values
        (at ``checkpoint_gbps``, holding its queue)."""
        faults = self.engine.plan.scenario.faults
        self.since[k] += 1
        if not (self.recovery and faults.shard_checkpoint_every and self.since[k] >= faults.shard_checkpoint_every):
            return
        seconds = self.ps.sizes[k] * checkpoint_bytes(self.engine.plan.scenario) / (faults.checkpoint_gbps * 1e9)
        yield self.engine.wait(self.env.timeout(seconds), self.ps.devices[k], r, step, "shard checkpoint")
        self.saved[k], self.since[k] = self.version[k], 0
        self.engine.log("checkpoint", -1, k, step)
