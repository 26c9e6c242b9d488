"""Parameter-server shards and their workers on real ranks (sync by PS, Downpour, DC-ASGD).

Layout: the parameters are one vector, layer by layer and slot by slot (the Plan's
order); shard k owns an even cut of it.  A worker slot holds its boxes' parameters as
segments of that vector, so what it exchanges with shard k is a few contiguous runs.

The protocol and what a shard decides are in ``executor.shard_state``; ``serve`` is the
MPI loop around it: receive, decide, act.  Shards poll with short sleeps: waiting ranks
yield the CPU.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from clustersim.core.partition import even_cuts
from clustersim.core.plan import Plan
from clustersim.core.schedule import QUANT_HEADER, message_bytes

from executor.comm import Outbox, probe, wait_buffer
from executor.optim import DCASGD, SGD, Adagrad
from executor.shard_state import (DONE, FETCH, PUSH_BASE, REPLY, Apply, ApplyMean, Checkpoint, Reply, ShardState,
                                  push_tag)


@dataclass(frozen=True)
class Run:
    local: int      # offset in the worker's flat vector
    shard: int      # offset in the shard's vector
    size: int


def slot_segments(p: Plan, slot: int, sizes: dict[tuple[int, int], list[int]]) -> list[tuple[int, int]]:
    """(global offset, size) of each parameter array of ``slot``, in the worker's flat order.
    ``sizes[(layer, slot)]`` are the array sizes of that box."""
    out, offset = [], 0
    for i, sl in enumerate(p.slices):
        for j, _box in sl:
            for n in sizes.get((i, j), []):
                if j == slot:
                    out.append((offset, n))
                offset += n
    return out


def shard_runs(segments: list[tuple[int, int]], total: int, shards: int) -> list[list[Run]]:
    """Per shard, the runs where this worker's segments fall into the shard's range."""
    ranges = even_cuts(total, shards)
    runs: list[list[Run]] = [[] for _ in range(shards)]
    local = 0
    for g0, n in segments:
        for k, (lo, hi) in enumerate(ranges):
            a, b = max(lo, g0), min(hi, g0 + n)
            if b > a:
                runs[k].append(Run(local + a - g0, a - lo, b - a))
        local += n
    return runs


def take(vec: np.ndarray, runs: list[Run], side: str) -> np.ndarray:
    parts = [vec[getattr(r, side):getattr(r, side) + r.size] for r in runs]
    return np.concatenate(parts) if parts else np.zeros(0, vec.dtype)


def put(vec: np.ndarray, runs: list[Run], side: str, values: np.ndarray, add: bool = False) -> None:
    pos = 0
    for r in runs:
        dst = vec[getattr(r, side):getattr(r, side) + r.size]
        if add:
            dst += values[pos:pos + r.size]
        else:
            dst[...] = values[pos:pos + r.size]
        pos += r.size


# --- 8-bit messages -----------------------------------------------------------------------------
def encode(values: np.ndarray, bits: int) -> np.ndarray:
    """32-bit: the float32 values.  8-bit: 8 header bytes (min, step as float32) + one code per value."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    if bits == 32 or values.size == 0:
        return values
    lo, hi = float(values.min()), float(values.max())
    step = (hi - lo) / 255.0 or 1.0
    codes = np.rint((values - lo) / step).astype(np.uint8)
    return np.concatenate([np.array([lo, step], np.float32).view(np.uint8), codes])   # QUANT_HEADER bytes + codes


def decode(buf: np.ndarray, bits: int) -> np.ndarray:
    if bits == 32 or buf.size == 0:
        return buf
    lo, step = buf[:QUANT_HEADER].view(np.float32)
    return buf[QUANT_HEADER:].astype(np.float32) * step + lo


def message_buffer(n: int, bits: int) -> np.ndarray:
    """A receive buffer of ``n`` values' message: ``schedule.message_bytes`` of them."""
    return np.empty(n, np.float32) if bits == 32 or n == 0 else np.empty(message_bytes(n, bits), np.uint8)


# --- the shard ----------------------------------------------------------------------------------
# (replica, step, start, end, summed): one apply, timed by perf_counter; summed 0: one push
OnApply = Callable[[int, int, float, float, int], None]


def save_checkpoint(path, w: np.ndarray, applied: int, opt) -> None:
    """Shard state to ``path`` via a temporary file in the same folder, fsync and rename:
    the file is the previous checkpoint or the new one, never half of either."""
    import os
    from pathlib import Path
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    state = {"params": w, "applied": np.array(applied)}
    if isinstance(opt, Adagrad):
        state["h"] = opt.h
    if isinstance(opt, DCASGD):
        state["ms"] = opt.ms
    with open(tmp, "wb") as fh:
        np.savez(fh, **state)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_checkpoint(path) -> tuple[np.ndarray, int, dict]:
    """(parameters, updates applied, every array) of ``save_checkpoint``'s file; ValueError
    naming the file when it cannot be read or is not a shard checkpoint."""
    import zipfile
    try:
        with np.load(path) as data:
            state = {key: data[key] for key in data.files}
        return state["params"].astype(np.float32), int(state["applied"]), state
    except OSError as exc:
        raise ValueError(f"checkpoint {path} cannot be read: {exc}") from None
    except (ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile):
        raise ValueError(f"checkpoint {path} is not a shard checkpoint (an .npz of params and applied)") from None


def load_checkpoint(path, opt, size: int) -> tuple[np.ndarray, int]:
    """(parameters, updates applied) from ``save_checkpoint``'s file, and the optimizer's
    state into ``opt``; ValueError naming the file when it cannot be read or does not hold
    a shard of ``size`` parameters (one of another scenario or shard count)."""
    w, applied, state = read_checkpoint(path)
    if w.shape != (size,):
        raise ValueError(f"checkpoint {path} holds {w.size} parameters; this shard has {size} "
                         f"(a checkpoint of another scenario or number of shards?)")
    if isinstance(opt, Adagrad) and "h" in state:
        opt.h[...] = state["h"]
    if isinstance(opt, DCASGD) and "ms" in state:
        opt.ms[...] = state["ms"]
    return w, applied


def serve(comm, p: Plan, k: int, initial: np.ndarray, worker_runs: dict[int, list[Run]], rule: str,
          sync_replicas: int = 0, checkpoint=None, silent: set[int] = frozenset(),
          staleness_bound: int | None = None, checkpoint_every: int = 0, resume: bool = False,
          replica_of=lambda rank: rank, quorum: int = 0, on_apply: OnApply | None = None,
          silent_until: dict[int, int] | None = None) -> dict:
    """Runs shard k until every worker has said DONE; returns its counters.
    ``worker_runs[rank]``: the runs of that worker on this shard.  ``silent``: workers
    that stopped (crashed); the shard does not wait for them (SSP's bound: not past
    ``silent_until``, the step of each one's last fetch).  ``checkpoint``: a file
    path, saved every ``checkpoint_every`` updates (``resume``: start from it).
    ``sync_replicas``, ``quorum``, ``replica_of``, ``staleness_bound``: see
    ``shard_state.ShardState``.  ``on_apply``: told of each apply (the pushing worker's
    replica, or -1 for sync's mean of several).  Raises ValueError for a checkpoint it
    cannot resume."""
    from mpi4py import MPI
    tr = p.scenario.training
    w = initial.copy()
    opt = (DCASGD(tr.learning_rate, tr.dcasgd_lambda, len(w), tr.dcasgd_adaptive) if rule == "dcasgd"
           else Adagrad(tr.learning_rate, len(w)) if rule == "adagrad" else SGD(tr.learning_rate))
    bits = tr.comm_bits
    applied, busy = 0, 0.0
    if resume and checkpoint is not None:
        w, applied = load_checkpoint(checkpoint, opt, len(w))
    resumed_from = saved = applied
    shard = ShardState(worker_runs, sync_replicas, quorum, replica_of, staleness_bound,
                       checkpoint_every if checkpoint is not None else 0, applied, silent, silent_until)
    status = MPI.Status()
    outbox = Outbox(comm)
    while not shard.stopped:
        src, tag = probe(comm, status, MPI.ANY_SOURCE, MPI.ANY_TAG)
        runs = worker_runs.get(src, [])
        if tag >= PUSH_BASE:
            buf = message_buffer(sum(r.size for r in runs), bits)
            comm.Recv(buf, source=src, tag=tag)
            t = time.perf_counter()
            payload = np.zeros_like(w)
            put(payload, runs, "shard", decode(buf, bits))
            busy += time.perf_counter() - t
        else:
            msg = np.empty(1, np.int64)
            comm.Recv(msg, source=src, tag=tag)
            payload = int(msg[0])
        for act in shard.on(src, tag, payload):
            if isinstance(act, Apply):
                t = time.perf_counter()
                opt.step(w, act.grad, worker=act.worker)
                end = time.perf_counter()
                busy += end - t
                if on_apply is not None:
                    on_apply(replica_of(act.worker), act.step, t, end, 0)
            elif isinstance(act, ApplyMean):
                t = time.perf_counter()
                opt.step(w, act.grad)
                end = time.perf_counter()
                busy += end - t
                if on_apply is not None:
                    on_apply(-1, act.step, t, end, len(act.replicas))
            elif isinstance(act, Checkpoint):
                save_checkpoint(checkpoint, w, act.applied, opt)
                saved = act.applied
            elif isinstance(act, Reply):
                if isinstance(opt, DCASGD):
                    opt.fetched(act.worker, w)
                outbox.send(encode(take(w, worker_runs[act.worker], "shard"), bits), act.worker, REPLY)
    outbox.drain()
    if checkpoint is not None and shard.applied != saved:     # a job that ended keeps its last updates too
        save_checkpoint(checkpoint, w, shard.applied, opt)
    return {"applied": shard.applied, "busy_s": busy, "params": w, "resumed_from": resumed_from,
            "staleness": shard.staleness}


# --- the worker side ------------------------------------------------------------------------------
class ShardClient:
    """A worker's view of the shards: fetch into and push from its flat parameter vector."""

    def __init__(self, comm, shard_ranks: list[int], runs: list[list[Run]], bits: int, done_to_all: bool = False) -> None:
        self.comm, self.ranks, self.runs, self.bits = comm, shard_ranks, runs, bits
        self.done_to_all = done_to_all          # Sandblaster's shards count every worker's DONE
        self.sent = 0

    def push(self, grad: np.ndarray, step: int = 0) -> None:
        reqs = []
        for rank, runs in zip(self.ranks, self.runs):
            if runs:
                buf = encode(take(grad, runs, "local"), self.bits)
                self.sent += buf.nbytes
                reqs.append((self.comm.Isend(buf, dest=rank, tag=push_tag(step)), buf))
        for req, _ in reqs:
            wait_buffer(req)

    def fetch(self, params: np.ndarray, step: int) -> None:
        for rank, runs in zip(self.ranks, self.runs):
            if runs:
                wait_buffer(self.comm.Isend(np.array([step], np.int64), dest=rank, tag=FETCH))
        for rank, runs in zip(self.ranks, self.runs):
            if runs:
                buf = message_buffer(sum(r.size for r in runs), self.bits)
                wait_buffer(self.comm.Irecv(buf, source=rank, tag=REPLY))
                put(params, runs, "local", decode(buf, self.bits))

    def done(self) -> None:
        """DONE to each shard this worker pushes to, which counts it (to every one for
        Sandblaster's, which count every worker): a DONE no shard takes would be left
        unreceived at the job's end (docs/decisions/075)."""
        for rank, runs in zip(self.ranks, self.runs):
            if runs or self.done_to_all:
                self.comm.Send(np.zeros(1, np.int64), dest=rank, tag=DONE)
