"""Sandblaster's ranks in a job: the coordinator, a replica's workers (slot 0 talks to the
coordinator and passes each unit on) and the L-BFGS shards; the decisions are
``coordinator_state``'s and ``shard_state``'s, the MPI loops ``sandblaster``'s."""
from __future__ import annotations

import time

import numpy as np

from clustersim.core.partition import even_cuts
from clustersim.core.plan import plan

from executor.comm import MPITransport, ReplicaLost, wait_buffer
from executor.data import Batches
from executor.partitioned import run_step
from executor.psrank import ShardClient
from executor.checks import dataset
from executor.comm import common_start


class SandblasterRoles:
    """Mixed into ``RankJob``: the roles of a Sandblaster job."""

    def coordinator(self) -> dict:
        from executor.coordinator_state import shard_pushes
        from executor.sandblaster import coordinate
        units = self.p.schedule.units
        W = self.M * self.R
        out = coordinate(self.world, [r * self.M for r in range(self.R)], [W + k for k in range(self.S)],
                         self.sc.training.steps, units, self.sc.training.backup_tasks, self.sc.faults.detect_timeout_s,
                         shard_pushes=shard_pushes(self.p.ps.share), acks=self.M > 1 and self.failed_rank >= 0)
        return {"role": "coordinator", **out}

    def sandblaster_worker(self) -> dict:
        """Slot 0 of a replica (its leader) talks to the coordinator and passes each ASSIGN
        and END on to the replica's other slots (a non-blocking broadcast, polled); every
        slot runs its share of each unit's step and pushes its part of the won units' sum."""
        import dataclasses
        from executor.comm import probe
        from executor.sandblaster import ACK, ASSIGN, END, READY, RESULT
        sc, xp, p, tr, j = self.sc, self.xp, self.p, self.sc.training, self.j
        units, unit_size = p.schedule.units, p.schedule.unit_size
        unit_plan = plan(dataclasses.replace(sc, batch_size=unit_size), check_memory=False)
        params = {key: [xp.asarray(a) for a in arrs] for key, arrs in self.box_params.items() if key[1] == j}
        x_tr, y_tr, x_te, y_te = dataset(sc, sc.seed, self.data)
        whole = Batches(x_tr, y_tr, sc.batch_size * self.R, np.random.default_rng([sc.seed, self.R]))
        coord, lead = self.world.size - 1, j == 0
        client = ShardClient(self.world, [self.M * self.R + k for k in range(self.S)], self.runs_of(j),
                             p.schedule.comm_bits, done_to_all=True)
        flat = self.flatten(params, j)
        from mpi4py import MPI
        status = MPI.Status()
        me = p.devices[self.r][j]
        cmd = np.zeros(units + 2, np.int64)                    # [ASSIGN, unit] or [END, n, won units...]
        step_times, batches = [], 0
        self.t0 = common_start(self.world)
        for b in range(tr.steps):
            xb, yb = whole.next()
            if self.lost is not None:
                self.lost.step = b
            if self.world.rank == self.failed_rank and b >= self.fail_step:
                self.crash(b)
                break
            start = time.perf_counter()
            self.fetch_params(client, flat, b, me)
            self.unflatten(flat, params, j)
            if lead:
                self.world.Send(np.zeros(1, np.int64), dest=coord, tag=READY)
            grads: dict[int, np.ndarray] = {}
            gone = False
            while True:
                if lead:
                    _, tag = probe(self.world, status, coord, MPI.ANY_TAG)
                    if tag == ASSIGN:                  # [batch, unit]
                        msg = np.empty(2, np.int64)
                        self.world.Recv(msg, source=coord, tag=ASSIGN)
                        cmd[:2] = ASSIGN, msg[1]
                    else:                              # [n, the n units this replica won]
                        self.world.Recv(cmd[1:], source=coord, tag=END)
                        cmd[0] = END
                try:
                    if self.M > 1:
                        wait_buffer(self.rep.Ibcast(cmd, root=0), self.lost)
                    if cmd[0] == ASSIGN:
                        u = int(cmd[1])
                        t = time.perf_counter()
                        xs, ys = xb[u * unit_size:(u + 1) * unit_size], yb[u * unit_size:(u + 1) * unit_size]
                        res = run_step(unit_plan, {j}, params, xp.asarray(xs), xp.asarray(ys),
                                       MPITransport(self.rep, xp, self.lost), xp=xp)
                    elif self.lost is not None:        # END: do all slots have it (will all push)?
                        wait_buffer(self.rep.Ibarrier(), self.lost)
                except ReplicaLost:                    # a slot of this replica crashed: so has the replica
                    if lead:
                        self.world.Send(np.array([b, 0], np.int64), dest=coord, tag=ACK)
                    gone = True
                    break
                if cmd[0] == ASSIGN:
                    grads[u] = self.flatten(res.grads, j)
                    self.span(f"unit {u}", "compute", me, b, t, time.perf_counter(), 0.0, 0.0, "unit")
                    if lead:
                        self.world.Send(np.array([b, u], np.int64), dest=coord, tag=RESULT)
                else:
                    if lead and self.lost is not None:
                        self.world.Send(np.array([b, 1], np.int64), dest=coord, tag=ACK)
                    won = [int(u) for u in cmd[2:2 + int(cmd[1])]]
                    total = sum((grads[u] for u in won), np.zeros_like(flat))
                    self.push_grads(client, total, b, me, time.perf_counter())
                    break
            if gone:
                break
            end = time.perf_counter()
            step_times.append(end - start)
            self.stepped(b, start, end)
            batches += 1
        return self.finish(params, flat, client, x_te, y_te, step_times, [], batches, final_fetch=tr.steps)

    def lbfgs_shard(self, k: int) -> dict:
        from executor.optim import LBFGS, LBFGS_MAX_STEP_FACTOR
        from executor.sandblaster import ShardDot, serve_lbfgs
        lo, hi = even_cuts(self.total, self.S)[k]
        flat = self.global_vector()
        runs = {rank: self.runs_of(rank % self.M)[k] for rank in range(self.M * self.R)}
        tr = self.sc.training
        lbfgs = LBFGS(lr=1.0, history=tr.lbfgs_history, first_step=tr.learning_rate, dot=ShardDot(self.shards),
                      max_step=LBFGS_MAX_STEP_FACTOR * tr.learning_rate)
        sched = self.p.schedule
        out = serve_lbfgs(self.world, flat[lo:hi].copy(), runs, sched.units, lbfgs, sched.comm_bits,
                          silent={self.failed_rank})
        return {"role": "shard", "applied": out["applied"], "busy_s": 0.0, "resumed_from": 0}
