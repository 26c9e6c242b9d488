"""How ranks are started on this host: the ``mpiexec`` to use and each rank's environment."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from clustersim.core.config import ConfigError

# glibc malloc: serve every array from the heap (no mmap) and never hand freed memory
# back, so a step's fresh arrays reuse pages already mapped.  Otherwise every large array
# is a new mapping whose page faults cost more than the GEMM that fills it (a 26 MB weight
# gradient: 11 ms instead of 2.7 ms on this host's VM), and by how much depends on the
# allocation history -- the executor would measure its allocator, not the model.
MALLOC = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40)}


def mpiexec() -> Path:
    """The venv's mpiexec (the mpich wheel), else one on PATH; ConfigError when none."""
    here = Path(sys.executable).parent / "mpiexec"
    if here.exists():
        return here
    found = shutil.which("mpiexec")
    if not found:
        raise ConfigError("mpiexec", "", "not found: install the mpich wheel (pip install mpich)")
    return Path(found)


def rank_env(ranks: int, cores: int | None = None) -> dict[str, str]:
    """Each rank's environment: its share of the cores as BLAS threads (OpenBLAS's default,
    one thread per core in every rank, makes 2 ranks on 2 cores run 100x slower once
    matrices are large) and the allocator settings above; the caller's own settings win."""
    env = dict(os.environ)
    threads = str(max(1, (cores or os.cpu_count() or 1) // ranks))
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, threads)
    for var, value in MALLOC.items():
        env.setdefault(var, value)
    return env


def cores_of(rank: int, ranks: int, cores: list[int]) -> list[int]:
    """The cores rank ``rank`` of ``ranks`` runs on: its own ``len(cores) // ranks`` of them
    while ranks fit, else core ``rank mod len(cores)`` (workers come first, then shards, so
    ranks beyond the cores pair with workers in that order)."""
    n = len(cores)
    if ranks <= n:
        k = n // ranks
        return cores[rank * k:(rank + 1) * k]
    return [cores[rank % n]]


def pin(rank: int, ranks: int) -> list[int]:
    """Binds this process to ``cores_of`` the cores it may use, as MPI launchers commonly
    bind ranks; returns them.  Unbound, a rank of mlp-digits migrated between this host's
    two cores now and then and lost its cache: one run in four or five took 20-50% longer
    a step (0.25-0.31 ms against 0.20 ms); bound, none did.  Bound ranks that share a core
    share it fairly even while one of them only polls (the kernel's EEVDF scheduler pays a
    polling rank back the time it yielded), which the simulator's core pools model."""
    mine = cores_of(rank, ranks, sorted(os.sched_getaffinity(0)))
    os.sched_setaffinity(0, mine)
    return mine
