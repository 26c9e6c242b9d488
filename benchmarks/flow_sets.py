"""Flow sets through the flow model and through SimGrid's max-min kernel, side by side (issue 18).

A flow set is a list of ``(at, route, bytes)``: ``at`` a start time (mode "times") or a
ring step (mode "steps": a step's flows all at once, the next step when all have
arrived), ``route`` the flow's links as ``{link: 1}``.  ``run_ours`` runs one through
``sim.fluid.Fluid`` and records each flow's finish from its event; ``run_simgrid`` writes
it as JSON and runs ``simgrid_flows.py`` under Debian's ``/usr/bin/python3`` (SimGrid is in
no pip extra, and its dist-packages must stay out of the venv).  ``simgrid_side_by_side``
is what ``bench_sim`` merges: flows per wall second of ours (``bench_sim.flow_rate``'s
figure) over SimGrid's, medians of alternating runs, and how far the finish times differ.
Decision 035 has the figures.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable, Hashable
from pathlib import Path

import numpy as np
import simpy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sim.fluid import Fluid, timeout_at  # noqa: E402

SIMGRID_PYTHON = "/usr/bin/python3"      # Debian's, where python3-simgrid installs
SCRIPT = Path(__file__).with_name("simgrid_flows.py")
# The bench times SimGrid with raw contexts: the binding's default, an OS thread per actor,
# costs each hand-over a thread switch; raw contexts give the same floats
# (tests/test_simgrid_agreement.py), so what is timed is the kernel's speed (decision 035).
BENCH_CONFIG = ("contexts/factory:raw",)

Flow = tuple[float, dict, float]         # (start_s or step, {link: 1}, bytes)


def simgrid_missing(python: str = SIMGRID_PYTHON) -> str | None:
    """None where ``python`` imports simgrid, else why not, in one line."""
    try:
        done = subprocess.run([python, "-c", "import simgrid"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{python} does not run: {exc}"
    if done.returncode:
        return f"{python} cannot import simgrid (Debian's python3-simgrid is not installed)"
    return None


def as_json(flows: list[Flow], capacity: dict[Hashable, float], mode: str) -> dict:
    """The set in simgrid_flows.py's format: links named ``L0``, ``L1``, ... in first use."""
    names: dict[Hashable, str] = {}
    for _, route, _ in flows:
        for link in route:
            names.setdefault(link, f"L{len(names)}")
    return {"mode": mode, "links": {name: capacity[link] for link, name in names.items()},
            "flows": [[at, [names[link] for link in route], size] for at, route, size in flows]}


def run_simgrid(flows: list[Flow], capacity: dict[Hashable, float], mode: str,
                python: str = SIMGRID_PYTHON, config: tuple[str, ...] = ()) -> tuple[float, list[float], float]:
    """SimGrid's wall seconds of the run alone, each flow's finish time, and the run's CPU
    seconds (SimGrid's Python binding runs actors as threads: its wall clock suffers more
    from a busy host than its CPU clock).  Raises RuntimeError with the script's last
    line of stderr where it fails.  ``config``: further SimGrid items (``"contexts/factory:raw"``)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        try:
            json.dump(as_json(flows, capacity, mode), f)
            f.close()
            done = subprocess.run([python, str(SCRIPT), f.name, *config], capture_output=True, text=True,
                                  timeout=600)
        finally:
            Path(f.name).unlink()
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{SCRIPT.name} exited {done.returncode}: {last}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return out["wall_s"], out["finish_s"], out["cpu_s"]


def run_ours(flows: list[Flow], capacity: dict[Hashable, float], mode: str) -> tuple[list[float], float]:
    """Each flow's finish in the flow model, and the simulated end."""
    env = simpy.Environment()
    model = Fluid(env, dict(capacity))
    finish = [float("nan")] * len(flows)

    def started(i: int) -> simpy.Event:
        at, route, size = flows[i]
        event = model.start(route, size)
        event.callbacks.append(lambda _e: finish.__setitem__(i, env.now))
        return event

    def steps():
        for step in sorted({f[0] for f in flows}):
            yield env.all_of([started(i) for i, f in enumerate(flows) if f[0] == step])

    def times():
        for i in sorted(range(len(flows)), key=lambda i: flows[i][0]):
            if flows[i][0] > env.now:
                yield timeout_at(env, flows[i][0])
            started(i)

    env.process(steps() if mode == "steps" else times())
    env.run()
    return finish, env.now


def rel_diffs(flows: list[Flow], ours: list[float], theirs: list[float], mode: str) -> list[float]:
    """Each flow's difference of finish times over its duration (SimGrid's: from its start,
    or from its step's start, the previous step's last finish)."""
    begin: dict[float, float] = {}
    if mode == "steps":
        last = 0.0
        for step in sorted({f[0] for f in flows}):
            begin[step] = last
            last = max(t for f, t in zip(flows, theirs) if f[0] == step)
    return [abs(a - b) / (b - (begin[at] if mode == "steps" else at)) for (at, _, _), a, b in zip(flows, ours, theirs)]


def max_rel_diff(flows: list[Flow], ours: list[float], theirs: list[float], mode: str) -> float:
    """The largest of ``rel_diffs``."""
    return max(rel_diffs(flows, ours, theirs, mode))


class _Recorder:
    """Stands in for ``Fluid`` under bench_sim's ``flow_rate``: keeps the capacities and
    notes each flow started (now, route, bytes), finishing it at once, so the generators
    draw what they always do."""

    def __init__(self, env: simpy.Environment, capacity: dict) -> None:
        self.env, self.capacity, self.flows = env, dict(capacity), []

    def start(self, weights: dict, amount: float) -> simpy.Event:
        self.flows.append((self.env.now, dict(weights), amount))
        return self.env.event().succeed()


def bench_sets(bench) -> dict[str, tuple[list[Flow], dict, str]]:
    """bench_sim's flow sets (``bench``: the bench_sim module) as explicit lists, recorded
    from its own ``flow_rate`` run over a ``_Recorder``: kind -> (flows, capacity, mode);
    a ring's flows by step (``RING_HOSTS`` flows a step), the random set's by start time."""
    out = {}
    for kind in bench.FLOW_SETS:
        made: list[_Recorder] = []
        bench.flow_rate(kind, lambda env, capacity: made.append(_Recorder(env, capacity)) or made[-1])
        rec = made[0]
        if kind == "random":
            out[kind] = (rec.flows, rec.capacity, "times")
        else:
            out[kind] = ([(i // bench.RING_HOSTS, w, b) for i, (_, w, b) in enumerate(rec.flows)], rec.capacity,
                         "steps")
    return out


def simgrid_side_by_side(sets: dict[str, tuple[list[Flow], dict, str]], flow_rate: Callable, repeats: int,
                         python: str = SIMGRID_PYTHON, config: tuple[str, ...] = BENCH_CONFIG) -> dict:
    """Per set, ``flow_rate(kind)`` (flows per wall second, per CPU second, simulated end) and
    SimGrid's, ``repeats`` of each alternating (ours first on even runs), medians; ``ratio``
    is ours over SimGrid's per wall second (``cpu_ratio`` per CPU second),
    ``flow_rate_ratio_simgrid`` the lowest ``ratio``.  ``config``: as ``run_simgrid``'s.
    Raises ValueError where our recorded run ends elsewhere than ``flow_rate``'s (the sets
    would not be the same flows)."""
    missing = simgrid_missing(python)
    if missing:
        return {"flow_rate_ratio_simgrid": None, "simgrid_note": f"SimGrid comparison skipped: {missing}"}
    per_set = {}
    for kind, (flows, capacity, mode) in sets.items():
        ours, theirs = [], []
        for i in range(repeats):
            for side in (("ours", "simgrid") if i % 2 == 0 else ("simgrid", "ours")):
                if side == "ours":
                    ours.append(flow_rate(kind))
                else:
                    wall, finish_sg, cpu = run_simgrid(flows, capacity, mode, python, config)
                    theirs.append((len(flows) / wall, len(flows) / cpu))
        finish, end = run_ours(flows, capacity, mode)
        if end != ours[0][2]:
            raise ValueError(f"{kind}: the recorded set ends at {end!r} s, flow_rate's at {ours[0][2]!r} s")
        (wall_ours, cpu_ours), (wall_sg, cpu_sg) = ([statistics.median(r[k] for r in runs) for k in (0, 1)]
                                                     for runs in (ours, theirs))
        per_set[kind] = {"ours_flows_per_s": wall_ours, "simgrid_flows_per_s": wall_sg,
                         "ratio": wall_ours / wall_sg, "cpu_ratio": cpu_ours / cpu_sg,
                         "max_finish_rel_diff": max_rel_diff(flows, finish, finish_sg, mode)}
    return {"flow_rate_ratio_simgrid": min(s["ratio"] for s in per_set.values()), "flow_rates_simgrid": per_set,
            "simgrid_note": f"SimGrid 3.32 CM02, no factors, via {python} {' '.join(config)}; "
                            f"medians of {repeats} alternating runs"}


def random_tree_set(rng: np.random.Generator, switches: int, hosts: int, flows: int,
                    mean_gap_s: float) -> tuple[list[Flow], dict]:
    """Random flows on a random tree: switch k > 0 hangs under a random earlier one, each
    host under a random switch; both directions of every edge a link of its own random
    capacity (1-100 GB/s); flows between random host pairs along the tree's one path, random
    sizes (1 B - 100 MB, log-uniform), Poisson arrivals.  Returns (flows, capacity)."""
    parent = {("s", k): ("s", int(rng.integers(k))) for k in range(1, switches)}
    parent.update({("h", h): ("s", int(rng.integers(switches))) for h in range(hosts)})
    capacity = {}
    for child, up in parent.items():
        capacity[(child, up)] = float(rng.uniform(1e9, 1e11))
        capacity[(up, child)] = float(rng.uniform(1e9, 1e11))

    def to_root(node):
        path = [node]
        while path[-1] in parent:
            path.append(parent[path[-1]])
        return path

    out, now = [], 0.0
    for _ in range(flows):
        a, b = rng.choice(hosts, 2, replace=False)
        up, down = to_root(("h", int(a))), to_root(("h", int(b)))
        while len(up) > 1 and len(down) > 1 and up[-2] == down[-2]:     # drop the shared part above the meeting point
            up, down = up[:-1], down[:-1]
        links = list(zip(up, up[1:])) + [(v, u) for u, v in reversed(list(zip(down, down[1:])))]
        out.append((now, dict.fromkeys(links, 1), float(round(10 ** rng.uniform(0, 8)))))
        now += float(rng.exponential(mean_gap_s))
    return out, capacity


def tree_agreement(trees: int, first_seed: int = 1000, python: str = SIMGRID_PYTHON) -> dict:
    """The issue's agreement check on ``trees`` random trees (seeds from ``first_seed``):
    flows, how many finish at the identical float and within 1e-9 of their duration, the
    largest difference over a duration."""
    diffs, identical = [], 0
    for seed in range(first_seed, first_seed + trees):
        rng = np.random.default_rng(seed)
        flows, cap = random_tree_set(rng, switches=int(rng.integers(2, 10)), hosts=int(rng.integers(4, 16)),
                                     flows=int(rng.integers(5, 30)), mean_gap_s=2e-4)
        ours, _ = run_ours(flows, cap, "times")
        _, theirs, _ = run_simgrid(flows, cap, "times", python)
        diffs += rel_diffs(flows, ours, theirs, "times")
        identical += sum(a == b for a, b in zip(ours, theirs))
    return {"trees": trees, "flows": len(diffs), "identical": identical,
            "within_1e-9": sum(d <= 1e-9 for d in diffs), "max_rel_diff": max(diffs)}
