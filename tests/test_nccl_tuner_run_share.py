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
