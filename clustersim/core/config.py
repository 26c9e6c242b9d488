"""Input errors and the one typed reader every TOML loader uses.

Every bad input ends as a ``ConfigError`` naming the file and the dotted field; the CLI
prints it as one line and exits 2.  ``Table`` reads one TOML table with type and range
checks and refuses keys it was not asked about, so a typo never passes silently.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any


class ConfigError(Exception):
    """Bad input: ``file: field: message``."""

    def __init__(self, file: str, field: str, message: str) -> None:
        self.file, self.field, self.message = str(file), field, message
        text = f"{self.file}: {field}: {message}" if field else f"{self.file}: {message}"
        super().__init__(_one_line(text))


def _one_line(text: str) -> str:
    """Control characters (a newline in a file name from the input) escaped: one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


_MISSING = object()


class Table:
    """Typed, checked access to one TOML table; ``done()`` rejects unread keys."""

    def __init__(self, data: Any, file: str, prefix: str = "") -> None:
        self.file, self.prefix = str(file), prefix
        if not isinstance(data, Mapping):
            raise ConfigError(self.file, prefix or "(top level)", f"must be a table, got {_kind(data)}")
        self.data = data
        self.seen: set[str] = set()

    def field(self, key: str) -> str:
        return f"{self.prefix}.{key}" if self.prefix else key

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(self.file, self.field(key), message)

    def has(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        self.seen.add(key)
        if key in self.data:
            return self.data[key]
        if default is _MISSING:
            raise self.error(key, "is required")
        return default

    def str(self, key: str, default: Any = _MISSING, choices: Iterable[str] | None = None) -> str:
        value = self.raw(key, default)
        if not isinstance(value, str):
            raise self.error(key, f"must be a string, got {_kind(value)}")
        if choices is not None and value not in (opts := list(choices)):
            raise self.error(key, f"must be one of {', '.join(opts)}; got {value!r}")
        return value

    def bool(self, key: str, default: Any = _MISSING) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, got {_kind(value)}")
        return value

    def int(self, key: str, default: Any = _MISSING, lo: int | None = None, hi: int | None = None) -> int:
        value = self.raw(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"must be an integer, got {_kind(value)}")
        _check_range(self, key, value, lo, hi)
        return value

    def float(self, key: str, default: Any = _MISSING, lo: float | None = None, hi: float | None = None,
              positive: bool = False) -> float:
        value = self.raw(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(key, f"must be a number, got {_kind(value)}")
        value = float(value)
        if not math.isfinite(value):
            raise self.error(key, f"must be finite, got {value}")
        if positive and value <= 0:
            raise self.error(key, f"must be > 0, got {value:g}")
        _check_range(self, key, value, lo, hi)
        return value

    def table(self, key: str, default: Any = _MISSING) -> "Table":
        return Table(self.raw(key, default), self.file, self.field(key))

    def tables(self, key: str) -> list["Table"]:
        """An array of tables (``[[key]]``); absent means empty."""
        value = self.raw(key, [])
        if not isinstance(value, list):
            raise self.error(key, f"must be an array of tables, got {_kind(value)}")
        return [Table(item, self.file, f"{self.field(key)}[{i}]") for i, item in enumerate(value)]

    def done(self) -> None:
        unknown = sorted(k for k in self.data if k not in self.seen)
        if unknown:
            raise self.error(unknown[0], "unknown key")

    def only(self, keys: tuple[str, ...]) -> None:
        """Refuses a key not among ``keys`` before any is read: a misspelt table is named
        as itself, not as the required one it stands for (``[modle]``: not "model: is
        required")."""
        unknown = sorted(k for k in self.data if k not in keys)
        if unknown:
            raise self.error(unknown[0], "unknown key")


def _check_range(t: Table, key: str, value: float, lo: float | None, hi: float | None) -> None:
    if lo is not None and value < lo:
        raise t.error(key, f"must be >= {lo:g}, got {value:g}")
    if hi is not None and value > hi:
        raise t.error(key, f"must be <= {hi:g}, got {value:g}")


def _kind(value: Any) -> str:
    return {dict: "a table", list: "an array", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


# The data packages of the wheel (pyproject's package-dir) and their folders in a checkout
SOURCE_FOLDERS = {"clustersim.builtin_topologies": "topologies", "clustersim.builtin_scenarios": "scenarios"}


def bundled_folder(package: str) -> Path:
    """The folder of a data package shipped with clustersim: the installed package's, else
    the checkout's (``SOURCE_FOLDERS``) where the source tree is imported without being
    installed (``PYTHONPATH=.``, or a script that puts the checkout first on ``sys.path``
    on a host where the wheel is installed)."""
    try:
        return Path(str(resources.files(package)))
    except ModuleNotFoundError:
        top = ".".join(package.split(".")[:2])
        return Path(__file__).resolve().parents[2] / SOURCE_FOLDERS[top] / "/".join(package.split(".")[2:])


def bundled_names(package: str) -> list[str]:
    """The names of the TOML files a data package shipped with clustersim holds (built-in
    topologies, built-in scenarios), without ``.toml``."""
    return sorted(p.name[:-5] for p in bundled_folder(package).iterdir() if p.name.endswith(".toml"))
