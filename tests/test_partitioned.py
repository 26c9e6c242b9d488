"""Partitioned forward outputs and gradients equal the single-process reference, for every
layer kind and both splits, at 1, 2 and 3 ranks (slots run in one process here), chains
and graphs (residual adds, concats) alike."""
import dataclasses

import numpy as np
import pytest

from executor.kernels import init_params
from executor.partitioned import Mailbox, run_step, slot_params
from clustersim.core.models import build_model, make_layer as L
from clustersim.core.partition import even_cuts
from clustersim.core.plan import plan
from helpers import scenario

ALL_KINDS = build_model("all-kinds", (3, 12, 12), [
    L("locally_connected", filters=4, kernel=3), L("relu"), L("max_pool", kernel=2), L("lcn", size=3),
    L("conv2d", filters=6, kernel=3, padding=1), L("lrn", size=3), L("avg_pool", kernel=2, stride=1),
    L("batchnorm"), L("maxout", pieces=2), L("sigmoid"), L("dense", units=10), L("dropout", rate=0.5),
    L("tanh"), L("dense", units=5), L("softmax_xent")], 5)
NO_BN = build_model("no-bn", (3, 10, 10), [
    L("locally_connected", filters=3, kernel=3), L("relu"), L("max_pool", kernel=2), L("conv2d", filters=4, kernel=2),
    L("dense", units=6), L("tanh"), L("dense", units=4), L("softmax_xent")], 4)

# A residual CNN as a graph: a block of row-cut layers whose input is read twice (by the
# next layer's halo and by the add), then a block of channel-cut layers with a projection
# shortcut, and a concat of the block's output with its input.
_GRAPH = [  # (name, layer, inputs)
    ("a", L("locally_connected", filters=3, kernel=3, padding=1), None), ("r1", L("relu"), None),
    ("b", L("locally_connected", filters=3, kernel=3, padding=1), None), ("r2", L("relu"), None),
    ("sum1", L("add"), ("r2", "r1")), ("p", L("max_pool", kernel=2), None),
    ("c", L("conv2d", filters=4, kernel=3, padding=1), None), ("bn", L("batchnorm"), None), ("r3", L("relu"), None),
    ("short", L("conv2d", filters=4, kernel=1, bias=False), ("p",)), ("sum2", L("add"), ("r3", "short")),
    ("r4", L("relu"), None), ("cat", L("concat"), ("r4", "p")), ("gap", L("avg_pool", kernel=5), None),
    ("fc", L("dense", units=5), None), ("loss", L("softmax_xent"), None)]
RESIDUAL = build_model("residual", (2, 10, 10), [lyr for _, lyr, _ in _GRAPH], 5,
                       [n for n, _, _ in _GRAPH], [i for _, _, i in _GRAPH])


def make_plan(model, m, split, micro=1, batch=6, grid=()):
    par = {"model_parallel": m, "split": split, "micro_batches": micro} | ({"grid": list(grid)} if grid else {})
    sc = scenario(batch=batch, parallel=par)
    return plan(dataclasses.replace(sc, model=model), check_memory=False)


def run(p, full, x, y):
    params = slot_params(p, full)
    rng_masks = {}

    def dropout(i, shape):
        if i not in rng_masks:
            rng_masks[i] = (np.random.default_rng(100 + i).random(shape) < 0.5) / 0.5
        return rng_masks[i]
    res = run_step(p, set(range(p.slots)), params, x, y, Mailbox(), dropout=dropout)
    grads = {i: [np.zeros_like(a) for a in arrs] for i, arrs in full.items()}
    for (i, j), gs in res.grads.items():
        layer = p.scenario.model.nodes[i].layer
        for g_full, g, idx in zip(grads[i], gs, layer.box_index(dict(p.slices[i])[j])):
            g_full[idx] += g
    last = len(p.slices) - 1
    logits = np.zeros((len(x), p.scenario.model.nodes[-1].out_shape[0]))
    micro = even_cuts(len(x), p.scenario.parallel.micro_batches)
    for (j, m), arr in res.logits.items():
        c0, c1 = dict(p.slices[last])[j][0]
        logits[micro[m][0]:micro[m][1], c0:c1] = arr[:, :, 0, 0]
    return res.loss, logits, grads


def residual_case(batch=6):
    """RESIDUAL's starting parameters, a batch and its labels (seed 11)."""
    rng = np.random.default_rng(11)
    full = init_params(RESIDUAL, rng)
    return full, rng.normal(size=(batch, *RESIDUAL.input_shape)), rng.integers(0, 5, batch)


def gathered(p, full, folder):
    """The loss and the whole layers' parameter gradients from the ``rank{j}.npz`` files
    that ranks of plan ``p`` saved (each its loss share and its boxes' gradients)."""
    loss, grads = 0.0, {i: [np.zeros_like(a) for a in arrs] for i, arrs in full.items()}
    for j in range(p.slots):
        data = np.load(folder / f"rank{j}.npz")
        loss += float(data["loss"])
        for i in full:
            box = dict(p.slices[i]).get(j)
            for n, idx in enumerate(p.scenario.model.nodes[i].layer.box_index(box) if box else ()):
                grads[i][n][idx] += data[f"g_{i}_{n}"]
    return loss, grads


@pytest.mark.parametrize("model, split, m, micro, grid", [
    (ALL_KINDS, "spatial", 2, 1, ()), (ALL_KINDS, "spatial", 3, 1, ()), (ALL_KINDS, "layers", 2, 1, ()),
    (ALL_KINDS, "layers", 3, 1, ()), (NO_BN, "layers", 3, 3, ()), (NO_BN, "spatial", 3, 2, ()),
    (ALL_KINDS, "spatial", 4, 1, ()), (ALL_KINDS, "spatial", 6, 1, (2, 3)), (ALL_KINDS, "spatial", 3, 1, (1, 3)),
    (NO_BN, "spatial", 4, 2, (2, 2))])
def test_partitioned_step_equals_the_single_process_reference(model, split, m, micro, grid):
    """2-D blocks included: 4 slots cut ALL_KINDS' first layers in 2 x 2 blocks (automatically)."""
    rng = np.random.default_rng(7)
    ref_plan = make_plan(model, 1, "spatial")
    full = init_params(model, rng)
    x = rng.normal(size=(6, *model.input_shape))
    y = rng.integers(0, model.nodes[-1].out_shape[0], 6)
    loss0, logits0, grads0 = run(ref_plan, full, x, y)
    p = make_plan(model, m, split, micro, grid=grid)
    assert ("blocks" in p.axes) == (m == 4 or len(grid) == 2)
    loss, logits, grads = run(p, full, x, y)
    assert loss == pytest.approx(loss0, rel=1e-10)
    assert np.allclose(logits, logits0, rtol=1e-10, atol=1e-12)
    for i in grads0:
        for g, g0 in zip(grads[i], grads0[i]):
            assert np.allclose(g, g0, rtol=1e-9, atol=1e-12), (i, model.nodes[i].layer.kind)


@pytest.mark.parametrize("split, m, micro", [("spatial", 2, 1), ("spatial", 3, 2), ("spatial", 4, 1),
                                             ("layers", 2, 1), ("layers", 3, 3)])
def test_partitioned_residual_graph_equals_the_single_process_reference(split, m, micro):
    """Graphs: every layer reading another's output gets it (once per slot) and gives its
    gradient back, summed with the other readers'; 4 slots cut the row-cut block in 2 x 2."""
    full, x, y = residual_case()
    loss0, logits0, grads0 = run(make_plan(RESIDUAL, 1, "spatial", micro), full, x, y)    # batch norm: per micro-batch
    loss, logits, grads = run(make_plan(RESIDUAL, m, split, micro), full, x, y)
    assert loss == pytest.approx(loss0, rel=1e-10)
    assert np.allclose(logits, logits0, rtol=1e-10, atol=1e-12)
    for i in grads0:
        for g, g0 in zip(grads[i], grads0[i]):
            assert np.allclose(g, g0, rtol=1e-9, atol=1e-12), RESIDUAL.nodes[i].name


def test_the_graph_reference_is_the_net_of_nn_py():
    """The one-slot step and ``Net`` (the flat-vector reference) agree on a graph."""
    from executor.nn import Net
    rng = np.random.default_rng(2)
    net = Net(RESIDUAL)
    w = net.init(rng).astype(np.float64)
    x = rng.normal(size=(4, *RESIDUAL.input_shape))
    y = rng.integers(0, 5, 4)
    loss, g = net.loss_and_grad(w, x, y)
    full = {i: net.params(w, i) for i in range(len(RESIDUAL.nodes)) if net.layout[i]}
    loss1, _, grads1 = run(make_plan(RESIDUAL, 1, "spatial", batch=4), full, x, y)
    assert loss == pytest.approx(loss1, rel=1e-12)
    for i, arrays in grads1.items():
        for (o, shape), a in zip(net.layout[i], arrays):
            assert np.allclose(g[o:o + a.size].reshape(shape), a, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("model, m, grid", [(NO_BN, 3, ()), (NO_BN, 4, (2, 2)), (RESIDUAL, 3, ()), (RESIDUAL, 4, ())])
def test_messages_carry_the_bytes_the_plan_counts(model, m, grid):
    p = make_plan(model, m, "spatial", grid=grid)
    rng = np.random.default_rng(0)
    full = init_params(model, rng, dtype=np.float32)
    x = rng.normal(size=(6, *model.input_shape)).astype(np.float32)
    y = rng.integers(0, 4, 6)
    params = slot_params(p, full)
    mail = Mailbox()
    run_step(p, set(range(m)), params, x, y, mail)
    assert mail.bytes == sum(op.bytes for op in p.ops if op.kind == "xfer")


def test_each_message_is_sent_right_after_its_producer_and_received_right_before_its_consumer():
    p = make_plan(NO_BN, 3, "spatial")
    rng = np.random.default_rng(0)
    full = init_params(NO_BN, rng, dtype=np.float32)
    params = slot_params(p, full)
    seen = []
    run_step(p, {0, 1, 2}, params, rng.normal(size=(6, *NO_BN.input_shape)).astype(np.float32),
             rng.integers(0, 4, 6), Mailbox(), on_op=lambda op, part: seen.append((op.id, part)))
    xfers = [op.id for op in p.ops if op.kind == "xfer"]
    assert sorted(i for i, part in seen if part == "send") == sorted(xfers)
    assert sorted(i for i, part in seen if part == "recv") == sorted(xfers)
    assert [i for i, part in seen if part == ""] == [op.id for op in p.ops if op.kind != "xfer"]
    where = {key: n for n, key in enumerate(seen)}
    for op_id in xfers:                          # sent as soon as its producer is done, nothing between
        producer = max(p.ops[op_id].deps)
        between = seen[where[(producer, "")] + 1:where[(op_id, "send")]]
        assert all(part == "send" for _, part in between)
    for op in p.ops:                             # received just before the op that needs it
        if op.kind != "xfer":
            needed = [d for d in op.deps if p.ops[d].kind == "xfer"]
            assert [i for i, _ in seen[where[(op.id, "")] - len(needed):where[(op.id, "")]]] == needed


# a small causal transformer: one pre-LN block (attention and a SwiGLU MLP), an untied head
_TINY = [("emb", L("embedding", vocab=11, dim=8, positions=6), None), ("ln1", L("layernorm"), None),
         ("att", L("attention", heads=4, causal=True), None), ("proj", L("conv2d", filters=8, kernel=1), None),
         ("res1", L("add"), ("proj", "emb")), ("ln2", L("rmsnorm"), None),
         ("up", L("conv2d", filters=16, kernel=1, bias=False), None), ("gate", L("swiglu"), None),
         ("down", L("conv2d", filters=8, kernel=1), None), ("g", L("gelu"), None), ("res2", L("add"), ("g", "res1")),
         ("head", L("lm_head", vocab=11, tied=False), None), ("loss", L("softmax_xent"), None)]
TINY_GPT = build_model("tiny-gpt", (1, 6, 1), [lyr for _, lyr, _ in _TINY], 11,
                       [n for n, _, _ in _TINY], [i for _, _, i in _TINY])


def tiny_gpt_case():
    """``Net`` of TINY_GPT (float64, seed 3), a batch of 4 sequences and their next words, the
    reference loss and flat gradient, and the whole layers' parameters."""
    from executor.nn import Net
    rng = np.random.default_rng(3)
    net = Net(TINY_GPT)
    w = net.init(rng).astype(np.float64)
    x = rng.integers(0, 11, (4, 1, 6, 1)).astype(float)
    y = rng.integers(0, 11, (4, 6))
    loss0, g0 = net.loss_and_grad(w, x, y)
    return net, x, y, loss0, g0, {i: net.params(w, i) for i in range(len(TINY_GPT.nodes)) if net.layout[i]}


@pytest.mark.parametrize("m, pipeline, micro", [(2, 1, 1), (4, 1, 2), (2, 2, 1), (1, 3, 2)])
def test_partitioned_transformer_step_equals_one_process(m, pipeline, micro):
    """Tensor 2 and 4 (heads, features and vocabulary cut by channels), pipelines of tensor
    slices: the loss over every position and every gradient equal ``Net``'s to 1e-10."""
    net, x, y, loss0, g0, full = tiny_gpt_case()
    sc = scenario(batch=4, parallel={"model_parallel": m, "pipeline": pipeline, "micro_batches": micro})
    p = plan(dataclasses.replace(sc, model=TINY_GPT), check_memory=False)
    assert p.slots == m * pipeline
    res = run_step(p, set(range(p.slots)), slot_params(p, full), x, y, Mailbox())
    assert res.loss == pytest.approx(loss0, rel=1e-10)
    for i, arrays in full.items():
        for n, ((o, shape), a) in enumerate(zip(net.layout[i], arrays)):
            got = np.zeros(shape)
            for (layer, j), gs in res.grads.items():
                if layer == i:
                    got[TINY_GPT.nodes[i].layer.box_index(dict(p.slices[i])[j])[n]] += gs[n]
            assert np.allclose(got, g0[o:o + a.size].reshape(shape), rtol=1e-9, atol=1e-12), TINY_GPT.nodes[i].name


class _DeviceArray(np.ndarray):
    """An array that, like one on a GPU, must not be read back mid-step: ``float()`` of it
    or a boolean mask over it (an index array built from the data) fails."""

    def __float__(self):
        raise AssertionError("float() of an array waits for the device")

    def _check(self, ix):
        for i in ix if isinstance(ix, tuple) else (ix,):
            if isinstance(i, np.ndarray) and i.dtype == bool:
                raise AssertionError("a boolean mask waits for the device")

    def __getitem__(self, ix):
        self._check(ix)
        return super().__getitem__(ix)

    def __setitem__(self, ix, value):
        self._check(ix)
        super().__setitem__(ix, value)


class _DeviceXp:
    """NumPy as the executor's ``xp``, without the functions whose result's size depends
    on the data (they wait for the device on a GPU)."""

    def __getattr__(self, name):
        if name in ("nonzero", "argwhere", "flatnonzero", "extract", "compress", "unique"):
            raise AssertionError(f"xp.{name} waits for the device")
        return getattr(np, name)


@pytest.mark.parametrize("t", [1, 3])
def test_the_softmax_loss_s_backward_never_waits_for_the_device(t):
    """Its slice of classes [3, 7) of 10, the rest another slot's (their max and sum of
    exponentials): the gradient and loss share of the whole softmax's closed form, with
    no read-back of the device on the way (the step reads the loss once, at its end)."""
    from executor.partitioned import _softmax_grad
    rng = np.random.default_rng(0)
    b, c, (c0, c1) = 6, 10, (3, 7)
    z = rng.standard_normal((b, t, c))
    labels = rng.integers(0, c, (b, t))
    labels[0, 0], labels[1, 0] = 4, 9                       # one inside the slice, one outside, at least
    rest = np.concatenate([z[:, :, :c0], z[:, :, c1:]], axis=2)
    mx = rest.max(axis=2)
    others = [np.stack([mx, np.exp(rest - mx[:, :, None]).sum(axis=2)], axis=2)]
    y = z[:, :, c0:c1].transpose(0, 2, 1)[:, :, :, None]   # (b, classes of the slice, t, 1)
    g, part = _softmax_grad(_DeviceXp(), None, np.ascontiguousarray(y).view(_DeviceArray), ((c0, c1), (0, t), (0, 1)),
                            others, labels.view(_DeviceArray), b)
    prob = np.exp(z) / np.exp(z).sum(axis=2, keepdims=True)
    onehot = np.eye(c)[labels]
    want = ((prob - onehot) / (b * t))[:, :, c0:c1].transpose(0, 2, 1)[:, :, :, None]
    np.testing.assert_allclose(np.asarray(g), want, rtol=1e-12, atol=1e-15)
    inside = (labels >= c0) & (labels < c1)
    loss = -np.log(np.take_along_axis(prob, labels[:, :, None], axis=2)[:, :, 0])[inside].sum() / (b * t)
    assert np.asarray(part).item() == pytest.approx(loss, rel=1e-12)
