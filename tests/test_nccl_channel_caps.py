"""NCCL 2.20.3's per-channel bandwidth caps (tuning.cc @ b6475625: perChMaxTreeBws,
perChMaxTreeLL128Bws, perChMaxRingLL128Bws, times the search channels; decision 033), worked
by hand from a table row and a channel count, and checked where the run and the tuner use
them: across 4 DGX H100 they bind, on one machine nothing changes."""
import math

import pytest

from clustersim.core import nccl
from clustersim.core.topogen import load_topology
from sim import collectives

HOPPER = {"compute_capability": 9.0, "search_channels": 8}   # a DGX H100: 8 NICs, 8 search channels
ALGBW = 384.0                      # GB/s: the links' algorithm bandwidth at full speed
PER_BYTE = 1 / (ALGBW * 1e3)       # us per byte


@pytest.mark.parametrize("table,cc,nodes,channels,expected", [
    (nccl.PER_CH_MAX_TREE_LL128, 9.0, 4, 8, 8 * 29.0),     # Hopper, more than 2 machines
    (nccl.PER_CH_MAX_TREE, 9.0, 2, 8, 8 * 41.4),           # Hopper, 2 machines
    (nccl.PER_CH_MAX_TREE, 9.0, 16, 8, 8 * 36.0),
    (nccl.PER_CH_MAX_RING_LL128, 9.0, 4, 8, 8 * 36.7),
    (nccl.PER_CH_MAX_TREE, 8.0, 3, 4, 4 * 17.8),           # Ampere
    (nccl.PER_CH_MAX_TREE_LL128, 8.6, 2, 8, 8 * 20.0),
    (nccl.PER_CH_MAX_TREE, 7.0, 4, 2, 2 * 10.0),           # Volta
    (nccl.PER_CH_MAX_TREE, 0.0, 2, 1, math.inf),           # not given (a test or calibrated GPU): no cap
    (nccl.PER_CH_MAX_TREE, 9.0, 1, 8, math.inf),           # one machine: not applied
    (nccl.PER_CH_MAX_TREE, 9.0, 4, 0, math.inf),           # search channels not known
])
def test_channel_cap_is_the_row_times_the_search_channels(table, cc, nodes, channels, expected):
    assert nccl.channel_max_busbw(table, cc, nodes, channels) == pytest.approx(expected)


def test_tree_ll128_on_four_hopper_machines_is_capped_twice():
    """Tree busbw at full speed 2 x 384 = 768: min(768 x .92, 8 x 36.0 = 288), then LL128
    min(288 x 120/128 = 270, 8 x 29.0 = 232) = 232, then the correction at 1 MiB (0.6)."""
    share = nccl.run_share("allreduce", "tree", "LL128", 2**20, PER_BYTE, 32, 4, **HOPPER)
    assert share == pytest.approx(8 * 29.0 / (2 * ALGBW) * 0.6)


def test_tree_simple_cap_and_ring_ll128_cap():
    assert nccl.run_share("allreduce", "tree", "Simple", 2**30, PER_BYTE, 32, 4, **HOPPER) == pytest.approx(
        8 * 36.0 / (2 * ALGBW))                              # 1 GiB: past the correction table
    # ring: busbw = algbw x nsteps / ranks = 384 x 62 / 32; min(x .92, 8 x 36.7)
    ring_busbw = ALGBW * 62 / 32
    assert nccl.run_share("allreduce", "ring", "LL128", 2**30, PER_BYTE, 32, 4, **HOPPER) == pytest.approx(
        8 * 36.7 / ring_busbw)
    assert nccl.run_share("allreduce", "ring", "Simple", 2**30, PER_BYTE, 32, 4, **HOPPER) == 1.0


def test_tree_channel_cap_comes_before_ll_and_its_cap():
    """Volta, one search channel, 4 machines: min(768 x .92, 10.0) / 3.8 = 2.63 GB/s busbw,
    under llMaxBws' 20.4: the channel cap binds through LL's factor, as tuning.cc orders them."""
    share = nccl.run_share("allreduce", "tree", "LL", 2**30, PER_BYTE, 32, 4, compute_capability=7.0,
                           search_channels=1)
    assert share == pytest.approx(10.0 / 3.8 / (2 * ALGBW))
    # with 8 Hopper channels the tree cap leaves 288 / 3.8 = 76 GB/s: llMaxBws (20.4) binds
    assert nccl.run_share("allreduce", "tree", "LL", 2**30, PER_BYTE, 32, 4, **HOPPER) == pytest.approx(
        20.4 / (2 * ALGBW))


def test_links_slower_than_the_caps_keep_the_protocol_factor():
    slow = 1 / 50e3                                          # 50 GB/s algbw: 100 GB/s tree busbw < 232
    for proto in nccl.PROTOCOLS[1:]:
        capped = nccl.run_share("allreduce", "tree", proto, 2**30, slow, 32, 4, **HOPPER)
        assert capped == nccl.protocol_factor("tree", proto, "allreduce", 4, 8)


@pytest.mark.parametrize("algo", ["ring", "tree"])
@pytest.mark.parametrize("proto", nccl.PROTOCOLS)
def test_one_machine_is_untouched(algo, proto):
    plain = nccl.run_share("allreduce", algo, proto, 2**20, PER_BYTE, 8, 1)
    assert nccl.run_share("allreduce", algo, proto, 2**20, PER_BYTE, 8, 1, **HOPPER) == plain
    assert not nccl.needs_per_byte(algo, proto, 1, 8)


@pytest.mark.parametrize("algo,proto", [(a, p) for a in ("ring", "tree") for p in nccl.PROTOCOLS])
def test_one_dgx_h100_runs_uncapped(algo, proto):
    """One machine: a forced ring or tree runs at the protocol's share with the tree's
    correction and nothing else, Hopper's row and 8 NICs notwithstanding; the tuner's choice
    there is the same with or without the caps' inputs."""
    topo = load_topology("dgx-h100")
    devices = topo.compute_devices()
    size = 2**20
    coll = collectives.layout(topo, "allreduce", algo, devices, size, proto=proto)
    uncapped = nccl.protocol_factor(algo, proto, "allreduce", 1, 8) * (
        nccl.tree_correction(proto, size) if algo == "tree" else 1.0)
    assert coll.share == pytest.approx(uncapped, rel=1e-12)
    assert nccl.run_share("allreduce", algo, proto, size, PER_BYTE, 8, 1, **HOPPER) == coll.share
    per_byte = {"ring": PER_BYTE, "tree": PER_BYTE}
    assert nccl.choose("allreduce", size, per_byte, 8, 1, "nvlink", **HOPPER) == nccl.choose(
        "allreduce", size, per_byte, 8, 1, "nvlink")


@pytest.mark.parametrize("algo,proto", [("tree", "LL128"), ("tree", "Simple"), ("ring", "LL128")])
def test_four_dgx_h100_run_at_the_capped_share(algo, proto):
    """Forced or tuned, a run across 4 DGX H100 moves its bytes at run_share with the group's
    compute capability (9.0) and 8 search channels (8 NICs a machine), below the uncapped share."""
    topo = load_topology("dgx-h100-fat-tree", machines=4)
    devices = topo.compute_devices()
    size = 2**20
    coll = collectives.layout(topo, "allreduce", algo, devices, size, proto=proto)
    nodes = [topo.machine_of(d) for d in devices]
    per_byte = collectives._us_per_byte(topo, "allreduce", algo, devices, nodes, collectives.ports(topo, devices),
                                        None)
    capped = nccl.run_share("allreduce", algo, proto, size, per_byte, 32, 4, **HOPPER)
    assert coll.share == pytest.approx(capped)
    assert capped < nccl.run_share("allreduce", algo, proto, size, per_byte, 32, 4)


@pytest.mark.parametrize("intra,cc,ll128", [
    ("nvlink", 9.0, True), ("nvlink", 8.0, True), ("nvlink", 7.0, True),
    ("pci", 8.0, False),                 # no NVLink inside the machine: LL128 off by default
    ("nvlink", 8.6, False),              # an Ampere other than the A100: not among NCCL's tested
    ("nvlink", 0.0, True),               # not given: kept
])
def test_ll128_is_on_by_default_only_on_nvlink_volta_ampere_hopper(intra, cc, ll128):
    assert ("LL128" in nccl.default_protocols(intra, cc)) is ll128
    assert {"LL", "Simple"} <= set(nccl.default_protocols(intra, cc))


def test_a_pcie_cluster_never_picks_ll128_unless_asked():
    """ethernet-cluster: 4 A100 PCIe a server, no NVLink; every size's auto pick avoids LL128,
    which a forced protocol still runs (NCCL_PROTO=LL128)."""
    topo = load_topology("ethernet-cluster")
    gpus = [d for d, dev in topo.devices.items() if dev.kind == "gpu"][:8]
    for size in (2**10, 2**20, 2**24, 2**28):
        assert collectives.layout(topo, "allreduce", "auto", gpus, size).proto != "LL128", size
    assert collectives.layout(topo, "allreduce", "tree", gpus, 2**20, proto="LL128").proto == "LL128"
