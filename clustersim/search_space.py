"""What ``clustersim search`` tries and how it ranks: the ways to run one job on up to N
devices, with the global batch held fixed.

A candidate is a set of dotted overrides of the scenario: replicas r x devices per replica
m (``model_parallel``), the split (spatial, ``layers``: m pipeline stages with 1, 4, m or
4m micro-batches, or for models with attention ``tensor``, with and without sequence
parallelism where the positions divide by m), and how gradients meet (allreduce with
NCCL's tuner, or a parameter server of one shard per machine used, on those machines:
``parallel.ps_placement = "local"``).
Models with attention are also tried as Megatron-LM lays out large ones (``pipelines``):
t tensor slots inside one machine x p pipeline stages (``parallel.pipeline``) x as many
replicas as fill the N devices, with p or 4p micro-batches (rounded up to divisors of the
batch: ``even_micro``) and sequence parallelism where the positions divide by t.  The
global batch (the scenario's ``model.batch_size`` x ``parallel.replicas``) is divided over
the replicas, so every candidate trains on the same samples per step.  Placement: a
replica's slots are consecutive devices, so they share a machine first (``plan`` places
them in device order).  Pure functions: the API runs the candidates.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Any

from clustersim.core.partition import tensor_slices
from clustersim.core.scenario import Scenario, Training

OBJECTIVES = ("time", "cost", "time-to-accuracy")
MICRO = (1, 4)                 # micro-batches per pipeline of one-device stages, besides p and 4p
PIPELINE_MICRO = (1, 4)        # micro-batches per stage of a pipeline of tensor slices: p and 4p


def powers_of_two(limit: int) -> list[int]:
    out, k = [], 1
    while k <= limit:
        out.append(k)
        k *= 2
    return out


def candidates(sc: Scenario, devices: int, zero: int | None = None) -> list[dict[str, Any]]:
    """Every configuration to try on at most ``devices`` devices (dotted overrides); ``zero``
    is the ZeRO stage asked for (default the scenario's), run where a candidate has replicas."""
    zero = sc.training.zero if zero is None else zero
    global_batch = sc.batch_size * sc.parallel.replicas
    compute = sc.topology.compute_devices()
    positions = sc.model.attention_positions
    splits = ("spatial", "layers") + (("tensor",) if positions else ())
    out = []
    for m in powers_of_two(devices):
        for split in splits if m > 1 else ("spatial",):
            for r in sorted(set(powers_of_two(devices // m)) | {devices // m}):
                if global_batch % r:
                    continue
                batch = global_batch // r
                for micro in even_micro(batch, (*MICRO, m, 4 * m)) if split == "layers" else (1,):
                    base = {"parallel.model_parallel": m, "parallel.split": split, "parallel.replicas": r,
                            "model.batch_size": batch, "parallel.micro_batches": micro, "parallel.grid": [],
                            "parallel.sequence_parallel": False, "parallel.pipeline": 1,
                            "parallel.ps_placement": "spare"}
                    out.append({**base, "parallel.ps_shards": 0, "training.allreduce": sc.training.allreduce,
                                **sharded(zero, r, 0)})
                    if split == "tensor" and positions % m == 0:      # Korthikanti et al. 2022's
                        out.append({**out[-1], "parallel.sequence_parallel": True})
                    if r > 1 and split != "tensor" and sc.training.optimizer != "adam":
                        # one shard per machine the replicas use (a tensor split keeps norms on every
                        # slot, and shards apply no Adam: no shards, which the scenario check refuses)
                        used = len({sc.topology.machine_of(d) for d in compute[:r * m]})
                        # the scenario's allreduce and buckets are no shard's (the check refuses them)
                        out.append({**base, "parallel.ps_shards": used, "parallel.ps_placement": "local",
                                    "training.allreduce": Training.allreduce, "training.bucket_mb": Training.bucket_mb,
                                    **sharded(zero, r, used)})
    return out + pipelines(sc, devices, zero) if positions else out


RUN_ONLY = ("training.allreduce", "training.bucket_mb")    # a shard row's defaults: run with, never shown


def shown(row: dict[str, Any]) -> dict[str, Any]:
    """A candidate's row as search reports it: a parameter-server row without the allreduce
    settings it runs with only so that the scenario check takes it (it has no allreduce)."""
    if not row.get("parallel.ps_shards"):
        return row
    return {k: v for k, v in row.items() if k not in RUN_ONLY}


def sharded(zero: int, replicas: int, shards: int) -> dict[str, int]:
    """ZeRO shards sync allreduce's state over the replicas: the stage asked for where a
    candidate has several replicas and no parameter server, else off."""
    return {"training.zero": zero if replicas > 1 and not shards else 0} if zero else {}


def pipelines(sc: Scenario, devices: int, zero: int | None = None) -> list[dict[str, Any]]:
    """Pipelines of tensor slices (Narayanan et al. 2021): t tensor slots (2 and up, dividing
    every machine's device count, so never across machines) x p >= 2 stages, replicated to fill
    ``devices``; p or 4p micro-batches (the bubble (p - 1) / (m + p - 1)); sequence
    parallelism where the positions divide by t (it only saves: Korthikanti et al. 2022).
    Only models with attention: the tensor split needs its heads.  ``zero`` as ``candidates``."""
    zero = sc.training.zero if zero is None else zero
    global_batch = sc.batch_size * sc.parallel.replicas
    per = Counter(sc.topology.machine_of(d) for d in sc.topology.compute_devices())
    whole = math.gcd(*per.values())                  # t divides every machine: a group never spans two
    positions = sc.model.attention_positions
    out = []
    for t in (k for k in powers_of_two(min(whole, devices))[1:] if whole % k == 0):
        for p in powers_of_two(devices // t)[1:]:
            r = devices // (t * p)
            if global_batch % r or not _stages_fill(sc, p, t, positions % t == 0):
                continue
            batch = global_batch // r
            for micro in even_micro(batch, [k * p for k in PIPELINE_MICRO]) if batch >= p else ():
                out.append({"parallel.model_parallel": t, "parallel.split": "tensor", "parallel.replicas": r,
                            "model.batch_size": batch, "parallel.micro_batches": micro, "parallel.grid": [],
                            "parallel.sequence_parallel": positions % t == 0, "parallel.pipeline": p,
                            "parallel.ps_shards": 0, "parallel.ps_placement": "spare",
                            "training.allreduce": sc.training.allreduce,
                            **sharded(zero, r, 0)})
    return out


def even_micro(batch: int, targets) -> list[int]:
    """Micro-batch counts near ``targets`` that divide ``batch`` evenly (Megatron-LM requires
    it): each target no larger than the batch rounded up to the next divisor."""
    return sorted({next(d for d in range(k, batch + 1) if batch % d == 0) for k in targets if k <= batch})


def _stages_fill(sc: Scenario, stages: int, tensor: int, sequence: bool) -> bool:
    """Whether the tensor split of ``tensor`` slots makes ``stages`` pipeline stages of the
    model: every attention's heads divide by it, and its blocks make that many stages (a
    stage ends only between whole blocks, where a tensor group's allreduces are done)."""
    if any(n.layer.kind == "attention" and n.layer.heads % tensor for n in sc.model.nodes):
        return False
    try:
        tensor_slices(sc.model, stages, tensor, sequence)
    except ValueError:
        return False
    return True


def memory_tries(sc: Scenario, cand: dict[str, Any]) -> list[list[dict[str, Any]]]:
    """What to try on a candidate whose activations do not fit, in groups whose first fit
    is simulated: for one without a pipeline, gradient accumulation (its batch in 2, 4, 8 ...
    micro-batches, rounded up to divisors: the step's samples and FLOPs kept, one allreduce
    a step); then ``recompute_tries`` (recomputed FLOPs, whole kernels)."""
    groups = []
    if cand["parallel.pipeline"] == 1 and cand["parallel.split"] != "layers":
        batch = cand["model.batch_size"]
        groups.append([{"parallel.micro_batches": k} for k in even_micro(batch, powers_of_two(batch)[1:])])
    return groups + [[{"training.recompute": mode} for mode in recompute_tries(sc)]]


def recompute_tries(sc: Scenario) -> list[str]:
    """Recomputation to try, in turn, on a candidate whose activations do not fit: none where
    the scenario sets it; else selective (where the model has attention's score matrices to
    drop), then full -- the cheapest that fits is what a trainer would run."""
    if sc.training.recompute:
        return []
    return (["selective"] if sc.model.attention_positions else []) + ["full"]


def score(point: dict, objective: str) -> float:
    """Lower is better: seconds per sample, dollars per sample (each stretched by the expected
    failures and checkpoint writes, ``failure_overhead``, where given; never finishing:
    infinite), or seconds to accuracy."""
    stretch = point.get("failure_overhead", 1.0)
    stretch = float("inf") if stretch is None else stretch
    if objective == "time":
        return stretch / point["samples_per_s"]
    if objective == "cost":
        return stretch * point["usd_per_hour"] / 3600 / point["samples_per_s"]
    tta = point.get("time_to_accuracy_s")
    return float("inf") if tta is None else tta


COMPUTE_PHASES = ("fwd", "bwd", "update")


def why(summary: dict) -> str:
    """Where the time goes and what binds, in a line: how busy the median device is (the
    rest of its step it waits), and the traffic that moves the most (transfer-seconds)."""
    util = sorted(summary.get("device_utilisation", {}).values())
    median = util[len(util) // 2] if util else 0.0
    phases = summary.get("time_by_phase_s", {})
    traffic = sorted(((v, k) for k, v in phases.items() if k not in COMPUTE_PHASES and k != "wait" and v > 0),
                     reverse=True)
    moved = f"; most traffic: {traffic[0][1]}" if traffic else ""
    binds = "compute binds" if median >= 0.6 else "waiting on communication binds"
    return f"median device busy {median:.0%} ({binds}){moved}"
