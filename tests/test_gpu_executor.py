"""A rank on a GPU host (executor/gpu.py): the device choice, the NCCL bootstrap over MPI
and the stream of each op, on fakes (no GPU needed); the same on CuPy where it sees GPUs."""
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from clustersim.core.plan import Op, plan
from clustersim.core.scenario import scenario_from_dict
from executor.backend import cupy_or_none
from executor.gpu import (COMPUTE, COPY, device_for, local_rank, nccl_communicator, physical_gpu, stream_plan,
                          use_local_gpu)

ROOT = Path(__file__).resolve().parents[1]


def test_each_local_rank_takes_its_own_gpu():
    assert [device_for(r, 4, 4) for r in range(4)] == [0, 1, 2, 3]
    assert [device_for(r, 2, 8) for r in range(2)] == [0, 1]
    assert [device_for(r, 4, 2, share=True) for r in range(4)] == [0, 1, 0, 1]


@pytest.mark.parametrize("local, size, visible, words", [(2, 3, 2, "3 ranks on this machine but 2 GPUs"),
                                                        (0, 1, 0, "no GPU is visible"),
                                                        (3, 3, 4, "local rank 3 is not one of 3")])
def test_ranks_never_share_a_gpu_unless_asked(local, size, visible, words):
    with pytest.raises(ValueError, match=words):
        device_for(local, size, visible)


def test_cuda_visible_devices_names_the_physical_gpu():
    assert physical_gpu(1, "4,6") == "6"
    assert physical_gpu(0, "GPU-3b1e, GPU-77aa") == "GPU-3b1e"
    assert physical_gpu(2, None) == "2"
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES"):
        physical_gpu(2, "0,1")


class FakeComm:
    """A rank of a job whose ranks sit on machines ``hosts[rank]``; bcast hands every rank
    the root's value through ``board`` (the ranks are called one after another, root first)."""

    def __init__(self, rank: int, hosts: list[str], board: dict) -> None:
        self.rank, self.hosts, self.board, self.freed = rank, hosts, board, False

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return len(self.hosts)

    def Split_type(self, split_type, key):
        assert split_type == "SHARED" and key == self.rank
        mates = [r for r, h in enumerate(self.hosts) if h == self.hosts[self.rank]]
        node = SimpleNamespace(Get_rank=lambda: mates.index(self.rank), Get_size=lambda: len(mates))
        node.Free = lambda: setattr(self, "freed", True)
        return node

    def bcast(self, value, root):
        if self.rank == root:
            self.board["value"] = value
        return self.board["value"]


def test_local_rank_is_the_rank_among_the_machine_s_ranks():
    hosts = ["a", "a", "b", "a", "b"]
    got = [local_rank(FakeComm(r, hosts, {}), "SHARED") for r in range(5)]
    assert got == [(0, 3), (1, 3), (0, 2), (2, 3), (1, 2)]


def test_local_rank_of_a_real_single_rank_job():
    from mpi4py import MPI
    assert local_rank(MPI.COMM_SELF, MPI.COMM_TYPE_SHARED) == (0, 1)


class FakeNccl:
    """``cupy.cuda.nccl``'s two calls the bootstrap makes, recorded."""

    def __init__(self) -> None:
        self.ids = 0
        self.joined = []

    def get_unique_id(self):
        self.ids += 1
        return (7, 1, 9)

    def NcclCommunicator(self, n, uid, rank):
        self.joined.append((n, uid, rank))
        return ("comm", rank)


def test_nccl_bootstrap_makes_one_id_on_rank_0_and_every_rank_joins_with_it():
    nccl, board = FakeNccl(), {}
    comms = [nccl_communicator(FakeComm(r, ["a"] * 3, board), nccl) for r in range(3)]
    assert nccl.ids == 1
    assert nccl.joined == [(3, (7, 1, 9), 0), (3, (7, 1, 9), 1), (3, (7, 1, 9), 2)]
    assert comms == [("comm", 0), ("comm", 1), ("comm", 2)]


BOOT = """
from mpi4py import MPI
from executor.gpu import nccl_communicator
class N:
    def get_unique_id(self): return (11, MPI.COMM_WORLD.rank)
    def NcclCommunicator(self, n, uid, rank): return (n, uid, rank)
got = MPI.COMM_WORLD.gather(nccl_communicator(MPI.COMM_WORLD, N()), root=0)
if MPI.COMM_WORLD.rank == 0:
    print(got)
"""


def test_nccl_bootstrap_broadcasts_the_id_over_real_mpi_ranks():
    from executor.launch import mpiexec
    proc = subprocess.run([str(mpiexec()), "-n", "2", sys.executable, "-c", BOOT], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-1000:]
    assert proc.stdout.strip() == "[(2, (11, 0), 0), (2, (11, 0), 1)]"


def test_streams_wait_only_across_streams_of_their_own_rank():
    ops = [Op(0, "fwd", 0, 0, 0), Op(1, "xfer", 0, 0, 0, dst=1, deps=(0,)), Op(2, "fwd", 1, 0, 1, deps=(1,)),
           Op(3, "fwd", 1, 0, 0, deps=(0,)), Op(4, "xfer", 1, 0, 1, dst=0, deps=(2,)), Op(5, "bwd", 1, 0, 0, deps=(4, 3))]
    assert stream_plan(ops, 0) == {0: (COMPUTE, ()), 1: (COPY, (0,)), 3: (COMPUTE, ()), 4: (COPY, ()),
                                   5: (COMPUTE, (4,))}
    assert stream_plan(ops, 1) == {1: (COPY, ()), 2: (COMPUTE, (1,)), 4: (COPY, (2,))}


def test_every_received_input_of_a_pipeline_stage_is_waited_for_by_event():
    sc = scenario_from_dict({"cluster": {"topology": "dgx-h100"}, "model": {"name": "mlp-digits", "batch_size": 16},
                             "parallel": {"model_parallel": 2, "split": "layers", "micro_batches": 2}}, "t.toml")
    p = plan(sc)
    by_id = {op.id: op for op in p.ops}
    for slot in (0, 1):
        streams = stream_plan(p.ops, slot)
        assert {s for s, _ in streams.values()} == {COMPUTE, COPY}
        assert any(w for s, w in streams.values() if s == COMPUTE)      # each stage receives something
        for op_id, (stream, waits) in streams.items():
            op = by_id[op_id]
            assert stream == (COPY if op.kind == "xfer" else COMPUTE)
            if stream == COMPUTE:           # its inputs that came over the wire: by event
                assert {d for d in op.deps if by_id[d].kind == "xfer"} <= set(waits)
            elif op.dst == slot:            # a receive waits for nothing of its own rank
                assert waits == ()
            else:                           # a send waits for the compute that made it
                assert set(waits) == {d for d in op.deps if by_id[d].kind != "xfer" and by_id[d].slot == slot}


@pytest.mark.skipif(cupy_or_none() is None, reason="needs CuPy and a visible GPU")
def test_a_one_rank_nccl_communicator_on_this_gpu_sums_in_place():    # pragma: no cover - GPU hosts only
    import cupy
    from cupy.cuda import nccl
    from mpi4py import MPI
    with cupy.cuda.Device(device_for(0, 1, cupy.cuda.runtime.getDeviceCount())):
        comm = nccl_communicator(MPI.COMM_SELF, nccl)
        x = cupy.arange(4, dtype=cupy.float32)
        comm.allReduce(x.data.ptr, x.data.ptr, 4, nccl.NCCL_FLOAT32, nccl.NCCL_SUM, cupy.cuda.Stream.null.ptr)
        cupy.cuda.Stream.null.synchronize()
        assert x.tolist() == [0.0, 1.0, 2.0, 3.0]


class FakeCupy:
    """CuPy's runtime count of visible GPUs and its current device, recorded."""

    def __init__(self, visible: int) -> None:
        self.current = []
        runtime = SimpleNamespace(getDeviceCount=lambda: visible)
        self.cuda = SimpleNamespace(runtime=runtime,
                                    Device=lambda d: SimpleNamespace(use=lambda: self.current.append(d)))


def test_each_rank_makes_its_own_gpu_current():
    hosts = ["a", "a", "b", "b"]
    cps = [FakeCupy(2) for _ in hosts]
    got = [use_local_gpu(cp, FakeComm(r, hosts, {}), "SHARED") for r, cp in enumerate(cps)]
    assert got == [0, 1, 0, 1] and [cp.current for cp in cps] == [[0], [1], [0], [1]]
    with pytest.raises(ValueError, match="2 ranks on this machine but 1 GPUs"):
        use_local_gpu(FakeCupy(1), FakeComm(1, hosts, {}), "SHARED")


# --- the transport of a job's replicas (executor/nccl_transport.py) -------------------------------
@pytest.mark.parametrize("requested, device, have, algorithm, fail, want", [
    ("auto", "gpu", True, "sync", False, "nccl"), ("auto", "gpu", False, "sync", False, "mpi"),
    ("auto", "cpu", True, "sync", False, "mpi"), ("auto", "gpu", True, "sandblaster", False, "mpi"),
    ("auto", "gpu", True, "downpour", True, "mpi"), ("mpi", "gpu", True, "sync", False, "mpi"),
    ("nccl", "gpu", True, "downpour", False, "nccl")])
def test_auto_is_nccl_on_gpus_where_it_works_and_the_job_allows(requested, device, have, algorithm, fail, want):
    from executor.nccl_transport import choose_transport
    assert choose_transport(requested, device, have, algorithm, fail) == want


@pytest.mark.parametrize("device, have, algorithm, fail, words", [
    ("cpu", True, "sync", False, "needs --device gpu"), ("gpu", False, "sync", False, "needs CuPy with NCCL"),
    ("gpu", True, "sandblaster", False, "sandblaster"), ("gpu", True, "sync", True, "crashed rank")])
def test_nccl_where_it_cannot_run_is_one_line_naming_the_option(device, have, algorithm, fail, words):
    from clustersim.core.config import ConfigError
    from executor.nccl_transport import choose_transport
    with pytest.raises(ConfigError, match=words) as err:
        choose_transport("nccl", device, have, algorithm, fail)
    assert str(err.value).startswith("--transport: nccl: ") and "\n" not in str(err.value)


def test_transfers_get_a_cupy_stream_of_their_own_and_numpy_none():
    import numpy
    from executor.gpu import copy_stream
    made = []
    fake = SimpleNamespace(cuda=SimpleNamespace(Stream=lambda non_blocking: made.append(non_blocking) or "copy"))
    assert copy_stream(fake) == "copy" and made == [True]
    assert copy_stream(numpy) is None


@pytest.mark.parametrize("extra", [[], ["--device", "gpu"]])
def test_execute_with_nccl_and_no_gpu_exits_2_in_one_line(tmp_path, capsys, extra):
    from clustersim.cli import main
    if cupy_or_none() is not None:                     # pragma: no cover - GPU hosts
        pytest.skip("a GPU is visible here")
    assert main(["execute", str(ROOT / "scenarios" / "quickstart.toml"), "--transport", "nccl", *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("clustersim: error: --transport: nccl: ")


def test_gpu_runs_take_nccl_by_default_as_validate_gpu_starts_them():
    """``make validate-gpu`` runs ``clustersim execute --device gpu`` (compare.validate) with
    no --transport: the ranks then choose auto, which is NCCL where CuPy's NCCL works."""
    from clustersim.cli import parser
    from executor.nccl_transport import choose_transport
    from executor.ranks import nccl_of
    args = parser().parse_args(["execute", "s.toml", "--device", "gpu"])
    assert args.transport == "auto"
    assert choose_transport(args.transport, "gpu", True) == "nccl"
    sc = SimpleNamespace(training=SimpleNamespace(algorithm="sync"))
    assert nccl_of(SimpleNamespace(device="cpu", transport="auto", fail=None), sc) is None
    if cupy_or_none() is None:                        # here: no CuPy, so MPI
        assert nccl_of(SimpleNamespace(device="gpu", transport="auto", fail=None), sc) is None


@pytest.mark.skipif(cupy_or_none() is None, reason="needs CuPy with NCCL and a visible GPU")
def test_nccl_allreduce_on_the_copy_stream_is_ordered_after_the_compute_that_fed_it():   # pragma: no cover
    import cupy
    from mpi4py import MPI
    from executor.gpu import copy_stream
    from executor.nccl_transport import allreduce_sum, nccl_or_none
    nccl = nccl_or_none()
    if nccl is None:
        pytest.skip("needs CuPy built with NCCL")
    with cupy.cuda.Device(0):
        comm, stream = nccl_communicator(MPI.COMM_SELF, nccl), copy_stream(cupy)
        x = cupy.zeros(1 << 20, cupy.float32)
        x += 3.0                                    # queued on the compute stream before the allreduce
        allreduce_sum(comm, nccl, x, cupy, stream)
        x *= 2.0                                    # queued after it: waits for the copy stream
        assert float(x.sum()) == 6.0 * (1 << 20)


def test_only_worker_ranks_take_a_gpu_and_count_among_the_machine_s_gpu_ranks(monkeypatch):
    """A parameter-server shard (or Sandblaster's coordinator) runs NumPy and takes no GPU:
    2 workers and a shard fit 2 GPUs, each worker's GPU its index among the workers."""
    import executor.ranks as ranks
    sc = scenario_from_dict({"cluster": {"topology": "dgx-h100"}, "model": {"name": "mlp-digits"},
                             "parallel": {"replicas": 2, "ps_shards": 1}}, "t.toml")
    asked = []

    class World:
        def __init__(self, rank):
            self.rank = rank

        def Split(self, color, key):
            assert key == self.rank
            return SimpleNamespace(color=color, Free=lambda: asked.append(("freed", self.rank)))

        def allreduce(self, verdict, op):         # every rank's verdict: here, the ranks' own alone
            return verdict
    monkeypatch.setattr(ranks, "get_xp", lambda device, comm: asked.append((device, comm.color)) or device)
    monkeypatch.setattr("executor.backend.cupy_or_none", lambda: "cupy")
    assert [ranks.rank_xp(World(r), sc, "gpu") for r in range(3)] == ["gpu", "gpu", "cpu"]
    assert asked == [("gpu", 0), ("freed", 0), ("gpu", 0), ("freed", 1), ("cpu", 1), ("freed", 2)]


def test_a_worker_that_cannot_take_its_gpu_ends_every_rank(monkeypatch):
    """Reviews R42, R43: the workers raised, the shard went on and waited for them for ever;
    a worker without CuPy left the others in the machine's split; a CUDA error was no
    ValueError. Every rank learns of each (allreduces of the verdicts) and raises."""
    import executor.ranks as ranks
    from mpi4py import MPI
    sc = scenario_from_dict({"cluster": {"topology": "dgx-h100"}, "model": {"name": "mlp-digits"},
                             "parallel": {"replicas": 2, "ps_shards": 1}}, "t.toml")

    def rank(r, others_have_cupy=True, others_failed=False):
        return SimpleNamespace(rank=r, Split=lambda color, key: SimpleNamespace(Free=lambda: None),
                               allreduce=lambda mine, op: (mine and others_have_cupy) if op is MPI.LAND
                               else (mine or others_failed))
    monkeypatch.setattr("executor.backend.cupy_or_none", lambda: "cupy")
    with pytest.raises(ValueError, match="a worker rank could not take its GPU"):
        ranks.rank_xp(rank(2, others_failed=True), sc, "gpu")           # the shard
    with pytest.raises(ValueError, match="CuPy and a visible GPU on every worker rank"):
        ranks.rank_xp(rank(0, others_have_cupy=False), sc, "gpu")      # a worker with CuPy, another without

    def busy(device, comm):
        raise RuntimeError("cudaErrorDevicesUnavailable: all CUDA-capable devices are busy")
    monkeypatch.setattr(ranks, "get_xp", busy)
    with pytest.raises(ValueError, match="RuntimeError: cudaErrorDevicesUnavailable"):
        ranks.rank_xp(rank(0), sc, "gpu")


def test_a_gpu_rank_waits_for_its_device_before_reading_the_clock_and_numpy_does_not():
    from executor.backend import device_sync
    import numpy
    assert device_sync(numpy)() is None
    waited = []
    fake = SimpleNamespace(cuda=SimpleNamespace(Device=lambda: SimpleNamespace(synchronize=lambda: waited.append(1))))
    device_sync(fake)()
    assert waited == [1]


@pytest.mark.skipif(cupy_or_none() is None, reason="needs CuPy and a visible GPU")
@pytest.mark.parametrize("slots", [1, 2])
def test_a_step_on_the_gpu_equals_the_step_on_numpy(slots):     # pragma: no cover - GPU hosts only
    """``run_step`` on CuPy arrays: the loss and every gradient as on NumPy (the speech net
    at batch 16, whole and cut in two by channels; the softmax loss's slices included)."""
    import numpy as np
    from executor.backend import to_numpy
    from executor.kernels import init_params
    from executor.partitioned import Mailbox, run_step, slot_params
    cp = cupy_or_none()
    sc = scenario_from_dict({"cluster": {"topology": "dgx-h100"}, "model": {"name": "distbelief-speech", "batch_size": 16},
                             "parallel": {"model_parallel": slots}}, "gpu.toml")
    p = plan(sc, check_memory=False)
    rng = np.random.default_rng(0)
    params = slot_params(p, init_params(sc.model, rng, dtype=np.float32), contiguous=True)
    x = rng.standard_normal((16, *sc.model.input_shape), dtype=np.float32)
    y = rng.integers(0, sc.model.nodes[-1].out_shape[0], 16)
    on_cpu = run_step(p, set(range(slots)), params, x, y, Mailbox())
    gpu_params = {key: [cp.asarray(a) for a in arrs] for key, arrs in params.items()}
    on_gpu = run_step(p, set(range(slots)), gpu_params, cp.asarray(x), cp.asarray(y), Mailbox(), xp=cp)
    assert on_gpu.loss == pytest.approx(on_cpu.loss, rel=1e-5)
    assert on_gpu.grads.keys() == on_cpu.grads.keys()
    for key, gs in on_cpu.grads.items():
        for a, b in zip(gs, on_gpu.grads[key]):
            np.testing.assert_allclose(to_numpy(b), a, rtol=1e-3, atol=1e-6)
