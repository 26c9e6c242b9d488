"""A small downpour_vs_sandblaster study (scenarios/studies/downpour_vs_sandblaster.py):
2 and 4 workers, 3,200 samples, 80% target, against stored expected output (co-simulation
is deterministic), and what must hold: the setting is compute bound (a replica's forward
and backward outweigh its pushes and fetches), throughput grows with workers, Downpour's
shards see about workers - 1 other pushes between a replica's fetch and its push while
Sandblaster's batches see none, and every run reaches the target within its samples."""
import pytest

from study_loader import expected, load_study

EXPECTED = expected("downpour_vs_sandblaster_small.json")


def test_small_downpour_vs_sandblaster():
    study = load_study("downpour_vs_sandblaster")
    points = study.run((2, 4), samples=3200, target=0.8, eval_points=10)
    assert [(p["method"], p["workers"]) for p in points] == [(p["method"], p["workers"]) for p in EXPECTED]
    for got, want in zip(points, EXPECTED):
        assert got["accuracy"] == want["accuracy"]
        numbers = {k: v for k, v in want.items() if k != "method"}
        assert {k: got[k] for k in numbers} == pytest.approx(numbers, rel=1e-9)

    alone, *rest = points
    assert alone["method"] == "alone" and alone["compute_share"] == 1.0 and alone["staleness_mean"] == 0.0
    for p in points:
        assert p["compute_share"] > 0.5
        assert p["time_to_accuracy_s"] is not None and 0 < p["time_to_accuracy_s"] <= p["time_s"]
    by = {(p["method"], p["workers"]): p for p in rest}
    for method in study.METHODS:
        two, four = by[(method, 2)], by[(method, 4)]
        assert four["samples_per_s"] > 1.5 * two["samples_per_s"]
        for p in (two, four):
            want = 0.0 if method == "sandblaster" else p["workers"] - 1
            assert p["staleness_mean"] == pytest.approx(want, abs=0.5)
