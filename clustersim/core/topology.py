"""The cluster as a graph: devices (cpu, gpu, pcie_switch, nvswitch, nic, switch) and
full-duplex links, with routing.

Units: bandwidth in bytes/s and latency in seconds inside this module (files use
``bandwidth_gbps`` = 10^9 bytes/s and ``latency_us``).  Each link is two directed
resources ``(u, v)`` and ``(v, u)`` of the same capacity, so traffic in one direction never
slows the other.

Routing is widest-shortest-path: fewest hops, then the widest bottleneck, then among
equal next hops: a machine's NICs by the endpoint's rail (GPU i's own NIC), switches by
the destination's digits (D-mod-K, as InfiniBand's subnet manager routes a fat-tree: flows
to different destinations leave an edge or aggregation switch on different uplinks).
Two rules keep routes physical: a GPU is never a transit
node, and the inside of a machine (its CPU/root complex, PCIe switches, NVSwitch, NICs) is
transit only for traffic that starts or ends in that machine, so no route uses a host as
a router between network switches.
"""
from __future__ import annotations

import bisect
import math
from array import array
from collections import Counter, deque
from dataclasses import dataclass, field
from itertools import compress

import networkx as nx
import numpy as np

COMPUTE_KINDS = ("gpu", "cpu")
DEVICE_KINDS = ("cpu", "gpu", "pcie_switch", "nvswitch", "nic", "switch")
DTYPES = ("fp32", "fp16", "bf16", "fp64")

DirLink = tuple[str, str]
SPLIT = ".split"         # op cost keys of a model split over slots (``clustersim.core.plan.split_key``)
STAGE = ".stage"         # op cost keys of a pipeline stage of whole layers (the same)
MESSAGE_KEYS = ("send", "recv")                                       # op cost keys of a message's two ends
NOT_COMPUTE_KEYS = MESSAGE_KEYS + ("allreduce", "step", "update")       # op cost keys of no layer's compute


def curve_time(curve: tuple, nbytes: float) -> float:
    """Seconds at ``nbytes`` on a measured ((bytes, seconds), ...) curve: straight lines in
    log(bytes) between its points, the first point's time below them, and beyond the last in
    proportion to the bytes (large messages are bandwidth-bound)."""
    (b0, t0), (bn, tn) = curve[0], curve[-1]
    if nbytes <= b0:
        return t0
    if nbytes >= bn:
        return tn * nbytes / bn
    i = bisect.bisect_left(curve, (nbytes,))                 # the first point at or above nbytes
    (ba, ta), (bb, tb) = curve[i - 1], curve[i]
    return ta + (tb - ta) * math.log(nbytes / ba) / math.log(bb / ba)


@dataclass(frozen=True)
class Device:
    """One node of the graph.  Compute fields are zero for non-compute kinds."""

    name: str
    kind: str
    machine: int | None = None          # index of the machine it sits in; None for fabric switches
    peak_flops: dict[str, float] = field(default_factory=dict)   # FLOP/s per dtype, whole device
    memory_bytes: float = 0.0
    memory_bw: float = 0.0              # bytes/s
    efficiency: float = 1.0             # achieved / peak FLOP/s on dense work
    cores: int = 0                      # CPU cores (0 for a GPU)
    vendor: str = ""                    # a CPU's maker, "intel" or "amd" ("": not given): NCCL's tuner reads it
    op_overhead: float = 0.0            # seconds every op costs on top of the roofline (kernel launch)
    efficiency_curve: tuple = ()        # ((flops, efficiency), ...) measured by calibrate; overrides efficiency
    backward_efficiency_curve: tuple = ()   # the same for backward ops (their GEMMs have other shapes)
    # measured costs by op: key (a layer kind, "<kind>.backward", "update", "send", ...) ->
    # (seconds, flop/s, byte/s, byte/s beyond the cache): seconds + flops / flop rate + the
    # bytes up to ``cache_bytes`` at the first byte rate and the rest at the second (a rate
    # of 0 drops its term); fitted by calibrate, they override the roofline for those ops
    op_costs: dict[str, tuple] = field(default_factory=dict)
    cache_bytes: float = 0.0            # where an op's bytes stop fitting in a core's cache (0: no such knee)
    # measured times by size: key -> ((bytes, seconds), ...), bytes increasing; they override
    # ``op_costs`` for that key (an allreduce whose algorithm changes with the size has no one line)
    op_curves: dict[str, tuple] = field(default_factory=dict)
    core_pool: str = ""                 # name of the cores this device shares with others (ranks of one host)
    compute_capability: float = 0.0     # a GPU's CUDA compute capability (8.0 A100, 9.0 H100); 0: not given
    sms: int = 0                        # a GPU's streaming multiprocessors (NCCL's kernels take some); 0: not given
    memory_efficiency: float = 1.0      # achievable / datasheet memory bandwidth of a streaming kernel (STREAM-like)
    # a host rank's speed over time, measured by calibrate: how many times slower than the
    # quiet host it ran in each window of ``Topology.noise_window_s`` (windows line up across
    # the devices); replayed by ``faults.host_noise`` (docs/decisions/048)
    noise: tuple[float, ...] = ()

    def op_time(self, key: str, flops: float, nbytes: float) -> float | None:
        """Seconds of op ``key`` from its measured costs; None when it was not measured here.
        A ``.split`` or ``.stage`` key not measured as such takes the costs of its kind as a
        whole."""
        for context in (SPLIT, STAGE):
            if key.endswith(context) and not self.measured(key):
                key = key[:-len(context)]
        if key in self.op_curves:
            return curve_time(self.op_curves[key], nbytes)
        cost = self.op_costs.get(key)
        if cost is None:
            return None
        fixed, flop_rate, byte_rate, beyond_rate = cost
        inside = min(nbytes, self.cache_bytes) if self.cache_bytes > 0 else nbytes
        return (fixed + (flops / flop_rate if flop_rate > 0 else 0.0) + (inside / byte_rate if byte_rate > 0 else 0.0)
                + ((nbytes - inside) / beyond_rate if beyond_rate > 0 else 0.0))

    def measured(self, key: str) -> bool:
        return key in self.op_costs or key in self.op_curves

    def efficiency_at(self, flops: float, backward: bool = False) -> float:
        """Efficiency for an op of ``flops``: interpolated in log(flops) on the measured curve
        (the backward one for backward ops, when given), held flat beyond its ends; the
        single ``efficiency`` when there is no curve."""
        pts = (self.backward_efficiency_curve if backward and self.backward_efficiency_curve
               else self.efficiency_curve)
        if not pts:
            return self.efficiency
        x = math.log10(max(flops, 1.0))
        xs = [math.log10(f) for f, _ in pts]
        if x <= xs[0]:
            return pts[0][1]
        for (x0, (_, e0)), (x1, (_, e1)) in zip(zip(xs, pts), zip(xs[1:], pts[1:])):
            if x <= x1:
                return e0 + (e1 - e0) * (x - x0) / (x1 - x0)
        return pts[-1][1]

    @property
    def kernels_modelled(self) -> bool:
        """A GPU described by public figures (compute capability and SMs), whose ops
        ``sim.kernel_model`` refines; a test device without them, or one whose efficiency
        calibration measured, keeps the plain roofline."""
        return self.kind == "gpu" and self.compute_capability > 0 and self.sms > 0 and not self.efficiency_curve

    @property
    def at_datasheet_peak(self) -> bool:
        """A GPU whose compute ops run at 100% of its peak: efficiency 1 (the default), no
        measured curve, no measured op costs of compute (a message's or a step's are
        not), no kernel model (``simulate`` says so: a topology written from a datasheet
        alone predicts ~2-3x the speed of one that gives these)."""
        return (self.kind == "gpu" and self.efficiency >= 1.0 and not self.efficiency_curve
                and not self.backward_efficiency_curve and not self.kernels_modelled
                and not any(key.split(".")[0] not in NOT_COMPUTE_KEYS for key in (*self.op_costs, *self.op_curves)))

    @property
    def achievable_bw(self) -> float:
        """Bytes/s a streaming kernel reaches: the datasheet bandwidth x ``memory_efficiency``."""
        return self.memory_bw * self.memory_efficiency

    @property
    def is_compute(self) -> bool:
        return self.kind in COMPUTE_KINDS

    def flops_per_s(self, dtype: str) -> float:
        """Peak FLOP/s for ``dtype``; falls back to fp32 where the file gives no other figure."""
        return self.peak_flops.get(dtype) or self.peak_flops["fp32"]


@dataclass(frozen=True)
class Link:
    a: str
    b: str
    bandwidth: float   # bytes/s per direction
    latency: float     # seconds


class NoRoute(LookupError):
    """No path joins two devices (none built, or the links it needed are cut); ``ends``:
    the two, where the search knew them."""

    ends: tuple[str, str] | None = None


class TopologyError(ValueError):
    """Devices or links that make no topology; ``field`` is the cluster file's key at fault
    ("device", "device.core_pool", "link")."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class Topology:
    """Devices and links; ``route`` gives the directed links a message crosses."""

    def __init__(self, name: str, devices: list[Device], links: list[Link], description: str = "",
                 core_pools: dict[str, float] | None = None, price_usd_per_hour: float = 0.0,
                 power_w: float = 0.0, route_templates: bool = True, noise_window_s: float = 0.05) -> None:
        """``route_templates``: route the inside of each machine once per distinct machine
        (``_inside``); False routes every pair by its own search (the same routes, slower).
        ``noise_window_s``: the window of the devices' ``noise`` series."""
        self.name, self.description = name, description
        self.noise_window_s = noise_window_s
        self.price_usd_per_hour = price_usd_per_hour   # one machine's list price (0: not given)
        self.power_w = power_w                         # one machine's power at full load (0: not given)
        self.core_pools = dict(core_pools or {})      # pool name -> cores its devices share
        self.devices: dict[str, Device] = {}
        for d in devices:
            if d.name in self.devices:
                raise TopologyError("device", f"device name {d.name!r} is used twice (a [[device]], or one the "
                                              f"[machine] template makes)")
            if d.core_pool and d.core_pool not in self.core_pools:
                raise TopologyError("device.core_pool", f"device {d.name!r} names core pool {d.core_pool!r}, "
                                                        f"which is not defined")
            self.devices[d.name] = d
        self.capacity: dict[DirLink, float] = {}
        self.latency: dict[DirLink, float] = {}
        capacity, latency = self.capacity, self.latency
        near: dict[str, list[str]] = {n: [] for n in self.devices}    # neighbours in link order
        for ln in links:                         # checked here; the networkx graph is built when asked
            a, b = ln.a, ln.b
            for end in (a, b):
                if end not in self.devices:
                    raise KeyError(end)
            if a == b:
                raise TopologyError("link", f"link {a} - {b} is a self-loop (both ends one device)")
            if (a, b) in capacity:               # both directions are in ``capacity`` once linked
                raise TopologyError("link", f"link {a} - {b} is listed twice (a [[link]], or one the "
                                            f"[machine] or [network] tables make)")
            capacity[(a, b)] = capacity[(b, a)] = ln.bandwidth
            latency[(a, b)] = latency[(b, a)] = ln.latency
            near[a].append(b)
            near[b].append(a)
        self._graph = None
        # every directed link numbered (its place in ``links``): a collective's thousands of
        # links are counted and weighted as int arrays (``sim.network``), not as tuples of names
        self.links: list[DirLink] = list(capacity)
        self.link_id: dict[DirLink, int] = dict(zip(self.links, range(len(self.links))))
        order = {n: i for i, n in enumerate(sorted(self.devices, key=lambda n: _device_order(self.devices[n])))}
        self._adj = {n: sorted(nbs, key=order.__getitem__) for n, nbs in near.items()}
        self._index = order                      # a device's place in device order
        nics = sorted((n for n, d in self.devices.items() if d.kind == "nic"), key=order.__getitem__)
        self._port = {n: i for i, n in enumerate(nics)}  # a NIC's host-port number: its D-mod-K digits
        self._machine_nics: dict[int | None, list[str]] = {}
        for n in nics:
            self._machine_nics.setdefault(self.devices[n].machine, []).append(n)
        self._nic_of: dict[str, str | None] = {}
        self._routes: dict[tuple[str, str], tuple[DirLink, ...]] = {}
        self._route_ids: dict[tuple[str, str], bytes] = {}
        self._fabric: _Fabric | None = None         # built on the first route across the fabric
        self.route_templates = route_templates
        self._templates: dict[tuple, tuple | None] = {}   # (machine shape, src i, dst i) -> index route
        self._shapes: dict[int, tuple] = {}              # machine -> ``_shape``
        self._shape_ids: dict[tuple, int] = {}           # a machine's full shape -> its id
        self._members: dict[int | None, list[str]] = {}  # machine -> its devices in device order
        self._machine = {n: d.machine for n, d in self.devices.items()}   # device -> its machine (many pairs at once)

    @property
    def graph(self) -> nx.Graph:
        """The devices (``kind``, ``machine``) and links (``bandwidth``, ``latency``) as a
        networkx graph, built on first use (plots and listings; routing reads its own tables)."""
        if self._graph is None:
            graph = nx.Graph()
            graph.add_nodes_from((d.name, {"kind": d.kind, "machine": d.machine}) for d in self.devices.values())
            capacity, latency = self.capacity, self.latency     # ``links``: both ways of each, in turn
            graph.add_edges_from((a, b, {"bandwidth": capacity[(a, b)], "latency": latency[(a, b)]})
                                 for a, b in self.links[::2])
            self._graph = graph
        return self._graph

    def without_link(self, a: str, b: str) -> "Topology":
        """A copy whose routing no longer uses link a-b (devices and capacities shared)."""
        clone = object.__new__(Topology)
        clone.__dict__.update(self.__dict__)
        clone._adj = {n: [m for m in nbs if {n, m} != {a, b}] for n, nbs in self._adj.items()}
        clone._routes, clone._route_ids, clone._nic_of, clone._fabric = {}, {}, {}, None
        clone._templates, clone._shapes, clone._shape_ids = {}, {}, {}
        return clone

    # --- devices -------------------------------------------------------------------------
    def compute_devices(self) -> list[str]:
        """Where model slices go: every GPU; on machines without GPUs, the CPU.  Ordered by
        machine, then name with numeric suffixes in numeric order (m0.gpu2 before m0.gpu10)."""
        has_gpu = {d.machine for d in self.devices.values() if d.kind == "gpu"}
        chosen = [d for d in self.devices.values()
                  if d.kind == "gpu" or (d.kind == "cpu" and d.machine not in has_gpu)]
        return [d.name for d in sorted(chosen, key=_device_order)]

    def host_cpus(self) -> list[str]:
        return [d.name for d in sorted(self.devices.values(), key=_device_order) if d.kind == "cpu"]

    def machine_of(self, name: str) -> int | None:
        return self.devices[name].machine

    def even_machines(self, devices) -> bool:
        """Whether every machine of ``devices`` holds as many of them: what a hierarchical
        allreduce needs (a reduce-scatter inside each machine, one ring a rail across)."""
        return len(set(Counter(self.machine_of(d) for d in devices).values())) <= 1

    # --- routing -------------------------------------------------------------------------
    def neighbors(self, node: str) -> list[str]:
        """The devices ``node`` has a link to, as routing sees them (cut links left out)."""
        return self._adj[node]

    def route(self, src: str, dst: str) -> tuple[DirLink, ...]:
        """Directed links from ``src`` to ``dst``; () when equal.  Raises NoRoute if none."""
        if src == dst:
            return ()
        key = (src, dst)
        if key not in self._routes:
            self._routes[key] = self._find_route(src, dst)
        return self._routes[key]

    def route_ids(self, pairs: list[tuple[str, str]]) -> bytes:
        """The routes of ``pairs`` (``route``) as link ids (``link_id``), joined in pair order:
        int32 in native order, for ``np.frombuffer`` (a collective's phase counts the links of
        thousands of routes at once).  Kept per pair and looked up in C loops: looking links up
        by their names, route by route, is what this saves."""
        return b"".join(self.route_ids_each(pairs))

    def route_ids_each(self, pairs: list[tuple[str, str]]) -> list[bytes]:
        """``route_ids`` of each pair apart, in pair order."""
        kept = self._route_ids
        found = list(map(kept.get, pairs))
        if None in found:
            missing = [pair for ids, pair in zip(found, pairs) if ids is None]
            if len(missing) > 1:
                self._ids_many(missing)
                found = list(map(kept.get, pairs))
            found = [ids if ids is not None else self._ids(*pair) for ids, pair in zip(found, pairs)]
        return found

    def _ids_many(self, pairs: list[tuple[str, str]]) -> None:
        """``_ids`` of new pairs, kept: inside one machine from its shape's kept route
        (``_inside_ids``: no route by name); between machines joined from their three parts
        (to the NIC, across, in from the NIC), the parts across walked together from
        ``_MANY`` on (``_walk_fabric``), those inside by ``_inside_ids``.  A pair whose route
        fails, or that these leave out, is left to ``_ids``, which searches or raises ``NoRoute``."""
        kept, nic, nic_of = self._route_ids, self._nic_of, self.nic_of
        machine = self._machine.__getitem__
        pairs = list(dict.fromkeys(pairs))
        inside, cross = [], []
        for pair, a, b in zip(pairs, map(machine, [s for s, _ in pairs]), map(machine, [d for _, d in pairs])):
            if a is None or b is None:
                continue
            if a == b:
                inside.append(pair)
                continue
            src, dst = pair
            nic_a, nic_b = nic.get(src) or nic_of(src), nic.get(dst) or nic_of(dst)
            if nic_a and nic_b:
                cross.append((pair, (src, nic_a), (nic_a, nic_b), (nic_b, dst)))
        across = [pair for pair in dict.fromkeys(mid for _, _, mid, _ in cross) if pair not in kept]
        if len(across) >= _MANY:
            kept.update(self._walk_fabric(across))
        ends = [part for part in dict.fromkeys([c[1] for c in cross] + [c[3] for c in cross]) if part not in kept]
        self._inside_ids(inside + ends)
        get = kept.get
        for (pair, _, _, _), x, y, z in zip(cross, map(get, [c[1] for c in cross]), map(get, [c[2] for c in cross]),
                                            map(get, [c[3] for c in cross])):
            if x is not None and y is not None and z is not None:
                kept[pair] = x + y + z

    def _inside_ids(self, pairs: list[tuple[str, str]]) -> None:
        """``_ids`` of pairs inside one machine each, kept: from its shape's kept route where
        there is one (``_inside``), the rest searched pair by pair (the first of a shape and
        place keeps its route for the others; without ``route_templates`` every pair)."""
        kept, templates, machine, link = self._route_ids, self._templates, self._machine, self.link_id.__getitem__
        for src, dst in pairs:
            if (src, dst) in kept:
                continue
            if src == dst:
                kept[(src, dst)] = b""
                continue
            hops = None
            if self.route_templates:
                shape, nodes, place = self._shape(machine[src])
                hops = templates.get((shape, place[src], place[dst]))
            if hops:
                kept[(src, dst)] = array("i", map(link, [(nodes[u], nodes[v]) for u, v in hops])).tobytes()
            else:
                try:
                    self._ids(src, dst)
                except LookupError:
                    pass

    def _walk_fabric(self, pairs: list[tuple[str, str]]) -> dict[tuple[str, str], bytes]:
        """``_across_fabric``'s link ids of many NIC pairs on different machines, all stepping
        hop by hop together, each in its destination switch's tree (``_Walks``): taking
        option ``digits % k`` of its node's ``k`` and keeping ``digits // k`` (``_pick``'s
        D-mod-K; one option leaves the digits as they are).  Only host ports with one
        uplink and no other link out of their machine, whose tree reaches the source's
        switch; the rest are left out (``_across_fabric`` routes or raises)."""
        fabric = self._fabric or self._build_fabric()
        if fabric.has_nics or fabric.degree > _Walks.DEGREE:    # a NIC among the switches: ``_pick``'s own-rail rule
            return {}
        walks = fabric.walks or self._walks(fabric)
        index = self._index
        src = np.fromiter(map(index.__getitem__, [a for a, _ in pairs]), dtype=np.int64, count=len(pairs))
        dst = np.fromiter(map(index.__getitem__, [b for _, b in pairs]), dtype=np.int64, count=len(pairs))
        up, root = walks.up[src], walks.up[dst]
        ok = (up >= 0) & (root >= 0)
        kinds = len(walks.caps)
        keys, slot = np.unique(root[ok] * kinds + walks.cap_code[dst[ok]], return_inverse=True)
        rows = np.array([walks.row(fabric, r // kinds, walks.caps[r % kinds]) for r in keys.tolist()], dtype=np.int64)
        base = rows[slot] * len(fabric.nodes)         # node i of row t is t * nodes + i
        node, root = up[ok], root[ok]
        count, first, into = walks.count[:len(walks.rows)].reshape(-1), walks.first[:len(walks.rows)].reshape(-1), fabric.into
        went = (count[base + node] > 0) | (node == root)    # the rest raise NoRoute in ``_across_fabric``
        ok[ok] = went
        base, node, root, digits = base[went], node[went], root[went], walks.digits[dst[ok]]
        steps = [walks.link_up[src[ok]]]
        moving = np.flatnonzero(node != root)
        while len(moving):
            at = node[moving]
            k = count[base[moving] + at]
            h = into[at] + walks.hop[first[base[moving] + at] + digits[moving] % k]
            step = np.full(len(node), -1, dtype=np.int64)
            step[moving] = walks.out_link[h]
            node[moving] = fabric.in_frm[h]
            digits[moving] //= k
            steps.append(step)
            moving = moving[node[moving] != root[moving]]
        steps.append(walks.link_down[dst[ok]])
        table = np.column_stack(steps)
        used = table >= 0
        ends = (np.cumsum(used.sum(axis=1)) * 4).tolist()
        joined = table[used].astype(np.int32).tobytes()
        return dict(zip(compress(pairs, ok.tolist()), map(joined.__getitem__, map(slice, [0, *ends[:-1]], ends))))

    def _walks(self, fabric: "_Fabric") -> "_Walks":
        """``fabric``'s ``_Walks``: each host port's uplink and links, by device order."""
        devices, adj, cap, link_id, index = self.devices, self._adj, self.capacity, self.link_id, self._index
        ports = []
        for nic in self._port:
            up = fabric.uplink(nic, adj[nic])
            machine = devices[nic].machine
            if up is not None and machine is not None and all(
                    nb == up or devices[nb].machine == machine for nb in adj[nic]):
                ports.append((index[nic], fabric.index[up], link_id[(nic, up)], link_id[(up, nic)],
                              cap[(up, nic)], self._port[nic]))
        fabric.walks = _Walks(len(devices), len(fabric.nodes), ports, fabric.out_links(link_id))
        return fabric.walks

    def _ids(self, src: str, dst: str) -> bytes:
        """One pair's ``route_ids``, kept.  A route between machines joins its three kept parts
        (to the NIC, across the fabric, in from the NIC; as ``_find_route`` splits it), so a
        link is looked up by its names once per part, not once per route."""
        found = self._route_ids.get((src, dst))
        if found is None:
            a, b = self.devices[src].machine, self.devices[dst].machine
            nic_a = nic_b = None
            if a is not None and b is not None and a != b:
                nic_a, nic_b = self.nic_of(src), self.nic_of(dst)
            if nic_a and nic_b and (src, dst) != (nic_a, nic_b):
                found = self._ids(src, nic_a) + self._ids(nic_a, nic_b) + self._ids(nic_b, dst)
            else:        # NIC to NIC across the fabric: its names are not kept (``_find_route`` reads these)
                path = self._across_fabric(src, dst) if nic_a and nic_b else self.route(src, dst)
                found = array("i", map(self.link_id.__getitem__, path)).tobytes()
            self._route_ids[(src, dst)] = found
        return found

    def _no_route(self, src: str, dst: str) -> NoRoute:
        exc = NoRoute(f"no route from {src} to {dst}")
        exc.ends = (src, dst)
        return exc

    def machines_note(self, src: str, dst: str) -> str:
        """" (on machines A and B)" where two devices no route joins are on different
        machines, else "": a route between machines passes only through devices of those two
        and of none, so a device given the wrong ``machine`` is unreachable.  For a file's
        topology as written (a cut link mid-run is another story)."""
        ma, mb = self.devices[src].machine, self.devices[dst].machine
        return f" (on machines {ma} and {mb})" if None not in (ma, mb) and ma != mb else ""

    def route_latency(self, route: tuple[DirLink, ...]) -> float:
        return sum(self.latency[link] for link in route)

    def route_bandwidth(self, route: tuple[DirLink, ...]) -> float:
        return min((self.capacity[link] for link in route), default=float("inf"))

    def _allowed(self, node: str, src: str, dst: str, machines: tuple[int | None, int | None]) -> bool:
        if node == src or node == dst:
            return True
        dev = self.devices[node]
        if dev.kind == "gpu":
            return False
        return dev.machine is None or dev.machine in machines

    def nics_of(self, machine: int | None) -> list[str]:
        """A machine's NICs, in device order."""
        return self._machine_nics.get(machine, [])

    def nic_of(self, device: str) -> str | None:
        """The NIC a device's traffic to other machines leaves by: the nearest of its
        machine's NICs (fewest hops), its own rail's among equals (GPU i's NIC i); None
        when the machine has none."""
        machine = self.devices[device].machine
        if device in self._nic_of:
            return self._nic_of[device]
        nics = self._machine_nics.get(machine, [])
        if machine is None or not nics or device in nics:
            return device if device in nics else None
        if self.route_templates:                      # machines of one shape: the NIC at the same place
            shape, nodes, place = self._shape(machine)
            key = ("nic", shape, place[device])
            searched = None
            if key not in self._templates:
                searched = self._nearest_nic(device, nics)
                found, inside = searched
                self._templates[key] = place[found] if inside and found is not None else None
            at = self._templates[key]
            if at is not None:
                self._nic_of[device] = nodes[at]
            else:                                     # this device's own search (done above if first)
                self._nic_of[device] = (searched or self._nearest_nic(device, nics))[0]
        else:
            self._nic_of[device] = self._nearest_nic(device, nics)[0]
        return self._nic_of[device]

    def _nearest_nic(self, device: str, nics: list[str]) -> tuple[str | None, bool]:
        """``nic_of``'s search: the NIC, and whether every route it measured stayed inside the
        machine (found by the inside search, so the same by place on machines of one shape)."""
        hops, machine, inside = {}, self.devices[device].machine, True
        for n in nics:
            try:
                r = self.route(device, n)
            except LookupError:
                inside = False
                continue
            hops[n] = len(r)
            inside = inside and all(self.devices[v].machine == machine for _, v in r)
        if not hops:
            return None, inside
        near = sorted((n for n in hops if hops[n] == min(hops.values())), key=lambda n: self._index[n])
        own = [n for n in near if rail(n) == rail(device)]
        return (own[0] if own else near[rail(device) % len(near)]), inside

    def _find_route(self, src: str, dst: str) -> tuple[DirLink, ...]:
        """Between machines: to the source's NIC, across the fabric to the destination's NIC,
        in to the destination (RDMA moves NIC to NIC; no machine is a router).  Inside one
        machine or the fabric: ``_shortest``."""
        a, b = self.devices[src].machine, self.devices[dst].machine
        if a is not None and b is not None and a != b:
            nic_a, nic_b = self.nic_of(src), self.nic_of(dst)
            if nic_a and nic_b:                       # the part across: from its kept ids where known
                ids = self._route_ids.get((nic_a, nic_b))
                across = (self._across_fabric(nic_a, nic_b) if ids is None
                          else tuple(map(self.links.__getitem__, array("i", ids))))
                return self.route(src, nic_a) + across + self.route(nic_b, dst)
        if a is not None and a == b:                  # inside one machine: its own links first
            try:
                return self._inside(src, dst) if self.route_templates else self._shortest(src, dst, inside=True)
            except LookupError:
                pass
        return self._shortest(src, dst)

    def _inside(self, src: str, dst: str) -> tuple[DirLink, ...]:
        """``_shortest(src, dst, inside=True)``, searched once per machine shape and pair of
        places in it: the search sees nothing but the machine's own devices (kinds, rails,
        links, capacities, in device order), so machines of one shape route alike -- unless
        an ECMP choice used the destination's global digits, which are then searched anew."""
        shape, nodes, place = self._shape(self.devices[src].machine)
        key = (shape, place[src], place[dst])
        if key in self._templates:
            hops = self._templates[key]
            if hops is not None:
                return tuple((nodes[u], nodes[v]) for u, v in hops)
            return self._shortest(src, dst, inside=True)
        used: list[bool] = []
        path = self._shortest(src, dst, inside=True, ecmp=used)
        self._templates[key] = None if any(used) else tuple((place[u], place[v]) for u, v in path)
        return path

    def machine_shape(self, machine: int | None) -> tuple[int, list[str], dict[str, int]] | None:
        """``_shape``: what routes inside ``machine`` are kept by (its shape's id, its devices
        in device order, each one's place); None outside machines or without ``route_templates``."""
        return self._shape(machine) if self.route_templates and machine is not None else None

    def _shape(self, machine: int) -> tuple[int, list[str], dict[str, int]]:
        """A machine's shape (an id: machines of one id have devices of the same kinds and
        rails, linked alike, at the same capacities both ways, in the same neighbour order),
        its devices in device order, and each one's place in that order."""
        if machine not in self._shapes:
            if not self._members:
                for n in self._index:                   # device order
                    self._members.setdefault(self.devices[n].machine, []).append(n)
            nodes = self._members[machine]
            place = {n: k for k, n in enumerate(nodes)}
            cap = self.capacity
            shape = tuple((self.devices[n].kind, rail(n),
                           tuple((place[m], cap[(n, m)], cap[(m, n)]) for m in self._adj[n] if m in place))
                          for n in nodes)
            self._shapes[machine] = (self._shape_ids.setdefault(shape, len(self._shape_ids)), nodes, place)
        return self._shapes[machine]

    def _shortest(self, src: str, dst: str, fabric_only: bool = False, inside: bool = False,
                  ecmp: list[bool] | None = None) -> tuple[DirLink, ...]:
        """Widest shortest path: fewest hops, then the largest bottleneck bandwidth (so NVLink
        wins over a PCIe switch of equal hop count), then ECMP among what is left.
        ``fabric_only``: no machine's insides in between (NIC to NIC); ``inside``: nothing
        but the machine's own devices; ``ecmp`` gets, per hop, whether the destination's
        digits chose it."""
        machines = (None, None) if fabric_only else (self.devices[src].machine, self.devices[dst].machine)
        own = self.devices[src].machine if inside else None
        cap = self.capacity
        dist, width = {dst: 0}, {dst: float("inf")}
        frontier = deque([dst])
        while frontier and dist[frontier[0]] < dist.get(src, len(self.devices)):
            node = frontier.popleft()              # BFS from dst, one level past nothing but src's
            for nb in self._adj[node]:
                w = min(cap[(nb, node)], width[node])
                if nb not in dist:
                    if self._allowed(nb, src, dst, machines) and (not inside or self.devices[nb].machine == own):
                        dist[nb], width[nb] = dist[node] + 1, w
                        frontier.append(nb)
                elif dist[nb] == dist[node] + 1 and w > width[nb]:
                    width[nb] = w
        if src not in dist:
            raise self._no_route(src, dst)
        path, node, digits = [], src, self._port.get(dst, self._index[dst])
        while node != dst:
            options = [nb for nb in self._adj[node] if dist.get(nb, -1) == dist[node] - 1
                       and min(cap[(node, nb)], width[nb]) >= width[node]]
            nxt, digits = self._pick(options, src, dst, machines[0], digits)
            if ecmp is not None:
                ecmp.append(len(options) > 1 and not all(self.devices[o].kind == "nic" for o in options))
            path.append((node, nxt))
            node = nxt
        return tuple(path)

    def _pick(self, options: list[str], src: str, dst: str, src_machine: int | None, digits: int) -> tuple[str, int]:
        """The next hop among equally short and wide ``options``, and the digits left."""
        if len(options) == 1:
            return options[0], digits
        if all(self.devices[o].kind == "nic" for o in options):
            end = src if self.devices[options[0]].machine == src_machine else dst
            return options[rail(end) % len(options)], digits          # the endpoint's own NIC
        return options[digits % len(options)], digits // len(options)   # D-mod-K: the next digit

    def _across_fabric(self, src: str, dst: str) -> tuple[DirLink, ...]:
        """``_shortest(src, dst, fabric_only=True)`` by a BFS tree of the fabric cached per
        destination switch, so one BFS serves every route into it.  Same routes: the
        destination's BFS, cut at the source's level, is its switch's tree one level
        deeper, with every width capped by the switch's link to it."""
        fabric = self._fabric or self._build_fabric()
        if dst in fabric.index:
            root, cap0 = dst, float("inf")
        else:
            root = fabric.uplink(dst, self._adj[dst])
            if root is None:
                return self._shortest(src, dst, fabric_only=True)
            cap0 = self.capacity[(root, dst)]
        tree = fabric.tree(root, cap0)
        below = 0 if root == dst else 1                     # dst's level under the root's tree
        cap = self.capacity

        def level(node):                                     # hops to dst; -1: not allowed
            if node == dst:
                return 0
            i = fabric.index.get(node)
            return -1 if i is None or tree.dist[i] < 0 else int(tree.dist[i]) + below

        def wide(node):
            return float("inf") if node == dst else float(tree.width[fabric.index[node]])

        digits = self._port.get(dst, self._index[dst])
        up = fabric.uplink(src, self._adj[src])
        if up is not None and dst not in self._adj[src]:    # one way up: the search below picks it
            if tree.dist[fabric.index[up]] < 0:
                raise self._no_route(src, dst)
            nxt = up
        else:
            near = [nb for nb in self._adj[src] if level(nb) >= 0]
            if not near:
                raise self._no_route(src, dst)
            hops = min(level(nb) for nb in near) + 1
            width = max(min(cap[(src, nb)], wide(nb)) for nb in near if level(nb) == hops - 1)
            options = [nb for nb in near if level(nb) == hops - 1 and min(cap[(src, nb)], wide(nb)) >= width]
            nxt, digits = self._pick(options, src, dst, None, digits)
        path = [(src, nxt)]
        node = nxt
        while node != dst:
            if node == root:
                nxt = dst
            else:
                options = tree.options.get(node)
                if options is None:
                    options = tree.options[node] = fabric.options(tree, node)
                if len(options) == 1:
                    nxt = options[0]
                else:
                    nxt, digits = self._pick(options, src, dst, None, digits)
            path.append((node, nxt))
            node = nxt
        return tuple(path)

    def _build_fabric(self) -> "_Fabric":
        nodes = [n for n in self._adj if self.devices[n].machine is None and self.devices[n].kind != "gpu"]
        self._fabric = _Fabric(nodes, self._adj, self.capacity, {n: self.devices[n].kind for n in nodes})
        return self._fabric


class _Tree:
    """Hops and widest bottleneck (bytes/s) of every fabric node toward one root, and
    the next-hop options found so far (a node -> its equally good next hops, in order)."""

    __slots__ = ("dist", "width", "options", "ok")

    def __init__(self, dist: list[int], width: list[float], ok: np.ndarray) -> None:
        self.dist, self.width, self.options = dist, width, {}
        self.ok = ok                  # per hop out of a node (``_Fabric.into`` read outward): one of its options


class _Fabric:
    """The network switches as arrays: node indices and directed links (from, to,
    capacity), for breadth-first trees computed level by level in array arithmetic, each
    level from the hops into the one before."""

    def __init__(self, nodes: list[str], adj: dict[str, list[str]], capacity: dict[DirLink, float],
                 kinds: dict[str, str]) -> None:
        self.nodes = nodes
        self.index = {n: i for i, n in enumerate(nodes)}
        pairs = [(self.index[v], self.index[u], capacity[(v, u)])
                 for u in nodes for v in adj[u] if v in self.index]
        # a hop in_frm -> in_to, toward the root, built node by node (so sorted by ``in_to``):
        # those into node i are ``in_frm[into[i]:into[i + 1]]``, in i's neighbour order --
        # read the other way, the hops out of node i (``out_cap``: their capacity that way)
        self.in_frm = np.array([p[0] for p in pairs], dtype=np.int64)
        self.in_to = np.array([p[1] for p in pairs], dtype=np.int64)
        self.in_cap = np.array([p[2] for p in pairs], dtype=float)
        self.into = np.searchsorted(self.in_to, np.arange(len(nodes) + 1))
        self.out_cap = np.array([capacity[(u, v)] for u in nodes for v in adj[u] if v in self.index], dtype=float)
        self._trees: dict[tuple[str, float], _Tree] = {}
        self._uplinks: dict[str, str | None] = {}
        self.walks: _Walks | None = None          # built on the first walk of many pairs
        self.degree = int(np.diff(self.into).max(initial=0))      # the most hops out of one node
        self.has_nics = any(kinds[n] == "nic" for n in nodes)

    def uplink(self, node: str, neighbours: list[str]) -> str | None:
        """``node``'s one fabric neighbour (a host port's switch); None where it has none or several."""
        if node not in self._uplinks:
            ups = [nb for nb in neighbours if nb in self.index]
            self._uplinks[node] = ups[0] if len(ups) == 1 and node not in self.index else None
        return self._uplinks[node]

    def tree(self, root: str, cap0: float) -> _Tree:
        """BFS from ``root`` over the fabric, the root's width ``cap0``: each node's hops,
        and the largest bottleneck over its shortest paths (what ``_shortest`` computes)."""
        key = (root, cap0)
        if key not in self._trees:
            n = len(self.nodes)
            dist = np.full(n, -1, dtype=np.int64)
            width = np.zeros(n)
            r = self.index[root]
            dist[r], width[r] = 0, cap0
            level, front = 0, np.array([r])
            while True:                      # the hops into this level's nodes, and the nodes they come from
                starts, counts = self.into[front], self.into[front + 1] - self.into[front]
                hops = np.repeat(starts - np.cumsum(counts) + counts, counts) + np.arange(counts.sum())
                frm = self.in_frm[hops]
                seen = np.zeros(n, dtype=bool)          # the new nodes, sorted and once each
                seen[frm[dist[frm] < 0]] = True
                new = np.flatnonzero(seen)
                if not len(new):
                    break
                dist[new] = level + 1
                down = hops[dist[frm] == level + 1]
                np.maximum.at(width, self.in_frm[down], np.minimum(self.in_cap[down], width[self.in_to[down]]))
                level, front = level + 1, new
            # every node's next hops at once: one level closer, as wide as its best (``options``)
            ok = (dist[self.in_frm] == dist[self.in_to] - 1) & (
                np.minimum(self.out_cap, width[self.in_frm]) >= width[self.in_to])
            self._trees[key] = _Tree(dist.tolist(), width.tolist(), ok)   # lists: read one by one, in Python
        return self._trees[key]

    def out_links(self, link_id: dict[DirLink, int]) -> np.ndarray:
        """The link id of each hop read outward (from ``in_to`` to ``in_frm``)."""
        nodes = self.nodes
        return np.array([link_id[(nodes[t], nodes[f])] for f, t in zip(self.in_frm.tolist(), self.in_to.tolist())],
                        dtype=np.int64)

    def options(self, tree: _Tree, node: str) -> list[str]:
        """``node``'s next hops toward the root, in its neighbour order: one level closer, as
        wide as its best (a neighbour j of node i with dist[j] == dist[i] - 1 and
        min(capacity(i, j), width[j]) >= width[i], worked out for every hop with the tree)."""
        i = self.index[node]
        at, to = self.into[i], self.into[i + 1]
        nodes = self.nodes
        return [nodes[j] for j in self.in_frm[at:to][tree.ok[at:to]].tolist()]


class _Walks:
    """What ``Topology._walk_fabric`` reads, as arrays: per device (device order) a host
    port's uplink (a fabric index; -1: not walked), its links up and down, the down link's
    capacity (a code in ``caps``) and its D-mod-K digits; and every tree walked so far as a
    row: node i of row t has ``count[t, i]`` next hops, ``hop[first[t, i]:][:count]``
    (``_Fabric.options``, each as its place among node i's hops), rows grown by doubling."""

    DEGREE = 2**16 - 1          # the most hops out of one switch the places in ``hop`` hold

    def __init__(self, devices: int, nodes: int, ports: list[tuple], out_link: np.ndarray) -> None:
        self.up = np.full(devices, -1, dtype=np.int64)
        self.link_up, self.link_down, self.digits = (np.zeros(devices, dtype=np.int64) for _ in range(3))
        self.caps: list[float] = sorted({p[4] for p in ports})
        self.cap_code = np.zeros(devices, dtype=np.int64)
        if ports:
            at, up, link_up, link_down, cap, digits = (np.array(col) for col in zip(*ports))
            self.up[at], self.link_up[at], self.link_down[at], self.digits[at] = up, link_up, link_down, digits
            self.cap_code[at] = np.searchsorted(self.caps, cap)
        self.out_link = out_link
        self.rows: dict[tuple[int, float], int] = {}
        self.count = self.first = np.zeros((0, nodes), dtype=np.int32)
        self.hop = np.zeros(0, dtype=np.uint16)
        self._hops = 0

    def row(self, fabric: "_Fabric", root: int, cap0: float) -> int:
        """The row of the tree of fabric node ``root`` at width ``cap0``, added when new."""
        key = (root, cap0)
        if key not in self.rows:
            tree = fabric.tree(fabric.nodes[root], cap0)
            hop = np.flatnonzero(tree.ok)
            count = np.bincount(fabric.in_to[hop], minlength=len(fabric.nodes))
            t = len(self.rows)
            if t == len(self.count):
                self.count, self.first = (_grown(a, max(8, 2 * t)) for a in (self.count, self.first))
            if self._hops + len(hop) > len(self.hop):
                self.hop = _grown(self.hop, max(2 * len(self.hop), 8 * len(hop)))
            self.count[t], self.first[t] = count, self._hops + np.cumsum(count) - count
            self.hop[self._hops:self._hops + len(hop)] = hop - fabric.into[fabric.in_to[hop]]
            self._hops += len(hop)
            self.rows[key] = t
        return self.rows[key]


def _grown(a: np.ndarray, rows: int) -> np.ndarray:
    """``a`` with room for ``rows`` rows, its own first (the rest not set)."""
    out = np.empty((rows, *a.shape[1:]), dtype=a.dtype)
    out[:len(a)] = a
    return out


# From this many new NIC pairs on, ``_ids_many`` walks them across the fabric together
# (``_walk_fabric``): below that the arrays' set-up costs more than routing pair by pair
# (docs/decisions/044-many-routes-at-once.md).
_MANY = 64


def rail(name: str) -> int:
    """A device's number in its machine (gpu3 -> 3): its rail."""
    digits = name[len(name.rstrip("0123456789")):]
    return int(digits) if digits else 0


def _device_order(d: Device) -> tuple:
    head = d.name.rstrip("0123456789")
    tail = d.name[len(head):]
    return (d.machine if d.machine is not None else -1, head, int(tail) if tail else -1)
