"""README's Python example runs as printed (it uses only the public API)."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_python_example_runs():
    [code] = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0].endswith("x one device") and [l.split()[0] for l in lines[1:5]] == ["1", "2", "4", "8"]
    step, accuracy = map(float, lines[5].split())
    assert step > 0 and 0.0 <= accuracy <= 1.0
