"""Loads a study script of scenarios/studies/ as a module (they are scripts, not a package)."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_study(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scenarios/studies" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def expected(name: str):
    import json
    return json.loads((ROOT / "tests/data" / name).read_text())
