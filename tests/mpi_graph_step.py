"""Run under mpiexec by tests/test_graph_mpi.py: one spatially partitioned step of the
residual graph (slot = rank), each rank saving its loss share and parameter gradients."""
import sys
from pathlib import Path

import numpy as np
from mpi4py import MPI

sys.path.insert(0, str(Path(__file__).parent))
from executor.comm import MPITransport  # noqa: E402
from executor.partitioned import run_step, slot_params  # noqa: E402
from test_partitioned import RESIDUAL, make_plan, residual_case  # noqa: E402

comm = MPI.COMM_WORLD
out = Path(sys.argv[1])
p = make_plan(RESIDUAL, comm.size, "spatial")
full, x, y = residual_case()
j = comm.rank
params = {key: arrays for key, arrays in slot_params(p, full).items() if key[1] == j}
res = run_step(p, {j}, params, x, y, MPITransport(comm))
np.savez(out / f"rank{j}.npz", loss=res.loss, **{f"g_{i}_{n}": g for (i, _), gs in res.grads.items()
                                                   for n, g in enumerate(gs)})
