"""A rank on a GPU host: which GPU it takes, how its NCCL communicator is made, and on
which stream each of its ops runs.  Pure functions of their inputs, with MPI's and NCCL's
modules passed in, so each is tested on fakes where there is no GPU (tests/test_gpu_*.py).

- Device: the rank's index among the job's ranks on its machine (MPI's shared-memory
  split, ``COMM_TYPE_SHARED``) modulo the GPUs the process sees (CUDA numbers the GPUs in
  ``CUDA_VISIBLE_DEVICES`` 0, 1, ...; CuPy counts only those).  Two ranks of a machine
  share a GPU only when asked: NCCL refuses two ranks of one communicator on one GPU.
- NCCL: rank 0 makes the unique id, MPI broadcasts it, every rank joins
  (``cupy.cuda.nccl``'s ``get_unique_id`` and ``NcclCommunicator(n, uid, rank)``).
- Streams: compute ops on the compute stream, transfers on a copy stream (the simulator
  flows transfers beside the compute, as copy engines and NCCL's kernels on their own
  stream do); an op waits for an event of each op it depends on that ran on the other
  stream of its rank, and for nothing else (the stream orders the rest).
"""
from __future__ import annotations

from typing import Any

COMPUTE, COPY = "compute", "copy"


def local_rank(comm, shared_type) -> tuple[int, int]:
    """(this rank's index, the ranks) among the job's ranks on this machine: ``comm`` split
    by shared memory (``shared_type`` = ``MPI.COMM_TYPE_SHARED``), keyed by world rank so
    local ranks follow the world's order."""
    node = comm.Split_type(shared_type, key=comm.Get_rank())
    try:
        return node.Get_rank(), node.Get_size()
    finally:
        node.Free()


def device_for(local: int, local_size: int, visible: int, share: bool = False) -> int:
    """The GPU (an index among the visible ones) of local rank ``local`` of ``local_size``:
    ``local mod visible``.  ValueError when no GPU is visible, or when the machine's ranks
    outnumber its GPUs and ``share`` was not asked for."""
    if visible < 1:
        raise ValueError("no GPU is visible (CUDA_VISIBLE_DEVICES, driver): run with --device cpu")
    if not 0 <= local < local_size:
        raise ValueError(f"local rank {local} is not one of {local_size}")
    if local_size > visible and not share:
        raise ValueError(f"{local_size} ranks on this machine but {visible} GPUs visible: "
                         "start at most one rank per GPU (two ranks never share one unless asked)")
    return local % visible


def use_local_gpu(cp, comm, shared_type, share: bool = False) -> int:
    """Makes this rank's GPU (``device_for`` its local rank) CuPy's current device and
    returns its index; ``cp`` is CuPy (its runtime counts the GPUs CUDA_VISIBLE_DEVICES
    leaves visible), ``comm`` the job's communicator.  ValueError as ``device_for``."""
    local, size = local_rank(comm, shared_type)
    device = device_for(local, size, cp.cuda.runtime.getDeviceCount(), share)
    cp.cuda.Device(device).use()
    return device


def physical_gpu(device: int, cuda_visible_devices: str | None) -> str:
    """The name CUDA_VISIBLE_DEVICES gives visible GPU ``device`` (an index or a UUID), for
    reports; the index itself where the variable is unset."""
    if cuda_visible_devices is None:
        return str(device)
    names = [n.strip() for n in cuda_visible_devices.split(",") if n.strip()]
    if not 0 <= device < len(names):
        raise ValueError(f"GPU {device} is not in CUDA_VISIBLE_DEVICES={cuda_visible_devices!r}")
    return names[device]


def nccl_communicator(comm, nccl) -> Any:
    """An NCCL communicator over ``comm``'s ranks (same size, same rank numbers), bootstrapped
    over MPI: rank 0's ``nccl.get_unique_id()``, broadcast; every rank then joins
    (``nccl.NcclCommunicator(size, uid, rank)``, collective: every rank of ``comm`` must
    call this).  Each rank's GPU must be current before the call."""
    uid = nccl.get_unique_id() if comm.Get_rank() == 0 else None
    uid = comm.bcast(uid, root=0)
    return nccl.NcclCommunicator(comm.Get_size(), uid, comm.Get_rank())


def stream_of(op) -> str:
    """A Plan op's stream: compute for ``fwd``/``bwd``, copy for a transfer."""
    return COPY if op.kind == "xfer" else COMPUTE


def runs_on(op, slot: int) -> bool:
    """Whether ``slot``'s rank issues ``op``: its own compute, or a transfer it sends or receives."""
    return op.slot == slot or (op.kind == "xfer" and op.dst == slot)


def stream_plan(ops, slot: int) -> dict[int, tuple[str, tuple[int, ...]]]:
    """For each op ``slot`` issues (Plan order): (its stream, the ops it waits on by event):
    the dependencies ``slot`` itself ran on the other stream.  A dependency on another
    slot's op is met by the message (NCCL pairs the send and the receive), one on the same
    stream by the stream's order."""
    mine = {op.id: op for op in ops if runs_on(op, slot)}
    out = {}
    for op in mine.values():
        stream = stream_of(op)
        out[op.id] = (stream, tuple(d for d in op.deps if d in mine and stream_of(mine[d]) != stream))
    return out


def copy_stream(xp):
    """The stream a rank's transfers run on (``stream_of`` an ``xfer``: COPY): a CuPy stream
    of its own beside the compute ops' current one; None for NumPy, which has no streams."""
    return xp.cuda.Stream(non_blocking=True) if hasattr(xp, "cuda") else None
