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
told to wait for the pushes of the acknowledged replicas only.
"""
from __future__ import annotations

import time
from collections import deque

import numpy as np

from executor.comm import POLL_SLEEP_S, Outbox, probe
from executor.psrank import DONE, FETCH, REPLY, decode, encode, message_buffer, put, take

READY, ASSIGN, RESULT, END, EXPECT, ACK = 31, 32, 33, 34, 35, 36
# The first batch waits at least this long for every replica's READY: ranks start at
# different times (importing, loading data, planning take seconds when ranks outnumber the
# cores), and a replica given up on while it was only starting could never rejoin.
STARTUP_S = 60.0


# --- coordinator ----------------------------------------------------------------------------------
def coordinate(comm, leaders: list[int], shard_ranks: list[int], batches: int, units: int,
               backup_tasks: bool, timeout_s: float, pushes_per_replica: int = 1, acks: bool = False) -> dict:
    """Hands out units to the replicas' leaders (slot 0 of each); tells the shards how many
    pushes a batch brings (one per slot of every live replica); returns counts of units
    run, duplicated and lost to failures.  ``acks``: leaders acknowledge END (see above)."""
    from mpi4py import MPI
    status = MPI.Status()
    live = set(leaders)
    ran = dup = 0
    for b in range(batches):
        ready: set[int] = set()
        first = None
        while ready != live:                             # every live replica has the new parameters
            if comm.Iprobe(source=MPI.ANY_SOURCE, tag=READY, status=status):
                src = status.Get_source()
                comm.Recv(np.empty(1, np.int64), source=src, tag=READY)
                ready.add(src)
                first = first or time.perf_counter()
            elif first and time.perf_counter() - first > (timeout_s if b else max(timeout_s, STARTUP_S)):
                live = set(ready)                        # the silent ones are gone
            else:
                time.sleep(POLL_SLEEP_S)
        queue, running, won = deque(range(units)), {}, {}
        free = deque(sorted(live))
        started: dict[int, float] = {}
        while len(won) < units:
            while free:
                r = free[0]
                if queue:
                    u = queue.popleft()
                elif backup_tasks:
                    spare = [u for u in running if u not in won and r not in running[u]]
                    if not spare:
                        break
                    u = min(spare, key=lambda u: (len(running[u]), u))
                    dup += 1
                else:
                    break
                free.popleft()
                running.setdefault(u, []).append(r)
                started[r] = time.perf_counter()
                comm.Send(np.array([b, u], np.int64), dest=r, tag=ASSIGN)
                ran += 1
            if comm.Iprobe(source=MPI.ANY_SOURCE, tag=RESULT, status=status):
                src = status.Get_source()
                msg = np.empty(2, np.int64)
                comm.Recv(msg, source=src, tag=RESULT)
                if int(msg[0]) != b:
                    continue                             # a backup copy of an earlier batch, finished late
                u = int(msg[1])
                won.setdefault(u, src)
                if src in running[u]:
                    running[u].remove(src)
                live.add(src)                            # late, not dead: it gets END and more work
                free.append(src)
                continue
            now = time.perf_counter()
            stale = [r for r in live if r not in free and now - started.get(r, now) > timeout_s]
            if acks and comm.Iprobe(source=MPI.ANY_SOURCE, tag=ACK, status=status):
                stale.append(_ack(comm, status.Get_source(), live))   # before END only [b, 0]: lost
            for r in stale:                              # silent too long, or lost: its units go back
                live.discard(r)
                for u, rs in running.items():
                    if r in rs:
                        rs.remove(r)
                        if u not in won and not rs and u not in queue:
                            queue.append(u)
            if not stale:
                time.sleep(POLL_SLEEP_S)
        for r in live:
            mine = [u for u, w in won.items() if w == r]
            comm.Send(np.array([len(mine), *mine], np.int64), dest=r, tag=END)
        if acks:                                         # each says whether its whole replica pushes
            for r in sorted(live):
                _ack(comm, r, live)
        for k in shard_ranks:
            comm.Send(np.array([len(live) * pushes_per_replica], np.int64), dest=k, tag=EXPECT)
    for k in shard_ranks:
        comm.Send(np.array([-1], np.int64), dest=k, tag=EXPECT)
    return {"units_run": ran, "backup_copies": dup, "replicas_left": len(live)}


def _ack(comm, src: int, live: set[int]) -> int:
    """Takes the ACK [batch, pushes] ``src`` sends once per batch; [batch, 0] (its replica
    is lost) drops it from ``live``.  Returns ``src``."""
    from mpi4py import MPI
    msg = np.empty(2, np.int64)
    probe(comm, MPI.Status(), src, ACK)                  # yields while it waits
    comm.Recv(msg, source=src, tag=ACK)
    if not msg[1]:
        live.discard(src)
    return src


# --- shard ----------------------------------------------------------------------------------------
def serve_lbfgs(comm, initial: np.ndarray, worker_runs: dict, units: int, lbfgs, bits: int,
                silent: set[int] = frozenset()) -> dict:
    """Shard loop: answer fetches (a fetch for batch b once b steps are taken), sum a batch's
    pushes, and when the coordinator says how many replicas pushed, take the L-BFGS step
    (all shards together: its dot products are allreduced among them).  ``silent``:
    crashed workers, whose DONE never comes."""
    from mpi4py import MPI
    w = initial.copy()
    status = MPI.Status()
    applied, done, finished = 0, 0, False
    g_sum, pushes = np.zeros(w.shape, np.float64), 0     # float64: the sum's order varies with who won what
    expects: deque[int] = deque()                        # pushes to wait for, batch by batch
    deferred: list[tuple[int, int]] = []
    expected_done = len(set(worker_runs) - set(silent))
    outbox = Outbox(comm)
    while not (finished and not expects and done == expected_done):
        src, tag = probe(comm, status, MPI.ANY_SOURCE, MPI.ANY_TAG)
        runs = worker_runs.get(src, [])
        msg = np.empty(1, np.int64)
        if tag == FETCH:
            comm.Recv(msg, source=src, tag=FETCH)
            deferred.append((src, int(msg[0])))
        elif tag == EXPECT:
            comm.Recv(msg, source=src, tag=EXPECT)
            if msg[0] < 0:
                finished = True                          # no more batches (earlier counts still stand)
            else:
                expects.append(int(msg[0]))
        elif tag == DONE:
            comm.Recv(msg, source=src, tag=DONE)
            done += 1
        else:                                            # a push: a replica's summed unit gradients
            buf = message_buffer(sum(r.size for r in runs), bits)
            comm.Recv(buf, source=src, tag=tag)
            put(g_sum, runs, "shard", decode(buf, bits), add=True)
            pushes += 1
        if expects and pushes == expects[0]:
            lbfgs.step(w, (g_sum / units).astype(w.dtype))   # the mean gradient over the whole batch
            applied += 1
            g_sum[...] = 0
            pushes = 0
            expects.popleft()
        still = []
        for wk, batch in deferred:
            if batch > applied:
                still.append((wk, batch))
            else:
                outbox.send(encode(take(w, worker_runs[wk], "shard"), bits), wk, REPLY)
        deferred = still
    outbox.drain()
    return {"applied": applied, "params": w}


class ShardDot:
    """Dot products over the whole vector from shard pieces: local dot, allreduced."""

    def __init__(self, shard_comm) -> None:
        self.comm = shard_comm

    def __call__(self, a, b) -> float:
        return self.comm.allreduce(float((a * b).sum()))
