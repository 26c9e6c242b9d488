"""Device compute time: a roofline with an efficiency factor, and sharing of a device.

``op_seconds`` is the time an op takes with the device to itself: what calibration
measured for that op (``Device.op_costs``, by layer kind: a fixed cost plus FLOPs and
bytes at fitted rates) where it did, else a
fixed per-op overhead (kernel launch, dispatch) plus the larger of its FLOPs over the
achievable rate (peak for the dtype x efficiency) and its memory traffic over memory
bandwidth.  Ops that run at once on one device (a PS shard beside a worker slice on a
CPU machine, micro-batches of a pipeline) share it as a processor-sharing queue:
``Compute.run`` is a fluid job of that many work-seconds on a unit-capacity device.
Devices that name a core pool (ranks bound to the same cores of one host) share its
cores all the time, busy or not: a rank that waits polls (the executor's ranks yield
between polls, and the kernel's fair scheduler pays a polling rank back the time it
yielded: on mlp-digits' sync PS case, 3 ranks on 2 cores, worker 0's push waited 308 us
in one ``sched_yield`` while the shard on its core, done with the push after 48 us, polled
on), so each of n members of a pool of c cores runs at min(1, c / n) -- a closed
form, not processor sharing among the busy ones (a model where members take turns burst
by burst, each at full speed until it waits, put that case at 290 us a step against 525
for this one and 654 measured).  Waits longer than the executor's
yielding window (10 ms) sleep and give their share away; that is not modelled.  Costs
that calibration measured with all the job's ranks running (``allreduce``) already hold
the sharing and are not slowed again.  ``waiting`` says whether a device is idle on cores
of its own (a receiver that takes a message in as it comes; ``Engine._host_message``).
"""
from __future__ import annotations

import simpy

from sim.fluid import Fluid
from clustersim.core.topology import Topology

MEASURED_SHARED = frozenset({"allreduce"})     # op cost keys calibrated with every rank of the job running


def op_seconds(topology: Topology, device: str, flops: float, nbytes: float, dtype: str,
               backward: bool = False, key: str = "") -> float:
    dev = topology.devices[device]
    measured = dev.op_time(key, flops, nbytes) if key else None
    if measured is not None:
        return measured
    eff = dev.efficiency_at(flops, backward)
    return dev.op_overhead + max(flops / (dev.flops_per_s(dtype) * eff), nbytes / dev.memory_bw)


class Compute:
    """Processor sharing on every compute device; ``run`` returns an event that fires when the op is done."""

    def __init__(self, env: simpy.Environment, topology: Topology, dtype: str,
                 slowdown: dict[str, float] | None = None) -> None:
        self.topology, self.dtype = topology, dtype
        self.slowdown = slowdown or {}
        self.fluid = Fluid(env, {name: 1.0 for name, d in topology.devices.items() if d.is_compute})
        self.weights = {name: {name: 1} for name, d in topology.devices.items() if d.is_compute}
        self.share = pool_shares(topology)

    def _factor(self, device: str, key: str = "") -> float:
        """How much longer than alone on its device: a straggler's slowdown over its core share."""
        share = 1.0 if key in MEASURED_SHARED else self.share.get(device, 1.0)
        return self.slowdown.get(device, 1.0) / share

    def seconds(self, device: str, flops: float, nbytes: float, backward: bool = False, key: str = "") -> float:
        return op_seconds(self.topology, device, flops, nbytes, self.dtype, backward, key) * self._factor(device, key)

    def run(self, device: str, flops: float, nbytes: float, backward: bool = False, key: str = "") -> simpy.Event:
        return self.fluid.start(self.weights[device], self.seconds(device, flops, nbytes, backward, key))

    def waiting(self, device: str) -> bool:
        """Whether compute device ``device`` is idle now and has its cores to itself (a rank
        that shares a core polls only in its turn)."""
        return device in self.weights and not self.fluid.users.get(device) and self.share.get(device, 1.0) >= 1.0

    def run_seconds(self, device: str, seconds: float) -> simpy.Event:
        """A job of ``seconds`` of the device's time (a message's software overhead)."""
        return self.fluid.start(self.weights[device], seconds * self._factor(device))


def pool_shares(topology: Topology) -> dict[str, float]:
    """Device -> the share of a core it runs at: min(1, cores / members) of its pool."""
    members: dict[str, int] = {}
    for d in topology.devices.values():
        if d.core_pool:
            members[d.core_pool] = members.get(d.core_pool, 0) + 1
    return {name: min(1.0, topology.core_pools[d.core_pool] / members[d.core_pool])
            for name, d in topology.devices.items() if d.core_pool}
