"""One Trace for both runners: an executed job's trace carries replica steps and, for
lockstep jobs, step ends, and its summary is ``summarize`` of that trace."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from clustersim.core.trace import Trace
from executor.summary import replica_steps, step_ends

MPIEXEC = Path(sys.executable).parent / "mpiexec"
BATCH, REPLICAS, STEPS = 16, 2, 5
SYNC = f"""
name = "trace-sync"
seed = 0
[cluster]
topology = "dgx-h100"
[model]
name = "mlp-digits"
batch_size = {BATCH}
[parallel]
model_parallel = 1
replicas = {REPLICAS}
[training]
steps = {STEPS}
learning_rate = 0.5
"""


def test_a_replicas_step_runs_from_its_first_slots_start_to_its_last_slots_end():
    slot0 = [(0, 0, 0.0, 2.0), (0, 1, 2.0, 5.0), (1, 0, 0.5, 1.0)]
    slot1 = [(0, 0, 0.1, 2.5), (0, 1, 2.6, 4.0), (1, 0, 0.4, 1.5)]
    assert replica_steps([slot0, slot1]) == [(1, 0, 0.4, 1.5), (0, 0, 0.0, 2.5), (0, 1, 2.0, 5.0)]


def test_a_lockstep_step_ends_when_its_quorum_of_replicas_has():
    steps = [(0, 0, 0.0, 1.0), (1, 0, 0.0, 3.0), (2, 0, 0.0, 2.0), (0, 1, 1.0, 4.0), (2, 1, 2.0, 5.0)]
    assert step_ends(steps, 3) == [3.0, 5.0]          # all replicas: the last; a crashed one (1) is not waited for
    assert step_ends(steps, 2) == [2.0, 5.0]          # one backup worker: the second to finish


@pytest.mark.skipif(not MPIEXEC.exists(), reason="the mpich wheel is not installed")
def test_executed_sync_trace_has_every_replica_step_and_the_summary_reads_it(tmp_path):
    f = tmp_path / "s.toml"
    f.write_text(SYNC)
    path = tmp_path / "t.json"
    proc = subprocess.run([sys.executable, "-m", "clustersim", "execute", str(f), "--json", "--trace", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    trace = Trace.load(path)
    assert sorted((r, s) for r, s, _, _ in trace.replica_steps) == [(r, s) for r in range(REPLICAS)
                                                                    for s in range(STEPS)]
    for r in range(REPLICAS):
        mine = sorted((s, a, b) for rr, s, a, b in trace.replica_steps if rr == r)
        assert all(0.0 <= a < b for _, a, b in mine)
        assert all(prev[2] <= nxt[1] for prev, nxt in zip(mine, mine[1:]))     # one step after the other
    ends = {s: max(b for _, ss, _, b in trace.replica_steps if ss == s) for s in range(STEPS)}
    assert trace.step_ends == [ends[s] for s in range(STEPS)]                  # no backups: the last replica's
    assert trace.step_ends == sorted(trace.step_ends)
    assert out["samples_per_s"] == pytest.approx(BATCH * REPLICAS / out["step_time_s"], rel=1e-12)
    assert out["sim_events"] == len(trace.spans) and out["steps"] == STEPS and out["replicas"] == REPLICAS
    assert out["parameters"] == 9610 and out["sim_time_s"] == out["wall_s"] >= trace.step_ends[-1]
    for key in ("accuracy", "loss", "quiet_step_time_s", "train_loss", "time_by_phase_s", "device_utilisation"):
        assert key in out
