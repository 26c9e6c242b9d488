"""NCCL's link speeds kept by what they depend on (decision 038): the kinds and compute
capabilities of a link's two ends, checked against the per-link formula."""
from __future__ import annotations

import dataclasses
import random

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
