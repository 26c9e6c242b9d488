"""Sandblaster L-BFGS on real ranks: workers, parameter-server shards and one coordinator.

Per batch (``batch_size x replicas`` samples cut into ``work_units`` units):
1. every live replica fetches the parameters and tells the coordinator READY;
2. the coordinator hands units to whichever replica is free (ASSIGN), and once the queue
   is empty copies unfinished units to free replicas (backup tasks); the first RESULT of a
   unit wins.  A replica that goes silent loses its units to backups, or, without backup
   tasks, they are re-queued after ``faults.detect_timeout_s``;
3. END tells each replica which of its units won; it pushes their summed gradient;
4. the shards average the pushes and take one L-BFGS step.  Its dot products are sums of
   per-shard dot products, allreduced among the shard ranks: only scalars cross.

Ranks: workers first (replica-major), then shards, then the coordinator.  A replica of
several slots (model parallelism) talks to the coordinator through its slot 0, which
passes each unit on to the others; every slot pushes its part of the won units' sum.
Such a replica is lost with any of its slots (``comm.LostWatch``); when a slot may crash
(``acks``), its leader answers each END with ACK [batch, 1] once every slot has it (they
will all push) or sends ACK [batch, 0] as soon as its replica is lost, and the shards are
told to wait for the pushes of the acknowledged replicas only.  A slot pushes only to the
shards that keep some of its parameters (under a layer split, not every shard), so each
shard is told its own count.  With no replica left the coordinator raises: the rank's
error ends the job (``ranks.main``) rather than every rank waiting forever.
"""
from __future__ import annotations

import time

import numpy as np

from executor.comm import POLL_SLEEP_S, Outbox, probe
from executor.coordinator_state import (ACK, ASSIGN, END, READY, RESULT, STARTUP_S, Assign, CoordinatorState, End,
                                        Expect, GiveUp)
from executor.psrank import REPLY, decode, encode, message_buffer, put, take
from executor.shard_state import EXPECT, PUSH_BASE, LbfgsShardState, Reply, Step

# the tags stay importable from here: the workers' side (ranks.py) takes them from this module
__all__ = ["ACK", "ASSIGN", "END", "EXPECT", "READY", "RESULT", "STARTUP_S", "ShardDot", "coordinate", "serve_lbfgs"]


# --- coordinator ----------------------------------------------------------------------------------
def coordinate(comm, leaders: list[int], shard_ranks: list[int], batches: int, units: int,
               backup_tasks: bool, timeout_s: float, shard_pushes: tuple[int, ...] | None = None,
               acks: bool = False) -> dict:
    """Hands out units to the replicas' leaders (slot 0 of each); tells each shard how many
    pushes a batch brings it (``shard_pushes[k]`` per live replica; default one per
    shard); returns counts of units run, duplicated and lost to failures.  ``acks``:
    leaders acknowledge END (see above).  The decisions are
    ``coordinator_state.CoordinatorState``'s; this loop probes for what it listens to,
    hands it the message or, when none came, the time, and sends what it says.  Raises
    RuntimeError when no replica is left (``GiveUp``), ValueError when ``shard_pushes``
    does not name one count per shard."""
    from mpi4py import MPI
    shard_pushes = tuple(shard_pushes) if shard_pushes is not None else (1,) * len(shard_ranks)
    if len(shard_pushes) != len(shard_ranks):
        raise ValueError(f"shard_pushes(={shard_pushes}) must name one count for each of the "
                         f"{len(shard_ranks)} shards")
    state = CoordinatorState(leaders, batches, units, backup_tasks, timeout_s, shard_pushes, acks)
    status = MPI.Status()
    while not state.stopped:
        got = _pending(comm, status, state.listening())
        now = time.perf_counter()
        if got is None:
            actions = state.tick(now)
            if not actions:
                time.sleep(POLL_SLEEP_S)
        else:
            src, tag = got
            msg = np.empty(1 if tag == READY else 2, np.int64)      # READY [0]; RESULT, ACK [batch, unit or pushes]
            comm.Recv(msg, source=src, tag=tag)
            actions = state.on(src, tag, None if tag == READY else (int(msg[0]), int(msg[1])), now)
        for act in actions:
            if isinstance(act, Assign):
                comm.Send(np.array([act.batch, act.unit], np.int64), dest=act.replica, tag=ASSIGN)
            elif isinstance(act, End):
                comm.Send(np.array([len(act.won), *act.won], np.int64), dest=act.replica, tag=END)
            elif isinstance(act, Expect):
                for k, pushes in zip(shard_ranks, act.pushes):
                    comm.Send(np.array([pushes], np.int64), dest=k, tag=EXPECT)
            elif isinstance(act, GiveUp):
                raise RuntimeError(act.why)
    return {"units_run": state.units_run, "backup_copies": state.backup_copies, "replicas_left": len(state.live)}


def _pending(comm, status, wanted: list[tuple[int | None, int]]) -> tuple[int, int] | None:
    """(source, tag) of a message waiting for the first of ``wanted`` (source None: any), or None."""
    from mpi4py import MPI
    for source, tag in wanted:
        if comm.Iprobe(source=MPI.ANY_SOURCE if source is None else source, tag=tag, status=status):
            return status.Get_source(), tag
    return None


# --- shard ----------------------------------------------------------------------------------------
def serve_lbfgs(comm, initial: np.ndarray, worker_runs: dict, units: int, lbfgs, bits: int,
                silent: set[int] = frozenset()) -> dict:
    """Shard loop: answer fetches (a fetch for batch b once b steps are taken), sum a batch's
    pushes, and when the coordinator says how many replicas pushed, take the L-BFGS step
    (all shards together: its dot products are allreduced among them).  ``silent``:
    crashed workers, whose DONE never comes.  The decisions are
    ``shard_state.LbfgsShardState``'s."""
    from mpi4py import MPI
    w = initial.copy()
    # float64: the sum's order varies with who won what
    state = LbfgsShardState(len(set(worker_runs) - set(silent)), units, zero=np.zeros(w.shape, np.float64))
    status = MPI.Status()
    outbox = Outbox(comm)
    while not state.stopped:
        src, tag = probe(comm, status, MPI.ANY_SOURCE, MPI.ANY_TAG)
        runs = worker_runs.get(src, [])
        if tag >= PUSH_BASE:                             # a push: a replica's summed unit gradients
            buf = message_buffer(sum(r.size for r in runs), bits)
            comm.Recv(buf, source=src, tag=tag)
            payload = np.zeros(w.shape, np.float64)
            put(payload, runs, "shard", decode(buf, bits))
        else:
            msg = np.empty(1, np.int64)
            comm.Recv(msg, source=src, tag=tag)
            payload = int(msg[0])
        for act in state.on(src, tag, payload):
            if isinstance(act, Step):
                lbfgs.step(w, act.grad.astype(w.dtype))   # the mean gradient over the whole batch
            elif isinstance(act, Reply):
                outbox.send(encode(take(w, worker_runs[act.worker], "shard"), bits), act.worker, REPLY)
    outbox.drain()
    return {"applied": state.applied, "params": w}


class ShardDot:
    """Dot products over the whole vector from shard pieces: local dot, allreduced."""

    def __init__(self, shard_comm) -> None:
        self.comm = shard_comm

    def __call__(self, a, b) -> float:
        return self.comm.allreduce(float((a * b).sum()))
