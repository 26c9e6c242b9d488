"""Fluid sharing of capacitated resources on the simpy clock.

A *job* needs ``amount`` units of work and loads resources with weights (a network flow:
its directed links, bytes; a compute op: its device, work-seconds).  Whenever the set of
jobs changes, rates are re-solved by ``flows.max_min_rates`` -- but only for the connected
component of jobs that share resources with the change, so traffic inside one machine
never re-solves the whole cluster.  Changes at one instant are batched into one solve.
Each job's finish time is then exact until the next change; the simpy side only
reschedules completions (SimGrid's approach).  A job ends only when the clock reaches its
own computed finish time, never "nearly done": ending a large job a few bytes early would
hand its bandwidth to its neighbours too soon.
"""
from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable, Mapping

import simpy

from sim.flows import max_min_rates


class _Job:
    __slots__ = ("weights", "amount", "remaining", "rate", "since", "event", "finish")

    def __init__(self, weights: Mapping[Hashable, int], amount: float, event: simpy.Event, now: float):
        self.weights, self.amount, self.remaining = weights, amount, amount
        self.rate, self.since, self.event, self.finish = 0.0, now, event, float("inf")


class Fluid:
    """Jobs sharing resources max-min fairly; ``start`` returns an event that fires when done."""

    def __init__(self, env: simpy.Environment, capacity: Mapping[Hashable, float]) -> None:
        self.env, self.capacity = env, capacity
        self.jobs: dict[int, _Job] = {}
        self.users: dict[Hashable, set[int]] = {}
        self._heap: list[tuple[float, int]] = []
        self._ids = itertools.count()
        self._wake_at = float("inf")
        self._timer: simpy.Event | None = None     # the one live wake-up; earlier-armed ones are stale
        self._dirty: set[int] = set()
        self.solves = 0

    def start(self, weights: Mapping[Hashable, int], amount: float) -> simpy.Event:
        """A job of ``amount`` over resources ``weights``; raises KeyError for an unknown resource."""
        event = self.env.event()
        if amount <= 0 or not weights:
            event.succeed()
            return event
        for res in weights:
            if self.capacity[res] <= 0:
                raise ValueError(f"resource {res!r} has no capacity")
        jid = next(self._ids)
        self.jobs[jid] = _Job(weights, float(amount), event, self.env.now)
        users = self.users
        for res in weights:
            if res in users:
                users[res].add(jid)
            else:
                users[res] = {jid}
        self._mark([jid])
        return event

    def set_capacity(self, resource: Hashable, capacity: float) -> None:
        """Changes a resource's capacity from now on; the jobs on it are re-solved."""
        if capacity <= 0:
            raise ValueError(f"resource {resource!r} needs a capacity > 0, got {capacity}")
        self.capacity[resource] = capacity
        if self.users.get(resource):
            self._mark(list(self.users[resource]))

    def _mark(self, jids) -> None:
        """Re-solve these jobs' components once, after every change at this instant (many
        transfers start together; one solve serves them all, at the same simulated time)."""
        if not self._dirty:
            flush = self.env.timeout(0)
            flush.callbacks.append(self._flush)
        self._dirty.update(jids)

    def _flush(self, _event: simpy.Event) -> None:
        dirty, self._dirty = self._dirty, set()
        self._resolve(self._component(list(dirty)))

    def _component(self, seeds: list[int]) -> set[int]:
        """The live jobs that share resources with ``seeds``, transitively; each resource
        is expanded once, however many jobs reach it."""
        comp, seen, todo = set(), set(), [j for j in seeds if j in self.jobs]
        comp.update(todo)
        while todo:
            for res in self.jobs[todo.pop()].weights:
                if res not in seen:
                    seen.add(res)
                    new = self.users[res] - comp
                    comp |= new
                    todo.extend(new)
        return comp

    def _resolve(self, comp: set[int]) -> None:
        """New rates for the jobs of ``comp``, taken in start order (the floats of a solve
        must not depend on how a set happens to iterate)."""
        if not comp:
            return
        now = self.env.now
        self.solves += 1
        comp = sorted(comp)
        for jid in comp:
            job = self.jobs[jid]
            job.remaining -= job.rate * (now - job.since)
            job.since = now
        if len(comp) == 1 and len(job.weights) == 1:      # alone on one resource: no solve needed
            [(res, n)] = job.weights.items()
            rates = {jid: self.capacity[res] / n}
        else:
            rates = max_min_rates({jid: self.jobs[jid].weights for jid in comp}, self.capacity)
        for jid, rate in rates.items():
            job = self.jobs[jid]
            job.rate = rate
            job.finish = now + max(job.remaining, 0.0) / rate
            heapq.heappush(self._heap, (job.finish, jid))
        if len(self._heap) > 2 * len(self.jobs) + 64:       # mostly stale entries: keep the live ones
            self._heap = [(j.finish, i) for i, j in self.jobs.items() if j.finish < float("inf")]
            heapq.heapify(self._heap)
        self._schedule()

    def _schedule(self) -> None:
        while self._heap and (self._heap[0][1] not in self.jobs
                              or self.jobs[self._heap[0][1]].finish != self._heap[0][0]):
            heapq.heappop(self._heap)                       # stale entry
        if self._heap and self._heap[0][0] < self._wake_at:
            self._wake_at = self._heap[0][0]
            self._timer = self.env.timeout(max(0.0, self._wake_at - self.env.now))
            self._timer.callbacks.append(self._wake)

    def _wake(self, event: simpy.Event) -> None:
        """Ends the jobs whose finish time has come.  simpy fires a timer at now + delay,
        which round-off may put a few ulps before the finish; ``_schedule`` then re-arms for
        the rest (exact once now and finish are that close), so the loop ends."""
        if event is not self._timer:
            return                                  # superseded by an earlier wake-up
        self._wake_at, self._timer = float("inf"), None
        now = self.env.now
        finished: dict[int, None] = {}     # ordered set: one job may sit in the heap twice
        while self._heap:
            finish, jid = self._heap[0]
            job = self.jobs.get(jid)
            if job is None or job.finish != finish:
                heapq.heappop(self._heap)
                continue
            if finish > now:
                break
            heapq.heappop(self._heap)
            finished[jid] = None
        neighbours: set[int] = set()
        for jid in finished:
            job = self.jobs.pop(jid)
            for res in job.weights:
                self.users[res].discard(jid)
                neighbours |= self.users[res]
            job.event.succeed()
        if neighbours:
            self._mark(neighbours)
        self._schedule()
