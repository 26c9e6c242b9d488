"""Device compute time: a roofline with an efficiency factor, and sharing of a device.

``op_seconds`` is an op's time with the device to itself: calibration's measured cost for
its key (``Device.op_costs``: a fixed cost plus FLOPs and bytes at fitted rates) where
there is one, else a fixed per-op overhead plus the larger of its FLOPs over the
achievable rate (dtype peak x efficiency) and its bytes over the achievable memory
bandwidth.  On a GPU described by its public figures (compute capability and SMs given, no
calibrated curve), an op whose ``LayerWork`` the caller knows runs as its kernels do
(``sim.kernel_model``): tile- and wave-quantized GEMMs, the passes over memory a layer
kind's kernels make (see docs/decisions/018-kernels-by-layer-kind.md).

A GPU runs one kernel at a time (``runs_in_order``): ops given to it queue and start one
after the other, first come first served; the engine hands it a step's ops in the Plan's
order (see docs/decisions/010-gpu-runs-its-ops-in-order.md).  On a CPU, or a device with
calibrated costs (host ranks), ops that run at once share it as a processor-sharing queue
(a fluid job on a unit-capacity device).  Devices in a core pool (ranks bound to the same cores)
share it busy or polling, since a polling rank keeps its share: each of n members of a
pool of c cores runs at min(1, c / n) all the time (a wait past the executor's yielding
window, which sleeps, is not modelled).  Costs measured with every rank running
(``MEASURED_SHARED``) are not slowed again.  ``waiting``: idle on cores of its own
(``Engine._host_message``).  See docs/decisions/003-core-pool-shares.md.
"""
from __future__ import annotations

import dataclasses
from collections import deque

import simpy

from sim import kernel_model
from sim.fluid import Fluid
from clustersim.core.scenario import DTYPE_BYTES
from clustersim.core.topology import Device, Topology

MEASURED_SHARED = frozenset({"allreduce"})     # op cost keys calibrated with every rank of the job running


def op_seconds(topology: Topology, device: str, flops: float, nbytes: float, dtype: str,
               backward: bool = False, key: str = "", work: kernel_model.LayerWork | None = None) -> float:
    dev = topology.devices[device]
    measured = dev.op_time(key, flops, nbytes) if key else None
    if measured is not None:
        return measured
    if work is not None and kernels_modelled(dev):
        return kernel_model.work_seconds(dev, dtype, DTYPE_BYTES[dtype], work, backward, flops, nbytes)
    eff = dev.efficiency_at(flops, backward)
    return dev.op_overhead + max(flops / (dev.flops_per_s(dtype) * eff), nbytes / dev.achievable_bw)


def kernels_modelled(device: Device) -> bool:
    """Whether ``device`` is a GPU described by public figures (compute capability and SMs),
    whose ops ``sim.kernel_model`` refines; a test device without them, or one whose
    efficiency calibration measured, keeps the plain roofline."""
    return (device.kind == "gpu" and device.compute_capability > 0 and device.sms > 0
            and not device.efficiency_curve)


def alike_devices(topology: Topology) -> dict[str, int]:
    """Each compute device's id among the distinct descriptions (every field but its name
    and machine): ``op_seconds`` of the same op is the same on devices with one id, so a
    step's ops are timed once for all the replicas that repeat them."""
    ids: dict[str, int] = {}
    return {name: ids.setdefault(repr(dataclasses.replace(d, name="", machine=None)), len(ids))
            for name, d in topology.devices.items() if d.is_compute}


def runs_in_order(device: Device) -> bool:
    """Whether ``device`` runs one op at a time: a GPU (one stream of kernels), unless its
    costs were calibrated as a host rank's (``op_costs``, ``op_curves``, a core pool)."""
    return device.kind == "gpu" and not (device.op_costs or device.op_curves or device.core_pool)


class Compute:
    """Every compute device: one op at a time on a GPU (``runs_in_order``), processor sharing
    elsewhere.  ``run`` returns an event that fires when the op is done, with the time the
    op started where it waited its turn (None: it started when it was given)."""

    def __init__(self, env: simpy.Environment, topology: Topology, dtype: str,
                 slowdown: dict[str, float] | None = None, shortcut: bool = True) -> None:
        self.env, self.topology, self.dtype = env, topology, dtype
        self.slowdown = slowdown or {}
        self.fluid = Fluid(env, {name: 1.0 for name, d in topology.devices.items() if d.is_compute}, shortcut)
        self.weights = {name: {name: 1} for name, d in topology.devices.items() if d.is_compute}
        self.share = pool_shares(topology)
        self.queues: dict[str, deque] = {name: deque() for name, d in topology.devices.items()
                                         if d.is_compute and runs_in_order(d)}
        self.busy: set[str] = set()        # in-order devices running an op now
        self.held: dict[str, list[float]] = {}   # GPU -> shares collectives' kernels take now
        self.alike = alike_devices(topology)    # device -> id shared by devices described alike
        self.timed: dict[tuple, float] = {}     # (alike id, op) -> op_seconds: replicas repeat ops

    def in_order(self, device: str) -> bool:
        return device in self.queues

    def _factor(self, device: str, key: str = "") -> float:
        """How much longer than alone on its device: a straggler's slowdown over its core share."""
        share = 1.0 if key in MEASURED_SHARED else self.share.get(device, 1.0)
        return self.slowdown.get(device, 1.0) / share

    def seconds(self, device: str, flops: float, nbytes: float, backward: bool = False, key: str = "",
                work: kernel_model.LayerWork | None = None) -> float:
        memo = (self.alike.get(device, device), flops, nbytes, backward, key, work)
        alone = self.timed.get(memo)
        if alone is None:
            alone = self.timed[memo] = op_seconds(self.topology, device, flops, nbytes, self.dtype, backward, key, work)
        return alone * self._factor(device, key)

    def run(self, device: str, flops: float, nbytes: float, backward: bool = False, key: str = "",
            work: kernel_model.LayerWork | None = None) -> simpy.Event:
        """``work``: what the op computes (``kernel_model.op_work``), where the caller knows it."""
        return self._start(device, self.seconds(device, flops, nbytes, backward, key, work))

    def _start(self, device: str, seconds: float) -> simpy.Event:
        if device not in self.queues:
            return self.fluid.start(self.weights[device], seconds)
        done = self.env.event()
        self.queues[device].append((seconds, done))
        if device not in self.busy:
            self._next(device)
        return done

    def _next(self, device: str) -> None:
        """Starts the op first in ``device``'s queue, if any."""
        queue = self.queues[device]
        if not queue:
            self.busy.discard(device)
            return
        self.busy.add(device)
        seconds, done = queue.popleft()
        start = self.env.now

        def finished(_e) -> None:
            self._next(device)
            done.succeed(start)
        self.fluid.start(self.weights[device], seconds).callbacks.append(finished)

    def hold(self, devices, share: float):
        """A collective's kernel takes ``share`` of every in-order GPU of ``devices`` until the
        returned ``release()``: what runs beside it runs on the rest (NCCL's channels are
        thread blocks on the GPU's SMs; ``clustersim.core.nccl.sm_share``)."""
        held = [d for d in devices if d in self.queues] if share > 0 else []
        for d in held:
            self.held.setdefault(d, []).append(share)
            self._capacity(d)

        def release() -> None:
            for d in held:
                self.held[d].remove(share)
                self._capacity(d)
        return release

    def _capacity(self, device: str) -> None:
        sms = self.topology.devices[device].sms or 1
        taken = sum(self.held.get(device, ()))
        self.fluid.set_capacity(device, max(1.0 - taken, 1.0 / sms) if taken else 1.0)

    def waiting(self, device: str) -> bool:
        """Whether compute device ``device`` is idle now and has its cores to itself (a rank
        that shares a core polls only in its turn)."""
        return device in self.weights and not self.fluid.users.get(device) and self.share.get(device, 1.0) >= 1.0

    def run_seconds(self, device: str, seconds: float) -> simpy.Event:
        """A job of ``seconds`` of the device's time (a message's software overhead)."""
        return self._start(device, seconds * self._factor(device))


def pool_shares(topology: Topology) -> dict[str, float]:
    """Device -> the share of a core it runs at: min(1, cores / members) of its pool."""
    members: dict[str, int] = {}
    for d in topology.devices.values():
        if d.core_pool:
            members[d.core_pool] = members.get(d.core_pool, 0) + 1
    return {name: min(1.0, topology.core_pools[d.core_pool] / members[d.core_pool])
            for name, d in topology.devices.items() if d.core_pool}
