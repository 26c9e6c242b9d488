"""The tuner's trial runs and the collective's own run share routed patterns (decision 038).

``LayoutCache.patterns`` keeps, per topology, what ``FlowNetwork`` routes for a tuple of
pairs (the links they load and their latency): a function of the pairs and the topology
alone, so the trial runs route a group once for the run too: checked against a network
that keeps nothing (same end times).  NCCL's link speeds are kept by what they depend on
(the kinds and compute capabilities of a link's ends).
"""
from __future__ import annotations

import dataclasses
import random

import simpy

from clustersim.core import nccl
from clustersim.core.topogen import load_topology
from clustersim.core.topology import Link, Topology
from sim import collectives
from sim.network import FlowNetwork


def _run(topo, coll, network: FlowNetwork | None = None, env: simpy.Environment | None = None):
    env = env or network.env
    network = network or FlowNetwork(env, topo)
    env.process(collectives.run(env, network, coll))
    env.run()
    return env.now


def test_the_run_finds_every_pattern_the_trial_routed():
    topo = load_topology("dgx-h100-fat-tree", machines=4)
    devices, cache = topo.compute_devices(), collectives.LayoutCache()
    coll = collectives.layout(topo, "allreduce", "ring", devices, 2.0**26, cache=cache)
    kept = cache.patterns(topo)
    trial = dict(kept)
    assert trial and all(ph.pairs in kept for ph in coll.phases)
    env = simpy.Environment()
    shared = FlowNetwork(env, topo, patterns=cache.patterns)
    end = _run(topo, coll, shared)
    assert kept.keys() == trial.keys() and all(kept[k] is trial[k] for k in trial)   # nothing routed anew
    assert end == _run(topo, coll, env=simpy.Environment())
    assert end == _run(topo, coll, FlowNetwork(simpy.Environment(), topo, shortcut=False))


def test_a_topology_at_a_reused_id_starts_afresh():
    cache = collectives.LayoutCache()
    a, b = load_topology("dgx-h100"), load_topology("dgx-h100")
    cache[("patterns", id(b))] = (a, {"stale": 1})
    assert cache.patterns(b) == {}
    assert cache.patterns(b) is cache.patterns(b)


def test_link_speeds_kept_by_their_ends_are_worked_out_per_link():
    """Speeds kept per (kinds, compute capabilities) of a link's ends equal the per-link
    formula, on a topology whose second machine has GPUs of another generation."""
    base = load_topology("dgx-h100-fat-tree", machines=2)
    devices = [dataclasses.replace(d, compute_capability=8.0) if d.name.startswith("m1.gpu") else d
               for d in base.devices.values()]
    links = [Link(a, b, d["bandwidth"], d["latency"]) for a, b, d in base.graph.edges(data=True)]
    topo = Topology("mixed", devices, links)
    for share in (1.0, 0.37):
        table = collectives.nccl_link_speed(topo, share)
        for link in random.Random(0).sample(sorted(topo.capacity), len(topo.capacity)):
            cc = max(topo.devices[end].compute_capability for end in link)
            assert table(link) == nccl.link_efficiency(collectives.link_kind(topo, link), cc) * share, link
    kinds = {(collectives.link_kind(topo, ln), max(topo.devices[e].compute_capability for e in ln))
             for ln in topo.capacity}
    assert {("nvlink", 8.0), ("nvlink", 9.0)} <= kinds
