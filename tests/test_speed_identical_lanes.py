"""An in-order GPU's ops run as a lane, without the fluid (issue 18, decision 032): the same
times, values and order of completions as the fluid path, at one simpy event per op.

``Compute(shortcut=False)`` runs every op as a fluid job (the plain path); the shortcut
runs a GPU's ops with the fluid's arithmetic for a job alone on its resource and one
shared timer.  Random schedules below mix ops, ties (durations on a coarse grid), ops
started from another op's completion at that instant, and NCCL holds and releases (two at
one instant among them) that re-solve running ops: the log of every completion, in the
order the callbacks ran, must be equal, float for float.
"""
from __future__ import annotations

import numpy as np
import pytest

from clustersim.core.topogen import load_topology
from sim.compute import Compute
from sim.engine import CountingEnvironment

TOPOLOGY = load_topology("dgx-h100")
GPUS = TOPOLOGY.compute_devices()[:4]
SHARES = (0.0625, 0.125, 0.25, 1 / 3)


def _schedule(seed: int) -> tuple[list, list]:
    """Ops (at, gpu, seconds, then: an op its completion starts, directly or from a process,
    or None) and holds (at, gpus, share, release_after: 0.0 = at the same instant).  Starts
    on a grid of 1/4 s, durations on one of 0.1 s: ties, and floats that round."""
    rng = np.random.default_rng(seed)
    pick = lambda seq: seq[rng.integers(len(seq))]          # noqa: E731
    starts, lengths = (8, 4) if seed % 2 else (20, 7)       # odd seeds: crowded, many ties
    ops = []
    for _ in range(40):
        then = (pick(GPUS), 0.1 * float(rng.integers(1, 5)), bool(rng.random() < 0.5)) if rng.random() < 0.6 else None
        ops.append((0.25 * float(rng.integers(0, starts)), pick(GPUS), 0.1 * float(rng.integers(1, lengths)), then))
    holds = [(0.25 * float(rng.integers(0, 20)), list(rng.choice(GPUS, size=rng.integers(1, len(GPUS) + 1),
                                                                 replace=False)),
              pick(SHARES), 0.25 * float(rng.integers(0, 8))) for _ in range(8)]
    return ops, holds


def _run(seed: int, shortcut: bool) -> tuple[list, int]:
    env = CountingEnvironment()
    compute = Compute(env, TOPOLOGY, "fp16", shortcut=shortcut)
    log = []
    ops, holds = _schedule(seed)

    def op(k, gpu, seconds, then):
        def follow(gpu, seconds):
            compute.run_seconds(gpu, seconds).callbacks.append(lambda e: log.append((f"{k}'", gpu, env.now, e.value)))

        def process(gpu, seconds):
            follow(gpu, seconds)
            yield env.timeout(0)

        def done(ev):
            log.append((k, gpu, env.now, ev.value))
            if then and then[2]:
                env.process(process(*then[:2]))     # starts before the next completion's callbacks
            elif then:
                follow(*then[:2])
        compute.run_seconds(gpu, seconds).callbacks.append(done)

    def at(when, fn, *args):
        env.timeout(when).callbacks.append(lambda _e: fn(*args))
    for k, (when, gpu, seconds, then) in enumerate(ops):
        at(when, op, k, gpu, seconds, then)
    for when, gpus, share, after in holds:
        def hold(gpus=gpus, share=share, after=after):
            release = compute.hold(gpus, share)
            if after:
                at(after, release)
            else:
                release()
        at(when, hold)
    env.run()
    return log, env.events_processed


@pytest.mark.parametrize("seed", range(16))
def test_lanes_give_the_fluids_completions_in_its_order(seed):
    lanes, events_lanes = _run(seed, True)
    fluid, events_fluid = _run(seed, False)
    assert len(lanes) > 40
    assert lanes == fluid
    assert events_lanes < events_fluid


def test_a_gpu_runs_n_ops_back_to_back_in_n_events():
    """One lane, ops queued at once: each ends at the sum of the durations before it (exact
    in binary), each its own single event; the plain path takes four per op (the batched
    solve, the fluid's timer, the job's event, Compute's ``done``).  With nothing else
    queued, the lane's first end is simpy's event and the next three run ahead of it
    without a queue entry each (``Compute.ahead``, decision 043)."""
    for shortcut, events, queued in ((True, 4, 1), (False, 4 * 4, 4 * 4)):
        env = CountingEnvironment()
        compute = Compute(env, TOPOLOGY, "fp16", shortcut=shortcut)
        ends = []
        for seconds in (0.5, 0.25, 1.0, 0.125):
            compute.run_seconds(GPUS[0], seconds).callbacks.append(lambda e: ends.append((e.value, env.now)))
        env.run()
        assert ends == [(0.0, 0.5), (0.5, 0.75), (0.75, 1.75), (1.75, 1.875)]
        assert env.events_processed + compute.ahead == events + 1      # + the step that finds the queue empty
        assert env.events_processed == queued + 1


def _tied_with_timeouts(shortcut: bool) -> list:
    """A lane's ops of 0.5 and 0.25 s beside simpy timeouts that tie with the second's end
    at 0.75: one set before the lane's timer is armed (at t = 0), one after (from the first
    op's callback at 0.5), and one at 0.6 between the two ends; the log of callbacks."""
    env = CountingEnvironment()
    compute = Compute(env, TOPOLOGY, "fp16", shortcut=shortcut)
    log = []

    def mark(what):
        return lambda _e: log.append((what, env.now))
    compute.run_seconds(GPUS[0], 0.5).callbacks.append(
        lambda _e: (log.append(("op1", env.now)), env.timeout(0.25).callbacks.append(mark("after"))))
    compute.run_seconds(GPUS[0], 0.25).callbacks.append(mark("op2"))
    env.timeout(0.75).callbacks.append(mark("before"))
    env.timeout(0.6).callbacks.append(mark("between"))
    env.run()
    return log


def test_a_lanes_timer_ties_with_timeouts_by_when_it_was_armed():
    """The lanes' timer is armed when the op before ends, before that op's callbacks run:
    a timeout at the same instant set earlier comes first, one set from those callbacks
    after.  The plain path differs in the second tie (since decision 032): the fluid ends
    op2 events after its own timer, behind "after" (no engine case of the speed tests
    meets such a tie: their spans are equal both ways)."""
    want = [("op1", 0.5), ("between", 0.6), ("before", 0.75), ("op2", 0.75), ("after", 0.75)]
    assert _tied_with_timeouts(True) == want
    assert _tied_with_timeouts(False) == want[:3] + [want[4], want[3]]


def test_a_hold_slows_the_running_op_by_its_share():
    """An op of 1 s; at t = 0.5 a collective takes a quarter of the GPU until t = 1.0: the
    half second left runs at 0.75 for 0.5 s (0.375 done), the last 0.125 at 1 again."""
    for shortcut in (True, False):
        env = CountingEnvironment()
        compute = Compute(env, TOPOLOGY, "fp16", shortcut=shortcut)
        ends = []
        compute.run_seconds(GPUS[0], 1.0).callbacks.append(lambda _e: ends.append(env.now))

        def hold():
            release = compute.hold([GPUS[0]], 0.25)
            env.timeout(0.5).callbacks.append(lambda _e: release())
        env.timeout(0.5).callbacks.append(lambda _e: hold())
        env.run()
        assert ends == [1.125]


def _by_event(compute, device, seconds, then):
    compute.run_seconds(device, seconds).callbacks.append(lambda e: then(e.value))


def _by_callable(compute, device, seconds, then):
    compute.start(device, seconds, then)


@pytest.mark.parametrize("shortcut", [True, False])
@pytest.mark.parametrize("starter", [_by_event, _by_callable])
def test_what_one_completion_starts_urgently_comes_before_the_next_tied_completion(shortcut, starter):
    """GPUs 0 and 1 end 1 s ops at t = 1 together.  GPU 0's completion starts a process that
    gives GPU 2 an op of 0.5 s; GPU 1's gives GPU 2 one of 0.25 s directly.  The fluid path
    fires the two completions as two events, and the process starts (an urgent event) in
    between: GPU 2 runs the 0.5 s op first.  The lanes keep that order, for ops given an
    event (``run_seconds``) and ops given a callable (``Compute.start(..., then)``, the
    engine's graph ops: the first's callable runs inside the timer, the next's from an event
    of its own, after the process the first started)."""
    env = CountingEnvironment()
    compute = Compute(env, TOPOLOGY, "fp16", shortcut=shortcut)
    log = []

    def on_gpu2(seconds):
        starter(compute, GPUS[2], seconds, lambda started: log.append((seconds, started, env.now)))

    def process():
        on_gpu2(0.5)
        yield env.timeout(0)
    starter(compute, GPUS[0], 1.0, lambda _started: env.process(process()))
    starter(compute, GPUS[1], 1.0, lambda _started: on_gpu2(0.25))
    env.run()
    assert log == [(0.5, 1.0, 1.5), (0.25, 1.5, 1.75)]


def _chain_ends(as_chain: bool, hold_at: float, share: float, wake_at: float, wake_op: int) -> tuple[list, list]:
    """Six ops on one GPU (seconds on a coarse grid), as a chain given at once (``Quiet``,
    decision 043) or one by one from each end; a hold of ``share`` from ``hold_at`` to
    ``hold_at + 0.5``; at ``wake_at`` the engine asks to hear op ``wake_op``'s end.  Returns
    every op's (start, end) and the (op, time) of the ends heard."""
    from sim.compute import Quiet
    env = CountingEnvironment()
    compute = Compute(env, TOPOLOGY, "fp16")
    gpu, seconds = GPUS[0], [0.25, 0.5, 0.125, 0.375, 0.25, 0.5]
    spans, heard = {}, []
    if as_chain:
        log, wake = [], [None] * len(seconds)

        def settle(_start):
            for k, start, end in log:
                spans[k] = (start, end)
            log.clear()
        wake[-1] = settle
        compute.give(gpu, [(s, Quiet(i)) for i, s in enumerate(seconds)], log, wake)

        def ask(_e):
            compute.catch_up(gpu)
            wake[wake_op] = lambda start: (settle(start), heard.append((wake_op, env.now)))
            compute.woken(gpu)
        env.timeout(wake_at).callbacks.append(ask)
    else:
        def one(i):
            def ended(e):
                spans[i] = (e.value, env.now)
                if i == wake_op and env.now > wake_at:
                    heard.append((i, env.now))
                if i + 1 < len(seconds):
                    one(i + 1)
            compute.run_seconds(gpu, seconds[i]).callbacks.append(ended)
        one(0)

    def hold(_e):
        release = compute.hold([gpu], share)
        env.timeout(0.5).callbacks.append(lambda _e: release())
    env.timeout(hold_at).callbacks.append(hold)
    env.run()
    return [spans[i] for i in range(len(seconds))], heard


@pytest.mark.parametrize("hold_at,share,wake_at,wake_op", [(0.3, 0.25, 0.1, 3), (0.75, 1 / 3, 0.8, 4),
                                                           (0.875, 0.125, 0.2, 1), (1.5, 0.25, 0.0, 5)])
def test_a_chain_computed_ahead_gives_the_op_by_op_times(hold_at, share, wake_at, wake_op):
    """A chain's silent ops are computed ahead of the lane (``Compute._lane_start``); a hold
    in the middle of that stretch (sometimes exactly at an op's end) and a wake asked for
    while it runs cut it, and every op's start and end, and the heard end, equal the op-by-op
    lane's, float for float."""
    chain, heard = _chain_ends(True, hold_at, share, wake_at, wake_op)
    one_by_one, heard_one = _chain_ends(False, hold_at, share, wake_at, wake_op)
    assert chain == one_by_one
    assert heard == heard_one


def test_an_op_coming_as_a_chain_op_ends_runs_before_the_next():
    """Three 1 s ops as a chain; another op comes at t = 1.0, the instant the first ends
    (computed ahead): it runs 1..2 and the chain's second 2..3, as on the op-by-op lane and
    the fluid, where the newcomer is queued before the op's end is taken."""
    from sim.compute import Quiet

    def run(chain: bool, shortcut: bool = True):
        env = CountingEnvironment()
        compute = Compute(env, TOPOLOGY, "fp16", shortcut=shortcut)
        gpu, out = GPUS[0], []
        env.timeout(1.0).callbacks.append(lambda _e: compute.run_seconds(gpu, 1.0).callbacks.append(
            lambda e: out.append(("new", e.value, env.now))))
        if chain:
            log, wake = [], [None, None, None]
            wake[2] = lambda _start: out.extend((i, start, end) for i, start, end in log)
            compute.give(gpu, [(1.0, Quiet(i)) for i in range(3)], log, wake)
        else:
            def one(i):
                def ended(e):
                    out.append((i, e.value, env.now))
                    if i < 2:
                        one(i + 1)
                compute.run_seconds(gpu, 1.0).callbacks.append(ended)
            one(0)
        env.run()
        return sorted(out, key=lambda x: x[2])
    expected = [(0, 0.0, 1.0), ("new", 1.0, 2.0), (1, 2.0, 3.0), (2, 3.0, 4.0)]
    assert run(True) == run(False) == run(False, shortcut=False) == expected
