"""``model.attention``: eager, Megatron's fused softmax, FlashAttention -- the kernel
model's attention ops in closed form against each other, other ops untouched, and the
score matrices the memory check keeps."""
import dataclasses

import pytest

from clustersim.core.config import ConfigError
from clustersim.core.models import zoo_model
from clustersim.core.plan import activation_elements, plan
from helpers import scenario
from sim import kernel_model as km
from sim.compute import op_seconds
from test_kernel_model import a100, one

ATT = zoo_model("gpt2", sequence=1024).nodes[2]          # 12 heads of 64, T 1,024, d 768
assert ATT.layer.kind == "attention"


def work(mode, batch=8):
    return km.LayerWork(ATT.layer, ATT.in_shape, batch, ATT.out_shape, attention=mode)


@pytest.mark.parametrize("backward", [False, True])
def test_fused_saves_exactly_its_score_passes_and_kernels_over_eager(backward):
    """Eager minus fused: (8.5 - 4.5) forward, (7.5 - 5.5) backward passes over the b x
    heads x T x T fp16 scores at the achievable bandwidth, and 2 kernels' overhead each way."""
    topo = one(a100(memory_efficiency=0.88))
    t = {m: op_seconds(topo, "g", 0.0, 0.0, "fp16", backward, "attention", work(m)) for m in ("eager", "fused")}
    passes = (8.5 - 4.5, 7.5 - 5.5)[backward]
    scores = 8 * 12 * 1024 * 1024 * 2
    assert t["eager"] - t["fused"] == pytest.approx(passes * scores / (2039e9 * 0.88) + 2 * 4e-6, rel=1e-9)


@pytest.mark.parametrize("backward", [False, True])
def test_flash_runs_at_least_its_flops_and_its_q_k_v_o_traffic_and_beats_fused(backward):
    """FlashAttention: never faster than its GEMMs' FLOPs at the tile rate (the backward with
    q k^T again) nor than reading q, k, v and writing the output once; faster than fused and
    eager at T = 1,024, whose score passes dominate."""
    topo = one(a100(memory_efficiency=0.88))
    w = work("flash")
    gemms = km.layer_gemms(w, backward)
    flops = sum(2 * g.m * g.n * g.k * g.batch for g in gemms) + (2 * 1024 * 1024 * 64 * 8 * 12 if backward else 0)
    t = op_seconds(topo, "g", 0.0, 0.0, "fp16", backward, "attention", w)
    assert t >= flops / (312e12 * 0.7)
    assert t >= (8 if backward else 4) * 8 * 768 * 1024 * 2 / (2039e9 * 0.88)
    fused = op_seconds(topo, "g", 0.0, 0.0, "fp16", backward, "attention", work("fused"))
    eager = op_seconds(topo, "g", 0.0, 0.0, "fp16", backward, "attention", work("eager"))
    assert t < fused < eager


def test_other_kinds_do_not_depend_on_the_attention_mode():
    topo = one(a100())
    for node in zoo_model("gpt2", sequence=128).nodes:
        if node.layer.kind == "attention":
            continue
        times = {op_seconds(topo, "g", 1e9, 1e8, "fp16", False, node.layer.kind,
                            km.LayerWork(node.layer, node.in_shape, 4, node.out_shape, attention=m))
                 for m in ("eager", "fused", "flash")}
        assert len(times) == 1, node.layer.kind


def test_memory_keeps_two_one_or_no_score_matrices_per_head():
    """Per sample and attention layer: eager keeps the scores and the probabilities (2 x heads
    x T^2), fused the probabilities, flash one log-sum-exp per head and position."""
    model = zoo_model("gpt2", sequence=256)
    kept = {}
    for mode in ("eager", "fused", "flash"):
        sc = dataclasses.replace(scenario(batch=1), model=model, attention=mode)
        kept[mode] = activation_elements(plan(sc, check_memory=False))[0][0]
    layers, heads, t = 12, 12, 256
    assert kept["eager"] - kept["fused"] == layers * heads * t * t
    assert kept["eager"] - kept["flash"] == layers * (2 * heads * t * t - heads * t)


def test_an_unknown_attention_is_refused_naming_the_field():
    from clustersim.core.scenario import scenario_from_dict
    with pytest.raises(ConfigError, match="t.toml: model.attention"):
        scenario_from_dict({"cluster": {"topology": "dgx-h100"}, "model": {"name": "gpt2", "attention": "paged"}},
                           "t.toml")
