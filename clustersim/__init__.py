"""clustersim: predict how fast a partitioned network trains on a cluster, and check it.

``clustersim.core`` is what both runners share (scenario, topology, models, the Plan,
the Trace, metrics); ``sim`` and ``executor`` are the two runners; ``clustersim.api``
holds the verbs a script calls; ``clustersim.cli`` is the command.
"""
from __future__ import annotations

VERBS = ("load", "simulate", "sweep", "search", "execute", "validate", "validate_speedup", "suite_speedup",
         "calibrate", "calibrate_gpus", "collective", "combine", "published", "import_onnx", "ranks_needed",
         "save_figure", "write_atomic", "Result", "ConfigError")


def __getattr__(name: str):
    """The API's verbs, imported on first use: ``sim`` and ``executor`` import
    ``clustersim.core`` without loading the API (or matplotlib, or mpi4py)."""
    if name in VERBS:
        from clustersim import api
        return getattr(api, name)
    raise AttributeError(f"module 'clustersim' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(VERBS))
