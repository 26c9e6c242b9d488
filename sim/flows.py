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

import numpy as np

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
    is not > 0.  Many links: the same filling in array arithmetic, the same floats in the
    same order (``_filling_arrays``).
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
    if len(users) >= ARRAY_LINKS:
        rates.update(_filling_arrays(flows, capacity, users, [f for f in flows if f not in rates]))
    else:
        rates.update(_filling(flows, capacity, users, {f for f in flows if f not in rates}))
    return rates


# From this many links on, the filling runs in array arithmetic: below it the arrays'
# set-up costs more than the loops (decision 014).
ARRAY_LINKS = 2048


def _filling(flows, capacity, users, active) -> dict[FlowId, float]:
    """Progressive filling, one link at a time.  Only links still carrying unfrozen flows
    (weight > 0) are scanned: a link's weight never grows back, and a link without weight
    neither saturates nor changes ``remaining`` (its step x 0 is 0)."""
    rates = {}
    remaining = {link: float(capacity[link]) for link in users}
    load = {link: sum(flows[f][link] for f in fs) for link, fs in users.items()}  # unfrozen weight
    live = [l for l in load if load[l] > 0]
    level = 0.0
    while active:
        # the next link to saturate: smallest fair increment remaining / unfrozen weight
        bottleneck = min(live, key=lambda l: remaining[l] / load[l])
        step = max(remaining[bottleneck] / load[bottleneck], 0.0)
        level += step
        for link in live:
            remaining[link] -= step * load[link]
        saturated = [l for l in live if remaining[l] <= _EPS * capacity[l]]
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
        live = [l for l in live if load[l] > 0]
    return rates


def _filling_arrays(flows, capacity, users, order) -> dict[FlowId, float]:
    """``_filling`` with links and flows as arrays: every float is computed as there, in
    the same order (sums and subtractions of weights one by one, ties to the first link),
    so the rates are identical."""
    links = list(users)
    at = {link: i for i, link in enumerate(links)}
    fidx = {f: i for i, f in enumerate(order)}
    # users of each link in order (CSR), and each flow's (link, weight) in order (CSR)
    u_ptr = np.zeros(len(links) + 1, dtype=np.int64)
    u_ptr[1:] = np.cumsum([len(users[link]) for link in links])
    u_flow = np.array([fidx[f] for link in links for f in users[link]], dtype=np.int64)
    u_w = np.array([flows[f][link] for link in links for f in users[link]], dtype=float)
    f_ptr = np.zeros(len(order) + 1, dtype=np.int64)
    f_ptr[1:] = np.cumsum([len(flows[f]) for f in order])
    f_link = np.array([at[link] for f in order for link in flows[f]], dtype=np.int64)
    f_w = np.array([n for f in order for n in flows[f].values()], dtype=float)
    cap = np.array([float(capacity[link]) for link in links])
    remaining = cap.copy()
    load = np.zeros(len(links))
    np.add.at(load, np.repeat(np.arange(len(links)), np.diff(u_ptr)), u_w)     # one by one, in order
    slack = _EPS * cap
    active = np.ones(len(order), dtype=bool)
    rates: dict[FlowId, float] = {}
    level, left = 0.0, len(order)
    while left:
        loaded = load > 0
        ratio = np.full(len(links), np.inf)
        np.divide(remaining, load, out=ratio, where=loaded)
        b = int(np.argmin(ratio))
        step = max(float(remaining[b] / load[b]), 0.0)
        level += step
        remaining -= step * load
        saturated = np.flatnonzero(loaded & (remaining <= slack))
        if not len(saturated):
            saturated = np.array([b])
        cand = u_flow[_ranges(u_ptr, saturated)]
        first = np.sort(np.unique(cand, return_index=True)[1])
        frozen = cand[first]
        frozen = frozen[active[frozen]]
        active[frozen] = False
        rates.update((order[i], level) for i in frozen.tolist())
        left -= len(frozen)
        pos = _ranges(f_ptr, frozen)
        np.subtract.at(load, f_link[pos], f_w[pos])
        load[saturated] = 0.0
    return rates


def _ranges(ptr: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Positions ptr[r] .. ptr[r + 1] - 1 of each row r, rows in the given order."""
    starts, ends = ptr[rows], ptr[rows + 1]
    lengths = ends - starts
    total = int(lengths.sum())
    if not total:
        return np.zeros(0, dtype=np.int64)
    offsets = np.repeat(starts - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths)
    return np.arange(total, dtype=np.int64) + offsets
