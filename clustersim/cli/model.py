"""``clustersim model list``: the built-in models; ``clustersim model import``: an ONNX graph
as a clustersim model, shown layer by layer and written as a model TOML with ``--out``."""
from __future__ import annotations

from clustersim import api, report


def add(sub) -> None:
    m = sub.add_parser("model", help="the built-in models; import an ONNX graph")
    verbs = m.add_subparsers(dest="verb", required=True)
    imp = verbs.add_parser("import", help="read an ONNX graph (needs the onnx extra); show and save it as a model TOML")
    imp.add_argument("file", help="an .onnx file")
    imp.add_argument("--out", metavar="FILE", help="write the model TOML (use it as model.file in a scenario)")
    imp.set_defaults(func=run)
    ls = verbs.add_parser("list", help="the built-in models: parameters and forward FLOPs per sample")
    ls.set_defaults(func=run_list)


def run_list(args) -> int:
    """Every built-in model (``model.name``), with its input, layers, parameters and
    forward FLOPs per sample (the transformers' at their full context)."""
    from clustersim.core.models import ZOO, zoo_model
    rows = []
    for name in ZOO:
        model = zoo_model(name)
        rows.append({"name": name, "input": "x".join(map(str, model.input_shape)), "layers": len(model.nodes),
                     "params": model.params, "fwd_flops": report.si(model.fwd_flops, "FLOP")})
    print(report.table(rows, [("name", "model.name"), ("input", "input"), ("layers", "layers"),
                              ("params", "parameters"), ("fwd_flops", "forward per sample")]))
    return 0


def run(args) -> int:
    model = api.import_onnx(args.file, args.out)
    print(f"{model.name}: input {'x'.join(map(str, model.input_shape))} per sample (the batch is the scenario's "
          f"model.batch_size), {len(model.nodes)} layers, {report.si(model.params, 'params')}, "
          f"{report.si(model.fwd_flops, 'FLOP')} forward per sample")
    for node in model.nodes:
        reads = ", ".join("input" if s < 0 else model.nodes[s].name for s in node.inputs)
        print(f"  {node.name:<24} {node.layer.kind:<14} out {'x'.join(map(str, node.out_shape)):<12} "
              f"params {node.params:<10} reads {reads}")
    if args.out:
        print(f"  wrote model: {args.out}")
    return 0
