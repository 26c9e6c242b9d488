"""Fluid finish times against exact rational arithmetic.

The reference below is the max-min fluid model itself, in ``fractions.Fraction``: progressive
filling for the rates, and the clock advanced to the next start or finish.  The simulator
must agree on every job's duration to round-off, including a tiny flow beside a huge one
that ends where a "nearly done" rule would end it a few bytes early.
"""
import math
from fractions import Fraction

import pytest
import simpy
from hypothesis import given, settings, strategies as st

from sim.fluid import Fluid, timeout_at

# (start_s, amount, {resource: weight}) per job
Job = tuple[float, float, dict]


def exact_rates(weights: dict[int, dict], capacity: dict) -> dict[int, Fraction]:
    """Progressive filling in rationals: raise all unfrozen rates until a resource fills."""
    rates, left = {}, {r: Fraction(c) for r, c in capacity.items()}
    level = Fraction(0)
    while len(rates) < len(weights):
        load = {r: sum(Fraction(w[r]) for j, w in weights.items() if j not in rates and r in w) for r in left}
        step = min(left[r] / load[r] for r in load if load[r])
        level += step
        for r in load:
            left[r] -= step * load[r]
        for j, w in weights.items():
            if j not in rates and any(left[r] == 0 for r in w):
                rates[j] = level
    return rates


def exact_finishes(jobs: list[Job], capacity: dict) -> list[Fraction]:
    """Each job's finish time under max-min sharing, exactly."""
    starts = sorted(range(len(jobs)), key=lambda j: Fraction(jobs[j][0]))
    remaining, finish = {}, [None] * len(jobs)
    now, i = Fraction(0), 0
    while i < len(starts) or remaining:
        while i < len(starts) and Fraction(jobs[starts[i]][0]) == now:
            remaining[starts[i]] = Fraction(jobs[starts[i]][1])
            i += 1
        rates = exact_rates({j: jobs[j][2] for j in remaining}, capacity) if remaining else {}
        nxt = min([now + remaining[j] / rates[j] for j in remaining]
                  + ([Fraction(jobs[starts[i]][0])] if i < len(starts) else []))
        for j in list(remaining):
            remaining[j] -= rates[j] * (nxt - now)
            if remaining[j] == 0:
                finish[j] = nxt
                del remaining[j]
        now = nxt
    return finish


def simulated_finishes(jobs: list[Job], capacity: dict) -> list[float]:
    env = simpy.Environment()
    fluid = Fluid(env, dict(capacity))
    finish = [None] * len(jobs)

    def run(j, start, amount, weights):
        yield env.timeout(start)
        yield fluid.start(weights, amount)
        finish[j] = env.now
    for j, job in enumerate(jobs):
        env.process(run(j, *job))
    env.run()
    return finish


def assert_durations_exact(jobs: list[Job], capacity: dict) -> None:
    """Every job's duration equal to the exact one up to float round-off: a millionth of
    it, or a few ulps of the clock where the clock is coarse."""
    want = exact_finishes(jobs, capacity)
    got = simulated_finishes(jobs, capacity)
    for (start, _, _), w, g in zip(jobs, want, got):
        duration = float(w - Fraction(start))
        slack = 16 * math.ulp(float(w))
        assert g - start == pytest.approx(duration, rel=1e-6, abs=slack), (start, float(w), g)


def test_tiny_flow_beside_a_huge_one_that_is_a_byte_from_done():
    # 1 GB at 1 GB/s; a 1-byte flow joins when 1 byte of it is left: they share the link
    # and both end at 1 + 1e-9 s.  A job ended "within 1e-9 of its bytes" would leave at
    # 1.0 s and give the small one the whole link: 25% early.
    t0 = 1.0 - 1e-9
    jobs = [(0.0, 1e9, {"L": 1}), (t0, 1.0, {"L": 1})]
    assert_durations_exact(jobs, {"L": 1e9})


def test_tiny_flow_beside_a_huge_one_due_within_a_trillionth_of_now():
    # 1 PB at 1 GB/s ends at 1e6 s; 500 bytes join when 500 bytes of it are left, so both
    # end 1 us later -- within 1e-12 x now, which a "due nearly now" rule ends at once
    jobs = [(0.0, 1e15, {"L": 1}), (1e6 - 5e-7, 500.0, {"L": 1})]
    assert_durations_exact(jobs, {"L": 1e9})


def test_huge_flows_over_two_links_and_a_tiny_cross_flow():
    # parking lot: the long flow crosses A and B (half of A until 4 s, then all: ends at
    # 6 s); a 1-byte flow on B joins when 1 byte of it is left
    jobs = [(0.0, 4e9, {"A": 1, "B": 1}), (0.0, 2e9, {"A": 1}),
            (6.0 - 1e-9, 1.0, {"B": 1})]
    assert_durations_exact(jobs, {"A": 1e9, "B": 1e9})


def test_a_job_due_now_finishes_now():
    jobs = [(0.0, 5.0, {"L": 1}), (5.0, 5.0, {"L": 1})]
    assert simulated_finishes(jobs, {"L": 1.0}) == [5.0, 10.0]


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_random_mixes_of_huge_and_tiny_jobs_match_exact_arithmetic(data):
    caps = {r: data.draw(st.sampled_from([1.0, 3.0, 1e9, 2.5e10])) for r in "ABC"}
    jobs = []
    for _ in range(data.draw(st.integers(1, 6))):
        start = data.draw(st.sampled_from([0.0, 1.0, 0.5, 1.0 - 1e-9, 2.0 + 1e-12]))
        amount = data.draw(st.sampled_from([1.0, 7.0, 1e6, 1e9, 3e10]))
        links = data.draw(st.lists(st.sampled_from("ABC"), min_size=1, max_size=3, unique=True))
        jobs.append((start, amount, {r: data.draw(st.integers(1, 2)) for r in links}))
    assert_durations_exact(jobs, caps)


@settings(max_examples=300, deadline=None)
@given(st.floats(1e-5, 1e5), st.floats(1e-5, 1e8))
def test_a_lone_job_ends_at_exactly_its_computed_finish(start, amount):
    # a timer of delay finish - now fires at now + (finish - now), which round-off can put
    # an ulp before the finish (79.3155... + (495.743... - 79.3155...)); the job must still
    # end at its finish, not before it and not never (``timeout_at``)
    assert simulated_finishes([(start, amount, {"L": 1})], {"L": 1.0}) == [start + amount]


def test_a_timer_at_an_absolute_time_fires_there_where_no_delay_lands():
    """now + (when - now) is an ulp below ``when`` here, and no delay at all lands on it (the
    sums round to even on either side): ``timeout_at`` still fires at ``when``, in one event."""
    now, when = float.fromhex("0x1.4f1401779d4ddp-11"), float.fromhex("0x1.f69e0793f19a7p-10")
    delay = when - now
    near = [delay + k * math.ulp(delay) for k in range(-4, 5)]
    assert all(now + d != when for d in near)
    env = simpy.Environment(initial_time=now)
    fired = []
    timeout_at(env, when).callbacks.append(lambda _e: fired.append(env.now))
    steps = 0
    while env.peek() < math.inf:
        env.step()
        steps += 1
    assert fired == [when] and steps == 1


def _wide_jobs(seed: int) -> tuple[list[Job], dict]:
    """Jobs over 16..40 of 60 resources each (a collective's width), starting at a few instants."""
    import random
    rng = random.Random(seed)
    caps = {f"l{i}": rng.choice([1.0, 3.0, 1e9]) for i in range(60)}
    jobs = [(rng.choice([0.0, 0.5, 1.25]), rng.choice([1.0, 7.0, 1e6]),
             {f"l{i}": rng.randint(1, 2) for i in rng.sample(range(60), rng.randint(16, 40))}) for _ in range(12)]
    return jobs, caps


@pytest.mark.parametrize("seed", range(6))
def test_wide_jobs_in_c_loops_give_the_plain_loops_floats(monkeypatch, seed):
    """From ``BULK`` resources on, a job's resources are mapped and released in C loops;
    with the threshold out of reach every job takes the plain loops: the same finishes."""
    import sim.fluid as fluid_mod
    jobs, caps = _wide_jobs(seed)
    bulk = simulated_finishes(jobs, caps)
    monkeypatch.setattr(fluid_mod, "BULK", 10**9)
    assert simulated_finishes(jobs, caps) == bulk


def test_a_wide_job_over_an_unknown_or_dead_resource_is_refused():
    env = simpy.Environment()
    fluid = Fluid(env, {**{f"l{i}": 1.0 for i in range(20)}, "dead": 0.0})
    with pytest.raises(KeyError):
        fluid.start({**{f"l{i}": 1 for i in range(20)}, "nowhere": 1}, 1.0)
    with pytest.raises(ValueError, match="'dead' has no capacity"):
        fluid.start({**{f"l{i}": 1 for i in range(20)}, "dead": 1}, 1.0)


def test_a_narrow_job_over_an_unknown_or_dead_resource_leaves_nothing_behind():
    # refused after its first resource was taken: that resource's next job runs alone on it
    env = simpy.Environment()
    fluid = Fluid(env, {"a": 2.0, "dead": 0.0})
    with pytest.raises(KeyError):
        fluid.start({"a": 1, "nowhere": 1}, 1.0)
    with pytest.raises(ValueError, match="'dead' has no capacity"):
        fluid.start({"a": 1, "dead": 1}, 1.0)
    done = fluid.start({"a": 1}, 4.0)
    env.run()
    assert done.processed and env.now == 2.0 and not fluid.jobs and not any(fluid.users.values())
