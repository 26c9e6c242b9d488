"""Run under mpiexec by tests/test_mpi.py: one partitioned step of the all-kinds model on
real ranks (slot = rank), each rank saving its parameter gradients and logits."""
import sys
from pathlib import Path

import numpy as np
from mpi4py import MPI

sys.path.insert(0, str(Path(__file__).parent))
from executor.comm import MPITransport  # noqa: E402
from executor.kernels import init_params  # noqa: E402
from executor.partitioned import run_step  # noqa: E402
from test_partitioned import ALL_KINDS, make_plan  # noqa: E402

comm = MPI.COMM_WORLD
out = Path(sys.argv[1])
p = make_plan(ALL_KINDS, comm.size, sys.argv[2])
rng = np.random.default_rng(7)
full = init_params(ALL_KINDS, rng)
x = rng.normal(size=(6, *ALL_KINDS.input_shape))
y = rng.integers(0, 5, 6)
j = comm.rank
params = {(i, j): [a[idx] for a, idx in zip(full[i], ALL_KINDS.nodes[i].layer.box_index(dict(sl)[j]))]
          for i, sl in enumerate(p.slices) if i in full and j in dict(sl)}
masks = {}


def dropout(i, shape):
    return masks.setdefault(i, (np.random.default_rng(100 + i).random(shape) < 0.5) / 0.5)


res = run_step(p, {j}, params, x, y, MPITransport(comm), dropout=dropout)
np.savez(out / f"rank{j}.npz", loss=res.loss,
         **{f"g_{i}_{n}": g for (i, _), gs in res.grads.items() for n, g in enumerate(gs)},
         **{f"logits_{m}": a for (_, m), a in res.logits.items()})
