"""Device compute time: a roofline with an efficiency factor, and sharing of a device.

``op_seconds`` is an op's time with the device to itself: calibration's measured cost for
its key (``Device.op_costs``: a fixed cost plus FLOPs and bytes at fitted rates) where
there is one, else a fixed per-op overhead plus the larger of its FLOPs over the
achievable rate (dtype peak x efficiency) and its bytes over the achievable memory
bandwidth.  On a GPU described by its public figures (compute capability and SMs given, no
calibrated curve), an op whose ``LayerWork`` the caller knows runs as its kernels do
(``sim.kernel_model``): tile- and wave-quantized GEMMs, the passes over memory a layer
kind's kernels make (see docs/decisions/018-kernels-by-layer-kind.md).

A GPU runs one kernel at a time (``runs_in_order``): ops given to it queue and start one
after the other, first come first served; the engine hands it a step's ops in the Plan's
order (see docs/decisions/010-gpu-runs-its-ops-in-order.md).  Such a device runs its ops
as a *lane*, without the fluid: the fluid's arithmetic for a job alone on its resource,
one shared timer, one simpy event per op (decision 032; ``shortcut=False``: fluid jobs).  On a CPU (host ranks
with calibrated costs too), ops that run at once share it as a processor-sharing queue
(a fluid job on a unit-capacity device).  Devices in a core pool (ranks bound to the same cores)
share it busy or polling, since a polling rank keeps its share: each of n members of a
pool of c cores runs at min(1, c / n) all the time (a wait past the executor's yielding
window, which sleeps, is not modelled).  Costs measured with every rank running
(``MEASURED_SHARED``) are not slowed again.  ``waiting``: idle on cores of its own
(``Engine._host_message``).  See docs/decisions/003-core-pool-shares.md.
"""
from __future__ import annotations

import dataclasses
import heapq
import itertools
import operator
from collections import deque

import simpy

from sim import kernel_model
from sim.flows import max_min_rates
from sim.fluid import Fluid, fire_now, rerate, supersede, timeout_at
from clustersim.core.scenario import DTYPE_BYTES
from clustersim.core.topology import Device, Topology

MEASURED_SHARED = frozenset({"allreduce"})     # op cost keys calibrated with every rank of the job running


def op_seconds(topology: Topology, device: str, flops: float, nbytes: float, dtype: str,
               backward: bool = False, key: str = "", work: kernel_model.LayerWork | None = None) -> float:
    dev = topology.devices[device]
    measured = dev.op_time(key, flops, nbytes) if key else None
    if measured is not None:
        return measured
    if work is not None and dev.kernels_modelled:
        return kernel_model.work_seconds(dev, dtype, DTYPE_BYTES[dtype], work, backward, flops, nbytes)
    eff = dev.efficiency_at(flops, backward)
    return dev.op_overhead + max(flops / (dev.flops_per_s(dtype) * eff), nbytes / dev.achievable_bw)


def alike_devices(topology: Topology) -> dict[str, int]:
    """Each compute device's id among the distinct descriptions (every field but its name,
    machine and noise series, which an op's time alone does not read): ``op_seconds`` of
    the same op is the same on devices with one id, so a step's ops are timed once for all
    the replicas that repeat them."""
    ids: dict[str, int] = {}
    described = operator.attrgetter(*(f.name for f in dataclasses.fields(Device)
                                      if f.name not in ("name", "machine", "noise")))
    return {name: ids.setdefault(repr(described(d)), len(ids)) for name, d in topology.devices.items() if d.is_compute}


def runs_in_order(device: Device) -> bool:
    """Whether ``device`` runs one op at a time: a GPU (one stream of kernels, measured op
    costs or not: ``calibrate --gpu`` writes them), unless it is one of the ranks sharing a
    core pool."""
    return device.kind == "gpu" and not device.core_pool


class Compute:
    """Every compute device: one op at a time on a GPU (``runs_in_order``), processor sharing
    elsewhere.  ``run`` returns an event that fires when the op is done, with the time the
    op started where it waited its turn (None: it started when it was given)."""

    def __init__(self, env: simpy.Environment, topology: Topology, dtype: str,
                 slowdown: dict[str, float] | None = None, shortcut: bool = True) -> None:
        self.env, self.topology, self.dtype = env, topology, dtype
        self.slowdown = slowdown or {}
        self.fluid = Fluid(env, {name: 1.0 for name, d in topology.devices.items() if d.is_compute}, shortcut)
        self.weights = {name: {name: 1} for name, d in topology.devices.items() if d.is_compute}
        self.share = pool_shares(topology)
        self.queues: dict[str, deque] = {name: deque() for name, d in topology.devices.items()
                                         if d.is_compute and runs_in_order(d)}
        self.busy: set[str] = set()        # in-order devices running an op now
        self.held: dict[str, list[float]] = {}   # GPU -> shares collectives' kernels take now
        self.speed: dict[str, float] = {}        # device -> its speed now, where host noise is replayed
        self.alike = alike_devices(topology)    # device -> id shared by devices described alike
        self.timed: dict[tuple, float] = {}     # (alike id, op) -> op_seconds: replicas repeat ops
        # shortcut: an in-order device runs its ops as a lane, without the fluid (below)
        self.lanes = {name: _Lane() for name in self.queues} if shortcut else None
        self._due: list[tuple[float, int, str]] = []    # (finish, start sequence, device); stale ones skipped
        self._seq = itertools.count()
        self._wake_at, self._timer = float("inf"), None  # the one live lane timer
        # inside ``_lanes_due`` the next timer is only reserved, (time, simpy event id), and
        # put on simpy's queue on the way out unless it is the very next event: then the
        # lanes run ahead to it at once (``ahead`` counts those ends, events not queued)
        self._inside, self._reserved, self.ahead = False, None, 0
        self._dirty: list[tuple[str, int]] = []          # (lane, its op) whose capacity changed this instant

    def in_order(self, device: str) -> bool:
        return device in self.queues

    def factor(self, device: str, key: str = "") -> float:
        """How much longer than alone on its device: a straggler's slowdown over its core share."""
        share = 1.0 if key in MEASURED_SHARED else self.share.get(device, 1.0)
        return self.slowdown.get(device, 1.0) / share

    def alone(self, device: str, flops: float, nbytes: float, backward: bool = False, key: str = "",
              work: kernel_model.LayerWork | None = None) -> float:
        """The op's seconds with ``device`` to itself, before its straggler factor (kept per
        alike device: replicas repeat their ops)."""
        memo = (self.alike.get(device, device), flops, nbytes, backward, key, work)
        alone = self.timed.get(memo)
        if alone is None:
            alone = self.timed[memo] = op_seconds(self.topology, device, flops, nbytes, self.dtype, backward, key, work)
        return alone

    def seconds(self, device: str, flops: float, nbytes: float, backward: bool = False, key: str = "",
                work: kernel_model.LayerWork | None = None) -> float:
        return self.alone(device, flops, nbytes, backward, key, work) * self.factor(device, key)

    def run(self, device: str, flops: float, nbytes: float, backward: bool = False, key: str = "",
            work: kernel_model.LayerWork | None = None) -> simpy.Event:
        """``work``: what the op computes (``kernel_model.op_work``), where the caller knows it."""
        return self.start(device, self.seconds(device, flops, nbytes, backward, key, work))

    def start(self, device: str, seconds: float, then=None) -> simpy.Event | None:
        """An op of ``seconds`` (its straggler factor applied) on ``device``: queued behind
        the running one on an in-order device; the event as ``run``'s.  ``then``: instead,
        a callable the op's end calls with that event's value (a lane's op then needs no
        event of its own where it ends alone: ``_lanes_due``)."""
        if then is not None and (self.lanes is None or device not in self.queues):
            ev = self.start(device, seconds)
            ev.callbacks.append(lambda e: then(e.value))
            return None
        if device not in self.queues:
            return self.fluid.start(self.weights[device], seconds)
        done = then or self.env.event()
        if device in self.busy:
            queue = self.queues[device]
            if type(done) is not Quiet and self.lanes is not None and (
                    self.lanes[device].ahead or queue and type(queue[-1][1]) is Quiet):
                self._dissolve(device)
            queue.append((seconds, done))
        elif self.lanes is not None:
            self.busy.add(device)
            self._lane_start(device, seconds, done)
        else:
            self.queues[device].append((seconds, done))
            self._next(device)
        return done if then is None else None

    def give(self, device: str, entries: list[tuple[float, Quiet]], log: list, wake: list) -> None:
        """A chain's ops, ``(seconds, Quiet)`` each, to an in-order device's lane at once
        (``Engine.run_graph``, decision 043): their ends go to ``log`` as ``(op, start,
        end)``; an op ``i`` with a callable ``wake[i]`` calls it as a ``then`` when it ends."""
        queue, lane = self.queues[device], self.lanes[device]
        if not self.can_give(device):
            raise RuntimeError(f"{device}: a chain given while another runs (decision 043)")
        lane.log, lane.wake = log, wake
        queue.extend(entries)                   # behind what is queued, as ``start`` one by one
        if device not in self.busy:
            self.busy.add(device)
            self._lane_start(device, *queue.popleft())

    def can_give(self, device: str) -> bool:
        """Whether ``device`` is a lane with no chain's op left to run (``give``)."""
        if self.lanes is None or device not in self.lanes:
            return False
        lane = self.lanes[device]
        return not (lane.ahead or lane.rest or type(lane.done) is Quiet
                    or any(type(e[1]) is Quiet for e in self.queues[device]))

    def _dissolve(self, device: str) -> None:
        """Another op comes to a lane running a chain: the chain's ops not yet started go
        back to being given one at a time, each at its predecessor's end (``rest``), as the
        engine gives ops op by op, so that the newcomer runs between them in its turn."""
        lane, queue = self.lanes[device], self.queues[device]
        self.catch_up(device, ending_now=False)
        if lane.ahead:      # the op running now -- or ending now: it ends through the timer, after the newcomer came
            self._cut(device, 0)
        entries = list(queue)
        queue.clear()
        queue.extend(e for e in entries if type(e[1]) is not Quiet)     # all queued before the chain
        quiet = [e for e in entries if type(e[1]) is Quiet]
        if quiet and type(lane.done) is not Quiet:       # the chain's next op was given already
            queue.append(quiet.pop(0))
        lane.rest.extend(quiet)

    def catch_up(self, device: str, ending_now: bool = True) -> None:
        """Logs the ops of ``device``'s chain computed ahead that have ended by now (those
        ending at this very instant too, unless ``ending_now`` is False)."""
        lane, now = self.lanes[device], self.env.now
        ahead, log = lane.ahead, lane.log
        k = 0
        while k < len(ahead) and (ahead[k][3] <= now if ending_now else ahead[k][3] < now):
            q, _, start, end = ahead[k]
            log.append((q.i, start, end))
            k += 1
        del ahead[:k]

    def woken(self, device: str) -> None:
        """A wake was set on an op of ``device``'s chain: where that op was computed ahead
        (silent), the lane runs it as its own op instead, so that its end is heard."""
        self.catch_up(device)
        lane = self.lanes[device]
        for k, (q, _, _, _) in enumerate(lane.ahead):
            if lane.wake[q.i] is not None:
                self._cut(device, k)
                return

    def _cut(self, device: str, k: int) -> None:
        """Makes the k-th op computed ahead ``device``'s running op, from its own start, and
        gives the ops after it back to the queue's front (unstarted: the op running till
        now had its seconds untouched, as any rate change cuts first)."""
        lane, queue = self.lanes[device], self.queues[device]
        ahead = lane.ahead
        q, seconds, start, end = ahead[k]
        queue.appendleft((lane.remaining, lane.done))
        queue.extendleft([(s, r) for r, s, _, _ in reversed(ahead[k + 1:])])
        del ahead[k:]
        lane.done, lane.start, lane.since, lane.remaining = q, start, start, seconds
        lane.seq, lane.finish = next(self._seq), end
        heapq.heappush(self._due, (end, lane.seq, device))
        if end < self._wake_at:
            self._arm_at(end)

    def _next(self, device: str) -> None:
        """Starts the op first in ``device``'s queue, if any (the fluid path: lanes start
        their next op in ``_lanes_due``)."""
        queue = self.queues[device]
        if not queue:
            self.busy.discard(device)
            return
        self.busy.add(device)
        seconds, done = queue.popleft()
        start = self.env.now

        def finished(_e) -> None:
            self._next(device)
            done.succeed(start)
        self.fluid.start(self.weights[device], seconds).callbacks.append(finished)

    # --- lanes: an in-order device's op with the fluid's arithmetic for a job alone on its
    # resource (weight 1: rate = capacity), ended by one timer shared by all lanes, in
    # (finish, start) order as the fluid's heap ends jobs (decision 032)
    def _lane_start(self, device: str, seconds: float, done: simpy.Event) -> None:
        """Starts an op on the lane now.  A chain's silent ops (``Quiet``, no wake) with
        more of the chain queued behind them are computed ahead, each from its
        predecessor's end as if started then, up to the first that must be heard or is
        last queued: that one runs as the lane's op, its end on the due heap.  Only at full
        capacity: a later change can then only slow the lane, so a timer the stretch's end
        armed never fires after the run's last event."""
        lane, now = self.lanes[device], self.env.now
        rate = lane.capacity
        if rate == 1.0 and type(done) is Quiet and lane.wake[done.i] is None:
            queue = self.queues[device]
            if queue and type(queue[0][1]) is Quiet:
                ahead, wake = lane.ahead, lane.wake
                while True:
                    end = now + seconds / rate if seconds > 0 else now
                    ahead.append((done, seconds, now, end))
                    now = end
                    seconds, done = queue.popleft()
                    if wake[done.i] is not None or not queue or type(queue[0][1]) is not Quiet:
                        break
        lane.done, lane.start, lane.since, lane.remaining = done, now, now, seconds
        lane.rate, lane.seq = rate, next(self._seq)
        lane.finish = finish = now + seconds / rate if seconds > 0 else now
        heapq.heappush(self._due, (finish, lane.seq, device))
        if finish < self._wake_at:                   # the earliest now: the timer moves to it
            self._arm_at(finish)

    def _arm_at(self, when: float) -> None:
        """The one live lane timer, at ``when`` (an earlier-armed one goes stale).  Inside
        ``_lanes_due`` it takes its simpy event id now, as ``timeout_at`` would, and the
        queue entry later (``_leave``): the same place among simpy's events."""
        self._wake_at = when
        if self._inside:
            self._reserved = (max(when, self.env.now), next(self.env._eid))
            return
        supersede(self._timer)
        self._timer = timeout_at(self.env, when)
        self._timer.callbacks.append(self._lanes_due)

    def _arm(self) -> None:
        due, lanes = self._due, self.lanes
        while due:                                           # drop stale entries: ended, or moved by a
            finish, seq, device = due[0]                     # capacity change (live: the running op's
            lane = lanes[device]                             # sequence and finish now)
            if lane.done is not None and lane.seq == seq and lane.finish == finish:
                break
            heapq.heappop(due)
        if due and due[0][0] < self._wake_at:
            self._arm_at(due[0][0])

    def _lanes_due(self, event: simpy.Event) -> None:
        """Ends the lanes' ops due now in the fluid path's order: first every such lane
        takes its next op, then the
        first op's callbacks run here and the others' ``done`` events fire in that order
        (an event each, so what one op's callbacks start urgently comes before the next).
        The first op's end takes one trip through simpy's queue, not the fluid's three: an
        unrelated event tied with it runs after it here, before it there (decision 032)."""
        if event is not self._timer:
            return                                           # superseded by an earlier one
        self._timer, self._inside = None, True
        try:
            while self._lanes_end():                         # the next timer would be simpy's next event
                self.ahead += 1
        finally:
            self._inside = False
        self._leave()

    def _lanes_end(self) -> bool:
        """``_lanes_due``'s work at one instant; True where the timer it reserved would be
        the next event simpy takes (nothing else queued before it, at its time or earlier
        in simpy's order): then simpy's clock is moved to it and the caller runs it at once,
        as ``Environment.step`` would next (decision 043)."""
        now, due, lanes = self.env.now, self._due, self.lanes
        ended, devices, rests = [], [], []
        while due and due[0][0] <= now:
            entry = heapq.heappop(due)
            lane = lanes[entry[2]]
            if lane.done is not None and lane.seq == entry[1] and lane.finish == entry[0]:    # live (``_arm``)
                done, lane.done = lane.done, None
                devices.append(entry[2])
                if type(done) is Quiet:                      # logged; woken only where asked
                    log = lane.log
                    if lane.ahead:                           # the chain's ops computed before it, all
                        for q, _, start, end in lane.ahead:  # ended by now (``catch_up``, inlined)
                            log.append((q.i, start, end))
                        lane.ahead.clear()
                    log.append((done.i, lane.start, now))
                    if lane.rest:                            # a dissolved chain: its next op given now
                        rests.append(entry[2])
                    done = lane.wake[done.i]
                    if done is None:
                        continue
                ended.append((entry[2], done, lane.start))
        queues = self.queues
        for device in devices:                               # ``_next``, inlined
            queue = queues[device]
            if queue:
                self._lane_start(device, *queue.popleft())
            else:
                self.busy.discard(device)
        for device in rests:                                 # as the op-by-op engine gives them
            self.start(device, *self.lanes[device].rest.popleft())
        self._wake_at = float("inf")
        self._arm()
        for _, done, start in ended[1:]:
            if type(done) is not simpy.Event:                # a ``then``: its own event now, as ``done``
                done, then = self.env.event(), done
                done.callbacks.append(lambda e, then=then: then(e.value))
            done.succeed(start)
        if ended:
            done, start = ended[0][1], ended[0][2]
            if type(done) is simpy.Event:
                fire_now(done, start)
            else:
                done(start)
        reserved, env = self._reserved, self.env
        if reserved is None:
            return False
        queue = env._queue
        if queue and queue[0][:3] < (reserved[0], simpy.core.NORMAL, reserved[1]):
            return False
        self._reserved, env._now = None, reserved[0]
        return True

    def _leave(self) -> None:
        """Puts the timer reserved inside ``_lanes_due`` on simpy's queue with the id it took."""
        if self._reserved is not None:
            when, eid = self._reserved
            self._reserved = None
            self._timer = timeout_at(self.env, when, eid)
            self._timer.callbacks.append(self._lanes_due)

    def _lane_capacity(self, device: str, capacity: float) -> None:
        """A lane's capacity changes now; its op, if running, is re-solved once this instant's
        changes are all in (the fluid's batched solve, over the changed lanes only: the same
        floats but where near-equal shares group, decision 032)."""
        lane = self.lanes[device]
        lane.capacity = capacity
        if lane.ahead:                                  # a chain computed ahead at the old rate: the
            self.catch_up(device)                       # op running now becomes the lane's own
            if lane.ahead:
                self._cut(device, 0)
        if lane.done is not None:                       # the op running now (not one started later)
            if not self._dirty:
                self.env.timeout(0).callbacks.append(self._lanes_resolve)
            self._dirty.append((device, lane.seq))

    def _lanes_resolve(self, _event: simpy.Event) -> None:
        """New rates for the changed lanes' ops, as ``Fluid._resolve`` gives them: one op
        alone at capacity / 1, several through ``max_min_rates`` in start order (one solve
        for independent resources still groups shares within its round-off slack)."""
        lanes, now = self.lanes, self.env.now
        running = sorted({d for d, seq in self._dirty if lanes[d].seq == seq and lanes[d].done is not None},
                         key=lambda d: lanes[d].seq)
        self._dirty = []
        if len(running) == 1:
            rates = [lanes[running[0]].capacity / 1]
        else:
            solved = max_min_rates({d: {d: 1} for d in running}, {d: lanes[d].capacity for d in running})
            rates = [solved[d] for d in running]
        for device, rate in zip(running, rates):
            lane = lanes[device]
            if rerate(lane, rate, now):
                heapq.heappush(self._due, (lane.finish, lane.seq, device))
        self._arm()

    def hold(self, devices, share: float):
        """A collective's kernel takes ``share`` of every in-order GPU of ``devices`` until the
        returned ``release()``: what runs beside it runs on the rest (NCCL's channels are
        thread blocks on the GPU's SMs; ``clustersim.core.nccl.sm_share``)."""
        held = [d for d in devices if d in self.queues] if share > 0 else []
        for d in held:
            self.held.setdefault(d, []).append(share)
            self._capacity(d)

        def release() -> None:
            for d in held:
                self.held[d].remove(share)
                self._capacity(d)
        return release

    def set_speed(self, device: str, speed: float) -> None:
        """From now on ``device`` runs at ``speed`` times its speed on a quiet host (its
        ``noise`` replayed: ``Engine._replay_noise``); what it runs now is re-solved.  Not
        an in-order device: a lane computes ahead only where no later change can speed it."""
        if device in self.queues:
            raise ValueError(f"set_speed({device!r}): an in-order device takes no noise")
        if self.speed.get(device, 1.0) != speed:
            self.speed[device] = speed
            self._capacity(device)

    def _capacity(self, device: str) -> None:
        sms = self.topology.devices[device].sms or 1
        taken = sum(self.held.get(device, ()))
        capacity = (max(1.0 - taken, 1.0 / sms) if taken else 1.0) * self.speed.get(device, 1.0)
        if self.lanes is not None and device in self.lanes:
            self._lane_capacity(device, capacity)
        else:
            self.fluid.set_capacity(device, capacity)

    def waiting(self, device: str) -> bool:
        """Whether compute device ``device`` is idle now and has its cores to itself (a rank
        that shares a core polls only in its turn)."""
        return (device in self.weights and not self.fluid.users.get(device) and device not in self.busy
                and self.share.get(device, 1.0) >= 1.0)

    def run_seconds(self, device: str, seconds: float) -> simpy.Event:
        """A job of ``seconds`` of the device's time (a message's software overhead)."""
        return self.start(device, seconds * self.factor(device))


class _Lane:
    """An in-order device's running op (``done`` None: idle) and its capacity now."""
    __slots__ = ("capacity", "done", "start", "since", "remaining", "rate", "finish", "seq", "ahead", "log", "wake",
                 "rest")

    def __init__(self) -> None:
        self.capacity, self.done = 1.0, None
        self.ahead: list[tuple[Quiet, float, float, float]] = []   # a chain's ops computed ahead of it
        self.log: list = []                  # the chain's (op, start, end) ends (``give``)
        self.wake: list = []                 # op -> what its end calls, or None
        self.rest: deque = deque()           # a dissolved chain's ops, given one at a time (``_dissolve``)


class Quiet:
    """Op ``i`` of a chain given to a lane at once (``Compute.give``): its end only appends
    ``(i, start, end)`` to the lane's log and starts the lane's next op, unless the lane's
    ``wake[i]`` holds a callable, which its end then calls as a ``then`` (decision 043).
    One per op of a plan, shared by every replica's chain."""
    __slots__ = ("i",)

    def __init__(self, i: int) -> None:
        self.i = i


def pool_shares(topology: Topology) -> dict[str, float]:
    """Device -> the share of a core it runs at: min(1, cores / members) of its pool."""
    members: dict[str, int] = {}
    for d in topology.devices.values():
        if d.core_pool:
            members[d.core_pool] = members.get(d.core_pool, 0) + 1
    return {name: min(1.0, topology.core_pools[d.core_pool] / members[d.core_pool])
            for name, d in topology.devices.items() if d.core_pool}
