"""validate on a fixed, checked-in calibrated topology (tests/data/host-2-ranks.toml, from
`clustersim calibrate --ranks 2` on this host): the simulated and the executed trace hold
the same phases and, per step, the same messages and bytes.  No time is asserted: this
host's noise is larger than any bound worth testing (README, Calibration and validation)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOPOLOGY = ROOT / "tests" / "data" / "host-2-ranks.toml"
TINY = ('name = "tiny"\n[cluster]\ntopology = "dgx-h100"\n[model]\nname = "mlp-digits"\nbatch_size = 16\n'
        '[training]\nsteps = 20\n')


@pytest.mark.parametrize("sets, traffic", [
    (["parallel.replicas=2"], {"allreduce": {"messages": 2, "bytes": 2 * 9610 * 4}}),
    (["parallel.model_parallel=2", "parallel.split=layers"],        # 64-128-10: the 16 x 128 activations, both ways
     {"stage": {"messages": 1, "bytes": 16 * 128 * 4}, "gradient": {"messages": 1, "bytes": 16 * 128 * 4}}),
])
def test_simulated_and_executed_traces_move_the_same_messages(tmp_path, sets, traffic):
    f = tmp_path / "tiny.toml"
    f.write_text(TINY)
    set_args = [a for s in sets for a in ("--set", s)]
    proc = subprocess.run([sys.executable, "-m", "clustersim", "validate", str(f), "--topology", str(TOPOLOGY),
                           "--repeats", "1", "--json", *set_args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["traffic"]["predicted"] == out["traffic"]["measured"] == traffic
    assert {"forward", "backward", "update", "waits"} <= set(out["phases"])
    for phase, row in out["phases"].items():     # waits are what is left of a step: timing, not structure
        assert phase == "waits" or (row["predicted_s"] > 0) == (row["measured_s"] > 0), (phase, row)
    # every op and message predicted is traced by the runs under the same name and place, and
    # nothing else is -- but the step's set-up, a span of the simulator's only (in the runs' waits)
    named = [{(r["where"], r["op"]) for r in out["ops"] if r[side] > 0} for side in ("predicted_s", "measured_s")]
    assert {key for key in named[0] if key[1] != "step"} == named[1] and len(named[1]) >= 10
    rows = [{w for w, *_ in out["timelines"][k]} for k in ("predicted", "measured")]
    assert rows[0] == rows[1] and len(rows[0]) >= 2             # the same devices and routes in both timelines


def test_a_built_in_topology_name_is_passed_on_as_a_name(tmp_path, monkeypatch):
    """``validate --topology`` takes a built-in name or a file: a file goes on as its
    absolute path (the runs start in other folders), a name as given."""
    from clustersim.compare.validate import _side_items
    monkeypatch.chdir(tmp_path)
    (tmp_path / "host.toml").write_text("")
    assert 'cluster.topology="dgx-h100"' in _side_items([], "dgx-h100")
    assert f'cluster.topology="{tmp_path / "host.toml"}"' in _side_items([], "host.toml")
