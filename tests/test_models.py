"""The zoo's parameter counts and shapes, layer FLOPs, and model files."""
import pytest

from clustersim.core.config import ConfigError
from clustersim.core.models import GraphError, build_model, load_model_file, make_layer as L, zoo_model


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
    assert err.value.field == "layer[0]"
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


# --- today's CNNs as graphs ------------------------------------------------------------------
def basic_conv(cin, cout, kh, kw=None):
    """torchvision's BasicConv2d: a convolution without biases and batch norm (gamma, beta)."""
    return cin * cout * kh * (kw or kh) + 2 * cout


def inception_v3_count():
    """torchvision's Inception3(aux_logits=False), module by module from its source: the
    classes' constructors written as sums of their BasicConv2d layers."""
    def a(cin, pool):       # InceptionA
        return (basic_conv(cin, 64, 1) + basic_conv(cin, 48, 1) + basic_conv(48, 64, 5) + basic_conv(cin, 64, 1)
                + basic_conv(64, 96, 3) + basic_conv(96, 96, 3) + basic_conv(cin, pool, 1))

    def c(c7):              # InceptionC on 768 channels
        return (basic_conv(768, 192, 1) + basic_conv(768, c7, 1) + basic_conv(c7, c7, 1, 7) + basic_conv(c7, 192, 7, 1)
                + basic_conv(768, c7, 1) + 3 * basic_conv(c7, c7, 7, 1) + basic_conv(c7, 192, 1, 7)
                + basic_conv(768, 192, 1))

    def e(cin):             # InceptionE
        return (basic_conv(cin, 320, 1) + basic_conv(cin, 384, 1) + 2 * basic_conv(384, 384, 1, 3)
                + basic_conv(cin, 448, 1) + basic_conv(448, 384, 3) + 2 * basic_conv(384, 384, 1, 3)
                + basic_conv(cin, 192, 1))
    stem = (basic_conv(3, 32, 3) + basic_conv(32, 32, 3) + basic_conv(32, 64, 3) + basic_conv(64, 80, 1)
            + basic_conv(80, 192, 3))
    b = basic_conv(288, 384, 3) + basic_conv(288, 64, 1) + basic_conv(64, 96, 3) + basic_conv(96, 96, 3)
    d = basic_conv(768, 192, 1) + basic_conv(192, 320, 3) + basic_conv(768, 192, 1) + 2 * basic_conv(192, 192, 1, 7) \
        + basic_conv(192, 192, 3)
    return (stem + a(192, 32) + a(256, 64) + a(288, 64) + b + c(128) + c(160) + c(160) + c(192) + d
            + e(1280) + e(2048) + 2048 * 1000 + 1000)


def alexnet_2gpu_count():
    """Krizhevsky et al. 2012, Fig. 2: per GPU 48, 128, 192, 192, 128 kernels and 2048 + 2048
    units; conv2, conv4, conv5 read their own tower, conv3 and the dense layers both."""
    tower = (48 * (11 * 11 * 3 + 1) + 128 * (5 * 5 * 48 + 1) + 192 * (3 * 3 * 256 + 1) + 192 * (3 * 3 * 192 + 1)
             + 128 * (3 * 3 * 192 + 1) + 2048 * (6 * 6 * 256 + 1) + 2048 * (4096 + 1))
    return 2 * tower + 1000 * (4096 + 1)


@pytest.mark.parametrize("name, params", [
    ("resnet-50", 25_557_032), ("vgg-16", 138_357_544),            # torchvision's trainable parameters
    ("inception-v3", 23_834_568), ("alexnet-2gpu", 60_965_224)])
def test_cnn_zoo_matches_the_reference_counts(name, params):
    """Pinned figures: torchvision's sum(p.numel() for p in model.parameters()) for resnet50,
    vgg16 and inception_v3(aux_logits=False) (batch-norm running statistics are buffers, not
    parameters); the two-tower AlexNet's is Caffe's bvlc_alexnet (groups of 2).  The last
    two are also summed module by module above, independently of the graph builder."""
    assert zoo_model(name).params == params
    assert inception_v3_count() == 23_834_568 and alexnet_2gpu_count() == 60_965_224


def test_cnn_graphs_have_the_published_shapes_and_multiply_adds():
    """Stage outputs of ResNet-50 and Inception V3, and the convolutions' and dense layers'
    multiply-adds per image against torchvision's published GFLOPS (4.09, 15.47, 5.71)."""
    res = zoo_model("resnet-50")
    adds = [n for n in res.nodes if n.layer.kind == "add"]
    assert len(adds) == 16 and len(res.nodes) == 175
    assert sorted({n.out_shape for n in adds}, key=lambda s: s[0]) == [
        (256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)]
    inc = zoo_model("inception-v3")
    cats = [n.out_shape for n in inc.nodes if n.layer.kind == "concat"]
    assert cats == [(256, 35, 35), (288, 35, 35), (288, 35, 35), (768, 17, 17)] + [(768, 17, 17)] * 4 \
        + [(1280, 8, 8), (2048, 8, 8), (2048, 8, 8)]
    for name, gmacs in (("resnet-50", 4.09), ("vgg-16", 15.47), ("inception-v3", 5.71)):
        macs = sum(n.fwd_flops for n in zoo_model(name).nodes if n.layer.kind in ("conv2d", "dense")) / 2
        assert macs / 1e9 == pytest.approx(gmacs, abs=0.01), name


def test_two_tower_alexnet_crosses_towers_where_the_paper_does():
    m = zoo_model("alexnet-2gpu")
    convs = [n for n in m.nodes if n.layer.kind == "conv2d"]        # tower A's conv1, conv2, tower B's, ...
    reads = ["image" if n.inputs[0] < 0 else m.nodes[n.inputs[0]].layer.kind for n in convs]
    # conv1 reads the image, conv2 its tower's pooling, conv3 the concat of both towers, conv4 and 5 their tower
    assert reads == ["image", "max_pool"] * 2 + ["concat", "relu", "relu"] * 2
    assert [n.out_shape[0] for n in convs] == [48, 128] * 2 + [192, 192, 128] * 2
    dense_in = [m.nodes[n.inputs[0]].out_shape for n in m.nodes if n.layer.kind == "dense"]
    assert dense_in == [(256, 6, 6)] * 2 + [(4096, 1, 1)] * 3


GRAPH_FILE = '''
name = "res"
input = [2, 8, 8]
[[layer]]
kind = "conv2d"
filters = 4
kernel = 3
padding = 1
name = "stem"
[[layer]]
kind = "relu"
name = "out"
inputs = ["sum"]
[[layer]]
kind = "conv2d"
filters = 4
kernel = [1, 3]
padding = [0, 1]
bias = false
name = "branch"
inputs = ["stem"]
[[layer]]
kind = "add"
name = "sum"
inputs = ["branch", "stem"]
[[layer]]
kind = "concat"
inputs = ["out", "input"]
[[layer]]
kind = "dense"
units = 3
[[layer]]
kind = "softmax_xent"
'''


def test_graph_model_file_names_inputs_in_any_order(tmp_path):
    """Layers may name layers further down the file: they run in a topological order, the
    file's order where it is one; ``input`` is the model's input."""
    f = tmp_path / "g.toml"
    f.write_text(GRAPH_FILE)
    m = load_model_file(f)
    assert [n.label for n in m.nodes] == ["stem", "branch", "sum", "out", "", "", ""]
    assert [n.inputs for n in m.nodes] == [(-1,), (0,), (1, 0), (2,), (3, -1), (4,), (5,)]
    assert m.nodes[4].out_shape == (6, 8, 8) and m.nodes[4].in_shapes == ((4, 8, 8), (2, 8, 8))
    assert m.nodes[1].params == 4 * 4 * 3 and m.consumers[0] == (1, 2)
    chain = build_model("c", (4, 1, 1), [L("dense", units=3), L("relu")])
    assert [n.inputs for n in chain.nodes] == [(-1,), (0,)]


@pytest.mark.parametrize("edits, field, message", [
    ([('inputs = ["branch", "stem"]', 'inputs = ["branch", "stme"]')], "layer[3].inputs", "'stme', which is no layer"),
    ([('inputs = ["stem"]', 'inputs = ["out"]')], "layer[1].inputs", "layers out, branch, sum read each other in a cycle"),
    ([('kind = "add"', 'kind = "add"\nimputs = 1')], "layer[3].imputs", "unknown key"),
    ([('inputs = ["branch", "stem"]', 'inputs = ["branch", "input"]')], "layer[3].inputs",
     r"add needs inputs of one shape, got \(4, 8, 8\) and \(2, 8, 8\)"),
    ([('inputs = ["out", "input"]', 'inputs = ["out", "pooled"]'),
      ('kind = "softmax_xent"', 'kind = "softmax_xent"\n[[layer]]\nkind = "max_pool"\nkernel = 2\nname = "pooled"\n'
                                'inputs = ["input"]')],
     "layer[4].inputs", r"concat needs inputs of one height and width, got \(4, 8, 8\) and \(2, 4, 4\)"),
    ([('name = "sum"', 'name = "stem"')], "layer[3].name", "already layer 0's name"),
    ([('inputs = ["out", "input"]', 'inputs = ["stem"]')], "layer[1]", "layer 1 \\(relu\\): nothing reads its output"),
    ([('bias = false', 'bias = 0')], "layer[2].bias", "must be true or false"),
    ([('kernel = [1, 3]', 'kernel = [1, 3, 3]')], "layer[2].kernel", r"an integer or \[rows, cols\]")])
def test_a_bad_graph_is_one_error_naming_the_layer_field(tmp_path, edits, field, message):
    f = tmp_path / "g.toml"
    text = GRAPH_FILE
    for old, new in edits:
        assert old in text
        text = text.replace(old, new, 1)
    f.write_text(text)
    with pytest.raises(ConfigError, match=message) as err:
        load_model_file(f)
    assert err.value.field == field and err.value.file == str(f)


def gpt2_count(layers: int, d: int, vocab: int = 50257, positions: int = 1024) -> int:
    """GPT2Model summed module by module: wte, wpe; per block ln_1, c_attn (d x 3d + 3d),
    c_proj (d x d + d), ln_2, c_fc (d x 4d + 4d), mlp c_proj (4d x d + d); ln_f."""
    block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (4 * d * d + 4 * d) + (4 * d * d + d)
    return vocab * d + positions * d + layers * block + 2 * d


@pytest.mark.parametrize("name, params", [
    ("gpt2", 124_439_808), ("gpt2-medium", 354_823_168), ("gpt2-large", 774_030_080),
    ("gpt2-xl", 1_557_611_200),                          # Hugging Face GPT2Model, tied head, 1,024 positions
    ("gpt3-175b", 174_604_259_328),                      # GPT2Model's layout at 96 x 12,288, 2,048 positions
    ("bert-large", 335_141_888 + 2 * 1024 + 2),          # BertModel with pooler + BertForSequenceClassification's 2-way head
    ("llama-2-7b", 6_738_415_616)])                      # LlamaForCausalLM (untied head)
def test_transformer_zoo_matches_the_reference_counts(name, params):
    assert zoo_model(name).params == params
    assert [gpt2_count(*a) for a in ((12, 768), (24, 1024), (36, 1280), (48, 1600))] == [
        124_439_808, 354_823_168, 774_030_080, 1_557_611_200]
    assert gpt2_count(96, 12288, positions=2048) == 174_604_259_328
    d, f, v = 4096, 11008, 32000           # Llama: embed, 32 x (2 rmsnorm, q k v o, gate up down), norm, head
    assert 2 * v * d + 32 * (2 * d + 4 * d * d + 3 * d * f) + d == 6_738_415_616


MEGATRON_TABLE_1 = {  # Narayanan et al., SC21, Table 1: (layers, hidden, heads), published billions
    "megatron-1.7b": ((24, 2304, 24), 1.7), "megatron-3.6b": ((30, 3072, 32), 3.6),
    "megatron-7.5b": ((36, 4096, 32), 7.5), "megatron-18.4b": ((40, 6144, 48), 18.4)}


@pytest.mark.parametrize("name", MEGATRON_TABLE_1)
def test_megatron_weak_scaling_gpts_are_eq_2_plus_the_final_layernorm(name):
    """The paper's Eq. 2, P = 12 l h^2 (1 + 13 / 12h + (V + s) / 12 l h) with V 51,200 and
    s 2,048, counts every block (12 h^2 + 13 h: four matrices, their biases, two layernorms)
    and both embedding tables (the head is tied); the zoo adds the final layernorm's 2h."""
    (layers, h, heads), billions = MEGATRON_TABLE_1[name]
    v, s = 51200, 2048
    eq_2 = 12 * layers * h * h + 13 * layers * h + (v + s) * h
    m = zoo_model(name)
    assert m.params == eq_2 + 2 * h == gpt2_count(layers, h, vocab=v, positions=s)
    assert round(eq_2 / 1e9, 1) == billions
    assert m.input_shape == (1, s, 1) and m.nodes[-1].out_shape == (v, s, 1)
    assert [n.layer.heads for n in m.nodes if n.layer.kind == "attention"] == [heads] * layers


def test_bert_pretraining_count_is_hugging_faces_plus_the_padded_words():
    """Hugging Face's BertForPreTraining for bert-large-uncased, derived here by hand from its
    layer shapes (a verbatim figure from Hugging Face was not found; lucid's
    bert_for_pre_training_large documents the same 336,226,108): BertModel with pooler
    335,141,888 (the zoo's bert-large less its 2-way classifier), the MLM transform (dense
    d x d + d, layernorm 2d), the decoder's bias (V; its matrix is the tied word table) and
    NSP's classifier (2d + 2).  DeepLearningExamples pads V 30,522 to 30,528
    (run_pretraining.py, "Padding for divisibility by 8"): 6 more rows of the word table and
    6 more biases."""
    d, v = 1024, 30522
    hf = 335_141_888 + (d * d + d + 2 * d) + v + (2 * d + 2)
    assert hf == 336_226_108
    assert zoo_model("bert-large").params == 335_141_888 + 2 * d + 2
    m = zoo_model("bert-large-pretrain", sequence=128)
    assert m.params == hf + 6 * (d + 1)


def test_bert_pretraining_graph_is_dles():
    """Dropout after the embeddings' layernorm and after each block's two output projections;
    NSP's loss on the pooled first token ends a branch, MLM's over 20 positions (DLE phase 1's
    max_predictions_per_seq) ends the graph; the head's extra FLOPs are its 20 positions'."""
    m = zoo_model("bert-large-pretrain", sequence=128)
    kinds = [n.layer.kind for n in m.nodes]
    assert kinds.count("dropout") == 1 + 2 * 24
    assert {n.layer.rate for n in m.nodes if n.layer.kind == "dropout"} == {0.1}
    drops = [n for n in m.nodes if n.layer.kind == "dropout"]
    assert [m.nodes[n.inputs[0]].layer.kind for n in drops[:3]] == ["layernorm", "conv2d", "conv2d"]
    assert [m.nodes[c].layer.kind for c in m.consumers[drops[1].index]] == ["add"]
    sinks = [n for n in m.nodes if not m.consumers[n.index]]
    assert [(n.layer.kind, n.out_shape) for n in sinks] == [("softmax_xent", (2, 1, 1)),
                                                             ("softmax_xent", (30528, 20, 1))]
    assert sinks[-1] is m.nodes[-1] and m.classes == 30528
    head = m.nodes[-2]
    assert head.layer.kind == "lm_head" and head.layer.tied and head.layer.bias and head.params == 30528
    d, v, t = 1024, 30528, 20
    assert head.fwd_flops == 2 * d * v * t
    plain = zoo_model("bert-large", sequence=128)
    assert m.fwd_flops - plain.fwd_flops == pytest.approx(
        (1 + 2 * 24) * d * 128                              # dropout, 1 FLOP an element
        + t * (2 * d * d + 8 * d + 8 * d) + 2 * d * v * t + 5 * v * t)  # transform, gelu, layernorm; decoder; loss
    assert zoo_model("bert-large-pretrain", sequence=8).nodes[-1].out_shape == (30528, 8, 1)   # at most T
    with pytest.raises(ValueError, match="keeps 3 positions of a sequence of 2"):
        L("first_token", tokens=3).shape((4, 2, 1))


def test_a_second_loss_ends_a_graph_only_where_the_builder_allows_it():
    layers = [L("dense", units=3), L("softmax_xent"), L("dense", units=2), L("softmax_xent")]
    inputs = [None, None, ("0",), None]
    names = ["0", "", "", ""]
    with pytest.raises(ValueError, match="nothing reads its output"):
        build_model("two", (4, 1, 1), layers, names=names, inputs=inputs)
    m = build_model("two", (4, 1, 1), layers, names=names, inputs=inputs, losses=True)
    assert [n.out_shape for n in m.nodes if not m.consumers[n.index]] == [(3, 1, 1), (2, 1, 1)]
    with pytest.raises(ValueError, match="nothing reads its output"):
        build_model("two", (4, 1, 1), [L("dense", units=3), L("relu"), L("dense", units=2)],
                    names=["0", "", ""], inputs=[None, None, ("0",)], losses=True)


def test_a_tied_head_without_its_table_and_a_loss_read_on_are_refused():
    """U37: a tied lm_head with no embedding of its vocabulary counted 0 weights (and failed
    on an executor rank, exit 1); a softmax_xent another layer read was charged by the
    simulator and passed over by the executor."""
    with pytest.raises(GraphError, match=r"layer 1 \(lm_head\): tied to the word embeddings, but no embedding "
                                         r"layer has vocab = 100 and dim = 8") as err:
        build_model("head", (8, 4, 1), [L("layernorm"), L("lm_head", vocab=100), L("softmax_xent")])
    assert err.value.key == "tied"
    with pytest.raises(GraphError, match="no embedding layer has vocab = 100"):     # a table of another vocabulary
        build_model("head", (1, 4, 1), [L("embedding", vocab=50, dim=8), L("lm_head", vocab=100),
                                        L("softmax_xent")])
    tied = build_model("head", (1, 4, 1), [L("embedding", vocab=100, dim=8), L("lm_head", vocab=100),
                                           L("softmax_xent")])
    assert tied.params == 100 * 8                                       # the table, counted once
    untied = build_model("head", (8, 4, 1), [L("layernorm"), L("lm_head", vocab=100, tied=False), L("softmax_xent")])
    assert untied.params == 2 * 8 + 100 * 8
    with pytest.raises(GraphError, match=r"layer 1 \(softmax_xent\): a loss ends the graph; layer 2 reads"):
        build_model("mid", (4, 1, 1), [L("dense", units=3), L("softmax_xent"), L("relu"), L("softmax_xent")])


def test_a_misspelt_top_level_key_of_a_model_file_is_named_before_what_is_missing(tmp_path):
    """U37: ``[[layers]]`` said "a model needs at least one [[layer]]" and ``inputs = [64]``
    "input: is required", neither naming the key at fault."""
    f = tmp_path / "m.toml"
    for text, key in (('input = [4]\n[[layers]]\nkind = "dense"\nunits = 2\n', "layers"),
                      ('inputs = [4]\n[[layer]]\nkind = "dense"\nunits = 2\n', "inputs")):
        f.write_text(text)
        with pytest.raises(ConfigError, match=f"{key}: unknown key \\(a model file has name, input, classes, "
                                              f"layer\\)") as err:
            load_model_file(f)
        assert err.value.field == key


def test_transformer_sequence_and_flops():
    """model.sequence sets the positions and leaves the count alone; GPT-3's forward FLOPs
    per sequence are Megatron's 24 b s h^2 (1 + s / 6h) per layer plus the head's 2 s h V."""
    short = zoo_model("gpt2", sequence=128)
    assert short.input_shape == (1, 128, 1) and short.params == 124_439_808
    assert short.nodes[-1].out_shape == (50257, 128, 1)
    m = zoo_model("gpt3-175b")
    s, h, V = 2048, 12288, 50257
    matmuls = sum(n.fwd_flops for n in m.nodes if n.layer.kind in ("attention", "conv2d", "lm_head"))
    softmax = 96 * 5 * s * s * 96           # the attention's softmax, 5 FLOPs per score
    assert matmuls - softmax == pytest.approx(96 * 24 * s * h * h * (1 + s / (6 * h)) + 2 * s * h * V, rel=1e-12)
    with pytest.raises(ValueError, match="1..1024"):
        zoo_model("gpt2", sequence=2048)
    with pytest.raises(ValueError, match="no sequence"):
        zoo_model("resnet-50", sequence=8)


def test_transformer_kinds_in_a_model_file(tmp_path):
    f = tmp_path / "tiny.toml"
    f.write_text('input = [1, 8, 1]\n'
                 '[[layer]]\nkind = "embedding"\nvocab = 11\ndim = 4\npositions = 8\nname = "e"\n'
                 '[[layer]]\nkind = "rmsnorm"\n[[layer]]\nkind = "attention"\nheads = 2\ncausal = true\nbias = false\n'
                 '[[layer]]\nkind = "add"\ninputs = ["2", "e"]\n'.replace('"2"', '"a"').replace(
                     'bias = false\n', 'bias = false\nname = "a"\n')
                 + '[[layer]]\nkind = "lm_head"\nvocab = 11\ntied = false\n[[layer]]\nkind = "softmax_xent"\n')
    m = load_model_file(f)
    assert [n.layer.kind for n in m.nodes] == ["embedding", "rmsnorm", "attention", "add", "lm_head", "softmax_xent"]
    assert m.params == 19 * 4 + 4 + 3 * 4 * 4 + 11 * 4


def test_the_small_trainable_models_match_their_hand_counts():
    """resnet-digits: conv 1->16 3x3, conv 16->16 3x3 (biases), dense 16*4*4 -> 10.
    gpt-tiny: token (19) and position (16) tables of 32, per block two layernorms, q k v
    and the output projection with biases, a 4d MLP; a final layernorm, an untied head."""
    cnn = zoo_model("resnet-digits")
    assert cnn.params == (9 * 16 + 16) + (16 * 9 * 16 + 16) + (16 * 4 * 4 * 10 + 10) == 5_050
    assert [n.layer.kind for n in cnn.nodes] == ["conv2d", "relu", "conv2d", "add", "relu", "max_pool", "dense",
                                                 "softmax_xent"]
    add = cnn.nodes[3]
    assert add.inputs == (2, 1) and cnn.consumers[1] == (2, 3)          # the shortcut: relu read by conv and add
    d, v, t = 32, 19, 16
    block = 2 * (2 * d) + 3 * (d * d + d) + (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    gpt = zoo_model("gpt-tiny")
    assert gpt.params == (v + t) * d + 2 * block + 2 * d + v * d == 27_200
    assert gpt.input_shape == (1, t, 1) and gpt.nodes[-1].out_shape == (v, t, 1) and gpt.classes == v
    assert [n.layer.causal for n in gpt.nodes if n.layer.kind == "attention"] == [True, True]


def test_model_list_names_every_built_in_model_with_its_count(capsys):
    """``clustersim model list``: there was no way to see the zoo but an unknown name's error."""
    from clustersim.cli import main
    from clustersim.core.models import ZOO
    assert main(["model", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == set(ZOO)
    assert rows["resnet-50"][3] == "25557032" and rows["megatron-7.5b"][3] == "7467786240"


def test_classes_that_are_not_the_last_layers_outputs_are_refused(tmp_path):
    """U37: ``classes = 7`` on a 10-way output was taken (labels 0..6 on 10 logits)."""
    f = tmp_path / "m.toml"
    f.write_text('input = [4]\nclasses = 7\n[[layer]]\nkind = "dense"\nunits = 10\n[[layer]]\nkind = "softmax_xent"\n')
    with pytest.raises(ConfigError, match=r"classes: 7, but the last layer \(softmax_xent\) gives 10 outputs"):
        load_model_file(f)
    f.write_text(f.read_text().replace("classes = 7", "classes = 10"))
    assert load_model_file(f).classes == 10
