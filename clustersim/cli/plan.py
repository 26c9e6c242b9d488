"""``clustersim plan``: how a scenario is partitioned and placed."""
from __future__ import annotations

from clustersim import api, report
from clustersim.core.config import ConfigError
from clustersim.core.plan import GIB, data_parallel_bytes, plan as make_plan
from clustersim.core.planio import save_plan
from clustersim.core.schedule import ranks_needed


def add(sub) -> None:
    pl = sub.add_parser("plan", help="show how a scenario is partitioned and placed")
    pl.add_argument("scenario")
    pl.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    pl.add_argument("--save", metavar="FILE", help="write the Plan (JSON) for ranks you launch yourself: "
                                                   "mpiexec -n N python -m executor.ranks SCENARIO --plan FILE")
    pl.set_defaults(func=run)


def run(args) -> int:
    if args.save == "":                         # taken as no --save: nothing written, nothing said
        raise ConfigError("--save", "''", "is empty; give the file to write the Plan to")
    sc = api.load(args.scenario, args.set)
    p = make_plan(sc)
    print(f"{sc.name}: {sc.model.name}, {p.slots} slot(s) x {p.replicas} replica(s), split {sc.parallel.split}, "
          f"sync {p.sync}" + (f", {sc.parallel.stages} stages x {sc.parallel.micro_batches} micro-batch"
                              f"{'es' if sc.parallel.micro_batches > 1 else ''} ({sc.parallel.schedule})"
                              if sc.parallel.stages > 1 and sc.training.algorithm != "layerwise" else
                              f", {sc.parallel.micro_batches} micro-batches (gradients accumulated)"
                              if sc.parallel.micro_batches > 1 and sc.parallel.stages == 1 else "")
          + (f", sequence parallel" if sc.parallel.sequence_parallel else "")
          + (f", ZeRO {sc.training.zero}" if sc.training.zero else "")
          + (f", recompute {sc.training.recompute}" if sc.training.recompute not in ("", "none") else ""))
    for node, sl, axis in zip(sc.model.nodes, p.slices, p.axes):
        cut = ", ".join(f"{slot}:{'x'.join(str(b - a) for a, b in box)}" for slot, box in sl)
        print(f"  L{node.index:<3} {node.layer.kind:<18} out {'x'.join(map(str, node.out_shape)):<12} "
              f"params {node.params:<12} by {axis:<8} [{cut}]")
    totals: dict[str, float] = {}
    for op in p.ops:
        if op.kind == "xfer":
            totals[op.why] = totals.get(op.why, 0.0) + op.bytes
    print("  per replica and step: " + (", ".join(f"{k} {report.si(v, 'B')}" for k, v in sorted(totals.items()))
                                        or "no transfers inside a replica"))
    across: dict[str, float] = {}
    for use in data_parallel_bytes(p):
        for k, v in use.items():
            across[k] = across.get(k, 0.0) + v
    if across:
        print("  data parallel, sent per replica and step: "
              + ", ".join(f"{k} {report.si(v, 'B')}" for k, v in across.items()))
    for r, row in enumerate(p.devices):
        print(f"  replica {r}: " + ", ".join(row))
    if p.ps:
        print("  parameter-server shards: " + ", ".join(f"{d} ({report.si(n, 'params')})"
                                                       for d, n in zip(p.ps.devices, p.ps.sizes)))
    for dev, use in p.memory.items():      # GiB, as the memory check and a GPU's datasheet count
        terms = ", ".join(f"{k} {v / GIB:.4g}" for k, v in use.items() if v)
        print(f"  memory {dev}: {sum(use.values()) / GIB:.4g} GiB of {sc.topology.devices[dev].memory_bytes / GIB:.4g} "
              f"({terms})")
    if args.save:
        save_plan(p, args.save)
        print(f"  wrote plan: {args.save} (mpiexec -n {ranks_needed(sc)} python -m executor.ranks "
              f"{args.scenario} --plan {args.save})")
    return 0
