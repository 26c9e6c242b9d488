"""What a parameter-server shard decides, as state machines: ``on(source, tag, payload)``
returns the actions to take, as plain data.  No MPI, no clock, no I/O here: the drivers
(``psrank.serve``, ``sandblaster.serve_lbfgs``) receive a message, hand it over and carry
the actions out, so the decisions are tested on exact message sequences
(tests/test_exec_shard_state.py).

Gradients are opaque to the decisions: they are summed, divided by counts and handed back
in actions, so tests pass floats where the drivers pass shard-sized numpy vectors.

Protocol (tags): a worker sends a push (tag ``push_tag(step)``; payload: its gradient on
the shard), FETCH (payload: the step it fetches for; the reply, tag REPLY, is the shard's
current values on its runs) and DONE.  MPI keeps the messages between two ranks in order,
so a fetch sent after a push sees that push applied: a worker reads its own writes.
Sandblaster's coordinator sends EXPECT: how many pushes the batch brings (-1: no more).
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

FETCH, REPLY, DONE = 12, 13, 14
EXPECT = 35                       # in the range of Sandblaster's tags (coordinator_state)
PUSH_STEP_TAGS = 10_000           # a push's tag is PUSH_BASE + its step modulo this (sync: late pushes are dropped)
PUSH_BASE = 20_000
FINISHED = 1 << 62                # the clock of a worker that said DONE: it holds nobody back


def push_tag(step: int) -> int:
    return PUSH_BASE + step % PUSH_STEP_TAGS


def push_step(tag: int, next_step: int) -> int:
    """The step a push with ``tag`` belongs to: the latest one, up to ``next_step``, that
    the tag stands for (a push is for the step in progress or, late, an earlier one)."""
    return next_step - (next_step - (tag - PUSH_BASE)) % PUSH_STEP_TAGS


# --- actions ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Reply:
    """Send ``worker`` the shard's current values on its runs: the answer to its fetch for ``step``."""
    worker: int
    step: int


@dataclass(frozen=True)
class Apply:
    """Apply ``worker``'s gradient, pushed after its step ``step``, with the shard's rule
    (DC-ASGD compensates per worker)."""
    worker: int
    step: int
    grad: Any


@dataclass(frozen=True)
class ApplyMean:
    """Sync: apply ``grad``, the mean of ``step``'s pushes over ``replicas``."""
    step: int
    replicas: tuple[int, ...]
    grad: Any


@dataclass(frozen=True)
class Drop:
    """Sync: a push of ``worker`` for ``step``, which is applied without it (its replica
    was not among the first ``quorum`` complete ones): discarded."""
    worker: int
    step: int


@dataclass(frozen=True)
class Checkpoint:
    """Save the parameters, the optimizer's state and ``applied``, the updates so far."""
    applied: int


@dataclass(frozen=True)
class Step:
    """L-BFGS: take batch ``batch``'s step along ``grad``, the batch's mean gradient."""
    batch: int
    grad: Any


@dataclass(frozen=True)
class Stop:
    """The rank's part is over (every live worker said DONE; every batch is done): drain
    what is in flight and return."""


Action = Reply | Apply | ApplyMean | Drop | Checkpoint | Step | Stop


# --- a parameter-server shard (sync by PS, Downpour, DC-ASGD, SSP) ------------------------------
class ShardState:
    """One shard's decisions.  ``workers``: the ranks that push to this shard; ``silent``:
    those that crashed (the shard waits neither for their DONE nor for their clocks).

    - async (``sync_replicas`` 0): every push is applied as it comes.
    - sync: a replica (``replica_of`` maps a worker to it) is complete for step s once
      every one of its workers has pushed s.  Once ``quorum`` replicas (all of them when
      0) are complete, the mean of their pushes is applied; pushes of incomplete replicas
      and later ones for step s are dropped.  A crashed worker's replica counts as long
      as it pushes.  A fetch for step s is answered once step s - 1 is applied.
    - ``staleness_bound`` b (SSP): a fetch for step c waits until every live worker has
      fetched for step c - b or later (its clock: the step of its latest fetch); a silent
      worker with a step in ``silent_until`` is waited for so until its clock reaches that
      step (its last fetch before it stops), one without from the start.
    - every ``checkpoint_every`` updates (0: never), a checkpoint.  ``applied``: the
      updates before this run (a resumed checkpoint's).
    - ``staleness``: per async apply, the updates applied since the pushing worker's last
      fetch was answered (the simulator's definition, ``sim.algorithms.ps``).

    Raises ValueError for a count out of range."""

    def __init__(self, workers: Iterable[int], sync_replicas: int = 0, quorum: int = 0,
                 replica_of: Callable[[int], int] = lambda rank: rank, staleness_bound: int | None = None,
                 checkpoint_every: int = 0, applied: int = 0, silent: Iterable[int] = (),
                 silent_until: dict[int, int] | None = None) -> None:
        if sync_replicas < 0:
            raise ValueError(f"sync_replicas(={sync_replicas}) must be >= 0")
        if not 0 <= quorum <= sync_replicas:
            raise ValueError(f"quorum(={quorum}) must be between 0 and sync_replicas(={sync_replicas})")
        if staleness_bound is not None and staleness_bound < 0:
            raise ValueError(f"staleness_bound(={staleness_bound}) must be >= 0")
        if checkpoint_every < 0 or applied < 0:
            raise ValueError(f"checkpoint_every(={checkpoint_every}) and applied(={applied}) must be >= 0")
        silent = frozenset(silent)
        self.workers = frozenset(workers) - silent                # the live ones
        self.silent_until = {wk: s for wk, s in (silent_until or {}).items() if wk in silent}
        self.members: dict[int, set[int]] = {}                   # replica -> its workers, crashed ones too
        for wk in workers:
            self.members.setdefault(replica_of(wk), set()).add(wk)
        self.sync_replicas, self.need = sync_replicas, quorum or sync_replicas
        self.replica_of, self.staleness_bound, self.checkpoint_every = replica_of, staleness_bound, checkpoint_every
        self.applied = applied
        self.step_done = -1                          # sync: the last step applied
        self.pushed: set[int] = set()                # sync: the workers that pushed the step in progress
        self.sums: dict[int, Any] = {}               # sync: per replica, the sum of its pushes
        self.deferred: list[tuple[int, int]] = []    # fetches not answered yet: (worker, step)
        self.clock: dict[int, int] = {}
        self.push_steps: dict[int, int] = {}         # async: the step of each worker's latest push
        self.read: dict[int, int] = {}               # async: the updates applied when each worker's fetch was answered
        self.staleness: list[int] = []
        self.done = 0

    @property
    def stopped(self) -> bool:
        return self.done >= len(self.workers)

    def on(self, source: int, tag: int, payload: Any = None) -> list[Action]:
        """The actions for a message from ``source``: a push (payload: its gradient), FETCH
        (payload: the step) or DONE.  ValueError for any other tag."""
        if tag >= PUSH_BASE:
            out = self._push(source, tag, payload)
        elif tag == FETCH:
            self.deferred.append((source, payload))
            self.clock[source] = max(self.clock.get(source, -1), payload)
            out = []
        elif tag == DONE:
            if source in self.workers:    # only this shard's own workers' count towards its stop
                self.done += 1
                self.clock[source] = FINISHED
            out = []
        else:
            raise ValueError(f"tag(={tag}) is neither a push, FETCH({FETCH}) nor DONE({DONE})")
        out += self._answer()
        if tag == DONE and self.done == len(self.workers):
            out.append(Stop())
        return out

    def _push(self, source: int, tag: int, grad: Any) -> list[Action]:
        if not self.sync_replicas:
            # a worker's pushes come in order of step: its next one is the first step from its
            # latest that the tag stands for (tags repeat every PUSH_STEP_TAGS steps)
            last = self.push_steps.get(source, 0)
            step = self.push_steps[source] = last + (tag - PUSH_BASE - last) % PUSH_STEP_TAGS
            self.staleness.append(self.applied - self.read.get(source, self.applied))
            self.applied += 1
            return [Apply(source, step, grad)] + self._checkpoint()
        step = push_step(tag, self.step_done + 1)
        if step <= self.step_done:
            return [Drop(source, step)]
        self.pushed.add(source)                      # one step in flight: nobody pushes s+1 before fetching s's update
        r = self.replica_of(source)
        self.sums[r] = grad if r not in self.sums else self.sums[r] + grad
        complete = tuple(sorted(r for r, ws in self.members.items() if ws <= self.pushed))
        if len(complete) < self.need:
            return []
        total = self.sums[complete[0]]
        for r in complete[1:]:                       # in replica order: the same sum whoever came first
            total = total + self.sums[r]
        late = [Drop(wk, step) for wk in sorted(self.pushed) if self.replica_of(wk) not in complete]
        self.pushed, self.sums = set(), {}
        self.step_done += 1
        self.applied += 1
        return [ApplyMean(step, complete, total / len(complete))] + late + self._checkpoint()

    def _checkpoint(self) -> list[Action]:
        every = self.checkpoint_every
        return [Checkpoint(self.applied)] if every and self.applied % every == 0 else []

    def _answer(self) -> list[Action]:
        """Replies to the deferred fetches that may be answered now, in the order they came."""
        out, still = [], []
        going = [wk for wk, last in self.silent_until.items() if self.clock.get(wk, -1) < last]   # not stopped yet
        slowest = min((self.clock.get(wk, -1) for wk in (*self.workers, *going)), default=FINISHED)
        for wk, step in self.deferred:
            held = (self.sync_replicas and step > self.step_done + 1) or \
                (self.staleness_bound is not None and step >= 0 and step - slowest > self.staleness_bound)
            if held:
                still.append((wk, step))
            else:
                out.append(Reply(wk, step))
                self.read[wk] = self.applied
        self.deferred = still
        return out


# --- Sandblaster's L-BFGS shard -----------------------------------------------------------------
class LbfgsShardState:
    """One L-BFGS shard's decisions: sum a batch's pushes; once the coordinator's EXPECT
    count of them is in, take the step along their sum over ``units``; answer a fetch for
    batch b once b steps are taken.  Stops after EXPECT -1, the steps of every batch
    announced before it, and the DONE of each of the ``workers`` live workers.

    ``zero``: the empty sum (the driver passes a float64 vector: the sum's order varies
    with who won which unit).  Raises ValueError for counts out of range."""

    def __init__(self, workers: int, units: int, zero: Any = 0.0) -> None:
        if workers < 0:
            raise ValueError(f"workers(={workers}) must be >= 0")
        if units < 1:
            raise ValueError(f"units(={units}) must be >= 1")
        self.workers, self.units, self.zero = workers, units, zero
        self.applied, self.done, self.finished = 0, 0, False
        self.total, self.pushes = zero, 0
        self.expects: deque[int] = deque()           # pushes to wait for, batch by batch
        self.deferred: list[tuple[int, int]] = []

    @property
    def stopped(self) -> bool:
        return self.finished and not self.expects and self.done == self.workers

    def on(self, source: int, tag: int, payload: Any = None) -> list[Action]:
        """The actions for FETCH (payload: the batch), EXPECT (the count), DONE or a push
        (its gradient).  ValueError for any other tag."""
        was_stopped = self.stopped
        if tag == FETCH:
            self.deferred.append((source, payload))
        elif tag == EXPECT:
            if payload < 0:
                self.finished = True                 # no more batches (earlier counts still stand)
            else:
                self.expects.append(payload)
        elif tag == DONE:
            self.done += 1
        elif tag >= PUSH_BASE:
            self.total = self.total + payload
            self.pushes += 1
        else:
            raise ValueError(f"tag(={tag}) is neither FETCH({FETCH}), EXPECT({EXPECT}), DONE({DONE}) nor a push")
        out: list[Action] = []
        while self.expects and self.pushes == self.expects[0]:     # 0 expected: every replica was lost
            out.append(Step(self.applied, self.total / self.units))
            self.applied += 1
            self.total, self.pushes = self.zero, 0
            self.expects.popleft()
        still = []
        for wk, batch in self.deferred:
            if batch > self.applied:
                still.append((wk, batch))
            else:
                out.append(Reply(wk, batch))
        self.deferred = still
        if self.stopped and not was_stopped:
            out.append(Stop())
        return out
