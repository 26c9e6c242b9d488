"""Layer math against finite differences, update rules against hand-computed values."""
import numpy as np
import pytest

from executor.data import Batches, digits, read_idx
from executor.nn import Net
from executor.optim import ADAGRAD_EPS, DCASGD, LBFGS, SGD, Adagrad, Adam, quantize8, replica_step
from clustersim.core.models import build_model, make_layer as L, zoo_model


def numeric_grad(f, w, eps=1e-3):
    g = np.zeros_like(w)
    for i in range(len(w)):
        old = w[i]
        w[i] = old + eps
        up = f(w)
        w[i] = old - eps
        down = f(w)
        w[i] = old
        g[i] = (up - down) / (2 * eps)
    return g


@pytest.mark.parametrize("act", ["relu", "sigmoid", "tanh"])
def test_gradient_matches_finite_differences(act):
    model = build_model("t", (5, 1, 1), [L("dense", units=4), L(act), L("dense", units=3), L("softmax_xent")])
    net = Net(model)
    rng = np.random.default_rng(1)
    w = net.init(rng).astype(np.float64) + rng.normal(0, 0.1, net.size)
    x = rng.normal(size=(6, 5))
    y = rng.integers(0, 3, 6)
    _, g = net.loss_and_grad(w, x, y)
    num = numeric_grad(lambda v: net.forward(v, x, y)[0], w.copy())
    assert np.allclose(g, num, atol=1e-6, rtol=1e-4)
    assert net.size == model.params


def test_sgd_and_adagrad_hand_values():
    w = np.array([1.0, -2.0], np.float32)
    SGD(0.5).step(w, np.array([2.0, 4.0], np.float32))
    assert w.tolist() == [0.0, -4.0]
    ada = Adagrad(0.1, 2)
    w = np.array([1.0, 1.0], np.float32)
    ada.step(w, np.array([3.0, -4.0], np.float32))          # h = [9, 16]
    assert w == pytest.approx([1 - 0.1 * 3 / (3 + ADAGRAD_EPS), 1 + 0.1 * 4 / (4 + ADAGRAD_EPS)])
    ada.step(w, np.array([4.0, 3.0], np.float32))           # h = [25, 25]
    assert w == pytest.approx([0.9 - 0.1 * 4 / 5, 1.1 - 0.1 * 3 / 5], rel=1e-6)


def test_adam_hand_values():
    """Kingma & Ba's Algorithm 1 by hand: the first step moves lr against the gradient's sign
    (both moments bias-corrected to g and g*g)."""
    w = np.array([1.0])
    adam = Adam(0.1, w)
    adam.step(w, np.array([2.0]))
    assert w == pytest.approx([0.9])
    adam.step(w, np.array([-1.0]))
    m, v = 0.9 * 0.2 - 0.1, 0.999 * 0.004 + 0.001 * 1.0       # m, v after the second step
    w1 = 1.0 - 0.1 * 2.0 / (2.0 + 1e-8)
    assert w == pytest.approx([w1 - 0.1 * (m / (1 - 0.9 ** 2)) / ((v / (1 - 0.999 ** 2)) ** 0.5 + 1e-8)], rel=1e-12)


def test_a_sync_replicas_adam_per_array_is_adam_on_the_whole_vector():
    """The executor steps each parameter array with its own Adam on the replicas' mean
    gradient: element-wise, so the same as one Adam over the flat vector (it ran SGD)."""
    rng = np.random.default_rng(3)
    params = {(0, 0): [rng.normal(size=(3, 2)), rng.normal(size=2)], (1, 0): [rng.normal(size=4)]}
    flat = np.concatenate([a.ravel() for arrays in params.values() for a in arrays])
    reference, state = Adam(0.01, flat), {}
    for _ in range(3):
        grads = {k: [rng.normal(size=a.shape) for a in arrays] for k, arrays in params.items()}
        summed = np.concatenate([g.ravel() for gs in grads.values() for g in gs])
        reference.step(flat, summed / 4)
        replica_step(params, grads, 0.01, 4, state)
    assert np.allclose(np.concatenate([a.ravel() for arrays in params.values() for a in arrays]), flat,
                       rtol=1e-12, atol=0)
    sgd = {(0, 0): [np.ones(2)]}
    replica_step(sgd, {(0, 0): [np.full(2, 4.0)]}, 0.5, 4)      # no state: SGD on the mean, w - 0.5 x 1
    assert sgd[(0, 0)][0].tolist() == [0.5, 0.5]


def test_dcasgd_constant_lambda_hand_value():
    opt = DCASGD(lr=0.1, lam=2.0, size=1)
    opt.fetched(worker=3, w=np.array([1.0]))
    w = np.array([1.5])                                    # others moved w since worker 3 fetched
    opt.step(w, np.array([2.0]), worker=3)
    # g' = 2 + 2 * 2*2 * (1.5 - 1.0) = 6;  w = 1.5 - 0.1 * 6
    assert w == pytest.approx([0.9])


def test_dcasgd_adaptive_lambda_hand_value():
    opt = DCASGD(lr=0.1, lam=1.0, size=1, adaptive=True)
    opt.fetched(0, np.array([0.0]))
    w = np.array([1.0])
    opt.step(w, np.array([2.0]), worker=0)
    ms = 0.05 * 4.0
    lam = 1.0 / np.sqrt(ms + 1e-7)
    assert w == pytest.approx([1.0 - 0.1 * (2.0 + lam * 4.0 * 1.0)])


def test_lbfgs_solves_a_quadratic_in_few_steps():
    A = np.diag([1.0, 10.0, 100.0])
    w = np.array([1.0, 1.0, 1.0])
    opt = LBFGS(lr=1.0, history=5)
    for _ in range(15):
        opt.step(w, A @ w)
    # condition number 100: gradient descent at its largest stable step (0.02) still sits
    # near 0.74 in the slowest direction after 15 steps
    assert np.abs(w).max() < 1e-6


def test_quantize8_has_256_levels_and_keeps_ends():
    x = np.linspace(-1, 3, 1000)
    q = quantize8(x)
    assert len(np.unique(q)) <= 256 and q.min() == pytest.approx(-1) and q.max() == pytest.approx(3)
    assert np.abs(q - x).max() <= 4 / 255 / 2 + 1e-12


def test_digits_split_and_batches_are_seeded():
    d = digits(0)
    assert d.x_train.shape == (1438, 64) and d.x_test.shape == (359, 64) and d.x_train.max() <= 1.0
    a = Batches(d.x_train, d.y_train, 32, np.random.default_rng(5))
    b = Batches(d.x_train, d.y_train, 32, np.random.default_rng(5))
    for _ in range(50):
        (xa, ya), (xb, yb) = a.next(), b.next()
        assert (xa == xb).all() and (ya == yb).all()


def test_idx_reader_round_trip(tmp_path):
    import gzip
    import struct
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    raw = b"\x00\x00\x08\x03" + struct.pack(">3I", 2, 3, 4) + arr.tobytes()
    (tmp_path / "a.idx").write_bytes(raw)
    (tmp_path / "a.idx.gz").write_bytes(gzip.compress(raw))
    assert (read_idx(tmp_path / "a.idx") == arr).all() and (read_idx(tmp_path / "a.idx.gz") == arr).all()
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="bad magic"):
        read_idx(tmp_path / "bad")


def test_mlp_digits_learns_with_plain_sgd():
    d, net, rng = digits(0), Net(zoo_model("mlp-digits")), np.random.default_rng(0)
    w = net.init(rng)
    batches = Batches(d.x_train, d.y_train, 64, rng)
    for _ in range(400):
        x, y = batches.next()
        _, g = net.loss_and_grad(w, x, y)
        w -= 0.5 * g
    acc, _ = net.evaluate(w, d.x_test, d.y_test)
    assert acc > 0.93


def test_outbox_keeps_buffers_until_their_sends_complete():
    from executor.comm import Outbox

    class Req:                                    # completes on its second Test
        def __init__(self):
            self.tests = 0

        def Test(self):
            self.tests += 1
            return self.tests >= 2

    class Comm:
        def __init__(self):
            self.sent = []

        def Isend(self, buf, dest, tag):
            self.sent.append((buf, dest, tag))
            return Req()

    comm = Comm()
    box = Outbox(comm)
    a, b, c = np.zeros(2), np.ones(2), np.full(2, 2.0)
    box.send(a, 1, 13)
    box.send(b, 2, 13)                            # a's request: tested once, still in flight
    assert [id(buf) for _, buf in box.pending] == [id(a), id(b)]
    box.send(c, 1, 13)                            # a's second test completes it; b's first does not
    assert [id(buf) for _, buf in box.pending] == [id(b), id(c)]
    box.drain()
    assert box.pending == [] and [(d, t) for _, d, t in comm.sent] == [(1, 13), (2, 13), (1, 13)]


def test_a_wait_gives_up_only_on_steps_from_the_one_its_mate_crashed_at():
    from executor.comm import LOST_TAG, LostWatch, ReplicaLost, wait_buffer

    class Comm:                                   # one LOST message waiting: "crashed at step 10"
        def __init__(self):
            self.lost = [10]

        def Iprobe(self, tag):
            return tag == LOST_TAG and bool(self.lost)

        def Recv(self, buf, tag):
            buf[0] = self.lost.pop()

    class Req:                                    # completes on Test number ``at`` (never when 0)
        def __init__(self, at):
            self.at, self.tests = at, 0

        def Test(self):
            self.tests += 1
            return self.tests == self.at

    watch = LostWatch(Comm())
    watch.step = 9                                # the mate finished step 9: its messages come
    wait_buffer(Req(at=50), watch)
    assert watch.crashed_at == 10
    watch.step = 10
    with pytest.raises(ReplicaLost):
        wait_buffer(Req(at=0), watch)
    wait_buffer(Req(at=1), watch)                 # already complete: taken, not lost
    wait_buffer(Req(at=50))                       # no watch: waits it out


def test_fail_is_refused_where_the_job_would_wait_for_the_crashed_rank_forever():
    from executor.checks import cannot_go_on
    from helpers import scenario
    assert cannot_go_on(scenario(parallel={"replicas": 2, "model_parallel": 2, "ps_shards": 1},
                                 training={"algorithm": "downpour"})) == ""
    assert cannot_go_on(scenario(parallel={"replicas": 2, "model_parallel": 2, "ps_shards": 1},
                                 training={"algorithm": "sandblaster"})) == ""
    assert cannot_go_on(scenario(parallel={"replicas": 3, "ps_shards": 1},
                                 training={"algorithm": "sync", "backup_workers": 1})) == ""
    assert "only one" in cannot_go_on(scenario(parallel={"replicas": 1, "model_parallel": 2, "ps_shards": 1},
                                               training={"algorithm": "downpour"}))
    assert "allreduce" in cannot_go_on(scenario(parallel={"replicas": 2}))
    assert "backup_workers" in cannot_go_on(scenario(parallel={"replicas": 2, "ps_shards": 1}))
    assert "local" in cannot_go_on(scenario(parallel={"replicas": 2}, training={"algorithm": "local"}))
