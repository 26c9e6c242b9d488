"""``clustersim model import``: an ONNX graph as a clustersim model, shown layer by layer
and written as a model TOML with ``--out``."""
from __future__ import annotations

from clustersim import api, report


def add(sub) -> None:
    m = sub.add_parser("model", help="model files: import an ONNX graph")
    verbs = m.add_subparsers(dest="verb", required=True)
    imp = verbs.add_parser("import", help="read an ONNX graph (needs the onnx extra); show and save it as a model TOML")
    imp.add_argument("file", help="an .onnx file")
    imp.add_argument("--out", metavar="FILE", help="write the model TOML (use it as model.file in a scenario)")
    imp.set_defaults(func=run)


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
