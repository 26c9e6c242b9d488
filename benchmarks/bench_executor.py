"""Executor speed against raw baselines measured in the same run (medians of REPEATS):

- compute: our kernels (dense forward and backward, conv2d forward) against the raw GEMM
  of the same shapes (numpy matmul on the im2col matrix for conv); goal >= 90%;
- point-to-point: our transport (header + payload, polled waits) against a raw mpi4py
  Send/Recv ping-pong at the same sizes, on 2 ranks; goal >= 80%;
- parameter server: shard updates per second in a Downpour run of the digits MLP.

    make bench        # or: python benchmarks/bench_executor.py
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from clustersim.calibration.host import median_time  # noqa: E402
from executor.kernels import backward, forward, windows  # noqa: E402
from clustersim.core.layers import full_box  # noqa: E402
from clustersim.core.models import make_layer  # noqa: E402

REPEATS = 7
DENSE = [(128, 440, 2560), (128, 2560, 2560), (128, 2560, 8192)]       # distbelief-speech, batch 128
CONV = [(16, 64, 27, 27, 192, 5, 2)]                                   # alexnet conv2, batch 16: B C H W F k pad


def timeit(fn, repeats=REPEATS) -> float:
    return median_time(fn, repeats)


def compute() -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for b, n_in, n_out in DENSE:
        x = rng.standard_normal((b, n_in, 1, 1), dtype=np.float32)
        W = rng.standard_normal((n_in, n_out), dtype=np.float32)
        bias = np.zeros(n_out, np.float32)
        layer = make_layer("dense", units=n_out)
        box, rin = full_box((n_out, 1, 1)), full_box((n_in, 1, 1))
        ours = timeit(lambda: forward(np, layer, (n_in, 1, 1), x, rin, box, [W, bias]))
        x2 = x.reshape(b, n_in)
        raw = timeit(lambda: x2 @ W)
        rows.append({"op": f"dense fwd {b}x{n_in}x{n_out}", "ours_s": ours, "raw_gemm_s": raw, "ratio": raw / ours})
        y, cache = forward(np, layer, (n_in, 1, 1), x, rin, box, [W, bias])
        dy = rng.standard_normal(y.shape, dtype=np.float32)
        ours = timeit(lambda: backward(np, layer, (n_in, 1, 1), x.shape, rin, box, [W, bias], cache, dy))
        d2 = dy.reshape(b, n_out)
        raw = timeit(lambda: (d2 @ W.T, x2.T @ d2))
        rows.append({"op": f"dense bwd {b}x{n_in}x{n_out}", "ours_s": ours, "raw_gemm_s": raw, "ratio": raw / ours})
    for b, c, h, w, f, k, pad in CONV:
        layer = make_layer("conv2d", filters=f, kernel=k, padding=pad)
        x = rng.standard_normal((b, c, h, w), dtype=np.float32)
        W = rng.standard_normal((f, c, k, k), dtype=np.float32)
        out = layer.shape((c, h, w))
        ours = timeit(lambda: forward(np, layer, (c, h, w), x, full_box((c, h, w)), full_box(out), [W, np.zeros(f, np.float32)]), 3)
        xp_ = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
        cols = np.ascontiguousarray(windows(np, xp_, k, 1).transpose(0, 2, 3, 1, 4, 5).reshape(-1, c * k * k))
        Wm = W.reshape(f, -1).T.copy()
        raw = timeit(lambda: cols @ Wm, 3)
        rows.append({"op": f"conv2d fwd {b}x{c}x{h}x{w} -> {f} k{k}", "ours_s": ours, "raw_gemm_s": raw, "ratio": raw / ours})
    return rows


PINGPONG = r'''
import sys, time, json, statistics
import numpy as np
from mpi4py import MPI
sys.path.insert(0, sys.argv[1])
from executor.comm import MPITransport
c = MPI.COMM_WORLD
t = MPITransport(c)
rows = []
for n in [2**10, 2**14, 2**18, 2**22, 2**24]:
    a = np.ones(n // 4, np.float32)
    b = np.empty_like(a)
    def raw():
        if c.rank == 0:
            c.Send(a, dest=1, tag=5); c.Recv(b, source=1, tag=6)
        else:
            c.Recv(b, source=0, tag=5); c.Send(a, dest=0, tag=6)
    def ours():
        if c.rank == 0:
            t.send(0, 1, ("a", 1, 0), a); t.flush(); t.recv(1, 0, ("a", 2, 0), a.shape, a.dtype)
        else:
            t.recv(0, 1, ("a", 1, 0), a.shape, a.dtype); t.send(1, 0, ("a", 2, 0), a); t.flush()
    res = {}
    for name, fn in (("raw", raw), ("ours", ours)):
        reps = max(5, min(200, (2**26) // n))
        times = []
        for _ in range(5):
            c.Barrier(); s = time.perf_counter()
            for _ in range(reps):
                fn()
            times.append((time.perf_counter() - s) / reps)
        res[name] = statistics.median(times)
    rows.append({"bytes": n, "raw_s": res["raw"], "ours_s": res["ours"], "ratio": res["raw"] / res["ours"]})
if c.rank == 0:
    print(json.dumps(rows))
'''


def pingpong() -> list[dict]:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as fh:
        fh.write(PINGPONG)
    mpiexec = Path(sys.executable).parent / "mpiexec"
    out = subprocess.run([str(mpiexec), "-n", "2", sys.executable, fh.name, str(Path(__file__).resolve().parents[1])],
                         capture_output=True, text=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def ps_rate() -> dict:
    scen = Path(tempfile.mkdtemp()) / "dp.toml"
    scen.write_text('[cluster]\ntopology = "dgx-h100"\n[model]\nname = "mlp-digits"\nbatch_size = 32\n'
                    '[parallel]\nreplicas = 2\nps_shards = 1\n[training]\nalgorithm = "downpour"\nsteps = 500\n'
                    'learning_rate = 0.2\n')
    out = subprocess.run([sys.executable, "-m", "clustersim", "execute", str(scen), "--json"], capture_output=True,
                         text=True, timeout=600)
    d = json.loads(out.stdout)
    return {"updates": d["shard_updates"][0], "wall_s": d["wall_s"], "updates_per_s": d["shard_updates"][0] / d["wall_s"]}


def main() -> None:
    comp, pp, ps = compute(), pingpong(), ps_rate()
    if "--json" in sys.argv:
        print(json.dumps({"compute": comp, "pingpong": pp, "ps": ps}, indent=2))
        return
    print("compute kernels against the raw GEMM of the same shapes (goal >= 90%):")
    for r in comp:
        print(f"  {r['op']:<36} ours {r['ours_s'] * 1e3:8.3f} ms  raw {r['raw_gemm_s'] * 1e3:8.3f} ms  {r['ratio']:6.1%}")
    print("point-to-point round trip, our transport against raw mpi4py Send/Recv (goal >= 80%):")
    for r in pp:
        print(f"  {r['bytes']:>10} B   ours {r['ours_s'] * 1e6:9.1f} us  raw {r['raw_s'] * 1e6:9.1f} us  {r['ratio']:6.1%}")
    print(f"parameter server: {ps['updates']} Downpour updates of the digits MLP in {ps['wall_s']:.2f} s = "
          f"{ps['updates_per_s']:.0f} updates/s (2 workers, 1 shard, 3 ranks on this host)")


if __name__ == "__main__":
    main()
