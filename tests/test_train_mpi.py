"""The zoo's small trainable models on real MPI ranks: one split step equals the single
process's (Net) step, and ``clustersim execute`` trains them split with the losses of an
in-process reference run."""
import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clustersim.core.models import zoo_model
from clustersim.core.plan import plan
from executor.data import for_model
from executor.nn import Net
from helpers import scenario
from test_tensor_parallel import assert_equals_net

HERE = Path(__file__).parent
MPIEXEC = Path(sys.executable).parent / "mpiexec"
pytestmark = pytest.mark.skipif(not MPIEXEC.exists(), reason="the mpich wheel is not installed")


def zoo_step_case(name: str, tensor: int, pipeline: int, split: str = "spatial", batch: int = 4):
    """The Plan of ``name`` on tensor x pipeline slots (``split``: how a stage's slots cut
    it), its float64 parameters (Net's init, seed 5), a batch of its bundled data and the labels."""
    model = zoo_model(name)
    sc = scenario(batch=batch, parallel={"model_parallel": tensor, "pipeline": pipeline, "split": split})
    p = plan(dataclasses.replace(sc, model=model), check_memory=False)
    net = Net(model)
    w = net.init(np.random.default_rng(5)).astype(np.float64)
    full = {i: net.params(w, i) for i in range(len(model.nodes)) if net.layout[i]}
    d = for_model(model, 5)
    return p, full, d.x_train[:batch].astype(np.float64), d.y_train[:batch]


def split_step(tmp_path, name, tensor, pipeline, split):
    """The loss (the sum of the ranks' shares) and each (layer, slot)'s parameter gradients
    of ``zoo_step_case`` run on real ranks by tests/mpi_zoo_step.py."""
    p, full, x, y = zoo_step_case(name, tensor, pipeline, split)
    proc = subprocess.run([str(MPIEXEC), "-n", str(p.slots), sys.executable, str(HERE / "mpi_zoo_step.py"),
                           str(tmp_path), name, str(tensor), str(pipeline), split], capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loss, grads = 0.0, {}
    for j in range(p.slots):
        data = np.load(tmp_path / f"rank{j}.npz")
        loss += float(data["loss"])
        for key in data.files:
            if key.startswith("g_"):
                i, n = map(int, key[2:].split("_"))
                grads.setdefault((i, j), {})[n] = data[key]
    return p, full, x, y, loss, grads


SLOW = pytest.mark.slow


@pytest.mark.parametrize("name, tensor, pipeline, split", [
    pytest.param("gpt-tiny", 2, 1, "spatial", marks=SLOW),       # make test: the spatial cuts over 4 ranks
    ("gpt-tiny", 4, 1, "spatial"), ("gpt-tiny", 2, 1, "tensor"),
    ("gpt-tiny", 4, 1, "tensor"), ("resnet-digits", 2, 1, "tensor")])
def test_a_tensor_parallel_step_on_real_ranks_equals_the_single_process_step(tmp_path, name, tensor, pipeline, split):
    """Issue 17's done-when: heads, features and vocabulary cut over 2 and 4 ranks (4 ranks
    on 2 cores: waiting ranks yield), by the spatial split (every slice reads the whole
    activation it needs) and by Megatron's (partial sums allreduced, norms replicated);
    the loss equals Net's to 1e-10, the slots' gradients add up to Net's (a replicated
    layer's copy on every slot equals it)."""
    p, full, x, y, loss, grads = split_step(tmp_path, name, tensor, pipeline, split)
    net = Net(p.scenario.model)
    w = np.concatenate([a.ravel() for i in sorted(full) for a in full[i]])
    loss0, g0 = net.loss_and_grad(w, x, y)
    assert_equals_net(p, loss, {key: [arrays[n] for n in sorted(arrays)] for key, arrays in grads.items()},
                      (net, x, y, loss0, g0, full))


def reference_run(name: str, steps: int, lr: float, batch: int, seed: int = 0) -> dict:
    """What ``clustersim execute`` of sync SGD on one replica computes, in one process with
    Net: the same float32 start, the same batches, plain SGD; the mean training loss of the
    last 10 steps and the held-out accuracy and loss."""
    from executor.data import Batches
    model = zoo_model(name)
    net, d = Net(model), for_model(model, seed)
    w = net.init(np.random.default_rng(seed))
    batches = Batches(d.x_train, d.y_train, batch, np.random.default_rng([seed, 0]))
    losses = []
    for _ in range(steps):
        loss, g = net.loss_and_grad(w, *batches.next())
        w -= lr * g
        losses.append(loss)
    acc, test_loss = net.evaluate(w, d.x_test, d.y_test)
    return {"train_loss": float(np.mean(losses[-10:])), "accuracy": acc, "loss": test_loss}


@pytest.mark.parametrize("name, tensor, pipeline, split", [   # make test: each split trained by execute once,
    ("resnet-digits", 2, 1, "spatial"), ("resnet-digits", 1, 2, "spatial"),   # each model's split steps checked above
    pytest.param("resnet-digits", 2, 1, "tensor", marks=SLOW),
    pytest.param("gpt-tiny", 2, 1, "spatial", marks=SLOW), ("gpt-tiny", 2, 1, "tensor"),
    pytest.param("gpt-tiny", 1, 2, "spatial", marks=SLOW)])
def test_execute_trains_split_models_with_the_losses_of_one_process(tmp_path, name, tensor, pipeline, split):
    """``clustersim execute`` of the scenario's model split over 2 ranks (spatial, Megatron's
    tensor split, or pipeline), 4 steps: the training and held-out losses and the accuracy
    are the in-process reference run's (float32: to 1e-4)."""
    import json
    steps, lr, batch = 4, 0.1, 16
    scenario_file = HERE.parent / "scenarios" / f"{name.replace('-', '_')}.toml"
    sets = [f"training.steps={steps}", f"training.learning_rate={lr}", f"model.batch_size={batch}",
            f"parallel.model_parallel={tensor}", f"parallel.pipeline={pipeline}", f"parallel.split=\"{split}\""]
    proc = subprocess.run([sys.executable, "-m", "clustersim", "execute", str(scenario_file), "--json",
                           *[a for s in sets for a in ("--set", s)]], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out, ref = json.loads(proc.stdout), reference_run(name, steps, lr, batch)
    assert out["ranks"] == 2
    for key in ("train_loss", "loss", "accuracy"):
        assert out[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), key
