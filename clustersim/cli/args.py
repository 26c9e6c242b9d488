"""Arguments every scenario command shares."""
from __future__ import annotations

import argparse
from pathlib import Path

from clustersim.core.config import ConfigError


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


def plot_arg(sp: argparse.ArgumentParser, help: str) -> None:
    """``--plot FILE``, its type checked while the arguments are read, before any work."""
    sp.add_argument("--plot", metavar="FILE", type=plot_file, help=help)


def plot_file(text: str) -> str:
    """An argparse ``type=``: ``text`` when matplotlib can write its extension.  Raises
    ConfigError naming ``--plot`` (``main`` makes it one line, exit 2)."""
    from clustersim.plots import formats
    ext = Path(text).suffix.lower()
    if ext[1:] not in formats():
        raise ConfigError("--plot", text, f"cannot draw {f'a {ext} file' if ext else 'a file without an extension'}; "
                                          f"give one of .{', .'.join(formats())}")
    return text


def count(option: str):
    """An argparse ``type=`` for a count of at least 1; ConfigError naming ``option``
    otherwise (``main`` makes it one line, exit 2)."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            n = 0
        if n < 1:
            raise ConfigError(option, text, "must be a whole number >= 1")
        return n
    return parse
