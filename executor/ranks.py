"""The executor's ranks: ``mpiexec -n N python -m executor.ranks SCENARIO [...]``.

``clustersim execute`` starts this itself on one machine; on a cluster, start the same
module with your own ``mpiexec``/``srun``.  One rank per device slot of every replica
(rank = replica x model_parallel + slot).  Each step a rank runs its slot's share of the
Plan's op graph (activations over the replica's communicator), averages its slot's
gradients with the same slot of the other replicas (a non-blocking allreduce, polled),
and takes an SGD step.  Rank 0 alone prints and writes files.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from sim.errors import ConfigError
from sim.plan import plan
from sim.scenario import load_scenario, parse_set
from sim.trace import Span, Trace, write_chrome

from .backend import get_xp
from .comm import MPITransport, wait_buffer
from .data import Batches, digits, synthetic
from .kernels import softmax_xent_loss
from .partitioned import _box_of, box_index, full_params, run_step


def rank_role(rank: int, model_parallel: int) -> tuple[int, int]:
    """(replica, slot) of a rank: pure, so tests need no MPI."""
    return divmod(rank, model_parallel)


def dataset(sc, seed: int):
    if sc.model.name == "mlp-digits":
        d = digits(seed)
        shape = (len(d.x_train), *sc.model.input_shape)
        return d.x_train.reshape(shape), d.y_train, d.x_test.reshape(len(d.x_test), *sc.model.input_shape), d.y_test
    classes = sc.model.classes or sc.model.nodes[-1].out_shape[0]
    d = synthetic(sc.model.input_shape, classes, 4 * sc.batch_size * sc.parallel.replicas, np.random.default_rng(seed))
    return d.x_train, d.y_train, d.x_test, d.y_test


def check(sc, size: int) -> None:
    need = sc.parallel.model_parallel * sc.parallel.replicas
    if size != need:
        raise ConfigError("--ranks", str(size), f"the scenario needs model_parallel x replicas = {need} ranks")
    if sc.training.algorithm != "sync" or sc.parallel.ps_shards:
        raise ConfigError(sc.file, "training.algorithm",
                          "execute runs synchronous SGD by allreduce so far (ps_shards = 0); "
                          f"got {sc.training.algorithm} with ps_shards = {sc.parallel.ps_shards}")


def main(argv: list[str] | None = None) -> int:
    from mpi4py import MPI
    ap = argparse.ArgumentParser(prog="executor.ranks")
    ap.add_argument("scenario")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--trace")
    ap.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
    args = ap.parse_args(argv)
    world = MPI.COMM_WORLD
    try:
        sc = load_scenario(args.scenario, parse_set(args.set))
        check(sc, world.size)
        xp = get_xp(args.device)
    except (ConfigError, ValueError) as exc:
        if world.rank == 0:
            print(f"clustersim: error: {exc}", file=sys.stderr)
        return 2
    summary, spans = train(sc, world, xp)
    all_spans = world.gather(spans, root=0)
    if world.rank == 0:
        if args.trace:
            write_chrome(Trace([s for part in all_spans for s in part]), args.trace)
        print(json.dumps(summary, indent=2) if args.json else _text(summary))
    return 0


def train(sc, world, xp):
    p = plan(sc)
    M, R = sc.parallel.model_parallel, sc.parallel.replicas
    r, j = rank_role(world.rank, M)
    rep = world.Split(color=r, key=j)
    slot = world.Split(color=j, key=r)
    transport = MPITransport(rep)
    full = full_params(p, np.random.default_rng(sc.seed), dtype=np.float32)
    params = {}
    for i, sl in enumerate(p.slices):
        box = dict(sl).get(j)
        if box is not None and i in full:
            params[(i, j)] = [xp.asarray(np.ascontiguousarray(a[idx]))
                              for a, idx in zip(full[i], box_index(sc.model.nodes[i].layer.kind, box))]
    del full
    x_tr, y_tr, x_te, y_te = dataset(sc, sc.seed)
    batches = Batches(x_tr[r::R], y_tr[r::R], sc.batch_size, np.random.default_rng([sc.seed, r]))
    spans: list[Span] = []
    where = f"rank{world.rank}"
    world.Barrier()
    t0 = time.perf_counter()
    step_times, losses = [], []
    for step in range(sc.training.steps):
        start = time.perf_counter()
        x, y = batches.next()
        last = [time.perf_counter()]

        def on_op(op, step=step):
            now = time.perf_counter()
            if (op.kind in ("fwd", "bwd") and op.slot == j) or (op.kind == "xfer" and j in (op.slot, op.dst)):
                kind = "compute" if op.kind != "xfer" else "transfer"
                spans.append(Span(f"{op.kind if op.kind != 'xfer' else op.why} L{op.layer}", kind, where, r, step,
                                  last[0] - t0, now - t0, op.bytes if kind == "transfer" else 0.0,
                                  op.flops, op.kind if op.kind != "xfer" else op.why))
            last[0] = now
        res = run_step(p, {j}, params, xp.asarray(x), xp.asarray(y), transport, xp=xp, on_op=on_op)
        t_ex = time.perf_counter()
        if R > 1:
            keys = sorted(res.grads)
            flat = np.concatenate([np.asarray(g, dtype=np.float32).ravel() for k in keys for g in res.grads[k]]) \
                if keys else np.zeros(0, np.float32)
            total = np.empty_like(flat)
            wait_buffer(slot.Iallreduce(flat, total))
            off = 0
            for k in keys:
                for g in res.grads[k]:
                    g[...] = xp.asarray(total[off:off + g.size].reshape(g.shape)) / R
                    off += g.size
            spans.append(Span("allreduce", "transfer", where, -1, step, t_ex - t0, time.perf_counter() - t0,
                              flat.nbytes, 0.0, "allreduce"))
        t_up = time.perf_counter()
        for key, gs in res.grads.items():
            for w, g in zip(params[key], gs):
                w -= sc.training.learning_rate * g
        now = time.perf_counter()
        spans.append(Span("update", "update", where, r, step, t_up - t0, now - t0, 0.0, 0.0, "update"))
        step_times.append(now - start)
        losses.append(rep.allreduce(res.loss))
    wall = time.perf_counter() - t0
    acc, loss = evaluate(p, params, x_te, y_te, j, rep, xp)
    med = float(np.median(step_times)) if step_times else 0.0
    summary = {"name": sc.name, "model": sc.model.name, "ranks": world.size, "model_parallel": M, "replicas": R,
               "steps": sc.training.steps, "step_time_s": med,
               "samples_per_s": sc.batch_size * R / med if med else 0.0,
               "sim_time_s": wall, "sim_events": len(spans), "wall_s": wall,
               "train_loss": losses[-1] if losses else None, "accuracy": acc, "loss": loss}
    return summary, spans


def evaluate(p, params, x, y, j: int, rep, xp) -> tuple[float, float]:
    """Accuracy and loss on held-out data with the trained parameters (replica 0's view)."""
    res = run_step(p, {j}, params, xp.asarray(x), xp.asarray(y), MPITransport(rep), xp=xp, backward=False)
    last = len(p.slices) - 1
    pieces = rep.gather({c: np.asarray(arr) for (c, _), arr in res.logits.items()}, root=0)
    if rep.rank != 0:
        return 0.0, 0.0
    logits = np.zeros((len(x), p.scenario.model.nodes[-1].out_shape[0]), np.float64)
    for part in pieces:
        for c, arr in part.items():
            c0, c1 = _box_of(p, last, c)[0]
            logits[:, c0:c1] = arr[:, :, 0, 0]
    loss, _ = softmax_xent_loss(np, logits, np.asarray(y))
    return float((logits.argmax(axis=1) == np.asarray(y)).mean()), float(loss)


def _text(s: dict) -> str:
    return (f"{s['name']}: executed {s['steps']} steps of {s['model']} on {s['ranks']} ranks "
            f"({s['model_parallel']} per replica x {s['replicas']} replicas)\n"
            f"  step time        {s['step_time_s'] * 1e3:.4g} ms (median)\n"
            f"  throughput       {s['samples_per_s']:.4g} samples/s\n"
            f"  accuracy         {s['accuracy']:.2%} (test loss {s['loss']:.4g})\n"
            f"  wall             {s['wall_s']:.3g} s")


if __name__ == "__main__":
    sys.exit(main())
