"""Topology files -> ``Topology``: a machine template repeated by a network generator,
plus any explicit ``[[device]]`` / ``[[link]]`` entries.

File format (units in the names; ``gbps`` is 10^9 *bytes* per second, like nccl-tests):

    name = "..."
    [machine.cpu]    cores, core_gflops, memory_gib, memory_bandwidth_gbps, efficiency,
                     op_overhead_us, op_costs (as for gpu below; ``send`` and ``recv``: a host
                     message's software cost on each side, ``Engine._host_message``), vendor
                     ("intel" or "amd": NCCL's tuner caps LL across machines and counts a
                     network step's overhead by the hosts' CPU; not given: Intel's figures)
    [machine.gpu]    count, peak_tflops_fp32 (fp16, bf16, fp64 optional), memory_gib,
                     memory_bandwidth_gbps, efficiency, op_overhead_us, efficiency_curve and
                     backward_efficiency_curve ([[flops, efficiency], ...], written by calibrate),
                     op_costs ({key = [overhead_us, gflops, gbps, gbps_beyond_cache], ...}:
                     measured op costs, written by calibrate), op_curves ({key = [[bytes, us],
                     ...]}: measured times by size, overriding op_costs for that key),
                     cache_mib (where an op's bytes stop fitting in cache), core_pool (the name of a [core_pools] entry),
                     memory_efficiency (gpu: achievable / datasheet bandwidth of a streaming kernel)
    [machine.pcie]   switches, generation, lanes, uplink_lanes, latency_us
    [machine.nvlink] bandwidth_gbps (per GPU, per direction), latency_us
    [machine.nic]    count, bandwidth_gbps, latency_us
    [network]        kind = none | switch | fat-tree | rail; machines; bandwidth_gbps;
                     latency_us; k (fat-tree); spines, spine_bandwidth_gbps (rail)
    [[device]]       name, kind, machine, and the compute fields above for cpu/gpu; a cpu's
                     noise ([factor, ...]: its slowdown over the quiet host window by window,
                     written by calibrate, replayed by ``faults.host_noise``)
    noise_window_ms  the window of those series (default 50)
    [[link]]         a, b, bandwidth_gbps, latency_us
    [core_pools]     name = cores: the devices naming the pool (ranks bound to those cores)
                     share them; each of n runs at min(1, cores / n), busy or polling
"""
from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Any

from clustersim.core.config import ConfigError, Table, bundled_folder, bundled_names
from clustersim.core.layers import KINDS
from clustersim.core.topology import DEVICE_KINDS, DTYPES, SPLIT, STAGE, Device, Link, Topology, TopologyError

# PCIe payload rate per lane and direction in GB/s: transfer rate x line-code efficiency
# (PCI-SIG: gen3 8 GT/s 128b/130b, gen4 16 GT/s, gen5 32 GT/s, gen6 64 GT/s PAM4 ~1 B/bit/lane).
PCIE_LANE_GBPS = {3: 0.985, 4: 1.969, 5: 3.938, 6: 7.563}

MAX_MACHINES = 4096       # keeps a typo from building a graph that eats the machine
MAX_PER_MACHINE = 64      # GPUs, NICs or PCIe switches in one machine
MAX_DEVICES = 200_000
MIN_GBPS = 1e-9           # 10^9 bytes/s: a byte a second (1e-300 gave a step of 7.5e+295 s, exit 0)
MAX_GBPS = 1e12           # room for "free" what-ifs (tests use 1e9), not for 1e300's overflows
MAX_LATENCY_US = 1e7      # ten seconds, past any route
MAX_TFLOPS = 1e9          # a zettaFLOP/s device: room for "free compute" what-ifs, not for 1e300's overflow to inf
MAX_GIB = 1e12            # an exbibyte of memory per device, likewise
GIB = 2**30
CPU_VENDORS = ("", "intel", "amd")     # what NCCL's tuner tells apart (ncclTopoCpuType); "": not given


def load_topology(ref: str, base_dir: Path = Path("."), machines: int | None = None,
                  named_in: tuple[str, str] = ("", "")) -> Topology:
    """A built-in name or a path (relative to ``base_dir``).  ``machines`` overrides
    ``network.machines``.  ``named_in``: the (file, field) that named ``ref`` (a scenario's
    ``cluster.topology``, or ``("--topology", "")``), where a name that is no topology is
    reported, and where given, a machine count other than 1 for a topology of one machine
    (no ``[network]`` to repeat it over) is bad input, not ignored.  Raises ConfigError
    naming the file and field."""
    path, text = _read(ref, base_dir, named_in)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, "", f"malformed TOML: {exc}") from None
    data = _with_base(data, path, me=_identity(ref, path))
    if machines is not None and isinstance(data.get("network"), dict):
        data["network"] = {**data["network"], "machines": machines}
    elif machines not in (None, 1) and any(named_in):
        file, field = named_in
        networked = [n for n in builtin_topologies() if "network" in tomllib.loads(_read(n, base_dir)[1])]
        raise ConfigError(*((file, "cluster.machines") if field == "cluster.topology" else ("--machines", "")),
                          f"{machines} machines of {ref}, which has no [network] table to repeat a machine over "
                          f"(its devices are as listed); built-in topologies with one: {', '.join(networked)}")
    return build_topology(data, path)


def _with_base(data: dict, path: str, depth: int = 0, seen: tuple[str, ...] = (), me: str = "") -> dict:
    """``base = "other"``: start from that topology's tables, then this file's keys replace
    theirs, table inside table (so a fat-tree of DGX machines need not repeat the machine,
    and ``[machine.gpu] memory_gib = 40`` makes an A100 40GB of dgx-a100's); arrays of
    tables are replaced whole.  A path is read beside the file that names it, as
    ``model.file`` is beside its scenario.  ``me``: this file's identity (``_identity``),
    ``seen``: those of the files that based on it, where a cycle would start."""
    if "base" not in data:
        return data
    ref = data.pop("base")
    if not isinstance(ref, str) or depth > 4:
        raise ConfigError(path, "base", "must name one topology (at most 4 levels deep)")
    base_path, text = _read(ref, Path(path).parent, (path, "base"))
    chain, its = (*seen, me or _identity(path, path)), _identity(ref, base_path)
    if its in chain:
        raise ConfigError(path, "base", f"{ref!r} leads back to a file that names it (a cycle of bases)")
    try:
        base = _with_base(tomllib.loads(text), base_path, depth + 1, chain, its)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(base_path, "", f"malformed TOML: {exc}") from None
    base.pop("name", None)
    base.pop("description", None)
    return _merged(base, data)


def _identity(ref: str, path: str) -> str:
    """One topology's identity whatever names it: a built-in's name (``_read`` takes a
    built-in name before a file), else its file's resolved path."""
    return f"built-in {ref}" if ref in builtin_topologies() else str(Path(path).resolve())


def _merged(base: dict, over: dict) -> dict:
    """``base`` with ``over``'s keys, tables merged key by key at every depth."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def builtin_topologies() -> list[str]:
    return bundled_names("clustersim.builtin_topologies")


def _read(ref: str, base_dir: Path, named_in: tuple[str, str] = ("", "")) -> tuple[str, str]:
    """The path and text of topology ``ref``; a ConfigError against ``named_in`` (file,
    field), else the path, where it is neither a built-in name nor a readable file."""
    if ref in builtin_topologies():
        res = bundled_folder("clustersim.builtin_topologies") / f"{ref}.toml"
        return f"topologies/{ref}.toml", res.read_text()
    path = Path(ref) if Path(ref).is_absolute() else base_dir / ref
    try:
        return str(path), path.read_text()
    except UnicodeDecodeError:
        raise ConfigError(str(path), "", "is not UTF-8 text, which a TOML topology file is") from None
    except (OSError, ValueError) as exc:           # ValueError: undecodable, or a NUL in the name
        names = ", ".join(builtin_topologies())
        file, field = named_in
        raise ConfigError(file or str(path), field, f"{ref!r} is neither a built-in topology ({names}) nor a "
                          f"file that can be read ({path}: {exc.__class__.__name__})") from None


def build_topology(data: Any, file: str) -> Topology:
    top = Table(data, file)
    name = top.str("name", Path(file).stem)
    description = top.str("description", "")
    devices: list[Device] = []
    links: list[Link] = []
    net = top.table("network", {"kind": "none"})
    kind = net.str("kind", "none", choices=("none", "switch", "fat-tree", "rail"))
    _keys_of_kind(net, kind)
    n_machines = net.int("machines", 1, lo=1, hi=MAX_MACHINES)
    if kind == "none" and n_machines != 1:
        raise net.error("machines", "must be 1 when network.kind is none")
    nics: list[list[str]] = []
    price = power = 0.0
    if top.has("machine"):
        template = _machine_template(top.table("machine"))
        price, power = template["price"], template["power"]
        if template["gpus"] * n_machines > MAX_DEVICES:
            raise net.error("machines", f"would build more than {MAX_DEVICES} devices")
        for m in range(n_machines):
            nics.append(_add_machine(m, template, devices, links))
    elif n_machines != 1:
        raise net.error("machines", "needs a [machine] table to repeat")
    else:           # explicit devices only: one machine's price and power at the top
        price = top.float("price_usd_per_hour", 0.0, lo=0.0, hi=1e6)
        power = top.float("power_w", 0.0, lo=0.0, hi=1e7)
    if kind != "none":
        if not nics or not nics[0]:
            raise net.error("kind", "a network needs machine.nic.count >= 1")
        _add_network(net, kind, nics, devices, links, template["nic_bw"])
    net.done()
    pools = top.table("core_pools", {})
    core_pools = {key: pools.float(key, positive=True) for key in list(pools.data)}
    pools.done()
    for dt in top.tables("device"):
        devices.append(_explicit_device(dt))
        if devices[-1].core_pool and devices[-1].core_pool not in core_pools:
            raise dt.error("core_pool", f"names {devices[-1].core_pool!r}, which [core_pools] does not define")
        dt.done()
    for lt in top.tables("link"):
        links.append(Link(lt.str("a"), lt.str("b"),
                          lt.float("bandwidth_gbps", positive=True, lo=MIN_GBPS, hi=MAX_GBPS) * 1e9,
                          lt.float("latency_us", lo=0.0, hi=MAX_LATENCY_US) * 1e-6))
        _check_link_ends(lt, links[-1], devices)
        lt.done()
    window = top.float("noise_window_ms", 50.0, lo=1e-3, hi=1e6) * 1e-3
    top.done()
    if not any(d.is_compute for d in devices):
        raise ConfigError(file, "machine", "the topology has no cpu or gpu device")
    if len({len(d.noise) for d in devices if d.noise}) > 1:
        raise ConfigError(file, "device.noise", "every device's series must have one length (their windows line up)")
    try:
        return Topology(name, devices, links, description, core_pools, price, power, noise_window_s=window)
    except TopologyError as exc:
        raise ConfigError(file, exc.field, str(exc)) from None


def _check_link_ends(lt: Table, link: Link, devices: list[Device]) -> None:
    names = {d.name for d in devices}
    for key, end in (("a", link.a), ("b", link.b)):
        if end not in names:
            raise lt.error(key, f"no device named {end!r}")


def _compute_fields(t: Table, kind: str) -> dict[str, Any]:
    """Compute specs of a cpu or gpu table, in SI units."""
    if kind == "gpu":
        peak = {"fp32": t.float("peak_tflops_fp32", positive=True, hi=MAX_TFLOPS) * 1e12}
        for dt in DTYPES[1:]:
            if t.has(f"peak_tflops_{dt}"):
                peak[dt] = t.float(f"peak_tflops_{dt}", positive=True, hi=MAX_TFLOPS) * 1e12
        cores, extra = 0, {"compute_capability": t.float("compute_capability", 0.0, lo=0.0, hi=20.0),
                           "sms": t.int("sms", 0, lo=0, hi=100_000),
                           "memory_efficiency": t.float("memory_efficiency", 1.0, lo=0.05, hi=1.0)}
    else:
        cores = t.int("cores", lo=1, hi=4096)
        fp32 = cores * t.float("core_gflops", positive=True, hi=MAX_TFLOPS * 1e3) * 1e9
        peak = {"fp32": fp32, "fp64": fp32 / 2}         # SIMD lanes hold half as many 8-byte values
        vendor = t.str("vendor", "")
        if vendor not in CPU_VENDORS:
            raise t.error("vendor", f"must be \"intel\" or \"amd\" (what NCCL's tuner tells apart; leave it out "
                                    f"for another), got {vendor!r}")
        extra = {"vendor": vendor}
    curves = {key: _curve(t, key) for key in ("efficiency_curve", "backward_efficiency_curve")}
    return dict(peak_flops=peak, **curves, **extra,
                memory_bytes=t.float("memory_gib", positive=True, hi=MAX_GIB) * GIB,
                memory_bw=t.float("memory_bandwidth_gbps", positive=True, lo=MIN_GBPS, hi=MAX_GBPS) * 1e9,
                efficiency=t.float("efficiency", 1.0, lo=1e-3, hi=1.0),
                cores=cores,
                op_overhead=t.float("op_overhead_us", 0.0, lo=0.0, hi=1e6) * 1e-6)


def _curve(t: Table, key: str) -> tuple:
    curve = t.raw(key, [])
    if (not isinstance(curve, list) or not all(
            isinstance(pt, list) and len(pt) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                         for v in pt) and pt[0] > 0 and 0 < pt[1] <= 1
            for pt in curve) or [pt[0] for pt in curve] != sorted({pt[0] for pt in curve})):
        raise t.error(key, "must be [[flops, efficiency], ...] with flops increasing and 0 < efficiency <= 1")
    return tuple((float(f), float(e)) for f, e in curve)


def _machine_template(mt: Table) -> dict[str, Any]:
    cpu_t = mt.table("cpu")
    tpl: dict[str, Any] = {"cpu": {**_compute_fields(cpu_t, "cpu"), "op_costs": _op_costs(cpu_t, checked=True)},
                           "price": mt.float("price_usd_per_hour", 0.0, lo=0.0, hi=1e6),
                           "power": mt.float("power_w", 0.0, lo=0.0, hi=1e7)}
    cpu_t.done()
    gpu_t = mt.table("gpu", {"count": 0})
    tpl["gpus"] = gpu_t.int("count", 0, lo=0, hi=MAX_PER_MACHINE)
    if not tpl["gpus"] and len(gpu_t.data) > 1:
        raise gpu_t.error("count", "must be >= 1 where [machine.gpu] describes a GPU (no GPUs: leave the table out)")
    tpl["gpu"] = _compute_fields(gpu_t, "gpu") if tpl["gpus"] else None
    gpu_t.done()
    pcie = mt.table("pcie", {"switches": 0})
    gen = pcie.int("generation", 4, lo=3, hi=6)
    lanes = pcie.int("lanes", 16, lo=1, hi=32)
    tpl["pcie"] = dict(switches=pcie.int("switches", 0, lo=0, hi=MAX_PER_MACHINE),
                       bw=PCIE_LANE_GBPS[gen] * lanes * 1e9,
                       uplink_bw=PCIE_LANE_GBPS[gen] * pcie.int("uplink_lanes", lanes, lo=1, hi=64) * 1e9,
                       latency=pcie.float("latency_us", 1.0, lo=0.0, hi=MAX_LATENCY_US) * 1e-6)
    pcie.done()
    if mt.has("nvlink"):
        nv = mt.table("nvlink")
        if not tpl["gpus"]:
            raise nv.error("bandwidth_gbps", "NVLink needs machine.gpu.count >= 1")
        tpl["nvlink"] = (nv.float("bandwidth_gbps", positive=True, lo=MIN_GBPS, hi=MAX_GBPS) * 1e9,
                         nv.float("latency_us", 1.0, lo=0.0, hi=MAX_LATENCY_US) * 1e-6)
        nv.done()
    else:
        tpl["nvlink"] = None
    nic = mt.table("nic", {"count": 0})
    tpl["nics"] = nic.int("count", 0, lo=0, hi=MAX_PER_MACHINE)
    tpl["nic_bw"] = nic.float("bandwidth_gbps", 12.5, positive=True, lo=MIN_GBPS, hi=MAX_GBPS) * 1e9
    tpl["nic_latency"] = nic.float("latency_us", 1.0, lo=0.0, hi=MAX_LATENCY_US) * 1e-6
    nic.done()
    mt.done()
    return tpl


def _add_machine(m: int, tpl: dict[str, Any], devices: list[Device], links: list[Link]) -> list[str]:
    """Adds machine ``m`` (names ``m{m}.cpu``, ``m{m}.gpu{i}``, ...); returns its NIC names."""
    p = f"m{m}."
    cpu = p + "cpu"
    devices.append(Device(cpu, "cpu", m, **tpl["cpu"]))
    pcie = tpl["pcie"]
    switches = [f"{p}pcie{i}" for i in range(pcie["switches"])]
    for sw in switches:
        devices.append(Device(sw, "pcie_switch", m))
        links.append(Link(sw, cpu, pcie["uplink_bw"], pcie["latency"]))

    def attach(i: int, count: int, name: str, bw: float = float("inf"), latency: float = 0.0) -> None:
        parent = switches[i * len(switches) // count] if switches else cpu
        links.append(Link(name, parent, min(pcie["bw"], bw), pcie["latency"] + latency))

    gpus = [f"{p}gpu{i}" for i in range(tpl["gpus"])]
    for i, g in enumerate(gpus):
        devices.append(Device(g, "gpu", m, **tpl["gpu"]))
        attach(i, len(gpus), g)
    if tpl["nvlink"] and gpus:
        nvs = p + "nvswitch"
        devices.append(Device(nvs, "nvswitch", m))
        for g in gpus:
            links.append(Link(g, nvs, *tpl["nvlink"]))
    nics = [f"{p}nic{i}" for i in range(tpl["nics"])]
    for i, n in enumerate(nics):
        devices.append(Device(n, "nic", m))
        attach(i, len(nics), n, tpl["nic_bw"], tpl["nic_latency"])   # the NIC's own delay sits here
    return nics


NETWORK_OWN_KEYS = {"fat-tree": ("k",), "rail": ("spines", "spine_bandwidth_gbps")}


def _keys_of_kind(net: Table, kind: str) -> None:
    """A key of another kind of network says so, where "unknown key" would suggest a typo."""
    for key in net.data:
        if key in ("bandwidth_gbps", "latency_us") and kind == "none":
            raise net.error(key, 'sets the links between machines; kind = "none" has none')
        other = next((k for k, keys in NETWORK_OWN_KEYS.items() if key in keys and k != kind), None)
        if other:
            raise net.error(key, f"is a {other} network's key; kind is {kind!r}")


def _add_network(net: Table, kind: str, nics: list[list[str]], devices: list[Device], links: list[Link],
                 nic_bw: float) -> None:
    bw = net.float("bandwidth_gbps", nic_bw / 1e9, positive=True, lo=MIN_GBPS, hi=MAX_GBPS) * 1e9
    lat = net.float("latency_us", 1.0, lo=0.0, hi=MAX_LATENCY_US) * 1e-6
    ports = [n for machine in nics for n in machine]
    if kind == "switch":
        devices.append(Device("switch", "switch"))
        links.extend(Link(n, "switch", bw, lat) for n in ports)
    elif kind == "rail":
        rails = len(nics[0])
        spines = net.int("spines", 1, lo=1, hi=MAX_PER_MACHINE)
        spine_bw = net.float("spine_bandwidth_gbps", bw * len(nics) / spines / 1e9, positive=True, lo=MIN_GBPS,
                             hi=MAX_GBPS) * 1e9
        for r in range(rails):
            devices.append(Device(f"rail{r}", "switch"))
            links.extend(Link(machine[r], f"rail{r}", bw, lat) for machine in nics)
        for s in range(spines if rails > 1 else 0):
            devices.append(Device(f"spine{s}", "switch"))
            links.extend(Link(f"rail{r}", f"spine{s}", spine_bw, lat) for r in range(rails))
    else:
        _add_fat_tree(net, ports, bw, lat, devices, links)


def _add_fat_tree(net: Table, ports: list[str], bw: float, lat: float,
                  devices: list[Device], links: list[Link]) -> None:
    """k-ary fat-tree (Al-Fares et al., SIGCOMM 2008): k pods of k/2 edge and k/2 aggregation
    switches, (k/2)^2 cores, k^3/4 host ports; hosts fill edge switches in order."""
    k = net.int("k", 0, lo=0, hi=64)
    if k == 0:                                   # smallest even k with room for every port
        k = 2
        while k**3 // 4 < len(ports):
            k += 2
    if k % 2 or k**3 // 4 < len(ports):
        raise net.error("k", f"must be even with k^3/4 >= {len(ports)} host ports; got {k}")
    half = k // 2
    pods_used = -(-len(ports) // (half * half))
    for c in range(half * half):
        devices.append(Device(f"core{c}", "switch"))
    for p in range(pods_used):
        for j in range(half):
            agg, edge = f"agg{p}.{j}", f"edge{p}.{j}"
            devices += [Device(agg, "switch"), Device(edge, "switch")]
            links.extend(Link(agg, f"core{j * half + c}", bw, lat) for c in range(half))
        for j in range(half):
            links.extend(Link(f"edge{p}.{j}", f"agg{p}.{a}", bw, lat) for a in range(half))
    for i, port in enumerate(ports):
        links.append(Link(port, f"edge{i // (half * half)}.{i // half % half}", bw, lat))


def _explicit_device(dt: Table) -> Device:
    kind = dt.str("kind", choices=DEVICE_KINDS)
    name = dt.str("name")
    machine = dt.int("machine", -1, lo=-1, hi=MAX_MACHINES)
    fields = _compute_fields(dt, kind) if kind in ("cpu", "gpu") else {}
    if kind in ("cpu", "gpu"):
        fields.update(op_costs=_op_costs(dt), op_curves=_op_curves(dt), core_pool=dt.str("core_pool", ""),
                      cache_bytes=dt.float("cache_mib", 0.0, lo=0.0, hi=1e6) * 2**20, noise=_noise(dt, kind))
    return Device(name, kind, None if machine < 0 else machine, **fields)


def _noise(dt: Table, kind: str) -> tuple:
    """``noise = [factor, ...]``: a host rank's slowdown over the quiet host, window by window."""
    raw = dt.raw("noise", [])
    if not isinstance(raw, list):
        raise dt.error("noise", f"must be a list of slowdown factors, got {raw!r}")
    for i, v in enumerate(raw):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.01 <= v <= 1e6:
            raise dt.error("noise", f"must hold slowdown factors in [0.01, 1e6], got {v!r} at [{i}]")
    if raw and kind != "cpu":
        raise dt.error("noise", "is a host rank's (a cpu device's) series, measured by calibrate")
    return tuple(float(v) for v in raw)


def _op_curves(dt: Table) -> dict[str, tuple]:
    """``op_curves = {key = [[bytes, us], ...]}``, bytes increasing -> ((bytes, seconds), ...)."""
    raw = dt.raw("op_curves", {})
    if not isinstance(raw, dict):
        raise dt.error("op_curves", "must be a table of key = [[bytes, us], ...]")
    out = {}
    for key, v in raw.items():
        if (not isinstance(v, list) or not v or not all(
                isinstance(pt, list) and len(pt) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                             for x in pt) and pt[0] > 0 and pt[1] >= 0 for pt in v)
                or [pt[0] for pt in v] != sorted({pt[0] for pt in v})):
            raise dt.error(f"op_curves.{key}", "must be [[bytes, us], ...] with bytes > 0 increasing and us >= 0")
        out[str(key)] = tuple((float(b), float(us) * 1e-6) for b, us in v)
    return out


def _cost_key(key: str) -> bool:
    """A key ``Device.op_time`` is asked for: a layer kind, send / recv (messages), step or
    update, then ``.backward``, ``.split``, ``.stage`` or ``.reduction`` (``plan.cost_key``,
    the engine)."""
    base, *rest = key.split(".")
    return (base in KINDS or base in ("send", "recv", "step", "update")) and all(
        "." + r in (".backward", SPLIT, STAGE, ".reduction") for r in rest)


def _op_costs(dt: Table, checked: bool = False) -> dict[str, tuple]:
    """``op_costs = {key = [overhead_us, gflops, gbps, gbps_beyond_cache]}`` (the last may be
    left out: the same rate beyond the cache) -> (seconds, flop/s, byte/s, byte/s).
    ``checked`` (a hand-written ``[machine.cpu]``): each key must be one the simulator looks
    up, so a misspelt one is refused rather than silently unused."""
    raw = dt.raw("op_costs", {})
    if not isinstance(raw, dict):
        raise dt.error("op_costs", "must be a table of key = [overhead_us, gflops, gbps, gbps_beyond_cache]")
    out = {}
    for key, v in raw.items():
        if checked and not _cost_key(str(key)):
            raise dt.error(f"op_costs.{key}", "not an op cost key: send, recv, step, update, or a layer kind (dense, "
                                              "conv2d, ...), with .backward, .split, .stage or .reduction")
        if (not isinstance(v, list) or len(v) not in (3, 4) or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x < math.inf for x in v)):
            raise dt.error(f"op_costs.{key}", "must be [overhead_us, gflops, gbps, gbps_beyond_cache], each >= 0 "
                                              "(0: no such term)")
        out[str(key)] = (v[0] * 1e-6, v[1] * 1e9, v[2] * 1e9, v[-1] * 1e9)
    return out
