"""Fluid sharing of capacitated resources on the simpy clock.

A *job* needs ``amount`` units of work and loads resources with weights (a network flow:
its directed links, bytes; a compute op: its device, work-seconds).  Whenever the set of
jobs changes, rates are re-solved by ``flows.max_min_rates`` -- but only where the change
can move them.  A few jobs started or finished re-solve a part of their component, over the
capacity the rest leaves it: the jobs on a changed resource at or above the level where the
filling first differs, grown until every job has a saturated resource where no job gets more
(the max-min allocation by its definition), so the same rates in floats that may differ from
a whole solve's in the last digits (decisions 037, 042).  Many jobs started at once, a
capacity changed, or a part that is whole components re-solve the whole connected components
of the jobs touched, so traffic inside one machine never re-solves the whole cluster; one
component is kept from solve to solve, so a change inside it needs no search.  Changes at one
instant are batched into one solve.
Each job's finish time is then exact until the next change; the simpy side only
reschedules completions (SimGrid's approach).  A job ends only when the clock reaches its
own computed finish time, never "nearly done": ending a large job a few bytes early would
hand its bandwidth to its neighbours too soon.  A pattern of jobs solved before (the next
round of a collective, the next step) is looked up, not solved again (decision 021).  A job
alone on its one resource (a GPU's op) gets its rate at once, without the batching event:
a job joining it at the same instant re-solves both to the same floats (decision 026).
"""
from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Hashable, Mapping
from itertools import repeat
from operator import attrgetter

import simpy

from sim.flows import max_min_rates


def timeout_at(env: simpy.Environment, when: float, eid: int | None = None) -> simpy.Event:
    """An event that fires at ``when`` itself.  ``env.timeout(when - now)`` fires at
    ``now + (when - now)``, which round-off puts an ulp off ``when`` for ~2% of pairs (and no
    delay lands on an odd ``when`` whose sum ties), so a job would end an ulp early or late,
    or take a second timer.  simpy has no absolute-time call: this puts the event on its
    queue as ``Environment.schedule`` does, with ``when`` as the time (simpy 4's queue
    entries, checked by tests/test_fluid_exact.py).  ``eid``: the simpy event id taken
    earlier for it (its place among events at one time), else the next."""
    return fire_at(env, simpy.Event(env), when, eid)


def fire_at(env: simpy.Environment, event: simpy.Event, when: float, eid: int | None = None) -> simpy.Event:
    """Triggers ``event`` (not yet triggered) to fire at ``when``: ``succeed()`` and
    ``Environment.schedule`` as simpy 4 does them, with ``when`` as the time (``timeout_at``)."""
    event._ok, event._value = True, None
    heapq.heappush(env._queue, (max(when, env.now), simpy.core.NORMAL, next(env._eid) if eid is None else eid, event))
    return event


def fire_now(event: simpy.Event, value) -> None:
    """Fires ``event`` with ``value`` at once, its callbacks run here, without a trip through
    simpy's queue (what ``Environment.step`` does with it, minus the queue entry): the
    caller is a callback that would otherwise schedule it as the very next thing."""
    event._ok, event._value = True, value
    callbacks, event.callbacks = event.callbacks, None
    for callback in callbacks:
        callback(event)


def supersede(timer: simpy.Event | None) -> None:
    """Marks a wake-up timer that a newer one replaced: its callback does nothing, and an
    environment that honours the mark (``sim.engine.CountingEnvironment``) drops it unrun,
    so that it cannot move the clock past the run's last real event (a rate raised after
    it was armed ends the job before it)."""
    if timer is not None and timer.callbacks is not None:
        timer.stale = True


def rerate(job, rate: float, now: float) -> bool:
    """Moves a job (``remaining``, ``rate``, ``since``, ``finish``) to ``rate`` from ``now``:
    the work done at the old rate comes off.  False, and nothing touched, where the rate is
    the same: the job keeps its last update and finish time.  ``Fluid._apply`` runs the
    same lines inline: change both together."""
    if rate == job.rate:
        return False
    job.remaining -= job.rate * (now - job.since)
    job.since, job.rate = now, rate
    job.finish = now + max(job.remaining, 0.0) / rate
    return True


class _Job:
    __slots__ = ("links", "amount", "remaining", "rate", "since", "event", "finish")

    def __init__(self, links: dict[int, float], amount: float, event: simpy.Event, now: float):
        self.links, self.amount, self.remaining = links, amount, amount
        self.rate, self.since, self.event, self.finish = 0.0, now, event, float("inf")


_links = attrgetter("links")

# Solves remembered, by the jobs' (resource, weight) lists in start order: a step that
# repeats a pattern (a collective's rounds, the next training step) re-solves nothing.
# Bounded by (job, resource) entries kept, ~100 bytes each: 25 MB at most.
MEMO_ENTRIES = 250_000

# Jobs within this relative slack below the level where a change first matters are solved
# again too: their rates came from floats, and one that truly sits at that level moves.
_SLACK = 1e-9

# A resource within this relative slack of its capacity is saturated, and a job within it
# of the top rate on a resource gets the most there (the checks of a part solved: round-off).
_TIGHT = 1e-12

# From this many jobs in a component on, a change re-solves only the jobs above it; below,
# whole solves cost no more and are remembered (decision 037).
ABOVE_JOBS = 16

# The most jobs a change re-solves in a component not searched to its end (decision 042).
LOCAL_JOBS = 64

# From this many resources on, a job's are mapped to ids by ``map``/``zip``: below it the
# plain loop is faster (a GPU's op has one, a message a few).
BULK = 16


class Fluid:
    """Jobs sharing resources max-min fairly; ``start`` returns an event that fires when done.
    Capacities change through ``set_capacity`` only (solves are remembered)."""

    def __init__(self, env: simpy.Environment, capacity: Mapping[Hashable, float], shortcut: bool = True) -> None:
        self.env, self.capacity = env, capacity
        self.shortcut = shortcut    # solve a job alone on its one resource at once (False: the batched path only)
        self.jobs: dict[int, _Job] = {}
        self.users: dict[Hashable, set[int]] = {}
        # the solver sees each resource as a small int (a route's links are tuples of
        # names, slow to hash over and over); ``_users_at[i]`` is the set ``users`` holds
        self._index: dict[Hashable, int] = {}
        self._resources: list[Hashable] = []
        self._caps: list[float] = []                # ``capacity`` of each, as the solver reads it
        self._users_at: list[set[int]] = []
        self._heap: list[tuple[float, int]] = []
        self._ids = itertools.count()
        self._wake_at = float("inf")
        self._timer: simpy.Event | None = None     # the one live wake-up; earlier-armed ones are stale
        self._dirty: set[int] = set()
        # one connected component of jobs kept between solves, so that a change inside it
        # needs no search: closed (no job outside shares a resource with one inside); one
        # component at each solve's start, several after a finish inside it until that solve
        # (each part then holds one of the finished job's neighbours, all due for the solve)
        self._known: set[int] | None = None
        self._known_one = True
        # the changes since the last solve, for re-solving only the flows above them (decision 037)
        self._new: list[int] = []                   # jobs started
        self._ended: list[_Job] = []                # jobs finished
        self._whole = False                         # a capacity changed: solve whole components
        # every job due started on resources no other job used, none was due otherwise: each
        # is a component of its own (a ring step's flows), found with no search
        self._apart = False
        self._memo: dict[tuple, tuple[float, ...]] = {}
        self._memo_entries = 0
        self.solves = 0

    def start(self, weights: Mapping[Hashable, float], amount: float, event: simpy.Event | None = None) -> simpy.Event:
        """A job of ``amount`` over resources ``weights``; raises KeyError for an unknown resource.
        Returns ``event`` (a new one by default, not yet triggered), which fires when done."""
        if event is None:
            event = self.env.event()
        if amount <= 0 or not weights:
            event.succeed()
            return event
        index, users_at, jid = self._index, self._users_at, next(self._ids)
        if len(weights) < BULK:
            links: dict[int, float] = {}
            alone = True                                # on resources no other job uses
            try:
                for res, n in weights.items():
                    i = index.get(res)
                    if i is None:
                        i = self._new_resource(res)
                    users = users_at[i]
                    if users:
                        alone = False
                    users.add(jid)
                    links[i] = n
            except BaseException:                       # an unknown or dead resource: nothing kept
                for i in links:
                    users_at[i].discard(jid)
                raise
        else:                                           # a collective's job: thousands of links, in C loops
            ids = list(map(index.get, weights))
            if None in ids:
                self._new_resources([res for i, res in zip(ids, weights) if i is None])
                ids = list(map(index.__getitem__, weights))
            links = dict(zip(ids, weights.values()))
            deque(map(set.add, map(users_at.__getitem__, links), repeat(jid)), 0)
            alone = False                               # not asked
        job = self.jobs[jid] = _Job(links, float(amount), event, self.env.now)
        if len(links) == 1 and self.shortcut:
            [(i, n)] = links.items()
            if len(users_at[i]) == 1:                  # alone: its rate is the capacity's share
                self.solves += 1
                job.rate = self.capacity[self._resources[i]] / n
                job.finish = job.since + job.amount / job.rate
                heapq.heappush(self._heap, (job.finish, jid))
                self._schedule()
                return event
        if self._known is not None:
            self._join(jid, links)
        self._new.append(jid)
        if not self._dirty:                         # as ``_mark``, for one job
            self.env.timeout(0).callbacks.append(self._flush)
            self._apart = alone
        elif not alone:
            self._apart = False
        self._dirty.add(jid)
        return event

    def _join(self, jid: int, links: dict[int, float]) -> None:
        """Keeps the known component closed as job ``jid`` starts: it joins it where every
        other job on its resources is inside; where some are and some are not, components
        merge and the next solve searches."""
        known = self._known
        others = set().union(*map(self._users_at.__getitem__, links))
        others.discard(jid)
        if others <= known:
            if others:
                known.add(jid)
        elif not others.isdisjoint(known):
            self._known = None

    def _new_resource(self, res: Hashable) -> int:
        """The index of a resource first used now, as ``_new_resources`` gives it (a ring's
        first step brings thousands, one at a time)."""
        cap = self.capacity[res]
        if cap <= 0:
            raise ValueError(f"resource {res!r} has no capacity")
        i = self._index[res] = len(self._resources)
        self._resources.append(res)
        self._caps.append(float(cap))
        users = self.users[res] = set()
        self._users_at.append(users)
        return i

    def _new_resources(self, new: list[Hashable]) -> None:
        """Indexes resources first used now, in C loops (a collective's first job brings
        thousands); ValueError for one with no capacity (checked once: ``set_capacity``
        checks every later one)."""
        caps = list(map(self.capacity.__getitem__, new))
        if min(caps) <= 0:
            raise ValueError(f"resource {next(r for r, c in zip(new, caps) if c <= 0)!r} has no capacity")
        base = len(self._resources)
        self._index.update(zip(new, range(base, base + len(new))))
        self._resources.extend(new)
        self._caps.extend(map(float, caps))
        sets = list(map(set, repeat((), len(new))))
        self.users.update(zip(new, sets))
        self._users_at.extend(sets)

    def set_capacity(self, resource: Hashable, capacity: float) -> None:
        """Changes a resource's capacity from now on; the jobs on it are re-solved."""
        if capacity <= 0:
            raise ValueError(f"resource {resource!r} needs a capacity > 0, got {capacity}")
        self.capacity[resource] = capacity
        if resource in self._index:
            self._caps[self._index[resource]] = float(capacity)
        self._memo.clear()
        self._memo_entries = 0
        self._whole = True
        if self.users.get(resource):
            self._mark(list(self.users[resource]))

    def _mark(self, jids) -> None:
        """Re-solve these jobs' components once, after every change at this instant (many
        transfers start together; one solve serves them all, at the same simulated time)."""
        if not self._dirty:
            flush = self.env.timeout(0)
            flush.callbacks.append(self._flush)
        self._dirty.update(jids)
        self._apart = False

    def _flush(self, _event: simpy.Event) -> None:
        dirty, self._dirty = self._dirty, set()
        new, ended, whole = self._new, self._ended, self._whole
        self._new, self._ended, self._whole = [], [], False
        known, split = self._known, not self._known_one
        self._known_one = True
        if known is not None and dirty and dirty <= known:
            comp = known                            # the union of the seeds' components: no search
            if split:                               # this solve serves every part; the next searches
                self._known = None
        else:
            # a change among few new jobs outside the kept component: solved where it moves rates,
            # with no search (a part that is whole components is solved whole and remembered)
            if not whole and len(new) < ABOVE_JOBS and self._local([j for j in new if j in self.jobs], ended,
                                                                    LOCAL_JOBS):
                if split:
                    self._known = None
                return
            if self._apart:                         # only jobs started now, each on resources of its own
                comp, one = dirty, len(dirty) == 1  # (a finish or any other change marks through ``_mark``)
            else:
                comp, one = self._component(list(dirty))
            if known is None or split or len(comp) > len(known) or not comp.isdisjoint(known):
                self._known = comp if one and comp else None    # else the larger one stays kept
            if not whole and len(new) < ABOVE_JOBS:
                self._resolve(comp)                 # solving a part failed: solve it whole
                return
        order = key = None
        if not whole and len(comp) >= ABOVE_JOBS and len(new) < len(comp):     # else none can be held
            order = sorted(comp)
            key = self._key(order)
            if ((key is None or key not in self._memo)
                    and self._local([j for j in new if j in self.jobs], ended, (len(comp) + 1) // 2)):
                return                              # at most half the component solved (a remembered solve is cheaper)
        self._resolve(comp, order, key)

    def _local(self, new: list[int], ended: list[_Job], most: int) -> bool:
        """Re-solves only the jobs whose rates the changes (jobs ``new`` started, jobs ``ended``
        finished) move, and applies their rates; False, with nothing touched, where that set
        reaches ``most`` jobs, a new job is wide, capacity is left nowhere or no job can
        settle a solved one (the caller then solves the whole component).

        The set solved (over the capacity every other job leaves it, at its rate) starts as
        the new jobs and those on a changed resource at or above the level where the filling
        first differs (``_below``), and grows until the result is the max-min allocation by
        its definition: every job has a saturated resource where no job gets more
        (``_unsettled``).  Jobs away from every change and every moved rate keep theirs, as
        they had one.  Decision 042."""
        jobs, users_at = self.jobs, self._users_at
        level = self._below(new, ended)
        if level is None:
            return False
        below, changed = level
        on = set().union(*map(users_at.__getitem__, changed))   # a collective's finish: thousands of resources
        solve = set(new)
        solve.update([u for u in on if jobs[u].rate >= below])
        while len(solve) < most:
            part = self._part(solve)
            if part is None:
                return False
            flows, left, top, shared = part
            if not shared and on <= solve:
                self._resolve(solve)                # the changed jobs' whole components: remembered
                return True
            solved = max_min_rates(flows, left)
            more = self._unsettled(solve, solved, left, top, changed)
            if more is None:
                return False
            if not more:
                self._apply(solved.items())
                return True
            solve |= more
        return False

    def _below(self, new: list[int], ended: list[_Job]) -> tuple[float, set[int]] | None:
        """The level below which no rate moves (less a relative ``_SLACK``) and the resources
        changed; None where a new job is wide.  A finish moves nothing below the finished
        job's rate (none of its resources saturates earlier without it); starts nothing below
        the least ``_fill_level`` over their resources."""
        jobs = self.jobs
        seeds = set().union(*[job.links for job in ended])
        below = min([job.rate for job in ended], default=float("inf"))
        fresh = set(new)
        reached: set[int] = set()
        for jid in new:
            links = jobs[jid].links
            if len(links) >= BULK:
                return None
            reached.update(links)
        for i in reached:
            below = min(below, self._fill_level(i, fresh))
        return below * (1 - _SLACK), seeds | reached

    def _part(self, solve: set[int]) -> tuple[dict[int, dict[int, float]], dict[int, float], dict[int, float], bool] | None:
        """The jobs ``solve`` as the solver takes them (in start order), the capacity the other
        jobs leave them at their rates and those jobs' top rate, by resource, and whether any
        other job shares a resource with them; None where some resource has none left."""
        jobs, users_at, caps = self.jobs, self._users_at, self._caps
        flows = {jid: jobs[jid].links for jid in sorted(solve)}
        left: dict[int, float] = {}
        top: dict[int, float] = {}
        shared = False
        for links in flows.values():
            for i in links:
                if i in left:
                    continue
                others = users_at[i] - solve
                room, most = caps[i], 0.0
                if others:
                    shared = True
                    for u in sorted(others):
                        job = jobs[u]
                        room -= job.links[i] * job.rate
                        if job.rate > most:
                            most = job.rate
                    if room <= 0:
                        return None
                left[i], top[i] = room, most
        return flows, left, top, shared

    def _unsettled(self, solve: set[int], solved: dict[int, float], left: dict[int, float], top: dict[int, float],
                   changed: set[int]) -> set[int] | None:
        """The jobs outside ``solve`` that must join it for its rates ``solved`` (over ``left``,
        beside other jobs of ``top`` rate at most) to be max-min fair after the resources
        ``changed`` changed: a solved job's blockers (higher on its saturated resources)
        where it has no saturated resource of its own, and the jobs on a changed resource,
        or beside a moved rate, that no longer have one (to ``_TIGHT``).  None where a
        solved job lacks one and nothing outside blocks it (round-off)."""
        jobs, users_at, caps = self.jobs, self._users_at, self._caps
        load = {i: caps[i] - room for i, room in left.items()}
        top = dict(top)
        for jid, rate in solved.items():
            for i, n in jobs[jid].links.items():
                load[i] += n * rate
                if rate > top[i]:
                    top[i] = rate
        full = {i for i, used in load.items() if used >= caps[i] * (1 - _TIGHT)}
        more: set[int] = set()
        moved = set(changed)
        for jid, rate in solved.items():
            job = jobs[jid]
            if rate != job.rate:
                moved.update(job.links)
            least = rate * (1 + _TIGHT)
            for i in job.links:
                if i in full and top[i] * (1 - _TIGHT) <= rate:
                    break                                   # settled here
            else:
                blockers = [u for i in job.links if i in full for u in users_at[i]
                            if u not in solve and jobs[u].rate > least]
                if not blockers:
                    return None
                more.update(blockers)
        settled: set[int] = set()          # a job's answer holds for the call: seen resources stay as seen
        for i in moved:
            for u in users_at[i]:
                if u in solve or u in more or u in settled:
                    continue
                if self._settled(u, load, top, full):
                    settled.add(u)
                else:
                    more.add(u)
        return more

    def _settled(self, jid: int, load: dict[int, float], top: dict[int, float], full: set[int]) -> bool:
        """Whether job ``jid``, at its rate, has a saturated resource where no job gets more
        (to ``_TIGHT``); ``load``, ``top`` and ``full`` hold the resources seen so far (the
        solved part's with its new rates) and take the others as they are."""
        jobs, caps, rate = self.jobs, self._caps, self.jobs[jid].rate
        for i in jobs[jid].links:
            if i not in load:
                used = most = 0.0
                for u in self._users_at[i]:
                    job = jobs[u]
                    used += job.links[i] * job.rate
                    if job.rate > most:
                        most = job.rate
                load[i], top[i] = used, most
                if used >= caps[i] * (1 - _TIGHT):
                    full.add(i)
            if i in full and top[i] * (1 - _TIGHT) <= rate:
                return True
        return False

    def _fill_level(self, i: int, fresh: set[int]) -> float:
        """The level at which resource ``i`` fills when the jobs ``fresh`` on it run at that
        level and every other at the lesser of its rate and that level: where new jobs start,
        the filling first differs at the least such level over their resources (below it every
        resource saturates as before, and the first new job to freeze freezes there)."""
        jobs, room, weight, old = self.jobs, self._caps[i], 0.0, []
        for u in self._users_at[i]:
            job = jobs[u]
            n = job.links[i]
            weight += n
            if u not in fresh:
                old.append((job.rate, n))
        old.sort()
        for rate, n in old:
            if rate * weight >= room:
                break
            room -= rate * n
            weight -= n
        return room / weight

    def _component(self, seeds: list[int], most: int = 0) -> tuple[set[int] | None, bool]:
        """The live jobs that share resources with ``seeds``, transitively, and whether they
        form one component (the first seed's reaches all); each resource is expanded once,
        however many jobs reach it.  ``(None, False)`` once they are ``most`` jobs or more,
        where ``most`` is given."""
        jobs, users_at = self.jobs, self._users_at
        live = [j for j in seeds if j in jobs]
        comp, seen, todo = set(live[:1]), set(), live[:1]
        one = True
        while todo:
            links = jobs[todo.pop()].links
            if len(links) >= BULK:                  # a collective's job: its resources in C set operations
                fresh = links.keys() - seen
                seen |= fresh
                new = set().union(*map(users_at.__getitem__, fresh)) - comp
                if new:
                    comp |= new
                    todo.extend(new)
            else:
                for i in links:
                    if i not in seen:
                        seen.add(i)
                        new = users_at[i] - comp
                        if new:
                            comp |= new
                            todo.extend(new)
            if most and len(comp) >= most:
                return None, False
            if not todo:
                todo = [j for j in live if j not in comp]
                if todo:
                    one = False
                    comp.update(todo)
        return comp, one

    def _key(self, order: list[int]) -> tuple | None:
        """The memo's key of the jobs ``order``: their (resource, weight) lists, built in C
        loops when asked and not stored; None for a solve too large to remember (a
        collective's jobs: never looked up, so no pass over their links)."""
        links = list(map(_links, map(self.jobs.__getitem__, order)))
        if sum(map(len, links)) > MEMO_ENTRIES:
            return None
        return tuple(map(tuple, map(dict.items, links)))

    def _resolve(self, comp: set[int], order: list[int] | None = None, key: tuple | None = None) -> None:
        """New rates for the jobs of ``comp``, a whole component, taken in start order (the
        floats of a solve must not depend on how a set happens to iterate); remembered.  A
        job whose rate comes out the same keeps its last update and finish time: nothing
        about it changed.  ``order`` and ``key``: ``sorted(comp)`` and its ``_key``, where
        the caller has them."""
        if not comp:
            return
        jobs, resources, capacity = self.jobs, self._resources, self.capacity
        first = jobs[next(iter(comp))]
        if len(comp) == 1 and len(first.links) == 1:    # alone on one resource: no solve needed
            [jid], [(i, n)] = comp, first.links.items()
            self._apply(((jid, capacity[resources[i]] / n),))
            return
        if order is None:
            order = sorted(comp)
            key = self._key(order)
        found = None if key is None else self._memo.get(key)
        if found is None:
            solved = max_min_rates({jid: jobs[jid].links for jid in order}, self._caps, self._users_at)
            found = tuple([solved[jid] for jid in order])
            if key is not None:
                self._remember(key, found)
        self._apply(zip(order, found))

    def _apply(self, rates) -> None:
        """Moves each ``(job, rate)`` to its rate from now and wakes at the earliest finish."""
        now, jobs, heap = self.env.now, self.jobs, self._heap
        self.solves += 1
        moved = []
        for jid, rate in rates:
            job = jobs[jid]
            if rate != job.rate:                        # ``rerate``, inline: a solve moves thousands
                job.remaining -= job.rate * (now - job.since)
                job.since, job.rate = now, rate
                job.finish = now + max(job.remaining, 0.0) / rate
                moved.append((job.finish, jid))
        if len(heap) + len(moved) > 2 * len(jobs) + 64:     # mostly stale entries: keep the live ones
            self._heap = [(j.finish, i) for i, j in jobs.items() if j.finish < float("inf")]
            heapq.heapify(self._heap)
        elif len(moved) > len(heap):                    # (finish, job) pairs are distinct: any heap pops alike
            heap += moved
            heapq.heapify(heap)
        else:
            for entry in moved:
                heapq.heappush(heap, entry)
        self._schedule()

    def _remember(self, key: tuple, rates: tuple[float, ...]) -> None:
        """Keeps a solve, dropping the oldest ones while the entries kept exceed the bound."""
        size = sum(map(len, key))           # within the bound: ``_key`` makes no larger key
        memo = self._memo
        while self._memo_entries + size > MEMO_ENTRIES:
            old = next(iter(memo))
            self._memo_entries -= sum(map(len, old))
            del memo[old]
        memo[key] = rates
        self._memo_entries += size

    def _schedule(self) -> None:
        heap, jobs = self._heap, self.jobs
        while heap:
            finish, jid = heap[0]
            job = jobs.get(jid)
            if job is not None and job.finish == finish:
                break
            heapq.heappop(heap)                              # stale entry
        if heap and heap[0][0] < self._wake_at:
            self._wake_at = heap[0][0]
            supersede(self._timer)
            self._timer = timeout_at(self.env, self._wake_at)
            self._timer.callbacks.append(self._wake)

    def _wake(self, event: simpy.Event) -> None:
        """Ends the jobs whose finish time has come (``timeout_at``: the clock reads the
        earliest finish itself)."""
        if event is not self._timer:
            return                                  # superseded by an earlier wake-up
        self._wake_at, self._timer = float("inf"), None
        now, heap, jobs = self.env.now, self._heap, self.jobs
        finished: dict[int, None] = {}     # ordered set: one job may sit in the heap twice
        while heap:
            finish, jid = heap[0]
            job = jobs.get(jid)
            if job is None or job.finish != finish:
                heapq.heappop(heap)
                continue
            if finish > now:
                break
            heapq.heappop(heap)
            finished[jid] = None
        neighbours: set[int] = set()
        users_at, known, ended = self._users_at, self._known, []
        env = self.env
        for jid in finished:
            job = jobs.pop(jid)
            if len(job.links) < BULK:
                sets = None
                for i in job.links:
                    users = users_at[i]
                    users.discard(jid)
                    if users:
                        neighbours |= users
            else:                                   # thousands of links: C loops, the same sets
                sets = list(map(users_at.__getitem__, job.links))
                deque(map(set.discard, sets, repeat(jid)), 0)
                neighbours.update(*sets)
            if known is not None and jid in known:
                known.discard(jid)
                if self._known_one and sum(map(bool, sets or map(users_at.__getitem__, job.links))) > 1:
                    self._known_one = False         # the component may split here
            ended.append(job)
            fire_at(env, job.event, now)            # ``succeed()`` less its check: only this fluid triggers it
        self._dirty.difference_update(finished)
        if known is not None and not known:
            self._known = None
        if neighbours:                              # else every one was alone: the next solve needs none
            self._ended += ended
            self._mark(neighbours)
        self._schedule()
