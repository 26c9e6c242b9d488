"""Measure a host (CPU cores, MPI, GPUs) with the executor's own kernels and write it as
a topology the simulator reads."""
