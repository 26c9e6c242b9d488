"""sim.kernel_model: tile and wave quantization in closed form, GEMM shapes against the
layers' FLOP counts, memory passes, and where the device model applies it."""
import dataclasses
import itertools

import pytest

from clustersim.core.layers import box_size
from clustersim.core.models import INPUT_NAME, build_model, make_layer
from clustersim.core.partition import even_cuts
from clustersim.core.plan import cost_key, params_of, plan
from clustersim.core.schedule import PARAM_BYTES
from clustersim.core.topogen import build_topology
from clustersim.core.topology import Device
from helpers import gpu, scenario
from sim import kernel_model as km
from sim.compute import op_seconds

SMS = 108
RATE = 200e12                  # FLOP/s of the largest tile over the whole GPU
TOP = km.TILES[:1]             # only the 256 x 128 tile


def test_tiles_that_fill_whole_waves_run_at_the_tile_rate():
    g = km.Gemm(256 * 12, 128 * 9, 1024)               # 12 x 9 = 108 tiles: one full wave
    assert km.gemm_seconds(g, RATE, SMS) == pytest.approx(2 * g.m * g.n * g.k / RATE, rel=1e-12)
    two = km.Gemm(256 * 24, 128 * 9, 1024)             # two full waves
    assert km.gemm_seconds(two, RATE, SMS) == pytest.approx(2 * two.m * two.n * two.k / RATE, rel=1e-12)
    assert km.quantized_efficiency(g, SMS) == pytest.approx(1.0)


def test_one_tile_more_than_a_wave_takes_a_second_wave():
    """109 tiles on 108 SMs: two waves of one tile's time (a 32-deep K cannot be split)."""
    g = km.Gemm(256 * 109, 128, 32)
    tile = 2 * 256 * 128 * 32 / (RATE / SMS)
    assert km.gemm_seconds(g, RATE, SMS, TOP) == pytest.approx(2 * tile, rel=1e-12)
    assert km.quantized_efficiency(g, SMS, TOP) == pytest.approx(109 / 216)


def test_a_partial_tile_costs_a_whole_tile():
    g = km.Gemm(256 * 108 - 1, 128, 64)                 # tile quantization: the last tile is not full
    whole = km.Gemm(256 * 108, 128, 64)
    assert km.gemm_seconds(g, RATE, SMS, TOP) == km.gemm_seconds(whole, RATE, SMS, TOP)


def test_split_k_fills_the_waves_of_a_small_output():
    """One 256 x 128 output tile over K = 108 x 32: split 32 ways it runs on 32 SMs at once."""
    g = km.Gemm(256, 128, 108 * 32)
    assert km.gemm_seconds(g, RATE, SMS, TOP) == pytest.approx(2 * 256 * 128 * 32 * 4 / (RATE / SMS), rel=1e-12)


def test_a_smaller_tile_runs_at_its_share_of_reuse():
    """64 x 64 tiles reuse 32 per element against 256 x 128's 85.3: a GEMM of exactly one
    wave of 64 x 64 tiles runs at 32 / 85.3 of the rate."""
    g = km.Gemm(64 * 12, 64 * 9, 32)
    t = km.gemm_seconds(g, RATE, SMS, ((256, 128), (64, 64)))
    assert t == pytest.approx(2 * g.m * g.n * g.k / (RATE * 32 / (256 * 128 / 384)), rel=1e-12)


SHAPES = list(itertools.product((1, 100, 1000, 5000), (64, 300, 2048), (32, 500, 4096)))


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_never_faster_than_the_roofline_and_monotonic(m, n, k):
    t = km.gemm_seconds(km.Gemm(m, n, k), RATE, SMS)
    assert t >= 2 * m * n * k / RATE * (1 - 1e-12)
    for bigger in (km.Gemm(m + 1, n, k), km.Gemm(m, n + 37, k), km.Gemm(m, n, k + 1), km.Gemm(m, n, k, 2)):
        assert km.gemm_seconds(bigger, RATE, SMS) >= t


def test_gemm_needs_sms():
    with pytest.raises(ValueError, match="sms"):
        km.gemm_seconds(km.Gemm(1, 1, 1), RATE, 0)


@pytest.mark.parametrize("kind,params,in_shape", [
    ("conv2d", {"filters": 64, "kernel": 3, "stride": 2, "padding": 1}, (32, 56, 56)),
    ("conv2d", {"filters": 4096, "kernel": 1}, (1024, 128, 1)),
    ("dense", {"units": 1000}, (2048, 1, 1)),
    ("lm_head", {"vocab": 30522}, (1024, 128, 1)),
])
def test_gemms_do_the_layers_flops(kind, params, in_shape):
    """Forward GEMMs add up to the layer's FLOPs; backward (data + weights) to twice that."""
    layer, batch = make_layer(kind, **params), 8
    out = layer.shape(in_shape)
    flops = layer.flops_per_out(in_shape) * out[0] * out[1] * out[2] * batch
    w = km.LayerWork(layer, in_shape, batch, out)
    assert sum(2 * g.m * g.n * g.k * g.batch for g in km.layer_gemms(w, False)) == pytest.approx(flops)
    assert sum(2 * g.m * g.n * g.k * g.batch for g in km.layer_gemms(w, True)) == pytest.approx(2 * flops)


def test_attention_gemms_are_its_flops_but_the_softmax():
    layer, (d, t), batch = make_layer("attention", heads=16), (1024, 128), 4
    w = km.LayerWork(layer, (d, t, 1), batch, (d, t, 1))
    products = layer.flops_per_out((d, t, 1)) * d * t * batch - 5 * 16 * t * t * batch
    assert sum(2 * g.m * g.n * g.k * g.batch for g in km.layer_gemms(w, False)) == pytest.approx(products)
    assert sum(2 * g.m * g.n * g.k * g.batch for g in km.layer_gemms(w, True)) == pytest.approx(2 * products)
    half = km.LayerWork(layer, (d, t, 1), batch, (d // 2, t, 1))  # a slice of 8 heads: half of it all
    assert km.attention_extra_bytes(half, 2, False) == pytest.approx(km.attention_extra_bytes(w, 2, False) / 2)
    assert km.layer_gemms(km.LayerWork(make_layer("relu"), (8, 1, 1), 1, (8, 1, 1)), False) == []


# The kernels PyTorch runs for each memory-bound kind in training, and the per-element
# tensors each reads and writes (sources in sim/kernel_model.py's PASSES): per-row
# statistics and parameters are left out, as PASSES leaves them.  mask: 1 byte an element.
KERNELS = {
    ("batchnorm", False): [("batch_norm_collect_statistics", "x", ""), ("batch_norm_transform_input", "x", "y")],
    ("batchnorm", True): [("batch_norm_backward_reduce", "dy x", ""), ("batch_norm_backward_elemt", "dy x", "dx")],
    ("layernorm", False): [("layer_norm", "x", "y")],
    ("layernorm", True): [("layer_norm_backward (dx)", "dy x", "dx"), ("gamma_beta_backward", "dy x", "")],
    ("relu", False): [("relu", "x", "y")],
    ("relu", True): [("threshold_backward", "y dy", "dx")],
    ("gelu", False): [("gelu", "x", "y")],
    ("gelu", True): [("gelu_backward", "x dy", "dx")],
    ("dropout", False): [("fused_dropout", "x", "y mask")],
    ("dropout", True): [("masked_scale", "dy mask", "dx")],
    ("add", False): [("add", "a b", "y")],
    ("add", True): [("add (the fork's two gradients)", "dy1 dy2", "dx")],   # add's own backward: no kernel
}


def test_kernels_listed_for_every_memory_bound_kind():
    assert {kind for kind, _ in KERNELS} == set(km.PASSES)


@pytest.mark.parametrize("kind,backward", list(KERNELS))
def test_memory_bytes_are_the_listed_kernels_bytes(kind, backward):
    """For a small fp16 layer, ``memory_bytes`` of the Plan's op equals the bytes the listed
    kernels read and write over the slice's box and samples."""
    if kind == "add":
        model = build_model("t", (8, 4, 1), [make_layer("relu"), make_layer("add"), make_layer("softmax_xent")], 8,
                            ["a", "s", "loss"], [None, ("a", INPUT_NAME), None])
    else:
        model = build_model("t", (8, 4, 1), [make_layer(kind, **({"rate": 0.1} if kind == "dropout" else {})),
                                             make_layer("softmax_xent")], 8)
    batch = 2
    p = plan(dataclasses.replace(scenario(batch=batch), model=model, dtype="fp16"), check_memory=False)
    i = [n.layer.kind for n in model.nodes].index(kind)
    op = next(op for op in p.ops if op.layer == i and op.kind == ("bwd" if backward else "fwd"))
    elements = batch * box_size(dict(p.slices[i])[op.slot])
    kernels = sum(elements * (1 if t == "mask" else 2) for _, reads, writes in KERNELS[(kind, backward)]
                  for t in (reads + " " + writes).split())
    assert km.memory_bytes(km.op_work(p, op), 2, backward) == pytest.approx(kernels, rel=1e-12)


def test_recomputed_backward_makes_the_forward_passes_again():
    """Under activation recomputation a memory-bound backward runs its forward kernels first:
    its bytes are the forward's passes plus the backward's, not the Plan's 3 x forward
    bytes scaled by the backward's ratio."""
    work = km.LayerWork(make_layer("gelu"), (16, 8, 8), 4, (16, 8, 8))
    plain, redo = (km.memory_bytes(work._replace(redo=r), 2, True)
                   for r in (False, True))
    elements = 4 * 16 * 8 * 8
    assert plain == 3 * elements * 2 and redo == (3 + 2) * elements * 2
    assert km.memory_bytes(km.LayerWork(make_layer("dense", units=4), (16, 1, 1), 4, (4, 1, 1)), 2, True) is None


def test_selective_backward_reruns_attentions_forward_but_its_projection():
    """With ``training.recompute = "selective"`` attention's backward runs its forward's
    per-head products and score kernels first (not the q, k, v projection): its time is the
    plain backward's plus the forward's less the projection's kernel; other kinds as plain."""
    topo = one(a100())
    dev = topo.devices["g"]
    for mode in ("eager", "fused", "flash"):
        w = km.LayerWork(make_layer("attention", heads=12), (768, 256, 1), 4, (768, 256, 1), attention=mode)
        plain, sel = (op_seconds(topo, "g", 0, 0, "fp16", True, "attention", w._replace(selective=r))
                      for r in (False, True))
        g = km.layer_gemms(w, False)[0]
        rate = dev.flops_per_s("fp16") * dev.efficiency
        projection = dev.op_overhead + max(km.gemm_seconds(g, rate, dev.sms), km.gemm_bytes(g, 2) / dev.achievable_bw)
        forward = op_seconds(topo, "g", 0, 0, "fp16", False, "attention", w)
        assert sel == pytest.approx(plain + forward - projection, rel=1e-12) and forward > projection
    gelu = km.LayerWork(make_layer("gelu"), (16, 8, 8), 4, (16, 8, 8))
    assert (op_seconds(topo, "g", 0, 0, "fp16", True, "gelu", gelu._replace(selective=True))
            == op_seconds(topo, "g", 0, 0, "fp16", True, "gelu", gelu))


def a100(**fields):
    """One A100 as dgx-a100.toml describes it, with a per-op overhead of 4 us."""
    return Device("g", "gpu", 0, {"fp32": 19.5e12, "fp16": 312e12}, 80 * 2**30, 2039e9, 0.7,
                  op_overhead=4e-6, compute_capability=8.0, sms=108, **fields)


def one(dev):
    from clustersim.core.topology import Topology
    return Topology("one", [dev], [])


def test_memory_bound_kinds_take_their_passes_at_the_achievable_bandwidth():
    topo = one(a100(memory_efficiency=0.88))
    bn = km.LayerWork(make_layer("batchnorm"), (64, 56, 56), 8, (64, 56, 56))
    t = op_seconds(topo, "g", 1e6, 1e9, "fp16", True, "batchnorm.backward", bn)
    assert t == pytest.approx(4e-6 + 5 * 8 * 64 * 56 * 56 * 2 / (2039e9 * 0.88), rel=1e-12)
    plain = op_seconds(topo, "g", 1e6, 1e9, "fp16", True, "batchnorm.backward")   # no work: the roofline
    assert plain == pytest.approx(4e-6 + 1e9 / (2039e9 * 0.88), rel=1e-12)


def test_test_devices_keep_the_plain_roofline():
    """A device without compute capability and SMs (the closed-form test topologies) and
    one whose efficiency calibration measured are not refined."""
    topo = build_topology({"name": "t", "device": [gpu("g0", 10.0)]}, "t.toml")
    assert not topo.devices["g0"].kernels_modelled
    conv = make_layer("conv2d", filters=64, kernel=3, padding=1)
    w = km.LayerWork(conv, (64, 56, 56), 32, (64, 56, 56))
    bn = km.LayerWork(make_layer("batchnorm"), (64, 56, 56), 0, (64, 56, 56))
    for key, work in (("batchnorm", bn), ("conv2d", w)):
        assert op_seconds(topo, "g0", 1e9, 1e8, "fp32", False, key, work) == pytest.approx(max(1e9 / 10e12, 1e8 / 1e12))
    assert not a100(efficiency_curve=((1e9, 0.5),)).kernels_modelled


def test_an_op_with_its_work_is_never_faster_than_its_flops_at_the_tile_rate():
    topo = one(a100())
    conv = make_layer("conv2d", filters=64, kernel=1)
    for batch, backward in itertools.product((1, 32, 256), (False, True)):
        w = km.LayerWork(conv, (256, 56, 56), batch, (64, 56, 56))
        flops = sum(2 * g.m * g.n * g.k for g in km.layer_gemms(w, backward))
        t = op_seconds(topo, "g", flops, 0.0, "fp16", backward, "conv2d", w)
        assert t >= 4e-6 + flops / (312e12 * 0.7)
    assert (op_seconds(topo, "g", 0, 0, "fp16", True, "conv2d", w._replace(redo=True))
            == pytest.approx(op_seconds(topo, "g", 0, 0, "fp16", True, "conv2d", w)
                             + op_seconds(topo, "g", 0, 0, "fp16", False, "conv2d", w)))


def gemm_flops_of(p, op, w):
    """FLOPs of the GEMMs an op's ``LayerWork`` runs, and the FLOPs of the op the Plan says
    they do: all of them but attention's softmax (5 per score), the forward again first when
    ``redo`` (``selective``: attention's per-head products and softmax)."""
    backward = op.kind == "bwd"
    flops = sum(2 * g.m * g.n * g.k * g.batch for g in km.layer_gemms(w, backward))
    rerun = backward and w.selective and w.layer.kind == "attention"
    if backward and w.redo or rerun:
        flops += sum(2 * g.m * g.n * g.k * g.batch for g in km.layer_gemms(w, False)[1 if rerun else 0:])
    want = op.flops
    if w.layer.kind == "attention":
        c, t, _ = w.in_shape
        times = (w.layer.bwd_ratio + (w.redo or rerun)) if backward else 1
        want -= 5 * (w.out[0] // (c // w.layer.heads)) * t * t * w.batch * times
    return flops, want


@pytest.mark.parametrize("model,parallel", [
    ("resnet-50", {"model_parallel": 2, "split": "spatial"}),
    ("alexnet", {"model_parallel": 4, "split": "spatial", "grid": [2, 2]}),
    ("gpt2", {"model_parallel": 2, "split": "spatial"}),
    ("gpt2", {"model_parallel": 4, "split": "tensor"}),
])
def test_op_work_reads_the_plans_slices_and_batch(model, parallel):
    """Every GEMM-kind op's GEMMs do exactly the FLOPs the Plan gave it."""
    p = plan(scenario(model=model, batch=16, topology="dgx-a100", parallel=parallel), check_memory=False)
    for op in p.ops:
        w = km.op_work(p, op)
        node = p.scenario.model.nodes[op.layer]
        if op.kind == "xfer":
            assert w is None
            continue
        assert w.batch == 16
        if node.layer.kind not in km.GEMM_KINDS:
            assert km.layer_gemms(w, op.kind == "bwd") == []
            continue
        flops, want = gemm_flops_of(p, op, w)
        assert flops == pytest.approx(want, rel=1e-12)


# one pre-LN block of GPT-2-medium's widths (1024 features, 1024 positions, a 4096-wide MLP) but
# 8 heads, so that a tensor split of 8 gives each slot one, and an untied head over 1000 words:
# under the tensor split its projection and MLP down projection are row-parallel (partial sums
# over a slice of their input channels)
SMALL_GPT = build_model("small-gpt", (1, 1024, 1), [
    make_layer("embedding", vocab=1000, dim=1024, positions=1024), make_layer("layernorm"),
    make_layer("attention", heads=8, causal=True), make_layer("conv2d", filters=1024, kernel=1),
    make_layer("add"), make_layer("layernorm"), make_layer("conv2d", filters=4096, kernel=1),
    make_layer("gelu"), make_layer("conv2d", filters=1024, kernel=1), make_layer("add"),
    make_layer("layernorm"), make_layer("lm_head", vocab=1000, tied=False), make_layer("softmax_xent")], 1000,
    ["emb", "ln1", "att", "proj", "res1", "ln2", "up", "gelu", "down", "res2", "lnf", "head", "loss"],
    [None, None, None, None, ("proj", "emb"), None, None, None, None, ("down", "res1"), None, None, None])


@pytest.mark.parametrize("m", [2, 4, 8])
@pytest.mark.parametrize("batch,micro,recompute", [(4, 1, False), (8, 1, False), (12, 1, False), (8, 8, False),
                                                   (12, 8, False), (12, 8, True), (12, 8, "selective")])
def test_tensor_split_ops_run_their_parts_gemms_at_no_less_than_the_roofline(m, batch, micro, recompute):
    """Under the tensor split every GEMM-kind op (row-parallel ones included) runs GEMMs of
    exactly its FLOPs over its micro-batch's samples (12 over 8 micro-batches: 2 and 1), and
    no compute op takes less than the per-op overhead plus its FLOPs at the tile rate."""
    sc = scenario(model="gpt2", batch=batch, topology="dgx-a100",
                  parallel={"model_parallel": m, "split": "tensor", "micro_batches": micro},
                  training={"recompute": recompute})
    p = plan(dataclasses.replace(sc, model=SMALL_GPT, dtype="fp16"), check_memory=False)
    assert any(p.parts[i] for i in range(len(SMALL_GPT.nodes)) if SMALL_GPT.nodes[i].layer.kind == "conv2d")
    sizes = [hi - lo for lo, hi in even_cuts(batch, micro)]
    dev = p.scenario.topology.devices[p.devices[0][0]]
    rate = dev.flops_per_s("fp16") * dev.efficiency
    for op in p.ops:
        if op.kind == "xfer":
            continue
        w = km.op_work(p, op)
        assert w.batch == sizes[op.micro]
        if w.layer.kind in km.GEMM_KINDS:
            flops, want = gemm_flops_of(p, op, w)
            assert flops == pytest.approx(want, rel=1e-12)
        t = op_seconds(p.scenario.topology, p.devices[0][op.slot], op.flops, op.bytes, "fp16",
                       op.kind == "bwd", cost_key(p, op), w)
        assert t >= dev.op_overhead + op.flops / rate * (1 - 1e-12)


def test_the_first_convolutions_backward_runs_its_weight_gradient_alone():
    """A layer reading the model's input: its backward's GEMMs are the weight gradient's
    (n x k from k x m and m x n), with no data gradient (cuDNN's first convolution)."""
    from sim.kernel_model import Gemm, LayerWork, layer_gemms
    conv = make_layer("conv2d", filters=64, kernel=7, stride=2, padding=3)
    work = LayerWork(conv, (3, 224, 224), 32, (64, 112, 112))
    m, n, k = 32 * 112 * 112, 64, 3 * 49
    assert layer_gemms(work, True) == [Gemm(m, k, n), Gemm(n, k, m)]
    assert layer_gemms(work._replace(input_grad=False), True) == [Gemm(n, k, m)]
    assert layer_gemms(work._replace(input_grad=False), False) == [Gemm(m, n, k)]
