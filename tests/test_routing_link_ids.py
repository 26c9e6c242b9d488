"""Links by id (decision 041): routes as link ids, a phase's links counted as int arrays and
the tuner's trial runs on a fluid keyed by link id give the answers of links by name.

``Topology.route_ids`` joins a route between machines from its kept parts; each pair's ids
must be its ``route``'s links looked up in ``link_id``, on topologies with cuts.
``network.link_counts`` must give ``link_weights``'s counts in its order (the order the
fluid numbers its resources in); a trial run must give the same per-byte time as one on
links by name, for every algorithm, with and without a cut.
"""
from __future__ import annotations

import random

import numpy as np
import pytest
import simpy

from clustersim.core.topogen import load_topology
from clustersim.core.topology import NoRoute, Topology
from sim import collectives
from sim.flows import link_weights
from sim.network import FlowNetwork, link_counts
from test_routing_shapes import CUTS, _groups
from test_speed_identical_b2 import _rebuilt


def _ids(topo: Topology, pairs) -> list[int]:
    return np.frombuffer(topo.route_ids(pairs), dtype=np.int32).tolist()


def _routed(topo: Topology, a: str, b: str) -> bool:
    try:
        topo.route(a, b)
    except NoRoute:
        return False
    return True


@pytest.mark.parametrize("name,cut", CUTS)
def test_route_ids_are_the_routes_links_by_id(name, cut):
    topo = load_topology(name, machines=6)
    if cut:
        topo = topo.without_link(*cut)
    rng = random.Random(1)
    outside = sorted(d for d, dev in topo.devices.items() if dev.machine is None)    # switches: a few
    devices = sorted(d for d, dev in topo.devices.items() if dev.machine is not None) + rng.sample(outside, min(5, len(outside)))
    pairs = [(a, b) for a in rng.sample(devices, min(40, len(devices))) for b in rng.sample(devices, min(12, len(devices)))
             if _routed(topo, a, b)]
    pairs += pairs[:7]                                # kept pairs asked again, mixed with new ones
    assert len(pairs) > 20
    routes = [topo.route(a, b) for a, b in pairs]
    fresh = _rebuilt(topo, True)                                  # the same, nothing routed yet
    fresh = fresh.without_link(*cut) if cut else fresh
    assert _ids(fresh, pairs) == [fresh.link_id[ln] for r in routes for ln in r]
    assert [fresh.route(a, b) for a, b in pairs] == routes      # names read back from the kept ids


def test_link_counts_are_link_weights_in_their_order():
    topo = load_topology("dgx-h100-fat-tree", machines=6)
    counted_as_arrays = 0
    for group in _groups(topo, 3):
        machines = [topo.machine_of(d) for d in group]
        for ph in collectives.phases("allreduce", "tree", group, 1.0, machines, collectives.ports(topo, group)):
            by_name = link_weights([topo.route(a, b) for a, b in ph.pairs])
            counts, arrays = link_counts(topo, ph.pairs)
            assert [(topo.links[i], n) for i, n in counts.items()] == list(by_name.items())
            if arrays is not None:
                assert arrays[0].tolist() == list(counts) and arrays[1].tolist() == list(counts.values())
                counted_as_arrays += 1
    assert counted_as_arrays > 0

@pytest.mark.parametrize("cut", [None, ("m1.gpu2", "m1.nvswitch"), ("m2.nic3", "m2.pcie1")])
def test_trial_runs_by_link_id_give_the_per_byte_times_by_name(cut):
    topo = load_topology("dgx-h100-fat-tree", machines=6)
    if cut:
        topo = topo.without_link(*cut)
    for group in _groups(topo, 5)[:4]:
        machines = [topo.machine_of(d) for d in group]
        rails = collectives.ports(topo, group)
        nvs = collectives.switches(topo, group)
        for algo in ("ring", "tree", *(["nvls_tree"] if collectives.nvls_algo(topo, "allreduce", group) else [])):
            times = [collectives._us_per_byte(topo, "allreduce", algo, group, machines, rails,
                                              collectives.LayoutCache(fast), nvs if algo == "nvls_tree" else None)
                     for fast in (True, False)]
            assert times[0] == times[1], (algo, group[:3])


def test_a_send_weights_links_by_id_as_by_name():
    """A send's links weighted by a speed function: kept by id across sends, the same
    weights as by name, also for a function of a few links' speeds only asked once each."""
    topo = load_topology("dgx-h100-fat-tree", machines=4)
    group = topo.compute_devices()
    pairs = list(zip(group, group[1:] + group[:1]))
    asked: list = []

    def speed(link):
        asked.append(link)
        return 0.5 + (hash(link) % 7) / 10

    ends = {}
    for fast in (True, False):
        env = simpy.Environment()
        net = FlowNetwork(env, topo, fast)
        for _ in range(2):
            net.send(pairs, 1e6, speed=speed).callbacks.append(lambda _e, f=fast: ends.setdefault(f, env.now))
        env.run()
    assert ends[True] == ends[False]
    links = {ln for a, b in pairs for ln in topo.route(a, b)}
    assert len(asked) == 3 * len(links)               # by id once; by name once a send
