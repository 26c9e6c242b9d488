"""Pipeline stages (split="layers") with micro-batches on real ranks: the Plan's ops for
every micro-batch run, gradients add up over the micro-batches and one SGD step follows,
so training is the math of one whole batch."""
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from clustersim.core.plan import plan
from clustersim.core.scenario import load_scenario, parse_set

ROOT = Path(__file__).parent.parent
MPIEXEC = Path(sys.executable).parent / "mpiexec"
STEPS = 3
SETS = ["parallel.split=layers", "parallel.model_parallel=2", "parallel.replicas=1", f"training.steps={STEPS}"]


def _execute(micro_batches: int, trace: Path) -> dict:
    """The summary of the brief's command (with --json, a trace and STEPS steps)."""
    cmd = [sys.executable, "-m", "clustersim", "execute", "scenarios/quickstart.toml", "--ranks", "2", "--json",
           "--trace", str(trace)]
    for item in SETS + [f"parallel.micro_batches={micro_batches}"]:
        cmd += ["--set", item]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


@pytest.mark.skipif(not MPIEXEC.exists(), reason="the mpich wheel is not installed")
def test_two_micro_batches_train_as_one_batch(tmp_path):
    out = {m: _execute(m, tmp_path / f"t{m}.json") for m in (1, 2)}
    assert out[2]["steps"] == out[1]["steps"] == STEPS
    assert out[2]["loss"] == pytest.approx(out[1]["loss"], rel=1e-6)      # float32 sums in another order
    assert out[2]["accuracy"] == out[1]["accuracy"]
    for m in (1, 2):                 # every stage message of the Plan, sent once and received once a step
        p = plan(load_scenario(ROOT / "scenarios/quickstart.toml", parse_set(SETS + [f"parallel.micro_batches={m}"])))
        xfers = Counter((op.why, op.micro) for op in p.ops if op.kind == "xfer")
        assert xfers == {(why, mb): 1 for why in ("stage", "gradient") for mb in range(m)}   # one boundary
        events = json.loads((tmp_path / f"t{m}.json").read_text())["traceEvents"]
        sent = Counter(e["args"]["step"] for e in events if e.get("cat") in ("stage", "gradient"))
        assert sent == {s: 2 * 2 * m for s in range(STEPS)}          # a send span and a recv span each
