"""Training algorithms: who talks to whom, and when, around the per-replica step graph.

Each is a simpy process body ``f(engine, steps)`` that runs the steps and appends each
step's end time to ``engine.trace.step_ends``.
"""
from .sync import run_sync

ALGORITHMS = {"sync": run_sync}
