"""Calibration and validation: fits, round trips, error arithmetic, one end-to-end run."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from executor.calibrate import fit_alpha_beta, topology_text
from executor.validate import error_pct, phase_times, spread_pct
from sim.topogen import build_topology, load_topology
from sim.topology import Device

MPIEXEC = Path(sys.executable).parent / "mpiexec"


def test_error_arithmetic():
    assert error_pct(1.1, 1.0) == pytest.approx(10.0)
    assert error_pct(0.5, 2.0) == pytest.approx(-75.0)
    assert error_pct(0.0, 0.0) == 0.0 and math.isinf(error_pct(1.0, 0.0))
    assert spread_pct([1.0, 1.2, 0.9]) == pytest.approx(30.0)
    spans = [("fwd L0", "fwd", "d0", 2.0), ("halo L1", "halo", "d0->d1", 1.0), ("fwd L0", "fwd", "d1", 5.0),
             ("update", "update", "d0", 0.5)]
    assert phase_times(spans, "d0", 2) == {"forward": 1.0, "transfers": 0.5, "update": 0.25}


def test_alpha_beta_fit_recovers_exact_parameters():
    sizes = [2**k for k in range(3, 25, 3)]
    times = [3e-6 + n / 8e9 for n in sizes]
    fit = fit_alpha_beta(sizes, times)
    assert fit["alpha_s"] == pytest.approx(3e-6, rel=1e-6)
    assert fit["beta_bytes_per_s"] == pytest.approx(8e9, rel=1e-6)
    assert fit["r2"] == pytest.approx(1.0) and fit["max_rel_error"] < 1e-6


def test_calibrated_topology_round_trips(tmp_path):
    comp = {"peak_flops": 50e9, "op_overhead_s": 10e-6, "efficiency_curve": [(1e4, 0.2), (1e8, 0.9), (1e10, 1.0)]}
    mpi = {"alpha_s": 4e-6, "beta_bytes_per_s": 6e9, "r2": 0.999}
    f = tmp_path / "host.toml"
    f.write_text(topology_text("host", 4, 2, comp, 20e9, mpi))
    topo = load_topology(str(f))
    assert topo.compute_devices() == ["rank0", "rank1", "rank2", "rank3"]
    dev = topo.devices["rank0"]
    assert dev.flops_per_s("fp32") == pytest.approx(25e9)          # 4 ranks share 2 cores
    assert dev.op_overhead == pytest.approx(10e-6)
    route = topo.route("rank0", "rank3")
    assert topo.route_latency(route) == pytest.approx(4e-6) and topo.route_bandwidth(route) == pytest.approx(6e9)


def test_efficiency_curve_interpolates_in_log_flops_and_is_validated():
    d = Device("x", "cpu", 0, {"fp32": 1e9}, efficiency_curve=((1e4, 0.2), (1e6, 0.6)))
    assert d.efficiency_at(1e2) == 0.2 and d.efficiency_at(1e8) == 0.6
    assert d.efficiency_at(1e5) == pytest.approx(0.4)
    bad = {"name": "t", "device": [{"name": "c", "kind": "cpu", "cores": 1, "core_gflops": 1, "memory_gib": 1,
                                    "memory_bandwidth_gbps": 1, "efficiency_curve": [[1e6, 0.5], [1e4, 0.9]]}]}
    with pytest.raises(Exception, match="efficiency_curve"):
        build_topology(bad, "t.toml")


@pytest.mark.skipif(not MPIEXEC.exists(), reason="the mpich wheel is not installed")
def test_validate_runs_end_to_end_with_finite_errors(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text('name = "tiny"\n[cluster]\ntopology = "dgx-h100"\n[model]\nname = "mlp-digits"\nbatch_size = 16\n'
                 '[parallel]\nreplicas = 2\n[training]\nsteps = 20\n')
    proc = subprocess.run([sys.executable, "-m", "sim", "validate", str(f), "--repeats", "1", "--json",
                           "--plot", str(tmp_path / "v.png")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["predicted_step_time_s"] > 0 and out["measured_step_time_s"] > 0
    assert math.isfinite(out["error_pct"]) and {"forward", "backward"} <= set(out["phases"])
    assert (tmp_path / "v.png").read_bytes()[:4] == b"\x89PNG"
