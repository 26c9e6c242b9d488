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
]


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
    assert {layer.kind for layer, _ in CASES} == set(KINDS)


@pytest.mark.parametrize("layer, shape", CASES, ids=[c[0].kind for c in CASES])
def test_backward_matches_finite_differences(layer, shape):
    rng = np.random.default_rng(3)
    out = layer.shape(shape)
    x = rng.normal(size=(3, *shape))
    params = make_params(layer, shape, rng)
    R = rng.normal(size=(3, *out))
    rin, box = full_box(shape), full_box(out)

    def loss(x, params):
        y, _ = forward(np, layer, shape, x, rin, box, params)
        return float((y * R).sum())
    y, cache = forward(np, layer, shape, x, rin, box, params)
    assert y.shape == (3, *out)
    dx, dparams = backward(np, layer, shape, x.shape, rin, box, params, cache, R)
    eps = 1e-6
    for arr, grad in [(x, dx)] + list(zip(params, dparams)):
        flat, g = arr.reshape(-1), np.asarray(grad).reshape(-1)
        for i in rng.choice(flat.size, size=min(flat.size, 25), replace=False):
            old = flat[i]
            flat[i] = old + eps
            up = loss(x, params)
            flat[i] = old - eps
            down = loss(x, params)
            flat[i] = old
            assert g[i] == pytest.approx((up - down) / (2 * eps), rel=1e-4, abs=1e-6), (layer.kind, i)


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
