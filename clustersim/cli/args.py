"""Arguments every scenario command shares."""
from __future__ import annotations

import argparse


def scenario_args(sp: argparse.ArgumentParser) -> None:
    """``SCENARIO``, repeatable ``--set KEY=VALUE`` and ``--json``."""
    sp.add_argument("scenario")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a scenario key, e.g. parallel.model_parallel=8")
    sp.add_argument("--json", action="store_true", help="print JSON instead of a table")


def transport_arg(sp: argparse.ArgumentParser) -> None:
    """``--transport auto|nccl|mpi``: what carries a replica's messages and allreduces."""
    sp.add_argument("--transport", default="auto", choices=("auto", "nccl", "mpi"),
                    help="NCCL between GPUs, or MPI through the host (default auto: nccl with --device gpu where "
                         "CuPy's NCCL works, else mpi); the parameter server is always on MPI")
