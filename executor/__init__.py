"""The executor: runs a Plan for real on MPI ranks (NumPy or CuPy) and emits a Trace.
Never imports the simulator."""
