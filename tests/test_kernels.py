"""Every layer kind's backward against central finite differences of its forward."""
import numpy as np
import pytest

from executor.kernels import backward, forward, softmax_xent_loss
from clustersim.core.layers import KINDS, full_box
from clustersim.core.models import make_layer as L

CASES = [
    (L("dense", units=3), (2, 3, 3)),
    (L("conv2d", filters=3, kernel=3, stride=2, padding=1), (2, 5, 5)),
    (L("locally_connected", filters=2, kernel=2, stride=1), (2, 4, 4)),
    (L("max_pool", kernel=2, stride=1), (2, 4, 4)),
    (L("avg_pool", kernel=3, stride=2, padding=1), (2, 5, 5)),
    (L("relu"), (2, 3, 3)), (L("sigmoid"), (2, 3, 3)), (L("tanh"), (2, 3, 3)),
    (L("maxout", pieces=2), (4, 2, 2)),
    (L("lrn", size=3), (5, 2, 2)),
    (L("lcn", size=3), (2, 4, 5)),
    (L("batchnorm"), (3, 2, 2)),
    (L("dropout", rate=0.5), (2, 3, 3)), (L("softmax_xent"), (4, 1, 1)),
    (L("conv2d", filters=2, kernel=(1, 3), padding=(0, 1), bias=False), (2, 4, 5)),   # Inception's 1 x n
    (L("conv2d", filters=2, kernel=(3, 2), stride=(2, 1), padding=(1, 0)), (2, 5, 4)),
    (L("max_pool", kernel=(3, 1), stride=(2, 1)), (2, 5, 3)),
    (L("gelu"), (2, 3, 3)),
    (L("embedding", vocab=7, dim=4, positions=6, types=2), (1, 5, 1)),
    (L("layernorm"), (5, 4, 1)), (L("rmsnorm"), (5, 4, 1)),
    (L("swiglu"), (6, 3, 1)),
    (L("attention", heads=2, causal=True), (4, 5, 1)),
    (L("attention", heads=3, bias=False), (6, 4, 1)),
    (L("first_token"), (4, 3, 1)), (L("first_token", tokens=2), (4, 3, 1)),
    (L("lm_head", vocab=6, tied=False), (4, 3, 1)), (L("lm_head", vocab=6, tied=False, bias=True), (4, 3, 1)),
    (L("softmax_xent"), (5, 3, 1)),                                                    # classes per position
]
# kinds reading several inputs: (layer, the inputs' shapes)
MULTI = [(L("add"), ((2, 3, 3), (2, 3, 3), (2, 3, 3))), (L("concat"), ((2, 3, 3), (3, 3, 3), (1, 3, 3)))]


def make_params(layer, s, rng):
    """Random parameters of the core layer's shapes."""
    return [rng.normal(size=shape) for shape in layer.param_shapes(s)]


def _modules():
    from executor.backend import cupy_or_none
    cp = cupy_or_none()
    return [np] + ([cp] if cp is not None else [pytest.param(None, marks=pytest.mark.skip(reason="no CuPy/GPU"))])


@pytest.mark.parametrize("xp", _modules(), ids=["numpy", "cupy"])
@pytest.mark.parametrize("layer, shape", CASES[:3] + CASES[8:10], ids=[c[0].kind for c in CASES[:3] + CASES[8:10]])
def test_cupy_kernels_equal_numpy(xp, layer, shape):
    """The same kernels with xp = cupy give NumPy's values (skipped without a GPU)."""
    rng = np.random.default_rng(5)
    out = layer.shape(shape)
    x = rng.normal(size=(2, *shape))
    params = make_params(layer, shape, rng)
    rin, box = full_box(shape), full_box(out)
    y_np, _ = forward(np, layer, shape, x, rin, box, params)
    y_xp, _ = forward(xp, layer, shape, xp.asarray(x), rin, box, [xp.asarray(a) for a in params])
    y_xp = y_xp.get() if hasattr(y_xp, "get") else y_xp
    assert np.allclose(y_xp, y_np, rtol=1e-10, atol=1e-12)


def test_every_kind_is_checked():
    assert {layer.kind for layer, _ in CASES + MULTI} == set(KINDS)


def finite_difference_check(loss, arrays, grads, rng, eps=1e-6):
    """Each gradient against central differences of ``loss()`` at 25 random entries."""
    for arr, grad in zip(arrays, grads):
        flat, g = arr.reshape(-1), np.asarray(grad).reshape(-1)
        for i in rng.choice(flat.size, size=min(flat.size, 25), replace=False):
            old = flat[i]
            flat[i] = old + eps
            up = loss()
            flat[i] = old - eps
            down = loss()
            flat[i] = old
            assert g[i] == pytest.approx((up - down) / (2 * eps), rel=1e-4, abs=1e-6), i


@pytest.mark.parametrize("layer, shapes", MULTI, ids=[c[0].kind for c in MULTI])
def test_multi_input_backward_matches_finite_differences(layer, shapes):
    """add and concat on the whole output and on a box of it (the channels of one input or
    of two, some rows), each input's region being what ``input_boxes`` says the box reads."""
    rng = np.random.default_rng(4)
    out = layer.shape(layer.merge(shapes))
    xs = [rng.normal(size=(3, *s)) for s in shapes]
    for box in (full_box(out), ((1, out[0] - 1), (1, 3), (0, 2))):
        rins = list(layer.input_boxes(shapes, box))
        regions = [x[(slice(None),) + tuple(slice(a, b) for a, b in r)].copy() for x, r in zip(xs, rins)]
        R = rng.normal(size=(3, *[b - a for a, b in box]))

        def loss():
            return float((forward(np, layer, list(shapes), regions, rins, box, [])[0] * R).sum())
        y, cache = forward(np, layer, list(shapes), regions, rins, box, [])
        dxs, dparams = backward(np, layer, list(shapes), [r.shape for r in regions], rins, box, [], cache, R)
        assert y.shape == R.shape and dparams == ()
        finite_difference_check(loss, regions, dxs, rng)


@pytest.mark.parametrize("layer, shape", CASES, ids=[c[0].kind for c in CASES])
def test_backward_matches_finite_differences(layer, shape):
    rng = np.random.default_rng(3)
    out = layer.shape(shape)
    x = rng.integers(0, layer.vocab, (3, *shape)).astype(float) if layer.kind == "embedding" \
        else rng.normal(size=(3, *shape))
    params = make_params(layer, shape, rng)
    R = rng.normal(size=(3, *out))
    rin, box = full_box(shape), full_box(out)

    def loss(x, params):
        y, _ = forward(np, layer, shape, x, rin, box, params)
        return float((y * R).sum())
    y, cache = forward(np, layer, shape, x, rin, box, params)
    assert y.shape == (3, *out)
    dx, dparams = backward(np, layer, shape, x.shape, rin, box, params, cache, R)
    finite_difference_check(lambda: loss(x, params), [x] + params, [dx] + list(dparams), rng)


def test_softmax_xent_gradient():
    rng = np.random.default_rng(0)
    z, y = rng.normal(size=(4, 5)), rng.integers(0, 5, 4)
    loss, g = softmax_xent_loss(np, z, y)
    eps = 1e-6
    for i in range(z.size):
        zp, zm = z.copy().reshape(-1), z.copy().reshape(-1)
        zp[i] += eps
        zm[i] -= eps
        num = (softmax_xent_loss(np, zp.reshape(z.shape), y)[0] - softmax_xent_loss(np, zm.reshape(z.shape), y)[0]) / (2 * eps)
        assert g.reshape(-1)[i] == pytest.approx(num, rel=1e-5, abs=1e-8)


@pytest.mark.parametrize("layer, shape", [(L("attention", heads=4, causal=True), (8, 5, 1)), (L("layernorm"), (6, 3, 1)),
                                          (L("rmsnorm"), (6, 3, 1)), (L("embedding", vocab=9, dim=6, positions=4), (1, 4, 1)),
                                          (L("lm_head", vocab=7, tied=False), (4, 3, 1)), (L("swiglu"), (8, 2, 1)),
                                          (L("lm_head", vocab=7, tied=False, bias=True), (4, 3, 1))],
                         ids=["attention", "layernorm", "rmsnorm", "embedding", "lm_head", "swiglu", "lm_head-bias"])
def test_transformer_slices_add_up_to_the_whole_layer(layer, shape):
    """Two channel slices (attention: two heads each) give the whole output's channels, and
    their input gradients add up to the whole layer's (each slice reads what ``needs`` says)."""
    from clustersim.core.partition import cut_along
    rng = np.random.default_rng(6)
    out = layer.shape(shape)
    x = rng.integers(0, 9, (2, *shape)).astype(float) if layer.kind == "embedding" else rng.normal(size=(2, *shape))
    params = make_params(layer, shape, rng)
    R = rng.normal(size=(2, *out))
    y, cache = forward(np, layer, shape, x, full_box(shape), full_box(out), params)
    dx, dparams = backward(np, layer, shape, x.shape, full_box(shape), full_box(out), params, cache, R)
    dx_sum = np.zeros_like(x)
    for box in cut_along(out, 0, 2, layer.unit(shape)):
        rin = layer.needs(shape, box)
        region = x[(slice(None),) + tuple(slice(a, b) for a, b in rin)]
        own = [a[ix] for a, ix in zip(params, layer.box_index(box))]
        yb, cb = forward(np, layer, shape, region, rin, box, own)
        sub = (slice(None),) + tuple(slice(a, b) for a, b in box)
        assert np.allclose(yb, y[sub], rtol=1e-12, atol=1e-12)
        dxb, dpb = backward(np, layer, shape, region.shape, rin, box, own, cb, R[sub])
        dx_sum[(slice(None),) + tuple(slice(a, b) for a, b in rin)] += dxb
        for g, ix, gb in zip(dparams, layer.box_index(box), dpb):
            assert np.allclose(g[ix], gb, rtol=1e-10, atol=1e-12)
    assert np.allclose(dx_sum, dx, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("layer, shape", CASES, ids=[c[0].kind for c in CASES])
def test_without_the_input_gradient_a_weighted_kernel_gives_the_same_parameter_gradients(layer, shape):
    """A layer reading the model's input alone needs no input gradient (``Node.input_grad``):
    the kernels of the weighted kinds whose data-gradient GEMM the Plan then leaves out
    (``Layer.input_grad_share``) skip it and return the same parameter gradients; the others
    compute as before."""
    rng = np.random.default_rng(4)
    x = rng.integers(0, layer.vocab, (3, *shape)).astype(float) if layer.kind == "embedding" \
        else rng.normal(size=(3, *shape))
    params = make_params(layer, shape, rng)
    rin, box = full_box(shape), full_box(layer.shape(shape))
    y, cache = forward(np, layer, shape, x, rin, box, params)
    R = rng.normal(size=y.shape)
    dx, dparams = backward(np, layer, shape, x.shape, rin, box, params, cache, R)
    skipped, again = backward(np, layer, shape, x.shape, rin, box, params, cache, R, input_grad=False)
    assert (skipped is None) == (layer.input_grad_share > 0) == (layer.kind in ("dense", "conv2d", "locally_connected"))
    assert len(again) == len(dparams) and all(np.array_equal(a, b) for a, b in zip(again, dparams))
