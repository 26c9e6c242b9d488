"""``clustersim search`` against brute force: on a small case it returns the same best
configuration as simulating every way to run the job; what cannot fit is refused before
simulating; cost ranks by dollars per sample; a deadline nobody meets is said in one line."""
import itertools
import json

import pytest

from clustersim import api
from clustersim.cli import main
from clustersim.core.config import ConfigError
from clustersim.core.plan import DoesNotFit, plan

QUICK = "scenarios/quickstart.toml"
BASE = {"training.steps": 1, "model.batch_size": 64, "parallel.replicas": 2}     # global batch 128


def brute_force(devices):
    """Every replicas x devices-per-replica x split x micro-batches x gradient exchange that
    fits on ``devices`` with the global batch of 128, simulated; samples/s of each."""
    out = {}
    for r, m in itertools.product(range(1, devices + 1), repeat=2):
        if r * m > devices or 128 % r:
            continue
        for split, micro, shards in itertools.product(("spatial", "layers"), (1, 2, 4, 8), (0, 1)):
            if (m == 1 and split == "layers") or (split == "spatial" and micro > 1) or (r == 1 and shards):
                continue
            key = (r, m, split, micro, shards)
            try:
                res = api.simulate(QUICK, {**BASE, "parallel.replicas": r, "parallel.model_parallel": m,
                                           "parallel.split": split, "parallel.micro_batches": micro,
                                           "parallel.ps_shards": shards, "model.batch_size": 128 // r},
                                   speedup=False)
            except ConfigError:
                continue
            out[key] = res.samples_per_s
    return out


def test_search_finds_the_brute_force_best():
    everything = brute_force(4)
    best = max(everything.values())
    res = api.search(QUICK, 4, BASE)
    top = res["ranked"][0]
    assert top["samples_per_s"] == pytest.approx(best, rel=1e-12)
    assert all(a["samples_per_s"] >= b["samples_per_s"] for a, b in zip(res["ranked"], res["ranked"][1:]))
    assert all(p["model.batch_size"] * p["parallel.replicas"] == 128 for p in res["ranked"])
    assert "median device busy" in top["why"]


def test_what_cannot_fit_is_refused_before_simulating():
    """AlexNet with a global batch of 65,536 on four 80 GiB A100s: pipelines whose stages
    keep too many micro-batches' activations need more memory than a GPU has; they are
    refused with the memory check's reason, never run.  One GPU would keep 261 GiB of
    activations for the backward: it runs its batch in 4 micro-batches (gradient
    accumulation, a quarter each); four replicas of 16,384 keep 65 GiB each and run whole."""
    res = api.search(QUICK, 4, {"model.name": "alexnet", "model.batch_size": 65536, "parallel.replicas": 1,
                                "training.steps": 1, "cluster.topology": "pcie-4gpu"})
    assert len(res["dropped"]) >= 5 and len(res["ranked"]) > 0
    assert all("does not fit" in d["error"] and d["parallel.split"] == "layers" for d in res["dropped"])
    ranked = {(d["parallel.replicas"], d["parallel.model_parallel"], d["parallel.split"]): d["parallel.micro_batches"]
              for d in res["ranked"]}
    assert ranked[(1, 1, "spatial")] == 4 and ranked[(4, 1, "spatial")] == 1
    assert res["candidates"] == len(res["dropped"]) + len(res["ranked"])
    from clustersim.cli.search import _not_ranked
    assert _not_ranked(res) == f"{len(res['dropped'])} refused before simulating ({len(res['dropped'])} for memory)"


def test_cost_ranks_by_dollars_per_sample_and_a_missed_deadline_says_so(capsys):
    res = api.search(QUICK, 8, {**BASE, "training.dataset_samples": 10**12}, objective="cost", target_hours=1e-6)
    costs = [p["usd_per_hour"] / p["samples_per_s"] for p in res["ranked"]]
    assert costs == sorted(costs)
    assert res["note"].startswith("no configuration trains in 1e-06 h on 8 devices: the fastest takes")
    assert main(["search", QUICK, "--devices", "2", "--json", "--set", "training.steps=1"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and "parallel.replicas" in rows[0] and "why" in rows[0]


def test_cost_counts_the_machines_used_without_a_data_set_size():
    """Without ``training.dataset_samples`` every candidate was priced at $0 (the machines
    used came only with the training-cost keys), so cost ranked in generation order."""
    pairs = list({**BASE, "cluster.topology": "dgx-h100-fat-tree", "cluster.machines": 2}.items())
    price = api.load(QUICK, pairs).topology.price_usd_per_hour
    one = api._search_point(QUICK, pairs + [("parallel.replicas", 8)])
    two = api._search_point(QUICK, pairs + [("parallel.replicas", 16), ("model.batch_size", 32)])
    assert price > 0 and (one["machines_used"], two["machines_used"]) == (1, 2)
    assert (one["usd_per_hour"], two["usd_per_hour"]) == (price, 2 * price)


def test_bad_search_input_is_one_line():
    with pytest.raises(ConfigError, match="--devices"):
        api.search(QUICK, 99)
    with pytest.raises(ConfigError, match="cosim"):
        api.search(QUICK, 2, objective="time-to-accuracy")


def test_time_to_accuracy_trains_each_candidate_and_the_rest_rank_by_accuracy():
    res = api.search(QUICK, 2, {"training.cosim": True, "training.steps": 60, "training.learning_rate": 0.5,
                                "parallel.replicas": 1, "model.batch_size": 64, "training.target_accuracy": 0.5},
                     objective="time-to-accuracy")
    assert any(p.get("time_to_accuracy_s") is not None for p in res["ranked"])
    rest = [p for p in res["ranked"] if p.get("time_to_accuracy_s") is None]
    assert [(-p["accuracy"], p["candidate"]) for p in rest] == sorted((-p["accuracy"], p["candidate"]) for p in rest)
    assert not res["note"]


def test_time_to_accuracy_that_nobody_reaches_is_said_in_one_line(capsys):
    """Three steps reach ~14%: every candidate misses 90%.  Search printed a best by
    time-to-accuracy with no word and no such column; now it says so and ranks by accuracy."""
    over = {"training.cosim": True, "training.steps": 3, "parallel.replicas": 1, "model.batch_size": 64}
    res = api.search(QUICK, 2, over, objective="time-to-accuracy")
    assert res["ranked"] and all(p["time_to_accuracy_s"] is None for p in res["ranked"])
    accuracy = [p["accuracy"] for p in res["ranked"]]
    assert accuracy == sorted(accuracy, reverse=True)
    assert res["note"].startswith("no configuration reaches 90% accuracy in 3 steps: ranked by the accuracy")
    args = ["search", QUICK, "--devices", "2", "--objective", "time-to-accuracy"]
    assert main(args + [f"--set={k}={str(v).lower()}" for k, v in over.items()]) == 0
    out = capsys.readouterr().out
    assert "to accuracy (s)" in out and "# no configuration reaches 90% accuracy" in out


def test_a_search_whose_every_run_stalls_says_so_and_exits_3(capsys):
    """Downpour on 2 devices with machines failing at once: the one candidate that can run
    (two replicas, two shards) stalls, the others are refused (no shard).  Search exited 2
    naming the first refusal, a parameter server, as if the input were bad."""
    args = ["search", "scenarios/downpour.toml", "--devices", "2", "--set", "faults.mtbf_s=0.000001"]
    assert main(args) == 3
    out = capsys.readouterr().out
    assert "7 refused before simulating (7 by parallel.ps_shards), 1 stalled -- none ranked" in out
    assert "# every configuration that ran stalled (1); the first: waiting forever" in out
    assert main(args + ["--json"]) == 3
    assert json.loads(capsys.readouterr().out) == []
    res = api.search("scenarios/downpour.toml", 2, {"faults.mtbf_s": 1e-6})
    assert res["refused"] == 7 and len(res["stalled"]) == 1 and res["dropped"][-1] is res["stalled"][0]


def test_the_scenarios_own_deadline_ranks_as_target_hours_does(capsys):
    """``training.target_hours`` in the scenario was reported per row but not used: no note
    when nobody meets it, deadline-meeting rows not first."""
    over = {**BASE, "training.dataset_samples": 10**9}
    for hours in (0.1, 0.13):                          # nobody meets it; some do
        flag = api.search(QUICK, 4, over, objective="cost", target_hours=hours)
        scenario = api.search(QUICK, 4, {**over, "training.target_hours": hours}, objective="cost")
        assert [p["candidate"] for p in scenario["ranked"]] == [p["candidate"] for p in flag["ranked"]]
        assert scenario["note"] == flag["note"]
    meeting = sum(p["meets_target"] for p in flag["ranked"])      # some: the order restarts where they end
    assert 0 < meeting < len(flag["ranked"]) and all(p["meets_target"] for p in flag["ranked"][:meeting])
    assert flag["note"] == (f"ranked first: the {meeting} that train in 0.13 h (in time: yes), then the "
                            f"{len(flag['ranked']) - meeting} that do not")
    assert main(["search", QUICK, "--devices", "4", "--objective", "cost", "--target-hours", "0.13"]
                + [a for k, v in over.items() for a in ("--set", f"{k}={v}")]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "in time" in line)
    assert header.split().count("time") == 1 and "  yes  " in out and "True" not in out   # booleans as yes / no
    assert api.search(QUICK, 4, {**over, "training.target_hours": 0.1})["note"].startswith("no configuration trains")
    off = api.search(QUICK, 4, {**over, "training.target_hours": 0.1}, objective="cost", target_hours=0)
    assert off["note"] == "" and not any("meets_target" in p for p in off["ranked"])      # --target-hours 0: none
    with pytest.raises(ConfigError, match="training.target_hours: a deadline needs training.dataset_samples"):
        api.load(QUICK, {"training.target_hours": 1.0})


def test_prices_and_times_to_train_show_as_the_topology_gives_them(capsys):
    """Cost without a data set's size ranked by dollars an hour it did not show; a topology
    with no price dropped the time-to-train column and gave $0 an hour (free)."""
    assert main(["search", QUICK, "--devices", "2", "--objective", "cost", "--set", "training.steps=1"]) == 0
    assert "$/h" in capsys.readouterr().out
    args = ["search", QUICK, "--devices", "2", "--set", "cluster.topology=pcie-4gpu", "--set", "training.steps=1",
            "--set", "training.dataset_samples=100000000", "--target-hours", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "to train (s)" in out and "$/h" not in out and "cost ($)" not in out
    assert main(args + ["--json"]) == 0
    assert all(p["usd_per_hour"] is None for p in json.loads(capsys.readouterr().out))


def test_transformers_are_searched_under_the_tensor_split_too():
    """Megatron's split is a candidate where the model has attention, not for a CNN."""
    from clustersim.search_space import candidates
    splits = {}
    for model in ("gpt2", "alexnet"):
        sc = api.load("scenarios/quickstart.toml", [f"model.name={model!r}".replace("'", '"'), "model.batch_size=8",
                                                     "parallel.replicas=1"])
        splits[model] = {c["parallel.split"] for c in candidates(sc, 8)}
    assert splits["gpt2"] == {"spatial", "layers", "tensor"} and splits["alexnet"] == {"spatial", "layers"}
    sc = api.load("scenarios/quickstart.toml", ['model.name="gpt2"', "model.batch_size=8", "parallel.replicas=1"])
    tensor = [c for c in candidates(sc, 8) if c["parallel.split"] == "tensor"]
    assert tensor and all(c["parallel.ps_shards"] == 0 for c in tensor)    # the scenario check refuses shards


def test_a_candidate_whose_activations_do_not_fit_is_tried_with_recomputation():
    """GPT-2 (bf16, Adam, 1,024 positions) at 128 sequences on one 80 GiB H100 does not fit
    for its activations; without attention's score matrices (selective recomputation) it
    does, and search ranks it so, ``training.recompute`` among its keys.  A scenario that
    sets recomputation is left as it is; a candidate whose weights and optimizer state alone
    do not fit is not planned again."""
    from clustersim.core.plan import DoesNotFit
    from clustersim.search_space import recompute_tries
    pairs = [("model.name", "gpt2"), ("model.dtype", "bf16"), ("model.batch_size", 128), ("parallel.replicas", 1),
             ("cluster.topology", "dgx-h100"), ("training.optimizer", "adam"), ("training.steps", 1)]
    one = {"parallel.model_parallel": 1, "parallel.replicas": 1}
    with pytest.raises(DoesNotFit, match="largest: activations"):
        api.plan(api.load(QUICK, pairs + list(one.items())))
    assert recompute_tries(api.load(QUICK, pairs)) == ["selective", "full"]
    assert recompute_tries(api.load(QUICK, [("model.name", "alexnet")])) == ["full"]
    assert recompute_tries(api.load(QUICK, pairs + [("training.recompute", "selective")])) == []
    assert recompute_tries(api.load(QUICK, pairs + [("training.recompute", False)])) == []    # said: none
    kept, error, short = api._fitting(QUICK, pairs, one, [[{"training.recompute": "selective"},
                                                           {"training.recompute": "full"}]])
    assert (kept, error) == ([{**one, "training.recompute": "selective"}], "") and short[0] > 1   # the candidate's
    kept, error, short = api._fitting(QUICK, pairs, one, [])
    assert kept == [] and "does not fit" in error and short[0] > 1 and error.endswith(short[1])
    res = api.search(QUICK, 1, dict(pairs))                # and 2 micro-batches (gradient accumulation)
    assert {(p["training.recompute"] if "training.recompute" in p else "", p["parallel.micro_batches"])
            for p in res["ranked"]} == {("selective", 1), ("", 2)}
    big = pairs[1:] + [("model.name", "megatron-18.4b"), ("model.batch_size", 1)]
    kept, error, _ = api._fitting(QUICK, big, one, [[{"training.recompute": "selective"}]])
    assert kept == [] and "largest: optimizer" in error


def test_tensor_candidates_come_with_and_without_sequence_parallelism():
    """A model with attention is tried under the tensor split with and without sequence
    parallelism (Korthikanti et al. 2022) where its positions divide by the slots; other
    splits and models without attention never set it."""
    from clustersim.search_space import candidates
    gpt = api.load(QUICK, [("model.name", "gpt2"), ("model.sequence", 36), ("cluster.topology", "dgx-h100")])
    cands = candidates(gpt, 8)
    tensor = [c for c in cands if c["parallel.split"] == "tensor" and c["parallel.pipeline"] == 1]
    def key(c):
        return tuple(sorted((k, v) for k, v in c.items() if k not in ("parallel.sequence_parallel", "parallel.grid")))
    plain = {key(c) for c in tensor if not c["parallel.sequence_parallel"]}
    seq = {key(c) for c in tensor if c["parallel.sequence_parallel"]}
    assert {dict(c)["parallel.model_parallel"] for c in plain} == {2, 4, 8}
    assert seq == {c for c in plain if 36 % dict(c)["parallel.model_parallel"] == 0} and len(seq) < len(plain)
    assert not any(c["parallel.sequence_parallel"] for c in cands if c["parallel.split"] != "tensor")
    assert not any(c["parallel.sequence_parallel"] for c in candidates(api.load(QUICK, BASE), 8))


def test_a_scenarios_zero_is_off_where_a_candidate_has_one_replica():
    """ZeRO with one replica is refused (nothing to shard over); search's one-replica
    candidates of a ZeRO scenario run without it."""
    res = api.search(QUICK, 1, {"training.zero": 1, "training.optimizer": "adam", "training.steps": 1})
    assert [(p["parallel.replicas"], p["training.zero"]) for p in res["ranked"]] == [(1, 0)]
    res = api.search(QUICK, 2, {"training.zero": 1, "training.steps": 1})
    assert {(p["parallel.ps_shards"] > 0, p.get("training.zero", 1)) for p in res["ranked"]
            if p["parallel.replicas"] == 2} == {(False, 1), (True, 0)}    # ZeRO is sync's without shards
    res = api.search(QUICK, 2, {"training.zero": 1, "training.optimizer": "adam", "training.steps": 1})
    assert not any(p["parallel.ps_shards"] for p in res["ranked"] + res["dropped"])   # shards apply sgd, not adam
    assert res["refused"] == 0                        # not made to be refused (48 of 182 on 32 GPUs)
    # a one-replica scenario may ask for ZeRO: search
    # chooses the replicas, and its rows with several shard as asked
    res = api.search(QUICK, 2, {"training.zero": 1, "training.steps": 1, "parallel.replicas": 1})
    assert {(p["parallel.replicas"], p["parallel.ps_shards"] > 0, p["training.zero"]) for p in res["ranked"]} == \
        {(1, False, 0), (2, False, 1), (2, True, 0)}
    with pytest.raises(ConfigError, match="training.zero"):
        api.simulate(QUICK, {"training.zero": 1, "training.optimizer": "adam", "parallel.replicas": 1})


def test_pipelines_of_tensor_slices_fill_the_devices_as_megatron_lays_them_out():
    """Models with attention are also tried as t tensor slots inside one machine x p >= 2
    stages x the replicas that fill the devices, with p and 4p micro-batches (what fits the
    batch) and sequence parallelism where the positions divide by t; each plans to p stages
    on t x p devices a replica.  A CNN gets none."""
    from clustersim.search_space import candidates, pipelines
    sc = api.load(QUICK, [("model.name", "gpt-tiny"), ("model.batch_size", 8), ("parallel.replicas", 1),
                          ("cluster.topology", "dgx-h100-fat-tree"), ("cluster.machines", 2), ("training.steps", 1)])
    found = pipelines(sc, 16)
    assert found and all(c in candidates(sc, 16) for c in found)
    # 2 blocks in 3 pieces (a stage ends between whole blocks): 2 stages of 2 or 4 slots (4 heads)
    assert {(c["parallel.model_parallel"], c["parallel.pipeline"]) for c in found} == {(2, 2), (4, 2)}
    for c in found:
        t, p, r = c["parallel.model_parallel"], c["parallel.pipeline"], c["parallel.replicas"]
        assert t * p * r == 16 and c["parallel.split"] == "tensor"
        assert c["parallel.micro_batches"] in (p, 4 * p) and c["parallel.micro_batches"] <= c["model.batch_size"]
        assert c["model.batch_size"] * r == 8
        assert c["parallel.sequence_parallel"] == (16 % t == 0)
        res = api.simulate(QUICK, [("model.name", "gpt-tiny"), ("cluster.topology", "dgx-h100-fat-tree"),
                                   ("cluster.machines", 2), ("training.steps", 1), *c.items()], speedup=False)
        assert res.data["pipeline_stages"] == p and len(set(res.plan.devices[0])) == t * p
    odd = api.load(QUICK, [("model.name", "gpt-tiny"), ("model.sequence", 6), ("model.batch_size", 8),
                           ("parallel.replicas", 1), ("cluster.topology", "dgx-h100")])
    assert {(c["parallel.model_parallel"], c["parallel.sequence_parallel"]) for c in pipelines(odd, 8)} == \
        {(2, True), (4, False)}                                  # 6 positions: not by 4
    gpt2 = api.load(QUICK, [("model.name", "gpt2"), ("model.batch_size", 8), ("parallel.replicas", 1),
                            ("cluster.topology", "dgx-h100-fat-tree"), ("cluster.machines", 2)])
    assert {c["parallel.model_parallel"] for c in pipelines(gpt2, 16)} == {2, 4}   # 12 heads: not by 8
    cnn = api.load(QUICK, [("model.name", "alexnet"), ("cluster.topology", "dgx-h100")])
    assert not any(c["parallel.pipeline"] > 1 for c in candidates(cnn, 8))


@pytest.mark.parametrize("seed", range(6))
def test_stages_balance_as_the_best_partition_into_exactly_m(seed):
    """``balanced_stages`` uses all m stages where there are m layers or more, and its
    costliest stage is the least any partition into m contiguous stages has (brute force);
    a head costing more than its share no longer leaves stages empty."""
    import random
    from clustersim.core.partition import balanced_stages
    rng = random.Random(seed)
    for _ in range(30):
        n = rng.randint(1, 8)
        costs = [rng.choice([1.0, 2.0, 3.0, 10.0, rng.random() * 5]) for _ in range(n)]
        for m in range(1, n + 2):
            assign = balanced_stages(costs, m)
            assert assign == sorted(assign) and assign[0] == 0
            assert len(set(assign)) == min(m, n) and set(assign) == set(range(min(m, n)))
            worst = max(sum(c for c, s in zip(costs, assign) if s == g) for g in set(assign))
            best = min(max(sum(costs[a:b]) for a, b in zip((0, *cuts), (*cuts, n)))
                       for cuts in itertools.combinations(range(1, n), min(m, n) - 1))
            assert worst == pytest.approx(best, rel=1e-9)
    head = balanced_stages([1.0] * 12 + [6.0], 8)        # 12 blocks and a head of six blocks' work
    assert set(head) == set(range(8)) and head[-1] == 7 and head.count(7) == 1     # all 8 stages, the head alone


def test_the_table_shows_stages_only_where_a_shown_row_is_a_pipeline_of_tensor_slices():
    from clustersim.cli.search import table_columns
    row = {"parallel.replicas": 2, "parallel.model_parallel": 8, "parallel.split": "tensor", "parallel.pipeline": 1,
           "parallel.micro_batches": 1, "parallel.ps_shards": 0, "samples_per_s": 1.0, "why": ""}
    flat = [h for _, h in table_columns([row], "time")]
    assert "x stages" not in flat and flat[:3] == ["replicas", "per replica", "split"]
    piped = table_columns([row, {**row, "parallel.pipeline": 4, "parallel.micro_batches": 16}], "time")
    assert piped[:3] == [("parallel.replicas", "replicas"), ("parallel.model_parallel", "per replica"),
                         ("parallel.pipeline", "x stages")]


def test_candidates_split_the_batch_evenly_and_keep_the_scenarios_allreduce():
    """Micro-batches divide the replica's batch (Megatron-LM requires it): p or 4p rounded up
    to the next divisor (10 sequences in 10, not 8; 5 in 5, not 2), no layout dropped for
    want of one; a scenario's allreduce algorithm stays."""
    from clustersim.search_space import candidates
    sc = api.load(QUICK, [("model.name", "gpt-tiny"), ("model.batch_size", 20), ("parallel.replicas", 1),
                          ("cluster.topology", "dgx-h100-fat-tree"), ("cluster.machines", 2),
                          ("training.allreduce", "ring")])
    cands = candidates(sc, 16)
    assert all(c["model.batch_size"] % c["parallel.micro_batches"] == 0 for c in cands)
    micro: dict = {}
    for c in cands:
        if c["parallel.pipeline"] > 1:
            key = (c["parallel.model_parallel"], c["parallel.pipeline"], c["parallel.replicas"])
            micro.setdefault(key, set()).add(c["parallel.micro_batches"])
    assert micro == {(2, 2, 4): {5}, (4, 2, 2): {2, 10}}      # gpt-tiny's 2 blocks: 2 stages
    assert {c["training.allreduce"] for c in cands if not c.get("parallel.ps_shards")} == {"ring"}
    assert {c["training.allreduce"] for c in cands if c.get("parallel.ps_shards")} == {"auto"}   # R48: no shard's


def test_a_tensor_group_never_spans_two_machines_of_six():
    """Machines of 6 devices: tensor 4 would start a group at device 4 of a machine and end
    it on the next; only tensor sizes dividing every machine's count are tried."""
    import dataclasses
    from clustersim.search_space import pipelines

    class SixAMachine:                                     # only what ``pipelines`` asks of a topology
        def compute_devices(self):
            return [f"m{m}.gpu{k}" for m in range(2) for k in range(6)]

        def machine_of(self, d):
            return int(d[1])
    sc = api.load(QUICK, [("model.name", "gpt2"), ("model.batch_size", 6), ("parallel.replicas", 1)])
    found = pipelines(dataclasses.replace(sc, topology=SixAMachine()), 12)
    assert found and {c["parallel.model_parallel"] for c in found} == {2}


def test_a_parameter_server_row_is_the_same_on_a_larger_cluster():
    """Search's parameter-server rows keep their shards on the machines the replicas use
    (``parallel.ps_placement = "local"``: their free devices, then their CPUs), so a row
    gives one answer whatever the cluster's size, where the default ("spare") takes a free
    GPU of another machine on a larger cluster; "local" without shards is refused."""
    rows = {}
    for machines in (1, 2):
        res = api.search(QUICK, 8, {"cluster.topology": "dgx-h100-fat-tree", "cluster.machines": machines,
                                    "training.steps": 1, "model.batch_size": 8, "parallel.replicas": 8})
        rows[machines] = {(p["parallel.replicas"], p["parallel.model_parallel"], p["parallel.split"],
                           p["parallel.micro_batches"]): p["samples_per_s"]
                          for p in res["ranked"] if p["parallel.ps_shards"]}
    assert rows[1] and rows[1] == rows[2]
    plain = api.plan(api.load(QUICK, {"cluster.topology": "dgx-h100-fat-tree", "cluster.machines": 2,
                                      "parallel.replicas": 8, "model.batch_size": 8, "parallel.ps_shards": 1}))
    assert plain.ps.devices == ("m1.gpu0",)                    # spare: the first device the job leaves free
    with pytest.raises(ConfigError, match="parallel.ps_placement"):
        api.load(QUICK, {"parallel.ps_placement": "local"})
    # machine by machine: m0 has no free GPU, so its host CPU, then a free GPU of m1
    three = api.plan(api.load(QUICK, {"cluster.topology": "dgx-h100-fat-tree", "cluster.machines": 3,
                                      "parallel.replicas": 12, "model.batch_size": 8, "parallel.ps_shards": 2,
                                      "parallel.ps_placement": "local"}))
    assert three.ps.devices == ("m0.cpu", "m1.gpu4")
    # CPU machines (DistBelief's): no free device on the used machines, so the replicas' own
    cpu_rows = []
    for machines in (2, 4):
        res = api.search(QUICK, 2, {"cluster.topology": "distbelief-2012", "cluster.machines": machines,
                                    "training.steps": 1, "model.batch_size": 8, "parallel.replicas": 2})
        cpu_rows.append([p["samples_per_s"] for p in res["ranked"] if p["parallel.ps_shards"]])
    assert cpu_rows[0] and cpu_rows[0] == cpu_rows[1]
    # a scenario of local shards: its allreduce rows (no shards) go back to the default, not refused
    res = api.search(QUICK, 2, {"parallel.ps_shards": 1, "parallel.ps_placement": "local", "training.steps": 1,
                                "parallel.replicas": 2, "model.batch_size": 32})
    assert res["refused"] == 0 and any(not p["parallel.ps_shards"] for p in res["ranked"])
    # R48: and a scenario's allreduce or buckets are no shard row's (they were refused, every one)
    for chosen in ({"training.allreduce": "tree"}, {"training.bucket_mb": 10}):
        default, picked = (api.search(QUICK, 8, {"training.steps": 1, **over}) for over in ({}, chosen))
        assert picked["refused"] == default["refused"]
        assert sum(1 for p in picked["ranked"] if p["parallel.ps_shards"]) == \
            sum(1 for p in default["ranked"] if p["parallel.ps_shards"]) > 0
        # U48: a shard row runs with the defaults but does not show them: it has no allreduce
        assert not any(k in p for p in picked["ranked"] + picked["dropped"] if p["parallel.ps_shards"]
                       for k in ("training.allreduce", "training.bucket_mb"))
        assert all("training.allreduce" in p for p in picked["ranked"] if not p["parallel.ps_shards"])


def test_a_candidate_whose_activations_do_not_fit_accumulates_gradients_before_recomputing():
    """Search met a replica's activations only by recomputation (or a pipeline), so a
    plain data-parallel row with 2 micro-batches, 14% faster than its best, was never
    tried.  Micro-batches keep the step's samples and FLOPs: tried first, fewest first."""
    from clustersim.search_space import memory_tries
    base = [("model.name", "gpt2"), ("model.batch_size", 256), ("model.dtype", "bf16"), ("parallel.replicas", 1),
            ("cluster.topology", "dgx-h100"), ("training.optimizer", "adam")]
    sc = api.load(QUICK, base)
    cand = {"parallel.model_parallel": 1, "parallel.split": "spatial", "parallel.replicas": 1,
            "model.batch_size": 256, "parallel.micro_batches": 1, "parallel.pipeline": 1}
    micro, recompute = memory_tries(sc, cand)
    assert micro == [{"parallel.micro_batches": k} for k in (2, 4, 8, 16, 32, 64, 128, 256)]
    assert recompute == [{"training.recompute": "selective"}, {"training.recompute": "full"}]
    fitted, error, _ = api._fitting(QUICK, base, cand, [micro, recompute])
    # 256 sequences keep ~241 GiB at once: in 4 micro-batches they fit; selective recomputation
    # alone (the scores dropped) does not, full does -- both simulated, the faster ranks
    assert not error and fitted == [{**cand, "parallel.micro_batches": 4}, {**cand, "training.recompute": "full"}]
    with pytest.raises(DoesNotFit):                                           # 2 were not enough
        plan(api.load(QUICK, base + [("parallel.micro_batches", 2)]), ops=False)
    piped = {**cand, "parallel.split": "layers", "parallel.model_parallel": 2}
    assert memory_tries(sc, piped) == [recompute]                  # a pipeline has its own micro-batches


def test_when_no_split_fits_the_error_names_the_nearest_to_fitting(capsys):
    """U46: GPT-3 on 8 GPUs named the one-GPU candidate (~33x short) though tensor 8 came
    closest (2.7x), and the file twice."""
    args = ["search", QUICK, "--devices", "8", "--set", "cluster.machines=1", "--set", 'model.name="gpt3-175b"',
            "--set", "model.batch_size=1", "--set", "parallel.replicas=1"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count(QUICK) == 1 and err.count("\n") == 1
    ratio = float(err.split("the nearest to fitting needs ")[1].split("x")[0])
    need, have = (float(err.split(" needs ")[2].split(" GiB")[0]), float(err.split(" but has ")[1].split(" GiB")[0]))
    assert ratio == pytest.approx(need / have, rel=1e-2) and 1 < ratio < 3


def test_the_nearest_refusal_is_named_with_its_own_shortfall(tmp_path, capsys):
    """R47: the least need / have among a candidate's tries (256 micro-batches: 1.34x) was
    printed beside the last try's error (full recomputation: 41x)."""
    topo = tmp_path / "small.toml"
    topo.write_text('name = "small"\n[[device]]\nname = "g0"\nkind = "gpu"\npeak_tflops_fp32 = 60\n'
                    'memory_gib = 0.2\nmemory_bandwidth_gbps = 3000\nefficiency = 0.7\n')
    args = ["search", QUICK, "--devices", "1", "--set", 'model.name="resnet-50"', "--set", "model.batch_size=256",
            "--set", "parallel.replicas=1", "--set", f'cluster.topology="{topo}"']
    assert main(args) == 2
    err = capsys.readouterr().err
    ratio = float(err.split("the nearest to fitting needs ")[1].split("x")[0])
    need, have = (float(err.split(" needs ")[2].split(" GiB")[0]), float(err.split(" but has ")[1].split(" GiB")[0]))
    assert ratio == pytest.approx(need / have, rel=2e-2) and ratio < 2


@pytest.mark.parametrize("hours", [float("nan"), float("inf"), -1.0])
def test_a_deadline_that_is_no_number_is_named_as_the_option(hours):
    """U51: --target-hours nan was taken, then every candidate refused it as
    training.target_hours ("no configuration can run")."""
    with pytest.raises(ConfigError, match=r"--target-hours: .*: must be a finite number >= 0"):
        api.search(QUICK, 4, {**BASE, "training.dataset_samples": 10**6}, objective="cost", target_hours=hours)
