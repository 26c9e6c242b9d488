"""Arguments every scenario command shares."""
from __future__ import annotations

import argparse


def scenario_args(sp: argparse.ArgumentParser) -> None:
    """``SCENARIO``, repeatable ``--set KEY=VALUE`` and ``--json``."""
    sp.add_argument("scenario")
    sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a scenario key, e.g. parallel.model_parallel=8")
    sp.add_argument("--json", action="store_true", help="print JSON instead of a table")
