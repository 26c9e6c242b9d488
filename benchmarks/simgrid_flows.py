"""One flow set through SimGrid's max-min kernel; run by Debian's /usr/bin/python3 (issue 18).

    /usr/bin/python3 benchmarks/simgrid_flows.py SET.json [ITEM:VALUE ...]
    # prints {"flows", "wall_s", "cpu_s", "finish_s"}

SET.json: ``{"links": {name: bytes_per_s}, "mode": "steps" | "times",
"flows": [[step or start_s, [link names], bytes], ...]}``.  Every directed link is one
SHARED link of that capacity and zero latency; each flow's route is exactly its links (one
pair of hosts per distinct route, so routes never depend on host names).  CM02 with every
correction off: bandwidth and latency factors 1, weight-S 0 (equal sharing), no cross
traffic, TCP-gamma 0 (SimGrid's documented switch that turns the window bound off), and
fine time and rate precisions, so the kernel solves the plain max-min problem the flow
model solves.  "steps": each step's flows all at once, the next step when all of them
have arrived (a ring); "times": each flow starts at its own time.  ``wall_s`` and ``cpu_s``
time ``Engine.run`` alone (platform building excluded); ``finish_s`` is in input order.
Further ``ITEM:VALUE`` arguments are SimGrid configuration items set after these (e.g.
``contexts/factory:raw``: the binding runs actors as threads unless told otherwise).

Standard library and simgrid only: this file never runs in the project's venv (Debian's
dist-packages would shadow its packages).
"""
import json
import sys
import time

import simgrid

CONFIG = ("network/model:CM02", "network/bandwidth-factor:1", "network/latency-factor:1",
          "network/weight-S:0", "network/crosstraffic:0", "network/TCP-gamma:0",
          "surf/precision:1e-15",       # seconds: default 1e-9, coarser than 1e-5 of a 1 MiB flow's 84 us
          "maxmin/precision:1e-9")      # bytes/s in the solver: default 1e-5
HOST_FLOPS = 1e9                        # hosts compute nothing here; SimGrid needs a speed


def build(links: dict, flows: list) -> list:
    """The platform (in the engine made before): one zone, the links, a host pair per
    distinct route; the (src, dst) hosts of every flow in input order."""
    zone = simgrid.NetZone.create_full_zone("flows")
    made = {name: zone.create_link(name, float(bps)).set_latency(0.0).seal() for name, bps in links.items()}
    pairs, ends = {}, []
    for _, route, _ in flows:
        key = tuple(route)
        if key not in pairs:
            i = len(pairs)
            src, dst = zone.create_host(f"s{i}", HOST_FLOPS), zone.create_host(f"d{i}", HOST_FLOPS)
            zone.add_route(src.netpoint, dst.netpoint, None, None,
                           [simgrid.LinkInRoute(made[name]) for name in route], False)
            pairs[key] = (src, dst)
        ends.append(pairs[key])
    zone.seal()
    return ends


def schedule(mode: str, flows: list) -> list[tuple[float, list[int]]]:
    """The flows' indices grouped as the driver starts them, worked out before the timed
    run (our side's flow sets are built before its clock starts too): "steps", one group a
    ring step in step order; "times", one flow a group in arrival order."""
    if mode == "steps":
        groups: dict = {}
        for i, f in enumerate(flows):
            groups.setdefault(f[0], []).append(i)
        return sorted(groups.items())
    return [(flows[i][0], [i]) for i in sorted(range(len(flows)), key=lambda i: flows[i][0])]


def driver(mode: str, plan: list, sizes: list, ends: list, comms: list) -> None:
    """Starts the flows (``comms`` collects them in input order) and waits for all: a ring
    step's flows at once, the next when all have arrived; timed flows at their arrival."""
    for at, group in plan:
        if mode == "times":
            simgrid.this_actor.sleep_until(at)
        for i in group:
            comms[i] = simgrid.Comm.sendto_async(*ends[i], sizes[i])
        if mode == "steps":
            simgrid.Comm.wait_all([comms[i] for i in group])
    if mode == "times":
        simgrid.Comm.wait_all(comms)


def read(path: str) -> dict:
    """The flow set, or one line naming the file and what is wrong, and exit code 2."""
    try:
        with open(path) as f:
            spec = json.load(f)
        for key in ("links", "mode", "flows"):
            if key not in spec:
                raise ValueError(f"no '{key}'")
        if not spec["flows"]:
            raise ValueError("flows: none given")
        if spec["mode"] not in ("steps", "times"):
            raise ValueError(f"mode: 'steps' or 'times', got {spec['mode']!r}")
        unknown = {name for f in spec["flows"] for name in f[1]} - set(spec["links"])
        if unknown:
            raise ValueError(f"flows: a route names links not in 'links': {sorted(unknown)[:3]}")
    except (OSError, ValueError, TypeError, IndexError) as exc:     # json's errors are ValueErrors
        fail(f"{path}: {exc}")
    return spec


def fail(line: str) -> None:
    print(line.replace("\n", " "), file=sys.stderr)
    sys.exit(2)


def main() -> None:
    if len(sys.argv) < 2:
        fail("usage: /usr/bin/python3 benchmarks/simgrid_flows.py SET.json [ITEM:VALUE ...]")
    spec = read(sys.argv[1])
    config = CONFIG + tuple(sys.argv[2:])
    engine = simgrid.Engine([sys.argv[0], "--log=root.thres:critical"] + [f"--cfg={c}" for c in config])
    flows = spec["flows"]
    ends = build(spec["links"], flows)
    comms = [None] * len(flows)
    simgrid.Actor.create("driver", ends[0][0], driver, spec["mode"], schedule(spec["mode"], flows),
                         [int(f[2]) for f in flows], ends, comms)
    t0, c0 = time.perf_counter(), time.process_time()
    engine.run()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(json.dumps({"flows": len(flows), "wall_s": wall, "cpu_s": cpu, "finish_s": [c.finish_time for c in comms]}))


if __name__ == "__main__":
    main()
