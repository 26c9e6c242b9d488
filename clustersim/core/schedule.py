"""The training schedule: every decision about when a replica fetches, pushes, averages,
which rule a shard applies, how a Sandblaster batch is cut and how many gradients a sync
step waits for -- made once from the scenario, carried by the Plan, read by both runners."""
from __future__ import annotations

from dataclasses import dataclass

from clustersim.core.scenario import ASYNC, Scenario

PARAM_BYTES = 4      # fp32 master weights: checkpoints, updates, parameter-server messages (gradients: Scenario.gradient_bytes)


@dataclass(frozen=True)
class Schedule:
    algorithm: str
    steps: int                     # per replica (sandblaster: batches)
    rule: str                      # the shards' update: sgd | adagrad | dcasgd | dcasgd_adaptive | lbfgs | none
    fetch_every: int               # async: fetch before every step s with s % fetch_every == 0
    push_every: int                # async: push after every step s with (s + 1) % push_every == 0
    averages: tuple[int, ...]      # local SGD: the steps after which the replicas average
    quorum: int                    # sync: gradients a step applies (replicas - backup workers)
    units: int                     # sandblaster: work units per batch ...
    unit_size: int                 # ... and samples per unit
    comm_bits: int                 # parameter-server pushes and fetches: 32 or 8
    staleness_bound: int | None    # ssp: a replica at most this many steps ahead of the slowest
    exchanges: tuple[int, ...] = ()  # layerwise: the steps after which the layer groups swap weights

    def fetches_before(self, step: int) -> bool:
        return self.algorithm == "sync" or step % self.fetch_every == 0

    def pushes_after(self, step: int) -> bool:
        return self.algorithm == "sync" or (step + 1) % self.push_every == 0

    def averages_after(self, step: int) -> bool:
        return step in self.averages


def exchange_steps(steps: int, batch_size: int, interval: int) -> tuple[int, ...]:
    """Layerwise: the steps after which weights are exchanged -- the first step boundary at
    or after each multiple of ``interval`` samples (step s ends at (s + 1) x batch_size
    samples), and the last step, so that the run ends exchanged."""
    out = [s for s in range(steps) if ((s + 1) * batch_size) // interval > (s * batch_size) // interval]
    if not out or out[-1] != steps - 1:
        out.append(steps - 1)
    return tuple(out)


def rule_of(sc: Scenario) -> str:
    """The update a parameter-server shard applies."""
    tr = sc.training
    if not sc.parallel.ps_shards:
        return "none"
    if tr.algorithm == "dcasgd":
        return "dcasgd_adaptive" if tr.dcasgd_adaptive else "dcasgd"
    if tr.algorithm == "sandblaster":
        return "lbfgs"
    return tr.optimizer if tr.algorithm in ASYNC else "sgd"


def schedule_of(sc: Scenario) -> Schedule:
    tr, par = sc.training, sc.parallel
    k = tr.local_steps
    averages = tuple(s for s in range(tr.steps) if (s + 1) % k == 0 or s == tr.steps - 1) \
        if tr.algorithm == "local" else ()
    units, unit_size = units_of(sc)
    return Schedule(tr.algorithm, tr.steps, rule_of(sc), tr.n_fetch if tr.algorithm in ASYNC else 1,
                    tr.n_push if tr.algorithm in ASYNC else 1, averages, par.replicas - tr.backup_workers,
                    units, unit_size, tr.comm_bits, tr.staleness if tr.algorithm == "ssp" else None,
                    exchange_steps(tr.steps, sc.batch_size, tr.comm_interval) if tr.algorithm == "layerwise" else ())


def units_of(sc: Scenario) -> tuple[int, int]:
    """(number of units, samples per unit) for one batch of batch_size x replicas."""
    total = sc.batch_size * sc.parallel.replicas
    units = min(sc.training.work_units or 8 * sc.parallel.replicas, total)
    return units, max(1, total // units)


def ranks_needed(sc: Scenario) -> int:
    """Workers, shards, and Sandblaster's coordinator."""
    coordinator = 1 if sc.training.algorithm == "sandblaster" else 0
    return sc.parallel.devices_per_replica * sc.parallel.replicas + sc.parallel.ps_shards + coordinator


# FLOPs and bytes per parameter of one apply on a shard (reads and writes of fp32 arrays):
# SGD w, g in, w out; Adagrad + h in and out; DC-ASGD + the worker's backup copy; adaptive
# + the mean square.  Both runners cost (and trace) an apply with these.
APPLY_COST = {"sgd": (2.0, 12.0), "adagrad": (5.0, 20.0), "dcasgd": (8.0, 24.0),
              "dcasgd_adaptive": (11.0, 32.0)}
OPTIMIZER_STATES = {"sgd": 0, "adagrad": 1, "adam": 2}   # values kept per parameter besides the weight
ADAM_FLOPS = 10.0          # per parameter: two moment updates, bias corrections, a square root and a divide
QUANT_COST = (3.0, 5.0)   # an 8-bit message: a quantise and a dequantise pass, per element
QUANT_HEADER = 8          # an 8-bit message's header: its minimum and step as two float32


def message_bytes(params: int, bits: int) -> int:
    """Bytes of a push or fetch of ``params`` values: 4 each, or with 8-bit messages one code
    each after the header (the executor's ``psrank.encode``)."""
    if bits == 32 or not params:
        return params * PARAM_BYTES
    return params + QUANT_HEADER


def apply_cost(rule: str, params: int, summed: int = 0) -> tuple[float, float]:
    """(FLOPs, bytes) of one apply on ``params`` parameters: ``rule``'s APPLY_COST for one
    push (``summed`` 0), or a sync step's mean of ``summed`` gradients and the SGD step,
    (summed + 1) FLOPs and (summed + 2) values read or written per parameter."""
    if summed:
        return (summed + 1) * params, (summed + 2) * params * PARAM_BYTES
    flops, nbytes = APPLY_COST[rule]
    return flops * params, nbytes * params


def master_bytes(sc: Scenario) -> int:
    """Bytes of a master weight and of each optimizer state value (Adam's moments): fp32,
    or the model's own 8-byte values."""
    return max(PARAM_BYTES, sc.dtype_bytes)


def checkpoint_bytes(sc: Scenario) -> float:
    """Bytes a checkpoint holds per parameter: the master weight and each optimizer state
    value (Adam's two moments, Adagrad's sum of squares) -- 12 with Adam, as Megatron's and
    DeepSpeed's checkpoints keep them; a narrower working copy is made again from the master
    on load.  A shard's checkpoint keeps its rule's state the same way (DC-ASGD its mean
    square, as the executor's shards save it)."""
    states = OPTIMIZER_STATES[sc.training.optimizer] + (1 if sc.training.algorithm == "dcasgd" else 0)
    return master_bytes(sc) * (1 + states)


def optimizer_bytes(sc: Scenario) -> float:
    """Optimizer state a parameter keeps besides its weight and gradient: a master weight
    where the model's dtype is narrower (mixed precision), and the optimizer's states
    (Adam: two moments) -- 4 + 8 = 12 with Adam in fp16/bf16, as ZeRO's paper counts."""
    master = master_bytes(sc)
    return (master if sc.dtype_bytes < master else 0) + OPTIMIZER_STATES[sc.training.optimizer] * master


def update_cost(sc: Scenario, params: int) -> tuple[float, float]:
    """(FLOPs, bytes) of a replica's optimizer step on ``params`` parameters after the
    allreduce, bound by memory traffic: the gradient read (``Scenario.gradient_bytes``), the
    master weight read and written and each optimizer state likewise (Adam: two moments,
    Kingma & Ba 2015, Algorithm 1), and a 16-bit model's copy of the weight written.  fp32
    SGD: 2 FLOPs and 12 bytes, as ``apply_cost``'s."""
    master = master_bytes(sc)
    optimizer = sc.training.optimizer
    copy = sc.dtype_bytes if sc.dtype_bytes < master else 0
    nbytes = sc.gradient_bytes + 2 * master * (1 + OPTIMIZER_STATES[optimizer]) + copy
    flops = 2.0 + (ADAM_FLOPS if optimizer == "adam" else 0.0)
    return flops * params, nbytes * params


# --- pipeline schedules ---------------------------------------------------------------------
def stage_units(schedule: str, stage: int, stages: int, micro_batches: int) -> list[tuple[str, int]]:
    """The (``fwd``/``bwd``, micro-batch) units pipeline stage ``stage`` of ``stages`` runs,
    in the order it runs them.  ``gpipe``: every forward, then every backward, both in
    micro-batch order (as torch.distributed.pipelining's ScheduleGPipe).  ``1f1b``
    (PipeDream-flush, Megatron's non-interleaved schedule): min(m, p - stage - 1) warm-up
    forwards, then one forward and one backward in turn, then the backwards left.
    Raises ValueError for another schedule or a stage outside 0..stages-1."""
    if not 0 <= stage < stages:
        raise ValueError(f"stage(={stage}) must be in 0..{stages - 1}")
    m = micro_batches
    if schedule == "gpipe":
        return [("fwd", k) for k in range(m)] + [("bwd", k) for k in range(m)]
    if schedule != "1f1b":
        raise ValueError(f"schedule(={schedule!r}) must be gpipe or 1f1b")
    warm = min(m, stages - stage - 1)
    units = [("fwd", k) for k in range(warm)]
    for k in range(m - warm):
        units += [("fwd", warm + k), ("bwd", k)]
    return units + [("bwd", k) for k in range(m - warm, m)]


def micro_batches_held(units: list[tuple[str, int]]) -> int:
    """The most micro-batches whose activations a stage keeps at once running ``units``:
    forward run, backward not yet (m under GPipe, min(m, p - stage) under 1F1B)."""
    held = most = 0
    for kind, _ in units:
        held += 1 if kind == "fwd" else -1
        most = max(most, held)
    return most
