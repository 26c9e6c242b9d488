"""Simulator speed and scale (issue 18), printed as one line of JSON.

- ``event_rate_ratio``: the lower, over two workloads (image-80m 4-way spatial x 2 on
  dgx-h100; speech 8-way on distbelief-2012; 20 steps each), of engine events per wall
  second over a bare simpy loop of the same event count, measured in the same run;
- ``wall_s_1024`` / ``wall_s_10000``: one synchronous step of alexnet on 128 and 1,250 DGX
  H100 on a fat-tree, load, plan and simulate included, best of ``--best`` (the host is
  shared), stragglers drawn (``faults.slowdown_sigma = 0.05``) so every replica differs;
  ``time_exponent``: the slope of log wall time against log devices over 128 .. 10,000;
- ``downpour_wall_s`` (replicas of 8 machines, half as many shards, 10 steps) and
  ``sandblaster_wall_s`` (one batch), at a tenth of the issue's 200 and 2,000 replicas
  unless ``--full`` (``*_replicas`` says which);
- ``flows_per_s``: the flow model alone on fixed flow sets (ring steps on 1,024 hosts of
  one switch and of a k = 16 fat-tree; random flows among 64 hosts, ~120 at once);
  ``flow_rate_ratio_simgrid``: ours over SimGrid 3.32's max-min kernel (CM02, no factors,
  raw contexts) in flows per wall second on the same flows, the lowest of the three sets
  (``flow_rates_simgrid``: each set's, with the largest finish-time difference over a
  flow's duration; benchmarks/flow_sets.py, decision 035), where Debian's
  ``/usr/bin/python3`` imports ``simgrid``, else null with a note;
- ``peak_rss_mib`` of this process.  Figures are medians (rates) or best-of (walls);
  compare ratios, not absolute rates, on a shared machine.  Each wall comes split into
  ``load_s`` (scenario and topology), ``plan_s`` and ``simulate_s``, with its CPU seconds.

    make bench        # or: python benchmarks/bench_sim.py [--quick]
    python benchmarks/bench_sim.py --against /tmp/old   # flow sets only, this sim/ over another checkout's
    python benchmarks/bench_sim.py --against /tmp/old --dgx 128 1250   # alexnet steps, alternating subprocesses
"""
from __future__ import annotations

import argparse
import gc
import importlib
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import simpy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from clustersim.core.plan import plan  # noqa: E402
from clustersim.core.scenario import scenario_from_dict  # noqa: E402
from sim.engine import CountingEnvironment, simulate  # noqa: E402
from sim.fluid import Fluid  # noqa: E402
from flow_sets import bench_sets, simgrid_side_by_side  # noqa: E402  (benchmarks/, this file's folder)

REPEATS = 5                  # medians of event rates
BEST_OF = 3                  # best-of for the big walls
BARE_PROCESSES = 200         # processes in the bare loop
BARE_TIMEOUTS = 500          # timeouts each: 100,000 events
GPUS_PER_DGX = 8
SCALE_DGX = (16, 128, 1250)  # 128 .. 10,000 GPUs for the time exponent
RING_HOSTS, RING_STEPS = 1024, 4
FAT_TREE_K = 16              # k^3 / 4 = RING_HOSTS hosts, full bisection
RANDOM_HOSTS, RANDOM_FLOWS, RANDOM_LOAD = 64, 2000, 120   # ~RANDOM_LOAD flows at once
FLOW_BYTES = 2.0**20
HOST_LINK_BPS = 12.5e9       # 100 Gb/s per direction


def bare_simpy() -> tuple[int, float]:
    """Events and wall seconds of a loop that does nothing but schedule timeouts."""
    env = CountingEnvironment()

    def proc(env):
        for _ in range(BARE_TIMEOUTS):
            yield env.timeout(1.0)
    for _ in range(BARE_PROCESSES):
        env.process(proc(env))
    t0 = time.perf_counter()
    env.run()
    return env.events_processed, time.perf_counter() - t0


def scenario(topology: str, model: str, batch: int, steps: int, machines: int = 0, training: dict | None = None,
             faults: dict | None = None, **parallel) -> dict:
    cluster = {"topology": topology, **({"machines": machines} if machines else {})}
    return {"cluster": cluster, "model": {"name": model, "batch_size": batch}, "parallel": parallel,
            "training": {"steps": steps, **(training or {})}, **({"faults": faults} if faults else {})}


WORKLOADS = {
    # model parallel with halos, data parallel allreduce: many small compute ops and flows
    "image-80m": scenario("dgx-h100", "distbelief-image-80m", 8, 20, model_parallel=4, replicas=2),
    "speech": scenario("distbelief-2012", "distbelief-speech", 64, 20, machines=8, model_parallel=8),
}


def alexnet(dgx: int) -> dict:
    return scenario("dgx-h100-fat-tree", "alexnet", 64, 1, machines=dgx, replicas=dgx * GPUS_PER_DGX,
                    faults={"slowdown_sigma": 0.05})


def downpour(replicas: int) -> dict:
    """Downpour: replicas of 8 machines each (speech, 8-way), half as many shards, 10 steps."""
    return scenario("distbelief-2012", "distbelief-speech", 64, 10, machines=replicas * 8 + replicas // 2,
                    model_parallel=8, replicas=replicas, ps_shards=replicas // 2, training={"algorithm": "downpour"})


def sandblaster(replicas: int) -> dict:
    """Sandblaster: one batch over one-machine replicas, two work units each."""
    return scenario("distbelief-2012", "mlp-digits", 32, 1, machines=replicas + 10, replicas=replicas, ps_shards=10,
                    training={"algorithm": "sandblaster", "work_units": 2 * replicas})


ASYNC_REPLICAS = {"downpour": (200, 20), "sandblaster": (2000, 200)}   # the size, and a tenth


def run_engine(data: dict) -> dict:
    """Load, plan and simulate: wall seconds of each and of the whole, and CPU seconds."""
    gc.collect()            # the last run's garbage is collected before this run's clock starts
    t0, c0 = time.perf_counter(), time.process_time()
    sc = scenario_from_dict(data, "bench.toml")
    t1 = time.perf_counter()
    p = plan(sc)
    t2 = time.perf_counter()
    res = simulate(p)
    return {"load_s": t1 - t0, "plan_s": t2 - t1, "simulate_s": res.wall_s, "wall_s": time.perf_counter() - t0,
            "cpu_s": time.process_time() - c0, "events": res.sim_events, "sim_time_s": res.sim_time_s}


def event_rates(repeats: int) -> dict:
    """Events per wall second of each workload over the bare loop's, alternating runs."""
    bare, rates = [], {name: [] for name in WORKLOADS}
    for _ in range(repeats):
        events, wall = bare_simpy()
        bare.append(events / wall)
        for name, data in WORKLOADS.items():
            r = run_engine(data)
            rates[name].append(r["events"] / r["simulate_s"])
    bare_rate = statistics.median(bare)
    ratios = {name: statistics.median(v) / bare_rate for name, v in rates.items()}
    return {"bare_simpy_events_per_s": bare_rate, "event_rate_ratios": ratios,
            "event_rate_ratio": min(ratios.values())}


def best_wall(data: dict, best: int) -> dict:
    runs = [run_engine(data) for _ in range(best)]
    return min(runs, key=lambda r: r["wall_s"])


def one_switch_route(a: int, b: int) -> dict:
    return {(f"h{a}", "sw"): 1, ("sw", f"h{b}"): 1}


def fat_tree_route(a: int, b: int, k: int = FAT_TREE_K) -> dict:
    """Links from host a to host b of a k-ary fat-tree (Al-Fares et al., SIGCOMM 2008),
    up by the destination's digits (D-mod-K): aggregation switch by its port, core by its
    edge switch."""
    half = k // 2
    pod, edge, port = b // (half * half), b // half % half, b % half
    src_pod, src_edge = a // (half * half), a // half % half
    up_e, down_e = ("e", src_pod, src_edge), ("e", pod, edge)
    links = [(("h", a), up_e)]
    if up_e != down_e:
        up_a, down_a = ("a", src_pod, port), ("a", pod, port)
        links.append((up_e, up_a))
        if up_a != down_a:
            core = ("c", port, edge)
            links += [(up_a, core), (core, down_a)]
        links.append((down_a, down_e))
    links.append((down_e, ("h", b)))
    return dict.fromkeys(links, 1)


def ring_flows(fluid_env: simpy.Environment, fluid: Fluid, steps: list[dict]):
    """RING_STEPS steps of a ring on RING_HOSTS hosts: each host sends FLOW_BYTES to the
    next (over the links in ``steps``), all at once, the next step when all have arrived."""
    for _ in range(RING_STEPS):
        done = [fluid.start(weights, FLOW_BYTES) for weights in steps]
        yield fluid_env.all_of(done)


def random_flows(env: simpy.Environment, fluid: Fluid, rng: np.random.Generator):
    """RANDOM_FLOWS flows between random hosts, arriving as a Poisson stream at the rate
    that keeps ~RANDOM_LOAD in flight (each alone would take FLOW_BYTES / link).  The
    hosts, routes and gaps are drawn here, before the run is timed, in the stream's order."""
    gap = FLOW_BYTES / HOST_LINK_BPS / RANDOM_LOAD * 4
    draws = []
    for _ in range(RANDOM_FLOWS):
        a, b = rng.choice(RANDOM_HOSTS, 2, replace=False)
        draws.append((one_switch_route(a, b), rng.exponential(gap)))
    return _arrivals(env, fluid, draws)


def _arrivals(env: simpy.Environment, fluid: Fluid, draws: list):
    for route, wait in draws:
        fluid.start(route, FLOW_BYTES)
        yield env.timeout(wait)


FLOW_SETS = {"ring": one_switch_route, "ring_fat_tree": fat_tree_route, "random": one_switch_route}


def flow_rate(kind: str, fluid: type = Fluid) -> tuple[float, float, float]:
    """Flows per wall and per CPU second of the flow model on one fixed flow set, and its
    simulated end."""
    env = simpy.Environment()
    hosts = RANDOM_HOSTS if kind == "random" else RING_HOSTS
    steps = [FLOW_SETS[kind](i, (i + 1) % hosts) for i in range(hosts)]    # every link, for random
    model = fluid(env, {link: HOST_LINK_BPS for weights in steps for link in weights})
    if kind == "random":
        env.process(random_flows(env, model, np.random.default_rng(0)))
        flows = RANDOM_FLOWS
    else:
        env.process(ring_flows(env, model, steps))
        flows = RING_HOSTS * RING_STEPS
    gc.collect()            # a previous run's garbage kept out of this run's timing (decision 042)
    t0, c0 = time.perf_counter(), time.process_time()
    env.run()
    return flows / (time.perf_counter() - t0), flows / (time.process_time() - c0), env.now


def flow_rates(repeats: int) -> dict:
    out = {}
    for kind in FLOW_SETS:
        runs = [flow_rate(kind) for _ in range(repeats)]
        out[kind] = {"flows_per_s": statistics.median(r[0] for r in runs), "sim_end_s": runs[0][2]}
    side = guarded(lambda: simgrid_side_by_side(bench_sets(sys.modules[__name__]), flow_rate, repeats))
    if "error" in side:
        side = {"flow_rate_ratio_simgrid": None, "simgrid_note": f"SimGrid comparison failed: {side['error']}"}
    return {"flows_per_s": out, **side}


def fluid_of(tree: Path) -> type:
    """The ``Fluid`` of another checkout (its own ``sim`` package), for runs side by side."""
    ours = {name: mod for name, mod in sys.modules.items() if name == "sim" or name.startswith("sim.")}
    for name in ours:
        del sys.modules[name]
    sys.path.insert(0, str(tree))
    try:
        return importlib.import_module("sim.fluid").Fluid
    finally:
        sys.path.remove(str(tree))
        for name in [n for n in sys.modules if n == "sim" or n.startswith("sim.")]:
            del sys.modules[name]
        sys.modules.update(ours)


def flow_rates_against(tree: Path, repeats: int) -> dict:
    """Each flow set with this checkout's fluid and with ``tree``'s, interleaved (A B, B A,
    ... after one unmeasured run of each): medians of flows per wall and CPU second, their
    ratios (this over that), and both simulated ends."""
    fluids = {"this": Fluid, "that": fluid_of(tree)}
    out = {}
    for kind in FLOW_SETS:
        runs = {"this": [], "that": []}
        for i in range(-1, repeats):
            for side in (("this", "that") if i % 2 else ("that", "this")):
                r = flow_rate(kind, fluids[side])
                if i >= 0:
                    runs[side].append(r)
        med = {side: [statistics.median(r[i] for r in rs) for i in (0, 1)] for side, rs in runs.items()}
        out[kind] = {"flows_per_s": med["this"][0], "flows_per_s_against": med["that"][0],
                     "wall_ratio": med["this"][0] / med["that"][0], "cpu_ratio": med["this"][1] / med["that"][1],
                     "sim_end_s": runs["this"][0][2], "sim_end_s_against": runs["that"][0][2]}
    return {"against": str(tree), "repeats": repeats, "flow_sets": out}


def walls_against(tree: Path, dgx_counts: list[int], repeats: int) -> dict:
    """Alexnet steps (``alexnet(dgx)``) with this checkout and with ``tree``, each run in a
    subprocess of its own, alternating (A B, B A, ...): medians of wall, CPU and the split,
    their ratios (that over this: > 1 is faster here), and whether the simulated times agree."""
    this = Path(__file__).resolve().parents[1]
    out = {}
    for dgx in dgx_counts:
        runs: dict[str, list[dict]] = {"this": [], "that": []}
        for i in range(repeats):
            for side in (("that", "this") if i % 2 == 0 else ("this", "that")):
                root = this if side == "this" else tree.resolve()
                # that tree's packages, imported first, then this file's bench (its path insert comes too late);
                # its topology files too: an editable install maps clustersim.builtin_topologies to this
                # checkout's topologies/ whatever sys.path says
                code = ("import json, sys, importlib.util as u; sys.path.insert(0, sys.argv[1]); import clustersim; "
                        "s = u.spec_from_file_location('clustersim.builtin_topologies', sys.argv[1] + "
                        "'/topologies/__init__.py', submodule_search_locations=[sys.argv[1] + '/topologies']); "
                        "m = u.module_from_spec(s); s.loader.exec_module(m); sys.modules[s.name] = m; "
                        "import clustersim.core.plan, clustersim.core.scenario, sim.engine, sim.fluid; "
                        "sys.path.insert(1, sys.argv[2]); import bench_sim as b; "
                        "print(json.dumps(b.run_engine(b.alexnet(int(sys.argv[3])))))")
                done = subprocess.run([sys.executable, "-c", code, str(root), str(this / "benchmarks"), str(dgx)],
                                      cwd=root, capture_output=True, text=True, check=True)
                runs[side].append(json.loads(done.stdout.strip().splitlines()[-1]))
        med = {side: {k: statistics.median(r[k] for r in rs) for k in ("wall_s", "cpu_s", "load_s", "plan_s",
                                                                        "simulate_s", "events")}
               for side, rs in runs.items()}
        out[dgx] = {"this": med["this"], "that": med["that"],
                    "wall_ratio": med["that"]["wall_s"] / med["this"]["wall_s"],
                    "cpu_ratio": med["that"]["cpu_s"] / med["this"]["cpu_s"],
                    "sim_time_equal": {r["sim_time_s"] for r in runs["this"]} == {r["sim_time_s"] for r in runs["that"]}}
    return {"against": str(tree), "repeats": repeats, "alexnet": out}


def time_exponent(points: list[tuple[int, float]]) -> float:
    """Least-squares slope of log(wall) on log(devices)."""
    xs = [math.log(d) for d, _ in points]
    ys = [math.log(w) for _, w in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def guarded(fn, *args) -> dict:
    """A figure, or the one-line reason it could not be measured (the bench goes on)."""
    try:
        return fn(*args)
    except Exception as exc:           # noqa: BLE001  (a bench reports, it does not stop)
        return {"error": f"{type(exc).__name__}: {exc}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=REPEATS)
    ap.add_argument("--best", type=int, default=BEST_OF)
    ap.add_argument("--quick", action="store_true", help="skip the 10,000-GPU, Downpour and Sandblaster runs")
    ap.add_argument("--full", action="store_true",
                    help="Downpour and Sandblaster at the issue's size (200 and 2,000 replicas; minutes each here)")
    ap.add_argument("--against", type=Path, metavar="DIR",
                    help="only the flow sets, side by side with the sim/ of the checkout at DIR")
    ap.add_argument("--dgx", type=int, nargs="+", metavar="N",
                    help="with --against: alexnet steps on N DGX instead of the flow sets")
    args = ap.parse_args()
    if args.dgx and not args.against:
        ap.error("--dgx: needs --against DIR (the checkout to run side by side)")
    if args.against and args.dgx:
        print(json.dumps(walls_against(args.against, args.dgx, args.repeats)))
        return
    if args.against:
        print(json.dumps(flow_rates_against(args.against, args.repeats)))
        return
    out: dict = {}
    out.update(event_rates(args.repeats))
    scale = SCALE_DGX[:-1] if args.quick else SCALE_DGX
    walls = {dgx: best_wall(alexnet(dgx), args.best if dgx < 1000 else max(1, args.best - 2)) for dgx in scale}
    for dgx, suffix in ((128, "1024"), (1250, "10000")):
        if dgx in walls:
            for key in ("wall_s", "cpu_s", "load_s", "plan_s", "simulate_s", "events"):
                out[f"{key}_{suffix}"] = walls[dgx][key]
    out["time_exponent"] = time_exponent([(dgx * GPUS_PER_DGX, w["wall_s"]) for dgx, w in walls.items()])
    if not args.quick:
        for name, make in (("downpour", downpour), ("sandblaster", sandblaster)):
            replicas = ASYNC_REPLICAS[name][0 if args.full else 1]
            r = guarded(run_engine, make(replicas))
            out[f"{name}_wall_s"] = r.get("wall_s", r.get("error"))
            out[f"{name}_replicas"] = replicas
    out.update(flow_rates(args.repeats))
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out))


if __name__ == "__main__":
    main()
