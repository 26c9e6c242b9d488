"""Scenario files: loading, ``--set`` overrides and validation in one place.

Everything a run needs is checked here or in ``plan()``; an error is a ``ConfigError``
naming the scenario file (or the topology/model file it points to) and the dotted field.
"""
from __future__ import annotations

import copy
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError, Table
from .models import ZOO, Model, load_model_file, zoo_model
from .topogen import MAX_MACHINES, load_topology
from .topology import DTYPES, Topology

DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp64": 8}
ALGORITHMS = ("sync",)
NETWORKS = ("flow", "analytical")
COLLECTIVE_ALGOS = ("ring", "tree")


@dataclass(frozen=True)
class Parallel:
    model_parallel: int = 1      # devices per replica (DistBelief: machines per model instance)
    split: str = "spatial"       # spatial (each device a slice of every layer) | layers (pipeline)
    replicas: int = 1
    ps_shards: int = 0           # 0: gradients are summed by allreduce
    micro_batches: int = 1       # pipeline (layers split): micro-batches per step


@dataclass(frozen=True)
class Training:
    algorithm: str = "sync"
    steps: int = 20
    learning_rate: float = 0.1
    allreduce: str = "ring"      # ring | tree, when ps_shards = 0


@dataclass(frozen=True)
class Scenario:
    file: str
    name: str
    seed: int
    topology: Topology
    network: str                 # flow (max-min sharing) | analytical (alpha-beta)
    model: Model
    batch_size: int              # per replica
    dtype: str
    parallel: Parallel
    training: Training
    raw: dict                    # the validated TOML, for reports and sweeps

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]


def read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), "", f"cannot read file ({exc.__class__.__name__})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), "", f"malformed TOML: {exc}") from None


def parse_set(items: list[str]) -> list[tuple[str, Any]]:
    """``key=value`` pairs; the value is read as a TOML value (``8``, ``true``, ``"x"``,
    ``[1, 2]``) and, failing that, as a bare string."""
    out = []
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
            raise ConfigError("--set", item, "must look like section.key=value")
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        out.append((key.strip(), value))
    return out


def apply_overrides(data: dict, overrides: list[tuple[str, Any]]) -> dict:
    data = copy.deepcopy(data)
    for key, value in overrides:
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError("--set", key, f"{part} is not a table")
        node[parts[-1]] = value
    return data


def load_scenario(path: str | Path, overrides: list[tuple[str, Any]] = ()) -> Scenario:
    path = Path(path)
    return scenario_from_dict(apply_overrides(read_toml(path), list(overrides)), str(path))


def scenario_from_dict(data: dict, file: str) -> Scenario:
    base_dir = Path(file).parent
    top = Table(data, file)
    name = top.str("name", Path(file).stem)
    top.str("description", "")
    seed = top.int("seed", 0, lo=0, hi=2**63 - 1)

    ct = top.table("cluster")
    machines = ct.int("machines", 0, lo=0, hi=MAX_MACHINES)
    topology = load_topology(ct.str("topology"), base_dir, machines or None)
    network = ct.str("network", "flow", choices=NETWORKS)
    ct.done()

    mt = top.table("model")
    if mt.has("file") == mt.has("name"):
        raise mt.error("name", "give exactly one of model.name (built-in) or model.file")
    if mt.has("name"):
        model = zoo_model(mt.str("name", choices=ZOO))
    else:
        model = load_model_file(base_dir / mt.str("file"))
    batch = mt.int("batch_size", 32, lo=1, hi=1_000_000)
    dtype = mt.str("dtype", "fp32", choices=DTYPES)
    mt.done()

    pt = top.table("parallel", {})
    par = Parallel(model_parallel=pt.int("model_parallel", 1, lo=1, hi=65536),
                   split=pt.str("split", "spatial", choices=("spatial", "layers")),
                   replicas=pt.int("replicas", 1, lo=1, hi=65536),
                   ps_shards=pt.int("ps_shards", 0, lo=0, hi=65536),
                   micro_batches=pt.int("micro_batches", 1, lo=1, hi=4096))
    if par.micro_batches > batch:
        raise pt.error("micro_batches", f"must be <= model.batch_size ({batch})")
    pt.done()

    tt = top.table("training", {})
    tr = Training(algorithm=tt.str("algorithm", "sync", choices=ALGORITHMS),
                  steps=tt.int("steps", 20, lo=1, hi=10_000_000),
                  learning_rate=tt.float("learning_rate", 0.1, positive=True),
                  allreduce=tt.str("allreduce", "ring", choices=COLLECTIVE_ALGOS))
    tt.done()
    ft = top.table("faults", {})
    ft.done()   # faults arrive with the asynchronous algorithms; an unknown key is refused today
    top.done()
    return Scenario(file, name, seed, topology, network, model, batch, dtype, par, tr, data)
