"""Layer kinds: shapes, parameters, FLOPs, and what a slice of the output needs.

Activations are per sample and always 3-D ``(C, H, W)``; a flat vector of F features is
``(F, 1, 1)``.  A *box* is a sub-block ``((c0, c1), (h0, h1), (w0, w1))`` of an activation.
Model parallelism ("spatial", DistBelief) cuts each layer's output into boxes:

- ``rows``: stripes along H (locally connected layers: their weights are untied, so a
  stripe owns exactly its weights and needs only a halo of input rows);
- ``channels``: groups of output channels/features (dense, conv2d: weights are per
  output channel; every slice needs the whole input, a full exchange);
- ``follow``: the cut of the input (pooling, nonlinearities, normalisation).

For each kind, ``needs(in_shape, box)`` is the input box a slice of output ``box`` reads,
and ``slice_params`` the parameters it owns.  Invariant (tested): slices' FLOPs and
parameters add up to the whole layer's.

Graphs: a layer reads one input (``arity`` 1) or, for ``add`` and ``concat`` (``arity``
0), two or more.  ``merge(in_shapes)`` is the shape the layer sees as its input (the
common shape for add, the channels stacked for concat) and ``input_boxes(in_shapes,
box)`` the box of each input a slice of output ``box`` reads (an empty box where it reads
none of it).  Window sizes, strides and paddings are an int or a (rows, cols) pair.

Transformers: a sequence of T positions of d features is ``(d, T, 1)`` (features as
channels, positions as rows; docs/decisions/017), so a channel cut is Megatron's cut of
features and heads, and a position-wise dense layer is a 1 x 1 ``conv2d``.

Megatron-LM's tensor split (docs/decisions/019) adds partial sums: a kind with ``reduces``
lets a slot sum over a part of its inputs (conv2d: input channels, the row-parallel
projection) or of its words (embedding), ``part`` saying what that slot runs; kinds with
``replicate`` (norms) are computed whole on every slot.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from math import prod
from typing import ClassVar, NamedTuple

Shape = tuple[int, int, int]
Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


def full_box(shape: Shape) -> Box:
    return ((0, shape[0]), (0, shape[1]), (0, shape[2]))


def box_size(box: Box) -> int:
    return prod(max(0, b - a) for a, b in box)


def box_overlap(x: Box, y: Box) -> int:
    return prod(max(0, min(xb, yb) - max(xa, ya)) for (xa, xb), (ya, yb) in zip(x, y))


def box_intersect(x: Box, y: Box) -> Box:
    return tuple((max(xa, ya), min(xb, yb)) for (xa, xb), (ya, yb) in zip(x, y))


def box_hull(x: Box, y: Box) -> Box:
    """The smallest box holding both."""
    return tuple((min(xa, ya), max(xb, yb)) for (xa, xb), (ya, yb) in zip(x, y))


class Part(NamedTuple):
    """What one slot of a tensor (Megatron) split runs where it computes a partial sum of a
    layer's whole output from a range [lo, hi) of the dimension the layer sums over
    (``Layer.reduces``): the layer it runs, that layer's input shape, the box of the input it
    reads, and where its parameters sit inside the whole layer's arrays."""

    layer: "Layer"
    in_shape: Shape
    reads: Box
    index: list


def pair(v: int | tuple[int, int]) -> tuple[int, int]:
    """A window size, stride or padding as (rows, cols)."""
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _window(lo: int, hi: int, kernel: int, stride: int, pad: int, size: int) -> tuple[int, int]:
    """Input range read by outputs [lo, hi) of a sliding window, clipped to [0, size)."""
    if hi <= lo:
        return (0, 0)
    return (max(0, lo * stride - pad), min(size, (hi - 1) * stride - pad + kernel))


def _slide(size: int, kernel: int, stride: int, pad: int, what: str) -> int:
    out = (size + 2 * pad - kernel) // stride + 1
    if kernel > size + 2 * pad or out < 1:
        raise ValueError(f"{what} kernel {kernel} does not fit input of size {size} (padding {pad})")
    return out


@dataclass(frozen=True)
class Layer:
    """Base: an element-wise layer that keeps the shape and follows the input's cut."""

    kind: str
    split = "follow"
    flops_per_elem = 1.0         # forward FLOPs per output element
    bwd_ratio = 1.0              # backward FLOPs / forward FLOPs (2 for weighted layers: dgrad + wgrad)
    input_grad_share = 0.0       # of bwd_ratio, the input's gradient (a weighted layer's dgrad GEMM: 1)
    required: ClassVar[tuple[str, ...]] = ()   # model-file keys without a meaningful default
    arity: ClassVar[int] = 1     # inputs it reads; 0: two or more
    reduces: ClassVar[str] = ""  # tensor split: what a slot's partial sum cuts (inputs | vocab); "": none
    replicate: ClassVar[bool] = False   # tensor split: every slot computes it whole on a whole input (norms)

    def merge(self, in_shapes: tuple[Shape, ...]) -> Shape:
        """The shape this layer reads as its input; raises ValueError for a wrong number of
        inputs (or, for add and concat, shapes that do not fit together)."""
        if len(in_shapes) != 1:
            raise ValueError(f"a {self.kind} layer reads one input, got {len(in_shapes)}")
        return in_shapes[0]

    def input_boxes(self, in_shapes: tuple[Shape, ...], box: Box) -> tuple[Box, ...]:
        """Per input, the box of it that a slice of output ``box`` reads."""
        return (self.needs(in_shapes[0], box),)

    def param_shapes(self, s: Shape) -> list[tuple[int, ...]]:
        """Shapes of the whole layer's parameter arrays, in the order the kernels take them."""
        return []

    def box_index(self, box: Box) -> list[tuple[slice, ...]]:
        """Where a slice of output ``box`` keeps its parameters inside those arrays."""
        return []

    def shape(self, s: Shape) -> Shape:
        return s

    def params(self, s: Shape) -> int:
        return 0

    def flops_per_out(self, s: Shape) -> float:
        return self.flops_per_elem

    def needs(self, s: Shape, box: Box) -> Box:
        return box

    def slice_params(self, s: Shape, box: Box) -> int:
        return 0

    def exchange_floats(self, s: Shape, box: Box, split: str, batch: int) -> tuple[int, int]:
        """Small reductions a slice shares with every other slice: (forward, backward) floats."""
        return (0, 0)

    def unit(self, s: Shape) -> int:
        """Output channels a channel cut must keep together (an attention head's width)."""
        return 1

    def saved(self, s: Shape, box: Box, attention: str = "eager", scores: bool = True) -> int:
        """Elements per sample the backward of a slice keeps besides its input reads and its
        output (attention: its queries, keys, values and score matrices, as ``attention``,
        the scenario's ``model.attention``, keeps them; ``scores`` False: none of the score
        matrices, which selective recomputation reruns)."""
        return 0

    def mask_bytes(self, box: Box) -> int:
        """Bytes per sample a slice keeps for its backward besides tensors of the model's
        dtype: a dropout's mask, one byte an element (PyTorch's native_dropout saves a bool
        mask; Korthikanti et al. 2022 count it so)."""
        return 0

    def rerun_share(self, s: Shape) -> float:
        """The share of the forward's FLOPs that selective recomputation reruns before the
        backward: attention's scores, softmax and context (Korthikanti et al. 2022, 5); none
        of other kinds."""
        return 0.0

    def backward_reads(self) -> tuple[bool, bool]:
        """Whether the layer's backward reads its input and whether it reads its output -- what
        autograd saves for it.  A product reads its input (the other factor of its weight's
        gradient), a norm or a pooling its input; relu, sigmoid, tanh and the loss's softmax
        read their output; an add, a concat and a dropout (its mask aside) read neither.  A tensor that no
        backward reads is freed after the forward (``plan.activation_elements``)."""
        return (True, False)

    def reduced(self, s: Shape) -> int:
        """Size of the dimension a partial sum cuts (``reduces``): input channels, words."""
        return 0

    def part(self, s: Shape, lo: int, hi: int, first: bool) -> Part:
        """The slot computing [lo, hi) of ``reduced`` (``first``: the slot adding the terms
        counted once, a bias or the position table).  Kinds with ``reduces`` only."""
        raise ValueError(f"a {self.kind} layer is not summed over parts")


@dataclass(frozen=True)
class Dense(Layer):
    units: int = 1
    split = "channels"
    bwd_ratio = 2.0
    input_grad_share = 1.0
    required = ("units",)

    def param_shapes(self, s):
        return [(prod(s), self.units), (self.units,)]              # W (features in, units), b

    def box_index(self, box):
        (c0, c1), _, _ = box
        return [(slice(None), slice(c0, c1)), (slice(c0, c1),)]

    def shape(self, s):
        return (self.units, 1, 1)

    def params(self, s):
        return self.units * (prod(s) + 1)

    def flops_per_out(self, s):
        return 2.0 * prod(s)

    def needs(self, s, box):
        return full_box(s)

    def slice_params(self, s, box):
        return (box[0][1] - box[0][0]) * (prod(s) + 1)


@dataclass(frozen=True)
class _Window(Layer):
    """Shared geometry of layers with a kernel x kernel window."""

    kernel: int | tuple[int, int] = 1
    stride: int | tuple[int, int] = 1
    padding: int | tuple[int, int] = 0

    @property
    def area(self) -> int:
        """Input positions one window covers per channel (k_rows x k_cols)."""
        kh, kw = pair(self.kernel)
        return kh * kw

    def _out_hw(self, s):
        (kh, kw), (sh, sw), (ph, pw) = pair(self.kernel), pair(self.stride), pair(self.padding)
        return (_slide(s[1], kh, sh, ph, self.kind), _slide(s[2], kw, sw, pw, self.kind))

    def _rows_needed(self, s, box):
        (kh, kw), (sh, sw), (ph, pw) = pair(self.kernel), pair(self.stride), pair(self.padding)
        return (_window(*box[1], kh, sh, ph, s[1]), _window(*box[2], kw, sw, pw, s[2]))


@dataclass(frozen=True)
class _Filters(_Window):
    """A bank of ``filters`` k x k filters over all input channels."""

    filters: int = 1
    bwd_ratio = 2.0
    input_grad_share = 1.0
    required = ("filters", "kernel")

    def shape(self, s):
        return (self.filters, *self._out_hw(s))

    def flops_per_out(self, s):
        return 2.0 * self.area * s[0]


@dataclass(frozen=True)
class LocallyConnected(_Filters):
    """Untied filters: one per output position, so a row stripe owns exactly its weights."""

    split = "rows"

    def params(self, s):
        return box_size(full_box(self.shape(s))) * (self.area * s[0] + 1)

    def needs(self, s, box):
        return ((0, s[0]), *self._rows_needed(s, box))

    def slice_params(self, s, box):
        return box_size(box) * (self.area * s[0] + 1)

    def param_shapes(self, s):
        f, h, w = self.shape(s)                            # a filter per output position
        return [(h, w, f, s[0], *pair(self.kernel)), (h, w, f)]

    def box_index(self, box):
        (c0, c1), (h0, h1), (w0, w1) = box
        rows = (slice(h0, h1), slice(w0, w1), slice(c0, c1))
        return [rows, rows]


@dataclass(frozen=True)
class Conv2d(_Filters):
    """Tied filters: cut by output channels; every slice reads the whole input.  ``bias =
    false`` drops the biases (convolutions followed by batch norm, as in ResNet)."""

    bias: bool = True
    split = "channels"
    reduces = "inputs"           # Megatron's row-parallel layer: input channels [lo, hi), a partial sum

    def params(self, s):
        return self.filters * (self.area * s[0] + self.bias)

    def reduced(self, s):
        return s[0]

    def part(self, s, lo, hi, first):
        bias = self.bias and first
        return Part(replace(self, bias=bias), (hi - lo, s[1], s[2]), ((lo, hi), (0, s[1]), (0, s[2])),
                    [(slice(None), slice(lo, hi))] + ([(slice(None),)] if bias else []))

    def needs(self, s, box):
        return full_box(s)

    def slice_params(self, s, box):
        return (box[0][1] - box[0][0]) * (self.area * s[0] + self.bias)

    def param_shapes(self, s):
        return [(self.filters, s[0], *pair(self.kernel))] + ([(self.filters,)] if self.bias else [])

    def box_index(self, box):
        (c0, c1), _, _ = box
        return [(slice(c0, c1),)] * (1 + self.bias)


@dataclass(frozen=True)
class Pool(_Window):
    """max_pool / avg_pool: per channel, window over rows and columns."""

    required = ("kernel",)

    def backward_reads(self):
        return (True, False)        # PyTorch saves the input of both (max: and its int64 indices, not counted)

    def shape(self, s):
        return (s[0], *self._out_hw(s))

    def flops_per_out(self, s):
        return float(self.area)

    def needs(self, s, box):
        return (box[0], *self._rows_needed(s, box))


@dataclass(frozen=True)
class Maxout(Layer):
    pieces: int = 2

    def backward_reads(self):
        return (True, True)                             # not looked at: kept as before

    def shape(self, s):
        if s[0] % self.pieces:
            raise ValueError(f"maxout pieces {self.pieces} must divide the {s[0]} input channels")
        return (s[0] // self.pieces, s[1], s[2])

    def flops_per_out(self, s):
        return float(self.pieces)

    def needs(self, s, box):
        return ((box[0][0] * self.pieces, box[0][1] * self.pieces), box[1], box[2])


@dataclass(frozen=True)
class LRN(Layer):
    """Local response normalisation across ``size`` neighbouring channels (AlexNet)."""

    size: int = 5

    def backward_reads(self):
        return (True, True)                             # not looked at: kept as before

    def flops_per_out(self, s):
        return 2.0 * self.size + 4.0

    def needs(self, s, box):
        half = self.size // 2
        return ((max(0, box[0][0] - half), min(s[0], box[0][1] + half)), box[1], box[2])


@dataclass(frozen=True)
class LCN(Layer):
    """Local contrast normalisation (Jarrett et al. 2009): subtractive and divisive
    normalisation over a size x size window of all channels."""

    size: int = 9

    def backward_reads(self):
        return (True, True)                             # not looked at: kept as before

    def flops_per_out(self, s):
        return 4.0 * self.size**2      # weighted mean and weighted variance over the window

    def needs(self, s, box):
        half = self.size // 2
        rows = (max(0, box[1][0] - half), min(s[1], box[1][1] + half))
        cols = (max(0, box[2][0] - half), min(s[2], box[2][1] + half))
        return ((0, s[0]), rows, cols)


@dataclass(frozen=True)
class BatchNorm(Layer):
    """Per-channel statistics over batch, rows and columns: cut by channels, so each slice
    owns its channels' statistics and gamma/beta (a row-cut input is re-partitioned)."""

    split = "channels"
    flops_per_elem = 5.0
    bwd_ratio = 2.0
    replicate = True

    def params(self, s):
        return 2 * s[0]

    def needs(self, s, box):
        return (box[0], (0, s[1]), (0, s[2]))

    def slice_params(self, s, box):
        return 2 * (box[0][1] - box[0][0])

    def param_shapes(self, s):
        return [(s[0],), (s[0],)]                           # gamma, beta

    def box_index(self, box):
        (c0, c1), _, _ = box
        return [(slice(c0, c1),), (slice(c0, c1),)]


@dataclass(frozen=True)
class Dropout(Layer):
    rate: float = 0.5

    def backward_reads(self):
        return (False, False)                           # its mask: ``mask_bytes``

    def mask_bytes(self, box):
        return box_size(box)


@dataclass(frozen=True)
class Activation(Layer):
    """relu (1 FLOP per element), sigmoid and tanh (4: exp, add, divide, multiply), gelu
    (8: GPT-2's tanh approximation, a cube, a tanh and four multiply-adds)."""

    def flops_per_out(self, s):
        return {"relu": 1.0, "gelu": 8.0}.get(self.kind, 4.0)

    def backward_reads(self):
        return (self.kind == "gelu", self.kind != "gelu")     # PyTorch: gelu its input, the rest their output


@dataclass(frozen=True)
class SoftmaxXent(Layer):
    """Softmax with cross-entropy loss over all features."""

    flops_per_elem = 5.0

    def backward_reads(self):
        return (False, True)                            # the probabilities (log-softmax's output)

    def shape(self, s):
        if s[2] != 1:
            raise ValueError(f"softmax_xent needs a flat input (put a dense layer first) or classes per "
                             f"position (C, T, 1), got {s}")
        return s

    def exchange_floats(self, s, box, split, batch):
        # per sample and position: the slice's max and its sum of exponentials
        return (2 * batch * (box[1][1] - box[1][0]), 0)


@dataclass(frozen=True)
class Add(Layer):
    """Element-wise sum of two or more inputs of one shape (a residual connection)."""

    arity = 0

    def backward_reads(self):
        return (False, False)

    def merge(self, in_shapes):
        if len(in_shapes) < 2:
            raise ValueError(f"add sums two or more inputs, got {len(in_shapes)}")
        if len(set(in_shapes)) > 1:
            raise ValueError(f"add needs inputs of one shape, got {' and '.join(map(str, in_shapes))}")
        return in_shapes[0]

    def flops_per_out(self, s):
        return 1.0           # one addition per element: two inputs, the residual case

    def input_boxes(self, in_shapes, box):
        return tuple(box for _ in in_shapes)


@dataclass(frozen=True)
class Concat(Layer):
    """Two or more inputs stacked along channels (Inception's branches, AlexNet's towers
    meeting); a copy, counted as no FLOPs."""

    arity = 0
    flops_per_elem = 0.0

    def backward_reads(self):
        return (False, False)

    def merge(self, in_shapes):
        if len(in_shapes) < 2:
            raise ValueError(f"concat stacks two or more inputs, got {len(in_shapes)}")
        if len({s[1:] for s in in_shapes}) > 1:
            raise ValueError(f"concat needs inputs of one height and width, got {' and '.join(map(str, in_shapes))}")
        return (sum(s[0] for s in in_shapes), *in_shapes[0][1:])

    def input_boxes(self, in_shapes, box):
        (c0, c1), rows, cols = box
        out, offset = [], 0
        for s in in_shapes:
            lo, hi = max(c0, offset), min(c1, offset + s[0])
            out.append(((lo - offset, hi - offset) if hi > lo else (0, 0), rows, cols))
            offset += s[0]
        return tuple(out)


# --- transformers: a (sequence T, width d) activation is (d, T, 1), see docs/decisions/017 --
@dataclass(frozen=True)
class Embedding(Layer):
    """Token ids (1, T, 1) to vectors (dim, T, 1): a ``vocab`` x ``dim`` table, plus learned
    ``positions`` (rows 0..T-1 added) and ``types`` (BERT's token types; type 0 added) where
    nonzero.  Cut by output features: a slice owns those columns of every table."""

    vocab: int = 1
    dim: int = 1
    positions: int = 0
    types: int = 0
    offset: int = 0              # the first token id the table holds (a tensor split's slice of the vocabulary)
    split = "channels"
    reduces = "vocab"            # Megatron's vocabulary-parallel embedding: words [lo, hi), a partial sum
    required = ("vocab", "dim")

    def _rows(self) -> int:
        return self.vocab + self.positions + self.types

    def shape(self, s):
        if s[0] != 1 or s[2] != 1:
            raise ValueError(f"embedding reads token ids as (1, T, 1), got {s}")
        if self.positions and s[1] > self.positions:
            raise ValueError(f"sequence {s[1]} is longer than the {self.positions} learned positions")
        return (self.dim, s[1], 1)

    def flops_per_out(self, s):
        return float((self.positions > 0) + (self.types > 0))     # the additions; the lookup is a copy

    def params(self, s):
        return self._rows() * self.dim

    def needs(self, s, box):
        return ((0, 1), box[1], box[2])

    def slice_params(self, s, box):
        return self._rows() * (box[0][1] - box[0][0])

    def param_shapes(self, s):
        return [(n, self.dim) for n in (self.vocab, self.positions, self.types) if n]

    def box_index(self, box):
        return [(slice(None), slice(*box[0]))] * (1 + (self.positions > 0) + (self.types > 0))

    def reduced(self, s):
        return self.vocab

    def part(self, s, lo, hi, first):
        """Words [lo, hi): ids outside give zeros; the ``first`` slot adds positions and types."""
        extra = (self.positions > 0) + (self.types > 0) if first else 0
        layer = replace(self, vocab=hi - lo, offset=self.offset + lo,
                        positions=self.positions if first else 0, types=self.types if first else 0)
        return Part(layer, s, full_box(s), [(slice(lo, hi), slice(None))] + [(slice(None), slice(None))] * extra)


@dataclass(frozen=True)
class Norm(Layer):
    """``layernorm`` (gamma, beta) and ``rmsnorm`` (gamma) over the features of each
    position.  Cut by output features: a slice owns their gamma (and beta) and reads every
    feature of its positions for the statistics."""

    split = "channels"
    bwd_ratio = 2.0
    replicate = True

    def flops_per_out(self, s):
        return 8.0 if self.kind == "layernorm" else 6.0      # statistics, normalise, scale (and shift)

    def _arrays(self) -> int:
        return 2 if self.kind == "layernorm" else 1

    def params(self, s):
        return self._arrays() * s[0]

    def needs(self, s, box):
        return ((0, s[0]), box[1], box[2])

    def slice_params(self, s, box):
        return self._arrays() * (box[0][1] - box[0][0])

    def param_shapes(self, s):
        return [(s[0],)] * self._arrays()

    def box_index(self, box):
        return [(slice(*box[0]),)] * self._arrays()


@dataclass(frozen=True)
class SwiGLU(Layer):
    """Llama's gate: channels (2k, 2k + 1) of the input are (gate, up) of feature k, and
    y_k = silu(gate) * up; the fused projection before it is a 1 x 1 convolution of 2F
    filters (interleaved so a channel cut keeps pairs together)."""

    flops_per_elem = 6.0

    def shape(self, s):
        if s[0] % 2:
            raise ValueError(f"swiglu pairs gate and up channels; {s[0]} input channels is odd")
        return (s[0] // 2, s[1], s[2])

    def needs(self, s, box):
        return ((2 * box[0][0], 2 * box[0][1]), box[1], box[2])


SCORE_COPIES = {"eager": 2, "fused": 1, "flash": 0}   # heads x T x T matrices attention keeps


@dataclass(frozen=True)
class Attention(Layer):
    """Multi-head self-attention over positions: the query, key and value projections
    (d x 3d, biases unless ``bias = false``) and softmax(q k^T / sqrt(d / heads)) v per
    head, ``causal`` masking later positions; the output is the heads side by side (d, T,
    1) -- the output projection is a 1 x 1 convolution after it.  Cut by heads (``unit``):
    a slice owns its heads' projection columns and reads the whole input.  FLOPs count the
    full T x T scores, as dense kernels compute them."""

    heads: int = 1
    causal: bool = False
    bias: bool = True
    split = "channels"
    bwd_ratio = 2.0
    required = ("heads",)

    def shape(self, s):
        if s[2] != 1 or s[0] % self.heads:
            raise ValueError(f"attention needs (d, T, 1) with {self.heads} heads dividing d, got {s}")
        return s

    def unit(self, s):
        return s[0] // self.heads

    def flops_per_out(self, s):
        return 6.0 * s[0] + 4.0 * s[1] + 5.0 * s[1] / self.unit(s)   # projections, q k^T and p v, softmax

    def params(self, s):
        return 3 * s[0] * (s[0] + self.bias)

    def needs(self, s, box):
        return full_box(s)

    def slice_params(self, s, box):
        return 3 * (box[0][1] - box[0][0]) * (s[0] + self.bias)

    def param_shapes(self, s):
        return [(s[0], 3, s[0])] + ([(3, s[0])] if self.bias else [])     # W (d in, q/k/v, d out), b

    def box_index(self, box):
        cols = slice(*box[0])
        return [(slice(None), slice(None), cols)] + ([(slice(None), cols)] if self.bias else [])

    def saved(self, s, box, attention="eager", scores=True):
        """q, k, v, and the score matrices as the framework keeps them: eager the scores and
        the probabilities, Megatron's fused softmax the probabilities, FlashAttention none
        but one log-sum-exp per head and position; with ``scores`` False q, k, v only."""
        c, t = box[0][1] - box[0][0], s[1]
        heads = c // self.unit(s)
        if not scores:
            return 3 * c * t
        return 3 * c * t + SCORE_COPIES[attention] * heads * t * t + (heads * t if attention == "flash" else 0)

    def rerun_share(self, s):
        core = 4.0 * s[1] + 5.0 * s[1] / self.unit(s)          # q k^T, p v and the softmax
        return core / self.flops_per_out(s)


@dataclass(frozen=True)
class FirstToken(Layer):
    """The features of the first ``tokens`` positions: (d, tokens, 1).  One: BERT's [CLS]
    token, which its pooler reads; more: the positions a pretraining MLM head predicts,
    standing in for the masked ones it gathers (the same copy of that many positions;
    docs/decisions/024)."""

    tokens: int = 1
    flops_per_elem = 0.0

    def backward_reads(self):
        return (False, False)                           # a copy of some positions

    def shape(self, s):
        if self.tokens > s[1]:
            raise ValueError(f"first_token keeps {self.tokens} positions of a sequence of {s[1]}")
        return (s[0], self.tokens, 1)

    def needs(self, s, box):
        return (box[0], box[1], (0, 1))


@dataclass(frozen=True)
class LMHead(Layer):
    """Logits over a ``vocab`` at every position: (d, T, 1) -> (vocab, T, 1), cut by the
    vocabulary.  ``tied`` (GPT-2, BERT): the embedding's table, counted there, so no
    parameters here; untied (Llama): a vocab x d matrix of its own.  ``bias``: a bias per
    word (BERT's MLM decoder keeps its own next to the tied table)."""

    vocab: int = 1
    tied: bool = True
    bias: bool = False
    split = "channels"
    bwd_ratio = 2.0
    required = ("vocab",)

    def shape(self, s):
        return (self.vocab, s[1], s[2])

    def flops_per_out(self, s):
        return 2.0 * s[0]

    def params(self, s):
        return self.slice_params(s, full_box(self.shape(s)))

    def needs(self, s, box):
        return ((0, s[0]), box[1], box[2])

    def slice_params(self, s, box):
        return (box[0][1] - box[0][0]) * ((0 if self.tied else s[0]) + self.bias)

    def param_shapes(self, s):
        return ([] if self.tied else [(self.vocab, s[0])]) + ([(self.vocab,)] if self.bias else [])

    def box_index(self, box):
        words = slice(*box[0])
        return ([] if self.tied else [(words, slice(None))]) + ([(words,)] if self.bias else [])


KINDS: dict[str, type[Layer]] = {
    "dense": Dense, "locally_connected": LocallyConnected, "conv2d": Conv2d,
    "max_pool": Pool, "avg_pool": Pool, "relu": Activation, "sigmoid": Activation,
    "tanh": Activation, "maxout": Maxout, "lrn": LRN, "lcn": LCN, "batchnorm": BatchNorm,
    "dropout": Dropout, "softmax_xent": SoftmaxXent, "add": Add, "concat": Concat,
    "gelu": Activation, "embedding": Embedding, "layernorm": Norm, "rmsnorm": Norm, "swiglu": SwiGLU,
    "attention": Attention, "first_token": FirstToken, "lm_head": LMHead,
}
