"""Networks as directed acyclic graphs of layers with resolved shapes; the built-in zoo;
model TOML files.

A node reads the outputs of the nodes it names (default: the layer before it, so a chain
is written as a list); nodes are kept in a topological order (the file's order where it is
one), and the last node is the graph's one output.

Model file format::

    name = "my-net"
    input = [3, 32, 32]           # (C, H, W), or [features]
    classes = 10                  # optional: for data sets and accuracy
    [[layer]]
    kind = "conv2d"               # one of layers.KINDS
    filters = 32                  # the kind's fields: units, filters, kernel, stride, padding,
    kernel = 3                    # pieces, size, rate, bias, vocab, dim, positions, types, heads,
                                  # causal, tied, tokens; kernel/stride/padding: n or [rows, cols]
    name = "conv1"                # optional: what other layers' inputs call it
    inputs = ["input"]            # optional: the layers it reads ("input": the model's input)
"""
from __future__ import annotations

import heapq
import tomllib
from dataclasses import dataclass, fields, replace
from math import prod
from pathlib import Path
from typing import Any

from clustersim.core.config import ConfigError, Table
from clustersim.core.layers import KINDS, Layer, Shape

INPUT = -1                 # Node.inputs entry: the model's input
INPUT_NAME = "input"       # what a model file's ``inputs`` call the model's input


class GraphError(ValueError):
    """A model graph that cannot be built: ``layer`` is the layer's position as given,
    ``key`` the model-file key at fault ("" for the layer as a whole)."""

    def __init__(self, layer: int, key: str, message: str) -> None:
        super().__init__(message)
        self.layer, self.key = layer, key


@dataclass(frozen=True)
class Node:
    """A layer in place: its input and output shapes (per sample) and totals.  ``inputs``
    are the nodes it reads (``INPUT``: the model's input), ``in_shapes`` their shapes and
    ``in_shape`` what the layer reads as one input (``Layer.merge`` of them)."""

    index: int
    layer: Layer
    in_shape: Shape
    out_shape: Shape
    inputs: tuple[int, ...] = ()
    in_shapes: tuple[Shape, ...] = ()
    label: str = ""            # the model file's name for it

    @property
    def params(self) -> int:
        return self.layer.params(self.in_shape)

    @property
    def fwd_flops(self) -> float:          # per sample
        return self.layer.flops_per_out(self.in_shape) * prod(self.out_shape)

    @property
    def input_grad(self) -> bool:
        """Whether its backward computes its input's gradient: not where it reads the model's
        input alone, which needs none (PyTorch's autograd skips it for an input without
        ``requires_grad``, so cuDNN runs no data-gradient kernel for a first convolution)."""
        return any(s != INPUT for s in self.inputs)

    @property
    def bwd_ratio(self) -> float:
        """Backward FLOPs over forward: the layer's, less its input gradient's share where it
        computes none (``input_grad``)."""
        return self.layer.bwd_ratio - (0.0 if self.input_grad else self.layer.input_grad_share)

    @property
    def name(self) -> str:
        return self.label or f"{self.index}:{self.layer.kind}"


@dataclass(frozen=True)
class Model:
    name: str
    input_shape: Shape
    nodes: tuple[Node, ...]
    classes: int = 0
    consumers: tuple[tuple[int, ...], ...] = ()     # per node: the nodes that read it, in order
    inner: tuple[int, ...] = ()     # boundaries inside a repeated block, which full recomputation
    #                                 does not keep (a transformer layer's first residual sum)

    @property
    def params(self) -> int:
        return sum(n.params for n in self.nodes)

    @property
    def fwd_flops(self) -> float:
        return sum(n.fwd_flops for n in self.nodes)

    @property
    def bwd_flops(self) -> float:
        return sum(n.fwd_flops * n.bwd_ratio for n in self.nodes)

    @property
    def attention_positions(self) -> int:
        """The positions its attention layers read (a transformer's sequence); 0: none."""
        return max((n.in_shape[1] for n in self.nodes if n.layer.kind == "attention"), default=0)


def build_model(name: str, input_shape: Shape, layers: list[Layer], classes: int = 0,
                names: list[str] | None = None, inputs: list[tuple[str, ...] | None] | None = None,
                losses: bool = False) -> Model:
    """The graph of ``layers`` with shapes resolved.  ``names[i]`` names layer i ("" or
    absent: unnamed) and ``inputs[i]`` the layers it reads (None or absent: the layer before
    it; ``INPUT_NAME``: the model's input).  ``losses``: a ``softmax_xent`` layer may end the
    graph besides the last (a model trained on several losses, BERT pretraining's MLM and
    NSP; the simulator only: the executor trains one loss).  Raises GraphError (a
    ValueError) naming the layer: an unknown or repeated name, a cycle, a layer other than
    the last whose output nothing reads, a shape that does not fit."""
    n = len(layers)
    names = list(names or [""] * n)
    reads = _resolve_inputs(layers, names, list(inputs or [None] * n))
    order = _topological(reads, names)
    index = {old: new for new, old in enumerate(order)}
    consumers: list[list[int]] = [[] for _ in order]
    for old in order:
        for src in reads[old]:
            if src != INPUT:
                consumers[index[src]].append(index[old])
    for old in order[:-1]:
        if not consumers[index[old]] and not (losses and layers[old].kind == "softmax_xent"):
            raise GraphError(old, "", f"layer {old} ({layers[old].kind}): nothing reads its output; "
                                      f"only the last layer may end the graph")
    nodes: list[Node] = []
    for old in order:
        layer = layers[old]
        srcs = tuple(INPUT if s == INPUT else index[s] for s in reads[old])
        in_shapes = tuple(input_shape if s == INPUT else nodes[s].out_shape for s in srcs)
        try:
            in_shape = layer.merge(in_shapes)
        except ValueError as exc:
            raise GraphError(old, "inputs", f"layer {old} ({layer.kind}): {exc}") from None
        try:
            out = layer.shape(in_shape)
        except ValueError as exc:
            raise GraphError(old, "", f"layer {old} ({layer.kind}): {exc}") from None
        if min(out) < 1:
            raise GraphError(old, "", f"layer {old} ({layer.kind}): output shape {out} is empty")
        nodes.append(Node(len(nodes), layer, in_shape, out, srcs, in_shapes, names[old]))
    for old, node in zip(order, nodes):
        _check_head_and_loss(old, node, nodes, [order[r] for r in consumers[node.index]])
    return Model(name, input_shape, tuple(nodes), classes, tuple(tuple(c) for c in consumers))


def _check_head_and_loss(old: int, node: Node, nodes: list[Node], readers: list[int]) -> None:
    """A tied ``lm_head`` reads the table of an embedding of its vocabulary and width (else it
    would count no weights); a ``softmax_xent`` loss ends the graph (the executor passes
    nothing on from it).  ``old``, ``readers``: positions as given."""
    layer = node.layer
    if layer.kind == "lm_head" and layer.tied and tied_embedding(nodes, node) is None:
        raise GraphError(old, "tied", f"layer {old} (lm_head): tied to the word embeddings, but no embedding "
                                      f"layer has vocab = {layer.vocab} and dim = {node.in_shape[0]} (set tied = false "
                                      f"for a head of its own)")
    if layer.kind == "softmax_xent" and readers:
        raise GraphError(old, "", f"layer {old} (softmax_xent): a loss ends the graph; layer {readers[0]} "
                                  f"reads its output")


def tied_embedding(nodes, head: Node) -> int | None:
    """Position in ``nodes`` of the embedding whose table the tied ``lm_head`` ``head`` reads:
    the first of its vocabulary and width; None where there is none."""
    return next((n.index for n in nodes if n.layer.kind == "embedding" and n.layer.vocab == head.layer.vocab
                 and n.layer.dim == head.in_shape[0]), None)


def _resolve_inputs(layers: list[Layer], names: list[str], inputs: list) -> list[tuple[int, ...]]:
    """Each layer's inputs as positions in ``layers`` (INPUT: the model's input)."""
    where: dict[str, int] = {}
    for i, nm in enumerate(names):
        if nm == INPUT_NAME or nm in where:
            raise GraphError(i, "name", f"{nm!r} is " + ("the model's input" if nm == INPUT_NAME
                                                          else f"already layer {where[nm]}'s name"))
        if nm:
            where[nm] = i
    reads = []
    for i, wanted in enumerate(inputs):
        if wanted is None:
            reads.append((i - 1,) if i else (INPUT,))
            continue
        srcs = []
        for nm in wanted:
            if nm != INPUT_NAME and nm not in where:
                raise GraphError(i, "inputs", f"names {nm!r}, which is no layer's name (nor {INPUT_NAME!r})")
            srcs.append(INPUT if nm == INPUT_NAME else where[nm])
        if not srcs:
            raise GraphError(i, "inputs", "names no layer")
        reads.append(tuple(srcs))
    return reads


def _topological(reads: list[tuple[int, ...]], names: list[str]) -> list[int]:
    """Positions in a topological order, the lowest position first among the ready (so a
    list already in order keeps it); raises GraphError on a cycle."""
    waiting = [len({s for s in r if s != INPUT}) for r in reads]
    succ: list[list[int]] = [[] for _ in reads]
    for i, r in enumerate(reads):
        for s in set(r) - {INPUT}:
            succ[s].append(i)
    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for t in succ[i]:
            waiting[t] -= 1
            if not waiting[t]:
                heapq.heappush(ready, t)
    if len(order) < len(reads):
        walk, cur = [], min(i for i, w in enumerate(waiting) if w)
        while cur not in walk:           # every stuck layer reads a stuck layer: walk back to a repeat
            walk.append(cur)
            cur = min(s for s in reads[cur] if s != INPUT and waiting[s])
        cycle = sorted(walk[walk.index(cur):])
        shown = ", ".join(names[i] or str(i) for i in cycle)
        raise GraphError(cycle[0], "inputs", f"layers {shown} read each other in a cycle")
    return order


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


class _Graph:
    """A zoo graph as it is written: each call adds a layer reading the named layers
    (default: the one added before) and returns its name."""

    def __init__(self) -> None:
        self.layers: list[Layer] = []
        self.inputs: list[tuple[str, ...] | None] = []
        self.inner: set[str] = set()        # ``Model.inner`` by name

    def __call__(self, kind: str, *inputs: str, **kw: Any) -> str:
        self.layers.append(make_layer(kind, **kw))
        self.inputs.append(inputs or None)
        return str(len(self.layers) - 1)

    def build(self, name: str, input_shape: Shape, classes: int, losses: bool = False) -> Model:
        model = build_model(name, input_shape, self.layers, classes,
                            [str(i) for i in range(len(self.layers))], self.inputs, losses)
        return replace(model, inner=tuple(n.index for n in model.nodes if n.name in self.inner))


def _conv_bn(g: _Graph, x: str, filters: int, kernel: Any, stride: int = 1, padding: Any = 0,
             relu: bool = True) -> str:
    """Convolution without biases, batch norm, and ReLU unless ``relu`` is false."""
    y = g("batchnorm", g("conv2d", x, filters=filters, kernel=kernel, stride=stride, padding=padding, bias=False))
    return g("relu", y) if relu else y


def _resnet50() -> Model:
    # He et al. 2016 with torchvision's layout (v1.5: the stride on the 3x3 convolution):
    # bottleneck blocks [3, 4, 6, 3], a 1x1 projection shortcut in each stage's first block;
    # torchvision counts 25,557,032 trainable parameters
    g = _Graph()
    x = g("max_pool", _conv_bn(g, INPUT_NAME, 64, 7, 2, 3), kernel=3, stride=2, padding=1)
    for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for b in range(blocks):
            s = stride if b == 0 else 1
            y = _conv_bn(g, _conv_bn(g, _conv_bn(g, x, width, 1), width, 3, s, 1), 4 * width, 1, relu=False)
            shortcut = _conv_bn(g, x, 4 * width, 1, s, relu=False) if b == 0 else x
            x = g("relu", g("add", y, shortcut))
    g("dense", g("avg_pool", x, kernel=7), units=1000)
    g("softmax_xent")
    return g.build("resnet-50", (3, 224, 224), 1000)


def _vgg16() -> Model:
    # Simonyan & Zisserman 2015, configuration D, as torchvision builds it (no batch norm):
    # 138,357,544 parameters
    layers: list[Layer] = []
    for filters in (64, 64, 0, 128, 128, 0, 256, 256, 256, 0, 512, 512, 512, 0, 512, 512, 512, 0):
        layers += ([_l("conv2d", filters=filters, kernel=3, padding=1), _l("relu")] if filters
                   else [_l("max_pool", kernel=2)])
    layers += [_l("dense", units=4096), _l("relu"), _l("dropout", rate=0.5),
               _l("dense", units=4096), _l("relu"), _l("dropout", rate=0.5),
               _l("dense", units=1000), _l("softmax_xent")]
    return build_model("vgg-16", (3, 224, 224), layers, 1000)


def _inception_v3() -> Model:
    # Szegedy et al. 2016 as torchvision builds it, without the auxiliary classifier: every
    # convolution is BasicConv2d (no biases, batch norm, ReLU); Mixed_5b..7c below
    g = _Graph()
    x = _conv_bn(g, _conv_bn(g, _conv_bn(g, INPUT_NAME, 32, 3, 2), 32, 3), 64, 3, 1, 1)
    x = _conv_bn(g, g("max_pool", x, kernel=3, stride=2), 80, 1)
    x = g("max_pool", _conv_bn(g, x, 192, 3), kernel=3, stride=2)

    def chain(src: str, *convs: tuple) -> str:       # (filters, kernel[, stride[, padding]]) each
        for conv in convs:
            src = _conv_bn(g, src, *conv)
        return src

    def pool_branch(src: str, filters: int) -> str:
        return chain(g("avg_pool", src, kernel=3, stride=1, padding=1), (filters, 1))

    for pool_features in (32, 64, 64):                                       # InceptionA: Mixed_5b, 5c, 5d
        x = g("concat", chain(x, (64, 1)), chain(x, (48, 1), (64, 5, 1, 2)),
              chain(x, (64, 1), (96, 3, 1, 1), (96, 3, 1, 1)), pool_branch(x, pool_features))
    x = g("concat", chain(x, (384, 3, 2)), chain(x, (64, 1), (96, 3, 1, 1), (96, 3, 2)),   # InceptionB: 6a
          g("max_pool", x, kernel=3, stride=2))
    row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))
    for c7 in (128, 160, 160, 192):                                          # InceptionC: Mixed_6b..6e
        x = g("concat", chain(x, (192, 1)), chain(x, (c7, 1), (c7, row[0], 1, row[1]), (192, col[0], 1, col[1])),
              chain(x, (c7, 1), (c7, col[0], 1, col[1]), (c7, row[0], 1, row[1]), (c7, col[0], 1, col[1]),
                    (192, row[0], 1, row[1])), pool_branch(x, 192))
    x = g("concat", chain(x, (192, 1), (320, 3, 2)),                         # InceptionD: Mixed_7a
          chain(x, (192, 1), (192, row[0], 1, row[1]), (192, col[0], 1, col[1]), (192, 3, 2)),
          g("max_pool", x, kernel=3, stride=2))
    for _ in range(2):                                                       # InceptionE: Mixed_7b, 7c
        a, b = chain(x, (384, 1)), chain(x, (448, 1), (384, 3, 1, 1))
        x = g("concat", chain(x, (320, 1)),
              chain(a, (384, (1, 3), 1, (0, 1))), chain(a, (384, (3, 1), 1, (1, 0))),
              chain(b, (384, (1, 3), 1, (0, 1))), chain(b, (384, (3, 1), 1, (1, 0))), pool_branch(x, 192))
    g("dense", g("dropout", g("avg_pool", x, kernel=8), rate=0.5), units=1000)
    g("softmax_xent")
    return g.build("inception-v3", (3, 299, 299), 1000)


def _alexnet_2gpu() -> Model:
    # Krizhevsky et al. 2012, section 3.5 and Fig. 2: two towers, one per GPU, of half the
    # kernels each; conv3 and the fully connected layers read both towers (a concat: the
    # cross-GPU layers), conv2, conv4 and conv5 their own tower only.  227 x 227 input (the
    # size the layer shapes need; the paper says 224), LRN and max pooling after conv1 and
    # conv2, max pooling after conv5, dropout after fc6 and fc7: 60,965,224 parameters
    g = _Graph()
    towers = []
    for _ in range(2):
        x = g("conv2d", INPUT_NAME, filters=48, kernel=11, stride=4)
        x = g("max_pool", g("lrn", g("relu", x), size=5), kernel=3, stride=2)
        x = g("conv2d", x, filters=128, kernel=5, padding=2)
        towers.append(g("max_pool", g("lrn", g("relu", x), size=5), kernel=3, stride=2))
    both = g("concat", *towers)
    towers = []
    for _ in range(2):
        x = g("relu", g("conv2d", both, filters=192, kernel=3, padding=1))
        x = g("relu", g("conv2d", x, filters=192, kernel=3, padding=1))
        x = g("relu", g("conv2d", x, filters=128, kernel=3, padding=1))
        towers.append(g("max_pool", x, kernel=3, stride=2))
    for _ in ("fc6", "fc7"):
        both = g("concat", *towers)
        towers = [g("dropout", g("relu", g("dense", both, units=2048)), rate=0.5) for _ in range(2)]
    g("dense", g("concat", *towers), units=1000)
    g("softmax_xent")
    return g.build("alexnet-2gpu", (3, 227, 227), 1000)


# --- transformers ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Transformer:
    """A decoder (GPT) or encoder (BERT) stack's sizes; ``context`` is the sequence used
    when ``model.sequence`` is not given (and the learned positions where there are any)."""

    layers: int
    d: int
    heads: int
    vocab: int
    context: int
    ffn: int = 0                   # 0: 4 d
    style: str = "gpt"             # gpt (pre-LN, causal) | bert (post-LN, token types, pooler) | llama
    masked: int = 0                # bert: positions the MLM head predicts (pretraining); 0: a 2-way classifier
    dropout: float = 0.0           # dropout rate after the embeddings and each block's two projections
    tied: bool = True              # gpt: the head is the word embeddings' table (false: its own)


TRANSFORMERS = {
    # GPT-2 (Radford et al. 2019; Hugging Face gpt2*): GPT2Model's count, tied head
    "gpt2": Transformer(12, 768, 12, 50257, 1024),
    "gpt2-medium": Transformer(24, 1024, 16, 50257, 1024),
    "gpt2-large": Transformer(36, 1280, 20, 50257, 1024),
    "gpt2-xl": Transformer(48, 1600, 25, 50257, 1024),
    # GPT-3 175B (Brown et al. 2020, Table 2.1): GPT-2's layout at 96 layers of 12,288
    "gpt3-175b": Transformer(96, 12288, 96, 50257, 2048),
    # Megatron-LM's weak-scaling GPTs (Narayanan et al., SC21, Table 1): GPT-2's layout, tied
    # head, vocabulary 51,200 (GPT-2's padded to a multiple of 1,024), 2,048 positions
    "megatron-1.7b": Transformer(24, 2304, 24, 51200, 2048),
    "megatron-3.6b": Transformer(30, 3072, 32, 51200, 2048),
    "megatron-7.5b": Transformer(36, 4096, 32, 51200, 2048),
    "megatron-18.4b": Transformer(40, 6144, 48, 51200, 2048),
    # BERT-large (Devlin et al. 2019; Hugging Face bert-large-uncased)
    "bert-large": Transformer(24, 1024, 16, 30522, 512, style="bert"),
    # BERT-large as NVIDIA DeepLearningExamples' PyTorch BertForPreTraining trains it (phase 1,
    # docs/decisions/024): the vocabulary padded to a multiple of 8 (run_pretraining.py), MLM
    # over max_predictions_per_seq = 20 positions and NSP heads, dropout 0.1 (bert_config.json)
    "bert-large-pretrain": Transformer(24, 1024, 16, 30528, 512, style="bert", masked=20, dropout=0.1),
    # Llama 2 7B (Touvron et al. 2023; Hugging Face Llama-2-7b-hf): RMSNorm, SwiGLU, untied head
    "llama-2-7b": Transformer(32, 4096, 32, 32000, 4096, ffn=11008, style="llama"),
    # the executor's small transformer: 2 layers of 32, 4 heads, 16 positions over the grammar
    # corpus's 19 words (executor/data.py), an untied head (the executor runs untied heads):
    # embeddings 35 x 32, blocks of 12,704, a final layernorm of 64, a 19 x 32 head: 27,200
    "gpt-tiny": Transformer(2, 32, 4, 19, 16, tied=False),
}


def _transformer(name: str, sequence: int = 0) -> Model:
    """The zoo's transformers over ``sequence`` positions (0: the context length).  GPT:
    embeddings (tokens and positions), pre-LN blocks [layernorm, causal attention, 1 x 1
    projection, add; layernorm, 4d dense, gelu, dense, add], a final layernorm, the tied
    head and the loss per position.  BERT: post-LN blocks after an embedding layernorm, the
    pooler (dense and tanh of the first token) and a 2-way classifier on it (Hugging Face's
    BertForSequenceClassification); with ``masked`` positions, BertForPreTraining's heads
    instead (``_bert_pretraining_heads``).  ``dropout``: a dropout layer after the
    embeddings and after each block's two output projections (attention's own dropout of
    its probabilities is in the attention kind's kernels, sim/kernel_model.py).  Llama:
    rmsnorm, attention without biases, SwiGLU, an untied head (rotary position embeddings
    have no parameters and are not modelled)."""
    t = TRANSFORMERS[name]
    seq = sequence or t.context
    ffn = t.ffn or 4 * t.d
    bert, llama = t.style == "bert", t.style == "llama"
    norm = "rmsnorm" if llama else "layernorm"
    g = _Graph()

    def drop(x: str) -> str:
        return g("dropout", x, rate=t.dropout) if t.dropout else x
    x = g("embedding", INPUT_NAME, vocab=t.vocab, dim=t.d, positions=0 if llama else t.context,
          types=2 if bert else 0)
    if bert:
        x = drop(g("layernorm", x))
    for _ in range(t.layers):
        a = x if bert else g(norm, x)
        a = g("conv2d", g("attention", a, heads=t.heads, causal=not bert, bias=not llama),
              filters=t.d, kernel=1, bias=not llama)
        x = g("add", drop(a), x)
        g.inner.add(x)                    # Megatron's recomputation keeps a layer's input only
        if bert:
            x = g("layernorm", x)
            g.inner.add(x)
        h = x if bert else g(norm, x)
        if llama:
            h = g("swiglu", g("conv2d", h, filters=2 * ffn, kernel=1, bias=False))
        else:
            h = g("gelu", g("conv2d", h, filters=ffn, kernel=1))
        x = g("add", drop(g("conv2d", h, filters=t.d, kernel=1, bias=not llama)), x)
        if bert:
            g.inner.add(x)
            x = g("layernorm", x)
    if bert and t.masked:
        _bert_pretraining_heads(g, x, t, min(t.masked, seq))
        return g.build(name, (1, seq, 1), t.vocab, losses=True)
    if bert:
        pooled = g("tanh", g("dense", g("first_token", x), units=t.d))
        g("dense", pooled, units=2)
        g("softmax_xent")
        return g.build(name, (1, seq, 1), 2)
    g("lm_head", g(norm, x), vocab=t.vocab, tied=t.tied and not llama)
    g("softmax_xent")
    return g.build(name, (1, seq, 1), t.vocab)


def _bert_pretraining_heads(g: _Graph, x: str, t: Transformer, masked: int) -> None:
    """BertPreTrainingHeads on encoder output ``x``: NSP (the pooler, dense and tanh of the
    first token, and a 2-way classifier with its loss) and MLM over ``masked`` positions
    (dense d x d, gelu, layernorm, the decoder tied to the word embeddings with a bias of its
    own, the loss per position), the graph's last layer.  The reference gathers the masked
    positions; the first ``masked`` positions stand in for them (the same shapes and work)."""
    pooled = g("tanh", g("dense", g("first_token", x), units=t.d))
    g("softmax_xent", g("dense", pooled, units=2))
    h = g("layernorm", g("gelu", g("conv2d", g("first_token", x, tokens=masked), filters=t.d, kernel=1)))
    g("softmax_xent", g("lm_head", h, vocab=t.vocab, tied=True, bias=True))


# --- small models the executor trains on bundled data ----------------------------------------
def _resnet_digits() -> Model:
    # the 8x8 digits through one residual block: conv 3x3 (16) -> relu -> conv 3x3 (16) + the
    # block's input -> relu -> 2x2 max pool -> dense 10; 160 + 2,320 + 2,570 = 5,050 parameters
    g = _Graph()
    x = g("relu", g("conv2d", INPUT_NAME, filters=16, kernel=3, padding=1))
    y = g("conv2d", x, filters=16, kernel=3, padding=1)
    g("dense", g("max_pool", g("relu", g("add", y, x)), kernel=2), units=10)
    g("softmax_xent")
    return g.build("resnet-digits", (1, 8, 8), 10)


# the data set each model trains on where the package bundles one (executor/data.py):
# "digits" (scikit-learn's 8x8 digits), "grammar" (the seeded corpus of a fixed grammar)
BUNDLED_DATA = {"mlp-digits": "digits", "resnet-digits": "digits", "gpt-tiny": "grammar"}


def token_vocab(model: Model) -> int:
    """The vocabulary of the embedding that reads the model's input (its input is token
    ids), or 0 (its input is values)."""
    return next((n.layer.vocab for n in model.nodes if INPUT in n.inputs and n.layer.kind == "embedding"), 0)


def bundled_data(model: Model) -> str | None:
    """The bundled data set ``model`` trains on (``BUNDLED_DATA``), or None: the zoo model of
    its name, or a model of the same input and classes (a model file may take a zoo name
    for a model of another shape, which that data does not fit; gpt-tiny's corpus fits any
    number of positions)."""
    data = BUNDLED_DATA.get(model.name)
    if data is None:
        return None
    zoo = ZOO[model.name]()
    same_input = data == "grammar" or prod(model.input_shape) == prod(zoo.input_shape)
    return data if same_input and model.classes == zoo.classes and token_vocab(model) == token_vocab(zoo) else None


ZOO = {
    "mlp-digits": _mlp_digits,
    "distbelief-speech": _distbelief_speech,
    "distbelief-image-80m": lambda: _distbelief_image("distbelief-image-80m"),
    "distbelief-image-330m": lambda: _distbelief_image("distbelief-image-330m"),
    "distbelief-image-1.7b": lambda: _distbelief_image("distbelief-image-1.7b"),
    "alexnet": _alexnet,
    "alexnet-2gpu": _alexnet_2gpu,
    "resnet-50": _resnet50,
    "vgg-16": _vgg16,
    "inception-v3": _inception_v3,
    "resnet-digits": _resnet_digits,
    **{name: (lambda name=name: _transformer(name)) for name in TRANSFORMERS},
}


def zoo_model(name: str, sequence: int = 0) -> Model:
    """A built-in model; ``sequence`` (transformers only, 0: the context length) sets the
    positions of the input.  Raises ValueError for a sequence a model cannot take."""
    if not sequence:
        return ZOO[name]()
    t = TRANSFORMERS.get(name)
    if t is None:
        raise ValueError(f"{name} has no sequence (only the transformers {', '.join(TRANSFORMERS)} do)")
    if not 1 <= sequence <= t.context:
        raise ValueError(f"{name} takes sequences of 1..{t.context} positions, got {sequence}")
    return _transformer(name, sequence)


# --- model files ----------------------------------------------------------------------------
def load_model_file(path: Path) -> Model:
    """Reads a model TOML, or an ONNX graph (``.onnx``: core/onnx_import.py); raises
    ConfigError naming the file and field."""
    if path.suffix.lower() == ".onnx":
        from clustersim.core.onnx_import import load_onnx    # imports onnx only when asked
        return load_onnx(path)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), "", f"malformed TOML: {exc}") from None
    except (OSError, ValueError) as exc:           # ValueError: undecodable, or a NUL in the name
        raise ConfigError(str(path), "", f"cannot read model file ({exc.__class__.__name__})") from None
    return model_from_table(Table(data, str(path)))


MODEL_KEYS = ("name", "input", "classes", "layer")      # a model file's top-level keys


def model_from_table(top: Table) -> Model:
    unknown = sorted(set(top.data) - set(MODEL_KEYS))      # a typo ([[layers]]) says so before "required" does
    if unknown:
        raise top.error(unknown[0], f"unknown key (a model file has {', '.join(MODEL_KEYS)})")
    name = top.str("name", Path(top.file).stem)
    dims = top.raw("input")
    if (not isinstance(dims, list) or len(dims) not in (1, 3)
            or not all(isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= 1_000_000 for d in dims)):
        raise top.error("input", "must be [features] or [C, H, W] of integers in 1..1000000")
    shape: Shape = (dims[0], 1, 1) if len(dims) == 1 else (dims[0], dims[1], dims[2])
    classes = top.int("classes", 0, lo=0, hi=10_000_000)
    layers, names, inputs = [], [], []
    tables = top.tables("layer")
    if not tables:
        raise top.error("layer", "a model needs at least one [[layer]]")
    for lt in tables:
        kind = lt.str("kind", choices=KINDS)
        allowed = {f.name for f in fields(KINDS[kind])} - {"kind"}
        kw: dict[str, Any] = {}
        for key in sorted(lt.data):            # a typo says so before "required" does
            if key not in allowed | {"kind", "name", "inputs"}:
                raise lt.error(key, "unknown key")
        for key in KINDS[kind].required:          # the rest default as the layer classes say
            if not lt.has(key):
                raise lt.error(key, f"is required for a {kind} layer")
        for key in sorted(allowed):
            if lt.has(key):
                kw[key] = _layer_value(lt, key)
        names.append(lt.str("name", ""))
        inputs.append(_input_names(lt) if lt.has("inputs") else None)
        lt.done()
        layers.append(make_layer(kind, **kw))
    top.done()
    try:
        model = build_model(name, shape, layers, classes, names, inputs)
    except GraphError as exc:
        raise top.error(f"layer[{exc.layer}]" + (f".{exc.key}" if exc.key else ""), str(exc)) from None
    last = model.nodes[-1]
    if classes and classes != last.out_shape[0]:
        raise top.error("classes", f"{classes}, but the last layer ({last.layer.kind}) gives {last.out_shape[0]} "
                                   f"outputs (a label indexes them)")
    return model


def _layer_value(lt: Table, key: str) -> Any:
    """One layer field: rate a fraction, bias true/false, a window field n or [rows, cols]."""
    if key == "rate":
        return lt.float(key, lo=0.0, hi=0.999)
    if key in ("bias", "causal", "tied"):
        return lt.bool(key)
    lo = 0 if key in ("padding", "positions", "types") else 1
    value = lt.raw(key)
    if key in ("kernel", "stride", "padding") and isinstance(value, list):
        if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and lo <= v <= 1_000_000
                                      for v in value):
            raise lt.error(key, f"must be an integer or [rows, cols] of integers in {lo}..1000000")
        return (value[0], value[1])
    return lt.int(key, lo=lo, hi=1_000_000)


def _input_names(lt: Table) -> tuple[str, ...]:
    value = lt.raw("inputs")
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise lt.error("inputs", f"must be a non-empty array of layer names (or {INPUT_NAME!r})")
    return tuple(value)
