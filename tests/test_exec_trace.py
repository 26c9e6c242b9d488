"""One Trace for both runners: an executed job's trace carries replica steps and, for
lockstep jobs, step ends, and its summary is ``summarize`` of that trace."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from clustersim.core.metrics import replica_period
from clustersim.core.plan import plan
from clustersim.core.scenario import load_scenario
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


DOWNPOUR = SYNC.replace('name = "trace-sync"', 'name = "trace-downpour"').replace(
    "[training]", "[training]\nalgorithm = \"downpour\"").replace("replicas = 2", "replicas = 2\nps_shards = 1")
needs_mpi = pytest.mark.skipif(not MPIEXEC.exists(), reason="the mpich wheel is not installed")


def executed(tmp_path, text: str):
    """(summary, Trace, Plan) of ``clustersim execute`` on the scenario ``text``."""
    f = tmp_path / "s.toml"
    f.write_text(text)
    path = tmp_path / "t.json"
    proc = subprocess.run([sys.executable, "-m", "clustersim", "execute", str(f), "--json", "--trace", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout), Trace.load(path), plan(load_scenario(f))


@pytest.fixture(scope="module")
def downpour(tmp_path_factory):
    """2 workers, 1 shard, Downpour (n_push 1), STEPS steps: one run for the tests below."""
    return executed(tmp_path_factory.mktemp("downpour"), DOWNPOUR)


@needs_mpi
def test_a_downpour_shard_records_one_apply_span_per_push(downpour):
    """2 workers x STEPS pushes: 2 x STEPS "apply" spans on the shard's device, each of the
    pushing replica's step, costed as the simulator's SGD apply; no whole-run span."""
    out, trace, p = downpour
    shard, n = p.ps.devices[0], p.ps.sizes[0]
    on_shard = [s for s in trace.spans if s.where == shard]
    assert p.schedule.rule == "sgd" and n == 9610
    assert sorted((s.replica, s.step) for s in on_shard) == [(r, s) for r in range(REPLICAS) for s in range(STEPS)]
    assert {(s.name, s.kind, s.phase, s.flops, s.bytes) for s in on_shard} == {
        ("apply", "update", "ps_update", 2.0 * n, 12.0 * n)}
    assert all(0.0 <= s.start_s <= s.end_s for s in on_shard)
    applying = sum(s.duration_s for s in on_shard)
    assert out["time_by_phase_s"]["ps_update"] == pytest.approx(applying / out["steps"], rel=1e-9)


@needs_mpi
def test_a_downpour_step_time_is_each_replicas_period_as_the_simulator_reports_it(downpour):
    """Replicas that step alone: (last end - first start) / steps, waits included, median
    over replicas (``metrics.replica_period``, the simulator's step_time_s)."""
    out, trace, _ = downpour
    assert sorted((r, s) for r, s, _, _ in trace.replica_steps) == [(r, s) for r in range(REPLICAS)
                                                                    for s in range(STEPS)]
    assert out["step_time_s"] == replica_period(trace.replica_steps)
    assert out["samples_per_s"] == BATCH * REPLICAS * STEPS / out["sim_time_s"]
    assert 0.0 < out["quiet_step_time_s"]


@needs_mpi
def test_a_sync_shard_records_one_update_of_the_replicas_mean_per_step(tmp_path):
    """As the simulator's sync through shards: one "update" (phase update) per step, of
    no one replica, summing REPLICAS pushes: (R + 1) FLOPs and (R + 2) x 4 bytes a parameter."""
    _, trace, p = executed(tmp_path, SYNC.replace("replicas = 2", "replicas = 2\nps_shards = 1"))
    n = p.ps.sizes[0]
    on_shard = [s for s in trace.spans if s.where == p.ps.devices[0]]
    assert sorted(s.step for s in on_shard) == list(range(STEPS))
    assert {(s.name, s.kind, s.phase, s.replica, s.flops, s.bytes) for s in on_shard} == {
        ("update", "update", "update", -1, (REPLICAS + 1) * n, (REPLICAS + 2) * n * 4)}


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
    assert out["transport"] == "mpi"                   # a CPU run: host MPI carries the messages


def test_an_executed_message_counts_its_bytes_once():
    """The executor records a message as a ``send`` span and a ``recv`` span, both with its
    bytes: a simulated trace rewritten in the executor's way moves the same bytes a step;
    its phase times are device-seconds, the receiver's wait too."""
    from dataclasses import replace

    from sim.engine import simulate
    from clustersim.core.metrics import summarize
    from helpers import scenario
    sc = scenario(batch=32, parallel={"model_parallel": 2, "split": "layers"}, training={"steps": 3})
    p = plan(sc)
    res = simulate(p)
    halves = []
    for s in res.trace.spans:
        if s.kind == "transfer":
            halves += [replace(s, name=f"{s.name} send"), replace(s, name=f"{s.name} recv")]
        else:
            halves.append(s)
    executed = replace(res, trace=replace(res.trace, spans=halves))
    plain, twice = summarize(p, res), summarize(p, executed)
    assert plain["bytes_per_step"] > 0 and twice["bytes_per_step"] == plain["bytes_per_step"]
    moved = {k for k, v in plain["time_by_phase_s"].items() if k in ("stage", "gradient")}
    assert moved and all(twice["time_by_phase_s"][k] == pytest.approx(2 * plain["time_by_phase_s"][k]) for k in moved)
