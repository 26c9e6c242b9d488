"""ONNX graphs as clustersim models; a model as model TOML.

``load_onnx`` reads a file with the ``onnx`` package (imported here, lazily: ``import
clustersim`` stays light), infers shapes with ``onnx.shape_inference`` with the graph
input's first dimension made symbolic (clustersim models are per sample; the batch is the
scenario's ``model.batch_size``) and maps the nodes that compute on the activation onto
layer kinds; nodes that only compute shapes (Shape, Constant, ...) and dead ends are left
out.  Every layer's parameters must equal the sizes of the initializers its node reads
and its shape must equal onnx's inferred shape, or the import stops naming the node.

Mapped: Gemm and MatMul (+ Add of an initializer) -> dense (a dense without a bias is a
conv2d whose kernel covers the input, bias = false); Conv -> conv2d; MaxPool,
AveragePool, GlobalMaxPool, GlobalAveragePool -> max_pool / avg_pool;
BatchNormalization -> batchnorm (scale and bias are its parameters; the running mean
and variance are statistics, as torchvision counts); Relu, Sigmoid, Tanh, Gelu;
Dropout; Add, Sum -> add; Concat on channels -> concat; Flatten, Reshape to
(batch, features), Identity -> nothing (a dense layer reads its input flattened);
Softmax or LogSoftmax on the output, SoftmaxCrossEntropyLoss -> softmax_xent, which is
appended when the graph has no loss.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from math import prod
from pathlib import Path
from typing import Any, Callable

from clustersim.core.config import ConfigError
from clustersim.core.layers import KINDS, Layer, Shape
from clustersim.core.models import INPUT_NAME, GraphError, Model, build_model, make_layer

BATCH = "batch"                                  # the symbolic first dimension shape inference sees
SHAPE_OPS = ("Shape", "Size")                    # read an activation, output no activation
LOSS_OPS = ("SoftmaxCrossEntropyLoss",)          # (scores, labels): labels are no activation
MAX_DROPOUT = 0.999                              # the largest rate a model file's dropout layer takes


@dataclass(frozen=True)
class _Act:
    """An activation as clustersim holds it: the layer that makes it (``INPUT_NAME``: the
    model's input) and that layer's output shape; ``flat`` where ONNX has flattened it
    (a dense layer reads any shape flattened, so no layer is needed)."""

    src: str
    shape: Shape
    flat: bool = False


def load_onnx(path: Path) -> Model:
    """The clustersim model of an ONNX file.  Raises ConfigError naming the file (and the
    node, for an operator or attribute that does not map: one line)."""
    try:
        import onnx
    except ImportError:
        raise ConfigError(str(path), "", "reading ONNX needs the onnx package: pip install 'clustersim[onnx]'") from None
    try:
        proto = onnx.load(str(path))
    except OSError as exc:
        raise ConfigError(str(path), "", f"cannot read ONNX file ({exc.__class__.__name__})") from None
    except Exception as exc:                    # protobuf's DecodeError (its module varies by version), or
        said = str(exc).strip().splitlines()    # onnx's ValidationError (external data not found)
        if said and exc.__class__.__name__ != "DecodeError":
            raise ConfigError(str(path), "", f"cannot load the model ({exc.__class__.__name__}: {said[0][:240]})") \
                from None
        raise ConfigError(str(path), "", f"not an ONNX model ({exc.__class__.__name__})") from None
    if not proto.graph.node:
        raise ConfigError(str(path), "graph.node", "the graph has no nodes (an empty or truncated file?)")
    try:
        return _Importer(str(path), proto).run()
    except (ValueError, TypeError, IndexError, KeyError, ArithmeticError) as exc:    # a graph no check foresaw
        said = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ConfigError(str(path), "", f"cannot map the graph ({exc.__class__.__name__}: {said})") from None


class _Importer:
    """One file's import: constants, inferred shapes, and the layers made so far."""

    def __init__(self, file: str, proto: Any) -> None:
        from onnx import numpy_helper
        self.file, self.graph = file, proto.graph
        self.opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
        # initializers and Constant nodes: a mapped layer's constants are its parameters
        self.consts: dict[str, Any] = {t.name: self._array(numpy_helper, t, f"initializer {t.name!r}")
                                       for t in self.graph.initializer}
        for node in self.graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.consts[node.output[0]] = self._array(numpy_helper, node.attribute[0].t,
                                                          f"node {node.name or node.output[0]!r}")
        self.input = self._data_input()
        self.proto = proto
        self.inferred: dict[str, tuple] = {}
        self.batched: set[str] = set()           # tensors whose first dimension is still the batch
        self.acts: dict[str, _Act] = {}
        self.layers: list[Layer] = []
        self.names: list[str] = []
        self.inputs: list[tuple[str, ...]] = []
        self.taken: set[str] = {INPUT_NAME}
        self.skip: set[int] = set()              # nodes folded into an earlier layer (MatMul's Add)
        self.owners: dict[str, str] = {}         # constant -> the node whose parameters it is

    def _array(self, numpy_helper: Any, tensor: Any, where: str) -> Any:
        """A stored tensor's values; ConfigError naming it where its data does not read (too
        few bytes for its shape, no element type)."""
        try:
            return numpy_helper.to_array(tensor)
        except (ValueError, TypeError) as exc:
            said = (str(exc).strip().splitlines() or [""])[0][:200]
            raise ConfigError(self.file, where, f"its data cannot be read ({exc.__class__.__name__}: {said})") \
                from None

    # --- reading the graph --------------------------------------------------------------
    def error(self, node: Any, message: str) -> ConfigError:
        return ConfigError(self.file, f"node {node.name or node.output[0]!r}", f"{node.op_type}: {message}")

    def _data_input(self) -> Any:
        labels = {n.input[1] for n in self.graph.node if n.op_type in LOSS_OPS and len(n.input) > 1}
        real = [i for i in self.graph.input if i.name not in self.consts and i.name not in labels]
        if len(real) != 1:
            raise ConfigError(self.file, "graph.input", f"clustersim models read one input, this graph reads "
                                                        f"{len(real)}: {', '.join(i.name for i in real) or 'none'}")
        if len(self.graph.output) != 1:
            raise ConfigError(self.file, "graph.output", f"clustersim models have one output, this graph has "
                                                         f"{len(self.graph.output)}")
        return real[0]

    def _infer(self, proto: Any) -> dict[str, tuple]:
        """Per-sample shapes (batch dimension dropped; None: unknown) by onnx's shape
        inference, with the input's first dimension made the symbol ``BATCH``; notes in
        ``batched`` the tensors whose first dimension is that symbol."""
        import onnx
        dims = self.input.type.tensor_type.shape.dim
        if len(dims) not in (2, 4) or any(d.dim_value < 1 for d in dims[1:]):
            shown = [d.dim_value or d.dim_param or "?" for d in dims]
            raise ConfigError(self.file, f"input {self.input.name!r}", f"must be (batch, features) or (batch, C, H, "
                                                                       f"W) with fixed sizes after the batch, got {shown}")
        dims[0].dim_param = BATCH               # fixed or symbolic before: the scenario's batch now
        del proto.graph.value_info[:]           # the exporter's shapes may hold its fixed batch
        try:
            done = onnx.shape_inference.infer_shapes(proto, strict_mode=True, data_prop=True)
        except Exception as exc:                # onnx raises InferenceError, or ValidationError for an opset
            raise ConfigError(self.file, "", f"onnx shape inference failed: {str(exc).splitlines()[0]}") from None
        out = {}
        for vi in [*done.graph.input, *done.graph.value_info, *done.graph.output]:
            if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
                dims = vi.type.tensor_type.shape.dim
                out[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)[1:]
                if dims and dims[0].dim_param == BATCH:
                    self.batched.add(vi.name)
        return out

    def _live_nodes(self) -> list[int]:
        """Positions of the nodes on the activation's path to the output, in file order
        (ONNX keeps nodes topologically sorted)."""
        nodes, act = self.graph.node, {self.input.name}
        on_path = []
        for i, n in enumerate(nodes):
            if n.op_type not in SHAPE_OPS and any(x in act for x in n.input):
                on_path.append(i)
                act.update(o for o in n.output if o)
        needed, live = {self.graph.output[0].name}, []
        for i in reversed(on_path):
            if any(o in needed for o in nodes[i].output):
                live.append(i)
                needed.update(x for x in nodes[i].input if x in act)
        return live[::-1]

    # --- building -----------------------------------------------------------------------
    def run(self) -> Model:
        nodes, live = self.graph.node, self._live_nodes()
        for i in live:                          # what cannot map is said before what the shapes are
            if nodes[i].op_type not in _HANDLERS:
                raise self.error(nodes[i], f"operator not supported (clustersim maps {', '.join(sorted(_HANDLERS))})")
        self.inferred = self._infer(self.proto)
        shape = _per_sample(self.inferred[self.input.name])
        self.acts[self.input.name] = _Act(INPUT_NAME, shape)
        for i in live:
            if i not in self.skip:
                _HANDLERS[nodes[i].op_type](self, i)
        out = self.acts.get(self.graph.output[0].name)
        if out is None or out.src == INPUT_NAME:
            raise ConfigError(self.file, "graph.output", "no layer computes the output")
        if self.layers[-1].kind != "softmax_xent" or self.names[-1] != out.src:
            out = self._loss(out)
        classes = out.shape[0] if out.shape[1:] == (1, 1) else 0
        name = Path(self.file).stem            # exporters' graph names are theirs ("main_graph"), not the model's
        try:
            return build_model(name, shape, self.layers, classes, self.names, self.inputs)
        except GraphError as exc:
            raise ConfigError(self.file, "", str(exc)) from None

    def _loss(self, out: _Act) -> _Act:
        """softmax_xent on ``out``, appended: the graph has no loss."""
        if out.flat:
            raise ConfigError(self.file, "graph.output", f"the loss needs a flat output; it is "
                                                         f"{out.shape} flattened by a Flatten or Reshape")
        return self.add(None, make_layer("softmax_xent"), [out], "loss")

    def add(self, node: Any, layer: Layer, reads: list[_Act], name: str = "", params: tuple[str, ...] = (),
            out: str = "", flat: bool = False) -> _Act:
        """Appends ``layer`` reading ``reads`` and records it as the activation ``out``
        (default: the node's first output; ``flat``: ONNX sees it flattened).  For a node,
        checks the layer's parameters against the sizes of the constants ``params`` and its
        shape against onnx's inferred one."""
        try:
            in_shape = layer.merge(tuple(a.shape for a in reads))
            shape = layer.shape(in_shape)
        except ValueError as exc:
            if node is None:
                raise ConfigError(self.file, "", str(exc)) from None
            raise self.error(node, str(exc)) from None
        if node is not None:
            out = out or node.output[0]
            for p in params:
                if p and self.owners.setdefault(p, node.name or node.output[0]) != (node.name or node.output[0]):
                    raise self.error(node, f"its parameter {p!r} belongs to node {self.owners[p]!r} too: tied weights "
                                           f"are not supported (each layer owns its parameters; they would count twice)")
            have = sum(self.consts[p].size for p in params if p)
            if have != layer.params(in_shape):
                raise self.error(node, f"its constants hold {have} parameters, a {layer.kind} layer on "
                                       f"{in_shape} has {layer.params(in_shape)}")
            theirs = self.inferred.get(out)
            if theirs and None not in theirs and (prod(theirs) != prod(shape) if flat
                                                  else _per_sample(theirs) != shape):
                raise self.error(node, f"maps to {layer.kind} with output {shape}, onnx infers {tuple(theirs)}")
        label = self._unique(name or node.name or node.output[0])
        self.layers.append(layer)
        self.names.append(label)
        self.inputs.append(tuple(a.src for a in reads))
        act = _Act(label, shape, flat and shape[1:] != (1, 1))
        if out:
            self.acts[out] = act
        return act

    def rank(self, name: str) -> int:
        """The ONNX rank of activation ``name``, batch included."""
        if name in self.inferred:
            return len(self.inferred[name]) + 1
        a = self.acts[name]
        return 2 if a.flat or a.shape[1:] == (1, 1) else 4

    def _unique(self, name: str) -> str:
        label, k = name, 1
        while label in self.taken:
            k += 1
            label = f"{name}_{k}"
        self.taken.add(label)
        return label

    def act(self, node: Any, name: str, dense: bool = False) -> _Act:
        """The activation ``name`` as ``node`` reads it; only a dense layer reads a flattened
        (C, H, W) one."""
        a = self.acts.get(name)
        if a is None:
            raise self.error(node, f"input {name!r} is a constant or computed from constants; "
                                   f"clustersim maps operators on the activation only")
        if a.flat and not dense:
            raise self.error(node, f"reads {name!r}, a {a.shape} activation flattened by a Flatten or Reshape; "
                                   f"only Gemm and MatMul read one")
        return a

    def const(self, node: Any, k: int, what: str) -> Any:
        name = node.input[k] if len(node.input) > k else ""
        if name not in self.consts:
            raise self.error(node, f"{what} (input {k}) must be an initializer or Constant")
        return self.consts[name]


def _per_sample(dims: tuple) -> Shape:
    """ONNX per-sample dims (features) or (C, H, W) as a clustersim shape."""
    if len(dims) == 1:
        return (dims[0], 1, 1)
    if len(dims) == 3:
        return (dims[0], dims[1], dims[2])
    return tuple(dims)                           # type: ignore[return-value] -- never equal to a Shape


def _attrs(node: Any) -> dict[str, Any]:
    from onnx import helper
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _one_or_pair(a: int, b: int) -> int | tuple[int, int]:
    """A window field as the model TOML writes it: n where rows and columns agree."""
    return int(a) if a == b else (int(a), int(b))


def _window(imp: _Importer, node: Any, kernel: tuple[int, int], a: dict, in_shape: Shape) -> dict[str, Any]:
    """kernel, stride and padding of a Conv or pool node; refuses dilations, padding that
    differs between the two sides, and ceil_mode where it rounds up."""
    if any(d != 1 for d in a.get("dilations", [1, 1])):
        raise imp.error(node, f"dilations {list(a['dilations'])} are not supported (only 1)")
    stride = tuple(a.get("strides", (1, 1)))
    auto = a.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = []
        for size, k, s in zip(in_shape[1:], kernel, stride):
            total = max((-(-size // s) - 1) * s + k - size, 0)
            pads.append(total)
        if any(p % 2 for p in pads):
            raise imp.error(node, f"auto_pad {auto} pads unevenly here ({pads}); clustersim pads both sides alike")
        pad = (pads[0] // 2, pads[1] // 2)
    else:
        p = list(a.get("pads", (0, 0, 0, 0))) if auto != "VALID" else [0, 0, 0, 0]
        if p[:2] != p[2:]:
            raise imp.error(node, f"pads {p} are asymmetric; clustersim pads both sides alike")
        pad = (p[0], p[1])
    if a.get("ceil_mode", 0) and any((n + 2 * q - k) % s for n, q, k, s in zip(in_shape[1:], pad, kernel, stride)):
        raise imp.error(node, "ceil_mode = 1 rounds up here; clustersim's windows round down")
    return {"kernel": _one_or_pair(*kernel), "stride": _one_or_pair(*stride), "padding": _one_or_pair(*pad)}


# --- one function per operator: (importer, node position) -------------------------------------
def _dense(imp: _Importer, node: Any, x: _Act, weight: str, units: int, bias: str, out: str = "") -> None:
    """A dense layer with a bias; without one, a conv2d whose kernel covers the input (the
    same weights, FLOPs and cut) with bias = false."""
    if bias:
        imp.add(node, make_layer("dense", units=int(units)), [x], params=(weight, bias), out=out)
    else:
        layer = make_layer("conv2d", filters=int(units), kernel=_one_or_pair(*x.shape[1:]), bias=False)
        imp.add(node, layer, [x], params=(weight,))


def _gemm(imp: _Importer, i: int) -> None:
    node = imp.graph.node[i]
    a = _attrs(node)
    if a.get("transA", 0):
        raise imp.error(node, "transA = 1 is not supported (the activation must be (batch, features))")
    x = imp.act(node, node.input[0], dense=True)
    w = imp.const(node, 1, "the weight B")
    units = w.shape[0] if a.get("transB", 0) else w.shape[-1]
    bias = node.input[2] if len(node.input) > 2 else ""
    if bias:
        imp.const(node, 2, "the bias C")
    _dense(imp, node, x, node.input[1], units, bias)


def _matmul(imp: _Importer, i: int) -> None:
    """MatMul of the activation by a constant; an Add of a constant that alone reads the
    product is the dense layer's bias (and its output the layer's)."""
    node, nodes = imp.graph.node[i], imp.graph.node
    x = imp.act(node, node.input[0], dense=True)
    if imp.rank(node.input[0]) != 2:
        raise imp.error(node, f"reads a rank-{imp.rank(node.input[0])} activation; only (batch, features) "
                              f"MatMul maps to a dense layer")
    w = imp.const(node, 1, "the weight")
    readers = [j for j, n in enumerate(nodes) if node.output[0] in n.input]
    bias, out = "", ""
    if len(readers) == 1 and nodes[readers[0]].op_type == "Add":
        add = nodes[readers[0]]
        other = [n for n in add.input if n != node.output[0]]
        if len(other) == 1 and other[0] in imp.consts:
            bias, out = other[0], add.output[0]
            imp.skip.add(readers[0])
    _dense(imp, node, x, node.input[1], w.shape[-1], bias, out)


def _conv(imp: _Importer, i: int) -> None:
    node = imp.graph.node[i]
    a = _attrs(node)
    if a.get("group", 1) != 1:
        raise imp.error(node, f"group = {a['group']} is not supported (clustersim's conv2d reads all channels)")
    x = imp.act(node, node.input[0])
    w = imp.const(node, 1, "the weight W")
    if w.ndim != 4:
        raise imp.error(node, f"a {w.ndim - 2}-D convolution is not supported (only 2-D)")
    bias = len(node.input) > 2 and bool(node.input[2])
    if bias:
        imp.const(node, 2, "the bias B")
    layer = make_layer("conv2d", filters=int(w.shape[0]), bias=bias,
                       **_window(imp, node, tuple(w.shape[2:]), a, x.shape))
    imp.add(node, layer, [x], params=tuple(node.input[1:3]))


def _pool(kind: str, whole: bool) -> Callable[[_Importer, int], None]:
    def pool(imp: _Importer, i: int) -> None:
        node = imp.graph.node[i]
        x = imp.act(node, node.input[0])
        if whole:                               # GlobalXPool: one window over all rows and columns
            window = {"kernel": _one_or_pair(*x.shape[1:]), "stride": 1, "padding": 0}
        else:
            a = _attrs(node)
            window = _window(imp, node, tuple(a["kernel_shape"]), a, x.shape)
        imp.add(node, make_layer(kind, **window), [x])
    return pool


def _batchnorm(imp: _Importer, i: int) -> None:
    """Scale and bias are parameters; the running mean and variance are statistics."""
    node = imp.graph.node[i]
    x = imp.act(node, node.input[0])
    for k, what in enumerate(("the scale", "the bias", "the mean", "the variance"), start=1):
        imp.const(node, k, what)
    imp.add(node, make_layer("batchnorm"), [x], params=(node.input[1], node.input[2]))


def _elementwise(kind: str) -> Callable[[_Importer, int], None]:
    def elementwise(imp: _Importer, i: int) -> None:
        node = imp.graph.node[i]
        x = imp.act(node, node.input[0], dense=True)
        kw = {}
        if kind == "dropout":
            rate = _attrs(node).get("ratio", 0.5)           # an attribute before opset 12, an input since
            if len(node.input) > 1 and node.input[1]:
                rate = float(imp.const(node, 1, "the ratio"))
            if not 0.0 <= float(rate) <= MAX_DROPOUT:       # what a model file's layer takes (and nan)
                raise imp.error(node, f"ratio {float(rate):g}: must be 0 .. {MAX_DROPOUT} (the share of values dropped)")
            kw["rate"] = round(float(rate), 6)
        imp.add(node, make_layer(kind, **kw), [x], flat=x.flat)
    return elementwise


def _merge(kind: str) -> Callable[[_Importer, int], None]:
    def merge(imp: _Importer, i: int) -> None:
        node = imp.graph.node[i]
        if any(n in imp.consts for n in node.input):
            raise imp.error(node, "of a constant: only an Add right after a MatMul (its bias) maps")
        xs = [imp.act(node, n, dense=kind == "add") for n in node.input]
        if kind == "concat":
            axis = _attrs(node)["axis"]
            if axis % imp.rank(node.input[0]) != 1:
                raise imp.error(node, f"axis {axis}: clustersim concatenates channels (axis 1) only")
        elif any(x.flat for x in xs) and len({(x.shape, x.flat) for x in xs}) > 1:
            raise imp.error(node, "adds a flattened activation to one of another shape")
        imp.add(node, make_layer(kind), xs, flat=any(x.flat for x in xs))
    return merge


def _flatten(imp: _Importer, i: int) -> None:
    """Flatten (axis 1), Reshape to (batch, features) or to the shape it had, Identity:
    no layer, the activation marked flat where it is now (batch, features)."""
    node = imp.graph.node[i]
    x = imp.act(node, node.input[0], dense=True)
    if node.op_type == "Identity":
        imp.acts[node.output[0]] = x
        return
    if node.op_type == "Flatten" and _attrs(node).get("axis", 1) != 1:
        raise imp.error(node, f"axis {_attrs(node)['axis']}: only axis 1 (keep the batch) maps")
    dims = imp.inferred.get(node.output[0])
    if node.op_type == "Reshape" and (not dims or None in dims):
        if node.input[1] in imp.consts:
            target = imp.consts[node.input[1]]
            if getattr(target, "ndim", 0) != 1:
                raise imp.error(node, f"its shape input has {getattr(target, 'ndim', 0)} dimensions; Reshape takes a "
                                      f"1-D list of sizes")
            per = imp.inferred.get(node.input[0]) or x.shape
            dims = _target(tuple(per), [int(d) for d in target][1:])
        elif dims is not None and len(dims) == 1 and node.output[0] in imp.batched:
            dims = (prod(x.shape),)             # x.view(x.size(0), -1): a target computed from Shape
    if not dims or None in dims:
        raise imp.error(node, "its output shape is not known after shape inference")
    if tuple(dims) == (prod(x.shape),):
        imp.acts[node.output[0]] = _Act(x.src, x.shape, x.shape[1:] != (1, 1))
    elif _per_sample(tuple(dims)) == x.shape and not x.flat:
        imp.acts[node.output[0]] = x
    else:
        raise imp.error(node, f"reshapes {x.shape} to {tuple(dims)}; only flattening to (batch, features) maps")


def _target(per: tuple[int, ...], rest: list[int]) -> tuple[int, ...]:
    """A Reshape target after its batch entry, for per-sample input dims ``per``: 0 copies
    the input's size there, -1 takes what is left."""
    dims = [per[k] if d == 0 and k < len(per) else d for k, d in enumerate(rest)]
    if dims.count(-1) == 1:
        known = prod(d for d in dims if d != -1)
        dims[dims.index(-1)] = prod(per) // known if known else -1
    return tuple(dims)


def _softmax(imp: _Importer, i: int) -> None:
    """Softmax / LogSoftmax on the graph's output over the classes, and
    SoftmaxCrossEntropyLoss: the loss, softmax_xent."""
    node = imp.graph.node[i]
    if node.op_type != "SoftmaxCrossEntropyLoss":
        if node.output[0] != imp.graph.output[0].name:
            raise imp.error(node, "only on the graph's output (the loss, softmax_xent): clustersim has no "
                                  "softmax inside a model")
        rank = imp.rank(node.input[0])
        axis = _attrs(node).get("axis", 1 if imp.opset < 13 else -1)
        if rank != 2 and axis % rank != 1:
            raise imp.error(node, f"axis {axis} of a rank-{rank} tensor: only over the classes (axis 1) maps")
    imp.add(node, make_layer("softmax_xent"), [imp.act(node, node.input[0])])


_HANDLERS: dict[str, Callable[[_Importer, int], None]] = {
    "Gemm": _gemm, "MatMul": _matmul, "Conv": _conv,
    "MaxPool": _pool("max_pool", False), "AveragePool": _pool("avg_pool", False),
    "GlobalMaxPool": _pool("max_pool", True), "GlobalAveragePool": _pool("avg_pool", True),
    "BatchNormalization": _batchnorm, "Relu": _elementwise("relu"), "Sigmoid": _elementwise("sigmoid"),
    "Tanh": _elementwise("tanh"), "Gelu": _elementwise("gelu"), "Dropout": _elementwise("dropout"),
    "Add": _merge("add"), "Sum": _merge("add"), "Concat": _merge("concat"),
    "Flatten": _flatten, "Reshape": _flatten, "Identity": _flatten,
    "Softmax": _softmax, "LogSoftmax": _softmax, "SoftmaxCrossEntropyLoss": _softmax,
}


# --- model TOML -----------------------------------------------------------------------------
def model_toml(model: Model) -> str:
    """``model`` as a model TOML file that ``load_model_file`` reads back to an equal model
    (layers named by their labels, or ``index:kind`` where they have none)."""
    lines = [f"name = {json.dumps(model.name)}"]
    shape = model.input_shape
    lines.append(f"input = {_toml([shape[0]] if shape[1:] == (1, 1) else list(shape))}")
    if model.classes:
        lines.append(f"classes = {model.classes}")
    for node in model.nodes:
        layer, cls = node.layer, KINDS[node.layer.kind]
        lines += ["", "[[layer]]", f"kind = {json.dumps(layer.kind)}", f"name = {json.dumps(node.name)}"]
        if node.inputs != ((node.index - 1,) if node.index else (-1,)):
            names = [INPUT_NAME if s < 0 else model.nodes[s].name for s in node.inputs]
            lines.append(f"inputs = {_toml(names)}")
        for f in fields(layer):
            value = getattr(layer, f.name)
            # pools' stride defaults to the kernel in make_layer, not to the field's 1
            if f.name != "kind" and (value != f.default or f.name in cls.required
                                     or (f.name == "stride" and layer.kind.endswith("_pool"))):
                lines.append(f"{f.name} = {_toml(value)}")
    return "\n".join(lines) + "\n"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)
