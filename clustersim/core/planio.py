"""A Plan as plain JSON data, so the launcher plans once and hands the Plan to the ranks.

The scenario travels as its validated tables (``Scenario.raw``) and its file's absolute
path (a symlink's own, not its target's: files are named beside it), and is rebuilt from them: a model or topology file it names is read again there, by
the same path (a relative one would be read from the loader's working directory), and a
digest of the model and the devices refuses a plan whose files changed since it was made;
every partitioning and schedule decision travels as made: nothing is planned again on the
other side.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

from clustersim.core.plan import Op, Plan, PSLayout
from clustersim.core.scenario import scenario_from_dict
from clustersim.core.schedule import Schedule
from clustersim.core.trace import write_atomic

VERSION = 4                    # 2: transfers name the layer they carry (Op.producer); 3: a tensor split's parts;
                               # 4: the scenario's absolute path and the digest of what it read


def digest(sc) -> str:
    """What a Plan's ops were made from that its scenario's tables do not hold: the model
    (maybe a model file) and the devices (maybe a cluster file)."""
    return hashlib.sha256(repr((sc.model, sorted(sc.topology.devices.items()))).encode()).hexdigest()[:16]


def plan_to_dict(p: Plan) -> dict:
    return {"version": VERSION, "scenario": {"file": os.path.abspath(p.scenario.file), "tables": p.scenario.raw,
                                             "digest": digest(p.scenario)},
            "slices": p.slices, "axes": p.axes, "ops": [dataclasses.asdict(op) for op in p.ops],
            "devices": p.devices, "slot_params": p.slot_params, "sync": p.sync,
            "ps": dataclasses.asdict(p.ps) if p.ps else None, "schedule": dataclasses.asdict(p.schedule),
            "memory": p.memory, "parts": p.parts}


def _tuples(x):
    """JSON lists back to the tuples the Plan holds."""
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def plan_from_dict(d: dict) -> Plan:
    """Raises ValueError for data that is not a serialised Plan of this version."""
    if not isinstance(d, dict) or d.get("version") != VERSION:
        raise ValueError(f"not a clustersim plan of version {VERSION}")
    sc = scenario_from_dict(d["scenario"]["tables"], d["scenario"]["file"])
    if digest(sc) != d["scenario"]["digest"]:
        raise ValueError(f"its model or cluster is not what {d['scenario']['file']} gives now (a file it names "
                         f"changed since the plan was made, or the plan was built in code): plan it from the files")
    ops = tuple(Op(**{**o, "deps": tuple(o["deps"])}) for o in d["ops"])
    ps = PSLayout(**{k: _tuples(v) for k, v in d["ps"].items()}) if d["ps"] else None
    sched = Schedule(**{k: _tuples(v) for k, v in d["schedule"].items()})
    return Plan(sc, _tuples(d["slices"]), _tuples(d["axes"]), ops, _tuples(d["devices"]), _tuples(d["slot_params"]),
                d["sync"], ps, sched, d["memory"], _tuples(d["parts"]))


def save_plan(p: Plan, path: str | Path) -> None:
    write_atomic(path, json.dumps(plan_to_dict(p)))


def load_plan(path: str | Path) -> Plan:
    return plan_from_dict(json.loads(Path(path).read_text()))
