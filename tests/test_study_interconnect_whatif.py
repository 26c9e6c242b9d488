"""A small interconnect_whatif study (scenarios/studies/interconnect_whatif.py): VGG-16 on
the PCIe server, the 100 GbE pair of them and one DGX H100, against stored expected output,
and what must hold: the same A100 computes as fast in both PCIe clusters (only the
interconnect differs), so going from 4 to 8 of them over Ethernet buys less than 2x; the
DGX hides nearly all of its NVLink allreduce behind the backward."""
import pytest

from study_loader import expected, load_study

EXPECTED = {p["cluster"]: p for p in expected("interconnect_whatif.json")}


def test_small_interconnect_whatif():
    study = load_study("interconnect_whatif")
    points = {p["cluster"]: p for p in study.run(study.CLUSTERS[:3])}
    for name, got in points.items():
        numbers = {k for k, v in got.items() if isinstance(v, float)}
        assert {k: got[k] for k in numbers} == pytest.approx({k: EXPECTED[name][k] for k in numbers}, rel=1e-6)
        assert {k: v for k, v in got.items() if k not in numbers} == \
            {k: v for k, v in EXPECTED[name].items() if k not in numbers}
        assert got["step_time_s"] == pytest.approx(got["compute_s"] + got["exposed_comm_s"], rel=1e-12)
        assert got["efficiency"] <= 1.0
    pcie, eth, dgx = points["pcie-4gpu"], points["ethernet-cluster"], points["dgx-h100"]
    assert eth["compute_s"] == pcie["compute_s"]
    assert 1.0 < eth["buys"] < 2.0 and eth["exposed_comm_s"] > pcie["exposed_comm_s"]
    assert dgx["efficiency"] > 0.9 > pcie["efficiency"]
