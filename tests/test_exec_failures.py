"""An exception on one rank ends the whole job: nonzero exit and one line on stderr, never
a hang of the ranks that wait for it."""
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from executor.optim import SGD
from executor.psrank import load_checkpoint, save_checkpoint
from executor.ranks import error_line

MPIEXEC = Path(sys.executable).parent / "mpiexec"
WITH_SHARD = """
name = "one-shard"
seed = 0
[cluster]
topology = "dgx-h100"
[model]
name = "mlp-digits"
batch_size = 32
[parallel]
model_parallel = 1
replicas = 1
ps_shards = 1
[training]
steps = 3
"""


def _raised(exc: Exception) -> Exception:
    try:
        raise exc
    except Exception as caught:
        return caught


def test_error_line_names_rank_exception_and_place_on_one_line():
    line = error_line(3, _raised(ValueError("two\nlines")))
    assert line.startswith("clustersim: error: rank 3: ValueError: two lines (at test_exec_failures.py:")
    assert line.endswith(" in _raised)") and "\n" not in line
    assert error_line(0, KeyError()) == "clustersim: error: rank 0: KeyError"        # never raised: no place


def test_a_checkpoint_of_another_size_is_refused_by_name(tmp_path):
    path = tmp_path / "shard0.npz"
    save_checkpoint(path, np.arange(4, dtype=np.float32), 7, SGD(0.1))
    w, applied = load_checkpoint(path, SGD(0.1), 4)
    assert w.tolist() == [0, 1, 2, 3] and applied == 7
    with pytest.raises(ValueError, match=r"shard0.npz holds 4 parameters; this shard has 5"):
        load_checkpoint(path, SGD(0.1), 5)
    path.write_text("garbage")
    with pytest.raises(ValueError, match=r"shard0.npz is not a shard checkpoint"):
        load_checkpoint(path, SGD(0.1), 4)


@pytest.mark.skipif(not MPIEXEC.exists(), reason="the mpich wheel is not installed")
def test_an_exception_on_the_shard_rank_alone_ends_the_job(tmp_path):
    """A checkpoint of another size fails only the shard's rank (the CLI checks that it is a
    checkpoint, not whether it fits the shard); its worker waits on a fetch the shard will
    never answer."""
    (tmp_path / "ck").mkdir()
    np.savez(tmp_path / "ck" / "shard0.npz", params=np.zeros(3, np.float32), applied=np.int64(7))
    f = tmp_path / "s.toml"
    f.write_text(WITH_SHARD)
    proc = subprocess.run([sys.executable, "-m", "clustersim", "execute", str(f), "--json", "--checkpoint",
                           str(tmp_path / "ck"), "--resume"], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert re.fullmatch(rf"clustersim: error: rank 1: ValueError: checkpoint {re.escape(str(tmp_path))}/ck/shard0.npz "
                        r"holds 3 parameters; this shard has \d+ \(a checkpoint of another scenario or number of "
                        r"shards\?\) \(at psrank.py:\d+ in load_checkpoint\)", lines[0]), lines[0]


def test_an_executed_summary_says_divergence_in_valid_json():
    """U50: DC-ASGD at learning rate 100 printed "loss": NaN (no strict parser takes it);
    non-finite numbers are null, ``diverged`` says why, finite summaries are untouched."""
    import json
    import math
    from executor.ranks import finite
    out = finite({"loss": math.nan, "train_loss": math.inf, "accuracy": 0.078, "curve": [[0.1, math.nan]],
                  "shards": {"a": -math.inf}})
    assert json.loads(json.dumps(out, allow_nan=False)) == {
        "loss": None, "train_loss": None, "accuracy": 0.078, "curve": [[0.1, None]], "shards": {"a": None},
        "diverged": True}
    calm = {"loss": 0.25, "accuracy": 0.9, "steps": 3}
    assert finite(calm) == calm


def test_an_executed_divergence_prints_no_numpy_warnings(tmp_path):
    """U50: a run whose weights overflow printed numpy's RuntimeWarnings from every rank (32
    lines for the quickstart at learning rate 1e12); the summary says "diverged" instead."""
    proc = subprocess.run([sys.executable, "-m", "clustersim", "execute", "scenarios/quickstart.toml", "--set",
                           "training.learning_rate=1e12", "--set", "training.steps=30"],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr
    assert "test loss diverged" in proc.stdout
    assert "Warning" not in proc.stderr, proc.stderr
