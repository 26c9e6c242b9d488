"""NVLink SHARP (NVLS, NVLS_TREE) as NCCL 2.20.3 runs it: its tuner constants worked by hand,
closed forms on uniform NVSwitch machines against the flow model, and where ``auto`` takes it."""
import json

import pytest
from test_collectives_nccl import run_time

from clustersim import api
from clustersim.cli import main
from clustersim.core import nccl
from clustersim.core.collective import phases
from clustersim.core.config import ConfigError
from clustersim.core.topogen import load_topology
from sim import collectives

GIB = 2.0**30
H100_LINK = 450e9 * 20.6 / 25          # 18 NVLink4 lanes at NCCL's 20.6 GB/s (SM90_NVLINK_BW)
NIC = 48e9                              # a 400 Gb/s NIC at NCCL's speed
RATIO = 5 / 6                           # NVLS's share (tuning.cc)


def test_nccl_nvls_latencies_and_ratio_worked_by_hand():
    """tuning.cc (2.20.3): NVLS latency = hwLat[NVLink][NVLS][Simple] = 23 us, no base;
    NVLS_TREE = 23 + 2 log2(nodes) x 14 us; both at 5/6 of the bus bandwidth, Simple only."""
    assert nccl.latency_us("allreduce", "nvls", "Simple", 8, 1, "nvlink") == 23.0
    assert nccl.latency_us("allreduce", "nvls_tree", "Simple", 16, 2, "nvlink") == 23.0 + 2 * 14.0
    assert nccl.latency_us("allreduce", "nvls_tree", "Simple", 128, 16, "nvlink") == 23.0 + 2 * 4 * 14.0
    assert nccl.protocol_factor("nvls", "Simple", "allreduce", 1, 8) == pytest.approx(5 / 6)
    assert nccl.protocols("nvls_tree") == ("Simple",) and nccl.protocols("ring") == nccl.PROTOCOLS
    us_per_byte = 1 / 300e3
    assert nccl.predicted_us("allreduce", "nvls", "Simple", 2**20, us_per_byte, 8, 1, "nvlink") == pytest.approx(
        23.0 + 2**20 * us_per_byte * 6 / 5)
    assert nccl.choose("allreduce", 2**30, {"nvls": us_per_byte}, 8, 1, "nvlink") == ("nvls", "Simple")
    with pytest.raises(ValueError):
        nccl.choose("allreduce", 2**30, {"nvls": us_per_byte}, 8, 1, "nvlink", allowed=("LL",))


def test_nvls_takes_fewer_sms_than_the_ring():
    """NVLS runs on NCCL_NVLS_NCHANNELS = 16 channels (one SM each), the ring on 24."""
    assert nccl.sm_share(1, 8, 132, "nvls") == pytest.approx(16 / 132)
    assert nccl.sm_share(2, 8, 132, "nvls_tree") == pytest.approx(16 / 132)
    assert nccl.sm_share(1, 8, 132) == pytest.approx(24 / 132)
    topo = load_topology("dgx-h100")
    devices = topo.compute_devices()
    assert collectives.sm_share(topo, devices, "nvls") < collectives.sm_share(topo, devices, "ring")


def test_nvls_phase_carries_s_times_g_plus_one_over_g_each_way():
    """g GPUs on one switch: every GPU's link carries S (g+1)/g to the switch and back."""
    devices = [f"m0.gpu{i}" for i in range(8)]
    [ph] = phases("allreduce", "nvls", devices, 800.0, switches=["m0.nvswitch"])
    assert ph.nbytes == pytest.approx(900.0) and ph.coupled
    assert sorted(ph.pairs) == sorted([(d, "m0.nvswitch") for d in devices] + [("m0.nvswitch", d) for d in devices])
    for algo, op, kw in (("nvls", "broadcast", {}), ("nvls_tree", "allreduce", {}), ("nvls", "allreduce", {})):
        with pytest.raises(ValueError):
            phases(op, algo, devices, 800.0, **kw)


@pytest.mark.parametrize("g", [3, 5, 8])
def test_one_machine_nvls_is_nccls_latency_plus_the_switch_links_closed_form(g):
    """g H100 on the NVSwitch: 23 us + S (g+1)/g / (NVLink x 5/6) x the chunk pipeline's
    fill, (n + 2) / n for n chunk steps (decision 028; 1 GiB at g = 8: n = 64 steps of
    128 KiB).  Without the fill, g = 8 gives busbw 480.7, NVIDIA's ~480 (nccl-tests#212)."""
    topo = load_topology("dgx-h100")
    devices = topo.compute_devices()[:g]
    coll = collectives.layout(topo, "allreduce", "nvls", devices, GIB)
    assert (coll.algo, coll.proto) == ("nvls", "Simple")
    expected = 23e-6 + GIB * (g + 1) / g / (H100_LINK * RATIO) * nccl.nvls_pipeline(GIB, g)
    assert run_time(topo, coll) == pytest.approx(expected, rel=1e-9)


def test_two_machines_nvls_tree_is_bound_by_nvlink_closed_form():
    """Two DGX H100: the NVLink part (S 9/8 each way) and each rail's two trees (S/16 up
    and S/16 down a tree, S/8 each way a NIC) run at once; NVLink is the slower:
    51 us + S 9/8 / (370.8 GB/s x 5/6), times the chunk pipeline's fill."""
    topo = load_topology("dgx-h100-fat-tree", machines=2)
    devices = topo.compute_devices()
    coll = collectives.layout(topo, "allreduce", "nvls_tree", devices, GIB)
    assert [ph.wave for ph in coll.phases] == [0] * len(coll.phases)
    assert len(coll.phases) == 2 + 8 * 2                   # a switch phase per machine, 2 trees per rail
    fill = (32 + 2) / 32                                   # 32 steps of 256 KiB, 3 stages (decision 050)
    expected = 51e-6 + GIB * 9 / 8 / (H100_LINK * RATIO) * fill
    assert run_time(topo, coll) == pytest.approx(expected, rel=1e-9)
    assert 9 / 8 / H100_LINK > (1 / 8) / NIC                # NVLink bound, not the NICs


def test_four_machines_nvls_tree_is_bound_by_the_busiest_nic_closed_form():
    """Four machines: a machine interior in one tree and a leaf in the other sends 4 of
    the rail's S/16 messages each way, S/4 a NIC: 79 us + S/4 / (48 GB/s x 5/6) x fill, slower
    than the ring (why NCCL gains nothing from NVLS beyond 2 nodes, nccl#1221)."""
    topo = load_topology("dgx-h100-fat-tree", machines=4)
    devices = topo.compute_devices()
    coll = collectives.layout(topo, "allreduce", "nvls_tree", devices, GIB)
    fill = (128 + 2) / 128                                 # 128 steps of 64 KiB from 4 machines on
    expected = 79e-6 + GIB / 4 / (NIC * RATIO) * fill
    assert run_time(topo, coll) == pytest.approx(expected, rel=1e-9)
    [row] = api.collective("dgx-h100-fat-tree", sizes=[2**33], machines=4)
    assert row["algo"] == "ring"


def test_auto_takes_nvls_at_large_sizes_on_h100_and_not_on_a100():
    rows = api.collective("dgx-h100", sizes=[2**10, 2**30])
    assert [r["algo"] for r in rows] == ["ring", "nvls"]
    assert rows[1]["busbw_gbps"] > 450                     # above what any ring reaches over NVLink
    a100 = api.collective("dgx-a100", sizes=[2**30])       # compute capability 8.0: no NVLS
    assert a100[0]["algo"] == "ring"
    two = api.collective("dgx-h100", sizes=[2**30], gpus=2)  # 2 GPUs: NCCL leaves NVLS off
    assert two[0]["algo"] == "ring"


def test_nvls_is_refused_where_nccl_does_not_offer_it():
    with pytest.raises(ConfigError):
        api.collective("dgx-a100", algo="nvls", sizes=[2**20])
    with pytest.raises(ConfigError):
        api.collective("dgx-h100-fat-tree", algo="nvls", sizes=[2**20], machines=2)
    with pytest.raises(ConfigError):
        api.collective("dgx-h100", algo="nvls", sizes=[2**20], protocol="LL")
    topo = load_topology("dgx-h100")
    assert collectives.nvls_algo(topo, "allgather", topo.compute_devices()) == ""


def test_json_row_names_the_nvls_algorithm(capsys):
    code = main(["collective", "--topology", "dgx-h100", "--bytes", "1G", "--json"])
    [row] = json.loads(capsys.readouterr().out)
    assert code == 0 and (row["algo"], row["protocol"]) == ("nvls", "Simple")
    code = main(["collective", "--topology", "dgx-h100-fat-tree", "--machines", "2", "--bytes", "1G", "--json"])
    [row] = json.loads(capsys.readouterr().out)
    assert code == 0 and row["algo"] == "nvls_tree"


def test_a_cut_nvlink_takes_the_gpus_switch_away():
    """NVLS needs every GPU of the machine linked to the NVSwitch: with m0.gpu0's link cut,
    routing (and so the switch search) no longer sees that link."""
    topo = load_topology("dgx-h100")
    gpus = topo.compute_devices()
    assert collectives.switches(topo, gpus) == ["m0.nvswitch"]
    cut = topo.without_link("m0.gpu0", "m0.nvswitch")
    assert collectives.switches(cut, gpus) is None
    assert collectives.switches(cut, gpus[1:]) == ["m0.nvswitch"]
