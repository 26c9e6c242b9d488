"""How GPU libraries run a layer kind in training, beyond one roofline per op.

Three effects, each a property of the kernels (cuBLAS, cuDNN, PyTorch's eager ops), not of
one GPU; the GPU's own figures (SMs, peaks, bandwidth, ``memory_efficiency``) come from its
``Device``.  See docs/decisions/018-kernels-by-layer-kind.md for the sources and figures.

- Tile and wave quantization of GEMMs (and implicit-GEMM convolutions): a GEMM runs as
  thread blocks of one output tile each, at most one per SM at a time, so it takes
  ceil(tiles / SMs) waves of a whole tile's work (NVIDIA, *Matrix Multiplication Background
  User's Guide*, sections 2.3 and 3).  The library picks the tile (and a split of K over
  blocks) that finishes first; a smaller tile reuses each loaded element less, and runs at
  its reuse m n / (m + n) over that of the largest tile.
- Passes over memory: what a memory-bound layer's real kernels read and write, in tensors of
  its output's size (the Plan counts its inputs and output once, twice backward).
- Attention as the scenario's framework runs it (``model.attention``): ``eager`` as eager
  PyTorch runs it (NVIDIA DeepLearningExamples BERT ``modeling.py``): the scores are scaled,
  masked, soft-maxed and dropped out by separate kernels, each a pass over the heads x T x T
  score matrices; ``fused``, Megatron-LM's fused scale-mask-softmax (decision 023): fewer
  passes and kernels; ``flash``, FlashAttention-2 (Dao 2023): the scores never leave the
  SMs (q, k, v and the output are read and written once), and the backward recomputes
  q k^T, one more batched product.
"""
from __future__ import annotations

from math import ceil
from typing import NamedTuple

from clustersim.core.partition import even_cuts
from clustersim.core.plan import part_of, reruns

# Thread-block tiles of cuBLAS's tensor-core GEMMs (Matrix Multiplication Background User's
# Guide, 2.3 "Typical tile dimensions in cuBLAS and performance"), largest reuse first.
TILES: tuple[tuple[int, int], ...] = ((256, 128), (128, 256), (128, 128), (256, 64), (64, 256),
                                      (128, 64), (64, 128), (64, 64))
SPLIT_K = (1, 2, 4, 8, 16, 32)     # K split over blocks (cuBLAS split-K, cuDNN wgrad), partial sums added
K_STEP = 32                        # a block walks K in steps of this many (the tile's K depth for fp16)

# Passes over memory, in tensors of the output's size (forward, backward), of the kernels
# PyTorch runs for a memory-bound layer kind in training:
PASSES: dict[str, tuple[float, float]] = {
    # batch_norm_collect_statistics reads x; batch_norm_transform_input reads x, writes y.
    # backward: batch_norm_backward_reduce reads dy, x; batch_norm_backward_elemt reads dy, x,
    # writes dx (aten/src/ATen/native/cuda/Normalization.cuh)
    "batchnorm": (3.0, 5.0),
    # forward reads two, writes one; its backward hands dy to both inputs without a kernel,
    # and the fork that feeds the residual adds the two gradients (reads two, writes one)
    "add": (3.0, 3.0),
    # one kernel each way: y = f(x); dx = f'(x) dy reads x (relu: y) and dy, writes dx
    # (relu's threshold_backward)
    "gelu": (2.0, 3.0),
    "relu": (2.0, 3.0),
    # layer_norm: one kernel with each row's statistics in registers; backward: dx (reads
    # dy, x, writes dx) and the gamma/beta sums (read dy, x) in a second kernel
    "layernorm": (2.0, 5.0),
    # fused dropout: reads x, writes y and a 1-byte mask (half a 2-byte tensor); backward
    # reads dy and the mask, writes dx
    "dropout": (2.5, 2.5),
}

# Eager attention over fp16 scores: passes over the heads x T x T matrix besides the two
# batched GEMMs (scale: 2, mask add: 2, softmax: 2, dropout: 2 + its 1-byte mask 0.5;
# backward: dropout 2.5, softmax 3, scale 2), and the context's permute + contiguous copy
# (one read and one write of the output, each way).
SCORE_PASSES = (8.5, 7.5)
CONTEXT_PASSES = (2.0, 2.0)
EAGER_ATTENTION_KERNELS = (5, 4)   # scale, mask, softmax, dropout, copy; and backward's four
# Megatron-LM's fused softmax (2020-21; decision 023): scaled inside baddbmm, one
# scaled_upper_triang_masked_softmax (read + write), dropout 2.5; backward dropout 2.5 and
# the fused softmax backward 3; the context's copy as eager's.
FUSED_SCORE_PASSES = (4.5, 5.5)
FUSED_ATTENTION_KERNELS = (3, 2)
# FlashAttention-2: one kernel forward; backward a preprocessing kernel and the main one.
FLASH_ATTENTION_KERNELS = (1, 2)


class Gemm(NamedTuple):
    """``batch`` independent m x n x k products (2 m n k FLOPs each)."""

    m: int
    n: int
    k: int
    batch: int = 1


def tile_reuse(tile: tuple[int, int]) -> float:
    """FLOPs per element a tile loads, up to a constant: m n / (m + n)."""
    return tile[0] * tile[1] / (tile[0] + tile[1])


def gemm_seconds(g: Gemm, rate: float, sms: int, tiles=TILES) -> float:
    """Seconds of GEMM ``g`` on ``sms`` SMs whose largest tile runs at ``rate`` FLOP/s over
    the whole GPU: the fastest over ``tiles`` and K splits of waves x one block's time (its
    share of K rounded up to ``K_STEP``).  A GEMM whose tiles fill whole waves of the first
    tile, K a multiple of ``K_STEP``, takes 2 m n k / rate; none takes less."""
    if sms <= 0:
        raise ValueError(f"sms(={sms}) must be > 0")
    best = float("inf")
    top = tile_reuse(tiles[0])
    for mt, nt in tiles:
        per_sm = rate / sms * tile_reuse((mt, nt)) / top
        blocks = g.batch * ceil(g.m / mt) * ceil(g.n / nt)
        for split in SPLIT_K:
            depth = K_STEP * ceil(g.k / (split * K_STEP))
            best = min(best, ceil(blocks * split / sms) * 2.0 * mt * nt * depth / per_sm)
    return best


def quantized_efficiency(g: Gemm, sms: int, tiles=TILES) -> float:
    """The share of the largest tile's rate a GEMM keeps after tile and wave quantization."""
    return 2.0 * g.m * g.n * g.k * g.batch / gemm_seconds(g, 1.0, sms, tiles)


def memory_bytes(w: "LayerWork", dtype_bytes: float, backward: bool) -> float | None:
    """Bytes the kernels of a memory-bound layer kind (``PASSES``) read and write for op ``w``:
    its passes over tensors of its output's size (the slice's box over its samples; statistics
    and parameters left out), the forward's passes again first when ``redo``.  None for a kind
    not described here: the caller keeps the Plan's bytes."""
    passes = PASSES.get(w.layer.kind)
    if passes is None:
        return None
    c, h, wd = w.out
    n = passes[1] + (passes[0] if w.redo else 0.0) if backward else passes[0]
    return n * w.batch * c * h * wd * dtype_bytes


GEMM_KINDS = ("conv2d", "dense", "lm_head", "attention")


class LayerWork(NamedTuple):
    """What a compute op computes: ``layer`` reading ``in_shape`` for
    ``batch`` samples, ``out`` = (channels, rows, columns) of its output (a slice's box
    extent; attention: its heads' columns), and its forward again before the backward
    when ``redo`` (``selective``: attention's forward but its projection); without
    ``input_grad`` (a layer reading the model's input alone) no data-gradient GEMM."""

    layer: object
    in_shape: tuple[int, int, int]
    batch: int
    out: tuple[int, int, int]
    redo: bool = False
    attention: str = "eager"          # the scenario's model.attention
    selective: bool = False           # training.recompute = "selective"
    input_grad: bool = True           # ``Node.input_grad``


def layer_gemms(w: LayerWork, backward: bool) -> list[Gemm]:
    """The GEMMs an op's forward (or backward: data and weight gradients) runs as:
    convolutions as implicit GEMMs over the batch's output positions (m = B P Q, n = filters,
    k = C R S), dense layers and the LM head, attention's q/k/v projection and its two
    batched products per head.  Other kinds: []."""
    kind, (c, h, wd), b, (f, p, q) = w.layer.kind, w.in_shape, w.batch, w.out
    if kind == "conv2d":
        m, n, k = b * p * q, f, c * w.layer.area
    elif kind == "dense":
        m, n, k = b, f, c * h * wd
    elif kind == "lm_head":
        m, n, k = b * p, f, c
    elif kind == "attention":
        t, dh = h, c // w.layer.heads
        bh = b * (f // dh)
        if not backward:
            return [Gemm(b * t, 3 * f, c), Gemm(t, t, dh, bh), Gemm(t, dh, t, bh)]
        return [Gemm(b * t, c, 3 * f), Gemm(c, 3 * f, b * t),       # projection: data, weights
                Gemm(t, dh, t, bh), Gemm(t, dh, t, bh),              # dQ = dS K, dK = dS^T Q
                Gemm(t, t, dh, bh), Gemm(t, dh, t, bh)]              # dP = dC V^T, dV = P^T dC
        # (the first one, or two backward, are the projection; the rest the per-head products)
    else:
        return []
    if not backward:
        return [Gemm(m, n, k)]
    return [Gemm(m, k, n), Gemm(n, k, m)] if w.input_grad else [Gemm(n, k, m)]     # data, weights


def gemm_bytes(g: Gemm, dtype_bytes: float) -> float:
    """Each operand and the result once: (m k + k n + m n) elements per product."""
    return (g.m * g.k + g.k * g.n + g.m * g.n) * g.batch * dtype_bytes


def attention_extra_bytes(w: LayerWork, dtype_bytes: float, backward: bool) -> float:
    """Traffic of attention's kernels besides its GEMMs: eager and fused, the passes over
    the scores and the context's copy (``SCORE_PASSES`` or ``FUSED_SCORE_PASSES``,
    ``CONTEXT_PASSES``); flash, q, k, v and the output once (forward), and q, k, v, the
    output, its gradient and dq, dk, dv once (backward)."""
    c, t, _ = w.in_shape
    f = w.out[0]
    if w.attention == "flash":
        return (8.0 if backward else 4.0) * w.batch * f * t * dtype_bytes
    scores = w.batch * (f // (c // w.layer.heads)) * t * t
    passes = (FUSED_SCORE_PASSES if w.attention == "fused" else SCORE_PASSES)[backward]
    return (passes * scores + CONTEXT_PASSES[backward] * w.batch * f * t) * dtype_bytes


def attention_kernels(w: LayerWork, backward: bool) -> int:
    """Kernels attention launches besides its GEMMs (flash: all of it, GEMMs included)."""
    return {"eager": EAGER_ATTENTION_KERNELS, "fused": FUSED_ATTENTION_KERNELS,
            "flash": FLASH_ATTENTION_KERNELS}[w.attention][backward]


def work_seconds(dev, dtype: str, dtype_bytes: float, w: LayerWork, backward: bool,
                 flops: float, nbytes: float) -> float:
    """Seconds of op ``w`` (``flops`` and ``nbytes`` as the Plan counts them) on GPU ``dev``
    (its SMs, peak, ``efficiency`` as the largest tile's share of peak, achievable memory
    bandwidth, per-kernel overhead).  A GEMM kind: each GEMM at the slower of its quantized
    compute and its operands' traffic, one kernel each; attention's other kernels at memory
    speed (flash: its per-head products inside them, at the slower of compute and their
    q, k, v, output traffic); ``redo``: the forward again first.  Other kinds: a roofline over the
    bytes their kernels move (``memory_bytes``; the Plan's ``nbytes`` for a kind not in ``PASSES``)."""
    rate, bw = dev.flops_per_s(dtype) * dev.efficiency, dev.achievable_bw
    gemms = layer_gemms(w, backward)
    if not gemms:
        real = memory_bytes(w, dtype_bytes, backward)
        return dev.op_overhead + max(flops / rate, (nbytes if real is None else real) / bw)
    flash = w.layer.kind == "attention" and w.attention == "flash"
    kernels = gemms[:2 if backward else 1] if flash else gemms     # flash: the projection's alone
    t = sum(dev.op_overhead + max(gemm_seconds(g, rate, dev.sms), gemm_bytes(g, dtype_bytes) / bw) for g in kernels)
    if w.layer.kind == "attention":
        t += attention_kernels(w, backward) * dev.op_overhead
        extra = attention_extra_bytes(w, dtype_bytes, backward) / bw
        t += max(_flash_core_seconds(gemms, backward, rate, dev.sms), extra) if flash else extra
    if backward and w.redo:
        t += work_seconds(dev, dtype, dtype_bytes, w, False, 0.0, 0.0)
    elif backward and w.selective and w.layer.kind == "attention":     # the forward but its projection
        projection = layer_gemms(w, False)[0]
        t += work_seconds(dev, dtype, dtype_bytes, w, False, 0.0, 0.0) - (
            dev.op_overhead + max(gemm_seconds(projection, rate, dev.sms), gemm_bytes(projection, dtype_bytes) / bw))
    return t


def _flash_core_seconds(gemms: list[Gemm], backward: bool, rate: float, sms: int) -> float:
    """FlashAttention-2's per-head products (backward: and q k^T once more) at their
    quantized compute, inside its kernels, the scores staying on chip."""
    core = gemms[2:] + [gemms[-2]] if backward else gemms[1:]
    return sum(gemm_seconds(g, rate, sms) for g in core)


def op_work(plan, op, again: list[bool] | None = None) -> LayerWork | None:
    """The ``LayerWork`` of a Plan's compute op (None for a transfer): the layer (under a
    tensor split, the slot's partial-sum part) and the input it reads, the slice's output box,
    its micro-batch's samples as the Plan cuts the batch, and what recomputation reruns
    (``again``: ``plan.reruns`` of the model, found here when not given)."""
    if op.kind == "xfer":
        return None
    model = plan.scenario.model
    node = model.nodes[op.layer]
    part = part_of(model, plan.parts, op.layer, op.slot)
    layer, in_shape = (part.layer, part.in_shape) if part else (node.layer, node.in_shape)
    box = dict(plan.slices[op.layer])[op.slot]
    first, end = even_cuts(plan.scenario.batch_size, plan.scenario.parallel.micro_batches)[op.micro]
    recompute = plan.scenario.training.recompute
    full = recompute == "full" and (reruns(model) if again is None else again)[op.layer]
    return LayerWork(layer, in_shape, end - first, tuple(hi - lo for lo, hi in box),
                     full, plan.scenario.attention, recompute == "selective", node.input_grad)
