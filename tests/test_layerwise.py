"""Layer-wise approximate training (sim/algorithms/layerwise.py, its co-simulation):
the exchange points against a brute-force reference, the refusals, the closed forms of
its simulated time, and its real math against plain SGD where the two must agree bit
for bit (an exchange after every step: every worker takes the gradient of the same
weights on the same sample)."""
import math

import numpy as np
import pytest

import clustersim
from clustersim.compare.cosim import Replay, group_ranges
from clustersim.core.config import ConfigError
from clustersim.core.plan import plan
from clustersim.core.schedule import exchange_steps
from sim.algorithms.layerwise import step_ops
from sim.engine import simulate


def scenario(groups: int = 2, interval: int = 10, steps: int = 30, batch: int = 1, **training) -> dict:
    return {"name": "layerwise", "seed": 3, "cluster": {"topology": "distbelief-2012", "machines": 4},
            "model": {"name": "mlp-digits", "batch_size": batch},
            "parallel": {"model_parallel": groups, "split": "layers", "replicas": 1},
            "training": {"algorithm": "layerwise", "steps": steps, "comm_interval": interval,
                         "learning_rate": 0.05, **training}}


def reference_exchanges(steps: int, batch: int, interval: int) -> list[int]:
    """The step holding each multiple of ``interval`` samples (ends at or after it), and the last."""
    out = sorted({math.ceil(m * interval / batch) - 1 for m in range(1, steps * batch // interval + 1)})
    return out if out and out[-1] == steps - 1 else out + [steps - 1]


@pytest.mark.parametrize("steps,batch,interval", [(30, 1, 1), (30, 1, 7), (30, 1, 30), (30, 1, 100),
                                                  (25, 4, 10), (25, 3, 2), (9, 16, 10), (40, 5, 25)])
def test_exchanges_at_the_first_step_boundary_at_or_after_each_multiple(steps, batch, interval):
    got = exchange_steps(steps, batch, interval)
    assert list(got) == reference_exchanges(steps, batch, interval)
    if batch == 1:
        assert len(got) == math.ceil(steps / interval)


def test_layerwise_refuses_what_is_not_one_replica_of_layer_groups():
    for key, value in (("parallel.split", "spatial"), ("parallel.replicas", 2), ("parallel.ps_shards", 1)):
        with pytest.raises(ConfigError, match=key):
            clustersim.load(scenario(), {key: value})


def test_each_worker_runs_every_forward_and_the_backward_down_to_its_group():
    p = plan(clustersim.load(scenario(groups=2)))
    full = [op.id for op in p.ops if op.kind != "xfer"]
    assert sorted(op.id for op in step_ops(p, 0)) == full
    last = step_ops(p, 1)
    assert all(op.kind == "fwd" or op.slot == 1 for op in last)
    assert {op.layer for op in last if op.kind == "fwd"} == set(range(len(p.scenario.model.nodes)))


@pytest.mark.parametrize("topology", ["distbelief-2012", "dgx-h100", "pcie-4gpu"])
def test_one_group_without_exchanges_takes_the_one_device_step_time(topology):
    """G = 1: worker 0's step is the one-device SGD step, and nothing is sent -- on GPUs too,
    whose ops the kernel model times as the engine's step graph does (U49: 1.4-4.7x)."""
    sc = scenario(groups=1, interval=1000, steps=5)
    sc["cluster"] = {"topology": topology}
    res = clustersim.simulate(sc)
    assert res.sim_time_s == pytest.approx(5 * res.one_device_step_time_s, rel=1e-12)
    assert res.speedup == pytest.approx(1.0, rel=1e-12)
    assert res.bytes_per_step == 0


def test_exchange_rounds_and_bytes_in_the_trace():
    sc = clustersim.load(scenario(groups=2, interval=7, steps=30))
    p = plan(sc)
    res = simulate(p)
    rounds = exchange_steps(30, 1, 7)
    sends = [u for u in res.trace.updates if u.kind == "exchange_send"]
    assert sorted((u.info["worker"], u.step) for u in sends) == sorted((g, s) for g in range(2) for s in rounds)
    moved = [s for s in res.trace.spans if s.phase == "exchange"]
    assert len(moved) == 2 * len(rounds)
    assert sum(s.bytes for s in moved) == len(rounds) * sum(p.slot_params) * 4
    assert [s for _, s, _, _ in res.trace.replica_steps] == list(range(30))


def final_weights(source: dict) -> np.ndarray:
    p = plan(clustersim.load(source))
    replay = Replay(p)
    for u in simulate(p).trace.updates:
        replay.apply(u)
    return replay.model()


@pytest.mark.parametrize("groups", [1, 2])
def test_an_exchange_after_every_sample_is_plain_sgd_bit_for_bit(groups):
    plain = scenario(groups=1, steps=40)
    plain["parallel"]["split"] = "spatial"
    plain["training"] = {"algorithm": "sync", "steps": 40, "learning_rate": 0.05}
    assert np.array_equal(final_weights(scenario(groups=groups, interval=1, steps=40)), final_weights(plain))


def test_long_intervals_train_each_group_against_the_others_frozen():
    """Interval >= steps: the only exchange is the last, so group 1 (the output layer) is
    trained on the hidden layer's initial weights, and group 0 against the initial output layer."""
    p = plan(clustersim.load(scenario(groups=2, interval=1000, steps=20)))
    w = final_weights(scenario(groups=2, interval=1000, steps=20))
    replay = Replay(p)
    w0 = replay.local[0].copy()
    (lo0, hi0), (lo1, hi1) = group_ranges(p, replay.net)
    assert (lo0, hi1) == (0, replay.net.size) and hi0 == lo1
    stream = Replay(p).batches[0]
    mine = [w0.copy(), w0.copy()]                 # each group's steps by hand, the other frozen at w0
    for _ in range(20):
        x, y = stream.next()
        for g, (lo, hi) in enumerate(((lo0, hi0), (lo1, hi1))):
            mine[g][lo:hi] -= 0.05 * replay.net.loss_and_grad(mine[g], x, y)[1][lo:hi]
    assert np.array_equal(w[lo0:hi0], mine[0][lo0:hi0]) and np.array_equal(w[lo1:hi1], mine[1][lo1:hi1])


def test_accuracy_is_deterministic_per_seed_and_moves_with_it():
    a = clustersim.simulate(scenario(interval=10, steps=30, cosim=True), speedup=False)
    b = clustersim.simulate(scenario(interval=10, steps=30, cosim=True), speedup=False)
    c = clustersim.simulate(scenario(interval=10, steps=30, cosim=True), {"seed": 4}, speedup=False)
    assert a.accuracy_curve == b.accuracy_curve
    assert a.accuracy_curve != c.accuracy_curve
