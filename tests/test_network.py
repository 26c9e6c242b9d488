"""Network backends and collectives against closed forms."""
import pytest
import simpy

from sim import collectives
from sim.network import AnalyticalNetwork, FlowNetwork
from helpers import ring_topology, star_topology

BACKENDS = [FlowNetwork, AnalyticalNetwork]


def finish_times(topo, backend, sends):
    """Starts every (pairs, nbytes, start_s) send; returns each one's finish time."""
    env = simpy.Environment()
    net = backend(env, topo)
    done = {}

    def go(i, pairs, nbytes, start):
        yield env.timeout(start)
        yield net.send(pairs, nbytes)
        done[i] = env.now
    for i, (pairs, nbytes, start) in enumerate(sends):
        env.process(go(i, pairs, nbytes, start))
    env.run()
    return [done[i] for i in range(len(sends))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_flow_takes_latency_plus_bytes_over_bandwidth(backend):
    topo = ring_topology(2, gbps=10.0, lat_us=3.0)
    [t] = finish_times(topo, backend, [([("g0", "g1")], 5e6, 0.0)])
    assert t == pytest.approx(3e-6 + 5e6 / 10e9, rel=1e-12)


def test_n_equal_flows_on_one_link_each_get_capacity_over_n():
    for n in (2, 3, 5):
        topo = star_topology(n, leaf_gbps=100.0, hub_gbps=10.0, lat_us=1.0)
        times = finish_times(topo, FlowNetwork, [([(f"s{i}", "sink")], 1e6, 0.0) for i in range(n)])
        # two hops of latency, then n flows share the 10 GB/s hub link
        assert times == pytest.approx([2e-6 + n * 1e6 / 10e9] * n, rel=1e-9)


def test_a_flow_that_ends_frees_its_share():
    topo = star_topology(2, leaf_gbps=100.0, hub_gbps=10.0, lat_us=0.0)
    small, big = finish_times(topo, FlowNetwork, [([("s0", "sink")], 1e6, 0.0), ([("s1", "sink")], 2e6, 0.0)])
    assert small == pytest.approx(2e6 / 10e9)          # 1 MB at 5 GB/s
    assert big == pytest.approx(3e6 / 10e9)            # then the last 1 MB alone at 10 GB/s


def test_analytical_backend_ignores_contention():
    topo = star_topology(3, leaf_gbps=100.0, hub_gbps=10.0, lat_us=1.0)
    times = finish_times(topo, AnalyticalNetwork, [([(f"s{i}", "sink")], 1e6, 0.0) for i in range(3)])
    assert times == pytest.approx([2e-6 + 1e6 / 10e9] * 3)


def test_opposite_directions_do_not_share():
    topo = ring_topology(2, gbps=10.0, lat_us=0.0)
    a, b = finish_times(topo, FlowNetwork, [([("g0", "g1")], 1e6, 0.0), ([("g1", "g0")], 1e6, 0.0)])
    assert a == b == pytest.approx(1e6 / 10e9)


def collective_time(topo, backend, op, algo, devices, nbytes):
    """Seconds of the collective laid out on the topology, run without NCCL's protocol model."""
    env = simpy.Environment()
    env.process(collectives.run(env, backend(env, topo), collectives.schedule(topo, op, algo, devices, nbytes)))
    env.run()
    return env.now


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_ring_allreduce_matches_closed_form(backend, n):
    a, bw, size = 2e-6, 10e9, 64e6
    topo = ring_topology(n, gbps=bw / 1e9, lat_us=a * 1e6)
    t = collective_time(topo, backend, "allreduce", "ring", [f"g{i}" for i in range(n)], size)
    assert t == pytest.approx(2 * (n - 1) * a + 2 * (n - 1) / n * size / bw, rel=1e-9)


@pytest.mark.parametrize("op", ["allgather", "reducescatter"])
def test_ring_allgather_and_reducescatter_closed_form(op):
    n, a, bw, size = 4, 1e-6, 20e9, 8e6
    topo = ring_topology(n, gbps=bw / 1e9, lat_us=a * 1e6)
    t = collective_time(topo, FlowNetwork, op, "ring", [f"g{i}" for i in range(n)], size)
    assert t == pytest.approx((n - 1) * a + (n - 1) / n * size / bw, rel=1e-9)


def test_pipelined_tree_allreduce_closed_forms():
    # two ranks on two machines: the double binary tree's two trees (S/2 each) stream up
    # and back down at once over opposite directions
    topo = ring_topology(2, gbps=10.0, lat_us=5.0)
    t = collective_time(topo, FlowNetwork, "allreduce", "tree", ["g0", "g1"], 1e6)
    assert t == pytest.approx(2 * 5e-6 + 1e6 / 10e9)
    # seven machines (trees of depth 3) behind one non-blocking switch, one link each: a rank
    # is interior (three streams out) in at most one tree and a leaf (one) in the other, so
    # the busiest link carries four streams of S/2: 2 S/B; latency: the deepest path up and
    # down, 6 hops of two links
    topo = star_topology(7, leaf_gbps=10.0, hub_gbps=10.0, lat_us=1.0)
    t = collective_time(topo, FlowNetwork, "allreduce", "tree", [f"s{i}" for i in range(7)], 4e6)
    assert t == pytest.approx(2 * 3 * 2e-6 + 2 * 4e6 / 10e9)


def test_ps_allreduce_through_a_switch_is_two_all_to_all_rounds():
    # n ranks on a non-blocking switch: each pushes S/n to n-1 peers through its own uplink
    n, size = 4, 4e6
    topo = star_topology(n, leaf_gbps=10.0, hub_gbps=10.0, lat_us=1.0)
    t = collective_time(topo, FlowNetwork, "allreduce", "ps", [f"s{i}" for i in range(n)], size)
    one_round = 2e-6 + (n - 1) * (size / n) / 10e9
    assert t == pytest.approx(2 * one_round, rel=1e-9)


def test_alltoall_through_a_switch_is_one_all_to_all_round_and_runs_from_the_command():
    """Every rank sends S/n to each of its n - 1 peers at once through its own uplink.  The
    command refused it whatever --algo said (a check meant for tree and ps), so it never ran."""
    n, size = 4, 4e6
    topo = star_topology(n, leaf_gbps=10.0, hub_gbps=10.0, lat_us=1.0)
    ranks = [f"s{i}" for i in range(n)]
    t = collective_time(topo, FlowNetwork, "alltoall", "auto", ranks, size)
    assert t == pytest.approx(2e-6 + (n - 1) * (size / n) / 10e9, rel=1e-9)
    hosts = star_topology(n, leaf_gbps=10.0, hub_gbps=10.0, lat_us=1.0, kind="cpu")
    (on_gpus,), (on_hosts,) = (collectives.table(x, "alltoall", "auto", [int(size)], ranks) for x in (topo, hosts))
    assert on_hosts["time_s"] == pytest.approx(t, rel=1e-9) and on_gpus["time_s"] >= t    # NCCL's link share
    assert (on_gpus["algo"], on_gpus["protocol"], on_hosts["algo"], on_hosts["protocol"]) == ("p2p", "Simple", "p2p", "")
    with pytest.raises(ValueError, match="give auto"):
        collectives.table(topo, "alltoall", "ring", [int(size)], ranks)


def test_bus_factors_follow_nccl_tests():
    assert collectives.bus_factor("allreduce", 8) == pytest.approx(1.75)
    assert collectives.bus_factor("allgather", 8) == pytest.approx(0.875)
    assert collectives.bus_factor("broadcast", 8) == 1.0
    with pytest.raises(ValueError):
        collectives.phases("allgather", "tree", ["a", "b"], 1.0)


def test_rail_flows_between_two_fat_tree_nodes_do_not_collide():
    """8 flows gpu i -> gpu i between two DGX H100 on the fat-tree, each through its own NIC
    at both ends (rail) and on uplinks picked by destination (D-mod-K), get 50 GB/s each."""
    from clustersim.core.topogen import load_topology
    topo = load_topology("dgx-h100-fat-tree", machines=2)
    pairs = [(f"m0.gpu{i}", f"m1.gpu{i}") for i in range(8)]
    for i, (a, b) in enumerate(pairs):
        hops = [v for _, v in topo.route(a, b)]
        assert f"m0.nic{i}" in hops and f"m1.nic{i}" in hops
    env = simpy.Environment()
    net = FlowNetwork(env, topo)
    ends = {}
    for p in pairs:
        net.send([p], 1e9).callbacks.append(lambda _e, p=p: ends.__setitem__(p, env.now))
    env.run()
    latency = topo.route_latency(topo.route(*pairs[0]))
    assert all(1e9 / (t - latency) == pytest.approx(50e9, rel=1e-6) for t in ends.values())


def test_a_repeated_send_routes_again_after_a_link_is_cut():
    # g0 -> g1 goes over switch a (2 hops of 2 us); with a's link to g1 cut, over b and c
    # (3 hops), although the same pairs were routed and kept before the cut
    from clustersim.core.topogen import build_topology
    from helpers import gpu, link
    devs = [gpu("g0", machine=0), gpu("g1", machine=1)] + [{"name": s, "kind": "switch"} for s in "abc"]
    links = [link("g0", "a", 10.0, 2.0), link("a", "g1", 10.0, 2.0), link("g0", "b", 10.0, 2.0),
             link("b", "c", 10.0, 2.0), link("c", "g1", 10.0, 2.0)]
    topo = build_topology({"name": "two-ways", "device": devs, "link": links}, "two-ways.toml")
    env = simpy.Environment()
    net = FlowNetwork(env, topo)
    took = []

    def go():
        for cut in (False, True):
            if cut:
                net.topology = topo.without_link("a", "g1")
            t0 = env.now
            yield net.send([("g0", "g1")], 1e6)
            took.append(env.now - t0)
    env.process(go())
    env.run()
    assert took == pytest.approx([2 * 2e-6 + 1e6 / 10e9, 3 * 2e-6 + 1e6 / 10e9], rel=1e-12)


def test_sends_made_at_one_instant_with_one_latency_share_one_timer():
    """A tensor group's pieces leave at one instant with one latency: one timer starts all
    their bytes (in the order they were sent), with every arrival time, float for float,
    that a timer a send gives (``shortcut=False``), and a later send or another latency its
    own timer."""
    from sim.engine import CountingEnvironment
    topo = star_topology(4, leaf_gbps=100.0, hub_gbps=10.0, lat_us=1.5)
    sends = [([(f"s{i}", "sink")], 1e6 * (i + 1), 0.0) for i in range(4)] + [([("s0", "s1")], 3e6, 0.0)]
    runs = {}
    for shortcut in (True, False):
        env = CountingEnvironment()
        net = FlowNetwork(env, topo, shortcut)
        done = {}

        def go(i, pairs, nbytes, after):
            if after:
                yield env.timeout(after)
            yield net.send(pairs, nbytes)
            done[i] = env.now
        for i, (pairs, nbytes, after) in enumerate(sends + [([("s2", "s3")], 1e6, 1e-7)]):
            env.process(go(i, pairs, nbytes, after))
        env.run()
        runs[shortcut] = [done[i] for i in range(len(sends) + 1)], env.events_processed
    (fast, fast_events), (slow, slow_events) = runs[True], runs[False]
    assert fast == slow
    assert fast[0] == pytest.approx(2 * 1.5e-6 + 4 * 1e6 / 10e9, rel=1e-12)    # four share the hub's link
    # the five sends at time 0 (two hops each: one latency) wait on one timer, not five
    assert slow_events - fast_events >= 4


def test_sends_whose_timers_fire_together_start_in_the_order_made():
    """R51: two latencies an ulp apart fire at one float time; sends grouped by latency
    started A, B, then C where separate timers start A, C, B, and the max-min solve, summing
    weights in start order, ended them 5e-16 s apart.  A send rides on the last send's timer
    only where its own would sit right after it in simpy's queue."""
    import math
    late = math.nextafter(3e-6, 1.0)
    assert 1e-4 + 3e-6 == 1e-4 + late
    ends = {}
    for shortcut in (True, False):
        env = simpy.Environment()
        net = FlowNetwork(env, star_topology(3, leaf_gbps=100.0, hub_gbps=10.0, lat_us=1.0), shortcut)
        done = {}

        def go(name, src, latency, share):
            yield env.timeout(1e-4)
            yield net.send([(src, "sink")], 3e9, latency=latency, speed=(lambda link: share) if share else None)
            done[name] = env.now
        for args in (("A", "s0", 3e-6, None), ("C", "s1", late, 0.3), ("B", "s2", 3e-6, 0.6)):
            env.process(go(*args))
        env.run()
        ends[shortcut] = done
    assert ends[True] == ends[False]
