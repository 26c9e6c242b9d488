"""Training algorithms: who talks to whom, and when, around the per-replica step graph.

Each is a simpy process body ``f(engine, steps)`` that runs the steps and appends each
step's end time to ``engine.trace.step_ends``.
"""
from .downpour import run_async
from .layerwise import run_layerwise
from .local import run_local
from .sandblaster import run_sandblaster
from .sync import run_sync

ALGORITHMS = {"sync": run_sync, "downpour": run_async, "dcasgd": run_async, "ssp": run_async,
              "local": run_local, "sandblaster": run_sandblaster,
              "layerwise": run_layerwise}
