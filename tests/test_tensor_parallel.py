"""Megatron-LM's tensor split (``parallel.split = "tensor"``, docs/decisions/019): the small
causal transformer's step equals one process's, the allreduces carry the ring's volume,
stages end between blocks, replicated layers are counted on every slot, and both runners
and the Plan's JSON take it."""
import dataclasses

import numpy as np
import pytest

from clustersim.core.config import ConfigError
from clustersim.core.models import build_model, make_layer as L, zoo_model
from clustersim.core.plan import param_index, plan, replicated
from executor.kernels import init_params
from executor.partitioned import Mailbox, run_step, slot_params
from helpers import scenario
from test_partitioned import TINY_GPT, tiny_gpt_case

AR = ("reduce-scatter", "all-gather", "gradient reduce-scatter", "gradient all-gather")


def tensor_plan(model, m, pipeline=1, micro=1, batch=4, sp=False, **sections):
    """``model`` (a transformer the zoo may not hold) split over ``m`` slots a stage; the
    scenario is read with mlp-digits, so ``training.recompute`` is set after."""
    from clustersim.core.scenario import RECOMPUTE_MODES
    training = dict(sections.pop("training", {}))
    recompute = training.pop("recompute", None)
    sc = scenario(batch=batch, parallel={"model_parallel": m, "split": "tensor", "pipeline": pipeline,
                                         "micro_batches": micro, "sequence_parallel": sp}, training=training, **sections)
    if recompute is not None:
        sc = dataclasses.replace(sc, training=dataclasses.replace(sc.training, recompute=RECOMPUTE_MODES[recompute]))
    return plan(dataclasses.replace(sc, model=model), check_memory=False)


def gpt2_tensor(m, pipeline=1, sp=False):
    """GPT-2 at 16 positions, batch 2, fp32, tensor m (x pipeline)."""
    return tensor_plan(zoo_model("gpt2", sequence=16), m, pipeline, batch=2, sp=sp)


def net_case(model, seed=3, batch=4):
    """``Net`` of a conv ``model`` (float64, ``seed``), a batch of normal inputs and labels,
    the reference loss and flat gradient, and the whole layers' parameters (``tiny_gpt_case``'s
    tuple)."""
    from executor.nn import Net
    rng = np.random.default_rng(seed)
    net = Net(model)
    w = net.init(rng).astype(np.float64)
    x = rng.normal(size=(batch, *model.input_shape))
    y = rng.integers(0, model.nodes[-1].out_shape[0], batch)
    loss0, g0 = net.loss_and_grad(w, x, y)
    return net, x, y, loss0, g0, {i: net.params(w, i) for i in range(len(model.nodes)) if net.layout[i]}


def assert_equals_net(p, loss, grads, case=None):
    """``loss`` equals ``Net``'s on ``case`` (default ``tiny_gpt_case``) to 1e-10, the cut and
    summed layers' gradients ``grads[(layer, slot)]`` add up to its gradient, and every slot's
    copy of a replicated layer's (the norms') equals it."""
    net, _, _, loss0, g0, full = case or tiny_gpt_case()
    model = p.scenario.model
    assert loss == pytest.approx(loss0, rel=1e-10)
    for i, arrays in full.items():
        copies = replicated(p.slices[i]) and not p.parts[i] or p.axes[i] == "positions"   # whole on each slot
        if copies:                                      # every slot returned its copy's gradient
            assert {j for layer, j in grads if layer == i} == {j for j, _ in p.slices[i]}, model.nodes[i].name
        for n, ((o, shape), a) in enumerate(zip(net.layout[i], arrays)):
            want = g0[o:o + a.size].reshape(shape)
            got = np.zeros(shape)
            for (layer, j), gs in grads.items():
                if layer != i or n >= len(gs):          # a part without the bias: another slot adds it
                    continue
                if copies:
                    assert np.allclose(gs[n], want, rtol=1e-9, atol=1e-12), (model.nodes[i].name, j)
                else:
                    got[param_index(model, p.parts, i, j, dict(p.slices[i])[j])[n]] += gs[n]
            if not copies:
                assert np.allclose(got, want, rtol=1e-9, atol=1e-12), model.nodes[i].name


# a row-parallel conv's partial sums read by cut layers: a column-parallel dense (its input
# gradients are partial sums), and a residual add cut by channels (each slot's add gives back
# the gradient of its channels alone)
CONV_DENSE = build_model("conv-dense", (2, 5, 5), [L("conv2d", filters=8, kernel=3, padding=1),
                                                   L("conv2d", filters=8, kernel=3, padding=1),
                                                   L("dense", units=6), L("softmax_xent")], 6)
CONV_ADD = build_model("conv-add", (2, 5, 5),
                       [L("conv2d", filters=8, kernel=3, padding=1), L("relu"),
                        L("conv2d", filters=8, kernel=3, padding=1), L("add"), L("dense", units=6),
                        L("softmax_xent")], 6, ["c1", "r1", "c2", "add", "fc", "loss"],
                       [None, None, None, ("c2", "r1"), None, None])
# the sum allreduced into a replicated relu first: the add gives the relu its channels
CONV_RELU_ADD = build_model("conv-relu-add", (2, 5, 5),
                            [L("conv2d", filters=8, kernel=3, padding=1), L("relu"),
                             L("conv2d", filters=8, kernel=3, padding=1), L("relu"), L("add"), L("dense", units=6),
                             L("softmax_xent")], 6, ["c1", "r1", "c2", "r2", "add", "fc", "loss"],
                            [None, None, None, None, ("r2", "r1"), None, None])
MODELS = {m.name: m for m in (CONV_DENSE, CONV_ADD, CONV_RELU_ADD)}


@pytest.mark.parametrize("name, m", [("conv-dense", 2), ("conv-dense", 4), ("conv-add", 2), ("conv-add", 4),
                                     ("conv-relu-add", 2), ("resnet-digits", 2), ("resnet-digits", 4)])
def test_partial_sums_read_by_cut_layers_equal_one_process(name, m):
    """A row-parallel conv's partial sums (or the replicated relu of them) read by a
    column-parallel dense or by an add cut by channels: the backward gives each slot the
    whole gradient of the sum (its readers' input gradients summed, or gathered), so the
    loss and every gradient equal ``Net``'s, and the messages carry what the Plan counts."""
    model = MODELS.get(name) or zoo_model(name)
    case = net_case(model)
    p = tensor_plan(model, m)
    assert "partial" in p.axes
    mail = Mailbox()
    res = run_step(p, set(range(p.slots)), slot_params(p, case[5]), case[1], case[2], mail)
    assert_equals_net(p, res.loss, res.grads, case)
    sent = sum(op.bytes for op in p.ops if op.kind == "xfer") / p.scenario.dtype_bytes   # elements
    assert mail.bytes == sent * case[1].itemsize                                        # float64 here


@pytest.mark.parametrize("p_", [2, 4])
def test_a_partial_sums_gradient_is_gathered_from_an_add_and_allreduced_from_a_dense(p_):
    """Backward into the row-parallel conv c2 (8 x 5 x 5, batch 4): from the add cut by
    channels each slot holds its channels' gradient, so an all-gather, (p - 1) / p of it per
    slot; from the column-parallel dense every slot holds a partial sum of all of it, so an
    allreduce, 2 (p - 1) / p.  The forward allreduces c2 in both."""
    whole = 4 * 8 * 5 * 5
    for model, back in ((CONV_ADD, {"gradient all-gather": (p_ - 1) / p_}),
                        (CONV_DENSE, {"gradient reduce-scatter": (p_ - 1) / p_, "gradient all-gather": (p_ - 1) / p_})):
        p = tensor_plan(model, p_)
        c2 = p.axes.index("partial")
        db = p.scenario.dtype_bytes
        for j in range(p_):
            for why in AR:
                moved = sum(op.bytes for op in p.ops if op.kind == "xfer" and op.slot == j and op.why == why)
                share = back.get(why, 0.0) if why.startswith("gradient") else (p_ - 1) / p_
                assert moved == pytest.approx(share * whole * db, rel=1e-12), (model.name, why)
        assert {op.producer for op in p.ops if op.kind == "xfer" and op.why in AR} == {c2}


@pytest.mark.parametrize("sp", [False, True])
@pytest.mark.parametrize("m, pipeline, micro", [(2, 1, 1), (4, 1, 1), (2, 2, 2), (4, 2, 2)])
def test_tensor_step_equals_one_process(m, pipeline, micro, sp):
    """Heads, MLP columns then rows, vocabulary-split embedding and head, in one process;
    with sequence parallelism the norms and sums cut by positions."""
    _, x, y, _, _, full = tiny_gpt_case()
    p = tensor_plan(TINY_GPT, m, pipeline, micro, sp=sp)
    assert p.slots == m * pipeline
    assert set(p.axes) & {"replicated", "partial", "scattered", "positions"} == \
        ({"scattered", "positions"} if sp else {"replicated", "partial"})
    res = run_step(p, set(range(p.slots)), slot_params(p, full), x, y, Mailbox())
    assert_equals_net(p, res.loss, res.grads)


@pytest.mark.parametrize("sp", [False, True])
@pytest.mark.parametrize("m, pipeline, micro", [(2, 1, 1), (4, 2, 2)])
def test_with_recompute_the_ranks_leave_the_plans_second_allreduces_out(m, pipeline, micro, sp):
    """``training.recompute``: the Plan allreduces the partial sums again for the backward
    (the simulator's cost of rerunning the forward); the ranks keep every activation and do
    not rerun it, so they leave those sends out: the same step, the other messages' bytes."""
    _, x, y, _, _, full = tiny_gpt_case()
    p = tensor_plan(TINY_GPT, m, pipeline, micro, sp=sp, training={"recompute": True})
    plain = tensor_plan(TINY_GPT, m, pipeline, micro, sp=sp)
    again = [op for op in p.ops if op.why.startswith("recompute")]
    assert again and all(op.kind == "xfer" for op in again)
    assert len(p.ops) == len(plain.ops) + len(again)
    mails = Mailbox(), Mailbox()
    res = run_step(p, set(range(p.slots)), slot_params(p, full), x, y, mails[0])
    assert_equals_net(p, res.loss, res.grads)
    run_step(plain, set(range(plain.slots)), slot_params(plain, full), x, y, mails[1])
    assert mails[0].bytes == mails[1].bytes > 0


@pytest.mark.parametrize("m, pipeline, micro", [(2, 1, 1), (4, 2, 2)])
def test_tensor_messages_carry_the_bytes_the_plan_counts(m, pipeline, micro):
    p = tensor_plan(TINY_GPT, m, pipeline, micro)
    rng = np.random.default_rng(0)
    full = init_params(TINY_GPT, rng, dtype=np.float32)
    x = rng.integers(0, 11, (4, 1, 6, 1)).astype(np.float32)
    mail = Mailbox()
    run_step(p, set(range(p.slots)), slot_params(p, full), x, rng.integers(0, 11, (4, 6)), mail)
    assert mail.bytes == sum(op.bytes for op in p.ops if op.kind == "xfer")


@pytest.mark.parametrize("p_", [2, 4, 6])
def test_megatron_block_moves_two_allreduces_each_way(p_):
    """GPT-2 (12 blocks, d 768, T 16, batch 2, fp32): per block forward two allreduces of
    b T d elements (after the attention projection and the MLP's down projection), backward
    two (into the norms that column-parallel layers read), plus the embedding's forward and
    the head's input backward; each slot sends 2 (p - 1) / p of the activation in each.
    Nothing is all-gathered for a reading layer, as DistBelief's split does."""
    p = gpt2_tensor(p_)
    b, t, d, db, layers = 2, 16, 768, 4, 12
    per_slot = 2 * (p_ - 1) / p_ * b * t * d * db
    for j in range(p_):
        fwd = sum(op.bytes for op in p.ops if op.kind == "xfer" and op.slot == j and op.why in AR[:2])
        bwd = sum(op.bytes for op in p.ops if op.kind == "xfer" and op.slot == j and op.why in AR[2:])
        assert fwd == pytest.approx((2 * layers + 1) * per_slot, rel=1e-12)
        assert bwd == pytest.approx((2 * layers + 1) * per_slot, rel=1e-12)
    assert {op.why for op in p.ops if op.kind == "xfer"} == set(AR) | {"reduction"}
    kinds = {(p.scenario.model.nodes[i].layer.kind, axis) for i, axis in enumerate(p.axes)}
    assert kinds == {("embedding", "partial"), ("layernorm", "replicated"), ("attention", "channels"),
                     ("conv2d", "partial"), ("add", "replicated"), ("conv2d", "channels"), ("gelu", "channels"),
                     ("lm_head", "channels"), ("softmax_xent", "channels")}


@pytest.mark.parametrize("p_", [2, 4])
def test_sequence_parallel_moves_the_same_and_keeps_less(p_):
    """Sequence parallelism (Korthikanti et al. 2022): each allreduce becomes a reduce-scatter
    by positions after a partial sum and an all-gather before the column-parallel layer
    (the box machinery's ``activation`` sends), the backward their mirror -- the same bytes
    per slot as without it -- plus an allreduce of the norms' parameter gradients (each
    slot's from its positions), and every slot keeps less activation memory."""
    from clustersim.core.plan import activation_elements
    plain, sp = gpt2_tensor(p_), gpt2_tensor(p_, sp=True)
    b, t, d, db, layers = 2, 16, 768, 4, 12
    for j in range(p_):
        fwd = sum(op.bytes for op in sp.ops if op.kind == "xfer" and op.slot == j
                  and op.why in ("reduce-scatter", "activation"))
        bwd = sum(op.bytes for op in sp.ops if op.kind == "xfer" and op.slot == j
                  and op.why in ("gradient", "gradient all-gather"))
        assert fwd == bwd == pytest.approx((2 * layers + 1) * 2 * (p_ - 1) / p_ * b * t * d * db, rel=1e-12)
        norms = sum(op.bytes for op in sp.ops if op.kind == "xfer" and op.slot == j and op.why.startswith("weight"))
        assert norms == pytest.approx(25 * 2 * (p_ - 1) / p_ * 2 * d * db, rel=1e-12)   # each norm's gamma, beta
    assert {op.why for op in sp.ops if op.kind == "xfer"} == {"reduce-scatter", "activation", "gradient",
                                                                "gradient all-gather", "reduction",
                                                                "weight gradient reduce-scatter",
                                                                "weight gradient all-gather"}
    assert all(a < b for a, b in zip(activation_elements(sp)[0], activation_elements(plain)[0]))
    assert sum(sp.slot_params) == sum(plain.slot_params)


def test_spatial_split_moves_more_than_the_tensor_split():
    spatial = plan(dataclasses.replace(scenario(batch=2, parallel={"model_parallel": 4}),
                                       model=zoo_model("gpt2", sequence=16)), check_memory=False)
    tensor = gpt2_tensor(4)
    moved = [sum(op.bytes for op in q.ops if op.kind == "xfer") for q in (spatial, tensor)]
    assert moved[1] < moved[0] / 2


def test_stages_end_between_blocks_and_allreduces_stay_in_a_stage():
    p = gpt2_tensor(2, pipeline=4)
    m = 2
    for op in p.ops:
        if op.kind != "xfer":
            continue
        if op.why in AR:
            assert op.slot // m == op.dst // m
        if op.slot // m != op.dst // m:
            assert op.slot % m == op.dst % m                                       # equal tensor ranks
            if op.why.startswith("embedding gradient"):                            # the tied table's copy
                continue
            assert op.why in ("stage", "gradient") and replicated(p.slices[op.producer]) and not p.parts[op.producer]
    stages = {j // m for sl in p.slices for j, _ in sl}
    assert stages == {0, 1, 2, 3}


def test_every_slot_holds_the_replicated_layers():
    """Parameters: the model's plus (p - 1) copies of the norms (25 layernorms of 2 d; the
    position table and the projections' biases sit on the first slot only); activations: a
    replicated layer's whole output counted on each slot."""
    from clustersim.core.plan import activation_elements
    for p_ in (2, 4):
        p = gpt2_tensor(p_)
        assert sum(p.slot_params) == p.scenario.model.params + (p_ - 1) * 25 * 2 * 768
    p1, p4 = gpt2_tensor(1), gpt2_tensor(4)
    kept1, kept4 = activation_elements(p1)[0], activation_elements(p4)[0]
    ln = [i for i, n in enumerate(p4.scenario.model.nodes) if n.layer.kind == "layernorm"]
    assert all(len(p4.slices[i]) == 4 and all(box == p1.slices[i][0][1] for _, box in p4.slices[i]) for i in ln)
    assert all(kept4[j] > kept1[0] / 4 for j in range(4))


def test_tensor_split_travels_as_json_and_the_simulator_runs_its_allreduces():
    """The simulator moves every allreduce piece the Plan lists, each step, between the
    slots' devices, and a rank's Plan from JSON has the same parts and ops."""
    from clustersim.core.planio import plan_from_dict, plan_to_dict
    from sim.engine import simulate
    p = tensor_plan(TINY_GPT, 2, 2, 2, training={"steps": 3})
    with pytest.raises(ValueError, match="or the plan was built in code"):      # its tables name mlp-digits
        plan_from_dict(plan_to_dict(p))
    zoo = plan(scenario(model="gpt-tiny", batch=4, parallel={"model_parallel": 2, "split": "tensor", "pipeline": 2,
                                                           "micro_batches": 2}), check_memory=False)
    again = plan_from_dict(plan_to_dict(zoo))
    assert again.parts == zoo.parts and again.ops == zoo.ops and again.scenario.model == zoo.scenario.model
    res = simulate(p)
    assert res.stalled_at_s is None and res.steps == 3
    for why in AR:
        spans = [s for s in res.trace.spans if s.kind == "transfer" and s.phase == why]
        want = [op for op in p.ops if op.kind == "xfer" and op.why == why]
        assert len(spans) == 3 * len(want) > 0
        assert sum(s.bytes for s in spans) == pytest.approx(3 * sum(op.bytes for op in want), rel=1e-12)
        devs = p.devices[0]
        assert {s.where for s in spans} == {f"{devs[op.slot]}->{devs[op.dst]}" for op in want}


def test_tensor_split_refuses_ps_shards_and_grids():
    with pytest.raises(ConfigError, match="parallel.ps_shards: a tensor split"):
        scenario(parallel={"model_parallel": 2, "split": "tensor", "replicas": 2, "ps_shards": 1},
                 training={"algorithm": "downpour"})
    with pytest.raises(ConfigError, match="parallel.grid"):
        scenario(parallel={"model_parallel": 4, "split": "tensor", "grid": [2, 2]})
    with pytest.raises(ConfigError, match="parallel.sequence_parallel: cuts a tensor split"):
        scenario(parallel={"model_parallel": 4, "sequence_parallel": True})


@pytest.mark.slow
def test_gpt3_tensor_split_fits_with_16_stages_and_not_without():
    """Issue 17's GPT-3 175B case under Megatron's split: tensor 8 x pipeline 16 x 8 replicas
    fits an 80 GiB H100 (the norms and sums whole on every slot); one stage does not."""
    from clustersim.core.scenario import load_scenario, parse_set
    base = ["model.name=gpt3-175b", "model.dtype=bf16", "model.batch_size=8", "cluster.topology=dgx-h100-fat-tree",
            "cluster.machines=128", "parallel.model_parallel=8", "parallel.replicas=8", "parallel.split=tensor"]
    p = plan(load_scenario("scenarios/quickstart.toml", parse_set(base + ["parallel.pipeline=16"])))
    assert p.slots == 128 and max(sum(u.values()) for u in p.memory.values()) < 80 * 2**30
    b_t_d = 8 * 2048 * 12288 * 2
    rs = sum(op.bytes for op in p.ops if op.kind == "xfer" and op.why == "reduce-scatter")
    assert rs == pytest.approx((2 * 96 + 1) * 7 * b_t_d, rel=1e-12)     # per block 2, the embedding 1; 8 slots
    with pytest.raises(ConfigError, match=r"device m0\.gpu0 needs \d+\.\d+ GiB"):
        plan(load_scenario("scenarios/quickstart.toml", parse_set(base + ["parallel.pipeline=1"])))


def test_heads_that_do_not_divide_and_stages_without_block_ends_are_refused():
    """Megatron-LM gives every slot the same whole heads, and ends stages between blocks:
    TINY_GPT's 4 heads on 3 slots, and an MLP (no block ends) in 2 stages, are refused
    naming the field, rather than split unevenly or left with an idle stage."""
    from clustersim.core.config import ConfigError
    with pytest.raises(ConfigError, match="parallel.model_parallel.*4 heads, which do not divide by 3"):
        tensor_plan(TINY_GPT, 3, 1, 1)
    with pytest.raises(ConfigError, match="parallel.pipeline.*fill 1 of 2 stages"):
        tensor_plan(zoo_model("mlp-digits"), 2, 2, 1)


def test_a_tensor_allreduce_piece_runs_at_nccls_nvlink_speed():
    """On a DGX A100 a reduce-scatter send of the tensor split is an NCCL kernel's: the first
    one (nothing else moving) takes the route's latency plus its bytes at NCCL's NVLink speed,
    20.0 of 25 GB/s a lane (Ampere) of the 300 GB/s a GPU has to the NVSwitch."""
    from sim.engine import simulate
    sc = scenario(topology="dgx-a100", batch=4, parallel={"model_parallel": 2, "split": "tensor"},
                  training={"steps": 1})
    p = plan(dataclasses.replace(sc, model=TINY_GPT), check_memory=False)
    res = simulate(p)
    first = min((s for s in res.trace.spans if s.phase == "reduce-scatter"), key=lambda s: s.start_s)
    topo = sc.topology
    src, dst = first.where.split("->")
    want = topo.route_latency(topo.route(src, dst)) + first.bytes / (300e9 * 20.0 / 25.0)
    assert first.end_s - first.start_s == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("phase", ["activation", "gradient", "reduction"])
def test_every_transfer_inside_a_tensor_group_runs_at_nccls_speed(phase):
    """U40: under sequence parallelism the gathers by positions ("activation") and the input
    gradients' reduce-scatters ("gradient") ran at the links' full speed beside reduce-scatter
    pieces at NCCL's; the loss's reductions too. Megatron-LM runs them all as NCCL
    collectives: the first of each alone takes the latency plus its bytes at 20 of 25 GB/s a
    lane of the DGX A100's 300 GB/s."""
    from sim.engine import simulate
    sc = scenario(topology="dgx-a100", batch=4, parallel={"model_parallel": 2, "split": "tensor",
                                                          "sequence_parallel": True}, training={"steps": 1})
    res = simulate(plan(dataclasses.replace(sc, model=TINY_GPT), check_memory=False))
    first = min((s for s in res.trace.spans if s.phase == phase and s.kind == "transfer"), key=lambda s: s.start_s)
    sharing = [s for s in res.trace.spans if s.kind == "transfer" and set(s.links) & set(first.links)
               and s.start_s < first.end_s and s.end_s > first.start_s]
    assert sharing == [first]                                           # alone on its links
    topo = sc.topology
    src, dst = first.where.split("->")
    want = topo.route_latency(topo.route(src, dst)) + first.bytes / (300e9 * 20.0 / 25.0)
    assert first.end_s - first.start_s == pytest.approx(want, rel=1e-9)


def test_pipeline_alone_under_the_tensor_split_cuts_between_blocks():
    """``split = "tensor"`` with one slot a stage is Megatron's pipeline alone: stages end
    after a block's output, as with more slots (it was refused: no allowed cut, a new-user
    sweep found)."""
    model = zoo_model("gpt2", sequence=16)
    p = tensor_plan(model, 1, pipeline=4)
    stage = [sl[0][0] for sl in p.slices]
    ends = [i for i in range(len(stage) - 1) if stage[i + 1] != stage[i]]
    assert sorted(set(stage)) == [0, 1, 2, 3] and stage == sorted(stage) and len(ends) == 3
    assert all(model.nodes[i].layer.kind == "add" and i not in model.inner for i in ends)


@pytest.mark.parametrize("m, pipeline", [(2, 2), (1, 3), (2, 1)])
def test_a_tied_head_on_a_later_stage_keeps_a_copy_and_allreduces_its_gradient(m, pipeline):
    """Megatron-LM keeps the word table on the last stage too (the head's words' rows) and,
    after the backward, allreduces that copy's gradient with the first stage's slot of the
    same tensor rank: 768 x the slot's words more parameters there (memory, the data-parallel
    buckets), and per tensor rank two halves each way between the two slots, sent once all
    micro-batches' backward of the head (there) and of the embedding (in stage 0) are done.
    Where the head shares its stages' slots with the embedding (one stage), nothing."""
    from clustersim.core.plan import buckets, params_of
    p = gpt2_tensor(m, pipeline)
    model = p.scenario.model
    head = next(n.index for n in model.nodes if n.layer.kind == "lm_head")
    embedding = next(n.index for n in model.nodes if n.layer.kind == "embedding")
    own = [sum(params_of(model, p.parts, i, j, box) for i, sl in enumerate(p.slices) for j, box in sl if j == slot)
           for slot in range(p.slots)]
    ops = [op for op in p.ops if op.why.startswith("embedding gradient")]
    if pipeline == 1:
        assert list(p.slot_params) == own and not ops
        return
    words = [50257] if m == 1 else [25129, 25128]
    for rank in range(m):
        slot, partner = (pipeline - 1) * m + rank, rank
        n = words[rank] * 768
        assert p.slot_params[slot] == own[slot] + n
        assert sum(size for _, size in buckets(p, slot)) == p.slot_params[slot]
        pair = [op for op in ops if {op.slot, op.dst} == {slot, partner}]
        assert sorted(op.why.split()[-1] for op in pair) == ["all-gather"] * 2 + ["reduce-scatter"] * 2
        assert sum(op.bytes for op in pair if op.slot == slot) == sum(op.bytes for op in pair if op.slot == partner) \
            == n * 4                                    # fp32 gradients: half of n each way, twice
        for op in pair:
            if op.why.endswith("reduce-scatter"):
                layer = head if op.slot == slot else embedding
                assert {(p.ops[d].kind, p.ops[d].layer, p.ops[d].slot) for d in op.deps} == {("bwd", layer, op.slot)}
    assert len(ops) == 4 * m
    assert list(p.slot_params[:m]) == own[:m]         # the embedding's slots hold the table already


def test_the_simulated_step_waits_for_the_tied_tables_allreduce():
    """Each step moves the copy's gradient allreduce the Plan lists, and ends after it."""
    from sim.engine import simulate
    p = tensor_plan(zoo_model("gpt2", sequence=16), 1, 2, batch=2, training={"steps": 2})
    res = simulate(p)
    spans = [s for s in res.trace.spans if s.phase.startswith("embedding gradient")]
    assert len(spans) == 2 * 4
    assert sum(s.bytes for s in spans) == pytest.approx(2 * 2 * 50257 * 768 * 4)
    for step, end in enumerate(res.trace.step_ends):
        assert max(s.end_s for s in spans if s.step == step) <= end
