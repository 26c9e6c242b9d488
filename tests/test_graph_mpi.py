"""A residual graph on two real MPI ranks: one spatially partitioned step (its adds, its
concat, a layer read by three others) equals the single-process reference."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_partitioned import RESIDUAL, gathered, make_plan, residual_case, run

HERE = Path(__file__).parent
MPIEXEC = Path(sys.executable).parent / "mpiexec"
pytestmark = pytest.mark.skipif(not MPIEXEC.exists(), reason="the mpich wheel is not installed")


def test_residual_graph_step_on_two_ranks_equals_the_reference(tmp_path):
    proc = subprocess.run([str(MPIEXEC), "-n", "2", sys.executable, str(HERE / "mpi_graph_step.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    full, x, y = residual_case()                         # mpi_graph_step.py's parameters and batch
    loss0, _, grads0 = run(make_plan(RESIDUAL, 1, "spatial"), full, x, y)
    loss, grads = gathered(make_plan(RESIDUAL, 2, "spatial"), full, tmp_path)
    assert loss == pytest.approx(loss0, rel=1e-10)
    for i in grads0:
        for g, g0 in zip(grads[i], grads0[i]):
            assert np.allclose(g, g0, rtol=1e-9, atol=1e-12), RESIDUAL.nodes[i].name
