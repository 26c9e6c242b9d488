"""NCCL as the executor's transport (executor/nccl_transport.py), without a GPU: the order
every rank issues its messages in against ``run_step``'s own (in one process), the
transport's NCCL calls on a recording fake, and whole steps on real MPI ranks with a fake
``nccl`` module built on mpi4py (``MpiNccl``: untagged messages matched in order, a send
that waits for its receive, groups, allreduce), which must equal ``MPITransport``'s to
1e-10.  Run by pytest, this file launches ``mpiexec`` on itself for the last part."""
from __future__ import annotations

import ctypes
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from executor.nccl_transport import NcclTransport, issue_order, nccl_type, receive_order, tag_of
from executor.partitioned import Mailbox, run_step, skipped, slot_params

HERE = Path(__file__).parent
MPIEXEC = Path(sys.executable).parent / "mpiexec"


# --- the order of messages --------------------------------------------------------------------
class Recorder(Mailbox):
    """The in-process transport, recording each receive (src, dst, tag) in the order asked."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[tuple] = []

    def recv(self, src, dst, tag, shape=(), dtype=None):
        self.asked.append((src, dst, tag))
        return super().recv(src, dst, tag, shape, dtype)


def plans(slots: int = 0):
    """(name, Plan, whole layers' parameters, x, y) of ``slots`` slots (0: any), whose
    messages cross in every way run_step makes them: halos and reductions of a spatial
    split, a pipeline's stages by micro-batch, Megatron's reduce-scatters and all-gathers
    with sequence parallelism (whose weight gradients are taken out of send order), and
    recompute's second allreduces, which the ranks leave out."""
    from executor.kernels import init_params
    from test_partitioned import ALL_KINDS, TINY_GPT, make_plan, tiny_gpt_case
    from test_tensor_parallel import tensor_plan
    rng = np.random.default_rng(7)
    full = init_params(ALL_KINDS, rng)
    x, y = rng.normal(size=(6, *ALL_KINDS.input_shape)), rng.integers(0, 5, 6)
    for m, split, micro in [(3, "spatial", 1), (3, "layers", 3), (2, "layers", 2)]:
        if slots in (0, m):
            yield f"all-kinds {split} {m}x{micro}", make_plan(ALL_KINDS, m, split, micro=micro), full, x, y
    _, gx, gy, _, _, gfull = tiny_gpt_case()
    for m, pipeline, micro, sp, redo in [(2, 1, 1, True, False), (2, 2, 2, True, False), (2, 2, 2, False, False),
                                         (2, 2, 2, True, True)]:
        if slots in (0, m * pipeline):
            p = tensor_plan(TINY_GPT, m, pipeline, micro, sp=sp, training={"recompute": redo})
            yield f"tiny-gpt tensor {m}x{pipeline}x{micro} sp={sp} recompute={redo}", p, gfull, gx, gy


@pytest.mark.parametrize("backward", [True, False])
def test_receive_order_is_the_order_run_step_asks_in(backward):
    for name, p, full, x, y in plans():
        rec = Recorder()
        run_step(p, set(range(p.slots)), slot_params(p, full), x, y, rec, backward=backward)
        for slot in range(p.slots):
            want = [(s, d, tag) for s, d, tag in rec.asked if d == slot]
            got = [(p.ops[i].slot, p.ops[i].dst, tag_of(p.ops[i])) for _, i in receive_order(p.ops, slot, backward)]
            assert got == want, (name, slot)


def test_the_tensor_split_with_sequence_parallelism_takes_messages_out_of_send_order():
    """Why the order is the receiver's: run_step sends slot 0's weight-gradient pieces to
    slot 1 in another order than slot 1 takes them (NCCL would pair them wrongly)."""
    from test_partitioned import TINY_GPT, tiny_gpt_case
    from test_tensor_parallel import tensor_plan
    p = tensor_plan(TINY_GPT, 2, 1, 1, sp=True)
    _, x, y, _, _, full = tiny_gpt_case()
    rec = Recorder()
    sent = []
    rec.send = lambda src, dst, tag, array: (sent.append((src, dst, tag)), Mailbox.send(rec, src, dst, tag, array))
    run_step(p, {0, 1}, slot_params(p, full), x, y, rec)
    assert sorted(sent) == sorted(rec.asked)
    assert [m for m in sent if m[:2] == (0, 1)] != [m for m in rec.asked if m[:2] == (0, 1)]


def test_both_ends_of_every_message_see_it_at_the_same_place_of_one_order():
    for name, p, *_ in plans():
        orders = {slot: issue_order(p.ops, slot) for slot in range(p.slots)}
        xfers = {op.id for op in p.ops if op.kind == "xfer" and not skipped(op, True)}
        for op_id in xfers:
            op = p.ops[op_id]
            assert op_id in orders[op.slot] and op_id in orders[op.dst], name
        assert not any(skipped(p.ops[i], True) for order in orders.values() for i in order), name
        for a in range(p.slots):           # each pair's messages in one order at both ends
            for b in range(p.slots):
                mine = [i for i in orders[a] if {p.ops[i].slot, p.ops[i].dst} == {a, b}]
                theirs = [i for i in orders[b] if {p.ops[i].slot, p.ops[i].dst} == {a, b}]
                assert mine == theirs, (name, a, b)


# --- the transport's calls, recorded ------------------------------------------------------------
class RecordingNccl:
    """``cupy.cuda.nccl``'s constants, groups and a communicator's send/recv, recorded."""
    NCCL_FLOAT32, NCCL_FLOAT64, NCCL_SUM = 7, 8, 0

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def groupStart(self):
        self.calls.append(("group",))

    def groupEnd(self):
        self.calls.append(("end",))

    def send(self, ptr, count, dtype, peer, stream):
        self.calls.append(("send", count, dtype, peer, stream))

    def recv(self, ptr, count, dtype, peer, stream):
        self.calls.append(("recv", count, dtype, peer, stream))


def test_a_send_waits_for_the_messages_ordered_before_it_then_goes_in_one_group_with_them():
    from clustersim.core.plan import Op
    ops = [Op(0, "fwd", 0, 0, 0), Op(1, "fwd", 0, 0, 1),
           Op(2, "xfer", 1, 0, 1, dst=0, deps=(1,), why="stage", producer=0),   # slot 1 -> 0, taken by op 4
           Op(3, "xfer", 1, 0, 0, dst=1, deps=(0,), why="stage", producer=0),   # slot 0 -> 1, taken by op 5
           Op(4, "fwd", 1, 0, 0, deps=(2,)), Op(5, "fwd", 1, 0, 1, deps=(3,))]
    assert issue_order(ops, 0) == [2, 3] and issue_order(ops, 1) == [2, 3]
    nccl = RecordingNccl()
    t = NcclTransport(ops, 0, nccl, nccl)
    t.send(0, 1, ("a", 0, 0), np.ones(3, np.float32))      # made first, but ordered after the receive
    assert nccl.calls == []
    t.recv(1, 0, ("a", 0, 0), (2, 2), np.float64)
    assert nccl.calls == [("group",), ("recv", 4, 8, 1, 0), ("send", 3, 7, 1, 0), ("end",)]
    t.flush()
    assert t.bytes == 12 and t.issued == 0


def test_nccl_types_follow_numpy_s_and_refuse_what_nccl_cannot_carry():
    nccl = RecordingNccl()
    assert nccl_type(nccl, np.float32) == 7 and nccl_type(nccl, "float64") == 8
    with pytest.raises(ValueError, match="NCCL carries no bool"):
        nccl_type(nccl, bool)


# --- a fake NCCL on MPI, and whole steps on real ranks ------------------------------------------
class MpiNccl:
    """The calls of ``cupy.cuda.nccl`` the executor makes, on mpi4py and host memory, as
    NCCL behaves: messages carry no tag (a pair's match in issue order), a send returns
    only once its receive has started (``Issend``), a group's operations all start before
    any is waited for, and ``NcclCommunicator(n, uid, rank)`` finds its mates by the id."""
    NCCL_FLOAT32, NCCL_FLOAT64, NCCL_SUM = 7, 8, 0
    DTYPES = {7: np.float32, 8: np.float64}
    TAG = 7_000_001                     # the bootstrap's and the messages' (apart from the job's tags)

    def __init__(self) -> None:
        from mpi4py import MPI
        self.MPI, self.world, self.ids, self.group = MPI, MPI.COMM_WORLD, 0, None
        self.calls = 0                  # messages and allreduces made

    def get_unique_id(self):
        self.ids += 1
        return (self.world.rank, self.ids)

    def NcclCommunicator(self, n, uid, rank):
        root, _ = uid
        if rank == 0:
            members = [self.world.rank] + [0] * (n - 1)
            for _ in range(n - 1):
                r, w = self.world.recv(tag=self.TAG)
                members[r] = w
            for w in members[1:]:
                self.world.send(members, dest=w, tag=self.TAG)
        else:
            self.world.send((rank, self.world.rank), dest=root, tag=self.TAG)
            members = self.world.recv(source=root, tag=self.TAG)
        comm = self.world.Create_group(self.world.group.Incl(members), tag=self.TAG)
        return _MpiNcclComm(self, comm)

    def groupStart(self):
        assert self.group is None, "groups nest only one deep here"
        self.group = []

    def groupEnd(self):
        from executor.comm import wait_buffer
        requests, self.group = self.group, None
        for req in requests:
            wait_buffer(req)

    def post(self, req) -> None:
        from executor.comm import wait_buffer
        self.calls += 1
        if self.group is None:
            wait_buffer(req)
        else:
            self.group.append(req)

    def view(self, ptr: int, count: int, dtype: int) -> np.ndarray:
        dt = np.dtype(self.DTYPES[dtype])
        return np.frombuffer((ctypes.c_char * (count * dt.itemsize)).from_address(ptr), dt)


class _MpiNcclComm:
    def __init__(self, nccl: MpiNccl, comm) -> None:
        self.nccl, self.comm = nccl, comm

    def send(self, ptr, count, dtype, peer, stream):
        self.nccl.post(self.comm.Issend(self.nccl.view(ptr, count, dtype), dest=peer, tag=0))

    def recv(self, ptr, count, dtype, peer, stream):
        self.nccl.post(self.comm.Irecv(self.nccl.view(ptr, count, dtype), source=peer, tag=0))

    def allReduce(self, sendptr, recvptr, count, dtype, op, stream):
        assert op == self.nccl.NCCL_SUM and self.nccl.group is None
        self.nccl.calls += 1
        out = self.nccl.view(recvptr, count, dtype)
        total = np.empty_like(out)
        self.comm.Allreduce(self.nccl.view(sendptr, count, dtype), total)
        out[...] = total


def steps_main(out: Path, device: str = "cpu") -> None:
    """Under mpiexec -n 2: each two-slot Plan's step with MPITransport, then with
    NcclTransport: on MpiNccl with NumPy, or (``device`` "gpu") on CuPy's NCCL, one GPU
    per rank, on a copy stream; rank 0 writes the largest differences of loss, gradients
    and logits, and of an allreduce from its closed form."""
    sys.path.insert(0, str(HERE))
    from mpi4py import MPI
    from executor.backend import get_xp, to_numpy
    from executor.comm import MPITransport
    from executor.gpu import copy_stream, nccl_communicator
    from executor.nccl_transport import allreduce_sum, nccl_or_none
    world = MPI.COMM_WORLD
    xp = get_xp(device, world)
    nccl = MpiNccl() if device == "cpu" else nccl_or_none()
    comm, stream = nccl_communicator(world, nccl), copy_stream(xp)
    j, diffs = world.rank, {}
    for name, p, full, x, y in plans(world.size):
        params = {key: [xp.asarray(a) for a in arrays] for key, arrays in slot_params(p, full).items() if key[1] == j}
        x, y = xp.asarray(x), xp.asarray(y)
        for backward in (True, False):
            a = run_step(p, {j}, params, x, y, MPITransport(world, xp), xp=xp, backward=backward)
            b = run_step(p, {j}, params, x, y, NcclTransport(p.ops, j, comm, nccl, xp, stream, backward), xp=xp,
                         backward=backward)
            assert a.grads.keys() == b.grads.keys() and a.logits.keys() == b.logits.keys()
            pairs = [(ga, gb) for key in a.grads for ga, gb in zip(a.grads[key], b.grads[key])]
            pairs += [(a.logits[k], b.logits[k]) for k in a.logits]
            diffs[f"{name} backward={backward}"] = max([abs(a.loss - b.loss)] + [
                float(np.abs(to_numpy(u) - to_numpy(v)).max()) for u, v in pairs])
    g = xp.arange(5.0) * (j + 1)
    allreduce_sum(comm, nccl, g, xp, stream)
    diffs["allreduce"] = float(np.abs(to_numpy(g) - np.arange(5.0) * 3).max())
    every = world.gather(diffs, root=0)
    if j == 0:
        (out / "diffs.json").write_text(json.dumps(every))


def launch_steps(device: str) -> list[dict]:
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([str(MPIEXEC), "-n", "2", sys.executable, __file__, tmp, "steps", device],
                              capture_output=True, text=True, timeout=240, cwd=HERE.parent)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads((Path(tmp) / "diffs.json").read_text())


STEP_CASES = ["all-kinds layers 2x2 backward=False", "all-kinds layers 2x2 backward=True", "allreduce",
              "tiny-gpt tensor 2x1x1 sp=True recompute=False backward=False",
              "tiny-gpt tensor 2x1x1 sp=True recompute=False backward=True"]


@pytest.mark.skipif(not MPIEXEC.exists(), reason="the mpich wheel is not installed")
def test_steps_over_fake_nccl_on_two_ranks_equal_mpi_s():
    every = launch_steps("cpu")
    assert len(every) == 2
    for diffs in every:
        assert sorted(diffs) == STEP_CASES
        for name, d in diffs.items():
            assert d <= 1e-10, name


def two_gpus() -> bool:
    from executor.backend import cupy_or_none
    from executor.nccl_transport import nccl_or_none
    return nccl_or_none() is not None and cupy_or_none().cuda.runtime.getDeviceCount() >= 2


@pytest.mark.skipif(not MPIEXEC.exists() or not two_gpus(), reason="needs CuPy with NCCL, 2 visible GPUs and mpich")
def test_steps_over_nccl_on_two_gpus_equal_mpi_s():      # pragma: no cover - GPU hosts only
    for diffs in launch_steps("gpu"):
        assert sorted(diffs) == STEP_CASES
        for name, d in diffs.items():
            assert d <= 1e-10, name


JOBS = {                     # 2 ranks each: every path of a worker that NCCL carries, and a shard on MPI
    "sync 2 replicas": ("mlp-digits", {"replicas": 2}, "sync"),
    "local 2 replicas": ("mlp-digits", {"replicas": 2}, "local"),
    "pipeline 2 x 2 micro-batches": ("mlp-digits", {"model_parallel": 2, "split": "layers", "micro_batches": 2},
                                     "sync"),
    "gpt-tiny tensor 2, sequence parallel": ("gpt-tiny", {"model_parallel": 2, "split": "tensor",
                                                          "sequence_parallel": True}, "sync"),
    "downpour 1 worker + 1 shard": ("mlp-digits", {"replicas": 1, "ps_shards": 1}, "downpour"),
}


def jobs_main(out: Path) -> None:
    """Under mpiexec -n 2: each of ``JOBS`` for 3 steps with MPI, then on MpiNccl; rank 0
    writes each job's largest difference of the workers' losses and final parameters."""
    from types import SimpleNamespace

    from mpi4py import MPI
    from clustersim.core.plan import plan
    from executor.job import RankJob
    from helpers import scenario
    world, diffs = MPI.COMM_WORLD, {}
    for name, (model, par, algorithm) in JOBS.items():
        sc = scenario(model=model, batch=8, parallel=par,
                      training={"steps": 3, "learning_rate": 0.1, "algorithm": algorithm, "local_steps": 2})
        p = plan(sc, check_memory=False)
        runs, nccl = [], MpiNccl()
        for transport in (None, nccl):
            args = SimpleNamespace(loaded=None, checkpoint=None, checkpoint_every=0, resume=False)
            job = RankJob(p, world, np, None, args, transport)
            summary, _, _ = job.go()
            params = [a for key in sorted(getattr(job, "params", {})) for a in job.params[key]]
            runs.append(([summary.get(k) for k in ("train_loss", "loss", "accuracy")], params))
        (a, pa), (b, pb) = runs
        d = [abs(x - y) for x, y in zip(a, b) if x is not None]
        d += [float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(pa, pb)]
        diffs[name] = {"diff": max(d) if d else None, "params": len(pa), "nccl_calls": nccl.calls}
    every = world.gather(diffs, root=0)
    if world.rank == 0:
        (out / "jobs.json").write_text(json.dumps(every))


@pytest.mark.slow
@pytest.mark.skipif(not MPIEXEC.exists(), reason="the mpich wheel is not installed")
def test_jobs_over_fake_nccl_on_two_ranks_train_as_over_mpi():
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([str(MPIEXEC), "-n", "2", sys.executable, __file__, tmp, "jobs"], capture_output=True,
                              text=True, timeout=240, cwd=HERE.parent)
        assert proc.returncode == 0, proc.stderr[-2000:]
        every = json.loads((Path(tmp) / "jobs.json").read_text())
    for rank, diffs in enumerate(every):
        assert sorted(diffs) == sorted(JOBS)
        for name, got in diffs.items():
            if name.startswith("downpour"):             # one worker and its shard: all on MPI
                assert got["nccl_calls"] == 0
                if rank == 1:
                    assert got["diff"] is None          # the shard: nothing of a worker's to compare
                    continue
            else:
                assert got["nccl_calls"] > 0, name
            assert got["params"] > 0 and got["diff"] <= 1e-10, (name, rank, got)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    if sys.argv[2] == "jobs":
        jobs_main(Path(sys.argv[1]))
    else:
        steps_main(Path(sys.argv[1]), sys.argv[3])
