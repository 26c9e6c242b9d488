"""Pipeline stages (split="layers") with micro-batches on four real ranks: the Plan's ops
for every micro-batch run, each rank in its slot's schedule order (GPipe or 1F1B),
gradients add up over the micro-batches in one order and one SGD step follows, so
training is the math of one whole batch, and the same under either schedule."""
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from clustersim.core.plan import plan, slot_sequence
from clustersim.core.scenario import load_scenario, parse_set
from clustersim.core.trace import Trace

ROOT = Path(__file__).parent.parent
MPIEXEC = Path(sys.executable).parent / "mpiexec"
STEPS = 3
STAGES = 4
MICRO = 4
DENSE = '[[layer]]\nkind = "dense"\nunits = {units}\n'
RELU = '[[layer]]\nkind = "relu"\n'
MODEL = ('name = "deep-mlp"\ninput = [64]\nclasses = 10\n' + (DENSE.format(units=64) + RELU) * 3
         + DENSE.format(units=10) + '[[layer]]\nkind = "softmax_xent"\n')          # 4 stages of a dense layer each
SCENARIO = f"""name = "pipe4"
seed = 0
[cluster]
topology = "dgx-h100"
[model]
file = "deep.toml"
batch_size = 64
[parallel]
model_parallel = {STAGES}
split = "layers"
replicas = 1
[training]
algorithm = "sync"
steps = {STEPS}
"""


def _execute(path: Path, sets: list[str], trace: Path) -> dict:
    """The summary of ``clustersim execute`` on four ranks (with --json and a trace)."""
    cmd = [sys.executable, "-m", "clustersim", "execute", str(path), "--ranks", str(STAGES), "--json",
           "--trace", str(trace)]
    for item in sets:
        cmd += ["--set", item]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


@pytest.mark.skipif(not MPIEXEC.exists(), reason="the mpich wheel is not installed")
def test_micro_batches_on_four_ranks_train_as_one_batch_in_the_plans_order(tmp_path):
    (tmp_path / "deep.toml").write_text(MODEL)
    (tmp_path / "pipe4.toml").write_text(SCENARIO)
    out = {}
    for m, schedule in [(1, "1f1b"), (MICRO, "gpipe"), (MICRO, "1f1b")]:
        sets = [f"parallel.micro_batches={m}", f"parallel.schedule={schedule}"]
        out[(m, schedule)] = _execute(tmp_path / "pipe4.toml", sets, tmp_path / f"t{m}{schedule}.json")
        p = plan(load_scenario(tmp_path / "pipe4.toml", parse_set(sets)))
        assert [sl[0][0] for sl in p.slices] == [0, 0, 1, 1, 2, 2, 3, 3]
        xfers = Counter((op.why, op.micro) for op in p.ops if op.kind == "xfer")
        assert xfers == {(why, mb): STAGES - 1 for why in ("stage", "gradient") for mb in range(m)}
        spans = Trace.load(tmp_path / f"t{m}{schedule}.json").spans
        sent = Counter(s.step for s in spans if s.phase in ("stage", "gradient"))
        assert sent == {s: 2 * 2 * (STAGES - 1) * m for s in range(STEPS)}     # a send span and a recv span each
        for j, dev in enumerate(p.devices[0]):        # each rank ran its slot's ops in the Plan's order
            ran = sorted((s for s in spans if s.where == dev and s.phase in ("fwd", "bwd")),
                         key=lambda s: (s.step, s.start_s))
            assert [s.name for s in ran] == [f"{op.kind} L{op.layer}" for op in slot_sequence(p, j)] * STEPS
    one, gpipe, ofob = out[(1, "1f1b")], out[(MICRO, "gpipe")], out[(MICRO, "1f1b")]
    assert one["steps"] == gpipe["steps"] == ofob["steps"] == STEPS
    assert ofob["loss"] == gpipe["loss"]                        # the same sums in the same order
    assert ofob["loss"] == pytest.approx(one["loss"], rel=1e-6)  # float32 sums in another order
    assert ofob["accuracy"] == gpipe["accuracy"] == one["accuracy"]
