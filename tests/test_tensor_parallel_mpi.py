"""Megatron's tensor split of the small causal transformer on real MPI ranks (slot = rank):
tensor 2, and tensor 2 x pipeline 2 with 2 micro-batches on 4 ranks (with sequence
parallelism too), equal ``Net``'s loss and gradients.  Run by pytest, this file launches
``mpiexec`` on itself; each rank saves its loss share and its parameters' gradients."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).parent
MPIEXEC = Path(sys.executable).parent / "mpiexec"


def rank_main(out: Path, m: int, pipeline: int, micro: int, sp: int) -> None:
    from mpi4py import MPI
    from executor.comm import MPITransport
    from executor.partitioned import run_step, slot_params
    from test_partitioned import tiny_gpt_case
    from test_tensor_parallel import TINY_GPT, tensor_plan
    comm = MPI.COMM_WORLD
    p = tensor_plan(TINY_GPT, m, pipeline, micro, sp=bool(sp))
    _, x, y, _, _, full = tiny_gpt_case()
    j = comm.rank
    params = {key: arrays for key, arrays in slot_params(p, full).items() if key[1] == j}
    res = run_step(p, {j}, params, x, y, MPITransport(comm))
    np.savez(out / f"rank{j}.npz", loss=res.loss, **{f"g_{i}_{n}": g for (i, _), gs in res.grads.items()
                                                       for n, g in enumerate(gs)})


@pytest.mark.skipif(not MPIEXEC.exists(), reason="the mpich wheel is not installed")
@pytest.mark.parametrize("m, pipeline, micro, sp", [
    pytest.param(2, 1, 1, 0, marks=pytest.mark.slow),   # make test: tensor 2 inside both stages below, and
    (2, 2, 2, 0), (2, 2, 2, 1)])                         # test_train_mpi's gpt-tiny tensor 2 step
def test_tensor_step_on_ranks_equals_one_process(tmp_path, m, pipeline, micro, sp):
    from test_tensor_parallel import TINY_GPT, assert_equals_net, tensor_plan
    ranks = m * pipeline
    proc = subprocess.run([str(MPIEXEC), "-n", str(ranks), sys.executable, __file__, str(tmp_path), str(m),
                           str(pipeline), str(micro), str(sp)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    p = tensor_plan(TINY_GPT, m, pipeline, micro, sp=bool(sp))
    loss, grads = 0.0, {}
    for j in range(ranks):
        data = np.load(tmp_path / f"rank{j}.npz")
        loss += float(data["loss"])
        for i, sl in enumerate(p.slices):
            arrays = [data[f"g_{i}_{n}"] for n in range(8) if f"g_{i}_{n}" in data]
            if arrays and j in dict(sl):
                grads[(i, j)] = arrays
    assert_equals_net(p, loss, grads)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent))
    rank_main(Path(sys.argv[1]), *map(int, sys.argv[2:6]))
