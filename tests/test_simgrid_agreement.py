"""The flow model's finish times against SimGrid's max-min kernel (CM02, no factors) on small
random trees, and the bench's flow sets replayed as the very flows bench_sim draws (issue 18).
The SimGrid cases skip unless Debian's /usr/bin/python3 imports simgrid (python3-simgrid)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import flow_sets  # noqa: E402

MISSING = flow_sets.simgrid_missing()
needs_simgrid = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")
AGREE = 1e-6        # of each flow's duration; decision 035 has what is seen (<= 1e-9 on these)


@needs_simgrid
def test_two_flows_share_one_link_in_both():
    cap = {"l": 1e9}
    flows = [(0.0, {"l": 1}, 1e6), (0.0, {"l": 1}, 1e6), (0.003, {"l": 1}, 5e5)]
    ours, _ = flow_sets.run_ours(flows, cap, "times")
    _, theirs, _ = flow_sets.run_simgrid(flows, cap, "times")
    assert ours == pytest.approx([0.002, 0.002, 0.0035], rel=1e-12)
    assert theirs == pytest.approx(ours, rel=1e-12)


@needs_simgrid
@pytest.mark.parametrize("seed", range(6))
def test_random_trees_finish_as_in_simgrid(seed):
    rng = np.random.default_rng(seed)
    flows, cap = flow_sets.random_tree_set(rng, switches=int(rng.integers(2, 8)), hosts=int(rng.integers(4, 12)),
                                           flows=36, mean_gap_s=2e-4)
    ours, _ = flow_sets.run_ours(flows, cap, "times")
    _, theirs, _ = flow_sets.run_simgrid(flows, cap, "times")
    assert flow_sets.max_rel_diff(flows, ours, theirs, "times") <= AGREE


@needs_simgrid
def test_steps_on_a_tree_finish_as_in_simgrid():
    flows, cap = flow_sets.random_tree_set(np.random.default_rng(7), switches=5, hosts=9, flows=30, mean_gap_s=1.0)
    steps = [(i // 10, route, size) for i, (_, route, size) in enumerate(flows)]
    ours, end = flow_sets.run_ours(steps, cap, "steps")
    _, theirs, _ = flow_sets.run_simgrid(steps, cap, "steps")
    assert flow_sets.max_rel_diff(steps, ours, theirs, "steps") <= AGREE
    assert end == max(ours)


def test_bench_sets_are_the_flows_bench_sim_runs():
    import bench_sim
    sets = flow_sets.bench_sets(bench_sim)
    for kind in bench_sim.FLOW_SETS:
        flows, cap, mode = sets[kind]
        finish, end = flow_sets.run_ours(flows, cap, mode)
        assert end == bench_sim.flow_rate(kind)[2]      # the last finish ends both runs
        assert min(finish) > 0 and max(finish) <= end
    assert len(sets["ring"][0]) == bench_sim.RING_HOSTS * bench_sim.RING_STEPS
    assert len(sets["random"][0]) == bench_sim.RANDOM_FLOWS


@needs_simgrid
def test_raw_contexts_give_the_same_floats():
    """The bench may time SimGrid with its fastest contexts: the kernel's answers stay."""
    flows, cap = flow_sets.random_tree_set(np.random.default_rng(3), switches=4, hosts=8, flows=30, mean_gap_s=2e-4)
    _, threads, _ = flow_sets.run_simgrid(flows, cap, "times")
    _, raw, _ = flow_sets.run_simgrid(flows, cap, "times", config=("contexts/factory:raw",))
    assert raw == threads
