"""Training-schedule decisions both runners share: how a Sandblaster batch is cut into
work units, and how many ranks a job's plan needs (workers, shards, coordinator)."""
from __future__ import annotations

from clustersim.core.scenario import Scenario


def units_of(sc: Scenario) -> tuple[int, int]:
    """(number of units, samples per unit) for one batch of batch_size x replicas."""
    total = sc.batch_size * sc.parallel.replicas
    units = min(sc.training.work_units or 8 * sc.parallel.replicas, total)
    return units, max(1, total // units)


def ranks_needed(sc: Scenario) -> int:
    """Workers, shards, and Sandblaster's coordinator."""
    coordinator = 1 if sc.training.algorithm == "sandblaster" else 0
    return sc.parallel.model_parallel * sc.parallel.replicas + sc.parallel.ps_shards + coordinator
