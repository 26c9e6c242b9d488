"""Compute times an op once per distinct device description: the same seconds as
``op_seconds`` on every device, replicas' GPUs sharing one id, a differently described
device its own."""
import dataclasses
from types import SimpleNamespace

import pytest
import simpy

from clustersim.core.topogen import load_topology
from sim.compute import Compute, alike_devices, op_seconds


def test_alike_devices_share_an_id_and_a_different_one_gets_its_own():
    topo = load_topology("dgx-h100")
    ids = alike_devices(topo)
    gpus = topo.compute_devices()
    assert len({ids[g] for g in gpus}) == 1
    slow = dataclasses.replace(topo.devices[gpus[3]], op_overhead=1e-3)
    ids2 = alike_devices(SimpleNamespace(devices={**topo.devices, gpus[3]: slow}))   # only its devices are read
    assert ids2[gpus[3]] != ids2[gpus[0]] and ids2[gpus[1]] == ids2[gpus[0]]


@pytest.mark.parametrize("flops, nbytes", [(1e9, 1e6), (1e12, 1e9), (0.0, 4e6)])
def test_compute_seconds_are_op_seconds_on_every_device_with_its_straggler_factor(flops, nbytes):
    topo = load_topology("dgx-h100")
    gpus = topo.compute_devices()
    c = Compute(simpy.Environment(), topo, "fp16", slowdown={gpus[2]: 1.5})
    for g in gpus:
        want = op_seconds(topo, g, flops, nbytes, "fp16") * (1.5 if g == gpus[2] else 1.0)
        assert c.seconds(g, flops, nbytes) == pytest.approx(want, rel=1e-15)
    assert len(c.timed) == 1          # one description, one op: timed once
