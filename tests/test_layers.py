"""The layers of DESIGN.md hold (import-linter), and the public API is light to import."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_imports_point_one_way():
    proc = subprocess.run([str(Path(sys.executable).parent / "lint-imports")], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "1 kept, 0 broken" in proc.stdout


def test_the_api_simulates_without_matplotlib_or_mpi():
    code = ("import json, sys, clustersim; r = clustersim.simulate('scenarios/quickstart.toml', "
            "{'training.steps': 3}, speedup=False); "
            "print(json.dumps([r.step_time_s, r.samples_per_s, len(r.trace.spans), "
            "sorted(m for m in ('matplotlib', 'mpi4py', 'sim.engine') if m in sys.modules)]))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    step, rate, spans, loaded = json.loads(proc.stdout)
    assert rate == 8 * 128 / step and spans > 0      # quickstart: 8 replicas of batch 128
    assert loaded == ["sim.engine"]                   # the simulator, and neither plots nor MPI
