"""mpi4py transport.  Waiting ranks yield the CPU between polls instead of spinning
(``sched_yield`` for the first 10 ms, then short sleeps), so ranks that outnumber the
cores do not starve the rank they wait for (docs/decisions/009)."""
from __future__ import annotations

import os
import time

import numpy as np

from executor.backend import to_numpy

POLL_SLEEP_S = 50e-6      # between polls of a pending request; far below a step, far above a spin
TAGS = {"a": 1, "g": 2, "r": 3, "rs": 5, "ag": 6, "grs": 7, "gag": 8, "wrs": 9, "wag": 10}   # rs..: a tensor split's
LOST_TAG = 4 * 10_000_000  # between tag_of's kinds (layers < 1000); MPICH's tag bound is 2**29 - 1


YIELD_FOR_S = 10e-3      # poll with sched_yield this long (a 16 MB message takes ~2 ms), then sleep


class ReplicaLost(Exception):
    """A slot of this rank's replica crashed: the step can never finish."""


def wait_buffer(req, lost=None) -> None:
    """Waits for a buffer-based request (Isend, Irecv, Iallreduce) by polling, yielding.
    ``lost`` (a ``LostWatch``) raises ``ReplicaLost`` when a slot of the replica crashed
    before the step this wait belongs to."""
    if req.Test():
        return
    start = time.perf_counter()
    while not req.Test():
        if lost is not None and lost.gone():
            raise ReplicaLost
        if time.perf_counter() - start < YIELD_FOR_S:
            os.sched_yield()
        else:
            time.sleep(POLL_SLEEP_S)


class LostWatch:
    """Whether a slot of this replica crashed.  A crashed slot (``--fail``) tells the other
    slots of its replica with one LOST message, standing in for the failure detector of a
    real cluster: they would otherwise wait for it forever (every step needs every slot),
    and so would the job's end.  The replica is gone from then on, as DistBelief loses a
    model replica with any of its machines; the simulator's replica stalls the same way.

    LOST carries the step the slot crashed at: it finished every step before it, so a mate
    still in an earlier step (LOST can overtake it) waits on; ``step`` is set by the mate's
    loop."""

    def __init__(self, comm) -> None:
        self.comm = comm
        self.step = 0
        self.crashed_at: int | None = None

    def gone(self) -> bool:
        if self.crashed_at is None and self.comm.Iprobe(tag=LOST_TAG):
            msg = np.empty(1, np.int64)
            self.comm.Recv(msg, tag=LOST_TAG)
            self.crashed_at = int(msg[0])
        return self.crashed_at is not None and self.step >= self.crashed_at

    def tell(self, step: int) -> None:
        """Sent by the crashed slot, once, to each other slot of its replica."""
        for mate in range(self.comm.Get_size()):
            if mate != self.comm.Get_rank():
                self.comm.Send(np.array([step], np.int64), dest=mate, tag=LOST_TAG)


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
    held until MPI is done with them (a blocking ``Send`` spins and held every other worker
    up: docs/decisions/009)."""

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

    def __init__(self, comm, xp=np, lost: LostWatch | None = None) -> None:
        self.comm, self.xp, self.lost = comm, xp, lost
        self.pending: list = []
        self.bytes = 0

    def send(self, src: int, dst: int, tag: tuple, array) -> None:
        data = np.ascontiguousarray(to_numpy(array))     # a CuPy array comes to the host (stream synchronised)
        self.pending.append((self.comm.Isend(data, dest=dst, tag=tag_of(tag)), data))
        self.bytes += data.nbytes

    def recv(self, src: int, dst: int, tag: tuple, shape: tuple, dtype):
        out = np.empty(shape, dtype=dtype)
        req = self.comm.Irecv(out, source=src, tag=tag_of(tag))
        try:
            wait_buffer(req, self.lost)
        except ReplicaLost:
            req.Cancel()                                 # nothing will come: free the buffer
            req.Wait()
            raise
        return self.xp.asarray(out)

    def flush(self) -> None:
        for req, _buf in self.pending:
            wait_buffer(req, self.lost)
        self.pending.clear()


def common_start(world) -> float:
    """The job's time zero for its spans, after a barrier: rank 0's clock reading where every
    rank runs on one host (``perf_counter`` is the host's monotonic clock, so a message's
    send on one rank and its receipt on another line up: validation pairs them), else
    each rank's own."""
    from mpi4py import MPI
    one_host = len(set(world.allgather(MPI.Get_processor_name()))) == 1
    barrier(world)
    t0 = time.perf_counter()
    return world.bcast(t0, root=0) if one_host else t0
