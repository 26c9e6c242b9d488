"""NCCL as a replica's transport (``NcclTransport``, the interface of ``comm.MPITransport``)
and NCCL's allreduce of the replicas' gradients (``allreduce_sum``), for ranks on GPUs.
``nccl`` is ``cupy.cuda.nccl`` or a module with its calls (the tests' one runs on mpi4py);
``xp`` is the array module; neither is a global.

NCCL's point-to-point calls carry no tag: a pair's sends and receives match in the order
each side issues them, and a send waits on its stream until the peer's receive runs.  Every
rank therefore issues its sends and receives in one order every rank can compute from the
Plan: by where the receiver takes the message in ``run_step``'s walk (``receive_order``).
A send made earlier waits in the transport until the messages before it in that order
are issued; consecutive ones go out in one ``groupStart``/``groupEnd``, so a pair's
crossing messages run together (docs/decisions/027).
"""
from __future__ import annotations

from types import ModuleType

import numpy as np

from clustersim.core.config import ConfigError
from executor.partitioned import skipped, tag_of, waits_for_messages

# NumPy's dtype name -> cupy.cuda.nccl's constant for it (NCCL has no bool or complex type)
NCCL_TYPES = {"float16": "NCCL_FLOAT16", "float32": "NCCL_FLOAT32", "float64": "NCCL_FLOAT64",
              "int8": "NCCL_INT8", "uint8": "NCCL_UINT8", "int32": "NCCL_INT32", "uint32": "NCCL_UINT32",
              "int64": "NCCL_INT64", "uint64": "NCCL_UINT64"}


def nccl_or_none() -> ModuleType | None:
    """``cupy.cuda.nccl`` when it imports and a GPU is visible, else None."""
    from executor.backend import cupy_or_none
    if cupy_or_none() is None:
        return None
    try:
        from cupy.cuda import nccl
        nccl.get_version()
        return nccl
    except Exception:          # CuPy built without NCCL, or libnccl missing: no NCCL here
        return None


def choose_transport(requested: str, device: str, have_nccl: bool, algorithm: str = "sync",
                     fail: bool = False) -> str:
    """``mpi`` or ``nccl`` for a job's replicas (the parameter server's messages stay on MPI
    either way): ``auto`` is nccl on GPUs where ``cupy.cuda.nccl`` works, for a job NCCL can
    run; ConfigError for ``nccl`` where it cannot."""
    if requested not in ("auto", "nccl", "mpi"):
        raise ConfigError("--transport", requested, "must be auto, nccl or mpi")
    why = ("needs --device gpu" if device != "gpu" else
           "needs CuPy with NCCL and a visible GPU (pip install 'clustersim[gpu]')" if not have_nccl else
           "does not carry sandblaster's replicas, which talk through MPI" if algorithm == "sandblaster" else
           "cannot go on past a crashed rank (--fail): NCCL would wait for it forever" if fail else "")
    if requested == "nccl" and why:
        raise ConfigError("--transport", requested, f"{why}; use --transport mpi")
    return "mpi" if requested == "mpi" or why else "nccl"


def nccl_type(nccl, dtype) -> int:
    """NCCL's constant for ``dtype``; ValueError for a type NCCL cannot carry."""
    name = np.dtype(dtype).name
    if name not in NCCL_TYPES:
        raise ValueError(f"NCCL carries no {name} arrays")
    return getattr(nccl, NCCL_TYPES[name])


def address(array) -> int:
    """The device (CuPy) or host (NumPy) address of ``array``'s first element."""
    return array.data.ptr if hasattr(array.data, "ptr") else array.ctypes.data


def receive_order(ops, slot: int, backward: bool = True) -> list[tuple[int, int]]:
    """(key, transfer id) of each message ``slot`` receives, in the order ``run_step`` takes
    them: the transfers an op of the slot depends on, op by op in Plan order and in each
    op's order of dependencies; then the ones no op waits for, in Plan order.  The key
    (position of the op taking it, index among its dependencies) orders every rank's
    messages in one order."""
    def sends_in_order(op) -> bool:     # run_step's in-order send: it takes its received pieces first
        return op.kind == "xfer" and op.slot == slot and waits_for_messages(ops, op)

    out, taken = [], set()
    for op in ops:
        if skipped(op, backward) or not (sends_in_order(op) or (op.kind != "xfer" and op.slot == slot)):
            continue
        for n, d in enumerate(op.deps):
            if ops[d].kind == "xfer" and d not in taken and not skipped(ops[d], backward):
                taken.add(d)
                out.append(((op.id, n), d))
    rest = [op.id for op in ops if op.kind == "xfer" and op.dst == slot and op.id not in taken
            and not skipped(op, backward)]
    return out + [((len(ops) + d, 0), d) for d in rest]


def issue_order(ops, slot: int, backward: bool = True) -> list[int]:
    """The transfers ``slot`` sends or receives, in the one order every rank issues them
    (``receive_order``'s key of the transfer at its receiver)."""
    dsts = {op.dst for op in ops if op.kind == "xfer" and op.slot == slot and not skipped(op, backward)}
    keyed = [(key, d) for dst in dsts for key, d in receive_order(ops, dst, backward) if ops[d].slot == slot]
    keyed += receive_order(ops, slot, backward)
    return [d for _, d in sorted(keyed)]


class NcclTransport:
    """A replica's messages over NCCL: slot j is rank j of ``comm``, an NCCL communicator
    (``gpu.nccl_communicator`` over the replica's MPI communicator).  ``ops`` is the Plan's
    op list, ``backward`` False for a forward-only pass (its messages differ).  Operations
    run on ``stream`` (CuPy; None with NumPy), which waits by event for the compute stream
    that made a sent array, and which the compute stream waits for before it reads a
    received one.  Each sent array is copied at once: ``run_step`` goes on adding into
    the buffers it sends from."""

    def __init__(self, ops, slot: int, comm, nccl, xp=np, stream=None, backward: bool = True) -> None:
        self.comm, self.nccl, self.xp, self.stream = comm, nccl, xp, stream
        self.order = issue_order(ops, slot, backward)
        self.tags = {(op.slot, op.dst, tag_of(op)): op.id for op in ops           # a skipped op's tag may be a
                     if op.kind == "xfer" and not skipped(op, backward)}         # sent one's (recompute's)
        self.peer = {op.id: (op.dst if op.slot == slot else op.slot) for op in ops if op.kind == "xfer"}
        self.sending = {op.id for op in ops if op.kind == "xfer" and op.slot == slot}
        self.ready: dict[int, object] = {}      # transfer -> the array to send, or the buffer to receive into
        self.issued = 0                         # how many of ``order`` have been issued this step
        self.in_flight: list = []               # arrays NCCL may still read or write until the step's end
        self.bytes = 0

    def send(self, src: int, dst: int, tag: tuple, array) -> None:
        self.ready[self.tags[(src, dst, tag)]] = self.xp.array(array, copy=True, order="C")
        self.bytes += array.nbytes
        self._issue()

    def recv(self, src: int, dst: int, tag: tuple, shape: tuple, dtype):
        op = self.tags[(src, dst, tag)]
        out = self.xp.empty(shape, dtype=dtype)
        self.ready[op] = out
        self._issue()
        if op in self.ready:
            raise RuntimeError(f"message {tag} from slot {src} asked for before the messages ordered ahead of it "
                               f"(issue_order disagrees with run_step)")
        follow(self._compute(), self.stream)
        return out

    def flush(self) -> None:
        """Issues what is left of the step's messages and waits for them and for the compute
        queued so far (the buffers are then free, and the step's time ends with its work);
        every transfer of the order must have been sent or asked for."""
        self._issue()
        if self.issued != len(self.order):
            missing = self.order[self.issued]
            raise RuntimeError(f"transfer {missing} with slot {self.peer[missing]} was never "
                               f"{'sent' if missing in self.sending else 'received'} this step")
        if self.stream is not None:
            self.stream.synchronize()
            self._compute().synchronize()
        self.in_flight.clear()
        self.issued = 0

    def _issue(self) -> None:
        """Issues the messages next in the order that are ready, as one NCCL group."""
        run = []
        while self.issued < len(self.order) and self.order[self.issued] in self.ready:
            run.append(self.order[self.issued])
            self.issued += 1
        if not run:
            return
        follow(self.stream, self._compute())    # the sent copies made, the buffers' old readers done
        stream = 0 if self.stream is None else self.stream.ptr
        if len(run) > 1:
            self.nccl.groupStart()
        for op in run:
            array = self.ready.pop(op)
            call = self.comm.send if op in self.sending else self.comm.recv
            call(address(array), array.size, nccl_type(self.nccl, array.dtype), self.peer[op], stream)
            self.in_flight.append(array)
        if len(run) > 1:
            self.nccl.groupEnd()

    def _compute(self):
        """The stream compute runs on (CuPy's current one), or None without streams."""
        return self.xp.cuda.get_current_stream() if self.stream is not None else None


def follow(waiter, leader) -> None:
    """CuPy stream ``waiter`` waits for the work ``leader`` has queued so far (no-op without streams)."""
    if waiter is not None:
        waiter.wait_event(leader.record())


def allreduce_sum(comm, nccl, array, xp=np, stream=None) -> None:
    """Sums ``array`` (contiguous) over ``comm``'s ranks in place with NCCL's allreduce, on
    ``stream`` (CuPy; None with NumPy): queued after the compute stream's work, which then
    waits for it."""
    compute = xp.cuda.get_current_stream() if stream is not None else None
    follow(stream, compute)
    ptr = address(array)
    comm.allReduce(ptr, ptr, array.size, nccl_type(nccl, array.dtype), nccl.NCCL_SUM,
                   0 if stream is None else stream.ptr)
    follow(compute, stream)
