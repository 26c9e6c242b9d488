"""The array module: ``xp`` is NumPy or CuPy, chosen from the data, never a global flag."""
from __future__ import annotations

from types import ModuleType

import numpy


def cupy_or_none() -> ModuleType | None:
    """CuPy when it imports and sees a GPU, else None."""
    try:
        import cupy
        cupy.cuda.runtime.getDeviceCount()
        return cupy
    except Exception:          # no module, no driver, no device: all mean "no GPU here"
        return None


def get_xp(device: str = "cpu", comm=None) -> ModuleType:
    """``numpy`` for device "cpu"; ``cupy`` for "gpu" (ValueError when it is not usable),
    with this rank's own GPU made current (``executor.gpu.use_local_gpu``: its local rank
    among ``comm``'s ranks on this machine, MPI's world by default)."""
    if device == "cpu":
        return numpy
    cp = cupy_or_none()
    if cp is None:
        raise ValueError("device gpu needs CuPy and a visible GPU (pip install 'clustersim[gpu]')")
    from mpi4py import MPI

    from executor.gpu import use_local_gpu
    use_local_gpu(cp, comm if comm is not None else MPI.COMM_WORLD, MPI.COMM_TYPE_SHARED)
    return cp


def to_numpy(x):
    return x.get() if hasattr(x, "get") and not isinstance(x, numpy.ndarray) else numpy.asarray(x)


def device_sync(xp, streams: str = "all"):
    """A call that waits for the work queued on this rank's GPU, so that a clock read after
    it times the work, not its queueing: every stream of the current device (``"all"``), or
    the compute stream alone (``"compute"``: NCCL's copy stream goes on beside it, as the
    simulator's transfers do beside compute); a no-op for NumPy, whose calls return when
    their work is done."""
    if xp is numpy:
        return lambda: None
    if streams == "compute":
        return lambda: xp.cuda.get_current_stream().synchronize()
    return lambda: xp.cuda.Device().synchronize()
