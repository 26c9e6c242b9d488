"""Max-min fair rate allocation over shared links: a pure function, no simpy inside.

A *flow* here is an entity with one or more member routes that all move at the same rate
``x_f`` (a single transfer has one member; the n transfers of a ring collective are one
entity with n members, because a ring advances at the pace of its slowest hop).  With
``n_{f,l}`` the number of members of ``f`` that cross link ``l``, the allocation solves

    maximise min-lexicographically (x_f)   subject to   sum_f n_{f,l} * x_f <= C_l   for every link l

by progressive filling (water-filling): raise every unfrozen rate together until some link
saturates, freeze the flows that cross it, repeat.  A flow that crosses no capacitated link
gets rate ``inf`` (the caller treats it as instantaneous).

The filling is kept as each link's *fair share*, ``R_l / W_l`` (capacity left after the
frozen flows over the unfrozen weight): the next link to saturate is the one with the
smallest share (one ``min`` over the live links a level), and freezing a flow touches
only its own links, not every live one (decision 021).
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Hashable, Mapping, Sequence
from itertools import chain

import numpy as np

Link = Hashable
FlowId = Hashable

# Links whose shares are within this relative slack of the smallest saturate together
# (float round-off of the filling): their flows get the very same rate.
_EPS = 1e-12

# From this many (flow, link) entries on, the filling runs in array arithmetic: below it
# the arrays' set-up costs more than the loops (decision 021).
ARRAY_ENTRIES = 2048


def link_weights(routes: Sequence[Sequence[Link]]) -> dict[Link, int]:
    """n_{f,l}: how many member routes of one flow cross each link (links in order of first use)."""
    return dict(Counter(chain.from_iterable(routes)))


def max_min_rates(flows: Mapping[FlowId, Mapping[Link, float]],
                  capacity: Mapping[Link, float] | Sequence[float],
                  users: Mapping[Link, Collection[FlowId]] | Sequence[Collection[FlowId]] | None = None,
                  ) -> dict[FlowId, float]:
    """Rates per flow (same unit as ``capacity``) for ``flows``: id -> {link: members crossing it}.
    ``capacity`` and ``users`` are indexed by link (sequences where links are small ints).

    ``users``: indexed by link, the flows that cross it, where the caller keeps them (every
    flow on a link of ``flows`` must then be one of ``flows``); built here when None.  The floats
    depend only on the order of ``flows``, not on how ``users`` iterates, and the array
    path gives the loops' floats.  Raises KeyError if a flow crosses a link with no
    capacity and ValueError if a capacity is not > 0.
    """
    if len(flows) == 1:                      # one flow: its least share, the filling's float
        [(fid, weights)] = flows.items()
        caps = _capacities(capacity, weights)
        return {fid: min([caps[link] / n for link, n in weights.items()], default=float("inf"))}
    if sum(map(len, flows.values())) >= ARRAY_ENTRIES:
        return _filling_arrays(flows, capacity)
    return _filling(flows, capacity, users)


def _capacities(capacity: Mapping[Link, float] | Sequence[float], links) -> dict[Link, float]:
    """The capacity of each of ``links`` as a float; ValueError for one not > 0."""
    caps = {link: float(capacity[link]) for link in links}
    if caps and min(caps.values()) <= 0:
        link = min(caps, key=caps.__getitem__)
        raise ValueError(f"capacity of link {link!r} (={caps[link]}) must be > 0.")
    return caps


def _filling(flows, capacity, users) -> dict[FlowId, float]:
    """Progressive filling by fair shares.  Each level: the smallest share ``s`` (never
    below the level before, against round-off), the links within ``_EPS`` of it saturate,
    their unfrozen flows get ``s``; those flows' weight leaves their links, taken in flow
    order so the floats do not depend on set order."""
    rates: dict[FlowId, float] = {}
    load: dict[Link, float] = {}             # W_l: unfrozen weight, summed in flow order
    count: dict[Link, int] = {}              # unfrozen flows on the link
    own = {} if users is None else None      # users, where not given: built in the same pass, in flow order
    for fid, weights in flows.items():
        if not weights:
            rates[fid] = float("inf")
        for link, n in weights.items():
            if link in load:
                load[link] += n
                count[link] += 1
                if own is not None:
                    own[link].append(fid)
            else:
                load[link], count[link] = n, 1
                if own is not None:
                    own[link] = [fid]
    if own is not None:
        users = own
    left = _capacities(capacity, load)                          # R_l: capacity not yet taken
    share = {link: left[link] / w for link, w in load.items()}
    order: dict[FlowId, int] = {}                # position in ``flows``, built when first needed
    level = 0.0
    while share:
        s = min(share.values())
        if s > level:
            level = s
        bound = s + abs(s) * _EPS
        frozen = []
        for link in [link for link, v in share.items() if v <= bound]:
            for fid in users[link]:
                if fid not in rates:
                    rates[fid] = level
                    frozen.append(fid)
        if len(rates) == len(flows):
            break                                # all frozen: the loads left do not matter
        if not frozen:                           # the bottleneck's users are not its flows: no progress
            raise ValueError("max-min filling: the users of a saturated link do not match the flows over it")
        if len(frozen) > 1:
            order = order or {fid: i for i, fid in enumerate(flows)}
            frozen.sort(key=order.__getitem__)
            gone: Mapping[Link, float] = {}      # weight frozen off each link, summed in flow order
            went: Mapping[Link, int] = {}
            for fid in frozen:
                for link, n in flows[fid].items():
                    if link in gone:
                        gone[link] += n
                        went[link] += 1
                    else:
                        gone[link], went[link] = n, 1
        else:                                    # one flow: its own weights, one flow off each link
            gone, went = flows[frozen[0]], {}
        for link, n in gone.items():
            c = count[link] = count[link] - went.get(link, 1)
            if c:
                r = left[link] = left[link] - n * level
                w = load[link] = load[link] - n
                share[link] = r / w
            else:
                del share[link]
    return rates


def _filling_arrays(flows, capacity) -> dict[FlowId, float]:
    """``_filling`` with links and flows as arrays, every float computed as there and in
    the same order (weights summed and frozen flows taken in flow order, each flow's links
    in its order; ``ufunc.at`` and ``bincount`` add repeated indices one by one): the same
    rates."""
    rates: dict[FlowId, float] = {fid: float("inf") for fid, w in flows.items() if not w}
    fids = [fid for fid, w in flows.items() if w]
    if not fids:
        return rates
    f_link, links = _numbered(fids, flows, capacity)
    f_w = np.fromiter(chain.from_iterable(flows[f].values() for f in fids), dtype=float, count=len(f_link))
    f_ptr = np.zeros(len(fids) + 1, dtype=np.int64)
    f_ptr[1:] = np.cumsum([len(flows[f]) for f in fids])
    n = len(links)
    left = np.fromiter(map(float, map(capacity.__getitem__, links)), dtype=float, count=n)
    if n and left.min() <= 0:
        _capacities(capacity, links)                                # raises, naming the link
    weight = np.zeros(n)
    np.add.at(weight, f_link, f_w)
    count = np.bincount(f_link, minlength=n)
    by_link = np.argsort(f_link, kind="stable")                 # each link's users, in flow order
    u_flow = np.repeat(np.arange(len(fids)), np.diff(f_ptr))[by_link]
    u_ptr = np.zeros(n + 1, dtype=np.int64)
    u_ptr[1:] = np.cumsum(count)
    active = np.ones(len(fids), dtype=bool)
    share = np.empty(n)
    level = 0.0
    while True:
        live = count > 0
        share.fill(np.inf)
        np.divide(left, weight, out=share, where=live)
        s = float(share.min())
        if s > level:
            level = s
        saturated = np.flatnonzero(share <= s + abs(s) * _EPS)
        cand = u_flow[_ranges(u_ptr, saturated)]
        frozen = np.unique(cand[active[cand]])
        active[frozen] = False
        rates.update((fids[i], level) for i in frozen.tolist())
        if len(rates) == len(flows):
            return rates
        pos = _ranges(f_ptr, frozen)
        gone = np.bincount(f_link[pos], weights=f_w[pos], minlength=n)      # in order, one by one
        left -= gone * level
        weight -= gone
        count -= np.bincount(f_link[pos], minlength=n)


def _numbered(fids: list, flows, capacity) -> tuple[np.ndarray, list]:
    """Each (flow, link) entry's link as a number 0 .. n - 1, flows in order, each flow's
    links in its order, and the n links.  The numbering does not enter the floats (every
    sum runs over the entries in their order).  Where ``capacity`` is a sequence, links are
    its indices: numbered in index order by a mark over them, in C (a collective's solve
    has hundreds of thousands of entries); else in order of first use, by a dict."""
    chained = chain.from_iterable(flows[f] for f in fids)      # each flow's links, in flow order
    if isinstance(capacity, Mapping):
        entries = list(chained)
        first = dict.fromkeys(entries)
        at = dict(zip(first, range(len(first))))
        return np.fromiter(map(at.__getitem__, entries), dtype=np.int64, count=len(entries)), list(at)
    raw = np.fromiter(chained, dtype=np.int64, count=sum(len(flows[f]) for f in fids))
    used = np.zeros(len(capacity), dtype=bool)
    used[raw] = True
    links = np.flatnonzero(used)
    number = np.empty(len(capacity), dtype=np.int64)
    number[links] = np.arange(len(links))
    return number[raw], links.tolist()


def _ranges(ptr: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Positions ptr[r] .. ptr[r + 1] - 1 of each row r, rows in the given order."""
    starts, ends = ptr[rows], ptr[rows + 1]
    lengths = ends - starts
    total = int(lengths.sum())
    if not total:
        return np.zeros(0, dtype=np.int64)
    offsets = np.repeat(starts - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths)
    return np.arange(total, dtype=np.int64) + offsets
