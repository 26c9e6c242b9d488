"""Networks as a chain of layers with resolved shapes; the built-in zoo; model TOML files.

Model file format::

    name = "my-net"
    input = [3, 32, 32]           # (C, H, W), or [features]
    classes = 10                  # optional: for data sets and accuracy
    [[layer]]
    kind = "conv2d"               # one of layers.KINDS
    filters = 32                  # the kind's fields: units, filters, kernel, stride, padding,
    kernel = 3                    # pieces, size, rate
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from math import prod
from pathlib import Path
from typing import Any

from clustersim.core.config import ConfigError, Table
from clustersim.core.layers import KINDS, Layer, Shape


@dataclass(frozen=True)
class Node:
    """A layer in place: its input and output shapes (per sample) and totals."""

    index: int
    layer: Layer
    in_shape: Shape
    out_shape: Shape

    @property
    def params(self) -> int:
        return self.layer.params(self.in_shape)

    @property
    def fwd_flops(self) -> float:          # per sample
        return self.layer.flops_per_out(self.in_shape) * prod(self.out_shape)

    @property
    def name(self) -> str:
        return f"{self.index}:{self.layer.kind}"


@dataclass(frozen=True)
class Model:
    name: str
    input_shape: Shape
    nodes: tuple[Node, ...]
    classes: int = 0

    @property
    def params(self) -> int:
        return sum(n.params for n in self.nodes)

    @property
    def fwd_flops(self) -> float:
        return sum(n.fwd_flops for n in self.nodes)

    @property
    def bwd_flops(self) -> float:
        return sum(n.fwd_flops * n.layer.bwd_ratio for n in self.nodes)


def build_model(name: str, input_shape: Shape, layers: list[Layer], classes: int = 0) -> Model:
    """Resolves shapes; raises ValueError naming the layer whose shape does not fit."""
    nodes, shape = [], input_shape
    for i, layer in enumerate(layers):
        try:
            out = layer.shape(shape)
        except ValueError as exc:
            raise ValueError(f"layer {i} ({layer.kind}): {exc}") from None
        if min(out) < 1:
            raise ValueError(f"layer {i} ({layer.kind}): output shape {out} is empty")
        nodes.append(Node(i, layer, shape, out))
        shape = out
    return Model(name, input_shape, tuple(nodes), classes)


def make_layer(kind: str, **kw: Any) -> Layer:
    cls = KINDS[kind]
    if kind in ("max_pool", "avg_pool"):
        kw.setdefault("stride", kw.get("kernel", 1))   # non-overlapping pooling by default
    return cls(kind=kind, **kw)


# --- the zoo --------------------------------------------------------------------------------
def _l(kind: str, **kw: Any) -> Layer:
    return make_layer(kind, **kw)


def _mlp_digits() -> Model:
    # scikit-learn's digits: 8x8 images flattened to 64 features, 10 classes
    return build_model("mlp-digits", (64, 1, 1),
                       [_l("dense", units=128), _l("relu"), _l("dense", units=10), _l("softmax_xent")], 10)


def _distbelief_speech() -> Model:
    # Dean et al. 2012, section 5: 11 frames x 40 filterbank = 440 inputs, four hidden
    # layers of 2560 sigmoid units, 8192 softmax outputs (41,758,720 weights + 18,432 biases)
    layers: list[Layer] = []
    for _ in range(4):
        layers += [_l("dense", units=2560), _l("sigmoid")]
    return build_model("distbelief-speech", (440, 1, 1), layers + [_l("dense", units=8192), _l("softmax_xent")], 8192)


# DistBelief image models (Dean et al. 2012, section 5; architecture of Le et al. 2012):
# 100x100 colour input, three stages of [locally connected filtering with 10x10 receptive
# fields -> 2x2 max pooling -> local contrast normalisation], then ~21k one-vs-all
# (sigmoid) outputs for ImageNet's 21,841 classes.  The paper gives only the totals; we
# sized the filter banks by a grid search over filters per stage (stride 1: three 10x10
# stages with 2x2 pooling shrink 100 -> 91 -> 45 -> 36 -> 18 -> 9 -> 4) for the total
# nearest each target: 82.4M, 330.2M and 1.704B parameters (tests pin the exact counts).
IMAGE_NET_CLASSES = 21841
_IMAGE_SIZES = {  # name: filters per stage
    "distbelief-image-80m": (8, 32, 48),
    "distbelief-image-330m": (10, 64, 256),
    "distbelief-image-1.7b": (80, 128, 128),
}


def _distbelief_image(name: str) -> Model:
    layers: list[Layer] = []
    for filters in _IMAGE_SIZES[name]:
        layers += [_l("locally_connected", filters=filters, kernel=10),
                   _l("max_pool", kernel=2), _l("lcn", size=5)]
    layers += [_l("dense", units=IMAGE_NET_CLASSES), _l("sigmoid")]
    return build_model(name, (3, 100, 100), layers, IMAGE_NET_CLASSES)


def _alexnet() -> Model:
    # Krizhevsky et al. 2012 as one tower (torchvision's channel counts: 61,100,840
    # parameters), with the paper's LRN after the first two convolutions
    c = [_l("conv2d", filters=64, kernel=11, stride=4, padding=2), _l("relu"), _l("lrn", size=5),
         _l("max_pool", kernel=3, stride=2),
         _l("conv2d", filters=192, kernel=5, padding=2), _l("relu"), _l("lrn", size=5),
         _l("max_pool", kernel=3, stride=2),
         _l("conv2d", filters=384, kernel=3, padding=1), _l("relu"),
         _l("conv2d", filters=256, kernel=3, padding=1), _l("relu"),
         _l("conv2d", filters=256, kernel=3, padding=1), _l("relu"),
         _l("max_pool", kernel=3, stride=2),
         _l("dropout", rate=0.5), _l("dense", units=4096), _l("relu"),
         _l("dropout", rate=0.5), _l("dense", units=4096), _l("relu"),
         _l("dense", units=1000), _l("softmax_xent")]
    return build_model("alexnet", (3, 224, 224), c, 1000)


ZOO = {
    "mlp-digits": _mlp_digits,
    "distbelief-speech": _distbelief_speech,
    "distbelief-image-80m": lambda: _distbelief_image("distbelief-image-80m"),
    "distbelief-image-330m": lambda: _distbelief_image("distbelief-image-330m"),
    "distbelief-image-1.7b": lambda: _distbelief_image("distbelief-image-1.7b"),
    "alexnet": _alexnet,
}


def zoo_model(name: str) -> Model:
    return ZOO[name]()


# --- model files ----------------------------------------------------------------------------
def load_model_file(path: Path) -> Model:
    """Reads a model TOML; raises ConfigError naming the file and field."""
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), "", f"malformed TOML: {exc}") from None
    except (OSError, ValueError) as exc:           # ValueError: undecodable, or a NUL in the name
        raise ConfigError(str(path), "", f"cannot read model file ({exc.__class__.__name__})") from None
    return model_from_table(Table(data, str(path)))


def model_from_table(top: Table) -> Model:
    name = top.str("name", Path(top.file).stem)
    dims = top.raw("input")
    if (not isinstance(dims, list) or len(dims) not in (1, 3)
            or not all(isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= 1_000_000 for d in dims)):
        raise top.error("input", "must be [features] or [C, H, W] of integers in 1..1000000")
    shape: Shape = (dims[0], 1, 1) if len(dims) == 1 else (dims[0], dims[1], dims[2])
    classes = top.int("classes", 0, lo=0, hi=10_000_000)
    layers = []
    tables = top.tables("layer")
    if not tables:
        raise top.error("layer", "a model needs at least one [[layer]]")
    for lt in tables:
        kind = lt.str("kind", choices=KINDS)
        allowed = {f.name for f in fields(KINDS[kind])} - {"kind"}
        kw: dict[str, Any] = {}
        for key in sorted(lt.data):            # a typo says so before "required" does
            if key != "kind" and key not in allowed:
                raise lt.error(key, "unknown key")
        for key in KINDS[kind].required:          # the rest default as the layer classes say
            if not lt.has(key):
                raise lt.error(key, f"is required for a {kind} layer")
        for key in sorted(allowed):
            if lt.has(key):
                kw[key] = (lt.float(key, lo=0.0, hi=0.999) if key == "rate"
                           else lt.int(key, lo=0 if key == "padding" else 1, hi=1_000_000))
        lt.done()
        layers.append(make_layer(kind, **kw))
    top.done()
    try:
        return build_model(name, shape, layers, classes)
    except ValueError as exc:
        raise top.error("layer", str(exc)) from None
