"""A machine's per-message software cost stated in a cluster file (``[machine.cpu]
op_costs``, send and recv; docs/decisions/025): parsed onto every machine's CPU, refused
with the file and field named, and charged by the engine around the wire in closed form."""
import dataclasses

import pytest

from clustersim.cli import main
from clustersim.core.config import ConfigError
from clustersim.core.plan import plan
from clustersim.core.topogen import build_topology
from helpers import dump_toml, scenario

SEND_US, RECV_US = 15.0, 20.0            # per message; the send side also 1 GB/s of bytes
NIC_BW, NET_BW = 0.125e9, 0.125e9        # bytes/s
NIC_US, NET_US, PCIE_US = 25.0, 5.0, 1.0


def two_machines(costs=None) -> dict:
    """Two single-CPU machines on one switch, each with one 1 GbE NIC (distbelief-2012's shape)."""
    cpu = {"cores": 2, "core_gflops": 10, "memory_gib": 4, "memory_bandwidth_gbps": 10}
    if costs is not None:
        cpu["op_costs"] = costs
    return {"name": "two", "machine": {"cpu": cpu, "nic": {"count": 1, "bandwidth_gbps": NIC_BW / 1e9,
                                                            "latency_us": NIC_US}},
            "network": {"kind": "switch", "machines": 2, "bandwidth_gbps": NET_BW / 1e9, "latency_us": NET_US}}


def engine(costs):
    from sim.engine import Engine
    topo = build_topology(two_machines(costs), "two.toml")
    return Engine(plan(dataclasses.replace(scenario(batch=8), topology=topo), check_memory=False))


def wire(nbytes: float) -> float:
    """cpu > nic (PCIe + the NIC's own delay) > switch > nic > cpu, at the 1 GbE bottleneck."""
    return 2 * (PCIE_US + NIC_US + NET_US) * 1e-6 + nbytes / min(NIC_BW, NET_BW)


COSTS = {"send": [SEND_US, 0, 1.0], "recv": [RECV_US, 0, 0]}


def test_every_key_the_simulator_asks_for_is_accepted():
    from clustersim.core.topogen import _cost_key
    assert all(_cost_key(k) for k in ("send", "recv.reduction", "step", "update", "dense.backward.split", "conv2d"))


def test_the_cost_reaches_every_machines_cpu_and_only_send_and_recv():
    topo = build_topology(two_machines(COSTS), "two.toml")
    for cpu in ("m0.cpu", "m1.cpu"):
        dev = topo.devices[cpu]
        assert dev.op_time("send", 0.0, 1e6) == pytest.approx(SEND_US * 1e-6 + 1e6 / 1e9)
        assert dev.op_time("recv", 0.0, 1e6) == pytest.approx(RECV_US * 1e-6)
        assert dev.op_time("dense", 1e9, 1e6) is None              # compute keeps the roofline
    assert build_topology(two_machines(), "two.toml").devices["m0.cpu"].op_costs == {}


@pytest.mark.parametrize("costs, field", [
    ({"send": [15, 0]}, "machine.cpu.op_costs.send"),
    ({"recv": [-1, 0, 0]}, "machine.cpu.op_costs.recv"),
    ({"send": [15, 0, True]}, "machine.cpu.op_costs.send"),
    ({"send": [float("inf"), 0, 0]}, "machine.cpu.op_costs.send"),
    ({"sned": [15, 0, 0]}, "machine.cpu.op_costs.sned"),
    ({"dense.forward": [1, 0, 0]}, "machine.cpu.op_costs.dense.forward"),
    ([15, 0, 0], "machine.cpu.op_costs")])
def test_a_bad_cost_names_the_file_and_field(costs, field):
    with pytest.raises(ConfigError) as err:
        build_topology(two_machines(costs), "two.toml")
    assert err.value.file == "two.toml" and err.value.field == field


def test_the_command_refuses_a_bad_cost_in_one_line_with_exit_2(tmp_path, capsys):
    f = tmp_path / "bad.toml"
    f.write_text(dump_toml(two_machines({"send": ["fast", 0, 0]})))
    code = main(["topology", "show", str(f)])
    _, err = capsys.readouterr()
    assert code == 2 and str(f) in err and "machine.cpu.op_costs.send" in err and err.count("\n") == 1
    assert "Traceback" not in err


def test_a_message_to_a_busy_host_rank_pays_send_wire_and_receive():
    eng, n = engine(COSTS), 1e6
    eng.compute.run_seconds("m1.cpu", 1.0)                        # m1 computes all along
    done = eng.transfer("m0.cpu", "m1.cpu", n, 0, 0, "m", "activation")
    eng.env.run(done)
    send = SEND_US * 1e-6 + n / 1e9
    recv = 2 * RECV_US * 1e-6                                      # beside m1's work, at half its speed
    assert eng.env.now == pytest.approx(send + wire(n) + recv, rel=1e-9)


def test_a_message_to_a_waiting_host_rank_pays_the_longer_of_send_and_wire():
    eng = engine({"send": [100.0, 0, 0], "recv": [RECV_US, 0, 0]})
    for n, longer in ((100.0, 100e-6), (1e6, wire(1e6))):          # the send cost, then the wire
        start = eng.env.now
        eng.env.run(eng.transfer("m0.cpu", "m1.cpu", n, 0, 0, "m", "activation"))
        assert eng.env.now - start == pytest.approx(longer, rel=1e-9)
    assert wire(100.0) < 100e-6 < wire(1e6)


def test_without_stated_costs_a_message_is_the_wire_alone():
    eng, n = engine(None), 1e6
    eng.env.run(eng.transfer("m0.cpu", "m1.cpu", n, 0, 0, "m", "activation"))
    assert eng.env.now == pytest.approx(wire(n), rel=1e-9)
