"""Device compute time: a roofline with an efficiency factor, and sharing of a device.

``op_seconds`` is the time an op takes with the device to itself: a fixed per-op
overhead (kernel launch, dispatch) plus the larger of its FLOPs over the achievable rate
(peak for the dtype x efficiency) and its memory traffic over memory bandwidth.  Ops that run at once on one device (a PS shard beside a worker
slice on a CPU machine, micro-batches of a pipeline) share it as a processor-sharing
queue: ``Compute.run`` is a fluid job of that many work-seconds on a unit-capacity device.
"""
from __future__ import annotations

import simpy

from .fluid import Fluid
from .topology import Topology


def op_seconds(topology: Topology, device: str, flops: float, nbytes: float, dtype: str,
               backward: bool = False) -> float:
    dev = topology.devices[device]
    eff = dev.efficiency_at(flops, backward)
    return dev.op_overhead + max(flops / (dev.flops_per_s(dtype) * eff), nbytes / dev.memory_bw)


class Compute:
    """Processor sharing on every compute device; ``run`` returns an event that fires when the op is done."""

    def __init__(self, env: simpy.Environment, topology: Topology, dtype: str,
                 slowdown: dict[str, float] | None = None) -> None:
        self.topology, self.dtype = topology, dtype
        self.slowdown = slowdown or {}
        self.fluid = Fluid(env, {name: 1.0 for name, d in topology.devices.items() if d.is_compute})

    def seconds(self, device: str, flops: float, nbytes: float, backward: bool = False) -> float:
        return op_seconds(self.topology, device, flops, nbytes, self.dtype, backward) * self.slowdown.get(device, 1.0)

    def run(self, device: str, flops: float, nbytes: float, backward: bool = False) -> simpy.Event:
        return self.fluid.start({device: 1}, self.seconds(device, flops, nbytes, backward))
