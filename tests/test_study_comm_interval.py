"""A small comm_interval study (scenarios/studies/comm_interval.py): 100 samples at
intervals 1, 10, 100 against stored expected output, and what must hold whatever the
numbers: one exchange per interval, a simulated speed-up below one device's (the first
group's worker runs a whole step, docs/decisions/016) that grows with the interval, and
the seed's formula below L = 2.  (Worker 0 skips the other group's update, ~1% of a
step, so only exchanges this frequent keep the speed-up strictly below 1.)"""
import pytest

from study_loader import expected, load_study

EXPECTED = expected("comm_interval_small.json")


def test_small_comm_interval_study():
    points = load_study("comm_interval").run((1, 10, 100), samples=100)
    assert [p["interval"] for p in points] == [p["interval"] for p in EXPECTED]
    for got, want in zip(points, EXPECTED):
        assert got["accuracy"] == want["accuracy"]                 # co-simulation is deterministic
        assert got == pytest.approx(want, rel=1e-9)
        assert got["exchanges"] == -(-100 // got["interval"])
        assert got["speedup"] < 1.0 and got["formula_speedup"] < 2.0
    speedups = [p["speedup"] for p in points]
    assert speedups == sorted(speedups)
