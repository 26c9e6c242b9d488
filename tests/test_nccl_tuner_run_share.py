"""The share of the links' speeds a ring or tree run moves its bytes at, as NCCL's model
charges it (``nccl.run_share``, decision 030): protocol factor, the tree's correction at
medium sizes (treeCorrectionFactor) and LL's cap across machines (llMaxBws), worked by hand
and checked in flow-model runs on 4 DGX H100."""
import math

import pytest
import simpy

from clustersim.core import nccl
from clustersim.core.topogen import load_topology
from sim import collectives
from sim.network import FlowNetwork


def test_tree_correction_is_nccls_table_by_log2_of_size_over_64_bytes():
    assert nccl.tree_correction("LL128", 2**20) == 0.6          # log2(2^20 / 64) = 14
    assert nccl.tree_correction("LL", 2**18) == 0.4             # 12
    assert nccl.tree_correction("Simple", 64) == 0.9            # 0
    assert nccl.tree_correction("Simple", 100) == 0.9           # rounds down to 64 B
    assert nccl.tree_correction("LL128", 2**29) == 1.0          # 2^29 / 64 = 2^23: past the table


def test_ll_cap_across_machines_is_llmaxbw_as_algorithm_bandwidth():
    """Intel hosts: 39.0 GB/s bus bandwidth up to 2 machines, 20.4 beyond; the tree's algbw is
    half, the ring's ranks / (2 (ranks - 1)) of it; one machine has no cap here."""
    assert nccl.ll_max_algbw("tree", "allreduce", 32, 4) == pytest.approx(10.2)
    assert nccl.ll_max_algbw("ring", "allreduce", 16, 2) == pytest.approx(39.0 * 16 / 30)
    assert nccl.ll_max_algbw("ring", "allreduce", 64, 8) == pytest.approx(20.4 * 64 / 126)
    assert nccl.ll_max_algbw("tree", "allreduce", 8, 1) == math.inf


def test_run_share_caps_only_where_the_cap_is_below_the_links():
    per_byte = 1 / 384e3                      # us per byte at 384 GB/s algbw
    # tree LL, 256 KiB on 4 machines: 384 x 0.92 / 3.8 = 93 GB/s > 10.2: capped, then the
    # tree's correction at 256 KiB (0.4) scales the capped bandwidth, as ncclTopoGetAlgoTime does
    assert nccl.tree_correction("LL", 2**18) == 0.4
    assert nccl.run_share("allreduce", "tree", "LL", 2**18, per_byte, 32, 4) == pytest.approx(10.2 * 0.4 / 384)
    # tree LL128, 1 MiB: the protocol factor times the correction, no cap
    assert nccl.run_share("allreduce", "tree", "LL128", 2**20, per_byte, 32, 4) == pytest.approx(
        0.92 * 120 / 128 * 0.6)
    # ring LL on one machine: the protocol factor alone
    assert nccl.run_share("allreduce", "ring", "LL", 2**18, per_byte, 8, 1) == pytest.approx(1 / 4)
    # a slow network: the links bind before the cap
    slow = 1 / 10e3
    assert nccl.run_share("allreduce", "ring", "LL", 2**18, slow, 16, 2) == pytest.approx(1 / 4)


def _run(topo, coll):
    env = simpy.Environment()
    env.process(collectives.run(env, FlowNetwork(env, topo), coll))
    env.run()
    return env.now


@pytest.mark.parametrize("proto,size", [("LL", 2**18), ("LL128", 2**20)])
def test_tree_run_on_four_dgx_is_nccls_latency_plus_bytes_at_the_run_share(proto, size):
    """The flow model's run of a forced tree equals NCCL's predicted time built from the flow
    model's own per-byte time: latency + S x per_byte / run_share."""
    topo = load_topology("dgx-h100-fat-tree", machines=4)
    devices = topo.compute_devices()
    cache: dict = {}
    coll = collectives.layout(topo, "allreduce", "tree", devices, size, proto=proto, cache=cache)
    nodes = [topo.machine_of(d) for d in devices]
    per_byte = collectives._us_per_byte(topo, "allreduce", "tree", devices, nodes, collectives.ports(topo, devices),
                                        cache)
    graph = {"compute_capability": 9.0, "search_channels": 8}       # H100s, 8 NICs a machine (decision 033)
    expected = nccl.predicted_us("allreduce", "tree", proto, size, per_byte, 32, 4, "nvlink", **graph)
    assert coll.share == pytest.approx(nccl.run_share("allreduce", "tree", proto, size, per_byte, 32, 4, **graph))
    assert _run(topo, coll) * 1e6 == pytest.approx(expected, rel=1e-9)
    if proto == "LL":                                       # the cap binds: S over 10.2 x 0.4 GB/s
        assert expected == pytest.approx(nccl.latency_us("allreduce", "tree", "LL", 32, 4, "nvlink")
                                         + size / (10.2e3 * 0.4))


def test_amd_hosts_take_nccls_amd_rows_across_machines():
    """llMaxBws's AMD row (22.5 GB/s busbw on 2 machines, 19.0 beyond) and getNetOverhead's
    2 us (x3 for Simple) where a ring step's own latency is below it; one machine is alike."""
    assert nccl.ll_max_algbw("tree", "allreduce", 16, 2, amd_hosts=True) == pytest.approx(22.5 / 2)
    assert nccl.ll_max_algbw("ring", "allreduce", 64, 8, amd_hosts=True) == pytest.approx(19.0 * 64 / 126)
    assert nccl.ll_max_algbw("ring", "allreduce", 8, 1, amd_hosts=True) == math.inf
    # ring Simple on 2 machines of 8 NVLink GPUs: 2 x 15 steps, 4 of them across (tuning.cc)
    base, nvl, net = nccl.BASE_LAT["ring"][2], nccl.HW_LAT["nvlink"]["ring"][2], nccl.HW_LAT["net"]["ring"][2]
    for amd, overhead in ((False, 1.0), (True, 2.0)):
        assert nccl.latency_us("allreduce", "ring", "Simple", 16, 2, "nvlink", amd_hosts=amd) == pytest.approx(
            base + (30 - 4) * max(nvl, 3 * overhead) + 4 * net)
    assert nccl.latency_us("allreduce", "ring", "Simple", 8, 1, "nvlink", amd_hosts=True) == \
        nccl.latency_us("allreduce", "ring", "Simple", 8, 1, "nvlink")


def test_dgx_a100_clusters_run_ll_at_the_amd_cap(tmp_path):
    """DGX A100's EPYC hosts (``vendor = "amd"``): a forced tree LL across 2 machines runs at
    NCCL's AMD cap, the flow model's time equal to NCCL's formula with it, and slower than
    the same cluster whose CPUs name no vendor (Intel's figures, as before)."""
    topo = load_topology("dgx-a100-fat-tree", machines=2)
    devices = topo.compute_devices()
    size = 2**16
    cache: dict = {}
    coll = collectives.layout(topo, "allreduce", "tree", devices, size, proto="LL", cache=cache)
    nodes = [topo.machine_of(d) for d in devices]
    per_byte = collectives._us_per_byte(topo, "allreduce", "tree", devices, nodes, collectives.ports(topo, devices),
                                        cache)
    graph = {"compute_capability": 8.0, "search_channels": 8, "amd_hosts": True}
    expected = nccl.predicted_us("allreduce", "tree", "LL", size, per_byte, 16, 2, "nvlink", **graph)
    assert _run(topo, coll) * 1e6 == pytest.approx(expected, rel=1e-9)
    assert expected == pytest.approx(nccl.latency_us("allreduce", "tree", "LL", 16, 2, "nvlink")
                                     + size / (22.5 / 2 * 1e3 * nccl.tree_correction("LL", size)))
    base = tmp_path / "a100-unnamed.toml"
    base.write_text(load_text("dgx-a100").replace('vendor = "amd"', ""))
    (tmp_path / "ft.toml").write_text(load_text("dgx-a100-fat-tree").replace('base = "dgx-a100"', f'base = "{base}"'))
    unnamed = load_topology(str(tmp_path / "ft.toml"), machines=2)
    intel = collectives.layout(unnamed, "allreduce", "tree", unnamed.compute_devices(), size, proto="LL", cache={})
    assert _run(unnamed, intel) < _run(topo, coll)


def test_a_cpu_vendor_nccl_does_not_tell_apart_is_refused(tmp_path):
    from clustersim.core.config import ConfigError
    f = tmp_path / "t.toml"
    f.write_text(load_text("dgx-a100").replace('vendor = "amd"', 'vendor = "arm"'))
    with pytest.raises(ConfigError, match=r"machine\.cpu\.vendor: must be \"intel\" or \"amd\" .*, got 'arm'"):
        load_topology(str(f))


def load_text(name: str) -> str:
    from clustersim.core.config import bundled_folder
    return (bundled_folder("clustersim.builtin_topologies") / f"{name}.toml").read_text()


def test_a_group_takes_amds_rows_only_where_every_machine_is_amd():
    """R51: a group over one AMD and one Intel machine, or a machine with no CPU device named,
    takes Intel's figures (NCCL's ranks would disagree; the common case is kept)."""
    import dataclasses
    topo = load_topology("dgx-a100-fat-tree", machines=2)
    assert collectives._amd_hosts(topo, {0, 1})
    cpu = next(d for d in topo.devices.values() if d.kind == "cpu" and d.machine == 1)
    topo.devices[cpu.name] = dataclasses.replace(cpu, vendor="intel")
    assert not collectives._amd_hosts(topo, {0, 1}) and collectives._amd_hosts(topo, {0})
    del topo.devices[cpu.name]
    assert not collectives._amd_hosts(topo, {0, 1})
