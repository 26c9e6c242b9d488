"""Partitioning invariants: FLOPs and parameters over all slices equal the whole model's;
transfer volumes equal the cut sizes, checked against a brute-force reference."""
import numpy as np
import pytest

from clustersim.core.config import ConfigError
from clustersim.core.models import ZOO, build_model, make_layer as L, zoo_model
from clustersim.core.plan import plan
from helpers import scenario

SMALL = build_model("small", (3, 12, 12), [
    L("locally_connected", filters=4, kernel=3), L("relu"), L("max_pool", kernel=2), L("lcn", size=3),
    L("conv2d", filters=6, kernel=3, padding=1), L("lrn", size=3), L("avg_pool", kernel=2, stride=1),
    L("batchnorm"), L("maxout", pieces=2), L("dense", units=10), L("dropout", rate=0.5),
    L("tanh"), L("dense", units=5), L("softmax_xent")])


def needed_mask(layer, in_shape, box):
    """Reference: mark, output element by output element, the inputs it reads."""
    C, H, W = in_shape
    mask = np.zeros(in_shape, bool)
    (c0, c1), (h0, h1), (w0, w1) = box
    kind = layer.kind
    for c in range(c0, c1):
        for h in range(h0, h1):
            for w in range(w0, w1):
                if kind in ("dense", "conv2d"):
                    mask[:] = True
                elif kind in ("locally_connected", "max_pool", "avg_pool"):
                    k, s, p = layer.kernel, layer.stride, layer.padding
                    rows = slice(max(0, h * s - p), max(0, min(H, h * s - p + k)))
                    cols = slice(max(0, w * s - p), max(0, min(W, w * s - p + k)))
                    if kind == "locally_connected":
                        mask[:, rows, cols] = True
                    else:
                        mask[c, rows, cols] = True
                elif kind == "lrn":
                    mask[max(0, c - layer.size // 2):c + layer.size // 2 + 1, h, w] = True
                elif kind == "lcn":
                    r = layer.size // 2
                    mask[:, max(0, h - r):h + r + 1, max(0, w - r):w + r + 1] = True
                elif kind == "batchnorm":
                    mask[c, :, :] = True
                elif kind == "maxout":
                    mask[c * layer.pieces:(c + 1) * layer.pieces, h, w] = True
                else:
                    mask[c, h, w] = True
    return mask


def owned_mask(shape, box):
    mask = np.zeros(shape, bool)
    (c0, c1), (h0, h1), (w0, w1) = box
    mask[c0:c1, h0:h1, w0:w1] = True
    return mask


def small_scenario(m, split, replicas=1, micro=1, grid=None):
    par = {"model_parallel": m, "split": split, "replicas": replicas, "micro_batches": micro}
    sc = scenario(batch=4, parallel=par | ({"grid": list(grid)} if grid else {}))
    return sc.__class__(**{**sc.__dict__, "model": SMALL})


@pytest.mark.parametrize("split, m, grid", [(split, m, None) for split in ("spatial", "layers") for m in (1, 2, 3, 4)]
                         + [("spatial", r * c, (r, c)) for r, c in ((1, 2), (1, 3), (2, 2), (2, 3), (3, 2), (4, 2), (2, 4))]
                         + [("spatial", 6, None), ("spatial", 8, None)])
def test_transfer_volumes_equal_cut_sizes(split, m, grid):
    p = plan(small_scenario(m, split, grid=grid))
    model, db, batch = SMALL, 4, 4
    for i in range(1, len(model.nodes)):
        node, prev = model.nodes[i], model.nodes[i - 1]
        expected = 0
        for j, box in p.slices[i]:
            need = needed_mask(node.layer, node.in_shape, box)
            for k, kbox in p.slices[i - 1]:
                if k != j:
                    expected += int((need & owned_mask(prev.out_shape, kbox)).sum())
        sent = sum(op.bytes for op in p.ops if op.kind == "xfer" and op.layer == i and op.why != "gradient"
                   and op.why != "reduction")
        back = sum(op.bytes for op in p.ops if op.kind == "xfer" and op.layer == i and op.why == "gradient")
        assert sent == expected * batch * db, (i, node.layer.kind)
        assert back == sent                     # each activation's gradient goes back the way it came


@pytest.mark.parametrize("grid", [(2, 2), (1, 3), (3, 2)])
def test_blocks_tile_every_layer_once(grid):
    """Each layer's boxes are disjoint and cover its output; layers cut by rows are cut in
    grid blocks, the rest by channels, into at most rows x cols boxes."""
    p = plan(small_scenario(grid[0] * grid[1], "spatial", grid=grid))
    for node, sl, axis in zip(SMALL.nodes, p.slices, p.axes):
        cover = np.zeros(node.out_shape, int)
        for _, box in sl:
            cover += owned_mask(node.out_shape, box)
        assert (cover == 1).all(), node.name
        spatial = node.index < 4                   # locally_connected .. lcn; conv2d onwards by channels
        assert axis == (("blocks" if grid[1] > 1 else "rows") if spatial else "channels"), node.name
        if spatial:
            assert len({box[1] for _, box in sl}) == min(grid[0], node.out_shape[1])
            assert len({box[2] for _, box in sl}) == min(grid[1], node.out_shape[2])


@pytest.mark.parametrize("shapes, m, grid", [
    ([(4, 12, 12)], 4, (2, 2)), ([(4, 12, 12)], 8, (4, 2)), ([(4, 12, 12)], 9, (3, 3)),
    ([(4, 40, 10)], 4, (4, 1)), ([(4, 10, 40)], 4, (1, 4)), ([(4, 20, 10)], 8, (4, 2)),
    ([(4, 12, 12)], 7, (7, 1)), ([(4, 3, 40)], 8, (1, 8)), ([(4, 2, 3)], 8, (2, 4))])
def test_auto_grid_follows_the_aspect_ratio(shapes, m, grid):
    """Closed forms of the least halo perimeter (r-1) W + (c-1) H over r x c = m: square
    layers get the squarest grid (more rows on a tie), tall ones rows, wide ones columns;
    a prime m has only 1-D cuts; on a 2 x 3 layer 2 x 4 leaves the fewest slots idle."""
    from clustersim.core.partition import auto_grid
    c, h, w = shapes[0]
    model = build_model("a", (c, h + 2, w + 2), [L("locally_connected", filters=c, kernel=3)])
    assert auto_grid(model, m) == grid


def test_auto_grid_leaves_channel_cut_models_one_dimensional():
    from clustersim.core.partition import spatial_slices
    slices, axes = spatial_slices(zoo_model("alexnet"), 8)
    assert "blocks" not in axes and "rows" not in axes[:1]
    slices, axes = spatial_slices(zoo_model("distbelief-image-1.7b"), 81)
    assert axes[0] == "blocks" and len(slices[0]) == 81
    assert {b[1] for _, b in slices[0]} == {b[2] for _, b in slices[0]}      # 9 x 9 blocks of 91 x 91


# deeper copies of a model kept in make test: the same layout, widths all multiples of 3 and 4, the same
# vocabulary and context (gpt2: 1,024; megatron-1.7b: 2,048 -- gpt3-175b has 2,048, which the spatial
# and layers splits here never cut); make test-all plans them too
DEEPER_COPIES = {"gpt3-175b": "gpt2", "megatron-18.4b": "megatron-1.7b"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in DEEPER_COPIES else n
                                  for n in sorted(ZOO)])
@pytest.mark.parametrize("split, m", [("spatial", 1), ("spatial", 3), ("spatial", 4), ("layers", 2), ("layers", 3)])
def test_flops_and_parameters_over_slices_equal_the_model(name, split, m):
    sc = scenario(model=name, batch=2, parallel={"model_parallel": m, "split": split})
    p = plan(sc, check_memory=False)
    model = zoo_model(name)
    slots = [{j for j, _ in sl} for sl in p.slices]
    words = next((n.index for n in model.nodes if n.layer.kind == "embedding"), None)
    copies = sum(n.layer.vocab * n.in_shape[0] for n in model.nodes       # a tied head's table on its own stage
                 if n.layer.kind == "lm_head" and n.layer.tied and slots[n.index].isdisjoint(slots[words]))
    assert copies == 0 or split == "layers"
    assert sum(p.slot_params) == model.params + copies
    fwd = sum(op.flops for op in p.ops if op.kind == "fwd")
    bwd = sum(op.flops for op in p.ops if op.kind == "bwd")
    assert fwd == pytest.approx(model.fwd_flops * 2, rel=1e-12)
    assert bwd == pytest.approx(model.bwd_flops * 2, rel=1e-12)


def test_ops_are_topologically_ordered_and_microbatches_split_the_batch():
    p = plan(small_scenario(3, "layers", micro=4))
    assert all(d < op.id for op in p.ops for d in op.deps)
    assert {op.micro for op in p.ops} == {0, 1, 2, 3}
    fwd = sum(op.flops for op in p.ops if op.kind == "fwd")
    assert fwd == pytest.approx(SMALL.fwd_flops * 4)


def test_pipeline_sends_whole_activations_only_between_stages():
    p = plan(small_scenario(2, "layers"))
    stage_of = {i: sl[0][0] for i, sl in enumerate(p.slices)}
    boundaries = [i for i in range(1, len(SMALL.nodes)) if stage_of[i] != stage_of[i - 1]]
    assert len(boundaries) == 1
    [b] = boundaries
    sent = [op for op in p.ops if op.kind == "xfer" and op.why == "stage"]
    assert [op.layer for op in sent] == [b]
    assert sent[0].bytes == np.prod(SMALL.nodes[b].in_shape) * 4 * 4


def test_ps_shares_cover_every_parameter_once():
    sc = scenario(model="distbelief-speech", batch=8, parallel={"model_parallel": 2, "replicas": 2, "ps_shards": 3})
    p = plan(sc)
    assert [sum(row) for row in p.ps.share] == list(p.slot_params)
    assert sum(p.ps.sizes) == sc.model.params


SMALL_GPU = """
name = "small-gpu"
[machine.cpu]
cores = 8
core_gflops = 10
memory_gib = 64
memory_bandwidth_gbps = 50
[machine.gpu]
count = 2
peak_tflops_fp32 = 10
memory_gib = 8
memory_bandwidth_gbps = 500
"""


def test_model_that_does_not_fit_names_the_device(tmp_path):
    (tmp_path / "small.toml").write_text(SMALL_GPU)
    # 1.7B parameters: 13.6 GB of weights and gradients on one 8 GiB GPU
    sc = scenario(topology="small.toml", model="distbelief-image-1.7b", batch=1, file=str(tmp_path / "s.toml"))
    with pytest.raises(ConfigError, match=r"does not fit: device m0\.gpu0 needs 12\.\d+ GiB") as err:
        plan(sc)
    assert err.value.field == "parallel.model_parallel"
    # split over both GPUs it still needs ~6.4 GiB each: fits
    sc2 = scenario(topology="small.toml", model="distbelief-image-1.7b", batch=1, file=str(tmp_path / "s.toml"),
                   parallel={"model_parallel": 2})
    assert max(sum(u.values()) for u in plan(sc2).memory.values()) < 8 * 2**30


def test_more_partitions_than_devices_is_refused():
    with pytest.raises(ConfigError) as err:
        plan(scenario(parallel={"model_parallel": 4, "replicas": 3}))
    assert err.value.field == "parallel" and "model_parallel x replicas = 12 devices" in str(err.value)


@pytest.mark.parametrize("parallel, message", [
    ({"model_parallel": 4, "grid": [2, 3]}, "2 x 3 blocks need model_parallel = 6"),
    ({"model_parallel": 4, "grid": [4]}, "two integers"),
    ({"model_parallel": 4, "grid": [2, 2], "split": "layers"}, "blocks are a spatial split"),
    ({"schedule": "zigzag"}, "must be one of 1f1b, gpipe")])
def test_pipeline_schedule_and_grid_are_checked(parallel, message):
    with pytest.raises(ConfigError, match=message) as err:
        scenario(parallel=parallel)
    assert err.value.field in ("parallel.grid", "parallel.schedule")


# --- graphs ------------------------------------------------------------------------------------
def graph_needed_mask(model, c, q, box):
    """Reference for the inputs of any layer: what output ``box`` of layer c reads of its
    input q, element by element (add: the same elements; concat: its channels, shifted)."""
    node = model.nodes[c]
    shape = node.in_shapes[q]
    if node.layer.kind == "add":
        return owned_mask(shape, box)
    if node.layer.kind == "concat":
        offset = sum(s[0] for s in node.in_shapes[:q])
        mask = np.zeros(node.in_shape, bool)
        mask[box[0][0]:box[0][1], box[1][0]:box[1][1], box[2][0]:box[2][1]] = True
        return mask[offset:offset + shape[0]]
    return needed_mask(node.layer, shape, box)


@pytest.mark.parametrize("split, m, micro", [("spatial", 2, 1), ("spatial", 3, 2), ("spatial", 4, 1), ("layers", 3, 2)])
def test_a_graph_edge_crossing_slots_is_one_transfer_per_destination(split, m, micro):
    """Brute force over every reader of every layer: where readers on slot j read elements
    of a layer's box on slot k != j, one transfer k -> j per micro-batch carries them (and
    one carries their gradient back), holding every element read and nothing outside k's
    box -- exactly the elements read where one layer reads them; nowhere else a transfer."""
    from test_partitioned import RESIDUAL, make_plan
    p = make_plan(RESIDUAL, m, split, micro, batch=4)
    read: dict[tuple[int, int, int], np.ndarray] = {}
    readers: dict[tuple[int, int, int], set[int]] = {}
    for c, node in enumerate(RESIDUAL.nodes):
        for j, box in p.slices[c]:
            for q, src in enumerate(node.inputs):
                if src < 0:
                    continue
                need = graph_needed_mask(RESIDUAL, c, q, box)
                for k, kbox in p.slices[src]:
                    hit = need & owned_mask(RESIDUAL.nodes[src].out_shape, kbox)
                    if k != j and hit.any():
                        read[(src, k, j)] = read.get((src, k, j), False) | hit
                        readers.setdefault((src, k, j), set()).add(c)
    micro_sizes = {mb: 4 // micro + (mb < 4 % micro) for mb in range(micro)}
    for why, key_of in (("fwd", lambda op: (op.producer, op.slot, op.dst)),
                        ("gradient", lambda op: (op.producer, op.dst, op.slot))):
        sent: dict[tuple, list[float]] = {}
        for op in p.ops:
            if op.kind == "xfer" and op.why != "reduction" and (op.why == "gradient") == (why == "gradient"):
                sent.setdefault((*key_of(op), op.micro), []).append(op.bytes / micro_sizes[op.micro] / 4)
        assert sorted(sent) == sorted((*key, mb) for key in read for mb in range(micro)), why
        for (src, k, j, mb), sizes in sent.items():
            assert len(sizes) == 1                                  # once per destination
            kbox = dict(p.slices[src])[k]
            assert read[(src, k, j)].sum() <= sizes[0] <= np.prod([b - a for a, b in kbox])
            if len(readers[(src, k, j)]) == 1:
                assert sizes[0] == read[(src, k, j)].sum()
    if split == "spatial":                                       # the case this is about: several readers
        assert any(len(r) > 1 for r in readers.values())


def test_a_layers_backward_waits_for_every_layer_reading_it():
    """In a graph the backward of a layer depends (directly, or through the transfer of
    their gradients) on the backward of every layer that reads it, on any slot."""
    from test_partitioned import RESIDUAL, make_plan
    p = make_plan(RESIDUAL, 2, "spatial", batch=4)
    bwd = {(op.layer, op.slot): op for op in p.ops if op.kind == "bwd"}

    def before(op):                                 # every op it transitively depends on
        seen, todo = set(), list(op.deps)
        while todo:
            d = todo.pop()
            if d not in seen:
                seen.add(d)
                todo += p.ops[d].deps
        return seen
    for (i, j), op in bwd.items():
        deps = before(op)
        for c in RESIDUAL.consumers[i]:
            assert any(bwd[(c, k)].id in deps for k, _ in p.slices[c]), (i, c)
    assert [RESIDUAL.nodes[i].label for i in range(len(RESIDUAL.nodes)) if len(RESIDUAL.consumers[i]) > 1] == ["r1", "p"]


def test_resnet_50_plans_quickly_on_eight_replicas_and_fits_an_h100():
    """The quickstart's dgx-h100 with ResNet-50 at batch 32 per GPU, 8 replicas: one slot
    each, a layer's backward after its readers' (the residual adds), and the allreduce's
    buckets cover every parameter."""
    from clustersim.core.plan import buckets
    sc = scenario(model="resnet-50", batch=32, parallel={"replicas": 8})
    p = plan(sc)
    assert p.slot_params == (25_557_032,) and p.sync == "allreduce"
    assert sum(n for _, n in buckets(p, 0)) == 25_557_032
    assert len(p.ops) == 2 * len(sc.model.nodes) and not any(op.kind == "xfer" for op in p.ops)
    assert max(sum(u.values()) for u in p.memory.values()) < 80 * 2**30


# --- transformers: memory as trainers count it, pipelines of tensor-parallel slices -------------
def gpt2_scenario(**kw):
    parallel = {"model_parallel": 2, **kw.pop("parallel", {})}
    training = kw.pop("training", {})
    from clustersim.core.scenario import scenario_from_dict
    data = {"cluster": {"topology": "dgx-h100"}, "parallel": parallel, "training": training,
            "model": {"name": kw.pop("name", "gpt2"), "batch_size": kw.pop("batch", 4), "sequence": kw.pop("sequence", 64),
                      "dtype": kw.pop("dtype", "bf16")}}
    return scenario_from_dict(data, "test.toml")


def test_state_bytes_closed_forms():
    """16 bytes per parameter with Adam in 16-bit (2 + 2 + 12, ZeRO's count), 8 with SGD
    (fp32 master weights), fp32 SGD as before (4 + 4); ZeRO shards over the replicas."""
    from clustersim.core.plan import state_bytes
    def total(**kw):
        return state_bytes(gpt2_scenario(**kw))
    assert total(dtype="bf16", training={"optimizer": "adam"}) == {"weights": 2, "gradients": 2, "optimizer": 12}
    assert total(dtype="fp16") == {"weights": 2, "gradients": 2, "optimizer": 4}
    assert total(dtype="fp32") == {"weights": 4, "gradients": 4, "optimizer": 0}
    assert total(dtype="fp32", training={"optimizer": "adam"}) == {"weights": 4, "gradients": 4, "optimizer": 8}
    # fp64: moments in 8 bytes, as the update moves them (memory counted 4)
    assert total(dtype="fp64", training={"optimizer": "adam"}) == {"weights": 8, "gradients": 8, "optimizer": 16}
    for zero, want in ((1, (2, 2, 1.5)), (2, (2, 0.25, 1.5)), (3, (0.25, 0.25, 1.5))):
        got = total(parallel={"replicas": 8}, training={"optimizer": "adam", "zero": zero})
        assert (got["weights"], got["gradients"], got["optimizer"]) == want


def test_memory_terms_sum_to_the_model_and_name_the_largest():
    p = plan(gpt2_scenario(training={"optimizer": "adam"}), check_memory=False)
    row = p.devices[0]
    for term, nbytes in (("weights", 2), ("gradients", 2), ("optimizer", 12)):
        assert sum(p.memory[d][term] for d in row) == 124_439_808 * nbytes
    sc = gpt2_scenario(batch=8192, training={"optimizer": "adam"})
    with pytest.raises(ConfigError, match=r"does not fit: device m0\.gpu0 needs [\d.]+ GiB .* largest: activations"):
        plan(sc)


def test_recompute_keeps_boundaries_and_reruns_the_forward():
    from clustersim.core.plan import boundaries
    assert all(boundaries(SMALL))
    gpt = zoo_model("gpt2", sequence=16)
    cut = boundaries(gpt)
    kinds = {gpt.nodes[i].layer.kind for i, b in enumerate(cut) if b}
    assert kinds == {"embedding", "add", "layernorm", "lm_head", "softmax_xent"}   # the residual stream, the head
    assert not any(b for i, b in enumerate(cut) if gpt.nodes[i].layer.kind in ("attention", "gelu"))
    plain, redo = (plan(gpt2_scenario(training={"recompute": r}), check_memory=False) for r in (False, True))
    from clustersim.core.plan import reruns
    again = reruns(redo.scenario.model)       # Megatron reruns the blocks, not the embedding, final norm, head, loss
    assert [n.layer.kind for n, a in zip(redo.scenario.model.nodes, again) if not a] == [
        "embedding", "layernorm", "lm_head", "softmax_xent"]
    for a, b in zip(plain.ops, redo.ops):
        if a.kind == "bwd":
            fwd_flops = plain.ops[[o.id for o in plain.ops if o.kind == "fwd" and (o.layer, o.slot, o.micro)
                                   == (a.layer, a.slot, a.micro)][0]].flops
            assert b.flops == pytest.approx(a.flops + again[a.layer] * fwd_flops, rel=1e-12)
    dev = plain.devices[0][0]
    assert redo.memory[dev]["activations"] < plain.memory[dev]["activations"]   # closed forms: below


def test_full_recompute_keeps_a_transformer_layers_input_only():
    """Korthikanti et al. 2022 (full recomputation) keep each transformer layer's input, 2sbh
    bytes in 16 bits; the block's first residual sum, a boundary too, was kept as well (+100%
    on the stored checkpoints, a new-user sweep found).  Graphs without blocks keep every
    ceil(sqrt(n))-th of their n boundaries and the last (Chen et al. 2016)."""
    from math import prod

    from clustersim.core.plan import activation_elements, boundaries, checkpoints
    p = plan(gpt2_scenario(parallel={"model_parallel": 1}, training={"recompute": True}), check_memory=False)
    model = p.scenario.model
    keep = checkpoints(model)
    adds = [i for i, n in enumerate(model.nodes) if n.layer.kind == "add"]
    assert len(adds) == 24 and [i for i in adds if keep[i]] == adds[1::2]     # each block's output
    assert sum(keep) == 1 + 12 + 3                     # the embedding, 12 blocks, final norm, head, loss
    kept, _ = activation_elements(p)
    t, d, vocab = 64, 768, 50257                       # per sample: 13 residual checkpoints, the token ids, the
    assert kept[0] == 13 * d * t + t + d * t + vocab * t    # head's input and the loss's probabilities (not rerun)
    assert sum(prod(model.nodes[i].out_shape) for i in adds[1::2]) == 12 * d * t
    assert boundaries(SMALL) == [True] * 14                # a chain: 14 boundaries, segments of 4
    assert [i for i, k in enumerate(checkpoints(SMALL)) if k] == [3, 7, 11, 13]


def test_full_recompute_of_a_chain_keeps_less_than_none():
    """AlexNet, a chain: checkpointing every layer would keep each layer's output -- more than
    no recomputation, which keeps only what backward passes read (it did: 6.74 against
    6.01 GiB at batch 1,024).  Segments of ceil(sqrt(n)) layers keep less, and the working set
    is the largest segment's activations."""
    from math import ceil, sqrt

    from clustersim.core.plan import activation_elements, boundaries, checkpoints
    plain, full = (activation_elements(plan(scenario(model="alexnet", batch=64, training={"recompute": r}),
                                            check_memory=False)) for r in (False, True))
    model = zoo_model("alexnet")
    n = sum(boundaries(model))
    k = ceil(sqrt(n))
    assert n > 16 and sum(checkpoints(model)) == n // k + (n % k > 0)
    assert sum(full[0]) + max(full[1]) < sum(plain[0])


@pytest.mark.parametrize("name", ["mlp-digits", "distbelief-speech", "distbelief-image-1.7b", "resnet-digits",
                                  "gpt-tiny"])
def test_full_recompute_never_keeps_more_than_none(name):
    """What is kept plus the working set under full recomputation is at most what no
    recomputation keeps (a checkpoint's output counted once; review R23 found small chains and
    the image models keeping more)."""
    from clustersim.core.plan import activation_elements
    total = {}
    for r in (False, True):
        kept, work = activation_elements(plan(scenario(model=name, batch=1, training={"recompute": r}),
                                              check_memory=False))
        total[r] = sum(kept) + max(work)
    assert total[True] <= total[False]


def test_a_stage_keeps_its_received_input_once_however_many_layers_read_it():
    """BERT's stage cut falls after a block's output norm, which the next attention and the
    next sum both read: one transfer, one buffer kept under full recomputation (it was kept
    once a reader)."""
    from clustersim.core.plan import activation_elements
    kept = {}
    for m in (1, 2):
        p = plan(gpt2_scenario(parallel={"split": "layers", "model_parallel": m}, training={"recompute": True},
                               name="bert-large", sequence=16), check_memory=False)
        kept[m] = sum(activation_elements(p)[0])
        per_sample = p.scenario.batch_size * p.scenario.dtype_bytes
        received = sum(o.bytes for o in p.ops if o.kind == "xfer" and o.why == "stage") / per_sample
    assert received == 1024 * 16 and kept[2] == kept[1] + received


def test_with_recompute_a_pipeline_stage_keeps_what_it_receives():
    """A stage reruns its forward from its input; where the cut falls inside a block (here at a
    block's first sum, not a checkpoint) neither side kept that activation.  The
    first stage keeps the token ids too, the last the head's input and the loss's
    probabilities (Megatron reruns neither the embedding nor the head)."""
    from math import prod

    from clustersim.core.plan import activation_elements, checkpoints, reruns
    p = plan(gpt2_scenario(parallel={"split": "layers", "model_parallel": 3}, training={"recompute": True}),
             check_memory=False)
    model = p.scenario.model
    keep, again = checkpoints(model), reruns(model)
    kept, _ = activation_elements(p)
    per_sample = p.scenario.batch_size * p.scenario.dtype_bytes
    t, d, vocab = 64, 768, 50257
    for slot, outside in enumerate((d * t + t, 0, d * t + vocab * t)):
        own = sum(prod(model.nodes[i].out_shape) for i, sl in enumerate(p.slices)
                  if keep[i] and again[i] and any(j == slot for j, _ in sl))
        received = sum(o.bytes for o in p.ops if o.kind == "xfer" and o.why == "stage" and o.dst == slot) / per_sample
        assert kept[slot] == pytest.approx(own + received + outside, rel=1e-12) and (received > 0) == (slot > 0)


def test_recompute_allreduces_a_tensor_splits_partial_sums_again():
    """Megatron's recomputation reruns the forward, its tensor allreduces included (2 a
    block); the Plan carried the recomputed FLOPs but not those sends (decision 023).  Every
    partial sum not kept at a checkpoint (the blocks' projections, not the vocabulary-parallel
    embedding) is allreduced again, the forward's bytes, before its own backward and after
    what that backward waits for; without recompute, none."""
    from clustersim.core.plan import checkpoints
    plain, redo = (plan(gpt2_scenario(parallel={"split": "tensor"}, training={"recompute": r}), check_memory=False)
                   for r in (False, True))
    kept = checkpoints(redo.scenario.model)

    def sent(p, why, keep=None):
        return sum(o.bytes for o in p.ops if o.kind == "xfer" and o.why == why
                   and (keep is None or kept[o.producer] == keep))
    assert not any(o.why.startswith("recompute") for o in plain.ops)
    for what in ("reduce-scatter", "all-gather"):
        assert sent(redo, "recompute " + what) == sent(redo, what, keep=False) > 0
        assert sent(redo, what, keep=True) > 0                     # the embedding's: kept, not sent again
        assert sent(redo, what) == sent(plain, what)
    for o in redo.ops:
        if o.why == "recompute all-gather":
            [reader] = [b for b in redo.ops if b.kind == "bwd" and o.id in b.deps]
            assert (reader.slot, reader.layer, reader.micro) == (o.dst, o.producer, o.micro)
        if o.why == "recompute reduce-scatter":          # after the gradient of the sum it redoes
            assert any(redo.ops[d].kind == "bwd" and redo.ops[d].layer > o.producer for d in o.deps)
    # sequence parallelism: the forward only reduce-scatters its sums (positions stay cut), and so
    # does the recomputed forward; its all-gathers of positions are "activation" sends, not redone
    sp = plan(gpt2_scenario(parallel={"split": "tensor", "sequence_parallel": True}, training={"recompute": True}),
              check_memory=False)
    assert sent(sp, "recompute reduce-scatter") == sent(sp, "reduce-scatter", keep=False) > 0
    assert sent(sp, "recompute all-gather") == sent(sp, "all-gather") == 0


def test_pipeline_of_tensor_slices():
    """pipeline 2 x tensor 2: four slots, slot j in stage j // 2; parameters and FLOPs add up
    to the model's (with the tied head's copy of the word table on the last stage, 50,257 x
    768); transfers between stages are 'stage', inside one 'activation'."""
    p = plan(gpt2_scenario(parallel={"pipeline": 2}), check_memory=False)
    assert p.slots == 4 and len(p.devices[0]) == 4 and sum(p.slot_params) == 124_439_808 + 50_257 * 768
    from clustersim.core.plan import stages_of
    stage, stages = stages_of(p.scenario, p.slices)
    assert stages == 2 and stage == {0: 0, 1: 0, 2: 1, 3: 1}
    model = p.scenario.model
    assert sum(op.flops for op in p.ops if op.kind == "fwd") == pytest.approx(model.fwd_flops * 4, rel=1e-12)
    for op in p.ops:
        if op.kind == "xfer" and op.why != "reduction":
            assert (op.why == "stage") == (op.slot // 2 != op.dst // 2) or op.why == "gradient" \
                or op.why.startswith("embedding gradient")                    # the tied head's copy
    assert {op.why for op in p.ops if op.kind == "xfer"} >= {"stage", "activation", "gradient"}


def test_layers_split_with_pipeline_is_refused():
    with pytest.raises(ConfigError, match="parallel.pipeline: a layers split"):
        gpt2_scenario(parallel={"split": "layers", "pipeline": 2})


def test_data_parallel_bytes_closed_forms():
    from clustersim.core.plan import data_parallel_bytes
    for zero, passes in ((0, 2), (1, 2), (3, 3)):
        p = plan(gpt2_scenario(parallel={"replicas": 4}, training={"zero": zero}), check_memory=False)
        sent = data_parallel_bytes(p)
        assert [sum(d.values()) for d in sent] == pytest.approx([passes * 0.75 * n * 2 for n in p.slot_params])


@pytest.mark.parametrize("sets, size", [
    (["model.dtype=fp32"], 4), (["model.dtype=fp16"], 2), (["model.dtype=bf16"], 2), (["model.dtype=fp64"], 8),
    (["model.dtype=fp16", "training.gradient_dtype=fp32"], 4),
    (["model.dtype=bf16", "training.gradient_dtype=fp32", "training.zero=1"], 3),     # fp32 scatter, bf16 gather
    (["model.dtype=bf16", "training.algorithm=local", "training.local_steps=5"], 4 / 5)])   # fp32 weights, 1 in 5
def test_the_simulated_exchange_sends_what_the_plan_counts(sets, size):
    """One rule for a gradient's bytes in the simulator, ``clustersim plan`` and the memory
    check (decision 061): pure data parallelism moves nothing but the replicas' exchange, so
    the simulated bytes a step are the replicas' ``data_parallel_bytes``, ring volumes of
    ``size`` bytes a value (a value's gradient and weight under ZeRO, half of each a pass;
    local SGD's fp32 weights every k steps)."""
    from clustersim.core.plan import data_parallel_bytes
    from clustersim.core.scenario import load_scenario, parse_set
    from sim.engine import simulate
    steps = 10
    p = plan(load_scenario("scenarios/quickstart.toml", parse_set(sets + ["parallel.replicas=4",
                                                                            f"training.steps={steps}"])))
    [sent] = data_parallel_bytes(p)
    assert sum(sent.values()) == pytest.approx(2 * 0.75 * p.slot_params[0] * size)
    res = simulate(p)
    moved = sum(s.bytes for s in res.trace.spans if s.kind == "transfer") / steps
    assert moved == pytest.approx(4 * sum(sent.values()))


@pytest.mark.parametrize("machines, replicas", [(2, 16), (4, 32)])
def test_a_ring_across_machines_counts_each_message_once_and_each_link_it_crosses(machines, replicas):
    """U36: a ring channel crossing machines runs GPU -> NIC -> next GPU, two spans of the
    same bytes, and ``bytes_per_step`` added both (dgx-h100-fat-tree on 2 machines: 1.125x
    the ring's n x 2(n-1)/n x S).  The NIC's hop is not a message; the links see both."""
    from clustersim.core.metrics import relays, summarize
    from clustersim.core.plan import data_parallel_bytes
    from clustersim.core.scenario import load_scenario, parse_set
    from sim.engine import simulate
    p = plan(load_scenario("scenarios/quickstart.toml", parse_set([
        "cluster.topology=dgx-h100-fat-tree", f"cluster.machines={machines}", f"parallel.replicas={replicas}",
        "training.allreduce=ring", "training.steps=2"])))
    res = simulate(p)
    [sent] = data_parallel_bytes(p)
    out = summarize(p, res)
    assert out["bytes_per_step"] == pytest.approx(replicas * sum(sent.values()))
    assert out["bytes_per_step"] == pytest.approx(replicas * 2 * (replicas - 1) / replicas * p.slot_params[0] * 4)
    relayed = relays(p.scenario.topology)
    hops = [(s.bytes, *s.where.split("->")) for s in res.trace.spans if s.kind == "transfer"]
    out_of = [b for b, src, _ in hops if src in relayed]
    into = sum(b for b, _, dst in hops if dst in relayed)
    assert out_of and sum(out_of) == pytest.approx(into)     # a relay passes on what it got
    assert sum(res.trace.link_bytes().values()) > out["bytes_per_step"] * 2     # links carry both hops


def test_summarize_finds_the_relays_once_not_once_a_span(monkeypatch):
    """fc11e4d asked for the topology's relays inside the sum over spans: one step of
    alexnet on 1,024 GPUs took 43.6 s to summarise where it takes 1.2 s in all."""
    from clustersim.core import metrics
    from clustersim.core.scenario import load_scenario, parse_set
    from sim.engine import simulate
    p = plan(load_scenario("scenarios/quickstart.toml", parse_set(["parallel.replicas=4", "training.steps=2"])))
    res = simulate(p)
    calls = []
    real = metrics.relays
    monkeypatch.setattr(metrics, "relays", lambda topo: calls.append(1) or real(topo))
    metrics.summarize(p, res)
    assert len(res.trace.spans) > 10 and len(calls) == 1


def test_buckets_fill_to_bucket_mb_of_gradient_bytes():
    """DDP fills its 25 MiB buckets with gradients as they are kept: fp16 gradients fill
    twice the parameters of fp32 ones a bucket."""
    from clustersim.core.plan import buckets
    sizes = {}
    for g in ("fp16", "fp32"):
        p = plan(scenario(model="alexnet", batch=8, parallel={"replicas": 2},
                          training={"gradient_dtype": g, "bucket_mb": 8}), check_memory=False)
        sizes[g] = [n for _, n in buckets(p, 0)]
        assert all(n * {"fp16": 2, "fp32": 4}[g] >= 8 * 2**20 for n in sizes[g][:-1])
    assert len(sizes["fp16"]) < len(sizes["fp32"])


@pytest.mark.slow
def test_gpt3_on_1024_h100s_fits_with_16_stages_and_not_without():
    """Issue 17's done-when: GPT-3 175B, bf16, batch 8 of 2,048 positions, tensor 8 x
    pipeline 16 x 8 replicas on 128 DGX H100s fits in 80 GiB; one stage does not."""
    base = ["model.name=gpt3-175b", "model.dtype=bf16", "model.batch_size=8", "cluster.topology=dgx-h100-fat-tree",
            "cluster.machines=128", "parallel.model_parallel=8", "parallel.replicas=8"]
    from clustersim.core.scenario import load_scenario, parse_set
    p = plan(load_scenario("scenarios/quickstart.toml", parse_set(base + ["parallel.pipeline=16"])))
    assert p.slots == 128 and max(sum(u.values()) for u in p.memory.values()) < 80 * 2**30
    with pytest.raises(ConfigError, match=r"device m0\.gpu0 needs \d+\.\d+ GiB"):
        plan(load_scenario("scenarios/quickstart.toml", parse_set(base + ["parallel.pipeline=1"])))


@pytest.mark.parametrize("m", [1, 2])
def test_a_tensor_read_on_its_own_slot_is_kept_once(m):
    """A relu chain on (4, 6, 6) whose last output two gelus read, summed: kept per sample are
    each relu's output (its backward reads it, as PyTorch's threshold_backward does), the last
    one once for both gelus (which read their input), and neither the model's input, the
    gelus' outputs nor the sum (no backward reads them) -- 3 boxes on one slot; cut in m row
    stripes each slot keeps its stripes and, where a layer reads another slot, nothing more
    (an element-wise chain reads only its own rows)."""
    import dataclasses
    from clustersim.core.plan import activation_elements
    names = ["r1", "r2", "r3", "g1", "g2", "sum"]
    model = build_model("chain", (4, 6, 6), [L("relu"), L("relu"), L("relu"), L("gelu"), L("gelu"), L("add")],
                        0, names, [None, None, None, ("r3",), ("r3",), ("g1", "g2")])
    p = plan(dataclasses.replace(scenario(parallel={"model_parallel": m}), model=model), check_memory=False)
    kept, _ = activation_elements(p)
    assert sum(kept) == 3 * 4 * 6 * 6


def test_each_kind_keeps_what_its_backward_reads():
    """A chain conv -> max pool -> dropout -> avg pool -> relu -> tanh -> dense -> loss, as
    PyTorch's autograd saves it: the conv keeps its input (the model's), both pools theirs,
    relu and tanh their outputs, the dense its input (tanh's) and the loss its probabilities,
    the dropout its mask (a byte an element: a quarter of an fp32 element); the max pool's,
    the avg pool's and the dense's outputs are read by no backward (dropout, relu and the
    loss read no input) and are not kept."""
    import dataclasses
    from math import prod

    from clustersim.core.plan import activation_elements
    kinds = [L("conv2d", filters=4, kernel=3, padding=1), L("max_pool", kernel=2), L("dropout", rate=0.5),
             L("avg_pool", kernel=2), L("relu"), L("tanh"), L("dense", units=10), L("softmax_xent")]
    model = build_model("kinds", (3, 8, 8), kinds, 10)
    p = plan(dataclasses.replace(scenario(), model=model), check_memory=False)
    out = {n.layer.kind: prod(n.out_shape) for n in model.nodes}
    assert p.scenario.dtype_bytes == 4
    assert sum(activation_elements(p)[0]) == (3 * 8 * 8 + out["conv2d"] + out["dropout"] + out["relu"] + out["tanh"]
                                              + out["softmax_xent"] + out["dropout"] / 4)


@pytest.mark.parametrize("t, sp", [(1, False), (2, False), (4, False), (2, True), (4, True)])
def test_a_gpt_block_keeps_korthikantis_activations_less_the_masks(t, sp, monkeypatch):
    """Korthikanti et al. 2022 (section 4.1, eq. 1-3) count a GPT layer's activations in
    16-bit bytes as s b h (34 + 5 a s / h), tensor t: s b h (10 + 24 / t + 5 a s / h t), with
    sequence parallelism s b h (34 + 5 a s / h) / t.  Less their dropout masks (2 s b h + a
    s^2 b bytes), which the zoo's GPT has no dropout for, per sample the elements are 16 s h +
    2 a s^2, 4 s h + (12 s h + 2 a s^2) / t and (16 s h + 2 a s^2) / t: the two score copies
    they count (the softmax's output and its dropped copy) are eager attention's two here (the
    scores and the probabilities, ``SCORE_COPIES``).  Pipelines of 2 and 4 stages keep the
    same in all (a stage's received input is a buffer of its own, a review found).  One block is the difference
    of a 2- and a 1-layer model; a projection's output, read only by the residual sum, is not
    kept (it was: 18 s h)."""
    from clustersim.core import models
    from clustersim.core.plan import activation_elements
    from test_tensor_parallel import tensor_plan
    s, h, a = 16, 64, 4
    kept = []
    for layers in (1, 2):
        monkeypatch.setitem(models.TRANSFORMERS, f"gpt-{layers}", models.Transformer(layers, h, a, 50, s))
        p = tensor_plan(zoo_model(f"gpt-{layers}", sequence=s), t, batch=1, sp=sp)
        kept.append(activation_elements(p)[0])
    want = (16 * s * h + 2 * a * s * s) / t if sp else 4 * s * h + (12 * s * h + 2 * a * s * s) / t
    assert [two - one for one, two in zip(*kept)] == [want] * t
    masked = []                             # with dropout after both projections: their masks, 2 s b h bytes
    for layers in (1, 2):
        monkeypatch.setitem(models.TRANSFORMERS, f"gpt-{layers}", models.Transformer(layers, h, a, 50, s, dropout=0.1))
        p = tensor_plan(zoo_model(f"gpt-{layers}", sequence=s), t, batch=1, sp=sp)
        masked.append(activation_elements(p)[0])
    assert [two - one for one, two in zip(*masked)] == [want + 2 * s * h / (t if sp else 1) / p.scenario.dtype_bytes] * t
    for stages in [n for n in (2, 4) if t > 1 and t * n <= 8]:            # on one DGX H100
        monkeypatch.setitem(models.TRANSFORMERS, "gpt-4", models.Transformer(4, h, a, 50, s))
        one, staged = (activation_elements(tensor_plan(zoo_model("gpt-4", sequence=s), t, pipeline=n, batch=1,
                                                       sp=sp))[0] for n in (1, stages))
        assert sum(staged) == sum(one)


@pytest.mark.parametrize("t, sp", [(1, False), (4, False), (4, True)])
def test_selective_recompute_keeps_no_score_matrices_and_reruns_their_flops(t, sp, monkeypatch):
    """Korthikanti et al. 2022 (section 5): selective recomputation keeps a GPT layer's
    activations but the attention's score matrices, s b h 34 / t with sequence parallelism
    (eq. 6), and reruns what made them before the backward: q k^T and p v (4 b s^2 h FLOPs a
    layer) and the softmax (5 a FLOPs a score here).  Per sample a block keeps 16 s h / t
    elements with sequence parallelism, 4 s h + 12 s h / t without; one layer's eager score
    matrices (2 a s^2 / t) are the working set."""
    from clustersim.core import models
    from clustersim.core.plan import activation_elements
    from test_tensor_parallel import tensor_plan
    s, h, a, batch = 16, 64, 4, 2
    kept, work, extra = [], [], []
    for layers in (1, 2):
        monkeypatch.setitem(models.TRANSFORMERS, f"gpt-{layers}", models.Transformer(layers, h, a, 50, s))
        model = zoo_model(f"gpt-{layers}", sequence=s)
        plain, sel = (tensor_plan(model, t, batch=batch, sp=sp, training={"recompute": r}) for r in (False, "selective"))
        k, w = activation_elements(sel)
        kept.append(k)
        work.append(w)
        extra.append(sum(o.flops for o in sel.ops if o.kind == "bwd") - sum(o.flops for o in plain.ops if o.kind == "bwd"))
        assert [o.why for o in sel.ops if o.kind == "xfer"] == [o.why for o in plain.ops if o.kind == "xfer"]
    assert [two - one for one, two in zip(*kept)] == [16 * s * h / t if sp else 4 * s * h + 12 * s * h / t] * t
    assert work[0] == work[1] == [2 * a * s * s / t] * t
    assert extra[1] - extra[0] == pytest.approx(batch * (4 * s * s * h + 5 * a * s * s), rel=1e-12)


def test_recompute_takes_true_full_selective_and_refuses_the_rest():
    from clustersim.core.scenario import scenario_from_dict
    def mode(value):
        data = {"cluster": {"topology": "dgx-h100"}, "model": {"name": "gpt2"}, "training": {"recompute": value}}
        return scenario_from_dict(data, "t.toml").training.recompute
    assert [mode(v) for v in (True, False, "full", "selective", "none")] == ["full", "none", "full", "selective", "none"]
    unset = {"cluster": {"topology": "dgx-h100"}, "model": {"name": "gpt2"}}
    assert scenario_from_dict(unset, "t.toml").training.recompute == ""       # not set
    for bad in ("partial", 1):
        with pytest.raises(ConfigError, match=r't\.toml: training\.recompute: must be true, false, "full", "selective" or "none"'):
            mode(bad)


@pytest.mark.parametrize("t, sp", [(1, False), (4, False), (4, True)])
def test_full_recompute_keeps_2sbh_a_gpt_layer_and_works_on_one(t, sp, monkeypatch):
    """Korthikanti et al. 2022 (section 4.3): full recomputation stores a layer's input, 2sbh
    bytes (sequence parallelism: 2sbh / t), and reruns one layer at a time, whose
    activations (the test above) less that input, kept already, are the working set: a block
    adds s h (or s h / t) elements per sample to what is kept and nothing to the working set
    (the block's output counted once: as the next checkpoint, not again in its working set,
    which made full recomputation keep more than none on small chains)."""
    from clustersim.core import models
    from clustersim.core.plan import activation_elements
    from test_tensor_parallel import tensor_plan
    s, h, a = 16, 64, 4
    kept, work = [], []
    for layers in (2, 3):
        monkeypatch.setitem(models.TRANSFORMERS, f"gpt-{layers}", models.Transformer(layers, h, a, 50, s))
        p = tensor_plan(zoo_model(f"gpt-{layers}", sequence=s), t, batch=1, sp=sp, training={"recompute": True})
        k, w = activation_elements(p)
        kept.append(k)
        work.append(w)
    assert [b - a_ for a_, b in zip(*kept)] == [s * h / t if sp else s * h] * t
    assert work[0] == work[1] == [(15 * s * h + 2 * a * s * s) / t if sp else 3 * s * h + (12 * s * h + 2 * a * s * s) / t] * t


def test_plan_lists_what_each_replica_sends_across_the_replicas(capsys):
    """``clustersim plan`` names the data-parallel bytes (``data_parallel_bytes``): with ZeRO 3
    a reduce-scatter of the gradients, (R - 1) / R of them, and twice that of weights
    all-gathered (a new-user sweep found the README's claim of them counted nowhere)."""
    from clustersim.cli import main
    from clustersim.core.models import zoo_model
    assert main(["plan", "scenarios/quickstart.toml", "--set", "model.name=gpt2", "--set", "model.batch_size=8",
                 "--set", "parallel.replicas=4", "--set", "training.zero=3", "--set", "training.optimizer=adam"]) == 0
    out = capsys.readouterr().out
    grads = 3 / 4 * zoo_model("gpt2").params * 4 / 1e6            # fp32, MB
    assert (f"data parallel, sent per replica and step: gradient reduce-scatter {grads:.3g} MB, weight all-gather "
            f"{2 * grads:.3g} MB\n") in out


def test_a_pipeline_that_does_not_fit_is_told_to_raise_its_micro_batches(capsys):
    """Under 1F1B a stage holds at most the stages' count of micro-batches, so smaller ones
    shrink its activations: the advice says so where the schedule is 1F1B and there are
    stages (a new-user sweep found it missing); the plan's header names the layout."""
    from clustersim.cli import main
    base = ["plan", "scenarios/quickstart.toml", "--set", "model.name=gpt2", "--set", "parallel.replicas=1",
            "--set", "parallel.split=layers", "--set", "parallel.model_parallel=4"]
    with pytest.raises(ConfigError, match="so raise model_parallel or lower model.batch_size, or raise "
                                          "parallel.micro_batches"):
        plan(scenario(model="gpt2", batch=512, parallel={"split": "layers", "model_parallel": 4}))
    with pytest.raises(ConfigError, match=r"lower model\.batch_size \(or set"):
        plan(scenario(model="gpt2", batch=512, parallel={"split": "layers", "model_parallel": 4, "schedule": "gpipe"}))
    assert main(base + ["--set", "model.batch_size=8", "--set", "parallel.micro_batches=2"]) == 0
    assert "split layers, sync none, 4 stages x 2 micro-batches (1f1b)" in capsys.readouterr().out


def test_a_plan_that_does_not_fit_is_refused_before_its_ops_are_built(monkeypatch):
    """The memory check needs no ops, so a plan that does not fit is refused before ``_ops``
    runs (GPT-3 at 16 micro-batches on 64 A100s would build ops for 28 s first)."""
    from clustersim.core import plan as plan_module
    from clustersim.core.plan import DoesNotFit

    def no_ops(*args):
        raise AssertionError("ops built for a plan that does not fit")
    monkeypatch.setattr(plan_module, "_ops", no_ops)
    with pytest.raises(DoesNotFit, match="largest: activations"):
        plan(scenario(model="gpt2", batch=512))


def test_a_simulated_pipeline_names_its_stages_and_micro_batches():
    """``simulate``'s summary named the slots only ("split tensor x16"), hiding a pipeline's
    stages and micro-batches: its keys and header give them."""
    from clustersim import api, report
    res = api.simulate("scenarios/quickstart.toml", {"parallel.split": "layers", "parallel.model_parallel": 4,
                                                     "parallel.replicas": 1, "parallel.micro_batches": 4,
                                                     "training.steps": 2}, speedup=False)
    assert (res.data["pipeline_stages"], res.data["micro_batches"], res.data["schedule"]) == (4, 4, "1f1b")
    assert "split layers x4 (4 stages, 4 micro-batches, 1f1b), replicas 1" in report.summary_text(res.data)
    # stages of tensor slices: "x4" is the replica's devices, which the header splits
    res = api.simulate("scenarios/quickstart.toml", {"model.name": "gpt-tiny", "cluster.topology": "dgx-h100",
                                                     "parallel.split": "tensor", "parallel.model_parallel": 2,
                                                     "parallel.pipeline": 2, "parallel.micro_batches": 4,
                                                     "parallel.replicas": 2, "model.batch_size": 8,
                                                     "training.steps": 1}, speedup=False)
    assert "split tensor x4 (2 stages of 2 slots, 4 micro-batches, 1f1b), replicas 2" in report.summary_text(res.data)


def test_memory_advice_offers_only_what_the_scenario_would_take():
    """Review R24: the advice named selective recomputation for a model without attention
    and ZeRO for one replica, both refused when followed.  Advice follows the scenario."""
    with pytest.raises(ConfigError, match=r'lower model\.batch_size, or raise parallel\.micro_batches \(or set '
                                          r'training\.recompute = "full"\)$'):
        plan(scenario(model="distbelief-image-1.7b", batch=16384))
    with pytest.raises(ConfigError, match=r'\(or set training\.recompute = "full"\)$'):
        plan(scenario(model="gpt2", batch=512, training={"recompute": "selective"}))
    from clustersim.core.scenario import scenario_from_dict

    def llama(replicas, ps_shards=0, zero=0, name="llama-2-7b", dtype="fp32", optimizer="adam",
              **parallel):                                                                 # fp32 Adam: 25+25+50 GB
        return scenario_from_dict({"cluster": {"topology": "dgx-h100"},
                                   "parallel": {"replicas": replicas, "ps_shards": ps_shards, **parallel},
                                   "model": {"name": name, "batch_size": 1, "sequence": 256, "dtype": dtype},
                                   "training": {"optimizer": optimizer, "zero": zero}}, "test.toml")
    with pytest.raises(ConfigError, match=r"largest: optimizer, so raise model_parallel or pipeline$"):
        plan(llama(1))
    with pytest.raises(ConfigError, match=r"largest: optimizer, so raise model_parallel or pipeline, or set "
                                          r"training\.zero = 1$"):
        plan(llama(2))
    with pytest.raises(ConfigError, match=r"largest: optimizer, so raise model_parallel or pipeline$"):
        plan(llama(2, ps_shards=1, name="megatron-18.4b", dtype="bf16", optimizer="sgd"))   # fp32 master 74 GB:
        # ZeRO is sync's without shards: not offered
    with pytest.raises(ConfigError, match=r"largest: optimizer, so raise model_parallel or pipeline, or raise "
                                          r"parallel\.replicas \(ZeRO shards over them\)$"):
        plan(llama(2, zero=1, name="megatron-18.4b", dtype="bf16"))   # 37 + 37 + 110 / 2 GB: more replicas
    with pytest.raises(ConfigError, match=r"largest: optimizer, so raise model_parallel$"):
        plan(llama(1, name="megatron-18.4b", split="layers", model_parallel=2))   # a layers split: no pipeline key
    full = {"cluster": {"topology": "dgx-h100"}, "model": {"name": "llama-2-7b", "batch_size": 2, "dtype": "bf16"},
            "parallel": {"replicas": 1, "split": "layers", "model_parallel": 2, "micro_batches": 2}}
    with pytest.raises(ConfigError, match=r'batch_size \(or set training\.recompute = "selective" or "full"\)$'):
        plan(scenario_from_dict(full, "test.toml"))      # micro-batches of one sample already: not offered
    # review R26: GPipe holds every micro-batch (1F1B fits), one stage takes micro-batches too,
    # flash keeps no score matrices, a batch of one cannot be lowered
    gpipe = {**full, "model": {**full["model"], "batch_size": 8},
             "parallel": {"replicas": 1, "pipeline": 2, "model_parallel": 2, "micro_batches": 8, "schedule": "gpipe"}}
    with pytest.raises(ConfigError, match=r'batch_size, or set parallel\.schedule = "1f1b" \(or set'):
        plan(scenario_from_dict(gpipe, "test.toml"))
    one = {**full, "model": {**full["model"], "batch_size": 8}, "parallel": {"replicas": 1}}
    with pytest.raises(ConfigError, match=r"batch_size, or raise parallel\.micro_batches \(or set"):
        plan(scenario_from_dict(one, "test.toml"))
    flash = {**one, "model": {**one["model"], "attention": "flash"}}
    with pytest.raises(ConfigError, match=r'micro_batches \(or set training\.recompute = "full"\)$'):
        plan(scenario_from_dict(flash, "test.toml"))
    single = {**one, "model": {**one["model"], "batch_size": 1}}
    with pytest.raises(ConfigError, match=r'activations, so raise model_parallel \(or set training\.recompute'):
        plan(scenario_from_dict(single, "test.toml"))


def test_a_pipeline_of_tensor_slices_sends_one_activation_a_slot_between_whole_blocks():
    """With 2 slots a stage, a stage could end after the MLP's projection, before its
    residual sum, so the residual travelled beside the branch (37.7 MB where Megatron sends
    18.9: 2 slots x s x h x 2 bytes), and GPT-2's 12 layers took 40 stages, some holding
    one add, where one slot a stage took at most 13."""
    from clustersim.core.scenario import scenario_from_dict

    def gpt(name, tensor, stages):
        return scenario_from_dict({"cluster": {"topology": "dgx-a100-fat-tree", "machines": 10},
                                   "model": {"name": name, "batch_size": 1, "dtype": "bf16"},
                                   "parallel": {"split": "tensor", "model_parallel": tensor, "pipeline": stages},
                                   "training": {"optimizer": "adam"}}, "t.toml")
    p = plan(gpt("megatron-1.7b", 2, 2))
    sent = sum(op.bytes for op in p.ops if op.kind == "xfer" and op.why == "stage")
    assert sent == 2 * 2048 * 2304 * 2
    for tensor in (1, 2, 4):
        assert plan(gpt("gpt2", tensor, 13)).scenario.parallel.stages == 13   # 12 blocks and the head
        with pytest.raises(ConfigError, match="parallel.pipeline: .*gives 13 pieces, which fill 13 of 14 stages"):
            plan(gpt("gpt2", tensor, 14))
    # post-norm (BERT): a block ends in a layer norm the next block's attention reads whole;
    p = plan(gpt("bert-large", 2, 2))
    assert sum(op.bytes for op in p.ops if op.kind == "xfer" and op.why == "stage") == 2 * 512 * 1024 * 2
    for tensor in (1, 2, 4):
        with pytest.raises(ConfigError, match="gives 25 pieces, which fill 25 of 26 stages"):
            plan(gpt("bert-large", tensor, 26))


@pytest.mark.parametrize("name", ["mlp-digits", "alexnet", "distbelief-speech", "gpt2"])
def test_a_layer_reading_the_models_input_computes_no_input_gradient(name):
    """No framework computes the gradient of the data: the first weighted layer's backward
    is its weight gradient alone, one forward's FLOPs where the others take two (a dense
    layer, a convolution; GPT-2's first layer is its embedding, whose backward never had one)."""
    sc = scenario(model=name, batch=4, topology="dgx-h100")
    p = plan(sc, check_memory=False)
    model = sc.model
    fwd = {op.layer: op.flops for op in p.ops if op.kind == "fwd"}
    for op in p.ops:
        if op.kind == "bwd":
            node = model.nodes[op.layer]
            first = all(s == -1 for s in node.inputs)
            want = node.layer.bwd_ratio - (node.layer.kind in ("dense", "conv2d", "locally_connected") and first)
            assert op.flops == pytest.approx(fwd[op.layer] * want, rel=1e-12)
    assert model.nodes[0].bwd_ratio == (1.0 if name != "gpt2" else model.nodes[0].layer.bwd_ratio)
