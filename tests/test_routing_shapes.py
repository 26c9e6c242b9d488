"""Routing work kept per machine shape (decision 038) gives the plain searches' answers.

``Topology.nic_of`` and ``collectives.ports`` keep their answer by place for each machine
shape; ``_across_fabric`` takes a host port's one uplink without searching its
neighbours.  Each is compared with the same topology built with ``route_templates=False``
(every pair searched by itself) or with the plain breadth-first search.
"""
from __future__ import annotations

import random

import networkx as nx
import pytest

from clustersim.core.topogen import builtin_topologies, load_topology
from clustersim.core.topology import Device, Link, NoRoute, Topology
from sim import collectives
from test_speed_identical_b2 import _rebuilt


def _pair(name: str, machines: int = 6, cut: tuple[str, str] | None = None):
    topo = load_topology(name, machines=machines)
    fast, plain = _rebuilt(topo, True), _rebuilt(topo, False)
    if cut:
        assert topo.graph.has_edge(*cut), cut
        fast, plain = fast.without_link(*cut), plain.without_link(*cut)
    return fast, plain


CUTS = [("dgx-h100-fat-tree", None), ("dgx-h100-fat-tree", ("m1.gpu2", "m1.nvswitch")),
        ("dgx-h100-fat-tree", ("m2.nic3", "m2.pcie1")), ("distbelief-2012", None), ("ethernet-cluster", None),
        ("pcie-4gpu", None), ("dgx-h100-rail", ("m0.pcie0", "m0.cpu"))]


@pytest.mark.parametrize("name,cut", CUTS)
def test_nic_of_by_machine_shape_is_the_plain_search(name, cut):
    fast, plain = _pair(name, cut=cut)
    for device in fast.devices:
        assert fast.nic_of(device) == plain.nic_of(device), device


def test_a_cut_inside_one_machine_moves_its_nic_and_no_others():
    """Without m2's NIC 3 - PCIe link, m2's GPUs behind that switch leave by its other NIC:
    the kept answer of the other machines must not be reused there."""
    fast, plain = _pair("dgx-h100-fat-tree", cut=("m2.nic3", "m2.pcie1"))
    base = load_topology("dgx-h100-fat-tree", machines=6)
    moved = [d for d in fast.compute_devices() if fast.nic_of(d) != base.nic_of(d)]
    assert moved and all(d.startswith("m2.") for d in moved)
    assert [fast.nic_of(d) for d in moved] == [plain.nic_of(d) for d in moved]


def _groups(topo: Topology, seed: int) -> list[list[str]]:
    """Groups a collective may run over: every GPU; one rail of every machine; random
    subsets in random order (so machines hold members at different places)."""
    devices, rng = topo.compute_devices(), random.Random(seed)
    by_rail: dict[int, list[str]] = {}
    for d in devices:
        by_rail.setdefault(int(d.rsplit("gpu", 1)[-1]) if "gpu" in d else 0, []).append(d)
    out = [devices, *by_rail.values()]
    for _ in range(6):
        out.append(rng.sample(devices, rng.randint(2, len(devices))))
    return out


@pytest.mark.parametrize("name,cut", CUTS)
def test_ports_by_machine_shape_are_the_plain_ports(name, cut):
    fast, plain = _pair(name, cut=cut)
    for group in _groups(fast, seed=len(name)):
        assert collectives.ports(fast, group) == collectives.ports(plain, group), group


def test_a_cut_nic_link_changes_that_machines_ports():
    """The cut case above means something: m2's ports differ from an uncut machine's by place."""
    fast, _ = _pair("dgx-h100-fat-tree", cut=("m2.nic3", "m2.pcie1"))
    rails = collectives.ports(fast, fast.compute_devices())
    by_place = [[tuple(x.split(".", 1)[1] for x in r) for r in machine] for machine in rails]
    assert by_place[2] != by_place[0] and by_place[1] == by_place[0]


def _dual_homed() -> Topology:
    """Two switches; host a.nic0 linked to both (two ways up), b.nic0 to one, and a direct
    NIC-to-NIC link between a.nic1 and b.nic1 besides their uplinks."""
    devices = [Device("s0", "switch"), Device("s1", "switch")]
    devices += [Device(f"{m}.nic{i}", "nic", machine=k) for k, m in enumerate("ab") for i in range(2)]
    links = [Link("s0", "s1", 50e9, 1e-6), Link("a.nic0", "s0", 25e9, 1e-6), Link("a.nic0", "s1", 50e9, 1e-6),
             Link("b.nic0", "s1", 50e9, 1e-6), Link("a.nic1", "s0", 50e9, 1e-6), Link("b.nic1", "s1", 50e9, 1e-6),
             Link("a.nic1", "b.nic1", 10e9, 1e-6)]
    return Topology("dual", devices, links)


def test_hosts_with_two_uplinks_or_a_direct_link_route_as_the_plain_bfs():
    topo = _dual_homed()
    nics = [n for n, d in topo.devices.items() if d.kind == "nic"]
    for a in nics:
        for b in nics:
            if topo.devices[a].machine != topo.devices[b].machine:
                assert topo._across_fabric(a, b) == topo._shortest(a, b, fabric_only=True), (a, b)
    assert topo._across_fabric("a.nic1", "b.nic1") == (("a.nic1", "b.nic1"),)
    assert topo._across_fabric("a.nic0", "b.nic0") == (("a.nic0", "s1"), ("s1", "b.nic0"))


@pytest.mark.parametrize("name", builtin_topologies())
def test_every_gpu_pair_routes_as_without_templates(name):
    fast, plain = _pair(name, machines=4)
    devices = fast.compute_devices()
    pairs = [(a, b) for a in devices for b in devices if a != b]
    for a, b in random.Random(1).sample(pairs, min(len(pairs), 600)):
        assert fast.route(a, b) == plain.route(a, b), (a, b)


def _plain_tree(topo: Topology, root: str, cap0: float) -> tuple[dict, dict]:
    """Hops to ``root`` over the switches and the widest bottleneck over shortest paths, by
    a plain breadth-first search: what ``_Fabric.tree`` computes."""
    fabric = topo._fabric or topo._build_fabric()
    dist, width, level = {root: 0}, {root: cap0}, [root]
    while level:
        nxt = []
        for u in level:
            for v in topo.neighbors(u):
                if v in fabric.index and v not in dist:
                    dist[v] = dist[u] + 1
                    nxt.append(v)
        for v in nxt:
            width[v] = max(min(topo.capacity[(v, u)], width[u]) for u in topo.neighbors(v)
                           if dist.get(u, -2) == dist[v] - 1)
        level = nxt
    return dist, width


@pytest.mark.parametrize("cut", [None, ("edge0.0", "agg0.0"), ("agg1.3", "core99")])
def test_fabric_trees_are_the_plain_bfs(cut):
    topo = load_topology("dgx-h100-fat-tree", machines=160)
    if cut:
        assert topo.graph.has_edge(*cut)
        topo = topo.without_link(*cut)
    fabric = topo._build_fabric()
    for root in ["edge0.0", "edge1.7", "agg0.5", "core99", "core0"]:
        tree = fabric.tree(root, 25e9)
        dist, width = _plain_tree(topo, root, 25e9)
        assert {n: tree.dist[i] for n, i in fabric.index.items() if tree.dist[i] >= 0} == dist
        assert {n: tree.width[i] for n, i in fabric.index.items() if tree.dist[i] >= 0} == width


def random_fabric(rng: random.Random) -> Topology:
    """2-12 switches, each pair linked with chance 0.4 at one of four speeds."""
    n = rng.randint(2, 12)
    links = [Link(f"s{i}", f"s{j}", rng.choice([10e9, 25e9, 50e9, 100e9]), 1e-6)
             for i in range(n) for j in range(i + 1, n) if rng.random() < 0.4]
    return Topology("random", [Device(f"s{i}", "switch") for i in range(n)], links)


@pytest.mark.parametrize("seed", range(20))
def test_trees_on_random_fabrics_with_uneven_links_are_the_plain_bfs(seed):
    rng = random.Random(seed)
    topo = random_fabric(rng)
    fabric = topo._build_fabric()
    for root in fabric.nodes:
        cap0 = rng.choice([float("inf"), 25e9])
        tree = fabric.tree(root, cap0)
        dist, width = _plain_tree(topo, root, cap0)
        assert {k: tree.dist[i] for k, i in fabric.index.items() if tree.dist[i] >= 0} == dist
        assert {k: tree.width[i] for k, i in fabric.index.items() if tree.dist[i] >= 0} == width


@pytest.mark.parametrize("name", builtin_topologies())
def test_the_graph_and_link_tables_are_those_built_link_by_link(name):
    """``Topology`` adds its devices and links to the graph at once: the same nodes, edges,
    attributes and orders as adding them one by one, and the same capacity and latency
    tables (both directions, in link order)."""
    topo = load_topology(name, machines=3)
    links = [Link(a, b, d["bandwidth"], d["latency"]) for a, b, d in topo.graph.edges(data=True)]
    random.Random(len(links)).shuffle(links)          # an order not the fast build's own
    graph, capacity, latency = nx.Graph(), {}, {}
    for d in topo.devices.values():
        graph.add_node(d.name, kind=d.kind, machine=d.machine)
    for ln in links:
        graph.add_edge(ln.a, ln.b, bandwidth=ln.bandwidth, latency=ln.latency)
        for u, v in ((ln.a, ln.b), (ln.b, ln.a)):
            capacity[(u, v)], latency[(u, v)] = ln.bandwidth, ln.latency
    built = Topology(name, list(topo.devices.values()), links)
    assert list(built.graph.nodes(data=True)) == list(graph.nodes(data=True))
    assert list(built.graph.edges(data=True)) == list(graph.edges(data=True))
    assert {n: list(built.graph.adj[n]) for n in graph} == {n: list(graph.adj[n]) for n in graph}
    assert list(built.capacity.items()) == list(capacity.items())
    assert list(built.latency.items()) == list(latency.items())


def test_bad_links_are_refused():
    devices = [Device("s0", "switch"), Device("s1", "switch")]
    with pytest.raises(KeyError):
        Topology("t", devices, [Link("s0", "s9", 1e9, 0.0)])
    for links, says in (([Link("s0", "s0", 1e9, 0.0)], "is a self-loop"),
                        ([Link("s0", "s1", 1e9, 0.0), Link("s1", "s0", 1e9, 0.0)], "is listed twice")):
        with pytest.raises(ValueError, match=f"link s. - s. {says}") as err:
            Topology("t", devices, links)
        assert err.value.field == "link"
    with pytest.raises(ValueError, match="device name 's0' is used twice") as err:
        Topology("t", devices + [Device("s0", "switch")], [])
    assert err.value.field == "device"


def test_no_route_names_the_two_machines_where_they_differ():
    """U36: a GPU given the wrong ``machine`` (5, linked inside machine 1) was "no route from
    m0.gpu0 to m1.gpu1", naming neither machine; a route between machines passes only
    through devices of those two machines and of none.  The note is added where a file's
    topology is checked as written (plan, topology show, collective), not to a mid-run
    cut's stall (review R37: "(on machines 0 and 1) (a link cut)")."""
    devices = [Device("a", "gpu", 0), Device("s", "switch", 1), Device("b", "gpu", 5)]
    topo = Topology("t", devices, [Link("a", "s", 1e9, 0.0), Link("s", "b", 1e9, 0.0)])
    with pytest.raises(NoRoute, match=r"^no route from a to b$") as err:
        topo.route("a", "b")
    assert err.value.ends == ("a", "b") and topo.machines_note("a", "b") == " (on machines 0 and 5)"
    fixed = Topology("t", [Device("a", "gpu", 0), Device("s", "switch", 1), Device("b", "gpu", 1)],
                     [Link("a", "s", 1e9, 0.0), Link("s", "b", 1e9, 0.0)])
    assert fixed.route("a", "b") == (("a", "s"), ("s", "b"))
