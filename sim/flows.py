"""Max-min fair rate allocation over shared links: a pure function, no simpy inside.

A *flow* here is an entity with one or more member routes that all move at the same rate
``x_f`` (a single transfer has one member; the n transfers of a ring collective are one
entity with n members, because a ring advances at the pace of its slowest hop).  With
``n_{f,l}`` the number of members of ``f`` that cross link ``l``, the allocation solves

    maximise min-lexicographically (x_f)   subject to   sum_f n_{f,l} * x_f <= C_l   for every link l

by progressive filling (water-filling): raise every unfrozen rate together until some link
saturates, freeze the flows that cross it, repeat.  A flow that crosses no capacitated link
gets rate ``inf`` (the caller treats it as instantaneous).
"""
from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

Link = Hashable
FlowId = Hashable

# Relative slack when deciding that a link is saturated (float round-off of the filling).
_EPS = 1e-12


def link_weights(routes: Sequence[Sequence[Link]]) -> dict[Link, int]:
    """n_{f,l}: how many member routes of one flow cross each link."""
    weights: dict[Link, int] = {}
    for route in routes:
        for link in route:
            weights[link] = weights.get(link, 0) + 1
    return weights


def max_min_rates(flows: Mapping[FlowId, Mapping[Link, int]],
                  capacity: Mapping[Link, float]) -> dict[FlowId, float]:
    """Rates per flow (same unit as ``capacity``) for ``flows``: id -> {link: members crossing it}.

    Raises KeyError if a flow crosses a link with no capacity and ValueError if a capacity
    is not > 0.
    """
    rates: dict[FlowId, float] = {}
    users: dict[Link, list[FlowId]] = {}
    for fid, weights in flows.items():
        if not weights:
            rates[fid] = float("inf")
            continue
        for link in weights:
            if capacity[link] <= 0:
                raise ValueError(f"capacity of link {link!r} (={capacity[link]}) must be > 0.")
            users.setdefault(link, []).append(fid)
    remaining = {link: float(capacity[link]) for link in users}
    load = {link: sum(flows[f][link] for f in fs) for link, fs in users.items()}  # unfrozen weight
    level = 0.0
    active = {f for f in flows if f not in rates}
    while active:
        # the next link to saturate: smallest fair increment remaining / unfrozen weight
        bottleneck = min((l for l in load if load[l] > 0), key=lambda l: remaining[l] / load[l])
        step = max(remaining[bottleneck] / load[bottleneck], 0.0)
        level += step
        for link in load:
            remaining[link] -= step * load[link]
        saturated = [l for l in load if load[l] > 0 and remaining[l] <= _EPS * capacity[l]]
        saturated = saturated or [bottleneck]
        for link in saturated:
            for fid in users[link]:
                if fid in active:
                    active.discard(fid)
                    rates[fid] = level
                    for l2, n in flows[fid].items():
                        load[l2] -= n
        for link in saturated:
            load[link] = 0
    return rates
