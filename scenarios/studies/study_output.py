"""What every study does with its results: the points as JSON and the figure, each written
whole (``clustersim.write_atomic`` makes the folder), and the axis of worker counts that
several studies share."""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import clustersim


def save(data, json_path: Path, plot: Callable, png_path: Path) -> None:
    """``data`` to ``json_path``, ``plot(data, png_path)``, and a line saying so."""
    clustersim.write_atomic(json_path, json.dumps(data, indent=1))
    plot(data, png_path)
    print(f"wrote {json_path} and {png_path}")


def log2_axis(ax, ticks: Sequence[int], label: str) -> None:
    """Worker or machine counts on a log2 x axis, each count a tick; grid and legend."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(ticks), [str(t) for t in ticks])
    ax.set_xlabel(label)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
