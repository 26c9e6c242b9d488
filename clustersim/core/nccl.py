"""NCCL's cost model of a named version, as its tuner uses it to pick algorithm and protocol.

Source: NVIDIA/nccl ``src/graph/tuning.cc`` at commit b6475625 (NCCL 2.20.3-1):
``baseLat``, ``hwLat`` (NVLink / PCI / network, per algorithm and protocol, microseconds),
the protocol bandwidth factors and the latency formulas of ``ncclTopoTuneModel``, the tree
correction of ``ncclTopoGetAlgoTime``.  What NCCL's topology search gives it (the bus
bandwidth of each algorithm's channels) comes here from our own topology: the bandwidth
the flow model gives the algorithm (``sim.collectives``).  A ring or tree run moves its bytes
at the share of the links that model charges (``run_share``): the protocol's factor, the
tree's correction at medium sizes, LL's cap across machines (``llMaxBws``; decision 030), and
across machines the per-channel caps of the tree and of LL128 (decision 033).

Link efficiencies are the per-link speeds NCCL's topology code assigns against the line
rate: NVLink 20.6 GB/s per NVLink4 lane of 25 (``SM90_NVLINK_BW``, ``src/graph/topo.h``;
18 lanes = 371 GB/s, the ring busbw measured on 8 H100: 365-370, NVIDIA/nccl#1455) and
20.0 per NVLink3 lane (``SM80_NVLINK_BW``: 12 lanes of an A100 = 240 GB/s),
PCIe 12 of 15.75 GB/s (``PCI_BW``, Gen3 x16), network 48 GB/s per 400 Gb/s NIC
(``sm90SpeedArrayInter[0]``, ``src/graph/search.cc``; NVIDIA's "46-48 GB/s per NIC",
NVIDIA/nccl-tests#290).  NVLS and NVLS_TREE runs add the fill of their chunk pipelines
(``nvls_pipeline``, decisions 028 and 050), which NCCL's tuner does not count.  The per-channel caps
count NCCL's *search* channels, one per NIC of a machine (half the execution channels,
``CHANNELS_PER_NIC``): 8 on a DGX H100, where they bind (the tree from 2 machines on, any
protocol: 8 x 41.4 GB/s busbw on 2, 8 x 36.0 on 3 or more; tree LL128 on 3 or more at 8 x
29.0).  LL128 runs by default only as NCCL enables it (``default_protocols``).  Not modelled: CollNet, one machine's per-channel and LL caps
(its search channels come from NVLink, which we do not search; 2.20.3's Hopper LL row,
87.7 GB/s busbw, is not applied).  llMaxBws and the net overhead take the hosts' CPU as
ncclTopoCpuType reports it: AMD's rows where every machine's CPU says ``vendor = "amd"``,
Intel's otherwise (a CPU that names no vendor included; decision 030, 076).
"""
from __future__ import annotations

import functools
import math
import re

VERSION = "2.20.3"
PROTOCOLS = ("LL", "LL128", "Simple")
HW = ("nvlink", "pci", "net")

# microseconds, per protocol (LL, LL128, Simple)
BASE_LAT = {"tree": (6.8, 14.0, 0.0), "ring": (6.6, 14.0, 8.4), "nvls": (0.0, 0.0, 0.0), "nvls_tree": (0.0, 0.0, 0.0)}
HW_LAT = {
    "nvlink": {"tree": (0.6, 1.25, 28.0), "ring": (0.6, 1.9, 3.4), "nvls": (0, 0, 23.0), "nvls_tree": (0, 0, 23.0)},
    "pci": {"tree": (1.0, 1.9, 28.0), "ring": (1.0, 2.5, 5.7), "nvls": (0, 0, 0.0), "nvls_tree": (0, 0, 0.0)},
    "net": {"tree": (5.0, 8.5, 28.0), "ring": (2.7, 4.0, 14.0), "nvls": (0, 0, 18.0), "nvls_tree": (0, 0, 14.0)},
}
NVLS = ("nvls", "nvls_tree")   # NCCL_ALGO_NVLS (one machine), NCCL_ALGO_NVLS_TREE (several)
NVLS_RATIO = 5 / 6             # tuning.cc: NVLS and NVLS_TREE bus bandwidth x 5/6
NVLS_CHANNELS = 16             # NCCL_NVLS_NCHANNELS default (nvls.cc); enqueue.cc runs NVLS on these
NVLS_MIN_CC = 9.0              # ncclTopoCompute: no NVLS graph below compute capability 9.0 or without NVSwitch
NVLS_MIN_GPUS = 3              # ncclNvlsInit: off with 2 GPUs or fewer on the machine
NET_OVERHEAD_US = 1.0          # getNetOverhead(): x86 Intel hosts (and any but AMD's) ...
NET_OVERHEAD_US_AMD = 2.0      # ... x86 AMD hosts
# How one-machine NVLS moves a chunk (decision 028): three warp groups of one channel's block
# (src/device/all_reduce.h) -- scatter into the heads' buffers, in-switch reduce + multicast,
# gather -- hand each chunk on through the step FIFO, so the run takes steps + 2 chunk times.
NVLS_STAGES = 3
NVLS_MAX_CHUNK = 128 * 1024    # enqueue.cc: NVLS chunk at most 128 KiB (2.18-2.20), then halved ...
NVLS_CHUNK_RULES = ((64, 64 * 1024), (8, 32 * 1024), (2, 16 * 1024))  # ... below k x channels x heads x chunk
# NVLS_TREE (decision 050): enqueue.cc (2.18-2.21 alike) starts from the Simple step, NCCL_BUFFSIZE's
# default 4 MiB over NCCL_STEPS = 8 (chunkSteps 1 outside the ring), and steps it down below
# k x channels x heads x chunk.
NVLS_TREE_MAX_CHUNK = (4 << 20) // 8
NVLS_TREE_WIDE = (4, 64 * 1024, (2, 19, 3))  # from 4 machines on at most 64 KiB, since 2.19.3 (nccl PR 1112)
NVLS_TREE_CHUNK_RULES = ((32, 256 * 1024), (16, 128 * 1024), (4, 64 * 1024), (1, 32 * 1024))
NVLS_CHANNEL_PARTS = (2, 20)   # from here each channel gets its own part; 2.18 fills channels in turn
LINK_EFFICIENCY = {"nvlink": 20.6 / 25.0, "pci": 12.0 / 15.75, "net": 48.0 / 50.0}
NVLINK_LANE_GBPS = {8: 20.0, 9: 20.6}     # SM80_NVLINK_BW, SM90_NVLINK_BW of a 25 GB/s lane


def link_efficiency(kind: str, compute_capability: float = 0.0) -> float:
    """NCCL's speed of a link of ``kind`` over its line rate; NVLink by the GPU's generation
    (Hopper's figure when it is not given)."""
    if kind == "nvlink" and int(compute_capability) in NVLINK_LANE_GBPS:
        return NVLINK_LANE_GBPS[int(compute_capability)] / 25.0
    return LINK_EFFICIENCY[kind]
# treeCorrectionFactor[protocol][log2(bytes / 64)], 64 B .. 256 MiB
TREE_CORRECTION = (
    (1.0, 1.0, 1.0, 1.0, .9, .8, .7, .7, .7, .7, .6, .5, .4, .4, .5, .6, .7, .8, .9, 1.0, 1.0, 1.0, 1.0),
    (1.0, 1.0, 1.0, 1.0, 1.0, .9, .8, .8, .8, .7, .6, .6, .6, .6, .6, .6, .8, .9, .9, .9, .9, 1.0, 1.0),
    (.9, .9, .9, .9, .9, .9, .9, .8, .7, .6, .6, .5, .5, .5, .5, .6, .7, .8, .7, .7, .8, .9, .9))
# llMaxBws (tuning.cc, 2.20.3 and the later source stored alike): LL's bus bandwidth across
# machines, by the hosts' CPU (index1 = cpuVendor == AMD ? 1 : 0 from 2 machines on), up to 2
# machines / more: Intel's row (Xeon hosts, as DGX H100's 8480C; any CPU but AMD's), AMD's
# (EPYC hosts, as DGX A100's 7742)
LL_MAX_BUSBW_NET = (39.0, 20.4)
LL_MAX_BUSBW_NET_AMD = (22.5, 19.0)
# Bus bandwidth caps in GB/s per *search* channel (``graphs[a]->nChannels``; "Execution channels
# are typically 2x the search channels", sjeaugey, NVIDIA/nccl#1041), tuning.cc @ b6475625 lines
# 92-106: rows Volta / Ampere / Hopper (compCapIndex of the lowest compute capability, line 140),
# columns 1 / 2 / more machines (index2, line 143).
PER_CH_MAX_RING_LL128 = ((20.0, 20.0, 20.0), (20.0, 20.0, 20.0), (36.7, 36.7, 36.7))
PER_CH_MAX_TREE_LL128 = ((20.0, 20.0, 20.0), (20.0, 20.0, 20.0), (36.7, 36.7, 29.0))
PER_CH_MAX_TREE = ((26.5, 18.5, 10.0), (24.0, 23.6, 17.8), (38.7, 41.4, 36.0))
TREE_FACTOR = 0.92             # tuning.cc line 183: a tree's bus bandwidth x .92 before its protocol's
RING_PLATEAU = 1.4             # multi-node ring Simple allreduce latency, compute capability >= 8.0
# Channels NCCL opens, each one thread block (CTA) on one SM of every member GPU: 24 on one
# node (nccl-tests#100, A100: "Channel 23/24"; nccl#1259, 8x H100: channels up to 22 at least),
# 2 per NIC across nodes (nccl#1453: 16 ring channels on 8 NICs of H100 nodes).
CHANNELS_ONE_NODE = 24
CHANNELS_PER_NIC = 2


def sm_share(machines: int, nics: int, sms: int, algo: str = "ring") -> float:
    """The share of a GPU's SMs a running collective's kernel takes: one per channel (NVLS:
    its 16, fewer than a ring's 24 on one node)."""
    if sms <= 0:
        return 0.0
    if algo in NVLS:
        channels = NVLS_CHANNELS
    else:
        channels = CHANNELS_ONE_NODE if machines <= 1 else CHANNELS_PER_NIC * max(1, nics)
    return min(channels, sms) / sms


OLDEST_MODELLED = (2, 18)      # NVLS arrived in 2.17; its chunk rules are modelled from 2.18's kernels on


def supported(version: str) -> tuple[int, ...]:
    """``version_tuple`` of a version the model lays NVLS out for: 2.18 or later in NCCL 2
    (later than 2.21 as 2.21's rules); ValueError otherwise."""
    v = version_tuple(version)
    if not OLDEST_MODELLED <= v < (3,):
        raise ValueError(f"NCCL {version} is not modelled: NVLS chunks are laid out as NCCL 2.18 and later "
                         f"2.x lay them out (2.17 first ran NVLS; the tuner is {VERSION}'s)")
    return v


@functools.lru_cache(maxsize=None)       # asked on every collective's layout
def version_tuple(version: str) -> tuple[int, ...]:
    """"2.18.5" -> (2, 18, 5); ValueError for anything else."""
    if not re.fullmatch(r"\d+(\.\d+)*", version):
        raise ValueError(f"NCCL version {version!r} is not of the form 2.20.3")
    return tuple(int(x) for x in version.split("."))


def nvls_chunk(nbytes: float, heads: int, channels: int = NVLS_CHANNELS, machines: int = 1,
               version: str = VERSION) -> int:
    """The chunk enqueue.cc (2.18-2.21) picks for an NVLS allreduce of ``nbytes``: on one machine
    128 KiB, halved to 64/32/16 KiB below 64/8/2 x channels x heads chunks in flight; NVLS_TREE
    (several ``machines``) 512 KiB -- 64 KiB from 4 machines on since 2.19.3 (the default of
    NCCL_NVLSTREE_MAX_CHUNKSIZE from 2.20.3) -- then 256/128/64/32 KiB below 32/16/4/1 x channels
    x heads x chunk."""
    chunk, rules = NVLS_MAX_CHUNK, NVLS_CHUNK_RULES
    if machines > 1:
        chunk, rules = NVLS_TREE_MAX_CHUNK, NVLS_TREE_CHUNK_RULES
        wide, cap, since = NVLS_TREE_WIDE
        if machines >= wide and version_tuple(version) >= since:
            chunk = cap
    in_flight = channels * heads
    for times, smaller in rules:
        if nbytes < times * in_flight * chunk and chunk > smaller:
            chunk = smaller
    return chunk


def nvls_pipeline(nbytes: float, heads: int, version: str = VERSION, channels: int = NVLS_CHANNELS,
                  machines: int = 1) -> float:
    """How much longer NVLS moves its bytes than the links' steady rate: n chunk steps per
    channel take n + 2 step times (three stages a chunk passes on its machine), over NVLS_TREE's
    chunks across ``machines`` (decision 050: the measured fill does not grow with the tree's
    depth), and NCCL before 2.20 gives channel c the bytes from c x heads x chunk on, so small
    messages leave channels idle and the busy ones carry their share of the links' rate each
    (NCCL's bandwidth is channels x a channel's)."""
    chunk = nvls_chunk(nbytes, heads, channels, machines, version)
    steps = max(1, math.ceil(nbytes / (channels * heads * chunk)))
    busy = channels
    if version_tuple(version) < NVLS_CHANNEL_PARTS:
        busy = min(channels, max(1, math.ceil(nbytes / (heads * chunk))))
    return (steps + NVLS_STAGES - 1) / steps * channels / busy


def protocols(algo: str) -> tuple[str, ...]:
    """The protocols NCCL runs ``algo`` with: NVLS and NVLS_TREE only Simple (tuning.cc)."""
    return ("Simple",) if algo in NVLS else PROTOCOLS


def protocol_factor(algo: str, proto: str, op: str, nodes: int, ppn: float) -> float:
    """The share of the algorithm's Simple bus bandwidth a protocol reaches (tuning.cc)."""
    if algo in NVLS:
        return NVLS_RATIO
    if algo == "ring":
        if proto == "LL":
            return 1 / 4 if nodes > 1 or op == "allreduce" else 1 / 3
        if proto == "LL128":
            return 0.92 if ppn >= 2 else 0.7
        return 1.0
    if proto == "LL":
        return TREE_FACTOR / 3.8
    if proto == "LL128":
        return TREE_FACTOR * (7 / 9 if nodes == 1 else 120 / 128)
    return TREE_FACTOR


def tree_correction(proto: str, nbytes: float) -> float:
    """treeCorrectionFactor: the share of its modelled bandwidth NCCL's tree reaches at this size
    ("trees are not perfectly sticking to the model for medium sizes", tuning.cc); 1 beyond 256 MiB."""
    log_size = int(math.log2(max(nbytes, 64) / 64))
    return TREE_CORRECTION[PROTOCOLS.index(proto)][log_size] if log_size < len(TREE_CORRECTION[0]) else 1.0


def algbw_ratio(algo: str, op: str, ranks: int, nodes: int) -> float:
    """NCCL's algorithm bandwidth over its bus bandwidth: 0.5 for the tree, ranks / nsteps for
    the ring (tuning.cc, "Convert bus BW to algorithm BW")."""
    return 0.5 if algo == "tree" else ranks / steps(op, ranks, nodes)[0]


def ll_max_algbw(algo: str, op: str, ranks: int, nodes: int, amd_hosts: bool = False) -> float:
    """GB/s: the algorithm bandwidth NCCL's model allows LL across machines (llMaxBws, the
    hosts' row, turned to algbw as tuning.cc does: x 0.5 for the tree, x ranks / nsteps for
    the ring); inf on one."""
    if nodes <= 1:
        return math.inf
    row = LL_MAX_BUSBW_NET_AMD if amd_hosts else LL_MAX_BUSBW_NET
    return row[0 if nodes <= 2 else 1] * algbw_ratio(algo, op, ranks, nodes)


def channel_max_busbw(table: tuple, compute_capability: float, nodes: int, search_channels: int) -> float:
    """GB/s: a per-channel cap of tuning.cc (``PER_CH_MAX_*``) times NCCL's search channels, the
    row by the group's lowest compute capability (Hopper from 9.0, Ampere from 8.0, else Volta),
    the column by machines (1, 2, more); inf on one machine, with no search channels given, or
    where the compute capability is not given (0: a test or calibrated device, whose GPU NCCL's
    rows may not describe)."""
    if nodes <= 1 or search_channels <= 0 or compute_capability <= 0:
        return math.inf
    row = 2 if compute_capability >= 9.0 else 1 if compute_capability >= 8.0 else 0
    return search_channels * table[row][min(nodes, 3) - 1]


def default_protocols(intra: str, compute_capability: float) -> tuple[str, ...]:
    """The protocols NCCL enables when NCCL_PROTO is not set: LL128 only where the members of a
    machine reach each other over NVLink (``typeIntra <= PATH_NVB``) and the GPUs are Volta,
    Ampere or Hopper (compute capability 7.0, 8.0 or 9.0): tuning.cc @ b6475625, "Enable LL128
    by default only on Volta/Ampere/Hopper+NVLink".  Not modelled: its NIC path condition
    (``typeInter <= PATH_PXB``, PXN on Hopper) and mixed compute capabilities (``min == max``:
    we get the lowest only).  A compute capability not given (0) keeps LL128."""
    if intra != "nvlink" or (compute_capability > 0 and compute_capability not in (7.0, 8.0, 9.0)):
        return tuple(p for p in PROTOCOLS if p != "LL128")
    return PROTOCOLS


def needs_per_byte(algo: str, proto: str, nodes: int, search_channels: int) -> bool:
    """Whether ``run_share`` caps this run, so needs the algorithm's per-byte time: LL, the tree
    and LL128 across machines."""
    if nodes <= 1 or algo not in ("ring", "tree"):
        return False
    return proto == "LL" or (search_channels > 0 and (algo == "tree" or proto == "LL128"))


def run_share(op: str, algo: str, proto: str, nbytes: float, us_per_byte: float, ranks: int, nodes: int, *,
              compute_capability: float = 0.0, search_channels: int = 0, amd_hosts: bool = False) -> float:
    """The share of the links' NCCL speeds a run of ``algo`` / ``proto`` moves its bytes at, as
    ncclTopoTuneModel caps the bandwidth it stores (tuning.cc @ b6475625 lines 181-185): the tree's
    bus bandwidth min(x .92, search channels x perChMaxTreeBw), then the protocol's factor, for
    LL128 across machines no more than search channels x perChMaxTree/RingLL128Bw, for LL no more
    than llMaxBws; then the tree's correction at this size (ncclTopoGetAlgoTime scales the stored
    bandwidth by it).  ``us_per_byte``: the algorithm at full speed (0: no caps);
    ``compute_capability``: the group's lowest; ``search_channels``: NCCL's, one per NIC of a
    machine (0: not known, no per-channel caps); ``amd_hosts``: llMaxBws's AMD row."""
    share = protocol_factor(algo, proto, op, nodes, ranks / nodes)
    if algo in ("ring", "tree") and us_per_byte > 0:
        per_busbw = algbw_ratio(algo, op, ranks, nodes) * 1e3 * us_per_byte    # the share 1 GB/s busbw is
        caps = functools.partial(channel_max_busbw, compute_capability=compute_capability, nodes=nodes,
                                 search_channels=search_channels)
        if algo == "tree":
            share *= min(1.0, caps(PER_CH_MAX_TREE) * per_busbw / TREE_FACTOR)
        if proto == "LL128":
            share = min(share, caps(PER_CH_MAX_TREE_LL128 if algo == "tree" else PER_CH_MAX_RING_LL128) * per_busbw)
        if proto == "LL":
            share = min(share, ll_max_algbw(algo, op, ranks, nodes, amd_hosts) * 1e3 * us_per_byte)
    if algo == "tree":
        share *= tree_correction(proto, nbytes)
    return share


def steps(op: str, ranks: int, nodes: int) -> tuple[int, int]:
    """(nsteps, nInterSteps) of a ring: sequential hops, and how many of them leave a machine."""
    if op == "allreduce":
        return 2 * (ranks - 1), (2 * nodes if nodes > 1 else 0)
    if op in ("reducescatter", "allgather"):
        return ranks - 1, nodes - 1
    return ranks, nodes


def latency_us(op: str, algo: str, proto: str, ranks: int, nodes: int, intra: str, nbytes: float = 0.0,
               channels: int = 1, net_floor_us: float = 0.0, amd_hosts: bool = False) -> float:
    """ncclTopoTuneModel's latency of one collective (and the ring plateau of ncclTopoGetAlgoTime).
    ``net_floor_us``: the cluster's one-way latency between machines, where a step that
    crosses them cannot take less than it (a run's time; NCCL's tuner knows only its table):
    each crossing step's latency raised to it, at most one crossing a step.  ``amd_hosts``:
    getNetOverhead's AMD figure for a ring's steps across machines."""
    p = PROTOCOLS.index(proto)
    lat = BASE_LAT[algo][p]
    intra_lat, inter_lat = HW_LAT[intra][algo][p], HW_LAT["net"][algo][p]
    over = max(0.0, net_floor_us - inter_lat) if nodes > 1 else 0.0     # per crossing step
    if algo == "tree":
        crossings = 2 * int(math.log2(nodes))
        return lat + 2 * (ranks / nodes - 1) * intra_lat + crossings * (inter_lat + over)
    if algo == "nvls":                       # the latency *is* the NVLink one (no base)
        return intra_lat + (inter_lat + over if nodes > 1 else 0.0)
    if algo == "nvls_tree":
        return lat + intra_lat + 2 * int(math.log2(nodes)) * (inter_lat + over)
    if op == "broadcast":                    # the channels' hops overlap: one hop's latency
        return lat + (inter_lat + over if nodes > 1 else intra_lat)
    nsteps, inter_steps = steps(op, ranks, nodes)
    if nodes > 1:
        overhead = NET_OVERHEAD_US_AMD if amd_hosts else NET_OVERHEAD_US
        intra_lat = max(intra_lat, overhead * (3 if proto == "Simple" else 1))
    lat += (nsteps - inter_steps) * intra_lat + inter_steps * inter_lat
    if proto == "Simple" and nodes > 1 and op == "allreduce" and nbytes / (channels * ranks) >= 64:
        lat *= RING_PLATEAU
    return lat + min(inter_steps, nsteps) * over     # NCCL counts 2 x nodes crossings of 2(n - 1) steps


def predicted_us(op: str, algo: str, proto: str, nbytes: float, us_per_byte: float, ranks: int, nodes: int,
                 intra: str, channels: int = 1, *, compute_capability: float = 0.0, search_channels: int = 0,
                 amd_hosts: bool = False) -> float:
    """ncclTopoGetAlgoTime: latency + bytes over the algorithm bandwidth, in microseconds.
    ``us_per_byte``: the algorithm's transfer time per byte at the links' NCCL speeds (what
    NCCL's topology search gives it), slowed to ``run_share`` (the last three arguments: its)."""
    share = run_share(op, algo, proto, nbytes, us_per_byte, ranks, nodes, compute_capability=compute_capability,
                      search_channels=search_channels, amd_hosts=amd_hosts)
    bw_time = nbytes * us_per_byte / share
    return latency_us(op, algo, proto, ranks, nodes, intra, nbytes, channels, amd_hosts=amd_hosts) + bw_time


def choose(op: str, nbytes: float, us_per_byte: dict[str, float], ranks: int, nodes: int, intra: str,
           channels: int = 1, allowed: tuple[str, ...] = PROTOCOLS, *, compute_capability: float = 0.0,
           search_channels: int = 0, amd_hosts: bool = False) -> tuple[str, str]:
    """(algorithm, protocol) with the least predicted time; ``us_per_byte``: every algorithm
    that can run this op, with its transfer time per byte; ``allowed``: the protocols
    allowed (NCCL_PROTO), of which each algorithm takes those it runs with; the last three
    arguments: ``run_share``'s."""
    options = [(predicted_us(op, a, p, nbytes, t, ranks, nodes, intra, channels, compute_capability=compute_capability,
                             search_channels=search_channels, amd_hosts=amd_hosts), a, p)
               for a, t in us_per_byte.items() for p in allowed if p in protocols(a)]
    if not options:
        raise ValueError(f"{'/'.join(us_per_byte)} does not run with protocol {'/'.join(allowed)}")
    _, algo, proto = min(options)
    return algo, proto
