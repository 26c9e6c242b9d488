"""Calibration across hosts: the topology of several calibrated machines in closed form,
and the ping-pong on real MPI ranks (host memory standing in for GPUs)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from clustersim.calibration.hosts import hosts_topology_text
from clustersim.core.topogen import load_topology
from test_gpucal import fit, result
from test_mpi import MPIEXEC

HERE = Path(__file__).resolve().parent


def test_hosts_topology_routes_between_hosts_over_their_nics_with_the_pair_fit(tmp_path):
    """Host 0's GPU to host i's: the route's latency is the pair's alpha and its rate the
    pair's beta (below PCIe's 20 GB/s); GPUs of one host still take their direct link."""
    pairs = {1: fit(20.0, 12.0), 2: fit(30.0, 5.0)}
    path = tmp_path / "hosts.toml"
    path.write_text(hosts_topology_text("three", [result(2), result(2), result(3)], pairs))
    topo = load_topology(str(path))
    assert topo.compute_devices() == ["h0.gpu0", "h0.gpu1", "h1.gpu0", "h1.gpu1", "h2.gpu0", "h2.gpu1", "h2.gpu2"]
    assert {topo.devices[d].machine for d in topo.compute_devices()} == {0, 1, 2}
    for i, f in pairs.items():
        r = topo.route("h0.gpu0", f"h{i}.gpu0")
        assert topo.route_latency(r) == pytest.approx(f["alpha_s"])
        assert topo.route_bandwidth(r) == pytest.approx(f["beta_bytes_per_s"])
        assert f"h{i}.nic" in [hop[1] for hop in r]
    inside = topo.route("h2.gpu0", "h2.gpu2")
    assert len(inside) == 1 and topo.route_bandwidth(inside) == pytest.approx(300e9)
    far = topo.route("h1.gpu1", "h2.gpu0")                 # not measured: both hosts' NIC links
    assert topo.route_bandwidth(far) == pytest.approx(5e9)


def test_hosts_topology_needs_every_pair_with_host_0():
    with pytest.raises(ValueError, match="pairs"):
        hosts_topology_text("x", [result(1), result(1), result(1)], {1: fit(5.0, 10.0)})


@pytest.mark.skipif(not MPIEXEC.exists(), reason="the mpich wheel is not installed")
def test_calibrate_hosts_on_real_ranks_fits_every_pair_with_rank_0_and_writes_them(tmp_path):
    proc = subprocess.run([str(MPIEXEC), "-n", "3", sys.executable, str(HERE / "mpi_ping_pong.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads((tmp_path / "pairs.json").read_text())
    assert sorted(out) == ["1", "2"]
    for f in out.values():
        assert [s[0] for s in f["samples"]] == [2**10, 2**16, 2**20]
        assert all(s[1] > 0 for s in f["samples"]) and f["beta_bytes_per_s"] > 0 and f["alpha_s"] >= 0
    topo = load_topology(str(tmp_path / "hosts.toml"))     # each host its own GPUs: 1, 2 and 3
    assert topo.compute_devices() == ["h0.gpu0", "h1.gpu0", "h1.gpu1", "h2.gpu0", "h2.gpu1", "h2.gpu2"]


def test_launched_ranks_reads_mpiexecs_environment_and_is_1_outside_it():
    from clustersim.calibration.hosts import launched_ranks
    assert launched_ranks({}) == 1
    assert launched_ranks({"PMI_SIZE": "4", "PMI_RANK": "2"}) == 4            # MPICH's Hydra
    assert launched_ranks({"OMPI_COMM_WORLD_SIZE": "3"}) == 3                  # Open MPI
    assert launched_ranks({"PMI_SIZE": ""}) == 1


@pytest.mark.skipif(not MPIEXEC.exists(), reason="the mpich wheel is not installed")
def test_mpiexec_sets_what_launched_ranks_reads(tmp_path):
    """The mpich wheel's mpiexec: each of 2 ranks sees 2 (each writes its own file: the two
    ranks' prints can interleave on the shared stdout, "22" then two newlines)."""
    code = ("import os, sys; from clustersim.calibration.hosts import launched_ranks; "
            "open(os.path.join(sys.argv[1], os.environ['PMI_RANK']), 'w').write(str(launched_ranks(os.environ)))")
    proc = subprocess.run([str(MPIEXEC), "-n", "2", sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert {f.name: f.read_text() for f in tmp_path.iterdir()} == {"0": "2", "1": "2"}
