"""``clustersim collective``: an nccl-tests-style table of predicted collective times."""
from __future__ import annotations

import json
import re

from clustersim import api, report
from clustersim.cli.args import count
from clustersim.core.collective import ALGOS, OPS
from clustersim.core.config import ConfigError
from clustersim.core.nccl import PROTOCOLS, VERSION
from clustersim.core.scenario import NETWORKS
from clustersim.core.topology import NoRoute

_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def add(sub) -> None:
    c = sub.add_parser("collective", help="nccl-tests-style table of predicted collective times")
    c.add_argument("--topology", required=True)
    c.add_argument("--op", default="allreduce", choices=OPS)
    c.add_argument("--algo", default="auto", choices=ALGOS,
                   help=f"auto: NCCL's tuner (its {VERSION} cost model) picks ring, tree or NVLink SHARP "
                        "(nvls on one machine, nvls_tree across machines) per size")
    c.add_argument("--protocol", default="", choices=("", *PROTOCOLS),
                   help="NCCL protocol on GPUs (default: what the tuner picks)")
    c.add_argument("--gpus", type=count("--gpus"), help="ranks (default: every compute device)")
    c.add_argument("--machines", type=count("--machines"), help="override the topology's machine count")
    c.add_argument("--bytes", default="8..1G", help="SIZE or MIN..MAX, doubling (8..1G)")
    c.add_argument("--network", default="flow", choices=NETWORKS,
                   help="flow: links shared max-min fair (default); analytical: alpha-beta times, no contention")
    c.add_argument("--nccl", default="", metavar="VERSION",
                   help=f"the NCCL whose kernels lay out NVLS chunks, e.g. 2.18.5 (default: the tuner's, {VERSION})")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=run)


def parse_size(text: str) -> int:
    """``64K``, ``1M``, ``1GB`` or ``1GiB`` (binary multiples of bytes); a lowercase ``b``,
    bits to most readers, is refused rather than read as bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMGTkmgt]?)(?:i?B)?\s*", text)
    if not m or int(m.group(1)) < 1:
        raise ConfigError("--bytes", text, "sizes look like 8, 64K, 1M, 1G or 1T (bytes)")
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def size_range(text: str) -> list[int]:
    lo, sep, hi = text.partition("..")
    a = parse_size(lo)
    b = parse_size(hi) if sep else a
    if b < a or b > 2**40:
        raise ConfigError("--bytes", text, "must be MIN..MAX with MIN <= MAX <= 1T")
    sizes = []
    while a <= b:
        sizes.append(a)
        a *= 2
    return sizes


def run(args) -> int:
    try:
        rows = api.collective(args.topology, args.op, args.algo, size_range(args.bytes), gpus=args.gpus or 0,
                              machines=args.machines or 0, network=args.network, protocol=args.protocol,
                              nccl=args.nccl)
    except NoRoute as exc:
        raise ConfigError(args.topology, "link", f"{exc}, and the {args.op} sends data between them") from None
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    n = args.gpus or "all"
    print(f"# {args.op} by {args.algo} over {n} ranks of {args.topology} ({args.network} network model)")
    shown = [{**r, "time_us": r["time_s"] * 1e6} for r in rows]
    print(report.table(shown, [("bytes", "size (B)"), ("algo", "algo"), ("protocol", "protocol"), ("time_us", "time (us)"),
                               ("algbw_gbps", "algbw (GB/s)"), ("busbw_gbps", "busbw (GB/s)")]))
    return 0
