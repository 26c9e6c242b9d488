"""Every layer kind forward and backward in ``xp``, on one box of the output.

A kernel gets the *region* of the input a box of its output reads (``layer.needs``: the
whole input for dense and conv2d, a halo of rows for locally connected layers, pooling
and LCN, neighbouring channels for LRN), placed at ``rin`` in input coordinates, and
computes that output box.  Its backward takes the gradient of the output box and returns
the (partial) gradient of the whole region -- the owner of each input element adds up
the pieces every consumer sends back -- and the gradient of the parameters of the box.
The single-process reference is the same call with the whole input and the whole output.

Arrays are (B, C, H, W), batch first.  Parameters of a box (``box_params``):
dense W (in, c) and b (c,); conv2d W (c, C, k, k) and b (c,); locally_connected W (h, w, F,
C, k, k) and b (h, w, F) for the box's output rows/cols; batchnorm gamma, beta (C,).

Conventions: windows are clipped at the image border; max pooling pads with -inf, average
pooling counts padding as zeros; LRN is AlexNet's (k=2, alpha=1e-4, beta=0.75); LCN
normalises by the mean and variance of its size x size x C window (clipped at the border).
"""
from __future__ import annotations

import numpy as np

LRN_K, LRN_ALPHA, LRN_BETA = 2.0, 1e-4, 0.75
LCN_EPS = 1.0
BN_EPS = 1e-5


def param_shapes(layer, in_shape, out_shape) -> list[tuple]:
    """Shapes of a whole layer's parameter arrays, in the order the kernels take them."""
    s, o, k = in_shape, out_shape, getattr(layer, "kernel", 1)
    if layer.kind == "dense":
        return [(int(np.prod(s)), o[0]), (o[0],)]
    if layer.kind == "conv2d":
        return [(o[0], s[0], k, k), (o[0],)]
    if layer.kind == "locally_connected":
        return [(o[1], o[2], o[0], s[0], k, k), (o[1], o[2], o[0])]
    if layer.kind == "batchnorm":
        return [(s[0],), (s[0],)]
    return []


def init_params(model, rng: np.random.Generator, dtype=np.float64) -> dict[int, list]:
    """Whole-layer parameters by layer index: Glorot-uniform weights (fan in and out of one
    output unit), zero biases, batch-norm gamma 1 and beta 0."""
    out = {}
    for node in model.nodes:
        shapes = param_shapes(node.layer, node.in_shape, node.out_shape)
        if not shapes:
            continue
        if node.layer.kind == "batchnorm":
            out[node.index] = [np.ones(shapes[0], dtype), np.zeros(shapes[1], dtype)]
            continue
        k2 = getattr(node.layer, "kernel", 1) ** 2
        fan_in = shapes[0][0] if node.layer.kind == "dense" else node.in_shape[0] * k2
        fan_out = node.out_shape[0] * (k2 if node.layer.kind == "conv2d" else 1)
        lim = np.sqrt(6.0 / (fan_in + fan_out))
        out[node.index] = [rng.uniform(-lim, lim, shapes[0]).astype(dtype), np.zeros(shapes[1], dtype)]
    return out


def windows(xp, x, k: int, s: int):
    """(B, C, Ho, Wo, k, k) strided view of the k x k windows of x (B, C, H, W) at stride s."""
    v = xp.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(2, 3))
    return v[:, :, ::s, ::s]


def col2im(xp, dpatch, shape, k: int, s: int):
    """Adjoint of ``windows``: adds (B, C, Ho, Wo, k, k) back into an array of ``shape``."""
    dx = xp.zeros(shape, dtype=dpatch.dtype)
    ho, wo = dpatch.shape[2], dpatch.shape[3]
    for u in range(k):
        for v in range(k):
            dx[:, :, u:u + s * (ho - 1) + 1:s, v:v + s * (wo - 1) + 1:s] += dpatch[:, :, :, :, u, v]
    return dx


def _padded(xp, xr, rin, in_shape, box, layer, fill):
    """The input rows/cols the box's windows read, from the region, ``fill`` outside the image."""
    k, s, p = layer.kernel, layer.stride, layer.padding
    (h0, h1), (w0, w1) = box[1], box[2]
    r0, r1 = h0 * s - p, (h1 - 1) * s - p + k
    c0, c1 = w0 * s - p, (w1 - 1) * s - p + k
    buf = xp.full((xr.shape[0], xr.shape[1], r1 - r0, c1 - c0), fill, dtype=xr.dtype)
    (a0, a1), (b0, b1) = (max(r0, 0), min(r1, in_shape[1])), (max(c0, 0), min(c1, in_shape[2]))
    buf[:, :, a0 - r0:a1 - r0, b0 - c0:b1 - c0] = xr[:, :, a0 - rin[1][0]:a1 - rin[1][0], b0 - rin[2][0]:b1 - rin[2][0]]
    return buf, (r0, c0, a0, a1, b0, b1)


def _unpad(xp, dbuf, geo, xr_shape, rin):
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


def forward(xp, layer, in_shape, xr, rin, box, params, rng_mask=None):
    """Output box (B, c, h, w) of ``layer`` from the input region ``xr`` placed at ``rin``;
    returns (y, cache).  ``rng_mask``: dropout's keep mask for the box."""
    kind = layer.kind
    (c0, c1), (h0, h1), (w0, w1) = box
    if kind == "dense":
        x = xr.reshape(len(xr), -1)                              # (B, in)
        W, b = params
        y = x @ W
        y += b
        return y[:, :, None, None], (x,)
    if kind in ("conv2d", "locally_connected", "max_pool", "avg_pool"):
        if kind != "max_pool" and kind != "avg_pool":
            src = xr
        else:
            src = xr[:, c0 - rin[0][0]:c1 - rin[0][0]]
        buf, geo = _padded(xp, src, rin, in_shape, box, layer, -np.inf if kind == "max_pool" else 0.0)
        pat = windows(xp, buf, layer.kernel, layer.stride)       # (B, C, h, w, k, k)
        if kind == "conv2d":                                     # im2col: one GEMM
            W, b = params
            B, C, h, w, k, _ = pat.shape
            cols = xp.ascontiguousarray(pat.transpose(0, 2, 3, 1, 4, 5)).reshape(B * h * w, C * k * k)
            y = (cols @ W.reshape(len(W), -1).T).reshape(B, h, w, -1).transpose(0, 3, 1, 2) + b[None, :, None, None]
            return y, (buf.shape, geo, cols, src.shape)
        elif kind == "locally_connected":                        # one small GEMM per output position, batched
            W, b = params
            B, C, h, w, k, _ = pat.shape
            cols = xp.ascontiguousarray(pat.transpose(2, 3, 0, 1, 4, 5)).reshape(h * w, B, C * k * k)
            Wm = W.reshape(h * w, W.shape[2], C * k * k).transpose(0, 2, 1)     # (hw, Ckk, F)
            y = xp.matmul(cols, Wm).reshape(h, w, B, -1).transpose(2, 3, 0, 1) + b.transpose(2, 0, 1)[None]
            return y, (buf.shape, geo, cols, src.shape)
        elif kind == "max_pool":
            y = pat.max(axis=(4, 5))
        else:
            y = pat.mean(axis=(4, 5))
        return y, (buf.shape, geo, pat, src.shape)
    if kind in ("relu", "sigmoid", "tanh", "dropout"):
        x = xr[:, c0 - rin[0][0]:c1 - rin[0][0], h0 - rin[1][0]:h1 - rin[1][0], w0 - rin[2][0]:w1 - rin[2][0]]
        if kind == "relu":
            return x * (x > 0), (x > 0,)
        if kind == "sigmoid":
            y = 1.0 / (1.0 + xp.exp(-x))
            return y, (y,)
        if kind == "tanh":
            y = xp.tanh(x)
            return y, (y,)
        mask = rng_mask if rng_mask is not None else xp.ones_like(x)
        return x * mask, (mask,)
    if kind == "maxout":
        p = layer.pieces
        x = xr[:, c0 * p - rin[0][0]:c1 * p - rin[0][0], h0 - rin[1][0]:h1 - rin[1][0], w0 - rin[2][0]:w1 - rin[2][0]]
        g = x.reshape(len(x), c1 - c0, p, h1 - h0, w1 - w0)
        arg = g.argmax(axis=2)
        return g.max(axis=2), (arg, x.shape)
    if kind == "lrn":
        x = xr[:, :, h0 - rin[1][0]:h1 - rin[1][0], w0 - rin[2][0]:w1 - rin[2][0]]
        half, n = layer.size // 2, layer.size
        lo, hi = c0 - rin[0][0], c1 - rin[0][0]
        s = LRN_K + LRN_ALPHA / n * _chan_sum(xp, x * x, half, lo, hi)   # (B, c, h, w), window inside region
        y = x[:, lo:hi] * s ** -LRN_BETA
        return y, (x, s, lo, hi)
    if kind == "lcn":
        r = layer.size // 2
        # window sums over the region; the box's rows/cols sit inside it at an offset
        S1 = _box_sum(xp, xr.sum(axis=1, keepdims=True), r)
        S2 = _box_sum(xp, (xr * xr).sum(axis=1, keepdims=True), r)
        N = _box_sum(xp, xp.ones((1, 1, *xr.shape[2:]), dtype=xr.dtype), r) * in_shape[0]
        sl = (slice(None), slice(None), slice(h0 - rin[1][0], h1 - rin[1][0]), slice(w0 - rin[2][0], w1 - rin[2][0]))
        m, q, Nb = S1[sl] / N[sl], S2[sl] / N[sl], N[sl]
        sig = xp.sqrt(q - m * m + LCN_EPS)
        x = xr[:, c0 - rin[0][0]:c1 - rin[0][0]][sl[:1] + (slice(None),) + sl[2:]]
        y = (x - m) / sig
        return y, (xr, x, m, sig, Nb, r, sl)
    if kind == "batchnorm":
        gamma, beta = params
        x = xr[:, c0 - rin[0][0]:c1 - rin[0][0], h0 - rin[1][0]:h1 - rin[1][0], w0 - rin[2][0]:w1 - rin[2][0]]
        mu = x.mean(axis=(0, 2, 3), keepdims=True)
        var = x.var(axis=(0, 2, 3), keepdims=True)
        xh = (x - mu) / xp.sqrt(var + BN_EPS)
        return gamma[None, :, None, None] * xh + beta[None, :, None, None], (xh, var, gamma)
    if kind == "softmax_xent":
        return xr[:, c0 - rin[0][0]:c1 - rin[0][0]], ()
    raise ValueError(f"no kernel for layer kind {kind}")


def backward(xp, layer, in_shape, xr_shape, rin, box, params, cache, dy):
    """(gradient of the input region, parameter gradients) for output-box gradient ``dy``."""
    kind = layer.kind
    (c0, c1), (h0, h1), (w0, w1) = box
    dxr = xp.zeros(xr_shape, dtype=dy.dtype)
    if kind == "dense":
        (x,) = cache
        W, _ = params
        d2 = dy.reshape(len(dy), -1)
        return (d2 @ W.T).reshape(xr_shape), (x.T @ d2, d2.sum(axis=0))
    if kind in ("conv2d", "locally_connected", "max_pool", "avg_pool"):
        buf_shape, geo, pat, src_shape = cache
        k, s = layer.kernel, layer.stride
        grads = ()
        B, F, h, w = dy.shape
        if kind == "conv2d":
            W, _ = params
            cols, C = pat, W.shape[1]
            dym = xp.ascontiguousarray(dy.transpose(0, 2, 3, 1)).reshape(B * h * w, F)
            grads = ((dym.T @ cols).reshape(W.shape), dy.sum(axis=(0, 2, 3)))
            dpat = (dym @ W.reshape(F, -1)).reshape(B, h, w, C, k, k).transpose(0, 3, 1, 2, 4, 5)
        elif kind == "locally_connected":
            W, _ = params
            cols, C = pat, W.shape[3]
            dym = xp.ascontiguousarray(dy.transpose(2, 3, 0, 1)).reshape(h * w, B, F)
            Wm = W.reshape(h * w, F, C * k * k)
            dW = xp.matmul(dym.transpose(0, 2, 1), cols)                    # (hw, F, Ckk)
            grads = (dW.reshape(W.shape), dy.sum(axis=0).transpose(1, 2, 0))
            dpat = xp.matmul(dym, Wm).reshape(h, w, B, C, k, k).transpose(2, 3, 0, 1, 4, 5)
        elif kind == "max_pool":
            flat = pat.reshape(*pat.shape[:4], k * k)
            onehot = xp.arange(k * k) == flat.argmax(axis=-1)[..., None]
            dpat = (onehot * dy[..., None]).reshape(pat.shape)
        else:
            dpat = xp.broadcast_to(dy[..., None, None] / (k * k), pat.shape)
        dbuf = col2im(xp, dpat, buf_shape, k, s)
        dsrc = _unpad(xp, dbuf, geo, src_shape, rin)
        if kind in ("max_pool", "avg_pool"):
            dxr[:, c0 - rin[0][0]:c1 - rin[0][0]] = dsrc
            return dxr, ()
        return dsrc, grads
    sl = (slice(None), slice(c0 - rin[0][0], c1 - rin[0][0]), slice(h0 - rin[1][0], h1 - rin[1][0]),
          slice(w0 - rin[2][0], w1 - rin[2][0]))
    if kind in ("relu", "dropout"):
        dxr[sl] = dy * cache[0]
        return dxr, ()
    if kind == "sigmoid":
        y = cache[0]
        dxr[sl] = dy * y * (1 - y)
        return dxr, ()
    if kind == "tanh":
        y = cache[0]
        dxr[sl] = dy * (1 - y * y)
        return dxr, ()
    if kind == "maxout":
        arg, shape = cache
        p = layer.pieces
        onehot = xp.arange(p)[None, None, :, None, None] == arg[:, :, None]
        d = (onehot * dy[:, :, None]).reshape(shape)
        dxr[:, c0 * p - rin[0][0]:c1 * p - rin[0][0], sl[2], sl[3]] = d
        return dxr, ()
    if kind == "lrn":
        x, s, lo, hi = cache
        half, n = layer.size // 2, layer.size
        inner = xp.zeros_like(x)
        inner[:, lo:hi] = dy * x[:, lo:hi] * s ** (-LRN_BETA - 1)
        dx = -2 * LRN_ALPHA * LRN_BETA / n * x * _chan_sum(xp, inner, half, 0, x.shape[1])
        dx[:, lo:hi] += dy * s ** -LRN_BETA
        dxr[:, :, sl[2], sl[3]] = dx
        return dxr, ()
    if kind == "lcn":
        xr, x, m, sig, Nb, r, slh = cache
        gm = (dy * (-1 / sig + (x - m) * m / sig ** 3)).sum(axis=1, keepdims=True)
        gq = (-(dy * (x - m)) / (2 * sig ** 3)).sum(axis=1, keepdims=True)
        A = xp.zeros((xr.shape[0], 1, *xr.shape[2:]), dtype=dy.dtype)
        Bq = xp.zeros_like(A)
        A[slh] = gm / Nb
        Bq[slh] = gq / Nb
        dxr += _box_sum(xp, A, r) + 2 * xr * _box_sum(xp, Bq, r)
        dxr[:, sl[1], sl[2], sl[3]] += dy / sig
        return dxr, ()
    if kind == "batchnorm":
        xh, var, gamma = cache
        dxh = dy * gamma[None, :, None, None]
        n = dy.shape[0] * dy.shape[2] * dy.shape[3]
        dx = (dxh - dxh.mean(axis=(0, 2, 3), keepdims=True)
              - xh * (dxh * xh).mean(axis=(0, 2, 3), keepdims=True)) / xp.sqrt(var + BN_EPS)
        dxr[sl] = dx
        return dxr, ((dy * xh).sum(axis=(0, 2, 3)), dy.sum(axis=(0, 2, 3)))
    if kind == "softmax_xent":
        dxr[:, sl[1]] = dy
        return dxr, ()
    raise ValueError(f"no kernel for layer kind {kind}")


def softmax_xent_loss(xp, logits, labels):
    """Mean cross-entropy of (B, C) logits; returns (loss, d loss / d logits)."""
    z = logits - logits.max(axis=1, keepdims=True)
    p = xp.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    n = len(labels)
    loss = -xp.log(p[xp.arange(n), labels] + 1e-30).mean()
    g = p.copy()
    g[xp.arange(n), labels] -= 1.0
    return loss, g / n
