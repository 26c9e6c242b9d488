"""NVLS as its kernels move chunks (decisions 028, 050): enqueue.cc's chunk sizes worked by
hand, the three-stage pipeline's fill (n + 2) / n over n chunk steps a channel (NVLS_TREE with
its own chunks), NCCL 2.18's channels filled in turn, and flow-model runs against the closed form."""
import json

import pytest
from test_collectives_nccl import run_time

from clustersim.core import nccl
from clustersim.core.topogen import load_topology
from sim import collectives

KIB, MIB, GIB = 2**10, 2**20, 2**30
H100_LINK = 450e9 * 20.6 / 25          # 18 NVLink4 lanes at NCCL's 20.6 GB/s (SM90_NVLINK_BW)
RATIO = 5 / 6                           # NVLS's share (tuning.cc)


@pytest.mark.parametrize("nbytes, chunk", [
    (MIB, 16 * KIB),                    # below 2 x 16 x 8 x 32 KiB = 8 MiB
    (8 * MIB, 32 * KIB),                # not below 8 MiB, below 8 x 128 x 64 KiB = 64 MiB
    (64 * MIB, 64 * KIB),               # not below 64 MiB, below 64 x 128 x 128 KiB = 1 GiB
    (GIB, 128 * KIB),                   # the largest chunk from 1 GiB on
])
def test_nvls_chunk_is_enqueue_ccs_on_16_channels_and_8_heads(nbytes, chunk):
    assert nccl.nvls_chunk(nbytes, 8) == chunk


def test_nvls_pipeline_fill_worked_by_hand():
    """1 MiB on 8 GPUs: 16 KiB chunks, one step a channel, so the three stages run one after
    another (3x the bytes' time); NCCL 2.18 gives channel c the bytes from c x 8 x 16 KiB on,
    so 8 of 16 channels carry it (6x).  1 GiB: 64 steps of 128 KiB chunks, 66/64."""
    assert nccl.nvls_pipeline(MIB, 8, "2.20.5") == 3.0
    assert nccl.nvls_pipeline(MIB, 8, "2.18.5") == 6.0
    assert nccl.nvls_pipeline(GIB, 8) == nccl.nvls_pipeline(GIB, 8, "2.18.5") == pytest.approx(66 / 64)
    assert nccl.nvls_pipeline(2 * MIB, 8, "2.18.5") == 3.0            # every channel busy from 2 MiB
    assert nccl.nvls_pipeline(8 * GIB, 8) == pytest.approx(514 / 512)
    with pytest.raises(ValueError):
        nccl.nvls_pipeline(MIB, 8, "latest")
    topo = load_topology("dgx-h100")
    with pytest.raises(ValueError):
        collectives.layout(topo, "allreduce", "ring", topo.compute_devices(), MIB, version="2.x")


@pytest.mark.parametrize("version, fill", [("2.20.3", 3.0), ("2.18.5", 6.0)])
def test_nvls_at_one_mib_is_the_latency_plus_the_filled_pipeline_closed_form(version, fill):
    """8 H100: 23 us + S 9/8 / (370.8 GB/s x 5/6) x fill; 2.20: 34.5 us, busbw 53.3 GB/s."""
    topo = load_topology("dgx-h100")
    devices = topo.compute_devices()
    coll = collectives.layout(topo, "allreduce", "nvls", devices, MIB, version=version)
    expected = 23e-6 + MIB * 9 / 8 / (H100_LINK * RATIO) * fill
    assert run_time(topo, coll) == pytest.approx(expected, rel=1e-9)


def test_auto_still_takes_nvls_at_one_mib_as_nccls_tuner_does():
    """The fill is what the kernel costs, not what NCCL's tuner counts: auto keeps NVLS at
    1 MiB (23 + 3.8 us predicted against ring LL's 35.9) and runs it with the fill."""
    topo = load_topology("dgx-h100")
    devices = topo.compute_devices()
    [auto] = collectives.table(topo, "allreduce", "auto", [MIB], devices)
    [nvls] = collectives.table(topo, "allreduce", "nvls", [MIB], devices)
    assert auto["algo"] == "nvls" and auto["time_s"] == pytest.approx(nvls["time_s"], rel=1e-12)
    [ring] = collectives.table(topo, "allreduce", "ring", [MIB], devices)
    assert ring["algo"] == "ring" and ring["time_s"] != nvls["time_s"]


@pytest.mark.parametrize("nbytes, chunk", [
    (8 * GIB, 512 * KIB),               # not below 32 x 16 x 8 x 512 KiB = 2 GiB: the Simple step
    (GIB, 256 * KIB),                   # below 2 GiB, not below 16 x 128 x 256 KiB = 512 MiB
    (128 * MIB, 128 * KIB),             # below 512 MiB, not below 4 x 128 x 128 KiB = 64 MiB
    (16 * MIB, 64 * KIB),               # below 64 MiB, not below 1 x 128 x 64 KiB = 8 MiB
    (MIB, 32 * KIB),                    # the smallest
])
def test_nvls_tree_chunk_is_enqueue_ccs_from_the_simple_step(nbytes, chunk):
    """enqueue.cc (2.18-2.21): NVLS_TREE starts from NCCL_BUFFSIZE's 4 MiB over 8 steps."""
    assert nccl.nvls_chunk(nbytes, 8, machines=2) == chunk


def test_nvls_tree_chunk_from_four_machines_is_64_kib_since_2_19_3():
    """NCCL 2.19.3 caps NVLS_TREE's chunk at 64 KiB from 4 machines on (NVIDIA/nccl PR 1112;
    NCCL_NVLSTREE_MAX_CHUNKSIZE's default from 2.20.3); 2.18 and 2 or 3 machines keep 512 KiB."""
    assert nccl.nvls_chunk(8 * GIB, 8, machines=4) == 64 * KIB
    assert nccl.nvls_chunk(8 * GIB, 8, machines=16, version="2.24.3") == 64 * KIB
    assert nccl.nvls_chunk(8 * GIB, 8, machines=3) == 512 * KIB
    assert nccl.nvls_chunk(8 * GIB, 8, machines=4, version="2.18.5") == 512 * KIB
    assert nccl.nvls_chunk(8 * GIB, 8, machines=4, version="2.19.2") == 512 * KIB
    assert nccl.nvls_chunk(8 * GIB, 8, machines=4, version="2.19.3") == 64 * KIB
    assert nccl.nvls_chunk(MIB, 8, machines=4) == 32 * KIB           # the rules still step it down
    assert nccl.nvls_pipeline(GIB, 8, machines=16) == pytest.approx(130 / 128)


def test_nvls_tree_pipeline_fill_worked_by_hand():
    """Three stages over NVLS_TREE's chunks, whatever the tree's depth: 1 MiB, 32 KiB chunks,
    one step a channel: 3x the bytes' time; 2.18 fills 4 of 16 channels: 12x.  1 GiB: 32 steps
    of 256 KiB, 34/32; 8 GiB: 128 steps of 512 KiB, 130/128."""
    assert nccl.nvls_pipeline(MIB, 8, "2.20.3", machines=2) == 3.0
    assert nccl.nvls_pipeline(MIB, 8, "2.18.5", machines=2) == 12.0
    assert nccl.nvls_pipeline(GIB, 8, machines=2) == pytest.approx(34 / 32)
    assert nccl.nvls_pipeline(8 * GIB, 8, machines=2) == pytest.approx(130 / 128)


def test_nvls_tree_runs_with_its_fill_by_version():
    """The run's share is 5/6 over the fill: 2 DGX H100 at 1 MiB, 3 (2.20) and 12 (2.18)."""
    topo = load_topology("dgx-h100-fat-tree", machines=2)
    devices = topo.compute_devices()
    a = collectives.layout(topo, "allreduce", "nvls_tree", devices, MIB)
    b = collectives.layout(topo, "allreduce", "nvls_tree", devices, MIB, version="2.18.5")
    assert a.share == pytest.approx(RATIO / 3) and b.share == pytest.approx(RATIO / 12)


def test_nvls_tree_on_uneven_machines_takes_the_fewest_gpus_as_heads():
    """8 + 4 GPUs: NCCL keeps one head count a communicator; the fill is the 4-head one's,
    not that of an average 6 no machine has.  32 MiB by hand: 4 heads, 128 KiB chunks, 4 steps
    a channel, fill 6/4; 6 heads would take 64 KiB chunks, 6 steps, 8/6."""
    topo = load_topology("dgx-h100-fat-tree", machines=2)
    devices = topo.compute_devices()[:12]
    coll = collectives.layout(topo, "allreduce", "nvls_tree", devices, 32 * MIB)
    assert coll.share == pytest.approx(RATIO / 1.5)
    assert nccl.nvls_pipeline(32 * MIB, 6, machines=2) == pytest.approx(8 / 6)


def test_the_collective_command_takes_the_nccl_version(capsys):
    """The 2.19.3 cap from the command line: 16 DGX H100 at 1 GiB, 293.3 GB/s busbw as 2.19.2
    lays chunks out (256 KiB), 306.5 as 2.19.3 and later do (64 KiB)."""
    from clustersim.cli import main
    rows = {}
    for version in ("2.19.2", "2.19.3"):
        assert main(["collective", "--topology", "dgx-h100-fat-tree", "--machines", "16", "--bytes", "1G",
                     "--nccl", version, "--json"]) == 0
        [rows[version]] = json.loads(capsys.readouterr().out)
    assert rows["2.19.2"]["algo"] == rows["2.19.3"]["algo"] == "nvls_tree"
    assert rows["2.19.2"]["busbw_gbps"] < rows["2.19.3"]["busbw_gbps"]
    assert main(["collective", "--topology", "dgx-h100", "--nccl", "2.x"]) == 2


def test_sixteen_alexnet_replicas_on_two_dgx_step_slower_than_eight_on_one():
    """Before decision 050 NVLS_TREE ran without the fill one machine's NVLS pays, and two
    nodes stepped faster than one (1.772 against 1.830 ms)."""
    from clustersim import api
    one = api.simulate("scenarios/alexnet-fat-tree.toml", {"parallel.replicas": 8}, speedup=False)
    two = api.simulate("scenarios/alexnet-fat-tree.toml", {"cluster.machines": 2, "parallel.replicas": 16},
                       speedup=False)
    assert 1.0 < two.step_time_s / one.step_time_s < 1.5

