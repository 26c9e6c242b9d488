"""Run under mpiexec by tests/test_train_mpi.py: one step of a zoo model split over the
ranks (slot = rank) as ``zoo_step_case`` plans it, each rank saving its loss share and
its boxes' parameter gradients (float64)."""
import sys
from pathlib import Path

import numpy as np
from mpi4py import MPI

sys.path.insert(0, str(Path(__file__).parent))
from executor.comm import MPITransport  # noqa: E402
from executor.partitioned import run_step, slot_params  # noqa: E402
from test_train_mpi import zoo_step_case  # noqa: E402

comm = MPI.COMM_WORLD
out, name, tensor, pipeline, split = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
p, full, x, y = zoo_step_case(name, tensor, pipeline, split)
j = comm.rank
params = {key: arrays for key, arrays in slot_params(p, full).items() if key[1] == j}
res = run_step(p, {j}, params, x, y, MPITransport(comm))
np.savez(out / f"rank{j}.npz", loss=res.loss, **{f"g_{i}_{n}": g for (i, _), gs in res.grads.items()
                                                   for n, g in enumerate(gs)})
