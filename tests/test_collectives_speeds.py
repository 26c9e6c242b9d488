"""NCCL's link speeds kept by what they depend on (decision 038): the kinds and compute
capabilities of a link's two ends, checked against the per-link formula."""
from __future__ import annotations

import dataclasses
import random

import numpy as np

from clustersim.core import nccl
from clustersim.core.topogen import load_topology
from clustersim.core.topology import Link, Topology
from sim import collectives


def test_link_speeds_kept_by_their_ends_are_worked_out_per_link():
    """The memo of speeds by (kinds, compute capabilities) of a link's ends is complete: its
    answers equal the per-link formula, on a topology whose second machine has GPUs of
    another generation."""
    base = load_topology("dgx-h100-fat-tree", machines=2)
    devices = [dataclasses.replace(d, compute_capability=8.0) if d.name.startswith("m1.gpu") else d
               for d in base.devices.values()]
    links = [Link(a, b, d["bandwidth"], d["latency"]) for a, b, d in base.graph.edges(data=True)]
    topo = Topology("mixed", devices, links)
    cache: dict = {}                                  # as layout keeps them: a share's built on share 1's
    for share in (1.0, 0.37):
        table = collectives.nccl_link_speed(topo, share, cache)
        for link in random.Random(0).sample(sorted(topo.capacity), len(topo.capacity)):
            cc = max(topo.devices[end].compute_capability for end in link)
            assert table(link) == nccl.link_efficiency(collectives.link_kind(topo, link), cc) * share, link
    kinds = {(collectives.link_kind(topo, ln), max(topo.devices[e].compute_capability for e in ln))
             for ln in topo.capacity}
    assert {("nvlink", 8.0), ("nvlink", 9.0)} <= kinds


def test_speeds_by_link_id_are_the_speeds_by_link():
    """A table's speeds by id (``_Speeds.at``: a share's from share 1's by array) equal its
    speeds by link, asked in either order, ids repeated and out of order."""
    topo = load_topology("dgx-h100-fat-tree", machines=3)
    cache: dict = {}
    rng = random.Random(2)
    for share in (0.37, 1.0, 0.5):
        table = collectives.nccl_link_speed(topo, share, cache)
        ids = np.array(rng.sample(range(len(topo.links)), 400) * 2)
        early = [table(topo.links[i]) for i in ids[:50].tolist()]      # some by link first
        got = table.__self__.at(ids).tolist()
        assert got[:50] == early
        assert got == [table(topo.links[i]) for i in ids.tolist()]
        assert table.__self__.at(ids[::-1]).tolist() == got[::-1]
