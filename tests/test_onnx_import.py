"""ONNX import: small graphs built with onnx.helper map onto layer kinds with the
parameters their initializers hold and the shapes onnx's shape inference gives; they
plan and simulate; the model TOML written by ``--out`` reloads to the same model."""
from math import prod
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import clustersim  # noqa: E402
from clustersim.cli import main  # noqa: E402
from clustersim.core.config import ConfigError  # noqa: E402
from clustersim.core.models import load_model_file, zoo_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class Net:
    """A graph under construction: nodes, initializers (seeded values: only shapes
    matter) and the one input."""

    def __init__(self, shape: list, rng: np.random.Generator) -> None:
        self.rng, self.nodes, self.inits = rng, [], []
        self.input = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)

    def init(self, name: str, *shape: int) -> str:
        self.inits.append(numpy_helper.from_array(self.rng.standard_normal(shape).astype(np.float32), name))
        return name

    def ints(self, name: str, values: list[int]) -> str:
        self.inits.append(numpy_helper.from_array(np.array(values, dtype=np.int64), name))
        return name

    def __call__(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def save(self, path: Path, out: str, opset: int = 17) -> Path:
        graph = helper.make_graph(self.nodes, "net", [self.input],
                                  [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model = onnx.shape_inference.infer_shapes(model)     # gives the output its shape, as exporters do
        del model.graph.value_info[:]
        onnx.checker.check_model(model)
        onnx.save(model, str(path))
        return path


def parameters(path: Path, statistics: tuple[str, ...] = ()) -> int:
    """The sizes of every initializer but ``statistics`` (batch norm's running mean and
    variance are not parameters) and the int64 shape operands."""
    return sum(prod(t.dims) for t in onnx.load(str(path)).graph.initializer
               if t.name not in statistics and t.data_type == TensorProto.FLOAT)


def onnx_shapes(path: Path) -> dict[str, tuple]:
    """Per-sample shapes of every tensor, by onnx's own shape inference on the file as it is."""
    done = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    return {vi.name: tuple(d.dim_value for d in vi.type.tensor_type.shape.dim)[1:]
            for vi in [*done.graph.value_info, *done.graph.output]}


def as_box(dims: tuple) -> tuple:
    return (dims[0], 1, 1) if len(dims) == 1 else dims


def mlp(path: Path, rng, batch="N") -> Path:
    # mlp-digits as an exporter writes it: Gemm with W (out, in) and transB = 1, then W (in, out)
    g = Net([batch, 64], rng)
    h = g("Relu", [g("Gemm", ["x", g.init("w1", 128, 64), g.init("b1", 128)], "fc1", transB=1)], "relu1")
    g("Gemm", [h, g.init("w2", 128, 10), g.init("b2", 10)], "fc2")
    return g.save(path, "fc2")


def cnn(path: Path, rng, flatten: str = "Flatten", batch=1, opset: int = 17) -> Path:
    g = Net([batch, 3, 16, 16], rng)
    x = g("Conv", ["x", g.init("cw1", 8, 3, 3, 3)], "conv1", pads=[1, 1, 1, 1])
    x = g("BatchNormalization", [x, g.init("s", 8), g.init("b", 8), g.init("mean", 8), g.init("var", 8)], "bn1")
    x = g("MaxPool", [g("Relu", [x], "relu1")], "pool1", kernel_shape=[2, 2], strides=[2, 2])
    x = g("Relu", [g("Conv", [x, g.init("cw2", 16, 8, 3, 3), g.init("cb2", 16)], "conv2",
                     strides=[2, 2], pads=[1, 1, 1, 1])], "relu2")                     # (16, 4, 4)
    if flatten == "Flatten":
        x = g("Flatten", [x], "flat")
    elif flatten == "view":                                   # torch's x.view(x.size(0), -1)
        batch = g("Gather", [g("Shape", [x], "shape"), g.ints("zero", [0])], "size0", axis=0)
        x = g("Reshape", [x, g("Concat", [batch, g.ints("rest", [-1])], "target", axis=0)], "flat")
    else:                                                     # Reshape by a constant target
        x = g("Reshape", [x, g.ints("target", {"0,-1": [0, -1], "-1,256": [-1, 256]}[flatten])], "flat")
    x = g("Gemm", [x, g.init("fw", 10, 256), g.init("fb", 10)], "fc", transB=1)
    g("Softmax", [x], "prob", axis=1)
    return g.save(path, "prob", opset)


def residual(path: Path, rng) -> Path:
    g = Net(["batch", 4, 8, 8], rng)
    r = g("Relu", [g("Conv", ["x", g.init("w1", 4, 4, 3, 3), g.init("b1", 4)], "conv1", pads=[1, 1, 1, 1])], "relu1")
    a = g("Add", [r, "x"], "res")
    cat = g("Concat", [g("Conv", [a, g.init("w2", 2, 4, 1, 1)], "conv2"),
                       g("Conv", [a, g.init("w3", 3, 4, 3, 3)], "conv3", auto_pad="SAME_UPPER")], "cat", axis=1)
    x = g("Flatten", [g("GlobalAveragePool", [cat], "gap")], "flat")
    g("Gemm", [x, g.init("fw", 5, 3), g.init("fb", 3)], "fc")
    return g.save(path, "fc")


def matmul(path: Path, rng) -> Path:
    g = Net(["N", 20], rng)
    h = g("Tanh", [g("Add", [g("MatMul", ["x", g.init("w1", 20, 30)], "mm1"), g.init("b1", 30)], "bias1")], "t")
    g("MatMul", [h, g.init("w2", 30, 5)], "mm2")            # no bias: a dense layer without one
    return g.save(path, "mm2")


def test_a_gemm_mlp_is_the_zoos_digits_mlp(tmp_path):
    rng = np.random.default_rng(0)
    m = load_model_file(mlp(tmp_path / "mlp.onnx", rng))
    ref = zoo_model("mlp-digits")
    assert [n.layer for n in m.nodes] == [n.layer for n in ref.nodes]     # the loss appended: no loss in the graph
    assert [n.out_shape for n in m.nodes] == [n.out_shape for n in ref.nodes]
    assert m.params == ref.params == parameters(tmp_path / "mlp.onnx")
    assert m.fwd_flops == ref.fwd_flops and m.input_shape == (64, 1, 1) and m.classes == 10
    assert [n.name for n in m.nodes] == ["fc1", "relu1", "fc2", "loss"]


@pytest.mark.parametrize("flatten, opset", [("Flatten", 17), ("Flatten", 11), ("Flatten", 21),
                                            ("0,-1", 17), ("-1,256", 13), ("view", 17)])
def test_a_cnn_counts_its_initializers_and_keeps_onnxs_shapes(tmp_path, flatten, opset):
    f = cnn(tmp_path / "cnn.onnx", np.random.default_rng(1), flatten, opset=opset)
    m = load_model_file(f)
    assert [n.layer.kind for n in m.nodes] == ["conv2d", "batchnorm", "relu", "max_pool", "conv2d", "relu",
                                               "dense", "softmax_xent"]      # Softmax on the output is the loss
    assert m.params == parameters(f, statistics=("mean", "var"))
    assert m.nodes[0].params == 8 * 3 * 9 and not m.nodes[0].layer.bias
    theirs = onnx_shapes(f)
    for node in m.nodes:
        assert node.out_shape == as_box(theirs[node.name]), node.name
    assert m.classes == 10


def test_the_batch_dimension_fixed_or_symbolic_gives_one_model(tmp_path):
    rng = np.random.default_rng(2)
    models = [load_model_file(cnn(tmp_path / f"b{b}.onnx", rng, batch=b)) for b in (1, 7, "N")]
    assert models[0].nodes == models[1].nodes == models[2].nodes


def test_a_residual_add_and_a_concat_are_graph_nodes(tmp_path):
    f = residual(tmp_path / "res.onnx", np.random.default_rng(3))
    m = load_model_file(f)
    by = {n.name: n for n in m.nodes}
    reads = {n.name: [("input" if s < 0 else m.nodes[s].name) for s in n.inputs] for n in m.nodes}
    assert reads["res"] == ["relu1", "input"] and reads["cat"] == ["conv2", "conv3"]
    assert reads["conv2"] == reads["conv3"] == ["res"]
    assert by["cat"].out_shape == (5, 8, 8) and by["gap"].out_shape == (5, 1, 1)
    assert by["conv3"].layer.padding == 1                   # SAME_UPPER of a 3 x 3 window
    assert m.params == parameters(f)
    theirs = onnx_shapes(f)
    assert all(n.out_shape == as_box(theirs[n.name]) for n in m.nodes if n.name in theirs)


def test_matmul_then_add_of_an_initializer_is_a_dense_layer_with_its_bias(tmp_path):
    f = matmul(tmp_path / "mm.onnx", np.random.default_rng(4))
    m = load_model_file(f)
    assert [(n.name, n.layer.kind, n.params) for n in m.nodes] == [
        ("mm1", "dense", 20 * 30 + 30), ("t", "tanh", 0),
        ("mm2", "conv2d", 30 * 5), ("loss", "softmax_xent", 0)]    # no bias: a conv covering the input
    assert m.params == parameters(f) and m.nodes[2].fwd_flops == 2 * 30 * 5


def test_out_writes_a_model_toml_that_reloads_to_the_same_model(tmp_path, capsys):
    rng = np.random.default_rng(5)
    for build in (cnn, residual, matmul):
        f = build(tmp_path / f"{build.__name__}.onnx", rng)
        out = tmp_path / f"{build.__name__}.toml"
        assert main(["model", "import", str(f), "--out", str(out)]) == 0
        assert load_model_file(out) == load_model_file(f)
    printed = capsys.readouterr().out
    assert "wrote model" in printed and "conv3" in printed


def test_an_imported_model_plans_and_simulates(tmp_path):
    f = cnn(tmp_path / "cnn.onnx", np.random.default_rng(6))
    scenario = tmp_path / "s.toml"
    scenario.write_text((ROOT / "scenarios" / "quickstart.toml").read_text()
                        .replace('name = "mlp-digits"', 'file = "cnn.onnx"'))
    r = clustersim.simulate(scenario, {"training.steps": 3, "model.batch_size": 16}, speedup=False)
    assert r.samples_per_s == pytest.approx(8 * 16 / r.step_time_s)     # 8 replicas of the batch set here
    assert r.plan.scenario.model == load_model_file(f)
    split = clustersim.simulate(scenario, {"training.steps": 3, "parallel.model_parallel": 2,
                                           "parallel.replicas": 1}, speedup=False)
    assert split.step_time_s > 0


def test_an_unsupported_operator_is_refused_in_one_line_naming_it_and_the_node(tmp_path, capsys):
    g = Net([5, "N", 8], np.random.default_rng(7))     # (sequence, batch, features): LSTM's layout
    g("LSTM", ["x", g.init("W", 1, 64, 8), g.init("R", 1, 64, 16)], "encoder", hidden_size=16)
    f = g.save(tmp_path / "rnn.onnx", "encoder")
    with pytest.raises(ConfigError, match=r"node 'encoder': LSTM: operator not supported") as err:
        load_model_file(f)
    assert err.value.file == str(f)
    code = main(["model", "import", str(f)])
    out, text = capsys.readouterr()
    assert code == 2 and not out and text.count("\n") == 1 and "LSTM" in text and "encoder" in text


def test_what_does_not_map_says_which_node_and_why(tmp_path):
    rng = np.random.default_rng(8)
    g = Net(["N", 4, 8, 8], rng)
    g("Conv", ["x", g.init("w", 4, 2, 3, 3)], "grouped", group=2)
    with pytest.raises(ConfigError, match="node 'grouped': Conv: group = 2 is not supported"):
        load_model_file(g.save(tmp_path / "g.onnx", "grouped"))
    g = Net(["N", 4, 8, 8], rng)
    g("Conv", [g("Softmax", ["x"], "inner", axis=1), g.init("w", 2, 4, 1, 1)], "conv")
    with pytest.raises(ConfigError, match="node 'inner': Softmax: only on the graph's output"):
        load_model_file(g.save(tmp_path / "s.onnx", "conv"))
    g = Net(["N", 4, 8, 8], rng)
    g("MaxPool", ["x"], "pool", kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)     # 8 - 3 is odd: rounds up
    with pytest.raises(ConfigError, match="node 'pool': MaxPool: ceil_mode = 1 rounds up here"):
        load_model_file(g.save(tmp_path / "p.onnx", "pool"))
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all")
    with pytest.raises(ConfigError, match="junk.onnx"):
        load_model_file(tmp_path / "junk.onnx")


def test_a_weight_two_layers_share_is_refused_naming_both(tmp_path):
    """One 8x8 weight read by two Gemms was imported as two layers of 8x8, its
    parameters (and its gradient allreduce, and its memory) counted twice, without a word."""
    g = Net(["N", 8], np.random.default_rng(10))
    w = g.init("W", 8, 8)
    g("Gemm", [g("Gemm", ["x", w], "h1"), w], "h2")
    with pytest.raises(ConfigError, match=r"node 'h2': Gemm: its parameter 'W' belongs to node 'h1' too: tied "
                                          r"weights are not supported"):
        load_model_file(g.save(tmp_path / "tied.onnx", "h2"))


def test_a_graph_with_its_loss_keeps_it_and_reads_the_labels_as_no_activation(tmp_path):
    g = Net(["N", 6], np.random.default_rng(9))
    g.nodes.append(helper.make_node("SoftmaxCrossEntropyLoss", [g("Gemm", ["x", g.init("w", 6, 4), g.init("b", 4)],
                                                                  "fc"), "labels"], ["xent"], name="xent"))
    graph = helper.make_graph(g.nodes, "trained", [g.input, helper.make_tensor_value_info("labels", TensorProto.INT64,
                                                                                          ["N"])],
                              [helper.make_tensor_value_info("xent", TensorProto.FLOAT, [])], g.inits)
    f = tmp_path / "loss.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(f))
    m = load_model_file(f)
    assert [(n.name, n.layer.kind) for n in m.nodes] == [("fc", "dense"), ("xent", "softmax_xent")]
    assert m.params == 6 * 4 + 4 and m.name == "loss" and m.classes == 4       # named for the file


def test_missing_external_data_and_an_empty_file_say_what_is_wrong(tmp_path):
    """U37: weights saved beside the graph and since lost were "not an ONNX model
    (ValidationError)"; an empty file "graph.input: ... reads 0: none"."""
    w = numpy_helper.from_array(np.zeros((10, 64), np.float32), "W")
    b = numpy_helper.from_array(np.zeros(10, np.float32), "b")
    graph = helper.make_graph([helper.make_node("Gemm", ["x", "W", "b"], ["y"], transB=1)], "ext",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    f = tmp_path / "ext.onnx"
    onnx.save(model, str(f), save_as_external_data=True, all_tensors_to_one_file=True, location="ext.data",
              size_threshold=0)
    assert load_model_file(f).params == 650
    (tmp_path / "ext.data").unlink()
    with pytest.raises(ConfigError, match=r"ext.onnx: cannot load the model \(ValidationError: .*ext.data"):
        load_model_file(f)
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"empty.onnx: graph.node: the graph has no nodes"):
        load_model_file(tmp_path / "empty.onnx")


def test_malformed_files_are_one_line_naming_the_tensor_or_node(tmp_path):
    """U51: weight data too short for its shape, a tensor of no element type and a Reshape to
    a 0-d target raised numpy's errors (a traceback, exit 1); a Dropout ratio of nan or 1.5
    imported, then the written model file did not load."""
    rng = np.random.default_rng(0)
    net = Net(["N", 4], rng)
    w = net.init("W", 4, 3)
    net("Gemm", ["x", w], "y")
    graph = helper.make_graph(net.nodes, "net", [net.input], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              net.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.graph.initializer[0].raw_data = model.graph.initializer[0].raw_data[:-3]     # 45 of 48 bytes
    onnx.save(model, str(tmp_path / "short.onnx"))
    with pytest.raises(ConfigError, match=r"short.onnx: initializer 'W': its data cannot be read \(ValueError: "):
        load_model_file(tmp_path / "short.onnx")
    model.graph.initializer[0].data_type = TensorProto.UNDEFINED
    onnx.save(model, str(tmp_path / "untyped.onnx"))
    with pytest.raises(ConfigError, match=r"untyped.onnx: initializer 'W': its data cannot be read \(TypeError: "):
        load_model_file(tmp_path / "untyped.onnx")
    net = Net(["N", 4], rng)
    net.inits.append(numpy_helper.from_array(np.array(-1, dtype=np.int64), "shape"))
    graph = helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["y"], name="flat")], "net", [net.input],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], net.inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "scalar.onnx"))
    with pytest.raises(ConfigError, match=r"node 'flat': Reshape: its shape input has 0 dimensions"):
        load_model_file(tmp_path / "scalar.onnx")
    for ratio in (float("nan"), 1.5, -1.0):
        net = Net(["N", 4], rng)
        h = net("Gemm", ["x", net.init("W", 4, 3)], "h")
        ratio_name = net.init("r", 1)
        net.inits[-1] = numpy_helper.from_array(np.array(ratio, dtype=np.float32), "r")
        net("Dropout", [h, ratio_name], "d")
        graph = helper.make_graph(net.nodes, "net", [net.input],
                                  [helper.make_tensor_value_info("d", TensorProto.FLOAT, None)], net.inits)
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "drop.onnx"))
        with pytest.raises(ConfigError, match=r"node 'd': Dropout: ratio .*: must be 0 \.\. 0\.999"):
            load_model_file(tmp_path / "drop.onnx")
