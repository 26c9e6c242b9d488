"""mpi4py transport.  Waiting ranks yield the CPU between polls instead of spinning (for
the first 10 ms ``sched_yield``, which costs nothing when a core is free, then short
sleeps), so ranks that outnumber the cores (2 here) do not starve the rank they wait for.
Sleeping at once when ranks outnumber cores was measured and is worse here: every wait
then costs a sleep's granularity (75-125 us on this host), 3 ranks of mlp-digits on 2 cores
took 1.05 ms a step instead of 0.35 ms, and distbelief-speech was 5-10% slower too."""
from __future__ import annotations

import os
import time

import numpy as np

from .backend import to_numpy

POLL_SLEEP_S = 50e-6      # between polls of a pending request; far below a step, far above a spin
TAGS = {"a": 1, "g": 2, "r": 3}


YIELD_FOR_S = 10e-3      # poll with sched_yield this long (a 16 MB message takes ~2 ms), then sleep


def wait_buffer(req) -> None:
    """Waits for a buffer-based request (Isend, Irecv, Iallreduce) by polling, yielding."""
    if req.Test():
        return
    start = time.perf_counter()
    while not req.Test():
        if time.perf_counter() - start < YIELD_FOR_S:
            os.sched_yield()
        else:
            time.sleep(POLL_SLEEP_S)


def barrier(comm) -> None:
    """A barrier that yields while it waits (MPI's blocking Barrier spins: a rank done early
    would take its core's share from the ranks still working on it)."""
    wait_buffer(comm.Ibarrier())


def probe(comm, status, source: int, tag: int) -> tuple[int, int]:
    """Waits, yielding, for a message matching (source, tag); returns its (source, tag)."""
    start = time.perf_counter()
    while not comm.Iprobe(source=source, tag=tag, status=status):
        if time.perf_counter() - start < YIELD_FOR_S:
            os.sched_yield()
        else:
            time.sleep(POLL_SLEEP_S)
    return status.Get_source(), status.Get_tag()


class Outbox:
    """A server's replies in flight: sent without waiting for their delivery, their buffers
    held until MPI is done with them.  A shard that waited on each reply (a blocking
    ``Send`` spins) held up every other worker until that one worker took it in; with the
    worker on the shard's core and computing, that took its whole forward and backward
    (mlp-digits Downpour, 3 ranks on 2 cores: a reply to the worker on the shard's core took
    516 us to complete where the worker had it after 58, and the other worker's pushes
    waited 240 us for the shard)."""

    def __init__(self, comm) -> None:
        self.comm, self.pending = comm, []

    def send(self, buf: np.ndarray, dest: int, tag: int) -> None:
        """Sends ``buf``, which the caller hands over (a fresh array), and forgets the
        replies MPI has finished with."""
        self.pending = [(req, b) for req, b in self.pending if not req.Test()]
        self.pending.append((self.comm.Isend(buf, dest=dest, tag=tag), buf))

    def drain(self) -> None:
        for req, _buf in self.pending:
            wait_buffer(req)
        self.pending.clear()


def tag_of(tag: tuple) -> int:
    kind, layer, micro = tag
    return TAGS[kind] * 10_000_000 + layer * 10_000 + micro


class MPITransport:
    """Slots are ranks of ``comm`` (slot j = rank j of the replica's communicator).  The
    receiver passes the shape and dtype it expects (it knows them from the Plan), so each
    message is one contiguous payload."""

    def __init__(self, comm, xp=np) -> None:
        self.comm, self.xp = comm, xp
        self.pending: list = []
        self.bytes = 0

    def send(self, src: int, dst: int, tag: tuple, array) -> None:
        data = np.ascontiguousarray(to_numpy(array))     # a CuPy array comes to the host (stream synchronised)
        self.pending.append((self.comm.Isend(data, dest=dst, tag=tag_of(tag)), data))
        self.bytes += data.nbytes

    def recv(self, src: int, dst: int, tag: tuple, shape: tuple, dtype):
        out = np.empty(shape, dtype=dtype)
        wait_buffer(self.comm.Irecv(out, source=src, tag=tag_of(tag)))
        return self.xp.asarray(out)

    def flush(self) -> None:
        for req, _buf in self.pending:
            wait_buffer(req)
        self.pending.clear()
