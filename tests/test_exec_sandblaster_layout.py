"""Sandblaster where a slot keeps no parameters on some shards (a layer split over more
shards than the small slot fills): each shard waits for exactly the pushes that come.
And a coordinator left with no replica ends the job instead of waiting forever."""
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clustersim.core.plan import plan
from clustersim.core.scenario import load_scenario
from executor.coordinator_state import shard_pushes
from executor.kernels import init_params
from executor.partitioned import slot_params
from executor.psrank import shard_runs, slot_segments

HERE = Path(__file__).parent
MPIEXEC = Path(sys.executable).parent / "mpiexec"
needs_mpi = pytest.mark.skipif(not MPIEXEC.exists(), reason="the mpich wheel is not installed")

BATCHES = 20
LAYERS = f"""
name = "sandblaster-layers"
seed = 0
[cluster]
topology = "dgx-h100"
[model]
name = "mlp-digits"
batch_size = 32
[parallel]
replicas = 2
model_parallel = 2
split = "layers"
ps_shards = 4
[training]
algorithm = "sandblaster"
steps = {BATCHES}
learning_rate = 0.05
work_units = 4
backup_tasks = true
lbfgs_history = 10
"""


def test_slots_push_to_exactly_the_shards_the_plan_shares_them_with(tmp_path):
    """The coordinator counts pushes from ``Plan.ps.share``; the workers push where their
    runs fall (``psrank.shard_runs``).  The two agree: slot 1 (the last layer's 1290
    parameters) has a run on shard 3 alone."""
    f = tmp_path / "s.toml"
    f.write_text(LAYERS)
    p = plan(load_scenario(f))
    sc = p.scenario
    full = init_params(sc.model, np.random.default_rng(sc.seed), dtype=np.float32)
    sizes = {key: [a.size for a in arrays] for key, arrays in slot_params(p, full).items()}
    total = sum(sum(v) for v in sizes.values())
    pushes_to = [[bool(runs) for runs in shard_runs(slot_segments(p, j, sizes), total, 4)] for j in range(2)]
    assert pushes_to == [[n > 0 for n in row] for row in p.ps.share] == [[True] * 4, [False, False, False, True]]
    assert shard_pushes(p.ps.share) == (1, 1, 1, 2)


@needs_mpi
@pytest.mark.slow             # make test-all: 4.7 s
def test_sandblaster_split_by_layers_over_four_shards_trains_to_the_end(tmp_path):
    """It hung: every shard waited for two pushes per replica, shards 0-2 get one."""
    f = tmp_path / "s.toml"
    f.write_text(LAYERS)
    proc = subprocess.run([sys.executable, "-m", "clustersim", "execute", str(f), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["ranks"] == 2 * 2 + 4 + 1                        # workers, shards, the coordinator
    assert out["shard_updates"] == [BATCHES] * 4 and out["steps_per_worker"] == [BATCHES] * 4
    assert out["units_run"] >= BATCHES * 4 and out["replicas_left"] == 2
    assert out["accuracy"] >= 0.6 and out["loss"] < math.log(10)   # 0.836 and 0.67 here; chance: 0.1 and 2.30


@needs_mpi
def test_a_coordinator_with_every_replica_lost_ends_the_job_in_one_line():
    """Ranks 0 and 1 lead a replica each; both say they are lost (ACK [0, 0]) and then wait
    for ever, as does rank 2 (a shard); rank 3 coordinates."""
    proc = subprocess.run([str(MPIEXEC), "-n", "4", sys.executable, __file__], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert re.fullmatch(r"clustersim: error: rank 3: RuntimeError: every replica is lost \(each said so\) by "
                        r"batch 0 of 5: none is left to train \(at sandblaster.py:\d+ in coordinate\)", lines[0]), lines[0]


def _rank_main() -> None:
    from mpi4py import MPI

    from executor.comm import barrier
    from executor.coordinator_state import ACK, ASSIGN, READY
    from executor.ranks import abort
    from executor.sandblaster import coordinate
    world = MPI.COMM_WORLD
    if world.rank == 3:
        try:
            coordinate(world, [0, 1], [2], batches=5, units=2, backup_tasks=False, timeout_s=10.0, acks=True)
        except Exception as exc:
            abort(world, exc)
    if world.rank < 2:
        world.Send(np.zeros(1, np.int64), dest=3, tag=READY)
        world.Recv(np.empty(2, np.int64), source=3, tag=ASSIGN)
        world.Send(np.array([0, 0], np.int64), dest=3, tag=ACK)
    barrier(world)                                              # nobody gets past: the coordinator aborts


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    _rank_main()
