"""``clustersim execute``: run the partitioned network for real on MPI ranks."""
from __future__ import annotations

import signal
import subprocess
from pathlib import Path

from clustersim import api
from clustersim.cli.args import count, scenario_args, transport_arg
from clustersim.core.config import ConfigError
from clustersim.core.trace import check_writable


def add(sub) -> None:
    e = sub.add_parser("execute", help="run the scenario's partitioned network for real on MPI ranks")
    scenario_args(e)
    e.add_argument("--ranks", type=count("--ranks"), help="MPI ranks (default: model_parallel x replicas)")
    e.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
    transport_arg(e)
    e.add_argument("--trace", metavar="FILE", help="write the merged Chrome trace of all ranks")
    e.add_argument("--fail", action="append", metavar="rank=K@step=S",
                   help="worker rank K stops at step S like a crashed machine (one per run)")
    e.add_argument("--checkpoint", metavar="DIR", help="parameter-server shards checkpoint here")
    e.add_argument("--checkpoint-every", type=int, metavar="N", help="updates between checkpoints (default 100)")
    e.add_argument("--resume", action="store_true", help="start the shards from the checkpoints in --checkpoint")
    e.add_argument("--data", metavar="DIR", help="train on MNIST from its four IDX files in DIR (gzipped or not); "
                                                 "the model must take 784 inputs")
    e.set_defaults(func=run)


def run(args) -> int:
    """Checks the input and plans here (one clean line on error), then starts ``mpiexec``
    with one rank per replica slot running ``executor.ranks`` on that Plan, its output
    passed through; the Plan's file lives in a temporary folder for the run's length."""
    import tempfile

    from executor.checks import check_checkpoint, check_data, check_folder, make_folder, parse_fail
    if args.fail and len(args.fail) > 1:    # executor.ranks crashes one worker per run
        raise ConfigError("--fail", args.fail[1], "give one --fail: a run crashes one worker")
    args.fail = args.fail[0] if args.fail else None
    sc = api.load(args.scenario, args.set)
    parse_fail(args.fail, sc)
    check_checkpoint(args, sc)
    check_data(args.data, sc)
    if args.trace:                         # rank 0 writes it after the run: refused now, not then
        check_writable(args.trace, "--trace")
    extra = ["--transport", args.transport] if args.transport != "auto" else []
    if args.transport == "nccl":            # here, in one line, rather than on every rank
        from executor.ranks import nccl_of
        nccl_of(args, sc)
    if args.device == "gpu":
        from executor.backend import cupy_or_none
        if cupy_or_none() is None:          # here, in one line, rather than on every rank
            raise ConfigError("--device", "gpu", "needs CuPy and a visible GPU (pip install 'clustersim[gpu]' "
                              "on a GPU host)")
    if args.fail:
        extra += ["--fail", args.fail]
    if args.checkpoint:
        extra += ["--checkpoint", args.checkpoint]
        extra += ["--checkpoint-every", str(args.checkpoint_every)] if args.checkpoint_every else []
    if args.resume:
        extra.append("--resume")
    if args.data:
        extra += ["--data", str(Path(args.data).resolve())]
    launched: list[subprocess.Popen] = []
    old = signal.signal(signal.SIGTERM, lambda *_: _terminated(launched))
    try:
        with tempfile.TemporaryDirectory(prefix="clustersim-execute-") as workdir:
            cmd, env = api.execute_command(args.scenario, args.set, workdir=workdir, ranks=args.ranks or 0,
                                           device=args.device, json_out=args.json, trace=args.trace, extra=extra)
            folders = ([("--checkpoint", args.checkpoint, False)] if args.checkpoint else []) + \
                ([("--trace", args.trace, True)] if args.trace else [])   # as simulate --trace: its folder
            for option, given, inside in folders:   # last, once the scenario is checked and planned, and
                check_folder(option, given, inside)  # all before any is made: a refused run leaves none
            for option, given, inside in folders:
                make_folder(option, given, inside)
            launched.append(subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent))
            return launched[0].wait()
    finally:
        signal.signal(signal.SIGTERM, old)


def _terminated(launched: list) -> None:
    """A SIGTERM to this process (a timeout, a scheduler): handed on to ``mpiexec`` where it
    runs (it stops its ranks; its end is waited out), else the run ends here; either way
    the temporary folder is removed as after any other end."""
    if launched:
        launched[0].terminate()
    else:
        raise SystemExit(143)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when this process dies (mpiexec then stops its
    ranks), so a killed ``clustersim execute`` leaves no ranks running."""
    import ctypes
    import signal
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)          # PR_SET_PDEATHSIG
