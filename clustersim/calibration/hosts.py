"""Calibration across GPU hosts: ``mpiexec -n H -ppn 1 clustersim calibrate --gpu`` (one
rank per host) -> one topology of all H machines.

Each host calibrates its own GPUs (``calibrate.gpu``); rank 0 then times a ping-pong of one
buffer with each other host in turn (the others wait), one way = half the round trip,
fitted to alpha + bytes / beta by size.  On GPU hosts the buffer lives on the first GPU and
travels by NCCL send/recv, the path NCCL's collectives take between hosts (GPUDirect RDMA
where the host has it); with the NumPy backend it is host memory over MPI (the tests).

The topology: host i's devices as ``gpu_topology_text`` writes one machine, named
``h{i}.``, its PCIe switch joined to a NIC ``h{i}.nic`` at its host <-> device rate, each NIC
to one network switch ``net``.  Host i's NIC link carries the fit of the pair (0, i): its
rate, and its latency less the PCIe hops the route also crosses; host 0's NIC link takes
the fastest pair's rate and no latency, so the route from h0.gpu0 to hi.gpu0 has exactly
the pair's fit (unless PCIe is slower, or the pair's alpha is below the two PCIe hops': a
copy's alpha includes its launch, so the route keeps the hops').  Pairs without host 0 are
not measured: their route adds both hosts' NIC links.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

from clustersim.calibration.gpu import COPY_SIZES, gpu_topology_text, host_bus
from clustersim.calibration.host import fit_alpha_beta

PING_REPEATS = 9


def ping_pong(comm, buffer: Callable[[int], Any], send: Callable[[Any, int], None],
              recv: Callable[[Any, int], None], sync: Callable[[], None],
              sizes: list[int] = COPY_SIZES, repeats: int = PING_REPEATS) -> dict[int, dict]:
    """On rank 0: {host i: one-way seconds by size ``samples`` and their alpha-beta fit} for
    every other rank i; other ranks return {}.  Collective: every rank of ``comm`` calls it.
    ``buffer(n)`` gives an n-byte buffer, ``send``/``recv`` move it to/from a rank, ``sync``
    waits for them (a GPU's stream)."""
    rank, size = comm.Get_rank(), comm.Get_size()
    out: dict[int, dict] = {}
    for peer in range(1, size):
        samples = []
        for n in sizes:
            buf = buffer(n)
            times = []
            for k in range(repeats + 1):             # the first round trip is a warm-up
                comm.Barrier()
                if rank == 0:
                    t = time.perf_counter()
                    send(buf, peer)
                    recv(buf, peer)
                    sync()
                    times.append(time.perf_counter() - t)
                elif rank == peer:
                    recv(buf, 0)
                    send(buf, 0)
                    sync()
            if rank == 0:
                samples.append([n, statistics.median(times[1:]) / 2])
        if rank == 0:
            out[peer] = {"samples": samples, **fit_alpha_beta([s[0] for s in samples], [s[1] for s in samples])}
    return out


def _renamed(text: str, prefix: str, machine: int) -> list[str]:
    """One host's device and link tables from ``gpu_topology_text``, names prefixed and on
    machine ``machine`` (its name and description lines dropped)."""
    out = []
    for line in text.splitlines()[2:]:
        key = line.split(" = ")[0] if " = " in line else ""
        if key in ("name", "a", "b"):
            line = f'{key} = "{prefix}{line.split(" = ", 1)[1].strip(chr(34))}"'
        elif key == "machine":
            line = f"machine = {machine}"
        out.append(line)
    return out


def hosts_topology_text(name: str, results: list[dict], pairs: dict[int, dict]) -> str:
    """``results[i]``: host i's ``calibrate_gpus``; ``pairs[i]``: ``ping_pong``'s fit of
    hosts 0 and i.  The machines as one topology file (see the module)."""
    if len(results) < 2 or sorted(pairs) != list(range(1, len(results))):
        raise ValueError(f"{len(results)} hosts need the pairs (0, i) for i = 1..{len(results) - 1}")
    lines = [f'name = "{name}"',
             f'description = "calibrated on {len(results)} hosts: '
             + "; ".join(f"host 0 <-> {i} alpha {f['alpha_s'] * 1e6:.2f} us, beta {f['beta_bytes_per_s'] / 1e9:.3g} GB/s"
                         for i, f in sorted(pairs.items())) + '"',
             "", "[[device]]", 'name = "net"', 'kind = "switch"']
    fastest = max(f["beta_bytes_per_s"] for f in pairs.values())
    hop0 = host_bus(results[0])[1] / 2            # each of the two PCIe hops carries half
    for i, res in enumerate(results):
        p = f"h{i}."
        bus, alpha = host_bus(res)
        hop = alpha / 2
        lines += ["", *_renamed(gpu_topology_text(name, res), p, i),
                  "", "[[device]]", f'name = "{p}nic"', 'kind = "nic"', f"machine = {i}",
                  "", "[[link]]", f'a = "{p}pcie"', f'b = "{p}nic"', f"bandwidth_gbps = {bus / 1e9:.6g}", "latency_us = 0"]
        rate, latency = (fastest, 0.0) if i == 0 else (pairs[i]["beta_bytes_per_s"],
                                                       max(0.0, pairs[i]["alpha_s"] - hop0 - hop))
        lines += ["", "[[link]]", f'a = "{p}nic"', 'b = "net"', f"bandwidth_gbps = {rate / 1e9:.6g}",
                  f"latency_us = {latency * 1e6:.6g}"]
    return "\n".join(lines) + "\n"


def nccl_exchange(cp, comm) -> tuple[Callable, Callable, Callable, Callable]:
    """``ping_pong``'s (buffer, send, recv, sync) on GPU hosts: buffers on this rank's GPU 0,
    moved by NCCL send/recv over one communicator of all ranks (bootstrapped over MPI)."""
    from cupy.cuda import nccl

    from executor.gpu import nccl_communicator
    cp.cuda.Device(0).use()
    nc = nccl_communicator(comm, nccl)
    stream = cp.cuda.get_current_stream()
    return (lambda n: cp.ones(n, cp.uint8),
            lambda b, peer: nc.send(b.data.ptr, b.size, nccl.NCCL_UINT8, peer, stream.ptr),
            lambda b, peer: nc.recv(b.data.ptr, b.size, nccl.NCCL_UINT8, peer, stream.ptr),
            stream.synchronize)


def calibrate_hosts(comm, measure: Callable[[], dict], exchange: tuple) -> tuple[list[dict], dict[int, dict]] | None:
    """Every rank (one per host) measures its own GPUs (``measure``: ``calibrate_gpus`` on its
    backend), then rank 0 times the pairs (``ping_pong`` with ``exchange``); rank 0 gets
    (each host's result, the pairs' fits), the others None."""
    results = comm.gather(measure(), root=0)
    pairs = ping_pong(comm, *exchange)
    return (results, pairs) if comm.Get_rank() == 0 else None


def launched_ranks(environ) -> int:
    """The ranks ``mpiexec`` started this process among (MPICH's Hydra: ``PMI_SIZE``; Open
    MPI: ``OMPI_COMM_WORLD_SIZE``), 1 outside ``mpiexec``; read from the environment so that
    a plain run never starts MPI."""
    for key in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        value = environ.get(key, "")
        if value.isdigit():
            return int(value)
    return 1
