"""Matplotlib figures: a step's Gantt, sweeps, topologies, validation.  Figures are
written to a temporary file and renamed into place, so a failed run never leaves half a
PNG.  Imported only when a plot is drawn."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from clustersim.core.plan import Plan  # noqa: E402
from clustersim.core.trace import Trace, replace_atomic  # noqa: E402
from clustersim.report import seconds, si  # noqa: E402

PHASE_COLOURS = {"fwd": "#4c72b0", "bwd": "#dd8452", "update": "#55a868", "allreduce": "#c44e52",
                 "push": "#8172b3", "fetch": "#937860", "activation": "#da8bc3", "halo": "#8c8c8c",
                 "gradient": "#ccb974", "reduction": "#64b5cd", "stage": "#da8bc3", "wait": "#bbbbbb"}


def formats() -> list[str]:
    """The extensions (no dot) a figure can be saved as: what the Agg canvas writes
    itself or hands to another backend (pdf, svg, ...); pgf only where its TeX is installed
    (matplotlib lists it anyway and fails at the end of the run)."""
    import shutil

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    return sorted(f for f in FigureCanvasAgg.get_supported_filetypes()
                  if f != "pgf" or shutil.which(matplotlib.rcParams["pgf.texsystem"]))


def save_figure(fig, path: str | Path) -> None:
    try:
        replace_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight"))
    finally:
        plt.close(fig)


def gantt_rows(spans: list, p: Plan, max_rows: int) -> dict[str, list]:
    """The chart's rows, in order, and their spans: the devices that ran something, then
    the busiest transfers; up to a third of ``max_rows`` go to transfers where there are
    more rows than that, so that a step's communication shows however many devices ran."""
    rows: dict[str, list] = defaultdict(list)
    for s in spans:
        rows[s.where].append(s)
    devices = [d for row in p.devices for d in row] + list(p.ps.devices if p.ps else [])
    busy = [d for d in dict.fromkeys(devices) if d in rows]
    xfers = sorted((w for w in rows if "->" in w), key=lambda w: -sum(s.duration_s for s in rows[w]))
    order = busy[:max_rows - min(len(xfers), max_rows // 3)]
    order += xfers[:max_rows - len(order)]
    return {w: rows[w] for w in order}


def plot_step(trace: Trace, p: Plan, summary: dict, path: str | Path, step: int | None = None,
              max_rows: int = 24) -> None:
    """Gantt of one step (devices, then the busiest transfers) above device and link utilisation.
    A stalled run (``stalled_at_s`` in the summary, no step time) shows its last finished step."""
    steps = trace.step_ends
    step = (len(steps) - 1 if steps else 0) if step is None else step
    spans = [s for s in trace.spans if s.step == step]
    t0 = min((s.start_s for s in spans), default=0.0)
    rows = gantt_rows(spans, p, max_rows)
    order = list(rows)
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(11, 3 + 0.28 * len(order)),
                                  gridspec_kw={"height_ratios": [max(len(order), 3), 4]})
    span = max((s.end_s for s in spans), default=t0) - t0
    scale, unit = (1e3, "ms") if span >= 1e-3 else (1e6, "us")
    for y, where in enumerate(order):
        for s in rows[where]:
            ax.barh(y, (s.end_s - s.start_s) * scale, left=(s.start_s - t0) * scale, height=0.7,
                    color=PHASE_COLOURS.get(s.phase, "#999999"), edgecolor="none")
    ax.set_yticks(range(len(order)), order, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(f"{unit} into the step")
    ax.set_title(f"{summary['name']}: step {step}, " + (f"STALLED at {seconds(summary['stalled_at_s'])}"
                 if "stalled_at_s" in summary else f"{seconds(summary['step_time_s'])} per step"))
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for ph, c in PHASE_COLOURS.items()
               if any(s.phase == ph for s in spans)]
    ax.legend(handles, [ph for ph in PHASE_COLOURS if any(s.phase == ph for s in spans)],
              fontsize=7, loc="lower right", ncols=4)
    util = summary["device_utilisation"]
    links = summary["link_utilisation"]
    names = list(util)[:16] + list(links)[:8]
    values = [util[n] for n in list(util)[:16]] + [links[n] for n in list(links)[:8]]
    ax2.bar(range(len(names)), [v * 100 for v in values],
            color=["#4c72b0"] * min(len(util), 16) + ["#c44e52"] * min(len(links), 8))
    ax2.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=6)
    ax2.set_ylabel("busy %")
    ax2.set_title("device utilisation (blue) and busiest links (red)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def sweep_series(points: list[dict], keys: list[str]) -> tuple[list[str], list[dict]]:
    """The first key's values (x tick labels) and a series per combination of the other
    keys' values: ``label`` (``"model.batch_size=32"``, empty for one key), ``x`` (tick
    positions), ``samples_per_s``, ``cost_usd`` (NaN where missing), and ``speedup`` and
    ``efficiency`` (speedup / device ratio) against the series' first point: only points
    with the same other values are compared.  ``efficiency`` is None where the devices do
    not change along a series (it would only repeat the speedup)."""
    key, others = keys[0], keys[1:]
    ticks = list(dict.fromkeys(_text(p[key]) for p in points))
    groups: dict[str, list[dict]] = {}
    for p in points:
        groups.setdefault(", ".join(f"{k}={_text(p[k])}" for k in others), []).append(p)
    series = []
    for label, pts in groups.items():
        first = pts[0]
        devices = [p.get("devices", 1) for p in pts]
        speedup = [p["samples_per_s"] / first["samples_per_s"] if first["samples_per_s"] else 0.0 for p in pts]
        series.append({"label": label, "x": [ticks.index(_text(p[key])) for p in pts],
                       "samples_per_s": [p["samples_per_s"] for p in pts], "speedup": speedup,
                       "efficiency": None if len(set(devices)) == 1 else
                       [s * devices[0] / d for s, d in zip(speedup, devices)],
                       "cost_usd": [p.get("cost_usd", float("nan")) for p in pts]})
    return ticks, series


def _text(value) -> str:
    """A varied value as a label: a string as it is, the rest as JSON (``true``, ``[1, 2]``)."""
    return value if isinstance(value, str) else json.dumps(value, default=str)


def plot_sweep(points: list[dict], keys: list[str], path: str | Path) -> None:
    """Throughput and speedup against the first varied key, a line per combination of the
    other keys' values (``sweep_series``); parallel efficiency where the devices change
    along a line; cost to train where the points have it."""
    ticks, series = sweep_series(points, keys)
    several = len(series) > 1
    panels = 3 if any("cost_usd" in p for p in points) else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
    ax = axes[0]
    ax2 = ax.twinx()
    for n, line in enumerate(series):
        colour = f"C{n}"
        ax.plot(line["x"], line["samples_per_s"], marker="o", color=colour, label=line["label"] or None)
        ax2.plot(line["x"], line["speedup"], marker="s", color=colour, linestyle="--")
        if line["efficiency"] is not None:
            axes[1].plot(line["x"], line["efficiency"], marker="o", color=colour)
        if panels == 3:
            axes[2].plot(line["x"], line["cost_usd"], marker="o", color=colour)
    ax.set_ylabel("samples / s")
    ax2.set_ylabel("speedup against the line's first point (dashed)")
    axes[1].set_ylabel("parallel efficiency (speedup / device ratio)")
    axes[1].set_ylim(bottom=0)
    if all(line["efficiency"] is None for line in series):
        axes[1].text(0.5, 0.5, f"the devices do not change along {keys[0]}", ha="center", va="center",
                     transform=axes[1].transAxes, fontsize=8)
    if panels == 3:
        axes[2].set_ylabel("cost to train (USD)")
    for a in axes:
        a.set_xticks(range(len(ticks)), ticks)
        a.set_xlabel(keys[0])
    if several:
        ax.legend(fontsize=7)
    fig.suptitle(f"sweep over {keys[0]}" + (f", a line per {', '.join(keys[1:])}" if several else ""))
    fig.tight_layout()
    save_figure(fig, path)


def plot_topology(topo, path: str | Path) -> None:
    import networkx as nx
    g = topo.graph
    layer_of = {"gpu": 0, "cpu": 1, "pcie_switch": 1, "nvswitch": 0, "nic": 2, "switch": 3}
    for n, data in g.nodes(data=True):
        data["layer"] = layer_of[data["kind"]] + (1 if n.startswith(("agg", "spine")) else 0) \
            + (2 if n.startswith("core") else 0)
    pos = nx.multipartite_layout(g, subset_key="layer", align="horizontal")
    colours = {"gpu": "#55a868", "cpu": "#4c72b0", "pcie_switch": "#8172b3", "nvswitch": "#c44e52",
               "nic": "#dd8452", "switch": "#937860"}
    fig, ax = plt.subplots(figsize=(min(4 + 0.08 * len(g), 40), 6))
    nx.draw_networkx_edges(g, pos, ax=ax, alpha=0.3, width=0.6)
    for kind, c in colours.items():
        nodes = [n for n, d in g.nodes(data=True) if d["kind"] == kind]
        nx.draw_networkx_nodes(g, pos, nodelist=nodes, node_color=c, node_size=40, ax=ax, label=kind)
    if len(g) <= 60:
        nx.draw_networkx_labels(g, pos, font_size=6, ax=ax)
    ax.legend(fontsize=7)
    ax.set_title(f"{topo.name}: {len(g)} devices, {g.number_of_edges()} links")
    ax.axis("off")
    save_figure(fig, path)


def plot_validation(result: dict, path: str | Path) -> None:
    """The predicted timeline above a measured one (two steps from the middle of the
    simulation and of the last run, on one time axis), then predicted against measured
    seconds per step by phase and for the whole step."""
    lines = result.get("timelines", {})
    names = list(result["phases"]) + ["step"]
    rows = list(dict.fromkeys(w for tl in lines.values() for w, *_ in tl if "->" not in w))
    rows += sorted({w for tl in lines.values() for w, *_ in tl if "->" in w})
    panels = [(k, lines[k]) for k in ("predicted", "measured") if lines.get(k)]
    fig, axes = plt.subplots(len(panels) + 1, 1, figsize=(10, 3.5 + len(panels) * (1 + 0.25 * len(rows))),
                             gridspec_kw={"height_ratios": [max(len(rows), 2)] * len(panels) + [5]})
    axes = list(axes) if panels else [axes]
    end = max((start + dur for _, tl in panels for _w, _ph, start, dur in tl), default=0.0)
    scale, unit = (1e3, "ms") if end >= 1e-3 else (1e6, "us")
    for ax, (label, tl) in zip(axes, panels):
        for where, phase, start, dur in tl:
            ax.barh(rows.index(where), dur * scale, left=start * scale, height=0.7,
                    color=PHASE_COLOURS.get(phase, "#999999"), edgecolor="none")
        ax.set_yticks(range(len(rows)), rows, fontsize=7)
        ax.set_xlim(0, end * scale)
        ax.invert_yaxis()
        ax.set_title(f"{label}: two steps", fontsize=9)
        ax.set_xlabel(unit, fontsize=8)
    if panels:
        shown = {ph for _, tl in panels for _w, ph, *_ in tl}
        axes[0].legend([plt.Rectangle((0, 0), 1, 1, color=c) for ph, c in PHASE_COLOURS.items() if ph in shown],
                       [ph for ph in PHASE_COLOURS if ph in shown], fontsize=7, loc="lower right", ncols=4)
    pred = [result["phases"][n]["predicted_s"] for n in names[:-1]] + [result["predicted_step_time_s"]]
    meas = [result["phases"][n]["measured_s"] for n in names[:-1]] + [result["measured_step_time_s"]]
    ax = axes[-1]
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [v * 1e3 for v in pred], width=0.4, label="predicted (simulated)")
    ax.bar([x + 0.2 for x in xs], [v * 1e3 for v in meas], width=0.4, label="measured (executed)")
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("ms per step")
    ax.set_title(f"{result['scenario']}: step error {result['error_pct']:+.1f}% "
                 f"(measurement spread {result['spread_pct']:.1f}%)", fontsize=9)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def plot_published(rows: list[dict], path: str | Path) -> None:
    """Predicted against published, per unit a panel, the diagonal and +-15% marked."""
    units = sorted({r["unit"] for r in rows})
    fig, axes = plt.subplots(1, len(units), figsize=(5 * len(units), 4.5), squeeze=False)
    for ax, unit in zip(axes[0], units):
        pts = [r for r in rows if r["unit"] == unit]
        hi = max(max(r["predicted"], r["published"]) for r in pts) * 1.15
        lo = min(min(r["predicted"], r["published"]) for r in pts) / 1.15
        ax.plot([lo, hi], [lo, hi], color="black", lw=0.8)
        ax.fill_between([lo, hi], [lo / 1.15, hi / 1.15], [lo * 1.15, hi * 1.15], color="grey", alpha=0.15,
                        label="within 15%")
        for r in pts:
            ax.scatter(r["published"], r["predicted"], marker="s" if r["fitted"] else "o")
            ax.annotate(r["name"], (r["published"], r["predicted"]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"published ({unit})")
        ax.set_ylabel(f"predicted ({unit})")
        ax.legend(loc="upper left", fontsize=7)
    fig.suptitle("clustersim against published measurements")
    fig.tight_layout()
    save_figure(fig, path)
