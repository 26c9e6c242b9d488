"""Simulator speed: engine events per wall second next to a bare simpy loop measured in
the same run, and the wall time of one synchronous step of 1,024 GPUs (128 DGX H100
nodes on a fat-tree).  Medians of REPEATS runs; machines here are shared and noisy, so
compare the ratio, not the absolute rates.

    make bench                      # or: python benchmarks/bench_sim.py --repeats 5 --json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from sim.engine import CountingEnvironment, simulate
from clustersim.core.plan import plan
from clustersim.core.scenario import scenario_from_dict

REPEATS = 5
BARE_PROCESSES = 200         # processes in the bare loop
BARE_TIMEOUTS = 500          # timeouts each: 100,000 events


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


def scenario(topology: str, model: str, batch: int, steps: int, machines: int = 0, **parallel) -> dict:
    cluster = {"topology": topology, **({"machines": machines} if machines else {})}
    return {"cluster": cluster, "model": {"name": model, "batch_size": batch},
            "parallel": parallel, "training": {"steps": steps}}


WORKLOADS = {
    # model parallel with halos, data parallel allreduce: many small compute ops and flows
    "image-80m mp4 x2 replicas, 20 steps": scenario("dgx-h100", "distbelief-image-80m", 8, 20,
                                                      model_parallel=4, replicas=2),
    "speech mp8 on distbelief-2012, 20 steps": scenario("distbelief-2012", "distbelief-speech", 64, 20,
                                                         machines=8, model_parallel=8),
}
BIG = scenario("dgx-h100-fat-tree", "alexnet", 64, 1, machines=128, replicas=1024)


def run_engine(data: dict) -> dict:
    t0 = time.perf_counter()
    p = plan(scenario_from_dict(data, "bench.toml"))
    t1 = time.perf_counter()
    res = simulate(p)
    return {"plan_s": t1 - t0, "simulate_s": res.wall_s, "events": res.sim_events,
            "step_time_s": res.sim_time_s / res.steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=REPEATS)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out: dict = {}
    bare = [bare_simpy() for _ in range(args.repeats)]
    bare_rate = statistics.median(e / w for e, w in bare)
    out["bare_simpy_events_per_s"] = bare_rate
    for name, data in WORKLOADS.items():
        runs = [run_engine(data) for _ in range(args.repeats)]
        rate = statistics.median(r["events"] / r["simulate_s"] for r in runs)
        out[name] = {"events": runs[0]["events"], "events_per_s": rate, "ratio_to_bare": rate / bare_rate}
    big = [run_engine(BIG) for _ in range(max(1, args.repeats // 2))]
    out["sync step, 1024 GPUs (128 DGX H100, fat-tree), alexnet"] = {
        "plan_s": statistics.median(r["plan_s"] for r in big),
        "simulate_s": statistics.median(r["simulate_s"] for r in big),
        "events": big[0]["events"], "predicted_step_s": big[0]["step_time_s"]}
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"bare simpy loop: {bare_rate:,.0f} events/s (median of {args.repeats})")
    for name in WORKLOADS:
        r = out[name]
        print(f"{name}: {r['events_per_s']:,.0f} events/s over {r['events']:,} events "
              f"= {r['ratio_to_bare']:.2f} x bare simpy")
    b = out["sync step, 1024 GPUs (128 DGX H100, fat-tree), alexnet"]
    print(f"one sync step of 1,024 GPUs (alexnet, ring allreduce over 128 DGX H100 on a fat-tree): "
          f"plan {b['plan_s']:.2f} s + simulate {b['simulate_s']:.2f} s wall, {b['events']:,} events, "
          f"predicted step {b['predicted_step_s'] * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
