"""Routes kept per machine shape and NCCL link speeds kept per share (issue 18, decision
031) give the answers of the plain paths, float for float.

The fast path is what ships: ``Topology(route_templates=True)`` routes the inside of a
machine once per machine shape, and ``collectives.LayoutCache()`` keeps one link-speed table
per topology and share across collectives.  The slow path rebuilds the same topology with
``route_templates=False`` and simulates with ``shortcut=False`` (the engine's
``LayoutCache(shortcut=False)``: every collective makes its link speeds anew, as before;
the engine's other shortcuts off too).  Each scenario runs both ways in one process;
step times, the simulated end, the stall and an md5 of every span must be equal.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools

import pytest

import sim.engine
from clustersim.core.plan import plan
from clustersim.core.scenario import scenario_from_dict
from clustersim.core.topology import Link, Topology
from sim import collectives
from test_speed_identical import _case


CASES = {
    # make bench's alexnet step: stragglers, NCCL's tuner over 3 DGX on a fat-tree
    "fat-tree-stragglers": _case("dgx-h100-fat-tree", "alexnet", 64, 2, machines=3, replicas=24,
                                 faults={"slowdown_sigma": 0.05}),
    # the ring forced across machines, and tree: other speeds' shares
    "fat-tree-ring": _case("dgx-h100-fat-tree", "alexnet", 64, 2, machines=2, replicas=16,
                           training={"allreduce": "ring"}),
    "fat-tree-tree": _case("dgx-h100-fat-tree", "alexnet", 64, 2, machines=2, replicas=16,
                           training={"allreduce": "tree"}),
    # one DGX H100: NCCL's tuner offers NVLS (test below checks it runs it)
    "one-dgx-nvls": _case("dgx-h100", "alexnet", 64, 2, replicas=8),
    # a GPU fails mid-run: its collectives never complete
    "device-failure": _case("dgx-h100-fat-tree", "alexnet", 64, 3, machines=2, replicas=16,
                            faults={"slowdown_sigma": 0.05, "fail": [{"at_s": 0.012, "device": "m1.gpu3"}]}),
    # a link cut inside a machine: that machine's shape changes under the kept routes
    "link-cut-inside": _case("dgx-h100-fat-tree", "alexnet", 64, 3, machines=2, replicas=16,
                             faults={"fail": [{"at_s": 0.012, "link": ["m1.gpu2", "m1.nvswitch"]}]}),
    # host ranks with measured send and receive costs
    "host-ranks": _case("distbelief-2012", "distbelief-speech", 64, 2, machines=8, model_parallel=8),
}


def _rebuilt(topology: Topology, route_templates: bool) -> Topology:
    """The same topology, built anew with or without routes kept per machine shape."""
    links = [Link(a, b, d["bandwidth"], d["latency"]) for a, b, d in topology.graph.edges(data=True)]
    return Topology(topology.name, list(topology.devices.values()), links, topology.description,
                    topology.core_pools, topology.price_usd_per_hour, topology.power_w, route_templates)


def _run(data: dict, fast: bool):
    sc = scenario_from_dict(data, "speed.toml")
    sc = dataclasses.replace(sc, topology=_rebuilt(sc.topology, fast))
    res = sim.engine.simulate(plan(sc), shortcut=fast)
    spans = sorted(repr((s.name, s.kind, s.where, s.replica, s.step, s.start_s, s.end_s, s.links))
                   for s in res.trace.spans)
    digest = hashlib.md5("\n".join(spans).encode()).hexdigest()
    return res.trace.step_times(), res.sim_time_s, res.stalled_at_s, len(spans), digest


@pytest.mark.parametrize("name", CASES)
def test_routes_and_speeds_kept_give_the_plain_answers(name):
    fast = _run(CASES[name], True)
    plain = _run(CASES[name], False)
    assert fast[3] > 0
    assert fast == plain


def test_the_failures_happen_within_the_runs():
    """The GPU fails and the link is cut before the runs end, so those cases check what they mean to."""
    for name, gone in (("device-failure", "m1.gpu3"), ("link-cut-inside", None)):
        res = sim.engine.simulate(plan(scenario_from_dict(CASES[name], "speed.toml")))
        assert res.sim_time_s > 0.012
        if gone:
            assert gone in res.engine.failed_ever


def test_one_dgx_runs_nvls():
    sc = scenario_from_dict(CASES["one-dgx-nvls"], "speed.toml")
    gpus = sc.topology.compute_devices()
    coll = collectives.layout(sc.topology, "allreduce", "auto", gpus, 2.0**26, cache=collectives.LayoutCache())
    assert coll.algo == "nvls" and coll.speed is not None


def _pairs(topology: Topology):
    """Every ordered pair of devices inside each machine that has a route of its own."""
    for m in sorted({d.machine for d in topology.devices.values() if d.machine is not None}):
        members = [n for n, d in topology.devices.items() if d.machine == m and d.kind in ("gpu", "nic", "cpu")]
        yield from itertools.permutations(members, 2)


@pytest.mark.parametrize("topology,machines", [("dgx-h100-fat-tree", 3), ("distbelief-2012", 4)])
def test_routes_by_machine_shape_equal_every_pairs_own_search(topology, machines):
    sc = scenario_from_dict(_case(topology, "alexnet", 64, 1, machines=machines), "routes.toml")
    fast, plain = _rebuilt(sc.topology, True), _rebuilt(sc.topology, False)
    cut = ("m1.gpu2", "m1.nvswitch") if "m1.nvswitch" in fast.devices else None
    tops = [(fast, plain)] + ([(fast.without_link(*cut), plain.without_link(*cut))] if cut else [])
    for f, p in tops:
        pairs = list(_pairs(f))
        assert pairs
        for a, b in pairs:
            assert f.route(a, b) == p.route(a, b), (a, b)
        assert any(t is not None for t in f._templates.values())   # shapes kept and used, not all searched anew
    if cut:                                           # the cut machine routes on a shape of its own
        assert tops[1][0].route("m1.gpu2", "m1.gpu5") != fast.route("m1.gpu2", "m1.gpu5")


def test_speeds_kept_per_share_equal_speeds_made_anew():
    sc = scenario_from_dict(_case("dgx-h100-fat-tree", "alexnet", 64, 1, machines=2), "speeds.toml")
    topology, cache = sc.topology, collectives.LayoutCache()
    links = list(topology.capacity)
    for share in (1.0, 0.9166666666666666, 0.3, 1 / 3):
        kept = collectives.nccl_link_speed(topology, share, cache)
        anew = collectives.nccl_link_speed(topology, share)
        assert [kept(ln) for ln in links] == [anew(ln) for ln in links]
    assert len([k for k in cache if k[0] == "speeds"]) == 4
