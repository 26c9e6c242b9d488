"""The executor's ranks: ``mpiexec -n N python -m executor.ranks SCENARIO --plan FILE [...]``.

``clustersim execute`` plans once, writes the Plan (``clustersim.core.planio``) and starts
this itself on one machine; every rank loads that Plan (SCENARIO then only names the job,
as in ``ps``).  On a cluster, start the same module with your own ``mpiexec``/``srun``,
with a saved ``--plan`` or with SCENARIO and ``--set`` alone: then each rank plans the
scenario itself (the same Plan everywhere: planning is deterministic).  Ranks: one per device slot of every replica
(rank = replica x model_parallel + slot), then one per parameter-server shard.  Each step
a worker runs its slot's share of the Plan's op graph (activations over the replica's
communicator), then, by algorithm:

- ``sync`` without shards: average its slot's gradients with the same slot of the other
  replicas (non-blocking allreduce, polled) and take an SGD step;
- ``sync`` with shards: push the gradient; the shards apply the replicas' mean (with
  ``backup_workers`` b: of the first R - b replicas, dropping the late pushes); fetch;
- ``downpour`` / ``dcasgd`` / ``ssp``: fetch every n_fetch steps, push what it accumulated
  every n_push steps, never waiting for the others (Adagrad or DC-ASGD on the shards;
  under SSP a shard holds back the fetch of a worker more than ``staleness`` steps ahead);
- ``local``: its own SGD steps, parameters averaged every ``local_steps`` steps and after
  the last;
- ``sandblaster``: units of each batch from a coordinator rank, L-BFGS on the shards
  (``executor/sandblaster.py``; a replica of several slots talks through its slot 0).

``--fail K@S``: worker rank K stops at step S as a crashed machine would (it sends
nothing more); asynchronous training carries on without it.  Rank 0 alone prints and
writes files.  Spans are named by the Plan's devices, so executed and simulated traces
line up.  ``--transport``: a replica's messages and its slots' allreduce over NCCL on GPUs
(``executor/nccl_transport.py``; ``auto``: where CuPy's NCCL works) or over MPI through
the host; the parameter server's always over MPI.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np

from clustersim.core.config import ConfigError
from clustersim.core.plan import Plan, plan
from clustersim.core.planio import load_plan
from clustersim.core.scenario import load_scenario, parse_set

from executor.backend import get_xp
from executor.launch import pin
from executor.summary import LOCKSTEP, merge_trace, summary
from executor.checks import CHECKPOINT_EVERY, check, check_checkpoint, check_data, data_source, parse_fail
from executor.job import RankJob

# An aborting rank's error line is in the pipe to mpiexec's proxy; MPI_Abort tears the job
# down at once, and under load the proxy can be killed before it forwards the line.  A
# moment first, once, on the way out.
ABORT_GRACE_S = 0.2


def main(argv: list[str] | None = None) -> int:
    from mpi4py import MPI
    ap = argparse.ArgumentParser(prog="executor.ranks")
    ap.add_argument("scenario", help="the scenario file; with --plan it only names the job")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--plan", help="the Plan as clustersim.core.planio saves it (the scenario is not read)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--trace")
    ap.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
    ap.add_argument("--transport", default="auto", choices=("auto", "nccl", "mpi"),
                    help="a replica's messages and allreduces: NCCL's (GPUs) or MPI's through the host")
    ap.add_argument("--fail")
    ap.add_argument("--checkpoint", help="folder where each shard keeps shard<k>.npz")
    ap.add_argument("--checkpoint-every", type=int, help=f"default {CHECKPOINT_EVERY}")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--data", help="folder with MNIST's four IDX files")
    args = ap.parse_args(argv)
    world = MPI.COMM_WORLD
    pin(world.rank, world.size)
    try:
        p = plan_of(args)
        sc = p.scenario
        check(sc, world.size)
        fail = parse_fail(args.fail, sc)
        check_checkpoint(args, sc)
        args.loaded = check_data(args.data, sc)
        xp = rank_xp(world, sc, args.device)
        nccl = nccl_of(args, sc)
    except (ConfigError, ValueError) as exc:
        if world.rank == 0:
            print(f"clustersim: error: {exc}", file=sys.stderr)
        return 2
    try:
        # a diverging run overflows: ``finite`` reports it once (``diverged``), not numpy's
        # warnings from every rank and layer
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            mine = RankJob(p, world, xp, fail, args, nccl).go()
        parts = world.gather(mine, root=0)
        if world.rank == 0:
            trace = merge_trace(p, [spans for _, spans, _ in parts], [steps for _, _, steps in parts])
            out = finite(summary(p, trace, [part for part, _, _ in parts]))
            out["data"] = data_source(p.scenario, args.loaded)
            if args.trace:
                trace.save(args.trace)
            print(json.dumps(out, indent=2) if args.json else _text(out))
    except Exception as exc:            # the other ranks would wait for this one forever: end them all
        abort(world, exc)
    return 0


def rank_xp(world, sc, device: str):
    """This rank's array module: a worker's on ``device`` (its GPU: its index among the
    workers on its machine), NumPy for a parameter-server shard or Sandblaster's
    coordinator, which never touch a GPU and take none from the workers.  Collective: where
    a worker cannot take its GPU, every rank raises."""
    from mpi4py import MPI
    from executor.backend import cupy_or_none
    worker = world.rank < sc.parallel.devices_per_replica * sc.parallel.replicas
    gpu = device == "gpu" and worker
    # first whether every worker has CuPy and a GPU: one without would leave the others in
    # get_xp's split of the machine's ranks, and a shard waiting for its workers, for ever
    if not world.allreduce(not gpu or cupy_or_none() is not None, op=MPI.LAND):
        raise ValueError("device gpu needs CuPy and a visible GPU on every worker rank (pip install 'clustersim[gpu]')")
    workers = world.Split(color=0 if worker else 1, key=world.rank)
    xp, err = None, None
    try:
        xp = get_xp(device if worker else "cpu", workers)
    except Exception as exc:            # a CUDA error too: every rank must learn of it
        err = exc if isinstance(exc, ValueError) else ValueError(f"{type(exc).__name__}: {exc}")
    finally:
        workers.Free()
    if world.allreduce(err is not None, op=MPI.LOR):
        raise err or ValueError("a worker rank could not take its GPU")
    return xp


def nccl_of(args, sc):
    """``cupy.cuda.nccl`` where the job's replicas run on NCCL (``choose_transport`` of
    ``--transport``), else None (MPI); ConfigError where ``--transport nccl`` cannot run."""
    from executor.nccl_transport import choose_transport, nccl_or_none
    nccl = nccl_or_none() if args.device == "gpu" and args.transport != "mpi" else None
    kind = choose_transport(args.transport, args.device, nccl is not None, sc.training.algorithm, bool(args.fail))
    return nccl if kind == "nccl" else None


def abort(world, exc: BaseException) -> None:
    """Ends the whole job for ``exc`` raised on this rank: its one line on stderr, then
    MPI_Abort (the other ranks would wait for this one forever)."""
    print(error_line(world.rank, exc), file=sys.stderr, flush=True)
    _quiet_stderr()                     # MPI_Abort's own line would say only that it was called
    time.sleep(ABORT_GRACE_S)           # the launcher's proxy forwards the line before the job is torn down
    world.Abort(1)


def plan_of(args) -> Plan:
    """The Plan from ``--plan``, else the scenario's (with ``--set``) planned here;
    ConfigError naming ``--plan`` for a file that cannot be read as one."""
    if not args.plan:
        return plan(load_scenario(args.scenario, parse_set(args.set)))
    if args.set:
        raise ConfigError("--set", args.set[0], "the Plan is made already: give --set where it is planned")
    try:
        return load_plan(args.plan)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError("--plan", args.plan, f"cannot read a Plan there ({exc})") from None


def _quiet_stderr() -> None:
    import os
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)


def error_line(rank: int, exc: BaseException) -> str:
    """One line for an exception that ends the job: the rank, the exception and where it
    was raised (the innermost frame)."""
    import traceback
    from pathlib import Path
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""
    text = " ".join(str(exc).split())
    return f"clustersim: error: rank {rank}: {type(exc).__name__}{': ' + text if text else ''}{where}"


def finite(out: dict) -> dict:
    """The summary with each non-finite number null (JSON has no NaN) and, where the loss
    was one, ``diverged`` true: the training overflowed its weights (too large a step)."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    diverged = any(isinstance(out.get(k), float) and not math.isfinite(out[k]) for k in ("loss", "train_loss"))
    return {**clean(out), **({"diverged": True} if diverged else {})}


def _text(s: dict) -> str:
    how = "median over workers" if s["algorithm"] in LOCKSTEP else "a replica's period, waits included"
    return (f"{s['name']}: executed {s['algorithm']} training of {s['model']} on {s['ranks']} ranks "
            f"({s['workers']} workers, {s['ps_shards']} shards)\n"
            f"  step time        {s['step_time_s'] * 1e3:.4g} ms ({how})\n"
            f"  throughput       {s['samples_per_s']:.4g} samples/s\n"
            f"  accuracy         {s['accuracy']:.2%} (test loss "
            f"{'diverged' if s['loss'] is None else format(s['loss'], '.4g')}"
            f"{'; synthetic data, random labels: chance' if s.get('data') == 'synthetic' else ''})\n"
            f"  wall             {s['wall_s']:.3g} s")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:          # Ctrl-C reaches every rank: the launcher says it once, not 2 x 20 lines
        sys.exit(130)
