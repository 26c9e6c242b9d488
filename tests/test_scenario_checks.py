"""Scenario checks: sequence parallelism needs positions that split evenly over the tensor
slots (Megatron-LM's reduce-scatter asserts it), and ``model.attention`` is refused on a
model without attention layers (it would change nothing).  Each refusal is one
line naming the file and the field, and the command exits 2."""
import re
from pathlib import Path

import pytest

from clustersim.cli import main
from clustersim.core.config import ConfigError
from clustersim.core.scenario import scenario_from_dict

ATTENTION_FILE = 'input = [8, 6, 1]\n[[layer]]\nkind = "attention"\nheads = 2\n[[layer]]\nkind = "softmax_xent"\n'


def load(model: dict, parallel: dict | None = None, file: str = "t.toml"):
    return scenario_from_dict({"cluster": {"topology": "dgx-h100"}, "model": model, "parallel": parallel or {}}, file)


def tensor(m: int, sequence_parallel: bool = True) -> dict:
    return {"split": "tensor", "model_parallel": m, "sequence_parallel": sequence_parallel}


@pytest.mark.parametrize("sequence, m", [(100, 8), (1022, 4), (6, 4), (2, 4)])
def test_sequence_parallel_refuses_positions_not_a_multiple_of_the_tensor_slots(sequence, m):
    with pytest.raises(ConfigError, match=rf"^t.toml: parallel.sequence_parallel: .* gpt2's {sequence} are not a "
                                          rf"multiple of {m} \(set model.sequence\)$"):
        load({"name": "gpt2", "sequence": sequence}, tensor(m))


def test_the_default_context_counts_as_the_sequence():
    """gpt2's 1,024 positions over 3 slots (12 heads split 3 ways, so only the positions fail)."""
    with pytest.raises(ConfigError, match="gpt2's 1024 are not a multiple of 3"):
        load({"name": "gpt2"}, tensor(3))
    assert load({"name": "gpt2"}, tensor(4)).model.input_shape == (1, 1024, 1)


@pytest.mark.parametrize("sequence, m", [(96, 4), (16, 2), (100, 1)])
def test_positions_a_multiple_of_the_slots_are_accepted(sequence, m):
    sc = load({"name": "gpt2", "sequence": sequence}, tensor(m))
    assert sc.parallel.sequence_parallel and sc.parallel.tensor == m


def test_uneven_positions_stay_allowed_without_sequence_parallelism():
    """Only the reduce-scatter by positions needs the even split; plain tensor slots hold whole positions."""
    assert not load({"name": "gpt2", "sequence": 100}, tensor(4, sequence_parallel=False)).parallel.sequence_parallel


def test_a_model_files_positions_are_checked_and_the_message_points_at_its_input(tmp_path):
    (tmp_path / "att.toml").write_text(ATTENTION_FILE)
    with pytest.raises(ConfigError, match=r"att's 6 are not a multiple of 4 \(set the model file's input\)$"):
        load({"file": "att.toml"}, tensor(4), file=str(tmp_path / "s.toml"))
    assert load({"file": "att.toml"}, tensor(2), file=str(tmp_path / "s.toml")).parallel.tensor == 2


def test_a_warm_start_is_every_asynchronous_algorithms():
    """Downpour, DC-ASGD and SSP share the warm start (sim.algorithms.downpour): none of
    them refuses it."""
    for algorithm in ("downpour", "dcasgd", "ssp"):
        data = {"cluster": {"topology": "dgx-h100"}, "model": {"name": "mlp-digits", "batch_size": 32},
                "parallel": {"replicas": 4, "ps_shards": 1}, "training": {"algorithm": algorithm, "warm_start_s": 0.1}}
        assert scenario_from_dict(data, "t.toml").training.warm_start_s == 0.1


def test_an_emptied_model_name_switches_a_scenario_to_a_model_file(tmp_path):
    """``--set model.name= --set model.file=X`` switches a scenario that names a built-in
    model to a file; both empty, or both given, stays refused."""
    (tmp_path / "att.toml").write_text(ATTENTION_FILE)
    s = str(tmp_path / "s.toml")
    assert load({"name": "", "file": "att.toml"}, file=s).model.name == "att"
    assert load({"name": "gpt2", "file": ""}, file=s).model.name == "gpt2"
    for model in ({"name": "", "file": ""}, {"name": "gpt2", "file": "att.toml"}):
        with pytest.raises(ConfigError, match="give exactly one of model.name"):
            load(model, file=s)


@pytest.mark.parametrize("name", ["alexnet", "mlp-digits", "resnet-50"])
@pytest.mark.parametrize("mode", ["eager", "fused", "flash"])
def test_attention_on_a_zoo_model_without_attention_is_refused(name, mode):
    with pytest.raises(ConfigError, match=f"^t.toml: model.attention: {name} has no attention layers$"):
        load({"name": name, "attention": mode})
    assert load({"name": name}).attention == "eager"        # not given: nothing to refuse


def test_attention_on_models_with_attention_layers_is_kept(tmp_path):
    assert load({"name": "gpt-tiny", "attention": "flash", "dtype": "bf16"}).attention == "flash"
    with pytest.raises(ConfigError, match=r"model\.attention: FlashAttention runs in fp16 or bf16; model\.dtype is fp32"):
        load({"name": "gpt-tiny", "attention": "flash"})
    (tmp_path / "att.toml").write_text(ATTENTION_FILE)
    assert load({"file": "att.toml", "attention": "fused", "dtype": "fp16"},
                file=str(tmp_path / "s.toml")).attention == "fused"


def test_attention_on_an_onnx_model_is_refused(tmp_path):
    """The ONNX importer maps no operator onto an attention layer, so an imported graph never has one."""
    pytest.importorskip("onnx")
    import numpy as np
    from test_onnx_import import Net
    net = Net([1, 4], np.random.default_rng(0))
    net.save(tmp_path / "mlp.onnx", net("Gemm", ["x", net.init("w", 3, 4), net.init("b", 3)], "y", transB=1))
    with pytest.raises(ConfigError, match="model.attention: mlp has no attention layers"):
        load({"file": "mlp.onnx", "attention": "flash"}, file=str(tmp_path / "s.toml"))


@pytest.mark.parametrize("sets, message", [
    (["model.name=gpt2", "model.sequence=100", "parallel.split=tensor", "parallel.model_parallel=8",
      "parallel.sequence_parallel=true"], "parallel.sequence_parallel: cuts positions evenly over the 8"),
    (["model.attention=flash"], "model.attention: mlp-digits has no attention layers"),
])
def test_the_command_exits_2_with_one_line(capsys, sets, message):
    argv = ["plan", Path(__file__).resolve().parents[1] / "scenarios" / "quickstart.toml"]
    for s in sets:
        argv += ["--set", s]
    code = main([str(a) for a in argv])
    _, err = capsys.readouterr()
    assert code == 2 and message in err and "quickstart.toml" in err and err.count("\n") == 1
    assert "Traceback" not in err


def test_sandblasters_eight_bit_messages_are_real_and_accepted():
    """Review R21: Sandblaster's pushes and fetches go through the parameter server's 8-bit
    path (simulator and executor); the refusal took them for ignored."""
    data = {"cluster": {"topology": "dgx-h100"}, "model": {"name": "mlp-digits", "batch_size": 32},
            "parallel": {"replicas": 4, "ps_shards": 1}, "training": {"algorithm": "sandblaster", "comm_bits": 8}}
    assert scenario_from_dict(data, "t.toml").training.comm_bits == 8


@pytest.mark.parametrize("training, parallel, faults, field", [
    ({"algorithm": "sync", "optimizer": "adagrad"}, {"ps_shards": 1}, {}, "training.optimizer"),
    ({"algorithm": "sync", "optimizer": "adam"}, {"ps_shards": 1}, {}, "training.optimizer"),   # shards: sgd
    ({"algorithm": "sync", "n_push": 4}, {"ps_shards": 1}, {}, "training.n_push"),
    ({"algorithm": "local", "n_fetch": 2}, {}, {}, "training.n_fetch"),
    ({"algorithm": "downpour", "backup_workers": 1}, {"ps_shards": 1}, {}, "training.backup_workers"),
    ({"algorithm": "local", "comm_bits": 8}, {}, {}, "training.comm_bits"),
    ({"algorithm": "layerwise", "comm_bits": 8}, {"replicas": 1, "split": "layers", "model_parallel": 2}, {},
     "training.comm_bits"),                   # U39: it said "set ... ps_shards >= 1", which layerwise refuses
    ({"algorithm": "local"}, {"ps_shards": 1}, {}, "parallel.ps_shards"),     # U39: plan placed shards, labelled "ps"
    ({"algorithm": "downpour"}, {"ps_shards": 1}, {"checkpoint_every": 5}, "faults.checkpoint_every"),
    ({"algorithm": "ssp"}, {"ps_shards": 1}, {"on_failure": "restart"}, "faults.on_failure"),
    ({"algorithm": "downpour", "staleness": 2}, {"ps_shards": 1}, {}, "training.staleness"),
    ({"algorithm": "downpour", "local_steps": 3}, {"ps_shards": 1}, {}, "training.local_steps"),
    ({"algorithm": "ssp", "dcasgd_lambda": 0.1}, {"ps_shards": 1}, {}, "training.dcasgd_lambda"),
    ({"algorithm": "downpour", "dcasgd_adaptive": True}, {"ps_shards": 1}, {}, "training.dcasgd_adaptive"),
    ({"algorithm": "downpour", "work_units": 3}, {"ps_shards": 1}, {}, "training.work_units"),
    ({"algorithm": "sync", "backup_tasks": False}, {}, {}, "training.backup_tasks"),
    ({"algorithm": "sync", "lbfgs_history": 5}, {}, {}, "training.lbfgs_history"),
    ({"algorithm": "sync", "comm_interval": 3}, {}, {}, "training.comm_interval"),
    ({"algorithm": "sync", "warm_start_s": 0.1}, {"ps_shards": 1}, {}, "training.warm_start_s"),
    ({"algorithm": "sync", "start_spread_s": 0.01}, {}, {}, "training.start_spread_s"),
    ({"algorithm": "layerwise", "time_limit_s": 0.1}, {"replicas": 1, "split": "layers", "model_parallel": 2}, {},
     "training.time_limit_s"),
    ({"algorithm": "downpour"}, {"ps_shards": 1}, {"detect_timeout_s": 2.0}, "faults.detect_timeout_s"),
    ({"algorithm": "local"}, {}, {"restart_s": 5.0}, "faults.restart_s"),
    ({"algorithm": "dcasgd"}, {"ps_shards": 1}, {"checkpoint_gbps": 5.0}, "faults.checkpoint_gbps"),
    ({"algorithm": "ssp"}, {"ps_shards": 1}, {"shard_checkpoint_every": 5}, "faults.shard_checkpoint_every"),
    ({"algorithm": "sync", "allreduce": "ring"}, {"ps_shards": 1}, {}, "training.allreduce"),     # U47: same step
    ({"algorithm": "downpour", "allreduce": "tree"}, {"ps_shards": 1}, {}, "training.allreduce"),
    ({"algorithm": "sync", "bucket_mb": 0}, {"ps_shards": 1}, {}, "training.bucket_mb"),
    ({"algorithm": "local", "bucket_mb": 50}, {}, {}, "training.bucket_mb"),
])
def test_a_setting_the_algorithm_would_ignore_is_refused(training, parallel, faults, field):
    """Each of these ran as if it were not there, the output identical."""
    data = {"cluster": {"topology": "dgx-h100"}, "model": {"name": "mlp-digits", "batch_size": 32},
            "parallel": {"replicas": 4, **parallel}, "training": training, "faults": faults}
    with pytest.raises(ConfigError, match=rf"^t.toml: {field}: .*; {training['algorithm']} would ignore it$"):
        scenario_from_dict(data, "t.toml")
    section, key = field.split(".")
    data[section].pop(key)
    scenario_from_dict(data, "t.toml")                    # without it, the same scenario loads


@pytest.mark.parametrize("algorithm, rule", [("local", "its replicas step sgd"), ("downpour", "its shards apply sgd or "
                                                                                                "adagrad")])
def test_adam_outside_sync_says_what_the_algorithm_steps(algorithm, rule):
    """U39: local SGD with Adam was told "local's shards apply sgd or adagrad": it has no
    shards, and adagrad is refused for it too."""
    data = {"cluster": {"topology": "dgx-h100"}, "model": {"name": "mlp-digits", "batch_size": 32},
            "parallel": {"replicas": 4, "ps_shards": 0 if algorithm == "local" else 1},
            "training": {"algorithm": algorithm, "optimizer": "adam"}}
    with pytest.raises(ConfigError, match=rf"^t.toml: training.optimizer: adam is sync's optimizer; {algorithm} "
                                          rf"would ignore it \({rule}\)$"):
        scenario_from_dict(data, "t.toml")


def test_more_work_units_than_samples_are_refused():
    """U39: 100 units of a batch of 64 ran as 64 units of one sample, without a word."""
    data = {"cluster": {"topology": "dgx-h100"}, "model": {"name": "mlp-digits", "batch_size": 32},
            "parallel": {"replicas": 4, "ps_shards": 1}, "training": {"algorithm": "sandblaster", "work_units": 129}}
    with pytest.raises(ConfigError, match=r"^t.toml: training.work_units: a unit is at least one sample: at most "
                                          r"model.batch_size x parallel.replicas = 128$"):
        scenario_from_dict(data, "t.toml")
    data["training"]["work_units"] = 128
    assert scenario_from_dict(data, "t.toml").training.work_units == 128


@pytest.mark.parametrize("training, parallel, faults", [
    ({"algorithm": "sandblaster"}, {"ps_shards": 1}, {"detect_timeout_s": 2.0}),
    ({"algorithm": "downpour"}, {"ps_shards": 1}, {"shard_recovery": "checkpoint", "shard_checkpoint_every": 5,
                                                   "restart_s": 1.0, "checkpoint_gbps": 5.0}),
    ({"algorithm": "sync", "eval_points": 5, "target_accuracy": 0.5}, {}, {}),    # a cosim sweep point turned off
    ({"algorithm": "ssp", "start_spread_s": 0.0}, {"ps_shards": 1}, {}),
    ({"algorithm": "sync"}, {}, {"restart_s": 1.0, "checkpoint_gbps": 5.0, "detect_timeout_s": 2.0}),
])
def test_the_same_settings_load_where_the_algorithm_reads_them(training, parallel, faults):
    """The other side of the refusals above: where a setting is read it is taken."""
    data = {"cluster": {"topology": "dgx-h100"}, "model": {"name": "mlp-digits", "batch_size": 32},
            "parallel": {"replicas": 4, **parallel}, "training": training, "faults": faults}
    sc = scenario_from_dict(data, "t.toml")
    for key, value in training.items():
        assert getattr(sc.training, key) == value
    for key, value in faults.items():
        assert getattr(sc.faults, key) == value


def test_zero_with_one_replica_and_selective_without_attention_are_refused():
    """Settings that would do nothing: ZeRO with nothing to shard over, and
    selective recomputation of a model with no attention scores to rerun."""
    from clustersim.core.scenario import scenario_from_dict
    def data(model, **training):
        return {"cluster": {"topology": "dgx-h100"}, "model": {"name": model}, "parallel": {"replicas": 1},
                "training": training}
    with pytest.raises(ConfigError, match="t.toml: training.zero: ZeRO shards state over the replicas; "
                                          "parallel.replicas = 1 has none to shard over"):
        scenario_from_dict(data("gpt2", zero=1), "t.toml")
    with pytest.raises(ConfigError, match="t.toml: training.recompute: selective recomputation reruns attention's "
                                          "score matrices; resnet-50 has no attention layers"):
        scenario_from_dict(data("resnet-50", recompute="selective"), "t.toml")
    assert scenario_from_dict(data("gpt2", recompute="selective"), "t.toml").training.recompute == "selective"


@pytest.mark.parametrize("model, parallel, training, field, says", [
    ({"dtype": "bf16"}, {}, {"epochs": 3}, "training.epochs", "passes over training.dataset_samples, which is not given"),
    ({"attention": "fused"}, {}, {}, "model.attention", "the fused softmax kernel runs in fp16 or bf16"),
    ({"dtype": "bf16"}, {"split": "layers", "model_parallel": 2, "pipeline": 2}, {}, "parallel.pipeline",
     'use split = "tensor"'),
])
def test_ignored_or_misnamed_planning_settings_are_one_line_naming_the_field(model, parallel, training, field, says):
    """A capacity planner's settings that ran as if absent (epochs without a data set,
    Megatron's fused softmax in fp32, where its kernel needs 16 bits), and a pipeline
    refusal that sent a tensor user to the spatial split; each loads once the setting is
    dropped.  Sequence parallelism over one slot and GPipe with one stage stay accepted:
    a sweep over model_parallel or pipeline shares them with its first point."""
    data = {"cluster": {"topology": "dgx-h100"}, "model": {"name": "gpt2", "batch_size": 8, **model},
            "parallel": parallel, "training": training}
    with pytest.raises(ConfigError, match=rf"^t\.toml: {field}: .*{re.escape(says)}"):
        scenario_from_dict(data, "t.toml")
    section, key = field.split(".")
    data[section].pop(key)
    scenario_from_dict(data, "t.toml")


def test_a_published_case_given_as_a_scenario_says_what_it_is():
    """``clustersim plan scenarios/published/...toml`` said "cluster: is required" (a new-user
    sweep): a file with a [reference] table and no [cluster] is a published case."""
    assert main(["plan", "scenarios/published/megatron-7.5b-a100-x128.toml"]) == 2
    with pytest.raises(ConfigError, match=r"x\.toml: reference: a published case, not a scenario: "
                                          r"`clustersim published` runs the built-in ones, `--dir FOLDER`"):
        scenario_from_dict({"name": "n", "reference": {"value": 1}, "scenario": {"file": "q.toml"},
                            "cluster": {"topology": "dgx-h100"}}, "x.toml")      # a --set cluster too
    with pytest.raises(ConfigError, match=r"x\.toml: reference: a published case, not a scenario"):
        scenario_from_dict({"name": "n", "reference": {"value": 1}}, "x.toml")            # nothing else


def test_a_noise_window_without_host_noise_is_refused():
    """The window only shapes the replayed host noise: without it, it would do nothing."""
    data = {"cluster": {"topology": "dgx-h100"}, "model": {"name": "mlp-digits", "batch_size": 32},
            "faults": {"host_noise_window_s": 0.1}}
    with pytest.raises(ConfigError, match=r"^t.toml: faults.host_noise_window_s: .*host_noise is off"):
        scenario_from_dict(data, "t.toml")


def test_fp64_needs_a_gpus_own_figure_and_a_cpu_runs_it_at_half_rate(tmp_path):
    """A GPU table without peak_tflops_fp64 ran an fp64 model at its fp32 rate (GPUs run
    fp64 at 1/2 to 1/64 of it), silently; a CPU's fp64 rate is half its fp32 (SIMD lanes)."""
    from helpers import dump_toml, gpu, link
    from clustersim.core.topogen import load_topology
    (tmp_path / "nofp64.toml").write_text(dump_toml({
        "name": "nofp64", "device": [gpu("g0"), gpu("g1", machine=1), {"name": "sw", "kind": "switch"}],
        "link": [link("g0", "sw", 10.0, 1.0), link("g1", "sw", 10.0, 1.0)]}))
    data = {"cluster": {"topology": "dgx-h100"}, "model": {"name": "mlp-digits", "batch_size": 8, "dtype": "fp64"}}
    assert scenario_from_dict(data, str(tmp_path / "t.toml")).dtype == "fp64"     # the H100's table: 34 TFLOP/s
    data["cluster"]["topology"] = "nofp64.toml"
    with pytest.raises(ConfigError, match=r"t\.toml: model\.dtype: fp64 on g0 of topology nofp64, whose table gives "
                                          r"no peak_tflops_fp64"):
        scenario_from_dict(data, str(tmp_path / "t.toml"))
    data["model"]["dtype"] = "fp32"
    assert scenario_from_dict(data, str(tmp_path / "t.toml")).dtype == "fp32"
    cpu = load_topology("distbelief-2012", Path(".")).devices["m0.cpu"]
    assert cpu.flops_per_s("fp64") == cpu.flops_per_s("fp32") / 2


def test_a_missing_model_file_and_too_few_devices_name_the_scenarios_field():
    """U37: a missing model file was "missing.toml: cannot read model file", naming neither
    the scenario nor model.file; U36: too many devices did not say that cluster.machines
    sets the topology's size."""
    data = {"cluster": {"topology": "dgx-h100"}, "model": {"file": "missing.toml"}}
    with pytest.raises(ConfigError, match=r"^s.toml: model.file: .*missing.toml does not exist \(a model file is read "
                                          r"beside the scenario"):
        scenario_from_dict(data, "s.toml")
    from clustersim.core.plan import plan
    sc = scenario_from_dict({"cluster": {"topology": "dgx-h100"}, "model": {"name": "mlp-digits"},
                             "parallel": {"replicas": 9}}, "s.toml")
    with pytest.raises(ConfigError, match=r"has 8 compute devices on 1 machine \(cluster.machines sets how many\)"):
        plan(sc)


def test_work_units_that_do_not_divide_the_batch_count_what_they_train_and_empty_shards_are_refused():
    """U47: 200 units of a batch of 256 trained 200 samples (units of 256 // 200 = 1) and
    reported 256 a step; 20,000 shards of 9,610 parameters planned thousands of empty ones."""
    from clustersim import api
    from clustersim.core.plan import plan
    data = {"cluster": {"topology": "dgx-h100"}, "model": {"name": "mlp-digits", "batch_size": 64},
            "parallel": {"replicas": 4, "ps_shards": 1},
            "training": {"algorithm": "sandblaster", "work_units": 200, "steps": 3}}
    for units, trained in ((200, 200), (128, 256), (3, 255)):
        data["training"]["work_units"] = units
        s = api.simulate(data, speedup=False).data
        assert s["samples_per_s"] * s["step_time_s"] == pytest.approx(trained, rel=1e-12), units
    data["training"] = {"algorithm": "downpour"}
    params = scenario_from_dict(data, "t.toml").model.params
    data["parallel"]["ps_shards"] = params + 1
    with pytest.raises(ConfigError, match=rf"^t.toml: parallel.ps_shards: {params + 1} shards for {params:,} "
                                          "parameters would leave shards empty"):
        plan(scenario_from_dict(data, "t.toml"))


def test_sandblaster_micro_batches_larger_than_a_work_unit_are_refused():
    """U50: units of one sample in two micro-batches crashed an executed rank (an empty
    micro-batch) where the simulator ran them; both refuse them now, by name."""
    import clustersim
    from clustersim.core.config import ConfigError
    from clustersim.core.schedule import units_of
    base = {"name": "t", "model": {"name": "mlp-digits", "batch_size": 8}, "cluster": {"topology": "distbelief-2012"},
            "parallel": {"replicas": 1, "ps_shards": 1}, "training": {"algorithm": "sandblaster"}}
    with pytest.raises(ConfigError, match="parallel.micro_batches: must be <= a work unit's 1 samples"):
        clustersim.load(base, {"parallel.micro_batches": 2})
    ok = clustersim.load(base, {"parallel.micro_batches": 2, "training.work_units": 4})
    assert units_of(ok) == (4, 2)
