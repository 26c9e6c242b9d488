"""clustersim's executor: runs a Plan for real (MPI ranks, NumPy or CuPy).  Arrives with
the real-executor issue; the simulator never imports it."""
