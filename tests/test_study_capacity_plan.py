"""A small capacity_plan study (scenarios/studies/capacity_plan.py): AlexNet (fp16, global
batch 128), 90 epochs of ImageNet-1k within half an hour on up to 2 GPUs of a DGX H100 or
a DGX A100, against stored expected output, and what must hold: each row's time and cost
are the closed forms of its throughput and price, each cluster's rows meet the deadline
first and then ascend in cost, and the plan takes the cheapest row that meets it.  Here
no A100 split is fast enough (search says so), though the cheapest A100 row costs less
than the H100 that wins: the deadline, not the price, picks the cluster."""
import pytest

from study_loader import expected, load_study

EXPECTED = expected("capacity_plan_small.json")
CLUSTERS = (("dgx-h100-fat-tree", 1, 2), ("dgx-a100-fat-tree", 1, 2))
PRICE_USD_PER_HOUR = {"dgx-h100-fat-tree": 98.32, "dgx-a100-fat-tree": 32.77}   # topologies/dgx-*.toml
TARGET_HOURS = 0.5


def small_plan() -> dict:
    study = load_study("capacity_plan")
    return study.run(CLUSTERS, study.job("alexnet", 64, 2, "fp16"), TARGET_HOURS)


def rows_match(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        numbers = {k for k, v in g.items() if isinstance(v, float)}
        assert {k: g[k] for k in numbers} == pytest.approx({k: w[k] for k in numbers}, rel=1e-6)
        assert {k: v for k, v in g.items() if k not in numbers} == {k: v for k, v in w.items() if k not in numbers}


def test_small_capacity_plan():
    plan = small_plan()
    for got, want in zip(plan["clusters"], EXPECTED["clusters"], strict=True):
        rows_match(got["rows"], want["rows"])
        assert {k: v for k, v in got.items() if k != "rows"} == {k: v for k, v in want.items() if k != "rows"}
    for key in ("best", "runner_up", "cheapest_missing"):
        rows_match([plan[key]], [EXPECTED[key]])
    assert plan["why_lost"] == EXPECTED["why_lost"]

    samples = 1_281_167 * 90
    for cluster in plan["clusters"]:
        rows = cluster["rows"]
        for r in rows:
            assert r["time_to_train_s"] == pytest.approx(samples / r["samples_per_s"], rel=1e-9)
            assert r["usd_per_hour"] == pytest.approx(r["machines_used"] * PRICE_USD_PER_HOUR[r["cluster"]])
            assert r["cost_usd"] == pytest.approx(r["usd_per_hour"] * r["time_to_train_s"] / 3600, rel=1e-9)
            assert r["meets_target"] == (r["time_to_train_s"] <= TARGET_HOURS * 3600)
        meeting = [r for r in rows if r["meets_target"]]
        assert rows[:len(meeting)] == meeting
        for part in (meeting, rows[len(meeting):]):
            assert [r["cost_usd"] for r in part] == sorted(r["cost_usd"] for r in part)
        assert cluster["note"].startswith("no configuration trains") == (not meeting)
        assert cluster["note"].startswith("ranked first") == (0 < len(meeting) < len(rows))

    best, runner_up, late = plan["best"], plan["runner_up"], plan["cheapest_missing"]
    assert best["meets_target"] and runner_up["meets_target"] and not late["meets_target"]
    assert best["cost_usd"] == min(r["cost_usd"] for c in plan["clusters"] for r in c["rows"] if r["meets_target"])
    assert best["cost_usd"] <= runner_up["cost_usd"]
    h100, a100 = plan["clusters"]
    assert best["cluster"] == "dgx-h100-fat-tree" and h100["best"] == best and h100["why_lost"] == ""
    assert a100["best"] is None and "the fastest takes" in a100["note"]
    assert late["cluster"] == "dgx-a100-fat-tree" and late["cost_usd"] < best["cost_usd"]
