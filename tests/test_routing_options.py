"""A fabric tree's next hops worked out for every hop at once (decision 041) are the ones the
per-node rule picks: neighbours one level closer to the root whose bottleneck toward it,
capped by the link there, is at least the node's own (in the node's neighbour order)."""
from __future__ import annotations

import random

import pytest

from clustersim.core.topogen import load_topology
from clustersim.core.topology import Topology
from test_routing_shapes import random_fabric


def _plain_options(topo: Topology, fabric, tree, node: str) -> list[str]:
    i = fabric.index[node]
    want, width = tree.dist[i] - 1, tree.width[i]
    return [nb for nb in topo.neighbors(node) if nb in fabric.index
            and tree.dist[fabric.index[nb]] == want
            and min(topo.capacity[(node, nb)], tree.width[fabric.index[nb]]) >= width]


def _check(topo: Topology, roots, cap0s) -> int:
    fabric = topo._build_fabric()
    several = 0
    for root, cap0 in zip(roots, cap0s):
        tree = fabric.tree(root, cap0)
        for node in fabric.nodes:
            got = fabric.options(tree, node)
            assert got == _plain_options(topo, fabric, tree, node), (root, node)
            several += len(got) > 1
    return several


@pytest.mark.parametrize("cut", [None, ("edge0.0", "agg0.0"), ("agg1.3", "core99")])
def test_options_on_the_fat_tree_are_the_per_node_rule(cut):
    topo = load_topology("dgx-h100-fat-tree", machines=160)
    if cut:
        topo = topo.without_link(*cut)
    assert _check(topo, ["edge0.0", "edge1.7", "agg0.5", "core99"], [25e9, 50e9, float("inf"), 25e9]) > 0


@pytest.mark.parametrize("seed", range(20))
def test_options_on_random_fabrics_with_uneven_links_are_the_per_node_rule(seed):
    rng = random.Random(seed)
    topo = random_fabric(rng)
    roots = sorted(topo.devices)
    _check(topo, roots, [rng.choice([float("inf"), 25e9]) for _ in roots])
