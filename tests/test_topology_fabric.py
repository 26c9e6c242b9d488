"""Routes across the fabric from cached per-switch BFS trees equal the plain BFS's."""
import itertools
import random

import pytest
from hypothesis import given, settings, strategies as st

from clustersim.core.topogen import builtin_topologies, load_topology
from clustersim.core.topology import Device, Link, Topology


def nic_pairs(topo, limit=400, seed=0, ends=()):
    """Up to ``limit`` distinct ordered pairs of NICs on different machines, drawn at random
    (``seed``); ``ends``: only pairs with one of these NICs at either end.  Large fabrics
    draw pairs one by one instead of listing them all (160 machines: 1.6 million pairs)."""
    nics = [n for n, d in topo.devices.items() if d.kind == "nic"]
    firsts, rng = list(ends) or nics, random.Random(seed)
    apart = lambda a, b: topo.devices[a].machine != topo.devices[b].machine  # noqa: E731
    if len(firsts) * len(nics) <= 20 * limit:
        pairs = [(a, b) for a in firsts for b in nics if apart(a, b)]
        pairs += [(b, a) for a, b in pairs if b not in firsts] if ends else []
        rng.shuffle(pairs)
        return pairs[:limit]
    drawn: dict = {}
    while len(drawn) < limit:
        a, b = rng.choice(firsts), rng.choice(nics)
        if apart(a, b):
            drawn[(b, a) if ends and rng.random() < 0.5 else (a, b)] = None
    return list(drawn)


def assert_same_routes(topo, pairs):
    for a, b in pairs:
        try:
            want = topo._shortest(a, b, fabric_only=True)
        except LookupError:
            with pytest.raises(LookupError):
                topo._across_fabric(a, b)
            continue
        assert topo._across_fabric(a, b) == want, (a, b)


@pytest.mark.parametrize("name", builtin_topologies())
def test_builtin_fabrics_route_as_the_plain_bfs(name):
    topo = load_topology(name, machines=6)
    assert_same_routes(topo, nic_pairs(topo))


def test_two_pod_fat_tree_and_one_without_a_link_route_as_the_plain_bfs():
    """Without edge0.0-agg0.0, the routes that change start or end under edge0.0: the pairs
    checked there have one end under it (of 200 random pairs, 5 crossed it)."""
    topo = load_topology("dgx-h100-fat-tree", machines=160)
    assert_same_routes(topo, nic_pairs(topo, limit=300))
    cut = topo.without_link("edge0.0", "agg0.0")
    under = [n for n in topo.devices if topo.devices[n].kind == "nic" and "edge0.0" in topo.graph[n]]
    assert len(under) == 32
    assert_same_routes(cut, nic_pairs(cut, limit=100, seed=1, ends=under))


def random_fabric(data, switches: int, machines: tuple[int, int], nics: int) -> Topology:
    """Up to ``switches`` switches linked at random with uneven capacities, and hosts (a
    number of machines in ``machines``, up to ``nics`` NICs each) with one or two uplinks."""
    n_sw = data.draw(st.integers(1, switches))
    devices = [Device(f"s{i}", "switch") for i in range(n_sw)]
    links = []
    gbps = st.sampled_from([10e9, 25e9, 50e9, 100e9])
    for i, j in itertools.combinations(range(n_sw), 2):
        if data.draw(st.booleans()):
            links.append(Link(f"s{i}", f"s{j}", data.draw(gbps), 1e-6))
    for m in range(data.draw(st.integers(*machines))):
        for k in range(data.draw(st.integers(1, nics))):
            nic = f"m{m}.nic{k}"
            devices.append(Device(nic, "nic", machine=m))
            ups = data.draw(st.lists(st.integers(0, n_sw - 1), min_size=1, max_size=2, unique=True))
            links += [Link(nic, f"s{u}", data.draw(gbps), 1e-6) for u in ups]
    return Topology("random", devices, links)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_random_fabrics_with_uneven_links_route_as_the_plain_bfs(data):
    topo = random_fabric(data, 7, (2, 5), 2)
    assert_same_routes(topo, nic_pairs(topo))
