"""Co-simulation of the zoo's small trainable models beyond the MLP: the residual CNN on
the digits and the causal transformer on the grammar corpus, under sync SGD and Downpour,
learn on the simulated clock: held-out accuracy rises well above what no learning gives
(chance for the digits, always guessing the most common word for the corpus)."""
from pathlib import Path

import numpy as np
import pytest

import clustersim
from clustersim.core.models import zoo_model
from executor.data import for_model

DOWNPOUR = Path(__file__).parent.parent / "scenarios" / "downpour.toml"    # 2 shards, 1 GbE


def cosim(name: str, sets: list[str]) -> dict:
    """downpour.toml (co-simulated) with 2 replicas (few gradients to compute) and ``name``
    as its model."""
    sc = clustersim.load(DOWNPOUR, ["training.eval_points=2", "parallel.replicas=2", f'model.name="{name}"'] + sets)
    return clustersim.simulate(sc, speedup=False).data


@pytest.mark.parametrize("name, algorithm, lr, time_limit_s, above", [
    ("resnet-digits", "downpour", 0.05, 0.02, 0.5),         # make test: each model and each algorithm once;
    pytest.param("resnet-digits", "sync", 0.2, 0.02, 0.5, marks=pytest.mark.slow),   # make test-all: every pair
    pytest.param("gpt-tiny", "downpour", 0.1, 0.05, 0.4, marks=pytest.mark.slow),
    ("gpt-tiny", "sync", 0.2, 0.05, 0.4)])
def test_cosimulated_accuracy_rises_above_chance(name, algorithm, lr, time_limit_s, above):
    d = for_model(zoo_model(name), 0)
    no_learning = max(1 / d.classes, float(np.bincount(d.y_test.ravel()).max() / d.y_test.size))
    assert no_learning < above - 0.1        # digits: 0.10 (chance); corpus: 0.29 (the word "the")
    out = cosim(name, [f"training.algorithm={algorithm}", f"training.learning_rate={lr}",
                       f"training.time_limit_s={time_limit_s}"])
    curve = out["accuracy_curve"]
    assert curve[0][1] < no_learning + 0.1 < above <= out["accuracy"]
    assert out["accuracy"] == curve[-1][1] and out["loss"] < curve[0][2]
