"""The fair-share solver against progressive filling by its definition, and its array path
against its loops.

``reference_rates``: progressive filling, every live link's remaining capacity lowered level
by level, independent of ``sim.flows``.  The solver must give the same rates to round-off on
random cases, including sizes where the array path engages, and a fluid run must give the
same finish times as one that re-solves everything with the reference at every event.
"""
import random

import pytest
import simpy
from hypothesis import given, settings, strategies as st

import sim.flows as flows_mod
import sim.fluid as fluid_mod
from sim.flows import ARRAY_ENTRIES, max_min_rates
from sim.fluid import Fluid
from test_fluid_exact import simulated_finishes

# The reference sums loads and subtracts frozen shares in its own order, so on random cases
# of up to 20 flows with fractional weights the two differ by a few 1e-12 relative.
REL = 1e-11


def reference_rates(flows: dict, capacity: dict) -> dict:
    """Progressive filling, one level at a time over every live link."""
    rates, users = {}, {}
    for f, w in flows.items():
        for link in w:
            users.setdefault(link, []).append(f)
    remaining = {link: float(capacity[link]) for link in users}
    load = {link: sum(flows[f][link] for f in fs) for link, fs in users.items()}
    active, level = set(flows), 0.0
    while active:
        live = [l for l in load if load[l] > 0]
        bottleneck = min(live, key=lambda l: remaining[l] / load[l])
        step = max(remaining[bottleneck] / load[bottleneck], 0.0)
        level += step
        for link in live:
            remaining[link] -= step * load[link]
        for link in [l for l in live if remaining[l] <= 1e-12 * capacity[l]] or [bottleneck]:
            for f in users[link]:
                if f in active:
                    active.discard(f)
                    rates[f] = level
                    for l2, n in flows[f].items():
                        load[l2] -= n
            load[link] = 0
    return rates


def random_case(rng: random.Random, n_links: int, n_flows: int, frac: bool) -> tuple[dict, dict]:
    """Flows over up to four random links, integer members or NCCL-style fractional weights."""
    caps = {l: rng.choice([1.0, 3.0, 12.5e9, 25e9, 0.7]) for l in range(n_links)}
    flows = {}
    for f in range(n_flows):
        links = rng.sample(range(n_links), rng.randint(1, min(4, n_links)))
        flows[f] = {l: rng.choice([1, 2, 3]) / (0.93 if frac else 1) for l in links}
    return flows, caps


def with_array_entries(monkeypatch, threshold, flows, caps):
    monkeypatch.setattr(flows_mod, "ARRAY_ENTRIES", threshold)
    return max_min_rates(flows, caps)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32), st.integers(1, 12), st.integers(1, 20), st.booleans())
def test_rates_equal_the_reference_filling_to_round_off(seed, n_links, n_flows, frac):
    flows, caps = random_case(random.Random(seed), n_links, n_flows, frac)
    assert max_min_rates(flows, caps) == pytest.approx(reference_rates(flows, caps), rel=REL)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32), st.integers(1, 12), st.integers(1, 20), st.booleans())
def test_array_path_gives_the_loops_floats(seed, n_links, n_flows, frac):
    flows, caps = random_case(random.Random(seed), n_links, n_flows, frac)
    with pytest.MonkeyPatch.context() as mp:
        loops = with_array_entries(mp, 10**9, flows, caps)
        arrays = with_array_entries(mp, 1, flows, caps)
    assert arrays == loops


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**32), st.integers(1, 12), st.booleans())
def test_one_flow_gets_the_fillings_float(seed, n_links, frac):
    flows, caps = random_case(random.Random(seed), n_links, 1, frac)
    assert max_min_rates(flows, caps) == flows_mod._filling(flows, caps, None)


@pytest.mark.parametrize("seed", [0, 1, pytest.param(2, marks=pytest.mark.slow)])   # make test: integer 0, fractional 1
def test_large_components_on_the_array_path_match_the_reference(seed):
    # ~3,000 links and 6,000 flows (15,000 entries) in one solve: the array path by size
    rng = random.Random(seed)
    flows, caps = random_case(rng, 3000, 6000, frac=seed == 1)
    got = max_min_rates(flows, caps)
    # thousands of levels: the reference's running sum of steps drifts by a few 1e-12
    assert got == pytest.approx(reference_rates(flows, caps), rel=100 * REL)
    with pytest.MonkeyPatch.context() as mp:
        assert with_array_entries(mp, 10**9, flows, caps) == got


def reference_finishes(jobs: list, capacity: dict) -> list[float]:
    """Finish times of (start, amount, weights) jobs, every rate re-solved by the reference
    at every start and finish: the clock moves to the next event, nothing else is kept."""
    pending = sorted(range(len(jobs)), key=lambda j: jobs[j][0])
    left, finish, now = {}, [None] * len(jobs), 0.0
    while pending or left:
        while pending and jobs[pending[0]][0] <= now:
            j = pending.pop(0)
            left[j] = float(jobs[j][1])
        rates = reference_rates({j: jobs[j][2] for j in left}, capacity) if left else {}
        due = {j: now + left[j] / rates[j] for j in left}
        nxt = min(list(due.values()) + ([jobs[pending[0]][0]] if pending else []))
        for j in list(left):
            if due[j] <= nxt:
                finish[j] = due[j]
                del left[j]
            else:
                left[j] -= rates[j] * (nxt - now)
        now = nxt
    return finish


@pytest.mark.parametrize("array_entries", [ARRAY_ENTRIES, 16])
@pytest.mark.parametrize("hosts, n_jobs", [(16, 60), (64, 300)])
def test_fluid_finish_times_equal_a_full_reference_re_solve(monkeypatch, hosts, n_jobs, array_entries):
    # random transfers between hosts of one switch (up- and down-link each), some batched
    # at one instant; with the array path's threshold lowered, the coupled groups take it
    rng = random.Random(hosts)
    caps = {(h, d): rng.choice([12.5e9, 25e9]) for h in range(hosts) for d in "ud"}
    jobs = []
    for _ in range(n_jobs):
        a, b = rng.sample(range(hosts), 2)
        start = rng.choice([0.0, 1e-4, rng.uniform(0, 2e-3)])
        jobs.append((start, rng.choice([1e3, 2.0**20, 3e7]), {(a, "u"): 1, (b, "d"): rng.choice([1, 2])}))
    monkeypatch.setattr(flows_mod, "ARRAY_ENTRIES", array_entries)
    arrays = []
    monkeypatch.setattr(flows_mod, "_filling_arrays", lambda *a: arrays.append(1) or filling_arrays(*a))
    got = simulated_finishes(jobs, caps)
    assert arrays or array_entries == ARRAY_ENTRIES         # a lowered threshold engages the arrays
    assert got == pytest.approx(reference_finishes(jobs, caps), rel=1e-9)


filling_arrays = flows_mod._filling_arrays


def ring_and_random_finishes(seed: int) -> list[float]:
    """Three ring steps on 8 hosts (the same pattern each step, each step done before the
    next), then random transfers, some of them during a fourth step."""
    rng = random.Random(seed)
    caps = {(h, d): rng.choice([1.0, 2.5, 12.5e9]) for h in range(8) for d in "ud"}
    jobs = [(step * 1e7, 1e6, {(h, "u"): 1, ((h + 1) % 8, "d"): 1}) for step in range(4) for h in range(8)]
    for _ in range(20):
        a, b = rng.sample(range(8), 2)
        jobs.append((rng.choice([3e7, 3e7 + 3e3, 3e7 + rng.uniform(0, 5e3)]), rng.choice([1.0, 1e6]),
                     {(a, "u"): 1, (b, "d"): 2}))
    return simulated_finishes(jobs, caps)


@pytest.mark.parametrize("seed", range(4))
def test_remembered_solves_give_the_very_floats_of_solving_again(monkeypatch, seed):
    calls = []
    monkeypatch.setattr(fluid_mod, "max_min_rates", lambda *a: calls.append(1) or max_min_rates(*a))
    remembered = ring_and_random_finishes(seed)
    looked_up = len(calls)
    monkeypatch.setattr(fluid_mod, "MEMO_ENTRIES", 0)
    calls.clear()
    assert ring_and_random_finishes(seed) == remembered
    assert looked_up < len(calls)            # the ring's later steps were looked up


def test_a_capacity_change_forgets_remembered_solves():
    # the same two-link job before and after link L doubles: 1 s, then 0.5 s
    env = simpy.Environment()
    fluid = Fluid(env, {"L": 1.0, "M": 5.0})
    ends = []

    def run():
        yield fluid.start({"L": 1, "M": 1}, 1.0)
        ends.append(env.now)
        fluid.set_capacity("L", 2.0)
        yield fluid.start({"L": 1, "M": 1}, 1.0)
        ends.append(env.now)
    env.process(run())
    env.run()
    assert ends == [1.0, 1.5]


def test_users_that_miss_a_flow_over_a_saturated_link_are_refused_not_looped_on():
    from sim.flows import max_min_rates
    with pytest.raises(ValueError, match="users"):
        max_min_rates({"a": {"L": 1}, "b": {"L": 1}}, {"L": 2.0}, users={"L": ["a"]})
