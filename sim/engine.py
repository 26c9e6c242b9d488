"""Runs a Plan in simpy on the hardware model and records a Trace.

The engine knows how to run one replica's step graph, one transfer, one compute op and
one collective on the modelled cluster; the training algorithm (``algorithms/``) decides
how steps, gradient exchange and updates follow each other.  All state lives in the
``Engine`` and its ``env``; randomness comes from the generator passed in.
"""
from __future__ import annotations

import gc
import heapq
import itertools
import time
from array import array
from dataclasses import dataclass, field

import numpy as np
import simpy

from sim import collectives
from sim.compute import MEASURED_SHARED, Compute, Quiet
from sim.faults import failure_schedule, job_machines, slowdowns
from sim.fluid import fire_now, supersede
from sim.network import BACKENDS
from clustersim.core.plan import PARAM_BYTES, Plan, cost_key, reruns, split_key, used_devices
from clustersim.core.scenario import Failure
from sim.kernel_model import op_work
from clustersim.core.topology import NoRoute, Topology
from clustersim.core.trace import Span, Trace, Update


BACKGROUND = "background"     # a timer's ``stale`` mark: run it only while other events are due


class CountingEnvironment(simpy.Environment):
    """A simpy Environment that counts the events it processes and drops, unrun and
    uncounted, wake-up timers a newer one replaced (``sim.fluid.supersede``): their
    callbacks do nothing, and run they would move the clock, and so the simulated end,
    past the last real event.  A ``BACKGROUND`` timer (``stale`` set to it: the host
    noise's next window, the next failure) is dropped too where nothing but such timers is
    left: nothing else will happen, and a stalled job ends at its last event, not at a
    failure drawn for later.  One attribute read per event."""

    def __init__(self, initial_time: float = 0) -> None:
        super().__init__(initial_time)
        self.events_processed = 0

    def step(self) -> None:
        queue = self._queue
        while queue:
            mark = getattr(queue[0][3], "stale", False)      # True: superseded; BACKGROUND: see above
            if mark is True:
                heapq.heappop(queue)
            elif mark and all(getattr(e[3], "stale", False) for e in queue[1:]):
                queue.clear()                   # background timers, and timers dropped anyway
            else:
                break
        self.events_processed += 1
        super().step()


@dataclass
class GraphRun:
    """One replica's step in flight: ``done`` fires when all its ops have; ``slot_ready[j]``
    when every backward op on slot j has (its gradients are final); ``layer_ready[(j, i)]``
    when slot j's backward ops of layer i have (that layer's gradients are final)."""

    done: simpy.Event
    slot_ready: list[simpy.Event] = field(default_factory=list)
    layer_ready: dict[tuple[int, int], simpy.Event] = field(default_factory=dict)
    cancelled: bool = False              # abandoned (a sync step being redone): launch nothing more


def first_n(env: simpy.Environment, events: list[simpy.Event], n: int) -> simpy.Event:
    """Fires with the indices of the first ``n`` of ``events`` to fire (all of them if n >= len)."""
    done = env.event()
    order: list[int] = []
    n = min(n, len(events))

    def hit(i: int) -> None:
        order.append(i)
        if len(order) == n and not done.triggered:
            done.succeed(list(order))
    for i, ev in enumerate(events):
        ev.callbacks.append(lambda _e, i=i: hit(i))
    if n == 0:
        done.succeed([])
    return done


class Engine:
    def __init__(self, plan: Plan, env: CountingEnvironment | None = None,
                 rng: np.random.Generator | None = None, shortcut: bool = True) -> None:
        """``shortcut``: keep what never changes within a run (a GPU's ops as a lane, not
        fluid jobs: decision 032; a lone job's rate at once, link names, checked routes and
        NCCL link speeds per topology); False works each out anew, the slow path tests
        compare the shortcuts with (same floats)."""
        self.shortcut = shortcut
        sc = plan.scenario
        self.plan, self.env = plan, env or CountingEnvironment()
        self.rng = rng if rng is not None else np.random.default_rng(sc.seed)
        self.slowdown = slowdowns(sc, self.rng)
        self.compute = Compute(self.env, sc.topology, sc.dtype, self.slowdown, shortcut)
        self.step_costed = {name for name in self.compute.weights if "step" in sc.topology.devices[name].op_costs}
        # devices with measured message costs (``transfer`` asks no other for them)
        devices = sc.topology.devices
        self._messaging = {name for name in self.compute.weights
                           if any(key.startswith(("send", "recv"))
                                  for key in (*devices[name].op_costs, *devices[name].op_curves))}
        self.network = BACKENDS[sc.network](self.env, sc.topology, shortcut)
        self.trace = Trace()
        self._collectives = collectives.LayoutCache(shortcut)   # tuner's times, ports, link speeds per share
        self._nccl_speed = collectives.nccl_link_speed(sc.topology, 1.0, self._collectives if shortcut else None)
        self.failed: dict[str, float] = {}          # device -> time it failed (until a restart replaces it)
        self.failed_ever: dict[str, float] = {}     # every device that failed in the run, and when
        self.failed_links: list[str] = []           # every link cut in the run ("a-b"), in order
        self.failed_transfers = 0
        self.blocked: dict[str, str] = {}           # dead end (device or link) -> the first message it held up
        self._lost: dict[str, simpy.Event] = {}     # device -> fires when it fails
        self._cut: dict[int, simpy.Event] = {}      # replica -> fires when a message of its finds no route
        self._back: dict[str, simpy.Event] = {}     # failed device -> fires when it is replaced
        self.ps_server = None                      # set by parameter-server algorithms
        # sync SGD: (index into trace.step_ends, replicas) where each stretch of steps it ran
        # with one set of replicas begins: the first all of them, then one after each drop
        self.sync_phases: list[tuple[int, int]] = [(0, plan.replicas)]
        self.failure_signal = self.env.event()     # fires (and is replaced) at every failure
        self.lost_samples = 0                      # work thrown away after failures
        self._graphs: dict[int, tuple] = {}
        self._names: dict[tuple[str, str], tuple[str, ...]] = {}   # (src, dst) -> its route's link names
        self._names_of = None                       # the topology they were routed on
        self._id_names: list[str | None] = []       # link id -> its name, as spans record it, on that topology
        par = sc.parallel                           # a tensor group's width, 0 without one
        self._tensor_group = par.tensor if par.split == "tensor" else 0
        self._graph_info(plan)
        used = sorted(used_devices(plan))
        drawn = failure_schedule(sc, used, self.rng)
        self.failures = [f for f, _ in drawn]
        self._next_failure: simpy.Event | None = None   # the timer of the next failure to come
        self._due = [(f.at_s, k, f, key) for k, (f, key) in enumerate(drawn)]   # a heap: what is yet to fail
        heapq.heapify(self._due)
        self._rearm: simpy.Event | None = None          # fires when a failure earlier than the timer's comes
        self._renewed = set(used) if sc.faults.mtbf_s > 0 else set()   # replaced, these fail again (mtbf)
        self._machines = job_machines(sc, used)                       # machine -> its devices (machine_mtbf_s)
        self._drawn = itertools.count(len(self.failures))           # the heap's tie-break for those
        self._mtbf_due = {key for _, key in drawn if key is not None}   # devices and machines with a draw to come
        self._stopped = False                                         # the job is over: nothing fails now
        self.stall_note = ""                                          # the algorithm's own word on a stall
        if self.failures:
            self.env.process(self._inject())
        self._noise_timer: simpy.Event | None = None
        if sc.faults.host_noise:
            self._replay_noise(sc.topology, sc.faults.host_noise_window_s or sc.topology.noise_window_s)

    def _replay_noise(self, topology: Topology, window: float) -> None:
        """Each host rank's measured speed, window by window (``Device.noise``: how many times
        slower than quiet), from a window drawn at random, the same for all ranks (their
        windows were timed at once), each ``window`` long, on in a loop: a rank slowed by a
        spell of its core slows every rank that meets it (docs/decisions/048).  The replay
        stops with the job; its timer is marked ``BACKGROUND``, so a stalled job ends at its
        last event."""
        series = {name: d.noise for name, d in topology.devices.items() if d.noise}
        n = len(next(iter(series.values())))
        first = self.noise_first = int(self.rng.integers(n))

        def speeds(k: int) -> None:
            for name, factors in series.items():
                self.compute.set_speed(name, 1.0 / factors[k % n])

        def replay():
            k = first
            while True:
                self._noise_timer = self.env.timeout(window)
                self._noise_timer.stale = BACKGROUND
                yield self._noise_timer
                k += 1
                speeds(k)
        speeds(first)
        self.env.process(replay())

    def _graph_info(self, plan: Plan) -> tuple:
        """Successor lists, each compute op's next on its slot in the Plan's order (-1: the
        last), the successor lists with that next op added, backward-op counts per slot, each
        op's key in measured op costs (its layer kind, ``.backward`` for backward ops) and
        span name of a plan's step graph, a table of its ops' seconds alone per alike device,
        filled as they run, and whether each is a transfer NCCL runs where both ends are GPUs
        (``_nccl_piece``) (cached: every replica's step repeats them)."""
        key = id(plan)
        if key not in self._graphs:
            succ: list[list[int]] = [[] for _ in plan.ops]
            following = [-1] * len(plan.ops)
            last: dict[int, int] = {}
            for op in plan.ops:
                for d in op.deps:
                    succ[d].append(op.id)
                if op.kind != "xfer":
                    if op.slot in last:
                        following[last[op.slot]] = op.id
                    last[op.slot] = op.id
            bwd = [0] * plan.slots
            for op in plan.ops:
                if op.kind == "bwd":
                    bwd[op.slot] += 1
            keys = [cost_key(plan, op) for op in plan.ops]
            again = reruns(plan.scenario.model)
            works = [op_work(plan, op, again) for op in plan.ops]
            per_layer: dict[tuple[int, int], int] = {}
            for op in plan.ops:
                if op.kind == "bwd":
                    per_layer[(op.slot, op.layer)] = per_layer.get((op.slot, op.layer), 0) + 1
            chained = [s + [nxt] if nxt >= 0 else s for s, nxt in zip(succ, following)]
            names = [f"{op.why if op.kind == 'xfer' else op.kind} L{op.layer}" for op in plan.ops]
            alone: dict = {}        # alike device id -> each op's seconds alone there (None: not yet)
            chains = _chains(plan, self.plan)
            quiet = [Quiet(op.id) for op in plan.ops]
            pieces = [self._nccl_piece(op) for op in plan.ops]
            self._graphs[key] = (plan, succ, following, bwd, keys, per_layer, works, chained, names, alone, pieces,
                                 [c and (c, [quiet[i] for i in c], any(keys[i] in MEASURED_SHARED for i in c),
                                         _heard(plan, c)) for c in chains])
        return self._graphs[key]

    # --- faults ------------------------------------------------------------------------------
    def _inject(self):
        """Each failure at its time, earliest first: the scenario's and, with ``mtbf_s`` or
        ``machine_mtbf_s``, a replaced device's or machine's next (``replace``: an MTBF is a
        rate, so a run of many MTBFs keeps failing)."""
        due = self._due
        while not self._stopped:
            self._rearm = self.env.event()
            if not due:                                # a replacement's draw may come later
                yield self._rearm                      # (not queued: a stalled job still ends)
                continue
            self._next_failure = self.env.timeout(max(0.0, due[0][0] - self.env.now))
            self._next_failure.stale = BACKGROUND      # a job with nothing else due is stalled: no later failure
            yield self.env.any_of([self._next_failure, self._rearm])
            if self._rearm.triggered or self._stopped:     # an earlier one came: wait for it instead
                supersede(self._next_failure)
                continue
            _, _, f, key = heapq.heappop(due)
            self._mtbf_due.discard(key)
            for dev in f.devices:
                self.failed.setdefault(dev, self.env.now)
                self.failed_ever.setdefault(dev, self.env.now)
                if dev in self._lost and not self._lost[dev].triggered:
                    self._lost[dev].succeed(dev)
            if f.link:
                self.network.topology = self.network.topology.without_link(*f.link)
                self.failed_links.append("-".join(f.link))
            self.trace.add(Span("failure", "wait", ",".join(f.devices) or "-".join(f.link), -1, -1,
                                self.env.now, self.env.now, phase="failure"))
            signal, self.failure_signal = self.failure_signal, self.env.event()
            signal.succeed(f)

    def stop_failures(self) -> None:
        """The job is over: a failure still to come does not happen, nor move the clock; nor
        does the host noise's next window."""
        self._stopped = True
        supersede(self._next_failure)
        supersede(self._noise_timer)

    def alive(self, *devices: str) -> bool:
        return not self.failed or not any(d in self.failed for d in devices)

    def link_names(self, src: str, dst: str, topology: Topology | None = None) -> tuple[str, ...]:
        """The names of the links from ``src`` to ``dst`` on ``topology`` (default: the one
        now), as spans record them; raises LookupError where no route is left."""
        now = self.network.topology
        topology = topology or now
        if not self.shortcut or topology is not now:
            return _link_names(topology.route(src, dst))
        known = self._names_on(now)
        names = known.get((src, dst))
        if names is None:       # from the route's link ids (the ones the flows use)
            self._name_routes([(src, dst)])
            names = known[(src, dst)]
        return names

    def _name_routes(self, pairs: list[tuple[str, str]]) -> None:
        """The link names of ``pairs``' routes on the topology now, kept (``link_names``),
        the routes found together (``Topology.route_ids_each``); LookupError where one has
        none (nothing kept then)."""
        topology = self.network.topology
        known, named, links = self._names_on(topology), self._id_names, topology.links
        for pair, ids in zip(pairs, topology.route_ids_each(pairs)):
            known[pair] = tuple([named[i] or _name_of(named, links, i) for i in array("i", ids)])

    def _names_on(self, topology: Topology) -> dict[tuple[str, str], tuple[str, ...]]:
        """The link names kept for ``topology``: none yet when it is new (a cut link gave
        the engine a new one)."""
        if self._names_of is not topology:
            self._names, self._names_of = {}, topology
            self._id_names = [None] * len(topology.links)
        return self._names

    def lost(self, devices: list[str]) -> simpy.Event:
        """Fires when any of ``devices`` fails (at once if one is down already)."""
        for d in devices:
            if d not in self._lost:
                self._lost[d] = self.env.event()
                if d in self.failed:
                    self._lost[d].succeed(d)
        return self.env.any_of([self._lost[d] for d in devices])

    def cut_off(self, replica: int) -> simpy.Event:
        """Fires when a message of ``replica`` (its pushes and fetches, its slots' messages)
        finds no route (a link cut): an asynchronous replica cut off from its shards stops,
        as one whose device failed.  Keyed by replica, not device: a shard may share a
        device with a replica that can still reach it."""
        return self._cut.setdefault(replica, self.env.event())

    def _no_route(self, src: str, dst: str, replica: int, name: str) -> simpy.Event:
        """A message with no route left: its replica is cut off, and it never arrives."""
        if replica >= 0:
            cut = self.cut_off(replica)
            if not cut.triggered:
                cut.succeed(replica)
        return self._block(f"the route {src}->{dst} (a link cut)", name)

    def recovered(self, device: str) -> simpy.Event:
        """Fires when a failed ``device`` has been replaced (at once if it is up)."""
        if device not in self.failed:
            ev = self.env.event()
            return ev.succeed()
        return self._back.setdefault(device, self.env.event())

    def _draw(self, key, devices: tuple[str, ...], mtbf: float) -> None:
        """The next failure of ``devices`` (a device's, or a machine's: ``key``), an
        exponential time of mean ``mtbf`` from now; the injector is woken where it comes
        before the failure it waits for."""
        self._mtbf_due.add(key)
        at = self.env.now + float(self.rng.exponential(mtbf))
        earlier = not self._due or at < self._due[0][0]
        heapq.heappush(self._due, (at, next(self._drawn), Failure(at, devices), key))
        if earlier and self._rearm is not None and not self._rearm.triggered:
            self._rearm.succeed()

    def replace(self, device: str) -> None:
        """A failed device is up again (a replacement); it can fail again later: with
        ``mtbf_s``, after a new exponential time from now, and with ``machine_mtbf_s`` its
        machine, once every failed device of it is replaced."""
        faults = self.plan.scenario.faults
        if device in self.failed and not self._stopped:
            if device in self._renewed and device not in self._mtbf_due:   # one draw to come a device
                self._draw(device, (device,), faults.mtbf_s)
            m = self.plan.scenario.topology.machine_of(device) if self._machines else None
            if (m in self._machines and ("machine", m) not in self._mtbf_due
                    and all(d == device or d not in self.failed for d in self._machines[m])):
                self._draw(("machine", m), self._machines[m], faults.machine_mtbf_s)
        self.failed.pop(device, None)
        self._lost.pop(device, None)
        self.blocked.pop(device, None)          # what waited on it is no longer held up there
        back = self._back.pop(device, None)
        if back is not None:
            back.succeed()

    def _block(self, dead_end: str, what: str, message: bool = True) -> simpy.Event:
        """Work that can never complete (a message or collective, counted as a failed
        transfer; or an op on a failed device): its dead end kept for the stall report, and
        an event that never fires (the algorithm's timeouts decide)."""
        if message:
            self.failed_transfers += 1
        self.blocked.setdefault(dead_end, what)
        return self.env.event()

    def stall_reason(self) -> str:
        """Which failed devices or cut links the waiting work depends on, in words: those a
        message or collective is held up at, then every other device down now; or the
        algorithm's own word (``stall_note``: a job that cannot get past its failures)."""
        if self.stall_note:
            return self.stall_note
        plan = self.plan
        shards = {d: k for k, d in enumerate(plan.ps.devices)} if plan.ps else {}
        owner = {d: r for r, row in enumerate(plan.devices) for d in row}
        ends = {**self.blocked, **{d: "" for d in self.failed if d not in self.blocked}}
        parts = []
        for end, what in ends.items():
            if end in shards:
                who = f"parameter-server shard {shards[end]} on {end}"
            elif end in owner:
                who = f"replica {owner[end]}'s {end}"
            else:
                who = end
            when = f", failed at {self.failed_ever[end]:.6g} s" if end in self.failed_ever else ""
            parts.append(f"{who}{when}" + (f" (held up: {what})" if what else ""))
        return "waiting forever on " + "; ".join(parts) if parts else "work left waiting and no event to run"

    def log(self, kind: str, replica: int = -1, shard: int = -1, step: int = -1, **info) -> None:
        """One entry of the update log that co-simulation replays in this exact order."""
        self.trace.updates.append(Update(self.env.now, kind, replica, shard, step, info))

    def wait(self, event: simpy.Event, where: str, replica: int, step: int, name: str) -> simpy.Event:
        """Records the time from now until ``event`` as a wait span; returns the event."""
        start = self.env.now
        if event.processed:
            return event
        event.callbacks.append(lambda _e: self.trace.add(
            Span(name, "wait", where, replica, step, start, self.env.now, phase="wait")) if self.env.now > start else None)
        return event

    # --- primitives that record spans ----------------------------------------------------
    def compute_op(self, device: str, flops: float, nbytes: float, replica: int, step: int,
                   name: str, phase: str, kind: str = "compute", key: str = "", work=None) -> simpy.Event:
        """``key`` names the op in the device's measured op times (a layer kind, with
        ``.backward`` for backward ops; ``update``; ...), where calibration measured it.  The
        span starts when the device starts the op (a GPU may run others first).  On a failed
        device the op never ends (one already running when it fails does, as a message in
        flight arrives)."""
        asked = self.env.now
        if not self.alive(device):              # a failed device starts nothing: the op never ends
            return self._block(device, f"{name} on {device}", message=False)
        ev = self.compute.run(device, flops, nbytes, backward=phase == "bwd", key=key, work=work)
        ev.callbacks.append(lambda e: self.trace.add(
            Span(name, kind, device, replica, step, asked if e.value is None else e.value, self.env.now,
                 nbytes, flops, phase)))
        return ev

    def _nccl_piece(self, op) -> bool:
        """Whether NCCL runs a Plan transfer where both ends are GPUs, at its link speeds: a
        piece of an allreduce (a reduce-scatter or all-gather send, decision 019), or under
        the tensor split any transfer inside a stage's tensor group -- sequence parallelism's
        gathers by positions and reduce-scatters of input gradients, the loss's reductions
        over the vocabulary -- which Megatron-LM runs as NCCL collectives too."""
        if op.kind != "xfer":
            return False
        if op.why.endswith(("reduce-scatter", "all-gather")):
            return True
        tensor = self._tensor_group
        return tensor > 0 and op.slot // tensor == op.dst // tensor

    def transfer(self, src: str, dst: str, nbytes: float, replica: int, step: int,
                 name: str, phase: str, what: str = "", speed=None) -> simpy.Event:
        """A message; it never arrives when an end has failed or no route is left.  A sender
        with measured costs for ``send<what>`` (``what``: "" or ".reduction") spends that long
        on it before it leaves, a receiver with costs for ``recv<what>`` after.  ``speed``: the
        share of each link it reaches (``Network.send``; NCCL's, for a collective's piece)."""
        start = self.env.now
        if self.failed:
            for end in (src, dst):
                if end in self.failed:
                    return self._block(end, f"{name} {src}->{dst}")
        try:
            links = self.link_names(src, dst)
        except LookupError:
            return self._no_route(src, dst, replica, name)
        sending = receiving = None
        messaging = self._messaging
        if src in messaging or dst in messaging:
            devices = self.compute.topology.devices
            sending = devices[src].op_time("send" + what, 0.0, nbytes) if src in messaging else None
            receiving = devices[dst].op_time("recv" + what, 0.0, nbytes) if dst in messaging else None
        ev = self._host_message(src, dst, nbytes, sending, receiving, replica, name) if sending or receiving else \
            self.network.send([(src, dst)], nbytes, speed=speed)
        ev.callbacks.append(lambda _e: self.trace.add(
            Span(name, "transfer", f"{src}->{dst}", replica, step, start, self.env.now, nbytes, 0.0, phase, links)))
        return ev

    def _host_message(self, src: str, dst: str, nbytes: float, sending: float | None,
                      receiving: float | None, replica: int = -1, name: str = "") -> simpy.Event:
        """A message between host ranks: the sender's software cost (measured by calibrate),
        the wire, then the receiver's.  A receiver already waiting on cores of its own takes
        the message in as it comes (wire alongside the sender's cost, nothing after); a busy
        or core-sharing one copies it out itself afterwards.  Whether it waits is decided once
        everything else due at this instant has started; a link cut by then leaves it no
        route (``_no_route``).  Callbacks, not a process (a process costs each message two
        more events).
        See docs/decisions/002-host-message-receiver-cost.md."""
        env, compute, network = self.env, self.compute, self.network
        done = env.event()
        sent = compute.run_seconds(src, sending) if sending else None

        def then(event: simpy.Event, step) -> None:
            """``step`` once ``event`` has fired (at once where it has been processed)."""
            if event.callbacks is None:
                step(event)
            else:
                event.callbacks.append(step)

        def wire() -> simpy.Event:
            try:
                return network.send([(src, dst)], nbytes)
            except LookupError:                     # cut after ``transfer`` found the route
                return self._no_route(src, dst, replica, name)

        def arrived(_e) -> None:
            if receiving:
                then(compute.run_seconds(dst, receiving), lambda _r: fire_now(done, None))
            else:
                fire_now(done, None)

        def decide(_e) -> None:
            if compute.waiting(dst):
                moving = wire()
                # an all_of even alone: its queue trip keeps the instant's order of ends (digests)
                then(env.all_of([moving, sent]) if sent else env.all_of([moving]), lambda _a: fire_now(done, None))
            elif sent:
                then(sent, lambda _s: then(wire(), arrived))
            else:
                then(wire(), arrived)
        env.timeout(0).callbacks.append(decide)
        return done

    def collective(self, op: str, algo: str, devices: list[str], nbytes: float, replica: int,
                   step: int, name: str) -> simpy.Event:
        key = ("layout", self.network.topology, op, algo, tuple(devices), nbytes)
        coll = self._collectives.get(key)
        if coll is None:                       # steps repeat their collectives: laid out once (shortcut)
            if algo == "hierarchical" and not self.network.topology.even_machines(devices):
                algo = "ring"                  # failures left machines uneven (plan refuses it up front)
            try:
                coll = collectives.layout(self.network.topology, op, algo, devices, nbytes, cache=self._collectives)
            except NoRoute as exc:             # the tuner's trial run found a route cut
                return self._block(f"{exc} (a link cut)", name)
            if self.shortcut:
                self._collectives[key] = coll
        topology, names, failed = self.network.topology, self.link_names, self.failed
        known = self._names_on(topology) if self.shortcut else {}      # pairs routed on it before
        if self.shortcut and not failed:
            new = list(dict.fromkeys(pair for ph in coll.phases for pair in ph.pairs if pair not in known))
            if new:
                try:
                    self._name_routes(new)
                except LookupError:
                    pass                       # the pair with no route is found one by one below
        for ph in coll.phases:                 # a member gone or cut off: it never completes
            for pair in ph.pairs:
                if failed:
                    for end in pair:
                        if end in failed:
                            return self._block(end, f"{name} over {len(devices)} devices")
                if pair not in known:
                    try:
                        names(*pair)
                    except LookupError:
                        return self._block(f"the route {pair[0]}->{pair[1]} (a link cut)", name)

        measured = self._host_collective(op, devices, nbytes, replica, step, name)
        if measured is not None:
            return measured

        add = self.trace.add

        def record(pair, nb, start, end):        # ``known``: the names ``link_names`` keeps while no link is cut
            links = known.get(pair) if self.network.topology is topology else None
            add(Span(name, "transfer", f"{pair[0]}->{pair[1]}", replica, step, start, end, nb, 0.0,
                     op, links or names(*pair, topology)))
        running = self.env.process(collectives.run(self.env, self.network, coll, record))
        if coll.proto:                         # NCCL's kernel takes SMs from the compute beside it
            release = self.compute.hold(devices, coll.sms)
            running.callbacks.append(lambda _e: release())
        return running

    def _host_collective(self, op: str, devices: list[str], nbytes: float, replica: int, step: int,
                         name: str) -> simpy.Event | None:
        """A collective among host ranks whose cost calibrate measured (key ``op``, by the
        bytes each rank contributes): on one host it is the ranks' own copying and summing,
        so each member spends that long on its core (sharing the host's cores like compute);
        None when any member has no such measurement."""
        topo = self.compute.topology.devices
        if not all(d in self.compute.weights and topo[d].measured(op) for d in devices):
            return None
        return self.env.all_of([self.compute_op(d, 0.0, nbytes, replica, step, name, op, kind="transfer", key=op)
                                for d in devices])

    # --- one replica's step graph ----------------------------------------------------------
    def run_graph(self, replica: int, step: int, plan: Plan | None = None) -> GraphRun:
        """Runs one replica's step graph (of ``plan``, default the engine's: sandblaster runs
        work units from a plan of the unit's batch).  A slot on a GPU gets its compute ops one
        at a time in the Plan's order (the pipeline schedule), each once the one before has
        finished, as a stream of kernels runs; a shared device gets each as it is ready.  Ops
        on failed devices never start.  A slot that runs on its own goes to its GPU as one
        chain, the engine woken only where it must be (``_chains``, decision 043)."""
        plan, succ, following, bwd_per_slot, keys, bwd_per_layer, works, chained, names, alone, pieces, chains = \
            self._graph_info(plan or self.plan)
        env, compute, failed, add, shortcut = self.env, self.compute, self.failed, self.trace.add, self.shortcut
        ops, devices = plan.ops, self.plan.devices[replica]
        gpus = [self.network.topology.devices[d].kind == "gpu" for d in devices]     # NCCL's pieces run GPU to GPU
        in_order = [compute.in_order(d) for d in devices]
        # shortcut: each op's seconds alone from the plan's table for the slot's alike device,
        # times the slot's straggler factor (what ``Compute.run`` works out per op)
        tables = [alone.setdefault(compute.alike.get(d, d), [None] * len(ops)) for d in devices]
        factors = [compute.factor(d) for d in devices]
        successors = [chained if ordered else succ for ordered in in_order]     # per slot
        waiting = [len(op.deps) for op in ops]
        for op in ops:
            if following[op.id] >= 0 and in_order[op.slot]:
                waiting[following[op.id]] += 1
        left = [len(ops)]
        slot_left = list(bwd_per_slot)
        layer_left = dict(bwd_per_layer)
        # a slot whose ops form a chain of their own goes to its lane at once (``_chains``);
        # its layers' events are made when first asked for (``Ready``); not one whose step
        # starts after a measured step cost (``_step_starts``): its ops go one by one then
        chains = [c if c and in_order[j] and shortcut and not self.failures and compute.can_give(devices[j])
                  and devices[j] not in self.step_costed else None for j, c in enumerate(chains)]
        asked: dict = {}                     # chained slot -> what makes a layer's event
        run = GraphRun(env.event(), [env.event() for _ in range(plan.slots)],
                       Ready({key: env.event() for key in bwd_per_layer if chains[key[0]] is None},
                             bwd_per_layer, asked))

        def launch(op) -> None:
            if run.cancelled or failed and devices[op.slot] in failed:
                return                                   # a failed device computes and sends nothing
            if op.kind != "xfer" and shortcut:
                start_op(op)
                return
            if op.kind == "xfer":
                src, dst = devices[op.slot], devices[op.dst]
                ev = self.transfer(src, dst, op.bytes, replica, step, names[op.id], op.why,
                                   what=".reduction" if op.why == "reduction" else "",
                                   speed=self._nccl_speed if pieces[op.id] and gpus[op.slot] and gpus[op.dst] else None)
            else:
                ev = self.compute_op(devices[op.slot], op.flops, op.bytes, replica, step,
                                     names[op.id], op.kind, key=keys[op.id], work=works[op.id])
            ev.callbacks.append(lambda _e: finish(op))

        def start_op(op) -> None:
            """``compute_op``'s work, from the tables: the op on its device, and one callback
            (no event where a lane ends it alone) that records its span, then runs ``finish``
            (the two callbacks of the plain path)."""
            i, slot, device = op.id, op.slot, devices[op.slot]
            seconds = tables[slot][i]
            if seconds is None:
                seconds = tables[slot][i] = compute.alone(device, op.flops, op.bytes, op.kind == "bwd", keys[i],
                                                          works[i])
            key = keys[i]
            asked = env.now

            def ended(started) -> None:
                add(Span(names[i], "compute", device, replica, step, asked if started is None else started, env.now,
                         op.bytes, op.flops, op.kind))
                finish(op)
            compute.start(device, seconds * (compute.factor(device, key) if key in MEASURED_SHARED else factors[slot]),
                          ended)

        def finish(op) -> None:
            for s in successors[op.slot][op.id]:
                waiting[s] -= 1
                if waiting[s] == 0:
                    launch(ops[s])
            if op.kind == "bwd":
                slot_left[op.slot] -= 1
                layer_left[(op.slot, op.layer)] -= 1
                if layer_left[(op.slot, op.layer)] == 0:
                    run.layer_ready[(op.slot, op.layer)].succeed()
                if slot_left[op.slot] == 0:
                    run.slot_ready[op.slot].succeed()
            left[0] -= 1
            if left[0] == 0:
                run.done.succeed()

        def give_chain(slot: int) -> None:
            """The slot's ops to its lane at once, each ending quietly (``Quiet``) but where
            the engine must hear of it now: the chain's last op (also its last backward
            op), a layer's last backward op once its event is asked for (``asked``)."""
            device, table, factor = devices[slot], tables[slot], factors[slot]
            ids, quiet, shared, heard = chains[slot]
            log, wake = [], [None] * len(ops)

            def settle(_started=None) -> None:
                """Spans and counts of the chain's ops ended so far (the log), in order."""
                made = run.layer_ready
                for i, start, end in log:
                    op = ops[i]
                    add(Span(names[i], "compute", device, replica, step, start, end, op.bytes, op.flops, op.kind))
                    if op.kind == "bwd":
                        slot_left[slot] -= 1
                        layer = (slot, op.layer)
                        layer_left[layer] -= 1
                        if layer_left[layer] == 0 and dict.get(made, layer) is not None:
                            made[layer].succeed()
                        if slot_left[slot] == 0:
                            run.slot_ready[slot].succeed()
                    left[0] -= 1
                    if left[0] == 0:
                        run.done.succeed()
                log.clear()

            def ask(layer) -> simpy.Event:
                compute.catch_up(device)
                settle()
                event = env.event()
                if layer_left[layer] == 0:          # ended already: as an event fired and taken
                    event._ok, event._value, event.callbacks = True, None, None
                else:
                    wake[heard[layer[1]]] = settle
                    compute.woken(device)
                return event
            asked[slot] = ask
            run.layer_ready.last_bwd[slot] = heard
            wake[ids[-1]] = settle              # its last op, also its last backward op
            for i in ids if None in table else ():
                if table[i] is None:
                    table[i] = compute.alone(device, ops[i].flops, ops[i].bytes, ops[i].kind == "bwd", keys[i], works[i])
            if shared:
                seconds = [table[i] * (compute.factor(device, keys[i]) if keys[i] in MEASURED_SHARED else factor)
                           for i in ids]
            else:
                seconds = [table[i] * factor for i in ids]
            compute.give(device, list(zip(seconds, quiet)), log, wake)

        for j, n in enumerate(slot_left):
            if n == 0:
                run.slot_ready[j].succeed()
        if not ops:
            run.done.succeed()
        started = self._step_starts(plan, devices, replica, step)
        for op in ops:
            if waiting[op.id] == 0:
                if chains[op.slot] is not None and op.slot not in started:
                    give_chain(op.slot)
                elif op.slot in started:
                    started[op.slot].callbacks.append(lambda _e, op=op: launch(op))
                else:
                    launch(op)
        return run

    def _step_starts(self, plan: Plan, devices: list[str], replica: int, step: int) -> dict[int, simpy.Event]:
        """Slot -> the event its step may start at: after what a step costs a host rank besides
        its ops (measured by calibrate as ``step``: sampling the batch, set-up), where measured."""
        if not self.step_costed:
            return {}
        sc = plan.scenario
        nbytes = float(sc.batch_size * np.prod(sc.model.input_shape) * PARAM_BYTES)
        key = split_key(plan, "step")
        return {j: self.compute_op(dev, 0.0, nbytes, replica, step, "step", "step", key=key)
                for j, dev in enumerate(devices) if dev in self.step_costed}


class Ready(dict):
    """A step's layer events, (slot, layer) -> event: made up front for slots run op by op,
    when first asked for on a slot given as a chain (``asked[slot](key)``), so that the
    chain's lane wakes the engine only at the layers someone waits on."""

    def __init__(self, made: dict, keys, asked: dict) -> None:
        super().__init__(made)
        self.keys_, self.asked = keys, asked
        self.last_bwd: dict[int, dict[int, int]] = {}    # chained slot -> layer -> its last backward op (``_heard``)

    def __contains__(self, key) -> bool:
        return key in self.keys_

    def waited(self, keys: list[tuple[int, int]]) -> list[simpy.Event]:
        """The events to wait on for every one of ``keys`` to have fired: of a chained
        slot's layers only the one whose last backward op comes last in the chain (op ids
        are Plan places, so the largest; the lane ends the others before it), so that the
        lane wakes the engine once, not per layer."""
        last: dict[int, tuple[int, int]] = {}
        out = []
        for key in keys:
            ends = self.last_bwd.get(key[0])
            if ends is None:
                out.append(self[key])
            elif key[0] not in last or ends[key[1]] > ends[last[key[0]][1]]:
                last[key[0]] = key
        return out + [self[key] for key in last.values()]

    def __missing__(self, key):
        if key not in self.keys_:
            raise KeyError(key)
        event = self[key] = self.asked[key[0]](key)
        return event


def _chains(plan: Plan, engine_plan: Plan) -> list[list[int] | None]:
    """Per slot, its ops in the Plan's order where they form a chain of their own, else
    None: compute ops only, each depending only on earlier ops of the slot, none depended
    on from another slot, the slot's last backward op its last op, and its device given to
    no other (replica, slot) of the engine's plan and no parameter-server shard -- so
    each op starts as the one before ends (decision 043).  An op that comes to the
    device while a chain runs there (an 8-bit push's quantising, a late replica's next
    step) has the chain given op by op again (``Compute._dissolve``)."""
    by_slot: dict[int, list[int]] = {j: [] for j in range(plan.slots)}
    place = {op.id: k for k, op in enumerate(plan.ops)}
    ok = [True] * plan.slots
    for op in plan.ops:
        by_slot[op.slot].append(op.id)
        if op.kind == "xfer":
            ok[op.slot] = False
            if op.dst is not None and 0 <= op.dst < plan.slots:
                ok[op.dst] = False
        for d in op.deps:
            dep = plan.ops[d]
            if dep.slot != op.slot or dep.kind == "xfer" or place[d] > place[op.id]:
                ok[op.slot] = ok[dep.slot] = False
    uses: dict[str, int] = {}
    for row in engine_plan.devices:
        for d in row:
            uses[d] = uses.get(d, 0) + 1
    shards = set(engine_plan.ps.devices) if engine_plan.ps is not None else set()
    chains: list[list[int] | None] = []
    for j in range(plan.slots):
        ids = by_slot[j]
        bwd = [i for i in ids if plan.ops[i].kind == "bwd"]
        devices = {row[j] for row in engine_plan.devices}
        alone = all(uses[d] == 1 and d not in shards for d in devices)
        chains.append(ids if ok[j] and ids and alone and (not bwd or bwd[-1] == ids[-1]) else None)
    return chains


def _heard(plan: Plan, ids: list[int]) -> dict:
    """Per layer, the chain op whose end the engine must hear of once that layer's event is
    asked for: the layer's last backward op."""
    heard: dict = {}
    for i in ids:
        if plan.ops[i].kind == "bwd":
            heard[plan.ops[i].layer] = i
    return heard


def _link_names(route) -> tuple[str, ...]:
    return tuple(map(_link_name, route))


def _link_name(link: tuple[str, str]) -> str:
    """A directed link's name as spans record it."""
    return f"{link[0]}>{link[1]}"


def _name_of(named: list, links: list, i: int) -> str:
    """Link ``i``'s name (``_link_name``), kept in ``named``."""
    name = named[i] = _link_name(links[i])
    return name


@dataclass
class SimResult:
    trace: Trace
    sim_time_s: float
    sim_events: int
    wall_s: float
    steps: int
    solves: int = 0
    engine: "Engine | None" = None
    stalled_at_s: float | None = None      # the run ended with work still waiting (a failure it cannot pass)
    stalled_reason: str = ""


def simulate(plan: Plan, steps: int | None = None, rng: np.random.Generator | None = None,
             shortcut: bool = True) -> SimResult:
    """Runs ``steps`` training steps (default: the scenario's) with the scenario's algorithm
    (``shortcut=False``: the engine's slow path, for tests)."""
    from sim.algorithms import ALGORITHMS
    sc = plan.scenario
    steps = steps or sc.training.steps
    engine = Engine(plan, rng=rng, shortcut=shortcut)
    t0 = time.perf_counter()
    main = engine.env.process(ALGORITHMS[sc.training.algorithm](engine, steps))
    ended: list[float] = []

    def over(_e) -> None:
        engine.stop_failures()
        ended.append(engine.env.now)
    main.callbacks.append(over)
    collecting = gc.isenabled()
    gc.disable()            # the run frees few cyclic objects; the collector's passes cost ~1/3 of it
    try:
        engine.env.run()
    finally:
        if collecting:
            gc.enable()
    wall = time.perf_counter() - t0
    solves = getattr(engine.network, "fluid", None)
    stalled = not main.triggered                 # no event left, and the algorithm still waits
    end = ended[0] if ended else engine.env.now
    if end < engine.env.now:     # the job is over when its algorithm is: work still going then (a late
        engine.trace.spans[:] = [s for s in engine.trace.spans if s.end_s <= end]   # backup's graph) is not its
    reason = engine.stall_reason() if stalled else ""
    if not stalled and not engine.trace.step_ends and not engine.trace.replica_steps:
        stalled, reason = True, _no_step(engine)     # it ended (a time limit) before any step: no rate to give
    return SimResult(engine.trace, end, engine.env.events_processed + engine.compute.ahead, wall, steps,
                     (solves.solves if solves else 0) + engine.compute.fluid.solves, engine,
                     end if stalled else None, reason)


def _no_step(engine: Engine) -> str:
    """Why a run that ended finished no step: its time limit, and the failures before it."""
    limit = engine.plan.scenario.training.time_limit_s
    first = sorted(engine.failed_ever.items(), key=lambda kv: kv[1])
    failed = ", ".join(f"{d} failed at {t:.6g} s" for d, t in first[:3]) + (
        f" and {len(first) - 3} more" if len(first) > 3 else "")
    return ("no step finished" + (f" within training.time_limit_s = {limit:g} s" if limit else "")
            + (f" ({failed})" if failed else ""))
