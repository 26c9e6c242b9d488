"""Max-min fair allocation on textbook cases (Bertsekas & Gallager, Data Networks, 6.5)."""
import math

import pytest
from hypothesis import given, settings, strategies as st

from sim.flows import link_weights, max_min_rates


def one(*links):
    return link_weights([links])


def test_n_equal_flows_on_one_link_each_get_capacity_over_n():
    for n in (1, 2, 3, 7):
        rates = max_min_rates({i: one("L") for i in range(n)}, {"L": 12.0})
        assert rates == pytest.approx({i: 12.0 / n for i in range(n)})


def test_parking_lot_long_flow_gets_the_fair_share_and_short_flows_the_rest():
    # links A (cap 1) and B (cap 2); flow 0 crosses both, 1 only A, 2 only B
    rates = max_min_rates({0: one("A", "B"), 1: one("A"), 2: one("B")}, {"A": 1.0, "B": 2.0})
    assert rates == pytest.approx({0: 0.5, 1: 0.5, 2: 1.5})


def test_bottleneck_elsewhere_frees_capacity_for_others():
    # flow 0 limited to 1 by link S; flows 0,1 share big link L of 10 -> flow 1 gets 9
    rates = max_min_rates({0: one("S", "L"), 1: one("L")}, {"S": 1.0, "L": 10.0})
    assert rates == pytest.approx({0: 1.0, 1: 9.0})


def test_group_with_two_members_on_one_link_counts_twice():
    # a ring of 2 whose members both cross L, next to a single flow on L (cap 3):
    # 2x + y <= 3 with x = y -> 1 each
    rates = max_min_rates({"ring": link_weights([["L"], ["L"]]), "f": one("L")}, {"L": 3.0})
    assert rates == pytest.approx({"ring": 1.0, "f": 1.0})


def test_flow_without_links_is_instantaneous_and_bad_capacity_raises():
    assert max_min_rates({0: {}}, {}) == {0: math.inf}
    with pytest.raises(ValueError, match="must be > 0"):
        max_min_rates({0: one("L")}, {"L": 0.0})


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_allocation_is_feasible_and_every_flow_has_a_saturated_bottleneck(data):
    n_links = data.draw(st.integers(1, 6))
    caps = {l: data.draw(st.floats(0.1, 100)) for l in range(n_links)}
    flows = {}
    for f in range(data.draw(st.integers(1, 8))):
        routes = data.draw(st.lists(st.lists(st.sampled_from(range(n_links)), min_size=1, max_size=3, unique=True),
                                    min_size=1, max_size=3))
        flows[f] = link_weights(routes)
    rates = max_min_rates(flows, caps)
    load = {l: sum(w.get(l, 0) * rates[f] for f, w in flows.items()) for l in caps}
    for l in caps:
        assert load[l] <= caps[l] * (1 + 1e-9)
    for f, w in flows.items():
        # max-min optimality: some link of f is saturated and f has the largest rate on it
        assert any(load[l] >= caps[l] * (1 - 1e-9) and
                   all(rates[g] <= rates[f] * (1 + 1e-9) for g in flows if l in flows[g])
                   for l in w)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**32))
def test_links_as_indices_of_a_capacity_list_give_the_floats_of_a_mapping(seed):
    # the array filling numbers links by a mark over a list's indices, a mapping's by first
    # use: the same floats either way, in the loops and in the arrays
    import random
    import sim.flows as flows_mod
    rng = random.Random(seed)
    caps = [rng.choice([1.0, 3.0, 12.5e9, 0.7, rng.uniform(0.1, 9)]) for _ in range(rng.randint(1, 40))]
    flows = {f: {l: rng.choice([1, 2, 1 / 0.93]) for l in rng.sample(range(len(caps)), rng.randint(1, min(6, len(caps))))}
             for f in range(rng.randint(2, 30))}
    old = flows_mod.ARRAY_ENTRIES
    flows_mod.ARRAY_ENTRIES = 1                 # the arrays, whatever the size
    try:
        by_list = max_min_rates(flows, caps)
        by_dict = max_min_rates(flows, dict(enumerate(caps)))
    finally:
        flows_mod.ARRAY_ENTRIES = old
    assert by_list == by_dict
    assert by_list == max_min_rates(flows, dict(enumerate(caps)))     # arrays against the loops (the bound restored)
