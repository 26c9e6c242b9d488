"""The ``clustersim`` command, one module per sub-command (each has ``add`` and ``run``).
Bad input anywhere: one line on stderr naming the file and field, exit code 2, no
traceback; files are written whole or not at all.  A job that stalls exits 3."""
from __future__ import annotations

import argparse
import os
import sys

from clustersim.cli import (calibrate, collective, execute, model, plan, published, search, simulate, sweep,
                            topology, validate)
from clustersim.core.config import ConfigError

COMMANDS = (simulate, collective, sweep, search, execute, calibrate, validate, published, topology, plan, model)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)       # inside: a ``type=`` check raises ConfigError
        return args.func(args)
    except ConfigError as exc:
        print(f"clustersim: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("clustersim: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:            # output piped into `head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


class OneLineParser(argparse.ArgumentParser):
    """argparse's refusals (an unknown option, a value of the wrong type, a choice not
    offered) as one line, where argparse prints its usage block first; exit 2 as before."""

    def error(self, message: str):
        self.exit(2, f"clustersim: error: {message} (see {self.prog} --help)\n")


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="clustersim", description="Predict how fast a partitioned network trains "
                                                     "on a cluster, and check it against real runs.")
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add(sub)
    return p


if __name__ == "__main__":
    sys.exit(main())
