"""The zoo's parameter counts and shapes, layer FLOPs, and model files."""
import pytest

from clustersim.core.config import ConfigError
from clustersim.core.models import build_model, load_model_file, make_layer as L, zoo_model


def weights_and_biases(model):
    biases = sum(n.out_shape[0] if n.layer.kind == "dense" else 0 for n in model.nodes)
    return model.params - biases, biases


def test_distbelief_speech_counts_from_the_paper():
    m = zoo_model("distbelief-speech")
    assert weights_and_biases(m) == (41_758_720, 18_432)
    assert m.nodes[-1].out_shape == (8192, 1, 1) and m.input_shape == (440, 1, 1)


def test_alexnet_matches_the_torchvision_count_and_shapes():
    m = zoo_model("alexnet")
    assert m.params == 61_100_840
    conv_out = [n.out_shape for n in m.nodes if n.layer.kind == "conv2d"]
    assert conv_out == [(64, 55, 55), (192, 27, 27), (384, 13, 13), (256, 13, 13), (256, 13, 13)]
    # 0.72 G multiply-adds per image is the usual figure for this variant
    assert m.fwd_flops == pytest.approx(2 * 0.7146e9, rel=0.01)


@pytest.mark.parametrize("name, params", [("distbelief-image-80m", 82_400_937),
                                          ("distbelief-image-330m", 330_166_467),
                                          ("distbelief-image-1.7b", 1_704_149_345),
                                          ("mlp-digits", 64 * 128 + 128 + 128 * 10 + 10)])
def test_zoo_parameter_counts(name, params):
    assert zoo_model(name).params == params


def test_locally_connected_closed_forms():
    # 3x12x12 input, 4 filters of 3x3, untied: 10x10 positions x 4 filters x (27 + 1)
    m = build_model("lc", (3, 12, 12), [L("locally_connected", filters=4, kernel=3)])
    node = m.nodes[0]
    assert node.out_shape == (4, 10, 10)
    assert node.params == 10 * 10 * 4 * 28
    assert node.fwd_flops == 2 * 27 * 4 * 10 * 10
    conv = build_model("c", (3, 12, 12), [L("conv2d", filters=4, kernel=3, stride=2, padding=1)]).nodes[0]
    assert conv.out_shape == (4, 6, 6) and conv.params == 4 * 28


def test_model_file_loads_and_bad_shapes_name_the_layer(tmp_path):
    f = tmp_path / "m.toml"
    f.write_text('name = "tiny"\ninput = [1, 8, 8]\n[[layer]]\nkind = "conv2d"\nfilters = 2\nkernel = 3\n'
                 '[[layer]]\nkind = "max_pool"\nkernel = 2\n[[layer]]\nkind = "dense"\nunits = 3\n')
    m = load_model_file(f)
    assert [n.out_shape for n in m.nodes] == [(2, 6, 6), (2, 3, 3), (3, 1, 1)]
    f.write_text('input = [4]\n[[layer]]\nkind = "maxout"\npieces = 3\n')
    with pytest.raises(ConfigError, match="maxout pieces 3 must divide the 4 input channels") as err:
        load_model_file(f)
    assert err.value.field == "layer"
    f.write_text('input = [4]\n[[layer]]\nkind = "dense"\nunit = 3\n')
    with pytest.raises(ConfigError) as err:
        load_model_file(f)
    assert err.value.field == "layer[0].unit"
    f.write_text('input = [4]\n[[layer]]\nkind = "conv2d"\nfilters = 3\n')
    with pytest.raises(ConfigError, match="is required for a conv2d layer") as err:
        load_model_file(f)
    assert err.value.field == "layer[0].kernel"


def test_each_kind_holds_its_parameter_shapes_and_slice_index():
    """Invariants: the arrays hold exactly ``params``; a slice's index picks ``slice_params``."""
    import numpy as np
    from clustersim.core.partition import spatial_slices
    from clustersim.core.models import build_model
    layers = [L("locally_connected", filters=4, kernel=3), L("batchnorm"), L("conv2d", filters=6, kernel=3),
              L("max_pool", kernel=2), L("dense", units=5), L("softmax_xent")]
    model = build_model("t", (3, 12, 12), layers, 5)
    slices, _ = spatial_slices(model, 3)
    for node, sl in zip(model.nodes, slices):
        layer, s = node.layer, node.in_shape
        shapes = layer.param_shapes(s)
        assert sum(int(np.prod(x)) for x in shapes) == layer.params(s)
        arrays = [np.zeros(x) for x in shapes]
        for _, box in sl:
            picked = sum(a[ix].size for a, ix in zip(arrays, layer.box_index(box)))
            assert picked == layer.slice_params(s, box), (layer.kind, box)
