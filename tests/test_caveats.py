"""What a summary says its figures leave out (``metrics.caveats``, ``simulate``'s notes):
each caveat where it applies and nowhere else."""
import pytest

from clustersim import api
from clustersim.cli import main

QUICK = "scenarios/quickstart.toml"

DATASHEET_GPU = """
name = "datasheet"
[[device]]
name = "g0"
kind = "gpu"
peak_tflops_fp32 = 60
memory_gib = 80
memory_bandwidth_gbps = 3000
[[device]]
name = "g1"
kind = "gpu"
peak_tflops_fp32 = 60
memory_gib = 80
memory_bandwidth_gbps = 3000
[[link]]
a = "g0"
b = "g1"
bandwidth_gbps = 100
latency_us = 2
"""


def notes(overrides, **kw):
    return api.simulate(QUICK, overrides, speedup=False, **kw).data.get("notes", [])


def test_a_gpu_from_a_datasheet_alone_is_said_to_run_at_its_peak(tmp_path, capsys):
    """U46: a topology written from the datasheet predicted 2.9x the bundled H100's speed
    without a word; with an efficiency it is quiet, as on every bundled topology."""
    topo = tmp_path / "t.toml"
    topo.write_text(DATASHEET_GPU)
    def with_gpu(extra):
        topo.write_text(DATASHEET_GPU.replace("memory_gib = 80\n", "memory_gib = 80\n" + extra))
        return notes({"cluster.topology": str(topo), "parallel.replicas": 2})
    for extra in ("", "efficiency = 1.0\n", 'op_costs = { "send" = [5.0, 0, 10.0] }\n'):   # a message's cost: no compute
        got = with_gpu(extra)
        assert len(got) == 1 and got[0].startswith("g0 and 1 more: efficiency 1 (the default)"), extra
        assert "100% of peak_tflops" in got[0]
    assert main(["simulate", QUICK, "--set", f'cluster.topology="{topo}"', "--set", "parallel.replicas=2",
                 "--no-speedup"]) == 0
    assert f"  note             {got[0]}" in capsys.readouterr().out
    for extra in ("efficiency = 0.7\n", 'op_costs = { "dense" = [5.0, 1000.0, 0] }\n',
                  "efficiency_curve = [[1e6, 0.2], [1e9, 0.8]]\n", "sms = 132\ncompute_capability = 9.0\n"):
        assert with_gpu(extra) == [], extra
    assert notes({}) == []                                   # dgx-h100: efficiencies and the kernel model


def test_zero_3_times_its_second_weight_all_gather():
    """U46: stage 3 ran faster than stage 0 on the same traffic (its second weight
    all-gather untimed).  It is a ring all-gather of each bucket's weights on the collective
    stream now: (R - 1) x parameters x bytes a value more on the wire than stage 2."""
    from clustersim.core.models import zoo_model
    gpt2 = {"model.name": "gpt2", "model.batch_size": 2, "parallel.replicas": 8, "training.steps": 2}
    two, three = (api.simulate(QUICK, {**gpt2, "training.zero": z}, speedup=False).data for z in (2, 3))
    assert three["bytes_per_step"] - two["bytes_per_step"] == pytest.approx(7 * zoo_model("gpt2").params * 4)
    assert three["time_by_phase_s"]["allgather"] > 0 and "allgather" not in two["time_by_phase_s"]
    assert three["step_time_s"] > two["step_time_s"] and "notes" not in three


def test_a_local_window_off_its_period_is_noted():
    local = {"training.algorithm": "local", "training.local_steps": 4, "parallel.replicas": 4}
    assert notes({**local, "training.steps": 10})[0].startswith("training.steps = 10 is not a multiple of "
                                                                "training.local_steps = 4")
    assert notes({**local, "training.steps": 12}) == []


def test_a_speedup_against_one_device_too_small_for_the_model_says_so(capsys):
    """U46: Llama-2-7B on 8 tensor slices printed 'speedup 12.5x against one device' that
    could not hold it."""
    big = {"model.name": "llama-2-7b", "model.batch_size": 1, "training.optimizer": "adam", "model.dtype": "bf16",
           "parallel.replicas": 1, "parallel.model_parallel": 8, "parallel.split": "tensor", "training.steps": 1}
    data = api.simulate(QUICK, big).data
    assert data["one_device_short"].startswith("one device needs ") and data["speedup"] > 0
    need, have = (float(x.split()[0]) for x in data["one_device_short"][len("one device needs "):].split(", has "))
    assert need > have == pytest.approx(80.0)
    assert "one_device_short" not in api.simulate(QUICK).data           # mlp-digits fits anywhere
    accumulated = {"model.name": "gpt2-medium", "model.batch_size": 128, "parallel.replicas": 1,
                   "parallel.micro_batches": 8, "training.steps": 1}       # R47: fits one device by accumulating
    assert "one_device_short" not in api.simulate(QUICK, accumulated).data
    assert main(["simulate", QUICK] + [a for k, v in big.items() for a in ("--set", f"{k}={v!r}".replace("'", '"'))]) == 0
    assert "; hypothetical: one device needs " in capsys.readouterr().out


def test_sweeps_and_searches_print_their_points_notes_once_each(capsys):
    local = ["--set", 'training.algorithm="local"', "--set", "training.local_steps=4", "--set", "training.steps=10"]
    assert main(["sweep", QUICK, "--vary", "parallel.replicas=2,4", *local]) == 0
    out = capsys.readouterr().out
    assert out.count("# note (2 of 2): training.steps = 10 is not a multiple of training.local_steps = 4") == 1
    assert main(["search", QUICK, "--devices", "2", *local]) == 0
    out = capsys.readouterr().out
    assert out.count("# note (") == 1 and "): training.steps = 10 is not a multiple" in out


def test_the_analytical_network_says_its_links_are_not_shared():
    """U49: link utilisations up to 3.3 under network = analytical, without a word; the
    flow model, which shares links, stays quiet."""
    said = notes({"cluster.network": "analytical", "parallel.replicas": 4})
    assert any("analytical" in n and "exceed 100%" in n for n in said)
    assert not any("analytical" in n for n in notes({"parallel.replicas": 4}))
