"""The simulator's fast paths (issue 18, decision 026) give the answers of the plain ones.

Each scenario runs twice in one process: as shipped, and with ``simulate(...,
shortcut=False)`` (a GPU's ops run as fluid jobs, not as a lane (decision 032); the fluid
solves a job alone on its one resource in the instant's batched solve instead of at once;
the engine works out link names, route checks and NCCL link speeds per message instead of
keeping them per topology).  Step times, the simulated
end and every span must be equal, float for float: on these cases the shortcuts save events
and move none (where a GPU op's end ties with an unrelated event at one instant the lanes
may order the two otherwise: decision 032).  Rewrites that have no switch (C loops instead of Python ones, names built once
per plan) run alike on both sides; decision 026 records their before/after check.
"""
from __future__ import annotations

import pytest

from clustersim.core.plan import plan
from clustersim.core.scenario import scenario_from_dict
from sim.engine import simulate
from sim.fluid import Fluid


def _case(topology, model, batch, steps, machines=0, training=None, faults=None, **parallel) -> dict:
    cluster = {"topology": topology, **({"machines": machines} if machines else {})}
    return {"cluster": cluster, "model": {"name": model, "batch_size": batch}, "parallel": parallel,
            "training": {"steps": steps, **(training or {})}, **({"faults": faults} if faults else {})}


CASES = {
    # make bench's alexnet step, small: every replica a straggler of its own
    "alexnet-stragglers": _case("dgx-h100-fat-tree", "alexnet", 64, 2, machines=2, replicas=16,
                                faults={"slowdown_sigma": 0.05}),
    # identical replicas: their ops end at the very same instants
    "alexnet-alike": _case("dgx-h100-fat-tree", "alexnet", 64, 2, machines=2, replicas=16),
    # model parallel with halos and a data-parallel allreduce (make bench's image-80m)
    "image-80m": _case("dgx-h100", "distbelief-image-80m", 8, 2, model_parallel=4, replicas=2),
    # host ranks with measured send and receive costs (make bench's speech)
    "speech": _case("distbelief-2012", "distbelief-speech", 64, 2, machines=8, model_parallel=8),
    # asynchronous pushes and fetches to shards, coupled through their links
    "downpour": _case("distbelief-2012", "distbelief-speech", 64, 3, machines=17, model_parallel=8, replicas=2,
                      ps_shards=1, training={"algorithm": "downpour"}),
    # slots given to their GPUs as chains (decision 043) beside parameter-server shards, with
    # backup workers, local updates and work units
    "ps-sync": _case("dgx-h100", "mlp-digits", 32, 3, replicas=4, ps_shards=2),
    "backups": _case("dgx-h100", "mlp-digits", 32, 3, replicas=4, ps_shards=2, training={"backup_workers": 1},
                     faults={"slowdown_sigma": 0.1}),
    # an 8-bit push's quantising comes to a GPU mid-chain; a late replica under backup
    # workers, and one under Sandblaster's backup tasks
    "ps-early8": _case("dgx-h100", "mlp-digits", 32, 3, replicas=4, ps_shards=2,
                       training={"push_early": True, "comm_bits": 8}),
    # pushes of 8-bit gradients layer by layer from alexnet: wake-ups superseded near the end
    # must not move the simulated end past the last span (sim.fluid.supersede)
    "ps-early8-alexnet": _case("dgx-h100", "alexnet", 64, 4, replicas=8, ps_shards=2,
                               training={"push_early": True, "comm_bits": 8}),
    "backups-late": _case("dgx-h100", "mlp-digits", 256, 4, replicas=4, ps_shards=2, training={"backup_workers": 1},
                          faults={"slowdown": {"m0.gpu2": 3.0}}),
    "backup-tasks": _case("dgx-h100", "mlp-digits", 256, 2, replicas=4, ps_shards=1,
                          training={"algorithm": "sandblaster", "work_units": 16, "backup_tasks": True},
                          faults={"slowdown": {"m0.gpu3": 8.0}}),
    "local": _case("dgx-h100", "mlp-digits", 32, 3, replicas=4, training={"algorithm": "local", "local_steps": 2}),
    "sandblaster": _case("dgx-h100", "mlp-digits", 32, 1, replicas=4, ps_shards=2,
                         training={"algorithm": "sandblaster", "work_units": 8}),
    # a link cut mid-step that the step routes around (the failure-detection timer must not
    # end the run a second later), and a cut after the last step (it does not happen)
    "cut-around": _case("dgx-h100", "alexnet", 64, 2, replicas=8,
                        faults={"fail": [{"at_s": 0.001, "link": ["m0.pcie0", "m0.nic0"]}]}),
    "cut-after": _case("dgx-h100", "alexnet", 64, 2, replicas=8,
                       faults={"fail": [{"at_s": 0.5, "link": ["m0.pcie0", "m0.nic0"]}]}),
    # a link cut mid-run: the topology changes under the kept link names and route checks
    "link-cut": _case("dgx-h100-fat-tree", "alexnet", 64, 3, machines=2, replicas=16,
                      faults={"slowdown_sigma": 0.05, "fail": [{"at_s": 0.012, "link": ["m1.nic0", "edge0.0"]}]}),
    # a tensor group's pieces sent at one instant with one latency wait on one timer
    "tensor": _case("dgx-h100", "gpt-tiny", 32, 2, model_parallel=4, split="tensor", sequence_parallel=True,
                    replicas=2, micro_batches=2),
}


def _run(data: dict, shortcut: bool = True):
    res = simulate(plan(scenario_from_dict(data, "speed.toml")), shortcut=shortcut)
    spans = [(s.name, s.kind, s.where, s.replica, s.step, s.start_s, s.end_s, s.links) for s in res.trace.spans]
    return res.trace.step_times(), res.sim_time_s, sorted(spans, key=repr), res.stalled_at_s


@pytest.mark.parametrize("name", CASES)
def test_fast_paths_give_the_plain_paths_answers(name):
    fast = _run(CASES[name])
    plain = _run(CASES[name], shortcut=False)
    assert fast[0] == plain[0] and fast[1] == plain[1] and fast[3] == plain[3]
    assert fast[2] == plain[2]
    assert fast[1] == max(span[6] for span in fast[2])       # the run ends with its last span


@pytest.mark.parametrize("shortcut", [True, False])
def test_a_job_joining_a_lone_one_at_the_same_instant_shares_from_the_start(shortcut):
    """Capacity 2: A (1 unit) alone is solved at once; B (3 units) joins at t = 0, so both run
    at 1 until A ends at t = 1; B then runs at 2, and C (1 unit) joins it at t = 1.5, when B
    has 1 unit left: both at 1, ending together at t = 2.5."""
    import simpy
    env = simpy.Environment()
    fluid = Fluid(env, {"r": 2.0}, shortcut)
    ends = {}

    def job(name, at, amount):
        yield env.timeout(at)
        yield fluid.start({"r": 1}, amount)
        ends[name] = env.now
    for name, at, amount in (("A", 0.0, 1.0), ("B", 0.0, 3.0), ("C", 1.5, 1.0)):
        env.process(job(name, at, amount))
    env.run()
    assert ends == {"A": 1.0, "B": 2.5, "C": 2.5}


def test_chains_are_the_slots_that_run_on_their_own():
    """``_chains``: a data-parallel replica's one slot is a chain of all its ops; slots that
    send activations (model parallel) are run op by op."""
    from sim.engine import _chains

    def chains(data):
        p = plan(scenario_from_dict(data, "speed.toml"))
        return p, _chains(p, p)
    p, got = chains(CASES["alexnet-alike"])
    assert got == [[op.id for op in p.ops]]
    assert chains(CASES["image-80m"])[1] == [None] * 4
    assert chains(CASES["ps-sync"])[1] != [None]


def test_a_bucket_waits_on_a_chained_slot_s_layer_that_ends_last_in_its_chain():
    """``Ready.waited``: of a chained slot's layers only the one whose last backward op
    comes last in the chain is asked for (the lane ends the others first); a slot run op by
    op has every layer's event."""
    import simpy
    from sim.engine import Ready
    env = simpy.Environment()
    made = {(1, 0): env.event(), (1, 1): env.event()}
    asks = []

    def ask(key):
        asks.append(key)
        return env.event()
    ready = Ready(made, {(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)}, {0: ask})
    ready.last_bwd[0] = {0: 9, 1: 5, 2: 7}       # backward runs from the last layer: layer 0 ends last
    got = ready.waited([(0, 1), (1, 0), (0, 0), (0, 2), (1, 1)])
    assert asks == [(0, 0)] and got == [made[(1, 0)], made[(1, 1)], ready[(0, 0)]]
    assert ready.waited([(0, 2)]) == [ready[(0, 2)]] and asks == [(0, 0), (0, 2)]


def test_an_op_given_mid_chain_runs_between_its_ops():
    """An op that comes while a chain runs takes its turn as it would op by op: after the
    running op, before the chain's next (the chain is given op by op again); a second chain
    on a lane with one left is refused (the engine gives that graph op by op)."""
    import simpy
    from clustersim.core.topogen import load_topology
    from sim.compute import Compute, Quiet
    env = simpy.Environment()
    topology = load_topology("dgx-h100")
    gpu = topology.compute_devices()[0]
    compute = Compute(env, topology, "fp16")
    log, wake = [], [None, None]
    compute.give(gpu, [(1.0, Quiet(0)), (1.0, Quiet(1))], log, wake)
    ends = []
    compute.run_seconds(gpu, 1.0).callbacks.append(lambda e: ends.append((e.value, env.now)))
    assert not compute.can_give(gpu)
    with pytest.raises(RuntimeError, match="while another runs"):
        compute.give(gpu, [(1.0, Quiet(0))], [], [None])
    env.run()
    assert log == [(0, 0.0, 1.0), (1, 2.0, 3.0)] and ends == [(1.0, 2.0)]
    assert compute.can_give(gpu)


def test_a_superseded_wake_up_does_not_move_the_end():
    """One job of 10 units on capacity 1, the capacity raised to 2 at t = 1: it ends at 5.5.
    The wake-up armed for t = 10 is superseded (``sim.fluid.supersede``) and the engine's
    environment drops it, so the clock, and the simulated end, stay at 5.5."""
    from sim.engine import CountingEnvironment
    env = CountingEnvironment()
    fluid = Fluid(env, {"L": 1.0})
    ends = []
    fluid.start({"L": 1}, 10.0).callbacks.append(lambda _e: ends.append(env.now))
    env.timeout(1.0).callbacks.append(lambda _e: fluid.set_capacity("L", 2.0))
    env.run()
    assert ends == [5.5] and env.now == 5.5


def test_a_failure_after_the_last_step_does_not_happen():
    """The job is over before the link is cut: no failure is recorded and the run ends at its
    last step's end, not at the cut (``Engine.stop_failures``)."""
    res = simulate(plan(scenario_from_dict(CASES["cut-after"], "speed.toml")))
    assert res.stalled_at_s is None
    assert res.sim_time_s == res.trace.step_ends[-1] < 0.5
    assert not [s for s in res.trace.spans if s.phase == "failure"]
