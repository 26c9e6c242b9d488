"""Collectives laid out on a topology and run on any network backend.

``layout`` turns (op, algo, devices, bytes) into a ``Collective``: NCCL's channels over the
NICs of each machine (``clustersim.core.collective``), and, where every member is a GPU,
NCCL's protocol and cost model (``clustersim.core.nccl``): ``auto`` picks ring, tree or
NVLink SHARP (where NCCL 2.20 would: allreduce, compute capability 9.0+, an NVSwitch, more
than 2 GPUs a machine) and LL / LL128 / Simple by NCCL's predicted time, using the
bandwidth the flow model gives each algorithm on these links; the run then pays NCCL's
latency for the algorithm and protocol, and every link carries at NCCL's speed for its kind
(NVLink, PCIe, network) times the share NCCL's model charges (the protocol's factor; for
trees its correction at medium sizes; LL across machines capped by llMaxBws, the tree and
LL128 by NCCL's per-channel caps on one search channel a rail: ``nccl.run_share``, decisions
030 and 033).  Host (CPU) collectives run the ring by default and pay
the routes' own latencies.

``run`` runs the phases: those of one wave at once, waves one after another.  A coupled
phase (one ring or tree of one channel) moves in lockstep at the pace of its slowest hop.

Closed forms on a uniform ring of n ranks with per-hop latency a and bandwidth B
(message size S): ring allreduce 2(n-1)a + 2(n-1)/n S/B; ring reduce-scatter and
allgather (n-1)a + (n-1)/n S/B; pipelined ring broadcast (n-1)a + S/B.  Trees are
pipelined as NCCL's are: chunks stream up and back down at once, so an allreduce costs
the latency of the deepest path up and down plus the time its busiest link needs.
NVLS on g GPUs of one NVSwitch with links of speed B (NCCL's) runs in NCCL's 23 us plus
S (g+1)/g / (B x 5/6) times its chunk pipeline's fill (n + 2) / n (``nccl.nvls_pipeline``:
n chunk steps a channel, three stages; decision 028); NVLS_TREE adds each rail's double
binary tree at the same time, with the same three-stage fill over its own chunks (decision
050).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from operator import itemgetter

import numpy as np
import simpy

from clustersim.core import nccl
from clustersim.core.collective import Phase, bus_factor, phases  # noqa: F401  (the simulator's collective API)
from clustersim.core.topology import DirLink, NoRoute, Topology, rail
from sim.network import FlowNetwork, Network, Pair

Record = Callable[[Pair, float, float, float], None]   # (pair, bytes, start_s, end_s)


@dataclass(frozen=True)
class Collective:
    op: str
    algo: str                       # the algorithm run (never "auto")
    proto: str                      # NCCL protocol; "" for host collectives
    phases: tuple[Phase, ...]
    wave_latency: tuple[float, ...] = ()    # seconds per wave (NCCL's model); (): the routes' own
    share: float = 1.0              # the protocol's share of NCCL's link speeds (NVLS: over its pipeline fill)
    speed: Callable[[DirLink], float] | None = field(default=None, compare=False, repr=False)  # None: made by ``run``
    sms: float = 0.0                # the share of each member's SMs NCCL's kernel takes (``sm_share``)

    @property
    def label(self) -> str:
        return f"{self.algo}/{self.proto}" if self.proto else self.algo


def _by_machine(topology: Topology, devices: Sequence[str]) -> dict:
    """The members of each machine, machines in order of first appearance."""
    out: dict = {}
    for d in devices:
        out.setdefault(topology.machine_of(d), []).append(d)
    return out


def ports(topology: Topology, devices: Sequence[str]) -> list[list[tuple[str, str, str]]] | None:
    """Every machine's rails (in order of first appearance), each (NIC, the member nearest
    it, the one a ring leaves by: the next nearest); None on one machine or without NICs.
    A machine's rails are its members' own NICs (``Topology.nic_of``): NCCL gives a GPU's
    channels its local NICs (``ncclTopoGetLocalNet``), so a group of one GPU a machine
    (data parallelism beside tensor parallelism) stays on that GPU's rail.  Where the next
    nearest member would reach the NIC only through a CPU but reaches the nearest without
    one (NVLink), the ring leaves by the nearest again (``ring_channels``): PXN, NCCL's
    send through the member beside the NIC.  Raises NoRoute where a member reaches no NIC
    of its machine (a link cut)."""
    by_machine = _by_machine(topology, devices)
    if len(by_machine) < 2:
        return None
    out, kept = [], {}            # (machine shape, members' places) -> rails by place (None: routes left it)
    for machine, local in by_machine.items():
        nics = topology.nics_of(machine)
        if not nics:
            return None
        shape = topology.machine_shape(machine)
        if shape is None:
            out.append(_rails(topology, machine, local, nics)[0])
            continue
        ident, nodes, place = shape
        key = (ident, tuple(place[d] for d in local))
        if key not in kept:
            rails, inside = _rails(topology, machine, local, nics)
            kept[key] = [tuple(place[d] for d in r) for r in rails] if inside else None
            out.append(rails)
        elif kept[key] is None:
            out.append(_rails(topology, machine, local, nics)[0])
        else:
            out.append([tuple(nodes[i] for i in r) for r in kept[key]])
    return out


def _rails(topology: Topology, machine, local: list[str], nics: list[str]) -> tuple[list[tuple[str, str, str]], bool]:
    """One machine's rails for ``ports``, and whether every route it measured stayed inside
    the machine (so machines of one shape give the same rails by place)."""
    rails, own, inside = [], {d: rail(d) for d in local}, True
    members = set()
    for d in local:
        nic = topology.nic_of(d)
        if nic is None:
            raise NoRoute(f"{d} reaches no NIC of its machine")
        members.add(nic)

    def via_cpu(route) -> bool:
        return any(topology.devices[v].kind == "cpu" for _, v in route)
    for nic in sorted((n for n in nics if n in members), key=rail):
        at = rail(nic)
        routes = {d: topology.route(d, nic) for d in local}
        inside = inside and all(topology.devices[v].machine == machine for r in routes.values() for _, v in r)
        near = sorted(local, key=lambda d: (len(routes[d]), (own[d] - at) % 64))
        leave = near[min(1, len(near) - 1)]
        if leave != near[0] and via_cpu(routes[leave]) and not via_cpu(routes[near[0]]) \
                and not via_cpu(topology.route(leave, near[0])):
            leave = near[0]                            # PXN: through the member beside the NIC
        rails.append((nic, near[0], leave))
    return rails, inside


def switches(topology: Topology, devices: Sequence[str]) -> list[str] | None:
    """Every machine's NVSwitch (in order of first appearance) when each member of the
    machine has a link to it, cut links left out; None where a machine has none."""
    by_machine = _by_machine(topology, devices)
    out = []
    for local in by_machine.values():
        found = [s for s in topology.neighbors(local[0]) if topology.devices[s].kind == "nvswitch"
                 and all(s in topology.neighbors(d) for d in local)]
        if not found:
            return None
        out.append(found[0])
    return out


def nvls_algo(topology: Topology, op: str, devices: Sequence[str]) -> str:
    """``nvls`` (one machine) or ``nvls_tree`` (several) where NCCL 2.20 offers NVLink SHARP
    for this group, else "": allreduce (tuning.cc), GPUs of compute capability 9.0+ on an
    NVSwitch (ncclTopoCompute), more than 2 of them a machine (ncclNvlsInit)."""
    if op != "allreduce" or not all(topology.devices[d].kind == "gpu" for d in devices):
        return ""
    if min(topology.devices[d].compute_capability for d in devices) < nccl.NVLS_MIN_CC:
        return ""
    by_machine = _by_machine(topology, devices)
    if min(map(len, by_machine.values())) < nccl.NVLS_MIN_GPUS or switches(topology, devices) is None:
        return ""
    return "nvls" if len(by_machine) == 1 else "nvls_tree"


def schedule(topology: Topology, op: str, algo: str, devices: Sequence[str], nbytes: float) -> list[Phase]:
    """``phases`` laid out on the topology's machines, NICs and NVSwitches (no protocol:
    the routes' own latencies and full link speeds when run; ``layout`` for NCCL's model)."""
    nvs = switches(topology, devices) if algo in nccl.NVLS else None
    return phases(op, algo, devices, nbytes, [topology.machine_of(d) for d in devices], ports(topology, devices), nvs)


def table(topology: Topology, op: str, algo: str, sizes: Sequence[int], devices: Sequence[str],
          network: str = "flow", proto: str = "", version: str = nccl.VERSION) -> list[dict]:
    """nccl-tests-style rows (bytes, time_s, algbw_gbps, busbw_gbps, algo, protocol), each
    size run alone on the topology as NCCL ``version`` runs it.  Raises ValueError for an
    algorithm the op lacks or a version not of the form 2.20.3."""
    from sim.network import BACKENDS
    rows, cache = [], {}
    for size in sizes:
        env = simpy.Environment()
        coll = layout(topology, op, algo, devices, size, proto, cache, version)
        env.process(run(env, BACKENDS[network](env, topology), coll))
        env.run()
        algbw = size / env.now / 1e9 if env.now else 0.0
        rows.append({"bytes": size, "time_s": env.now, "algbw_gbps": algbw,
                     "busbw_gbps": algbw * bus_factor(op, len(devices)), "algo": coll.algo, "protocol": coll.proto})
    return rows


def sm_share(topology: Topology, devices: Sequence[str], algo: str, cache: dict | None = None) -> float:
    """The share of each member GPU's SMs an NCCL collective over ``devices`` by ``algo``
    (the one run, ``Collective.algo``) takes: two channels a rail across machines.
    ``cache``: ``layout``'s, whose ports it reuses."""
    sms = min(topology.devices[d].sms for d in devices)
    machines = len({topology.machine_of(d) for d in devices})
    rails = _cached(cache, ("ports", topology, tuple(devices)), lambda: ports(topology, devices)) \
        if machines > 1 else None
    return nccl.sm_share(machines, min(map(len, rails)) if rails else 0, sms, algo)


class LayoutCache(dict):
    """What ``layout`` keeps between calls (per topology and group: ports, the tuner's
    per-byte times, NCCL's link speeds per share), and the engine its layouts (key
    ``("layout", topology, op, algo, group, bytes)``, shortcut only).  ``shortcut=False`` keeps only what it
    always kept (the tuner's times, ports) and makes every collective's link speeds anew:
    the slow path that tests compare the shortcuts with; a plain dict counts as True."""

    def __init__(self, shortcut: bool = True) -> None:
        super().__init__()
        self.shortcut = shortcut


class _Speeds(dict):
    """Link -> NCCL's speed for its kind and GPU generation times ``share``, each worked
    out on its first look-up (``__missing__``), so that hits stay in C; ``full``: those
    speeds at share 1 (x 1.0 is exact), to take instead of working them out again."""

    def __init__(self, topology: Topology, share: float, full: "_Speeds | None" = None) -> None:
        super().__init__()
        self.topology, self.share, self.full = topology, share, full
        self.by_ends: dict[tuple, float] = {}    # (kinds, compute capabilities of the two ends) -> speed
        self.by_id: np.ndarray | None = None     # the speeds by link id (``Topology.link_id``); nan: not yet
        self.ends: dict[str, int] | None = None  # device -> a number per (kind, compute capability), when asked
        self.n_ends = 0

    def at(self, ids: np.ndarray) -> np.ndarray:
        """The speeds of the links ``ids`` (``sim.network`` weights a phase's thousands of
        links at once), each worked out once per table: by its link (``__missing__``), or, for
        a share's table, as the share-1 table's times ``share`` (the same product)."""
        if self.by_id is None:
            self.by_id = np.full(len(self.topology.links), np.nan)
        out = self.by_id[ids]
        missing = np.isnan(out)
        if missing.any():
            new = ids[missing]
            if self.full is not None:
                values = self.full.at(new) * self.share
            else:
                values = self._by_ends_at(new)
            self.by_id[new] = out[missing] = values
        return out

    def _by_ends_at(self, ids: np.ndarray) -> np.ndarray:
        """The speeds of the links ``ids``, by what they depend on: each device's (kind,
        compute capability) numbered once per table, one link of each distinct pair of
        numbers asked by link (``__missing__``), the rest taken in C loops (a phase over
        10,000 GPUs brings ~100,000 links)."""
        if self.ends is None:
            kinds: dict[tuple, int] = {}
            self.ends = {name: kinds.setdefault((d.kind, d.compute_capability), len(kinds))
                         for name, d in self.topology.devices.items()}
            self.n_ends = len(kinds)
        links = list(map(self.topology.links.__getitem__, ids.tolist()))
        number = self.ends.__getitem__
        pair = (np.fromiter(map(number, map(itemgetter(0), links)), dtype=np.int64, count=len(links)) * self.n_ends
                + np.fromiter(map(number, map(itemgetter(1), links)), dtype=np.int64, count=len(links)))
        _, first, inverse = np.unique(pair, return_index=True, return_inverse=True)
        return np.array([self[links[i]] for i in first.tolist()])[inverse.ravel()]

    def __missing__(self, link: DirLink) -> float:
        if self.full is not None:
            value = self[link] = self.full[link] * self.share
            return value
        u, v = self.topology.devices[link[0]], self.topology.devices[link[1]]
        ends = (u.kind, v.kind, u.compute_capability, v.compute_capability)    # all the speed depends on
        value = self.by_ends.get(ends)
        if value is None:
            cc = max(u.compute_capability, v.compute_capability)
            value = self.by_ends[ends] = nccl.link_efficiency(link_kind(self.topology, link), cc) * self.share
        self[link] = value
        return value


def nccl_link_speed(topology: Topology, share: float = 1.0, cache: dict | None = None) -> Callable[[DirLink], float]:
    """NCCL's share of each link (its speed for the link's kind and GPU generation, times
    ``share``: a protocol's), worked out once per link: ``Network.send``'s ``speed``.
    ``cache`` (``layout``'s) keeps one table per topology and share, each share's built
    on the share-1 table's speeds."""
    if cache is None:
        return _Speeds(topology, share).__getitem__
    full = _cached(cache, ("speeds", topology, 1.0), lambda: _Speeds(topology, 1.0))
    return _cached(cache, ("speeds", topology, share), lambda: _Speeds(topology, share, full)).__getitem__


def link_kind(topology: Topology, link: DirLink) -> str:
    """nvlink | pci | net: which of NCCL's link speeds a directed link runs at."""
    kinds = {topology.devices[end].kind for end in link}
    if "switch" in kinds or "nic" in kinds:          # a NIC's own port runs at the NIC's speed
        return "net"
    if "nvswitch" in kinds or kinds == {"gpu"}:
        return "nvlink"
    return "pci"


def _intra_kind(topology: Topology, devices: Sequence[str]) -> str:
    """NVLink when the members of a machine reach each other over NVLink only, else PCI."""
    by_machine = _by_machine(topology, devices)
    for local in by_machine.values():
        for a, b in zip(local, local[1:]):
            if any(link_kind(topology, ln) != "nvlink" for ln in topology.route(a, b)):
                return "pci"
    return "nvlink"


def layout(topology: Topology, op: str, algo: str, devices: Sequence[str], nbytes: float,
           proto: str = "", cache: dict | None = None, version: str = nccl.VERSION) -> Collective:
    """The collective to run.  ``proto`` forces NCCL's protocol (GPU groups); ``cache`` keeps
    the per-byte transfer times ``auto`` measures (per topology and group); ``version``: the
    NCCL whose NVLS kernel lays out the chunks (the tuner is 2.20.3's whatever it says)."""
    nccl.version_tuple(version)
    nodes = [topology.machine_of(d) for d in devices]
    group = (topology, tuple(devices))      # the topology itself (hashed by identity): kept alive while cached
    rail_ports = _cached(cache, ("ports", *group), lambda: ports(topology, devices))
    gpus = all(topology.devices[d].kind == "gpu" for d in devices)
    n, machines = len(devices), len(set(nodes))
    if op == "alltoall":            # every pair's sends at once (NCCL's grouped send/recv): nothing to tune
        schedule = tuple(phases(op, algo, devices, nbytes, nodes))      # refuses an algorithm but auto
        if not gpus:
            return Collective(op, "p2p", "", schedule)
        share = nccl.protocol_factor("ring", "Simple", op, machines, n / machines)
        speed = nccl_link_speed(topology, share, cache) if _shortcut(cache) else None
        return Collective(op, "p2p", "Simple", schedule, (), share, speed, sm_share(topology, devices, "p2p", cache))
    if not gpus:
        chosen = "ring" if algo == "auto" else algo
        return Collective(op, chosen, "", tuple(phases(op, chosen, devices, nbytes, nodes)))
    intra = _cached(cache, ("intra", *group), lambda: _intra_kind(topology, devices))
    # NCCL's per-channel caps: the group's lowest compute capability, one search channel a rail;
    # its LL cap and network overhead: the hosts' CPU (AMD's rows where every machine's is AMD)
    graph = _cached(cache, ("graph", *group), lambda: {
        "compute_capability": min(topology.devices[d].compute_capability for d in devices),
        "search_channels": min(len(p) for p in rail_ports) if rail_ports else 0,
        "amd_hosts": _amd_hosts(topology, set(nodes))})
    nvls = _cached(cache, ("nvls", op, *group), lambda: nvls_algo(topology, op, devices))
    nvs = _cached(cache, ("switches", *group), lambda: switches(topology, devices)) if nvls else None
    if algo in nccl.NVLS and algo != nvls:
        raise ValueError("not offered here: NCCL 2.20 runs NVLink SHARP for allreduce on GPUs of compute capability "
                         "9.0+ behind an NVSwitch, more than 2 a machine (nvls on one machine, nvls_tree on several)")
    tuned: dict[str, float] = {}                  # the tuner's per-byte times, where it ran
    if algo not in ("auto", "ring", "tree", *nccl.NVLS):
        proto = proto or "Simple"                 # hierarchical, ps: not in NCCL's tuner
    elif algo == "auto" or not proto:
        # NCCL 2.20 tunes broadcast over the ring only; a forced protocol limits the choice to it
        candidates = [algo] if algo != "auto" else ["ring"] + (["tree"] if op == "allreduce" else [])
        if algo == "auto" and nvls:
            candidates.append(nvls)
        per_byte = {a: _us_per_byte(topology, op, a, devices, nodes, rail_ports, cache, nvs) for a in candidates}
        tuned = per_byte
        channels = graph["search_channels"] or 1
        algo, proto = nccl.choose(op, nbytes, per_byte, n, machines, intra, channels,
                                  (proto,) if proto else nccl.default_protocols(intra, graph["compute_capability"]),
                                  **graph)
    elif proto not in nccl.protocols(algo):
        raise ValueError(f"NCCL runs {algo} with {'/'.join(nccl.protocols(algo))} only, not {proto}")
    schedule = tuple(phases(op, algo, devices, nbytes, nodes, rail_ports, nvs))
    if algo in ("ring", "tree"):
        # the per-byte time only caps; the tuner's trial run gave it where the tuner ran
        capped = nccl.needs_per_byte(algo, proto, machines, graph["search_channels"])
        upb = tuned[algo] if algo in tuned else (
            _us_per_byte(topology, op, algo, devices, nodes, rail_ports, cache) if capped else 0.0)
        share = nccl.run_share(op, algo, proto, nbytes, upb, n, machines, **graph)
    else:
        share = nccl.protocol_factor(algo if algo in nccl.NVLS else "ring", proto, op, machines, n / machines)
    if algo in nccl.NVLS:
        heads = min(nodes.count(m) for m in set(nodes))   # NCCL keeps one head count a communicator
        share /= nccl.nvls_pipeline(nbytes, heads, version, machines=machines)
    speed = nccl_link_speed(topology, share, cache) if _shortcut(cache) else None
    floor = _cached(cache, ("net floor", *group), lambda: net_latency_us(topology, devices)) if machines > 1 else 0.0
    return Collective(op, algo, proto, schedule,
                      _wave_latency(op, algo, proto, schedule, n, machines, intra, nbytes, floor, graph["amd_hosts"]),
                      share, speed, sm_share(topology, devices, algo, cache))


def net_latency_us(topology: Topology, devices: Sequence[str]) -> float:
    """The longest one-way route latency, in microseconds, from the group's first device to
    the first of each other machine: what a step across machines takes at least."""
    first: dict[int, str] = {}
    for d in devices:
        first.setdefault(topology.machine_of(d), d)
    src = devices[0]
    return max((topology.route_latency(topology.route(src, d)) * 1e6 for m, d in first.items()
                if m != topology.machine_of(src)), default=0.0)


def _amd_hosts(topology: Topology, machines: set) -> bool:
    """Whether every one of ``machines`` has an AMD CPU (``Device.vendor``): NCCL's tuner
    then takes its AMD rows (llMaxBws, getNetOverhead); Intel's figures otherwise."""
    vendors = {d.machine: d.vendor for d in topology.devices.values() if d.kind == "cpu" and d.machine in machines}
    return bool(vendors) and set(machines) <= set(vendors) and all(v == "amd" for v in vendors.values())


def _wave_latency(op, algo, proto, schedule, n, machines, intra, nbytes, floor=0.0,
                  amd_hosts=False) -> tuple[float, ...]:
    """NCCL's latency per wave: the whole collective's for ring and tree; for hierarchical,
    a ring's inside the machines, across them, and inside again.  ``floor``: the cluster's
    latency between machines (``net_latency_us``), below which no crossing step goes;
    ``amd_hosts``: ``latency_us``'s."""
    if algo == "hierarchical":
        ppn = n // machines
        parts = []
        if ppn > 1:
            parts.append(nccl.latency_us("reducescatter", "ring", proto, ppn, 1, intra))
        if machines > 1:
            parts.append(nccl.latency_us("allreduce", "ring", proto, machines, machines, intra, nbytes / ppn,
                                         net_floor_us=floor, amd_hosts=amd_hosts))
        if ppn > 1:
            parts.append(nccl.latency_us("allgather", "ring", proto, ppn, 1, intra))
        return tuple(x * 1e-6 for x in parts)
    if algo == "ps":
        return ()
    lat = nccl.latency_us(op, algo, proto, n, machines, intra, nbytes, max(1, len(schedule)), floor, amd_hosts)
    return (lat * 1e-6,)


def _shortcut(cache: dict | None) -> bool:
    """Whether ``cache`` keeps NCCL's link speeds between collectives (``LayoutCache``)."""
    return cache is not None and getattr(cache, "shortcut", True)


def _cached(cache: dict | None, key: tuple, make: Callable):
    """``cache[key]``, made by ``make()`` the first time (every time without a cache)."""
    if cache is None:
        return make()
    if key not in cache:
        cache[key] = make()
    return cache[key]


def _us_per_byte(topology, op, algo, devices, nodes, rail_ports, cache, nvs=None) -> float:
    """Microseconds per byte of ``algo`` alone on the links at NCCL's speeds, no latency."""
    key = (topology, op, algo, tuple(devices))
    if cache is not None and key in cache:
        return cache[key]
    size = 2.0**20
    env = simpy.Environment()
    speed = nccl_link_speed(topology, 1.0, cache) if _shortcut(cache) else None
    coll = Collective(op, algo, "Simple", tuple(phases(op, algo, devices, size, nodes, rail_ports, nvs)),
                      (0.0,) * 3, 1.0, speed)
    env.process(run(env, FlowNetwork(env, topology, getattr(cache, "shortcut", True)), coll))
    env.run()
    value = env.now * 1e6 / size
    if cache is not None:
        cache[key] = value
    return value


def phase_latency(network: Network, ph: Phase) -> float:
    """The routes' own latency: what a chunk pays crossing the phase's hops in sequence."""
    route, lat = network.topology.route, network.topology.route_latency
    if ph.path:
        return sum(lat(route(a, b)) for a, b in ph.path)
    relays = sum(1 for a, _ in ph.pairs if network.topology.devices[a].kind == "nic")   # a ring's NIC hops
    if len(ph.pairs) <= relays:
        return 0.0
    return ph.messages * sum(lat(route(a, b)) for a, b in ph.pairs) / (len(ph.pairs) - relays)


def run(env: simpy.Environment, network: Network, coll: Collective | list[Phase], record: Record | None = None):
    """A simpy process body: runs the waves one after another, the phases of a wave at once."""
    if not isinstance(coll, Collective):
        coll = Collective("", "", "", tuple(coll))
    waves: list[list[Phase]] = []
    for ph in coll.phases:
        if not waves or waves[-1][0].wave != ph.wave:
            waves.append([])
        waves[-1].append(ph)
    speed = (coll.speed or nccl_link_speed(network.topology, coll.share)) if coll.proto else None
    for w, wave in enumerate(waves):
        lat = coll.wave_latency[w] if w < len(coll.wave_latency) else None
        yield env.all_of([_phase(env, network, ph, record, lat, speed) for ph in wave])


def _phase(env: simpy.Environment, network: Network, ph: Phase, record: Record | None, latency,
           speed) -> simpy.Event:
    """An event that fires when the phase's sends have arrived, each send recorded then (a
    coupled phase's pairs at once).  Callbacks, where a process would cost two more events."""
    start = env.now
    if ph.coupled:
        done = network.send(ph.pairs, ph.nbytes, latency=phase_latency(network, ph) if latency is None else latency,
                            speed=speed)
        if record:
            done.callbacks.append(lambda _e: [record(pair, ph.nbytes, start, env.now) for pair in ph.pairs])
        return done
    events = [network.send([p], ph.nbytes, ph.messages, latency=latency, speed=speed) for p in ph.pairs]
    ends = [0.0] * len(events)
    if record:
        for i, ev in enumerate(events):
            ev.callbacks.append(lambda _e, i=i: ends.__setitem__(i, env.now))
    done = env.all_of(events)
    if record:
        done.callbacks.append(lambda _e: [record(pair, ph.nbytes, start, end) for pair, end in zip(ph.pairs, ends)])
    return done
