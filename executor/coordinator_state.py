"""What Sandblaster's coordinator decides, as a state machine: ``on(source, tag, payload,
now)`` and ``tick(now)`` return the actions to take, as plain data.  No MPI, no clock, no
I/O here: the driver (``sandblaster.coordinate``) probes for what ``listening()`` names,
hands a message over (or, when none came, the time) and carries the actions out, so the
decisions are tested on exact message sequences (tests/test_exec_coordinator_state.py).

Each batch goes through three phases:
1. ``ready``: wait for every live replica's READY (it has the new parameters); a replica
   silent for ``timeout_s`` after the first READY (``startup_s`` for the first batch) is
   given up on;
2. ``units``: ASSIGN units to free replicas, then, once the queue is empty and
   ``backup_tasks``, copies of unfinished units (fewest copies first); the first RESULT
   of a unit wins.  A replica that runs one unit longer than ``timeout_s``, or says it is
   lost (ACK [batch, 0]), is dropped and its units go back to the queue when nobody else
   runs them; one that answers late is live again;
3. END tells each live replica the units it won (it pushes their sum); with ``acks``,
   each answers ACK [batch, 1] (its whole replica pushes) or [batch, 0] (lost); then
   EXPECT tells each shard how many pushes the batch brings it: one from each slot of a
   live replica that keeps parameters on that shard.

A replica that says it is lost (ACK [batch, 0]) never comes back; one dropped for its
silence may answer late.  Once every replica has said it is lost, or none is live and
none answers for ``max(timeout_s, startup_s)``, the job cannot go on: the coordinator
gives up (GiveUp) instead of waiting forever.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from executor.shard_state import Stop

READY, ASSIGN, RESULT, END, ACK = 31, 32, 33, 34, 36
# The first batch waits at least this long for every replica's READY: ranks start at
# different times (importing, loading data, planning take seconds when ranks outnumber the
# cores), and a replica given up on while it was only starting could never rejoin.
STARTUP_S = 60.0

@dataclass(frozen=True)
class Assign:
    """ASSIGN [batch, unit] to ``replica`` (its leader); ``backup``: a copy of a unit another runs."""
    replica: int
    batch: int
    unit: int
    backup: bool = False


@dataclass(frozen=True)
class End:
    """END to ``replica``: the batch is done; ``won``: the units whose RESULT it sent first."""
    replica: int
    batch: int
    won: tuple[int, ...]


@dataclass(frozen=True)
class Expect:
    """EXPECT to each shard: ``pushes[k]`` come to shard k for the batch (all -1: no more batches)."""
    pushes: tuple[int, ...]


@dataclass(frozen=True)
class GiveUp:
    """No replica is left to run batch ``batch``: the job cannot go on (``why`` says so in a line)."""
    batch: int
    why: str


Action = Assign | End | Expect | GiveUp | Stop


def shard_pushes(share: Sequence[Sequence[int]]) -> tuple[int, ...]:
    """Per shard k, the pushes one replica brings it: its slots j that keep parameters there
    (``share[j][k] > 0``, ``Plan.ps.share``).  A slot pushes only to the shards that hold
    some of its parameters, so under a layer split a slot may skip some shards."""
    return tuple(sum(1 for row in share if row[k] > 0) for k in range(len(share[0])))


class CoordinatorState:
    """The coordinator's decisions over ``batches`` batches of ``units`` units, handed to
    the replicas ``leaders`` (a replica is named by its leader's rank).  ``shard_pushes[k]``:
    the pushes one replica brings shard k (its slots that keep parameters there; see
    ``shard_pushes``).  Raises ValueError for counts out of range."""

    def __init__(self, leaders: Iterable[int], batches: int, units: int, backup_tasks: bool, timeout_s: float,
                 shard_pushes: Sequence[int] = (1,), acks: bool = False, startup_s: float = STARTUP_S) -> None:
        self.live = set(leaders)
        if not self.live:
            raise ValueError("leaders must name at least one replica")
        if batches < 1 or units < 1:
            raise ValueError(f"batches(={batches}) and units(={units}) must be >= 1")
        if not shard_pushes or min(shard_pushes) < 0:
            raise ValueError(f"shard_pushes(={tuple(shard_pushes)}) must name one count >= 0 per shard")
        if timeout_s < 0 or startup_s < 0:
            raise ValueError(f"timeout_s(={timeout_s}) and startup_s(={startup_s}) must be >= 0")
        self.batches, self.units, self.backup_tasks, self.acks = batches, units, backup_tasks, acks
        self.timeout_s, self.startup_s, self.shard_pushes = timeout_s, startup_s, tuple(shard_pushes)
        self.leaders = frozenset(self.live)
        self.said_lost: set[int] = set()             # ACK [batch, 0]: gone for good
        self.empty_since: float | None = None        # since when no replica is live
        self.units_run = self.backup_copies = 0
        self.batch = 0
        self.stopped = False
        self._ready_phase()

    # --- what the driver asks ---------------------------------------------------------------
    def listening(self) -> list[tuple[int | None, int]]:
        """The (source, tag) pairs to probe for, in order of priority; source None: any."""
        if self.stopped:
            return []
        if self.phase == "ready":
            return [(None, READY)]
        if self.phase == "units":
            return [(None, RESULT)] + ([(None, ACK)] if self.acks else [])
        return [(r, ACK) for r in sorted(self.awaiting)]

    def on(self, source: int, tag: int, payload: Any, now: float) -> list[Action]:
        """The actions for a message the driver got for ``listening()``: READY (payload
        None), RESULT [batch, unit] or ACK [batch, pushes], at time ``now`` (seconds).
        ValueError for a tag the current phase does not take."""
        if self.phase == "ready" and tag == READY:
            self.ready.add(source)
            if self.first_ready_s is None:
                self.first_ready_s = now
            return self._units_phase(now) if self.ready == self.live else []
        if self.phase == "units" and tag == RESULT:
            batch, unit = payload
            if batch != self.batch:
                return []                            # a backup copy of an earlier batch, finished late
            self.won.setdefault(unit, source)
            if source in self.running.get(unit, []):
                self.running[unit].remove(source)
            self.live.add(source)                    # late, not dead: it gets END and more work
            self.empty_since = None
            self.free.append(source)
            return self._end() if len(self.won) == self.units else self._assign(now)
        if self.phase == "units" and tag == ACK:     # before END an ACK says [batch, 0]: lost
            self.said_lost.add(source)
            self._lose(source, now)
            return self._give_up_if_all_lost() or self._assign(now)
        if self.phase == "acks" and tag == ACK:
            _batch, pushes = payload
            self.awaiting.discard(source)
            if not pushes:
                self.said_lost.add(source)
                self._drop(source, now)
            if self.awaiting:
                return []
            return self._give_up_if_all_lost() or self._expect()
        raise ValueError(f"tag(={tag}) from rank {source} is not taken in phase {self.phase!r}")

    def tick(self, now: float) -> list[Action]:
        """The actions when no message came by time ``now``: give up on silent replicas,
        and on the job when none has been live for ``max(timeout_s, startup_s)``."""
        if self.phase == "ready":
            limit = self.timeout_s if self.batch else max(self.timeout_s, self.startup_s)
            if self.first_ready_s is not None and now - self.first_ready_s > limit:
                self.live = set(self.ready)          # the silent ones are gone
                self.empty_since = None
                return self._units_phase(now)
            return self._give_up_if_none_answers(now) if self.first_ready_s is None else []
        if self.phase == "units":
            stale = [r for r in sorted(self.live)
                     if r not in self.free and now - self.started.get(r, now) > self.timeout_s]
            for r in stale:
                self._lose(r, now)
            return self._assign(now) if stale else self._give_up_if_none_answers(now)
        return []

    # --- phases -------------------------------------------------------------------------------
    def _ready_phase(self) -> None:
        self.phase = "ready"
        self.ready: set[int] = set()
        self.first_ready_s: float | None = None

    def _units_phase(self, now: float) -> list[Action]:
        self.phase = "units"
        self.queue: deque[int] = deque(range(self.units))
        self.running: dict[int, list[int]] = {}      # unit -> the replicas running it
        self.won: dict[int, int] = {}                # unit -> the replica whose RESULT came first
        self.free: deque[int] = deque(sorted(self.live))
        self.started: dict[int, float] = {}          # replica -> when it got its unit
        return self._assign(now)

    def _assign(self, now: float) -> list[Action]:
        out: list[Action] = []
        while self.free:
            r = self.free[0]
            backup = False
            if self.queue:
                u = self.queue.popleft()
            elif self.backup_tasks:
                spare = [u for u in self.running if u not in self.won and r not in self.running[u]]
                if not spare:
                    break
                u = min(spare, key=lambda u: (len(self.running[u]), u))
                backup = True
                self.backup_copies += 1
            else:
                break
            self.free.popleft()
            self.running.setdefault(u, []).append(r)
            self.started[r] = now
            self.units_run += 1
            out.append(Assign(r, self.batch, u, backup))
        return out

    def _drop(self, r: int, now: float) -> None:
        self.live.discard(r)
        if not self.live and self.empty_since is None:
            self.empty_since = now

    def _lose(self, r: int, now: float) -> None:
        """``r`` is dropped: units nobody else runs and nobody won go back to the queue."""
        self._drop(r, now)
        for u, rs in self.running.items():
            if r in rs:
                rs.remove(r)
                if u not in self.won and not rs and u not in self.queue:
                    self.queue.append(u)

    def _give_up_if_all_lost(self) -> list[Action]:
        if not self.leaders <= self.said_lost:
            return []
        return self._give_up(f"every replica is lost (each said so) by batch {self.batch} of {self.batches}: "
                             f"none is left to train")

    def _give_up_if_none_answers(self, now: float) -> list[Action]:
        """A replica dropped for its silence may answer late; once none is live and none has
        answered for as long as the first READY may take, none will."""
        limit = max(self.timeout_s, self.startup_s)
        if self.live or self.empty_since is None or now - self.empty_since <= limit:
            return []
        return self._give_up(f"no replica is live in batch {self.batch} of {self.batches} and none answered "
                             f"for {limit:g} s: none is left to train")

    def _give_up(self, why: str) -> list[Action]:
        self.stopped = True
        self.phase = "stopped"
        return [GiveUp(self.batch, why)]

    def _end(self) -> list[Action]:
        out: list[Action] = [End(r, self.batch, tuple(sorted(u for u, w in self.won.items() if w == r)))
                             for r in sorted(self.live)]
        if self.acks and self.live:
            self.phase = "acks"
            self.awaiting = set(self.live)
            return out
        return out + self._expect()

    def _expect(self) -> list[Action]:
        out: list[Action] = [Expect(tuple(len(self.live) * n for n in self.shard_pushes))]
        self.batch += 1
        if self.batch == self.batches:
            self.stopped = True
            self.phase = "stopped"
            return out + [Expect((-1,) * len(self.shard_pushes)), Stop()]
        self._ready_phase()
        return out
