"""mpi4py transport.  Waiting ranks sleep between polls instead of spinning, so ranks that
outnumber the cores (2 cores here) do not starve the rank they wait for."""
from __future__ import annotations

import time

import numpy as np

POLL_SLEEP_S = 50e-6      # between polls of a pending request; far below a step, far above a spin
TAGS = {"a": 1, "g": 2, "r": 3}


def wait(req):
    """Waits for an mpi4py request by polling; returns its value (for lowercase receives)."""
    spins = 0
    while True:
        done, value = req.test()
        if done:
            return value
        spins += 1
        if spins > 20:
            time.sleep(POLL_SLEEP_S)


def wait_buffer(req) -> None:
    """Waits for a buffer-based request (Isend, Irecv, Iallreduce) by polling."""
    spins = 0
    while not req.Test():
        spins += 1
        if spins > 20:
            time.sleep(POLL_SLEEP_S)


def tag_of(tag: tuple) -> int:
    kind, layer, micro = tag
    return TAGS[kind] * 10_000_000 + layer * 10_000 + micro


class MPITransport:
    """Slots are ranks of ``comm`` (slot j = rank j of the replica's communicator).
    Arrays travel as contiguous buffers with their shape in a small header message."""

    def __init__(self, comm) -> None:
        self.comm = comm
        self.pending: list = []
        self.bytes = 0

    def send(self, src: int, dst: int, tag: tuple, array) -> None:
        data = np.ascontiguousarray(array)
        t = tag_of(tag)
        header = np.array([data.ndim, *data.shape, np.dtype(data.dtype).num], dtype=np.int64)
        self.pending.append((self.comm.Isend(header, dest=dst, tag=t), header))
        self.pending.append((self.comm.Isend(data, dest=dst, tag=t + 1), data))
        self.bytes += data.nbytes

    def recv(self, src: int, dst: int, tag: tuple):
        t = tag_of(tag)
        header = np.empty(8, dtype=np.int64)
        wait_buffer(self.comm.Irecv(header, source=src, tag=t))
        ndim = int(header[0])
        shape = tuple(int(v) for v in header[1:1 + ndim])
        dtype = _dtype_of(int(header[1 + ndim]))
        out = np.empty(shape, dtype=dtype)
        wait_buffer(self.comm.Irecv(out, source=src, tag=t + 1))
        return out

    def flush(self) -> None:
        for req, _buf in self.pending:
            wait_buffer(req)
        self.pending.clear()


def _dtype_of(num: int):
    for dt in (np.float32, np.float64, np.float16, np.int64, np.int32):
        if np.dtype(dt).num == num:
            return dt
    raise ValueError(f"unexpected dtype number {num}")
