"""Property-based: thousands of random and mutated scenario, topology and model files.
Each one loads (and plans) or is refused with a ConfigError -- never another exception."""
import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from clustersim.core.config import ConfigError
from clustersim.core.plan import plan
from clustersim.core.scenario import load_scenario
from clustersim.core.topogen import load_topology
from helpers import dump_toml

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = [tomllib.loads(p.read_text()) for p in sorted((ROOT / "scenarios").glob("*.toml"))]
TOPOLOGIES = [tomllib.loads(p.read_text()) for p in sorted((ROOT / "topologies").glob("*.toml"))]
MODEL = {"name": "m", "input": [3, 16, 16], "layer": [
    {"kind": "conv2d", "filters": 4, "kernel": 3}, {"kind": "relu"}, {"kind": "max_pool", "kernel": 2},
    {"kind": "locally_connected", "filters": 2, "kernel": 3}, {"kind": "dense", "units": 10},
    {"kind": "softmax_xent"}]}

VALUES = st.one_of(
    st.sampled_from([0, 1, 2, 3, 8, 64, -1, 10**7, 2**62, 0.0, 0.5, -2.5, 1e300, float("inf"), float("nan"),
                     "", "x", "dgx-h100", "pcie-4gpu", "spatial", "layers", "sync", "ring", "tree", "flow",
                     "analytical", "fat-tree", "rail", "none", "switch", "gpu", "cpu", "dense", "alexnet",
                     "mlp-digits", "m.toml", "..", True, False, [], [1, 2], [1, 2, 3], {}, {"a": 1}]),
    st.integers(-5, 100), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6))
KEYS = st.sampled_from(["name", "seed", "cluster", "topology", "machines", "network", "model", "batch_size",
                        "dtype", "file", "parallel", "model_parallel", "split", "replicas", "ps_shards",
                        "micro_batches", "schedule", "grid", "training", "algorithm", "steps", "learning_rate", "allreduce",
                        "faults", "machine", "cpu", "gpu", "count", "cores", "core_gflops", "memory_gib",
                        "memory_bandwidth_gbps", "peak_tflops_fp32", "efficiency", "pcie", "switches",
                        "generation", "lanes", "nvlink", "nic", "bandwidth_gbps", "latency_us", "kind", "k",
                        "spines", "base", "device", "link", "a", "b", "input", "layer", "units", "filters",
                        "kernel", "stride", "padding", "bogus"])


@st.composite
def mutated(draw, bases):
    """A deep copy of one base with a few random sets and deletions along random paths."""
    import copy
    data = copy.deepcopy(draw(st.sampled_from(bases)))
    for _ in range(draw(st.integers(1, 4))):
        node = data
        for _ in range(draw(st.integers(0, 2))):
            tables = [k for k, v in node.items() if isinstance(v, dict)]
            lists = [k for k, v in node.items() if isinstance(v, list) and v and isinstance(v[0], dict)]
            choice = draw(st.sampled_from(tables + lists)) if tables + lists else None
            if choice is None:
                break
            node = node[choice] if choice in tables else draw(st.sampled_from(node[choice]))
        key = draw(st.one_of(st.sampled_from(sorted(node) or ["name"]), KEYS))
        if draw(st.booleans()) and key in node:
            del node[key]
        else:
            node[key] = copy.deepcopy(draw(VALUES))   # sampled values are shared objects
    return data


def load_or_refuse(fn):
    try:
        return fn()
    except ConfigError as exc:
        assert str(exc).count("\n") == 0 and exc.file
        return None


# make test draws 300 files of each kind; make test-all draws 1,200 more (slow).  A failing
# draw is kept in .hypothesis/ and replayed first in every later run.
EXAMPLES = [300, pytest.param(1200, marks=pytest.mark.slow)]


def fuzz(examples: int, strategy, check) -> None:
    """``check`` on ``examples`` draws of ``strategy``."""
    settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck))(given(strategy)(check))()


@pytest.mark.parametrize("examples", EXAMPLES)
def test_mutated_scenarios_load_or_fail_cleanly(tmp_path_factory, examples):
    def check(data):
        d = tmp_path_factory.mktemp("s")
        (d / "m.toml").write_text(dump_toml(MODEL))
        f = d / "s.toml"
        f.write_text(dump_toml(data))
        sc = load_or_refuse(lambda: load_scenario(f))
        if sc is not None:
            load_or_refuse(lambda: plan(sc))
    fuzz(examples, mutated(SCENARIOS), check)


@pytest.mark.parametrize("examples", EXAMPLES)
def test_mutated_topologies_load_or_fail_cleanly(tmp_path_factory, examples):
    def check(data):
        f = tmp_path_factory.mktemp("t") / "t.toml"
        f.write_text(dump_toml(data))
        topo = load_or_refuse(lambda: load_topology(str(f)))
        if topo is not None:
            devs = topo.compute_devices()
            assert devs and all(topo.devices[d].is_compute for d in devs)
    fuzz(examples, mutated(TOPOLOGIES), check)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(mutated([MODEL]))
def test_mutated_model_files_load_or_fail_cleanly(tmp_path_factory, data):
    d = tmp_path_factory.mktemp("m")
    (d / "m.toml").write_text(dump_toml(data))
    (d / "s.toml").write_text('[cluster]\ntopology = "dgx-h100"\n[model]\nfile = "m.toml"\nbatch_size = 2\n')
    sc = load_or_refuse(lambda: load_scenario(d / "s.toml"))
    if sc is not None:
        load_or_refuse(lambda: plan(sc))


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=200))
def test_random_text_is_refused_cleanly(tmp_path_factory, text):
    f = tmp_path_factory.mktemp("r") / "s.toml"
    f.write_text(text)
    load_or_refuse(lambda: load_scenario(f))
