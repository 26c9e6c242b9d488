"""Every layer kind of the core has its kernel class, and what the executor derives from
the core layer per kind (box index, starting parameters) agrees with the layer itself."""
from types import SimpleNamespace

import numpy as np
import pytest

from clustersim.core.layers import KINDS, full_box
from executor.kernels import KERNELS, Kernel, backward, forward, init_params
from clustersim.core.models import build_model, make_layer as L
from test_kernels import CASES

IDS = [c[0].kind for c in CASES]


def test_every_core_kind_has_a_kernel_class():
    assert set(KERNELS) == set(KINDS)
    assert all(issubclass(k, Kernel) for k in KERNELS.values())


def test_a_kind_without_a_kernel_is_a_value_error():
    bogus = SimpleNamespace(kind="bogus")
    with pytest.raises(ValueError, match="no kernel for layer kind 'bogus'"):
        forward(np, bogus, (1, 1, 1), np.ones((1, 1, 1, 1)), full_box((1, 1, 1)), full_box((1, 1, 1)), [])
    with pytest.raises(ValueError, match="no kernel for layer kind 'bogus'"):
        backward(np, bogus, (1, 1, 1), (1, 1, 1, 1), full_box((1, 1, 1)), full_box((1, 1, 1)), [], (), np.ones(1))



@pytest.mark.parametrize("layer, shape", CASES, ids=IDS)
def test_init_has_the_core_shapes_and_dtype(layer, shape):
    arrays = KERNELS[layer.kind].init(layer, shape, layer.shape(shape), np.random.default_rng(0), np.float32)
    assert [a.shape for a in arrays] == layer.param_shapes(shape)
    assert all(a.dtype == np.float32 for a in arrays)


def test_init_params_glorot_limits_and_constants():
    """Weights inside +-sqrt(6 / (fan_in + fan_out)) of one output unit; biases 0; gamma 1, beta 0."""
    m = build_model("init", (2, 6, 6), [L("conv2d", filters=3, kernel=3), L("locally_connected", filters=2, kernel=2),
                                        L("batchnorm"), L("dense", units=5), L("softmax_xent")], 5)
    full = init_params(m, np.random.default_rng(1))
    assert sorted(full) == [0, 1, 2, 3]
    fans = {0: (2 * 9, 3 * 9), 1: (3 * 4, 2), 3: (2 * 3 * 3, 5)}
    for i, (fi, fo) in fans.items():
        W, b = full[i]
        lim = np.sqrt(6.0 / (fi + fo))
        assert np.abs(W).max() <= lim and np.abs(W).max() > 0.5 * lim
        assert not b.any()
    gamma, beta = full[2]
    assert (gamma == 1).all() and not beta.any()
