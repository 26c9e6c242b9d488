"""Every layer kind forward and backward in ``xp``, on one box of the output.

A kernel gets the *region* of the input a box of its output reads (``layer.needs``: the
whole input for dense and conv2d, a halo of rows for locally connected layers, pooling
and LCN, neighbouring channels for LRN), placed at ``rin`` in input coordinates, and
computes that output box.  Its backward takes the gradient of the output box and returns
the (partial) gradient of the whole region -- the owner of each input element adds up
the pieces every consumer sends back -- and the gradient of the parameters of the box.
The single-process reference is the same call with the whole input and the whole output.

One class per layer kind holds its forward and backward side by side, and how its
parameters start (``init``); ``KERNELS`` maps every kind of ``clustersim.core.layers.KINDS``
to its class (tested), and ``forward``/``backward`` dispatch on ``layer.kind``.  Parameter
shapes and which part of them a box owns are the core layer's (``param_shapes``,
``box_index``).

Arrays are (B, C, H, W), batch first.  Parameters of a box: dense W (in, c) and b (c,);
conv2d W (c, C, kh, kw) and b (c,) (none with ``bias = false``); locally_connected
W (h, w, F, C, kh, kw) and b (h, w, F) for the box's output rows/cols; batchnorm gamma,
beta (c,).  Windows may be rectangular (kh x kw, strides and paddings per axis).

Kinds that read several inputs (``layer.arity`` 0: add, concat) take ``in_shape``, ``xr``
and ``rin`` as lists, one entry per input (its shape, its region, where that sits), and
their backward returns a list of region gradients.

Conventions: windows are clipped at the image border; max pooling pads with -inf, average
pooling counts padding as zeros; LRN is AlexNet's (k=2, alpha=1e-4, beta=0.75); LCN
normalises by the mean and variance of its size x size x C window (clipped at the border).
"""
from __future__ import annotations

from math import prod, sqrt

import numpy as np

from clustersim.core.layers import pair

LRN_K, LRN_ALPHA, LRN_BETA = 2.0, 1e-4, 0.75
LCN_EPS = 1.0
BN_EPS = 1e-5


# --- helpers shared by several kinds ---------------------------------------------------------
def windows(xp, x, k, s):
    """(B, C, Ho, Wo, kh, kw) strided view of the kh x kw windows of x (B, C, H, W) at
    stride s; k and s an int or (rows, cols)."""
    (kh, kw), (sh, sw) = pair(k), pair(s)
    v = xp.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))
    return v[:, :, ::sh, ::sw]


def col2im(xp, dpatch, shape, k, s):
    """Adjoint of ``windows``: adds (B, C, Ho, Wo, kh, kw) back into an array of ``shape``."""
    dx = xp.zeros(shape, dtype=dpatch.dtype)
    (kh, kw), (sh, sw) = pair(k), pair(s)
    ho, wo = dpatch.shape[2], dpatch.shape[3]
    for u in range(kh):
        for v in range(kw):
            dx[:, :, u:u + sh * (ho - 1) + 1:sh, v:v + sw * (wo - 1) + 1:sw] += dpatch[:, :, :, :, u, v]
    return dx


def _at(rin, box, pieces: int = 1) -> tuple[slice, ...]:
    """Index of output ``box``'s own elements (its channels times ``pieces``) inside an
    input region placed at ``rin``."""
    (c0, c1), (h0, h1), (w0, w1) = box
    (r0, _), (q0, _), (s0, _) = rin
    return (slice(None), slice(c0 * pieces - r0, c1 * pieces - r0), slice(h0 - q0, h1 - q0), slice(w0 - s0, w1 - s0))


def _scatter(xp, shape, at, d, dtype):
    """Zeros of ``shape`` (the input region) with ``d`` placed at index ``at``."""
    dxr = xp.zeros(shape, dtype=dtype)
    dxr[at] = d
    return dxr


def _padded(xp, xr, rin, in_shape, box, layer, fill):
    """The input rows/cols the box's windows read, from the region, ``fill`` outside the image."""
    (kh, kw), (sh, sw), (ph, pw) = pair(layer.kernel), pair(layer.stride), pair(layer.padding)
    (h0, h1), (w0, w1) = box[1], box[2]
    r0, r1 = h0 * sh - ph, (h1 - 1) * sh - ph + kh
    c0, c1 = w0 * sw - pw, (w1 - 1) * sw - pw + kw
    buf = xp.full((xr.shape[0], xr.shape[1], r1 - r0, c1 - c0), fill, dtype=xr.dtype)
    (a0, a1), (b0, b1) = (max(r0, 0), min(r1, in_shape[1])), (max(c0, 0), min(c1, in_shape[2]))
    buf[:, :, a0 - r0:a1 - r0, b0 - c0:b1 - c0] = xr[:, :, a0 - rin[1][0]:a1 - rin[1][0], b0 - rin[2][0]:b1 - rin[2][0]]
    return buf, (r0, c0, a0, a1, b0, b1)


def _unpad(xp, dbuf, geo, xr_shape, rin):
    """Adjoint of ``_padded``: the part of ``dbuf`` inside the image, back in the region."""
    r0, c0, a0, a1, b0, b1 = geo
    dxr = xp.zeros(xr_shape, dtype=dbuf.dtype)
    dxr[:, :, a0 - rin[1][0]:a1 - rin[1][0], b0 - rin[2][0]:b1 - rin[2][0]] = dbuf[:, :, a0 - r0:a1 - r0, b0 - c0:b1 - c0]
    return dxr


def _box_sum(xp, a, r: int, axes=(2, 3)):
    """Sum over a (2r+1) x (2r+1) window clipped at the border, along the last two axes."""
    out = a
    for ax in axes:
        c = xp.cumsum(out, axis=ax)
        n = out.shape[ax]
        zero = xp.zeros_like(xp.take(c, [0], axis=ax))
        c = xp.concatenate([zero, c], axis=ax)
        hi = xp.take(c, np.minimum(np.arange(n) + r + 1, n), axis=ax)
        lo = xp.take(c, np.maximum(np.arange(n) - r, 0), axis=ax)
        out = hi - lo
    return out


def _chan_sum(xp, a, r: int, lo: int, hi: int):
    """For channels lo..hi-1 of ``a`` (B, C, H, W): sum over channels within r, clipped."""
    c = xp.cumsum(a, axis=1)
    c = xp.concatenate([xp.zeros_like(c[:, :1]), c], axis=1)
    n = a.shape[1]
    idx = np.arange(lo, hi)
    return c[:, np.minimum(idx + r + 1, n)] - c[:, np.maximum(idx - r, 0)]


# --- one class per layer kind ------------------------------------------------------------------
class Kernel:
    """A layer kind's math.  ``forward`` returns (output box, cache); ``backward`` takes the
    cache and the output box's gradient ``dy`` and returns (gradient of the input region,
    parameter gradients of the box).  The base is a kind without parameters.
    ``skips_input_grad``: its ``backward`` takes ``input_grad=False`` and then leaves the
    input's gradient out (None), the GEMM a layer reading the model's input needs not run."""

    skips_input_grad = False

    @staticmethod
    def init(layer, in_shape, out_shape, rng: np.random.Generator, dtype) -> list:
        """The whole layer's starting parameters, shaped as ``layer.param_shapes(in_shape)``."""
        return []

    @staticmethod
    def forward(xp, layer, in_shape, xr, rin, box, params, mask=None):
        raise NotImplementedError

    @staticmethod
    def backward(xp, layer, in_shape, xr_shape, rin, box, params, cache, dy):
        raise NotImplementedError


class _Weighted(Kernel):
    """Weights and biases: Glorot-uniform weights over the fan in and out of one output
    unit (``fans``), zero biases."""

    @staticmethod
    def fans(layer, in_shape, out_shape) -> tuple[int, int]:
        raise NotImplementedError

    @classmethod
    def init(cls, layer, in_shape, out_shape, rng, dtype):
        w, *b = layer.param_shapes(in_shape)                     # b: none for a conv2d without biases
        fan_in, fan_out = cls.fans(layer, in_shape, out_shape)
        lim = np.sqrt(6.0 / (fan_in + fan_out))
        return [rng.uniform(-lim, lim, w).astype(dtype)] + [np.zeros(shape, dtype) for shape in b]


class DenseKernel(_Weighted):
    """y = x W + b on the flattened input; the box's units are columns c0..c1 of W."""

    skips_input_grad = True

    @staticmethod
    def fans(layer, in_shape, out_shape):
        return prod(in_shape), out_shape[0]

    @staticmethod
    def forward(xp, layer, in_shape, xr, rin, box, params, mask=None):
        x = xr.reshape(len(xr), -1)                              # (B, in)
        W, b = params
        y = x @ W                                                # (B, c)
        y += b
        return y[:, :, None, None], (x,)                         # (B, c, 1, 1)

    @staticmethod
    def backward(xp, layer, in_shape, xr_shape, rin, box, params, cache, dy, input_grad=True):
        (x,) = cache
        W, _ = params
        d2 = dy.reshape(len(dy), -1)                             # (B, c)
        dx = (d2 @ W.T).reshape(xr_shape) if input_grad else None   # (B, C, H, W) the whole input
        return dx, (x.T @ d2, d2.sum(axis=0))


class Conv2dKernel(_Weighted):
    """Tied filters by im2col: one GEMM of the box's windows (B h w, C k k) with its filters."""

    skips_input_grad = True

    @staticmethod
    def fans(layer, in_shape, out_shape):
        return in_shape[0] * layer.area, out_shape[0] * layer.area

    @staticmethod
    def forward(xp, layer, in_shape, xr, rin, box, params, mask=None):
        W = params[0]
        buf, geo = _padded(xp, xr, rin, in_shape, box, layer, 0.0)
        pat = windows(xp, buf, layer.kernel, layer.stride)       # (B, C, h, w, kh, kw)
        B, C, h, w, kh, kw = pat.shape
        cols = xp.ascontiguousarray(pat.transpose(0, 2, 3, 1, 4, 5)).reshape(B * h * w, C * kh * kw)  # (Bhw, Ckk)
        y = cols @ W.reshape(len(W), -1).T                       # (Bhw, F) from W (F, Ckk)
        y = y.reshape(B, h, w, -1).transpose(0, 3, 1, 2)         # (B, F, h, w)
        if layer.bias:
            y = y + params[1][None, :, None, None]
        return y, (buf.shape, geo, cols, xr.shape)

    @staticmethod
    def backward(xp, layer, in_shape, xr_shape, rin, box, params, cache, dy, input_grad=True):
        buf_shape, geo, cols, src_shape = cache
        W = params[0]
        F, C, kh, kw = W.shape
        B, _, h, w = dy.shape
        dym = xp.ascontiguousarray(dy.transpose(0, 2, 3, 1)).reshape(B * h * w, F)               # (Bhw, F)
        dW = (dym.T @ cols).reshape(W.shape)                                                      # (F, C, kh, kw)
        db = (dy.sum(axis=(0, 2, 3)),) if layer.bias else ()
        if not input_grad:
            return None, (dW, *db)
        dpat = (dym @ W.reshape(F, -1)).reshape(B, h, w, C, kh, kw).transpose(0, 3, 1, 2, 4, 5)  # (B, C, h, w, kh, kw)
        dbuf = col2im(xp, dpat, buf_shape, (kh, kw), layer.stride)
        return _unpad(xp, dbuf, geo, src_shape, rin), (dW, *db)


class LocallyConnectedKernel(_Weighted):
    """Untied filters: one small GEMM per output position, batched over positions."""

    skips_input_grad = True

    @staticmethod
    def fans(layer, in_shape, out_shape):
        return in_shape[0] * layer.area, out_shape[0]

    @staticmethod
    def forward(xp, layer, in_shape, xr, rin, box, params, mask=None):
        W, b = params
        buf, geo = _padded(xp, xr, rin, in_shape, box, layer, 0.0)
        pat = windows(xp, buf, layer.kernel, layer.stride)       # (B, C, h, w, kh, kw)
        B, C, h, w, kh, kw = pat.shape
        cols = xp.ascontiguousarray(pat.transpose(2, 3, 0, 1, 4, 5)).reshape(h * w, B, C * kh * kw)  # (hw, B, Ckk)
        Wm = W.reshape(h * w, W.shape[2], C * kh * kw).transpose(0, 2, 1)                          # (hw, Ckk, F)
        y = xp.matmul(cols, Wm).reshape(h, w, B, -1).transpose(2, 3, 0, 1) + b.transpose(2, 0, 1)[None]  # (B, F, h, w)
        return y, (buf.shape, geo, cols, xr.shape)

    @staticmethod
    def backward(xp, layer, in_shape, xr_shape, rin, box, params, cache, dy, input_grad=True):
        buf_shape, geo, cols, src_shape = cache
        W, _ = params
        C, kh, kw = W.shape[3:]
        B, F, h, w = dy.shape
        dym = xp.ascontiguousarray(dy.transpose(2, 3, 0, 1)).reshape(h * w, B, F)                # (hw, B, F)
        Wm = W.reshape(h * w, F, C * kh * kw)                                                     # (hw, F, Ckk)
        dW = xp.matmul(dym.transpose(0, 2, 1), cols).reshape(W.shape)                            # (h, w, F, C, kh, kw)
        if not input_grad:
            return None, (dW, dy.sum(axis=0).transpose(1, 2, 0))
        dpat = xp.matmul(dym, Wm).reshape(h, w, B, C, kh, kw).transpose(2, 3, 0, 1, 4, 5)        # (B, C, h, w, kh, kw)
        dbuf = col2im(xp, dpat, buf_shape, (kh, kw), layer.stride)
        return _unpad(xp, dbuf, geo, src_shape, rin), (dW, dy.sum(axis=0).transpose(1, 2, 0))


class _Pool(Kernel):
    """Per channel: windows over the box's own channels of the region, padded with ``fill``."""

    fill = 0.0

    @classmethod
    def _windows(cls, xp, layer, in_shape, xr, rin, box):
        c = _at(rin, box)[1]
        src = xr[:, c]                                           # (B, c, H', W') the box's channels
        buf, geo = _padded(xp, src, rin, in_shape, box, layer, cls.fill)
        pat = windows(xp, buf, layer.kernel, layer.stride)       # (B, c, h, w, k, k)
        return pat, (buf.shape, geo, pat, src.shape)

    @staticmethod
    def _to_region(xp, layer, xr_shape, rin, box, cache, dpat, dtype):
        buf_shape, geo, _, src_shape = cache
        dsrc = _unpad(xp, col2im(xp, dpat, buf_shape, layer.kernel, layer.stride), geo, src_shape, rin)
        return _scatter(xp, xr_shape, (slice(None), _at(rin, box)[1]), dsrc, dtype)


class MaxPoolKernel(_Pool):
    fill = -np.inf

    @classmethod
    def forward(cls, xp, layer, in_shape, xr, rin, box, params, mask=None):
        pat, cache = cls._windows(xp, layer, in_shape, xr, rin, box)
        return pat.max(axis=(4, 5)), cache                      # (B, c, h, w)

    @classmethod
    def backward(cls, xp, layer, in_shape, xr_shape, rin, box, params, cache, dy):
        pat, kk = cache[2], layer.area
        flat = pat.reshape(*pat.shape[:4], kk)                   # (B, c, h, w, kh kw)
        onehot = xp.arange(kk) == flat.argmax(axis=-1)[..., None]
        dpat = (onehot * dy[..., None]).reshape(pat.shape)       # (B, c, h, w, k, k)
        return cls._to_region(xp, layer, xr_shape, rin, box, cache, dpat, dy.dtype), ()


class AvgPoolKernel(_Pool):
    @classmethod
    def forward(cls, xp, layer, in_shape, xr, rin, box, params, mask=None):
        pat, cache = cls._windows(xp, layer, in_shape, xr, rin, box)
        return pat.mean(axis=(4, 5)), cache                      # (B, c, h, w)

    @classmethod
    def backward(cls, xp, layer, in_shape, xr_shape, rin, box, params, cache, dy):
        pat = cache[2]
        dpat = xp.broadcast_to(dy[..., None, None] / layer.area, pat.shape)    # (B, c, h, w, kh, kw)
        return cls._to_region(xp, layer, xr_shape, rin, box, cache, dpat, dy.dtype), ()


class ReluKernel(Kernel):
    @staticmethod
    def forward(xp, layer, in_shape, xr, rin, box, params, mask=None):
        x = xr[_at(rin, box)]
        return x * (x > 0), (x > 0,)

    @staticmethod
    def backward(xp, layer, in_shape, xr_shape, rin, box, params, cache, dy):
        return _scatter(xp, xr_shape, _at(rin, box), dy * cache[0], dy.dtype), ()


class SigmoidKernel(Kernel):
    @staticmethod
    def forward(xp, layer, in_shape, xr, rin, box, params, mask=None):
        y = 1.0 / (1.0 + xp.exp(-xr[_at(rin, box)]))
        return y, (y,)

    @staticmethod
    def backward(xp, layer, in_shape, xr_shape, rin, box, params, cache, dy):
        (y,) = cache
        return _scatter(xp, xr_shape, _at(rin, box), dy * y * (1 - y), dy.dtype), ()


class TanhKernel(Kernel):
    @staticmethod
    def forward(xp, layer, in_shape, xr, rin, box, params, mask=None):
        y = xp.tanh(xr[_at(rin, box)])
        return y, (y,)

    @staticmethod
    def backward(xp, layer, in_shape, xr_shape, rin, box, params, cache, dy):
        (y,) = cache
        return _scatter(xp, xr_shape, _at(rin, box), dy * (1 - y * y), dy.dtype), ()


class DropoutKernel(Kernel):
    """Multiplies by ``mask``, the box's (scaled) keep mask; no mask is evaluation: identity."""

    @staticmethod
    def forward(xp, layer, in_shape, xr, rin, box, params, mask=None):
        x = xr[_at(rin, box)]
        mask = mask if mask is not None else xp.ones_like(x)
        return x * mask, (mask,)

    @staticmethod
    def backward(xp, layer, in_shape, xr_shape, rin, box, params, cache, dy):
        return _scatter(xp, xr_shape, _at(rin, box), dy * cache[0], dy.dtype), ()


class MaxoutKernel(Kernel):
    """Max over groups of ``pieces`` consecutive input channels."""

    @staticmethod
    def forward(xp, layer, in_shape, xr, rin, box, params, mask=None):
        p = layer.pieces
        (c0, c1), (h0, h1), (w0, w1) = box
        x = xr[_at(rin, box, p)]                                 # (B, c p, h, w)
        g = x.reshape(len(x), c1 - c0, p, h1 - h0, w1 - w0)     # (B, c, p, h, w)
        return g.max(axis=2), (g.argmax(axis=2), x.shape)

    @staticmethod
    def backward(xp, layer, in_shape, xr_shape, rin, box, params, cache, dy):
        arg, shape = cache
        p = layer.pieces
        onehot = xp.arange(p)[None, None, :, None, None] == arg[:, :, None]      # (B, c, p, h, w)
        d = (onehot * dy[:, :, None]).reshape(shape)                             # (B, c p, h, w)
        return _scatter(xp, xr_shape, _at(rin, box, p), d, dy.dtype), ()


class LRNKernel(Kernel):
    """y = x / (k + alpha / n * sum of x^2 over n neighbouring channels) ^ beta."""

    @staticmethod
    def forward(xp, layer, in_shape, xr, rin, box, params, mask=None):
        _, c, rows, cols = _at(rin, box)
        x = xr[:, :, rows, cols]                                 # (B, C', h, w) the region's channels
        half, n = layer.size // 2, layer.size
        lo, hi = c.start, c.stop
        s = LRN_K + LRN_ALPHA / n * _chan_sum(xp, x * x, half, lo, hi)   # (B, c, h, w), window inside region
        y = x[:, lo:hi] * s ** -LRN_BETA
        return y, (x, s, lo, hi)

    @staticmethod
    def backward(xp, layer, in_shape, xr_shape, rin, box, params, cache, dy):
        x, s, lo, hi = cache
        _, _, rows, cols = _at(rin, box)
        half, n = layer.size // 2, layer.size
        inner = xp.zeros_like(x)
        inner[:, lo:hi] = dy * x[:, lo:hi] * s ** (-LRN_BETA - 1)
        dx = -2 * LRN_ALPHA * LRN_BETA / n * x * _chan_sum(xp, inner, half, 0, x.shape[1])
        dx[:, lo:hi] += dy * s ** -LRN_BETA
        return _scatter(xp, xr_shape, (slice(None), slice(None), rows, cols), dx, dy.dtype), ()


class LCNKernel(Kernel):
    """y = (x - m) / sqrt(v + eps), m and v over the size x size x C window around each pixel."""

    @staticmethod
    def forward(xp, layer, in_shape, xr, rin, box, params, mask=None):
        r = layer.size // 2
        # window sums over the region; the box's rows/cols sit inside it at an offset
        S1 = _box_sum(xp, xr.sum(axis=1, keepdims=True), r)     # (B, 1, H', W')
        S2 = _box_sum(xp, (xr * xr).sum(axis=1, keepdims=True), r)
        N = _box_sum(xp, xp.ones((1, 1, *xr.shape[2:]), dtype=xr.dtype), r) * in_shape[0]
        at = _at(rin, box)
        sl = (slice(None), slice(None), at[2], at[3])            # the box's rows/cols, every channel
        m, q, Nb = S1[sl] / N[sl], S2[sl] / N[sl], N[sl]
        sig = xp.sqrt(q - m * m + LCN_EPS)
        x = xr[at]
        y = (x - m) / sig
        return y, (xr, x, m, sig, Nb, r, sl)

    @staticmethod
    def backward(xp, layer, in_shape, xr_shape, rin, box, params, cache, dy):
        xr, x, m, sig, Nb, r, slh = cache
        gm = (dy * (-1 / sig + (x - m) * m / sig ** 3)).sum(axis=1, keepdims=True)
        gq = (-(dy * (x - m)) / (2 * sig ** 3)).sum(axis=1, keepdims=True)
        A = xp.zeros((xr.shape[0], 1, *xr.shape[2:]), dtype=dy.dtype)
        Bq = xp.zeros_like(A)
        A[slh] = gm / Nb
        Bq[slh] = gq / Nb
        dxr = xp.zeros(xr_shape, dtype=dy.dtype)
        dxr += _box_sum(xp, A, r) + 2 * xr * _box_sum(xp, Bq, r)
        dxr[_at(rin, box)] += dy / sig
        return dxr, ()


class BatchNormKernel(Kernel):
    """Per channel over batch, rows and columns: y = gamma (x - mean) / sqrt(var + eps) + beta."""

    @staticmethod
    def init(layer, in_shape, out_shape, rng, dtype):
        gamma, beta = layer.param_shapes(in_shape)
        return [np.ones(gamma, dtype), np.zeros(beta, dtype)]

    @staticmethod
    def forward(xp, layer, in_shape, xr, rin, box, params, mask=None):
        gamma, beta = params
        x = xr[_at(rin, box)]
        mu = x.mean(axis=(0, 2, 3), keepdims=True)
        var = x.var(axis=(0, 2, 3), keepdims=True)
        xh = (x - mu) / xp.sqrt(var + BN_EPS)
        return gamma[None, :, None, None] * xh + beta[None, :, None, None], (xh, var, gamma)

    @staticmethod
    def backward(xp, layer, in_shape, xr_shape, rin, box, params, cache, dy):
        xh, var, gamma = cache
        dxh = dy * gamma[None, :, None, None]
        dx = (dxh - dxh.mean(axis=(0, 2, 3), keepdims=True)
              - xh * (dxh * xh).mean(axis=(0, 2, 3), keepdims=True)) / xp.sqrt(var + BN_EPS)
        return _scatter(xp, xr_shape, _at(rin, box), dx, dy.dtype), ((dy * xh).sum(axis=(0, 2, 3)), dy.sum(axis=(0, 2, 3)))


class SoftmaxXentKernel(Kernel):
    """Passes the box's logits through; the loss and its gradient are ``softmax_xent_loss``
    (or the partitioned step's, when the logits are cut by channels)."""

    @staticmethod
    def forward(xp, layer, in_shape, xr, rin, box, params, mask=None):
        return xr[:, _at(rin, box)[1]], ()

    @staticmethod
    def backward(xp, layer, in_shape, xr_shape, rin, box, params, cache, dy):
        return _scatter(xp, xr_shape, (slice(None), _at(rin, box)[1]), dy, dy.dtype), ()


class AddKernel(Kernel):
    """Sum of the inputs' regions at the box (each region is the box itself)."""

    @staticmethod
    def forward(xp, layer, in_shape, xr, rin, box, params, mask=None):
        y = xr[0][_at(rin[0], box)]
        for x, r in zip(xr[1:], rin[1:]):
            y = y + x[_at(r, box)]
        return y, ()

    @staticmethod
    def backward(xp, layer, in_shape, xr_shape, rin, box, params, cache, dy):
        return [_scatter(xp, shape, _at(r, box), dy, dy.dtype) for shape, r in zip(xr_shape, rin)], ()


class ConcatKernel(Kernel):
    """The inputs stacked along channels: input q's channels sit after those of the inputs
    before it; each input's region is the part of it inside the box (empty where none)."""

    @staticmethod
    def _offsets(in_shape) -> list[int]:
        out, offset = [], 0
        for s in in_shape:
            out.append(offset)
            offset += s[0]
        return out

    @classmethod
    def forward(cls, xp, layer, in_shape, xr, rin, box, params, mask=None):
        (c0, c1), (h0, h1), (w0, w1) = box
        y = xp.zeros((len(xr[0]), c1 - c0, h1 - h0, w1 - w0), dtype=xr[0].dtype)   # (B, c, h, w)
        for x, r, offset in zip(xr, rin, cls._offsets(in_shape)):
            if x.shape[1]:
                part = ((r[0][0] + offset, r[0][1] + offset), box[1], box[2])
                y[_at(box, part)] = x[_at(r, (r[0], box[1], box[2]))]
        return y, ()

    @classmethod
    def backward(cls, xp, layer, in_shape, xr_shape, rin, box, params, cache, dy):
        out = []
        for shape, r, offset in zip(xr_shape, rin, cls._offsets(in_shape)):
            part = ((r[0][0] + offset, r[0][1] + offset), box[1], box[2])
            out.append(_scatter(xp, shape, _at(r, (r[0], box[1], box[2])), dy[_at(box, part)], dy.dtype)
                       if shape[1] else xp.zeros(shape, dtype=dy.dtype))
        return out, ()


# --- transformers: a sequence is (B, d, T, 1), features as channels (docs/decisions/017) ---------
GELU_K = float(np.sqrt(2.0 / np.pi))
NORM_EPS = 1e-5
INIT_STD = 0.02            # GPT-2's starting spread of embedding tables and heads


def _seq(x):
    """(B, C, T, 1) -> (B, T, C)."""
    return x[:, :, :, 0].transpose(0, 2, 1)


def _unseq(x):
    """(B, T, C) -> (B, C, T, 1)."""
    return x.transpose(0, 2, 1)[:, :, :, None]


class GeluKernel(Kernel):
    """GPT-2's tanh approximation: 0.5 x (1 + tanh(k (x + 0.044715 x^3)))."""

    @staticmethod
    def forward(xp, layer, in_shape, xr, rin, box, params, mask=None):
        x = xr[_at(rin, box)]
        t = xp.tanh(GELU_K * (x + 0.044715 * x ** 3))
        return 0.5 * x * (1 + t), (x, t)

    @staticmethod
    def backward(xp, layer, in_shape, xr_shape, rin, box, params, cache, dy):
        x, t = cache
        d = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * GELU_K * (1 + 3 * 0.044715 * x * x)
        return _scatter(xp, xr_shape, _at(rin, box), dy * d, dy.dtype), ()


class EmbeddingKernel(Kernel):
    """Rows of the token table (ids rounded from the input), plus position rows h0..h1 and
    token type 0 where the layer has them; the box's features are the tables' columns.  A
    table holding words ``offset``.. only (a tensor split's part) gives zeros for the others."""

    @staticmethod
    def init(layer, in_shape, out_shape, rng, dtype):
        return [rng.normal(0.0, INIT_STD, shape).astype(dtype) for shape in layer.param_shapes(in_shape)]

    @staticmethod
    def forward(xp, layer, in_shape, xr, rin, box, params, mask=None):
        ids = xp.rint(xr[:, 0, :, 0]).astype(np.int64) - layer.offset   # (B, t) rows of this table
        inside = (ids >= 0) & (ids < len(params[0]))               # a slice of the vocabulary: zeros elsewhere
        ids = xp.where(inside, ids, -1)
        y = params[0][xp.maximum(ids, 0)] * inside[:, :, None]     # (B, t, c)
        if layer.positions:
            y = y + params[1][box[1][0]:box[1][1]][None]
        if layer.types:
            y = y + params[-1][0]
        return _unseq(y), (ids,)

    @staticmethod
    def backward(xp, layer, in_shape, xr_shape, rin, box, params, cache, dy):
        (ids,) = cache
        d = _seq(dy)                                               # (B, t, c)
        dtok = xp.zeros_like(params[0])
        inside = ids.reshape(-1) >= 0                              # -1: a word of another slot's table
        xp.add.at(dtok, ids.reshape(-1)[inside], d.reshape(-1, d.shape[2])[inside])
        grads = [dtok]
        if layer.positions:
            dpos = xp.zeros_like(params[1])
            dpos[box[1][0]:box[1][1]] = d.sum(axis=0)
            grads.append(dpos)
        if layer.types:
            dtyp = xp.zeros_like(params[-1])
            dtyp[0] = d.sum(axis=(0, 1))
            grads.append(dtyp)
        return xp.zeros(xr_shape, dtype=dy.dtype), tuple(grads)


class NormKernel(Kernel):
    """layernorm: gamma (x - mean) / sqrt(var + eps) + beta; rmsnorm: gamma x / sqrt(mean
    x^2 + eps); statistics over every feature of a position, the box's features out."""

    @staticmethod
    def init(layer, in_shape, out_shape, rng, dtype):
        shapes = layer.param_shapes(in_shape)
        return [np.ones(shapes[0], dtype)] + [np.zeros(s, dtype) for s in shapes[1:]]

    @staticmethod
    def forward(xp, layer, in_shape, xr, rin, box, params, mask=None):
        _, _, rows, cols = _at(rin, box)
        x = xr[:, :, rows, cols]                                   # (B, C, t, w) every feature
        centre = layer.kind == "layernorm"
        mu = x.mean(axis=1, keepdims=True) if centre else 0.0
        xc = x - mu
        r = xp.sqrt((xc * xc).mean(axis=1, keepdims=True) + NORM_EPS)
        xh = xc / r
        c0, c1 = box[0]
        y = params[0][None, :, None, None] * xh[:, c0:c1]
        if centre:
            y = y + params[1][None, :, None, None]
        return y, (xh, r)

    @staticmethod
    def backward(xp, layer, in_shape, xr_shape, rin, box, params, cache, dy):
        xh, r = cache
        _, _, rows, cols = _at(rin, box)
        c0, c1 = box[0]
        dxh = xp.zeros_like(xh)
        dxh[:, c0:c1] = dy * params[0][None, :, None, None]
        dx = dxh - xh * (dxh * xh).mean(axis=1, keepdims=True)
        if layer.kind == "layernorm":
            dx = dx - dxh.mean(axis=1, keepdims=True)
        grads = ((dy * xh[:, c0:c1]).sum(axis=(0, 2, 3)),)
        if layer.kind == "layernorm":
            grads += (dy.sum(axis=(0, 2, 3)),)
        return _scatter(xp, xr_shape, (slice(None), slice(None), rows, cols), dx / r, dy.dtype), grads


class SwiGLUKernel(Kernel):
    """y_k = silu(x_2k) x_2k+1."""

    @staticmethod
    def forward(xp, layer, in_shape, xr, rin, box, params, mask=None):
        x = xr[_at(rin, box, 2)]                                   # (B, 2c, h, w)
        g, u = x[:, 0::2], x[:, 1::2]
        sg = 1.0 / (1.0 + xp.exp(-g))
        return g * sg * u, (g, u, sg)

    @staticmethod
    def backward(xp, layer, in_shape, xr_shape, rin, box, params, cache, dy):
        g, u, sg = cache
        d = xp.zeros((len(dy), 2 * dy.shape[1], *dy.shape[2:]), dtype=dy.dtype)   # (B, 2c, h, w)
        d[:, 0::2] = dy * u * sg * (1 + g * (1 - sg))
        d[:, 1::2] = dy * g * sg
        return _scatter(xp, xr_shape, _at(rin, box, 2), d, dy.dtype), ()


class AttentionKernel(_Weighted):
    """The box's heads: q, k, v = x W (+ b), softmax(q k^T / sqrt(hd)) v, later positions
    masked when causal; the whole input in, the heads' features out."""

    @staticmethod
    def fans(layer, in_shape, out_shape):
        return in_shape[0], in_shape[0]

    @staticmethod
    def forward(xp, layer, in_shape, xr, rin, box, params, mask=None):
        X = _seq(xr)                                               # (B, T, C)
        B, T, C = X.shape
        W = params[0]
        c = W.shape[2]
        hd = layer.unit(in_shape)
        qkv = (X.reshape(B * T, C) @ W.reshape(C, 3 * c)).reshape(B, T, 3, c)
        if layer.bias:
            qkv = qkv + params[1][None, None]
        q, k, v = (qkv[:, :, n].reshape(B, T, c // hd, hd).transpose(0, 2, 1, 3) for n in range(3))  # (B, nh, T, hd)
        S = q @ k.transpose(0, 1, 3, 2) / sqrt(hd)                # (B, nh, T, T): a Python float keeps float32
        if layer.causal:
            S = S + xp.asarray(np.triu(np.full((T, T), -np.inf), 1), dtype=S.dtype)
        P = xp.exp(S - S.max(axis=-1, keepdims=True))
        P /= P.sum(axis=-1, keepdims=True)
        O = (P @ v).transpose(0, 2, 1, 3).reshape(B, T, c)       # (B, T, c)
        return _unseq(O), (X, q, k, v, P)

    @staticmethod
    def backward(xp, layer, in_shape, xr_shape, rin, box, params, cache, dy):
        X, q, k, v, P = cache
        B, T, C = X.shape
        W = params[0]
        c, hd = W.shape[2], q.shape[3]
        dO = _seq(dy).reshape(B, T, c // hd, hd).transpose(0, 2, 1, 3)    # (B, nh, T, hd)
        dv = P.transpose(0, 1, 3, 2) @ dO
        dP = dO @ v.transpose(0, 1, 3, 2)                                # (B, nh, T, T)
        dS = P * (dP - (dP * P).sum(axis=-1, keepdims=True)) / sqrt(hd)
        dq, dk = dS @ k, dS.transpose(0, 1, 3, 2) @ q
        dqkv = xp.stack([d.transpose(0, 2, 1, 3).reshape(B, T, c) for d in (dq, dk, dv)], axis=2)  # (B, T, 3, c)
        d2 = dqkv.reshape(B * T, 3 * c)
        dW = (X.reshape(B * T, C).T @ d2).reshape(C, 3, c)
        dX = (d2 @ W.reshape(C, 3 * c).T).reshape(B, T, C)
        grads = (dW, dqkv.sum(axis=(0, 1))) if layer.bias else (dW,)
        return _unseq(dX).reshape(xr_shape), grads


class FirstTokenKernel(Kernel):
    """The first positions' features (the region is exactly those)."""

    @staticmethod
    def forward(xp, layer, in_shape, xr, rin, box, params, mask=None):
        return xr[_at(rin, box)], ()

    @staticmethod
    def backward(xp, layer, in_shape, xr_shape, rin, box, params, cache, dy):
        return _scatter(xp, xr_shape, _at(rin, box), dy, dy.dtype), ()


class LMHeadKernel(Kernel):
    """Logits of the box's words at each position: x W^T with W (words, d).  A tied head
    reads the embedding's table, which the executor's per-layer parameters cannot share:
    it runs untied heads only (ValueError)."""

    @staticmethod
    def init(layer, in_shape, out_shape, rng, dtype):
        return [rng.normal(0.0, INIT_STD, shape).astype(dtype) for shape in layer.param_shapes(in_shape)]

    @staticmethod
    def forward(xp, layer, in_shape, xr, rin, box, params, mask=None):
        if layer.tied:
            raise ValueError("the executor runs untied lm_head layers only (tied = false)")
        _, _, rows, _ = _at(rin, box)
        X = _seq(xr[:, :, rows])                                   # (B, t, C)
        z = X @ params[0].T                                        # (B, t, v)
        return _unseq(z + params[1] if layer.bias else z), (X,)

    @staticmethod
    def backward(xp, layer, in_shape, xr_shape, rin, box, params, cache, dy):
        (X,) = cache
        _, _, rows, _ = _at(rin, box)
        d = _seq(dy)                                               # (B, t, v)
        dW = d.reshape(-1, d.shape[2]).T @ X.reshape(-1, X.shape[2])
        grads = (dW, d.sum(axis=(0, 1))) if layer.bias else (dW,)
        return _scatter(xp, xr_shape, (slice(None), slice(None), rows), _unseq(d @ params[0]), dy.dtype), grads


KERNELS: dict[str, type[Kernel]] = {
    "dense": DenseKernel, "conv2d": Conv2dKernel, "locally_connected": LocallyConnectedKernel,
    "max_pool": MaxPoolKernel, "avg_pool": AvgPoolKernel, "relu": ReluKernel, "sigmoid": SigmoidKernel,
    "tanh": TanhKernel, "dropout": DropoutKernel, "maxout": MaxoutKernel, "lrn": LRNKernel, "lcn": LCNKernel,
    "batchnorm": BatchNormKernel, "softmax_xent": SoftmaxXentKernel, "add": AddKernel, "concat": ConcatKernel,
    "gelu": GeluKernel, "embedding": EmbeddingKernel, "layernorm": NormKernel, "rmsnorm": NormKernel,
    "swiglu": SwiGLUKernel, "attention": AttentionKernel, "first_token": FirstTokenKernel, "lm_head": LMHeadKernel,
}


def kernel_of(kind: str) -> type[Kernel]:
    """The class of a layer kind; raises ValueError for a kind without one."""
    try:
        return KERNELS[kind]
    except KeyError:
        raise ValueError(f"no kernel for layer kind {kind!r}; kinds with one: {sorted(KERNELS)}") from None


# --- entry points ------------------------------------------------------------------------------
def init_params(model, rng: np.random.Generator, dtype=np.float64) -> dict[int, list]:
    """Whole-layer parameters by layer index, for the layers that have any: Glorot-uniform
    weights (fan in and out of one output unit), zero biases, batch-norm gamma 1 and beta 0."""
    out = {}
    for node in model.nodes:
        arrays = kernel_of(node.layer.kind).init(node.layer, node.in_shape, node.out_shape, rng, dtype)
        if arrays:
            out[node.index] = arrays
    return out


def forward(xp, layer, in_shape, xr, rin, box, params, rng_mask=None):
    """Output box (B, c, h, w) of ``layer`` from the input region ``xr`` placed at ``rin``;
    returns (y, cache).  ``rng_mask``: dropout's keep mask for the box.  Raises ValueError
    for a kind without a kernel."""
    kernel = KERNELS.get(layer.kind) or kernel_of(layer.kind)      # the dict alone on the hot path
    return kernel.forward(xp, layer, in_shape, xr, rin, box, params, rng_mask)


def backward(xp, layer, in_shape, xr_shape, rin, box, params, cache, dy, input_grad=True):
    """(gradient of the input region, parameter gradients) for output-box gradient ``dy``;
    without ``input_grad`` (a layer reading the model's input alone: ``Node.input_grad``) a
    kernel that can leaves the first out (None)."""
    kernel = KERNELS.get(layer.kind) or kernel_of(layer.kind)
    if not input_grad and kernel.skips_input_grad:
        return kernel.backward(xp, layer, in_shape, xr_shape, rin, box, params, cache, dy, input_grad=False)
    return kernel.backward(xp, layer, in_shape, xr_shape, rin, box, params, cache, dy)


def softmax_xent_loss(xp, logits, labels):
    """Mean cross-entropy of (N, C) logits (a sequence's positions as rows); returns (loss,
    d loss / d logits)."""
    z = logits - logits.max(axis=1, keepdims=True)
    p = xp.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    n = len(labels)
    loss = -xp.log(p[xp.arange(n), labels] + 1e-30).mean()
    g = p.copy()
    g[xp.arange(n), labels] -= 1.0
    return loss, g / n
