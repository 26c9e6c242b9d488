"""The networkx graph is built when asked (decision 041); routing's neighbour lists come
from the links themselves and must be the graph's neighbours in device order."""
from __future__ import annotations

import pytest

from clustersim.core.topogen import builtin_topologies, load_topology
from clustersim.core.topology import _device_order


@pytest.mark.parametrize("name", builtin_topologies())
def test_neighbours_are_the_graphs_in_device_order(name):
    topo = load_topology(name, machines=3) if "fat-tree" in name or "rail" in name else load_topology(name)
    assert topo._graph is None
    graph = topo.graph
    assert sorted(graph.nodes) == sorted(topo.devices)
    assert all(graph.nodes[n]["kind"] == d.kind and graph.nodes[n]["machine"] == d.machine
               for n, d in topo.devices.items())
    assert {(a, b) for a, b in graph.edges} | {(b, a) for a, b in graph.edges} == set(topo.capacity)
    assert all(graph.edges[a, b]["bandwidth"] == topo.capacity[(a, b)]
               and graph.edges[a, b]["latency"] == topo.latency[(a, b)] for a, b in graph.edges)
    for n in topo.devices:
        assert topo.neighbors(n) == sorted(graph.neighbors(n), key=lambda m: _device_order(topo.devices[m]))
    cut = next(iter(graph.edges))
    assert topo.without_link(*cut).graph.number_of_edges() == graph.number_of_edges()   # routing alone drops it
