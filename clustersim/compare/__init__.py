"""Predictions against runs: validation (a simulated Trace against an executed one) and
co-simulation (the executor's real math on the simulator's clock)."""
