"""Many new pairs routed at once (decision 044) give the plain searches' routes.

``Topology.route_ids`` finds a list's new pairs together: the parts inside machines from
each shape's kept route, from ``_MANY`` on the NIC-to-NIC parts across the fabric walked
hop by hop as arrays (D-mod-K digits by integer division), the rest pair by pair.  Every pair's
ids must be its route by the plain searches (``_reference``: ``_find_route``'s rule with
``_shortest`` for every part and ``nic_of`` searched without templates) looked up in
``link_id``, on topologies with cuts, a larger fat-tree, hosts with two uplinks or a direct
link, and random fabrics; a list with a pair that has no route still raises ``NoRoute``.
"""
from __future__ import annotations

import random
import tomllib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from clustersim.core import topogen, topology as topology_module
from clustersim.core.topogen import load_topology
from clustersim.core.topology import Link, NoRoute, Topology
from test_routing_shapes import CUTS, _dual_homed
from test_speed_identical_b2 import _rebuilt
from test_topology_fabric import random_fabric


def _reference(topo: Topology, plain: Topology, src: str, dst: str) -> tuple:
    """``src``'s route to ``dst`` by plain searches on ``topo``: between machines to the
    NIC (``plain``'s, searched per device), across the fabric, in from the NIC; inside one
    machine by its own links first."""
    a, b = topo.devices[src].machine, topo.devices[dst].machine
    if src == dst:
        return ()
    if a is not None and b is not None and a != b:
        nic_a, nic_b = plain.nic_of(src), plain.nic_of(dst)
        if nic_a and nic_b:
            return (_reference(topo, plain, src, nic_a) + topo._shortest(nic_a, nic_b, fabric_only=True)
                    + _reference(topo, plain, nic_b, dst))
    if a is not None and a == b:
        try:
            return topo._shortest(src, dst, inside=True)
        except LookupError:
            pass
    return topo._shortest(src, dst)


def _check_many(topo: Topology, pairs: list[tuple[str, str]]) -> int:
    """Asserts a fresh copy of ``topo`` routes ``pairs`` (those with a route) at once as
    ``_reference`` does; returns how many had one."""
    fresh, plain = _rebuilt(topo, True), _rebuilt(topo, False)
    want = []
    routed = []
    for a, b in pairs:
        try:
            want.append([fresh.link_id[ln] for ln in _reference(fresh, plain, a, b)])
        except NoRoute:
            continue
        routed.append((a, b))
    got = np.frombuffer(fresh.route_ids(routed), dtype=np.int32).tolist()
    assert got == [i for ids in want for i in ids]
    return len(routed)


def _check_walk(topo: Topology, pairs: list[tuple[str, str]]) -> int:
    """Asserts that every NIC pair ``_walk_fabric`` gives on a fresh copy of ``topo`` is the
    plain fabric search's route; returns how many it gave."""
    fresh = _rebuilt(topo, True)
    walked = fresh._walk_fabric(pairs)
    for (a, b), ids in walked.items():
        assert np.frombuffer(ids, dtype=np.int32).tolist() == [
            fresh.link_id[ln] for ln in fresh._shortest(a, b, fabric_only=True)], (a, b)
    return len(walked)


def _without(topo: Topology, cut) -> Topology:
    """``topo`` built anew without link ``cut`` (None: as it is)."""
    if cut is None:
        return topo
    links = [Link(a, b, d["bandwidth"], d["latency"]) for a, b, d in topo.graph.edges(data=True)
             if {a, b} != set(cut)]
    return Topology(topo.name, list(topo.devices.values()), links)


def _pairs(topo: Topology, count: int, seed: int) -> list[tuple[str, str]]:
    """Random ordered pairs of GPUs, NICs, CPUs and a few switches, on the same machine
    and on different ones, some asked twice."""
    rng = random.Random(seed)
    ends = sorted(d for d, dev in topo.devices.items() if dev.kind in ("gpu", "nic", "cpu"))
    ends += rng.sample(sorted(d for d, dev in topo.devices.items() if dev.machine is None),
                       min(3, sum(dev.machine is None for dev in topo.devices.values())))
    pairs = [(rng.choice(ends), rng.choice(ends)) for _ in range(count)]
    machines = sorted({dev.machine for dev in topo.devices.values() if dev.machine is not None})
    for m in machines[:3]:                     # every pair inside a few machines
        inside = [d for d in ends if topo.devices[d].machine == m]
        pairs += [(a, b) for a in inside for b in inside if a != b][:40]
    pairs = [(a, b) for a, b in pairs if a != b]
    return pairs + pairs[:10]


@pytest.mark.parametrize("name,cut", CUTS)
def test_many_pairs_at_once_route_as_the_plain_searches(name, cut):
    topo = _without(load_topology(name, machines=6), cut)
    assert _check_many(topo, _pairs(topo, 400, seed=len(name))) > 200


def _fat_tree(machines: int, k: int) -> Topology:
    """The built-in DGX H100 fat-tree on a k-ary fat-tree of ``k``."""
    path = Path(topogen.__file__).parents[2] / "topologies" / "dgx-h100-fat-tree.toml"
    data = topogen._with_base(tomllib.loads(path.read_text()), str(path))
    data["network"] = {**data["network"], "machines": machines, "k": k}
    return topogen.build_topology(data, str(path))


@pytest.mark.parametrize("cut", [None, ("edge0.0", "agg0.0"), ("agg1.2", "core14")])
def test_a_fat_tree_of_pods_routes_rail_rings_and_random_pairs_as_the_plain_searches(cut):
    """40 DGX: 320 host ports on a k = 12 fat-tree (5 pods), where paths between pods have
    two hops of six equally good next hops each (so both D-mod-K digits choose), with and
    without a cut in the fabric."""
    whole = _fat_tree(40, 12)
    assert whole.graph.has_edge("agg1.2", "core14") and "agg4.0" in whole.devices
    topo = _without(whole, cut)
    gpus = topo.compute_devices()
    ring = [(gpus[i], gpus[(i + 8) % len(gpus)]) for i in range(len(gpus))]     # rail rings across machines
    nics = [n for n, d in topo.devices.items() if d.kind == "nic"]
    rng = random.Random(3)
    across = [(rng.choice(nics), rng.choice(nics)) for _ in range(300)]
    assert _check_many(topo, ring + [(a, b) for a, b in across if a != b] + _pairs(topo, 200, seed=4)) > 700
    apart = [(a, b) for a, b in across if topo.devices[a].machine != topo.devices[b].machine]
    assert _check_walk(topo, apart) == len(apart) > topology_module._MANY


def test_hosts_with_two_uplinks_or_a_direct_link_are_routed_as_the_plain_searches():
    topo = _dual_homed()
    nics = [n for n, d in topo.devices.items() if d.kind == "nic"]
    with pytest.MonkeyPatch.context() as mp:          # a few pairs: walked as many would be
        mp.setattr(topology_module, "_MANY", 1)
        assert _check_many(topo, [(a, b) for a in nics for b in nics if a != b]) == 12
    apart = [(a, b) for a in nics for b in nics if topo.devices[a].machine != topo.devices[b].machine]
    assert _check_walk(topo, apart) == 0      # all left to the search: only b.nic0 has one uplink and no direct link


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_random_fabrics_route_many_pairs_as_the_plain_searches(data):
    """Switches linked at random with uneven capacities, hosts with one or two uplinks."""
    topo = random_fabric(data, 6, (3, 6), 3)
    nics = [n for n, d in topo.devices.items() if d.kind == "nic"]
    pairs = [(a, b) for a in nics for b in nics if topo.devices[a].machine != topo.devices[b].machine]
    with pytest.MonkeyPatch.context() as mp:          # however few: walked as many are
        mp.setattr(topology_module, "_MANY", 1)
        _check_routes_at_once(topo, pairs)
    _check_walk(topo, pairs)


def _check_routes_at_once(topo: Topology, pairs: list[tuple[str, str]]) -> None:
    """A fresh copy of ``topo`` routes ``pairs`` at once as the plain fabric search does, or
    raises ``NoRoute`` where one pair has none."""
    fresh = _rebuilt(topo, True)
    want = []
    for a, b in pairs:
        try:
            want.append([fresh.link_id[ln] for ln in fresh._shortest(a, b, fabric_only=True)])
        except NoRoute:
            with pytest.raises(NoRoute):
                _rebuilt(topo, True).route_ids(pairs)
            return
    got = np.frombuffer(fresh.route_ids(pairs), dtype=np.int32).tolist()
    assert got == [i for ids in want for i in ids]


def test_a_list_with_a_pair_without_a_route_raises_and_the_rest_stay_right():
    """m2's NIC 3 with both its links cut has no route to anything: a list of many pairs
    with one such pair raises ``NoRoute``, and the other pairs' routes, found before or
    after, are kept right."""
    topo = load_topology("dgx-h100-fat-tree", machines=6)
    for nb in list(topo.neighbors("m2.nic3")):
        topo = _without(topo, ("m2.nic3", nb))
    fresh, plain = _rebuilt(topo, True), _rebuilt(topo, False)
    pairs = [p for p in _pairs(topo, 300, seed=9) if "m2.nic3" not in p]
    with pytest.raises(NoRoute):
        fresh.route_ids(pairs[:150] + [("m0.gpu1", "m2.nic3")] + pairs[150:])
    for a, b in pairs:
        try:
            want = [fresh.link_id[ln] for ln in _reference(fresh, plain, a, b)]
        except NoRoute:
            continue
        assert np.frombuffer(fresh.route_ids([(a, b)]), dtype=np.int32).tolist() == want, (a, b)
