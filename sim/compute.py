"""Device compute time: a roofline with an efficiency factor, and sharing of a device.

``op_seconds`` is the time an op takes with the device to itself: what calibration
measured for that op (``Device.op_costs``, by layer kind: a fixed cost plus FLOPs and
bytes at fitted rates) where it did, else a
fixed per-op overhead (kernel launch, dispatch) plus the larger of its FLOPs over the
achievable rate (peak for the dtype x efficiency) and its memory traffic over memory
bandwidth.  Ops that run at once on one device (a PS shard beside a worker slice on a
CPU machine, micro-batches of a pipeline) share it as a processor-sharing queue:
``Compute.run`` is a fluid job of that many work-seconds on a unit-capacity device.
Devices that name a core pool (ranks of one host) also share its cores: with more of
them busy than the pool has cores, each runs at cores / busy.
"""
from __future__ import annotations

import simpy

from .fluid import Fluid
from .topology import Topology


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
        capacity = {name: 1.0 for name, d in topology.devices.items() if d.is_compute}
        capacity.update({("pool", name): float(cores) for name, cores in topology.core_pools.items()})
        self.fluid = Fluid(env, capacity)
        self.weights = {name: {name: 1, ("pool", d.core_pool): 1} if d.core_pool else {name: 1}
                        for name, d in topology.devices.items() if d.is_compute}

    def seconds(self, device: str, flops: float, nbytes: float, backward: bool = False, key: str = "") -> float:
        return (op_seconds(self.topology, device, flops, nbytes, self.dtype, backward, key)
                * self.slowdown.get(device, 1.0))

    def run(self, device: str, flops: float, nbytes: float, backward: bool = False, key: str = "") -> simpy.Event:
        return self.fluid.start(self.weights[device], self.seconds(device, flops, nbytes, backward, key))

    def run_seconds(self, device: str, seconds: float) -> simpy.Event:
        """A job of ``seconds`` of the device's time (a message's software overhead)."""
        return self.fluid.start(self.weights[device], seconds * self.slowdown.get(device, 1.0))
