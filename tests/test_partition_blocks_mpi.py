"""2-D blocks on real MPI ranks: four ranks cut the all-kinds model's spatial layers in
2 x 2 blocks (chosen automatically) and one step equals the single-process reference."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from executor.kernels import init_params
from test_partitioned import ALL_KINDS, make_plan, run

HERE = Path(__file__).parent
MPIEXEC = Path(sys.executable).parent / "mpiexec"
pytestmark = pytest.mark.skipif(not MPIEXEC.exists(), reason="the mpich wheel is not installed")


def test_step_in_two_by_two_blocks_on_four_ranks_equals_the_reference(tmp_path):
    p = make_plan(ALL_KINDS, 4, "spatial")
    assert p.axes[0] == "blocks" and len({box[2] for _, box in p.slices[0]}) == 2
    proc = subprocess.run([str(MPIEXEC), "-n", "4", sys.executable, str(HERE / "mpi_step.py"), str(tmp_path), "spatial"],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rng = np.random.default_rng(7)                       # mpi_step.py's parameters and batch
    full = init_params(ALL_KINDS, rng)
    x = rng.normal(size=(6, *ALL_KINDS.input_shape))
    y = rng.integers(0, 5, 6)
    loss0, _, grads0 = run(make_plan(ALL_KINDS, 1, "spatial"), full, x, y)
    loss, grads = 0.0, {i: [np.zeros_like(a) for a in arrs] for i, arrs in full.items()}
    for j in range(4):
        data = np.load(tmp_path / f"rank{j}.npz")
        loss += float(data["loss"])
        for i in full:
            box = dict(p.slices[i]).get(j)
            for n, idx in enumerate(ALL_KINDS.nodes[i].layer.box_index(box) if box else ()):
                grads[i][n][idx] += data[f"g_{i}_{n}"]
    assert loss == pytest.approx(loss0, rel=1e-10)
    for i in grads0:
        for g, g0 in zip(grads[i], grads0[i]):
            assert np.allclose(g, g0, rtol=1e-9, atol=1e-12), i
