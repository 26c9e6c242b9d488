"""``clustersim topology show``: the built-in topologies, or one of them in words."""
from __future__ import annotations

from pathlib import Path

import networkx as nx

from clustersim import report
from clustersim.cli.args import count, plot_arg
from clustersim.core.config import ConfigError
from clustersim.core.topogen import builtin_topologies, load_topology
from clustersim.core.topology import NoRoute


def add(sub) -> None:
    t = sub.add_parser("topology", help="inspect a topology")
    tsub = t.add_subparsers(dest="action", required=True)
    ts = tsub.add_parser("show")
    ts.add_argument("topology", nargs="?", help=f"built-in ({', '.join(builtin_topologies())}) or a path")
    ts.add_argument("--machines", type=count("--machines"), help="override the topology's machine count")
    plot_arg(ts, "draw the devices and links")
    ts.set_defaults(func=run)


def run(args) -> int:
    if not args.topology:
        print("built-in topologies: " + ", ".join(builtin_topologies()))
        return 0
    topo = load_topology(args.topology, Path("."), args.machines or None, ("topology show", ""))
    kinds: dict[str, int] = {}
    for d in topo.devices.values():
        kinds[d.kind] = kinds.get(d.kind, 0) + 1
    compute = topo.compute_devices()
    pairs = [(compute[0], c) for c in (compute[1:2] + compute[-1:]) if c != compute[0]]
    try:
        routes = [(a, topo.route(a, b)) for a, b in dict.fromkeys(pairs)]
    except NoRoute as exc:
        raise ConfigError(args.topology, "link", f"{exc}{topo.machines_note(*exc.ends) if exc.ends else ''} in "
                                                 f"topology {topo.name}: its compute devices cannot send each "
                                                 f"other data") from None
    reached = nx.node_connected_component(topo.graph, compute[0])
    alone = next((c for c in compute if c not in reached), None)
    if alone:                                    # the routes above try two pairs; every device is linked
        raise ConfigError(args.topology, "link", f"no links join {alone} to {compute[0]} in topology {topo.name}: "
                                                 f"its compute devices cannot send each other data")
    print(f"{topo.name}: {topo.description}")
    print("  devices: " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())))
    print(f"  links: {topo.graph.number_of_edges()} (full duplex)")
    print("  compute devices: " + ", ".join(f"{n} x {line}" for line, n in device_kinds(topo, compute).items()))
    for a, r in routes:
        hops = " > ".join([a] + [v for _, v in r])
        print(f"  route {hops}: {report.si(topo.route_bandwidth(r), 'B/s')}, "
              f"{report.seconds(topo.route_latency(r))}")
    if args.plot:
        from clustersim.plots import plot_topology
        plot_topology(topo, args.plot)
        print(f"  wrote plot: {args.plot}")
    return 0


def device_kinds(topo, names) -> dict[str, int]:
    """Each distinct kind of device among ``names`` in words, with how many there are (a
    file may mix GPUs of two speeds, or GPUs and CPU-only hosts)."""
    out: dict[str, int] = {}
    for name in names:
        d = topo.devices[name]
        line = (f"{d.kind} ({report.si(d.flops_per_s('fp32'), 'FLOP/s')} fp32 peak, efficiency {d.efficiency:g}, "
                f"{d.memory_bytes / 2**30:.4g} GiB)")
        out[line] = out.get(line, 0) + 1
    return out
