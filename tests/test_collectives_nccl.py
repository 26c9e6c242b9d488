"""Collectives as NCCL runs them: channel layouts, double binary trees, its cost model
(NCCL 2.20.3's formulas, worked by hand), and flow-model runs against closed forms."""
import math

import pytest
import simpy

from clustersim import api
from clustersim.core import nccl
from clustersim.core.collective import binary_tree, depth, double_binary_tree, phases, ring_channels
from clustersim.core.topogen import load_topology
from sim import collectives
from sim.network import FlowNetwork


def reaches_root(parents):
    for r in range(len(parents)):
        seen = set()
        while parents[r] >= 0:
            assert r not in seen
            seen.add(r)
            r = parents[r]
    return sum(1 for p in parents if p < 0) == 1



def _run_together(topo, groups, nbytes):
    """Every group's ring allreduce started at once on one flow network: the end time."""
    env = simpy.Environment()
    network = FlowNetwork(env, topo)
    for group in groups:
        env.process(collectives.run(env, network, collectives.layout(topo, "allreduce", "ring", group, nbytes)))
    env.run()
    return env.now


@pytest.mark.parametrize("name", ["dgx-h100-fat-tree", "dgx-a100-fat-tree"])
def test_one_gpu_a_machine_stays_on_its_own_rail(name):
    """Data parallelism beside 8-way tensor parallelism: the 8 groups (GPU k of every
    machine) each ring over NIC k alone, as NCCL gives a GPU its local NIC; no hop passes
    a CPU, and the 8 groups at once take the time of one alone (disjoint rails)."""
    topo = load_topology(name, machines=4)
    groups = [[f"m{m}.gpu{k}" for m in range(4)] for k in range(8)]
    for k, group in enumerate(groups):
        rails = collectives.ports(topo, group)
        assert [[nic for nic, _, _ in machine] for machine in rails] == [[f"m{m}.nic{k}"] for m in range(4)]
        coll = collectives.layout(topo, "allreduce", "ring", group, 2**30)
        for ph in coll.phases:
            for a, b in ph.pairs:
                assert all(topo.devices[v].kind != "cpu" for _, v in topo.route(a, b))
    alone = _run_together(topo, groups[:1], 2**30)
    assert _run_together(topo, groups, 2**30) == pytest.approx(alone, rel=1e-9)


@pytest.mark.parametrize("name", ["dgx-h100-fat-tree", "dgx-a100-fat-tree"])
def test_a_group_of_two_gpus_a_machine_rings_over_their_two_nics(name):
    """Tensor 4 x data parallel: GPUs 0 and 4 of each machine use NICs 0 and 4 (two search
    channels); a ring entering by NIC 0 at GPU 0 leaves by it through GPU 0 again (PXN: GPU
    4 is on another PCIe switch, behind the CPU), so no hop passes a CPU and the 4 groups
    at once take the time of one.  NCCL's kernel takes two channels' SMs a rail."""
    topo = load_topology(name, machines=2)
    groups = [[f"m{m}.gpu{k}" for m in range(2) for k in (j, j + 4)] for j in range(4)]
    rails = collectives.ports(topo, groups[0])
    assert rails == [[(f"m{m}.nic{k}", f"m{m}.gpu{k}", f"m{m}.gpu{k}") for k in (0, 4)] for m in range(2)]
    coll = collectives.layout(topo, "allreduce", "ring", groups[0], 2**30)
    assert len(coll.phases) == 2
    for ph in coll.phases:
        assert sum(1 for a, _ in ph.pairs if ".gpu" in a) == 6          # 4 ranks, and back to each entry
        for a, b in ph.pairs:
            assert all(topo.devices[v].kind != "cpu" for _, v in topo.route(a, b))
    assert _run_together(topo, groups, 2**30) == pytest.approx(_run_together(topo, groups[:1], 2**30), rel=1e-9)
    sms = topo.devices["m0.gpu0"].sms
    assert collectives.sm_share(topo, groups[0], "ring") == pytest.approx(2 * 2 / sms)
    everyone = topo.compute_devices()
    assert collectives.sm_share(topo, everyone, "ring") == pytest.approx(2 * 8 / sms)


def test_no_pxn_where_the_member_beside_the_nic_is_behind_the_cpu_too(tmp_path):
    """Two NICs a DGX H100 (NIC 0 on GPU 0's switch): GPUs 2 and 6 both reach NIC 0 through
    the CPU, so returning to GPU 2 over NVLink would add a hop and save none:
    the ring leaves from GPU 6 directly."""
    from pathlib import Path
    base = Path(__file__).resolve().parents[1] / "topologies" / "dgx-h100-fat-tree.toml"
    f = tmp_path / "two-nics.toml"
    f.write_text(f'name = "two-nics"\nbase = "{base}"\n[machine.nic]\ncount = 2\nbandwidth_gbps = 50\n')
    topo = load_topology(str(f), machines=2)
    group = [f"m{m}.gpu{k}" for m in range(2) for k in (2, 6)]
    assert collectives.ports(topo, group) == [[(f"m{m}.nic0", f"m{m}.gpu2", f"m{m}.gpu6")] for m in range(2)]


def test_a_member_that_reaches_no_nic_has_no_route():
    """A cut link between a machine's only NIC and its PCIe switch: the group's members reach
    no NIC, so a collective across machines has no route, and the engine says the job
    cannot go on."""
    from clustersim.core.topology import NoRoute
    topo = load_topology("ethernet-cluster", machines=2).without_link("m0.nic0", "m0.pcie0")
    with pytest.raises(NoRoute, match="m0.gpu0 reaches no NIC"):
        collectives.ports(topo, ["m0.gpu0", "m0.gpu1", "m1.gpu0", "m1.gpu1"])
    res = api.simulate("scenarios/quickstart.toml", {"cluster.topology": "ethernet-cluster", "cluster.machines": 2,
                                                     "training.steps": 3,
                                                     "faults.fail": [{"at_s": 0.0, "link": ["m0.pcie0", "m0.nic0"]}]},
                       speedup=False)
    assert "stalled_at_s" in res.data and "reaches no NIC" in res.data["stalled_reason"]


@pytest.mark.parametrize("n", range(1, 70))
def test_double_binary_tree_is_two_spanning_trees_of_log_depth(n):
    first, second = double_binary_tree(n)
    assert first == binary_tree(n)
    for tree in (first, second):
        assert reaches_root(tree)
        assert depth(tree) <= max(1, math.ceil(math.log2(n))) if n > 1 else depth(tree) == 0
        assert all(sum(1 for p in tree if p == r) <= 2 for r in range(n))      # binary
    if n % 2 == 0:               # mirrored: interior in one tree, a leaf in the other
        interior = [{p for p in tree if p >= 0} for tree in (first, second)]
        assert not interior[0] & interior[1]


def test_ring_channels_enter_and_leave_every_machine_by_their_own_nic():
    """On 4 DGX H100: 8 channels; channel c enters each machine at GPU c (next to NIC c),
    visits all 8 GPUs and leaves from the other GPU on NIC c's PCIe switch through NIC c."""
    topo = load_topology("dgx-h100-fat-tree", machines=4)
    devices = topo.compute_devices()
    channels = ring_channels(devices, [topo.machine_of(d) for d in devices], collectives.ports(topo, devices))
    assert len(channels) == 8
    for c, hops in enumerate(channels):
        ranks = [a for a, _ in hops if ".gpu" in a]
        assert sorted(ranks) == sorted(devices)                     # every rank once
        assert [b for _, b in hops] == [a for a, _ in hops[1:]] + [hops[0][0]]   # a closed ring
        nic_hops = [(a, b) for a, b in hops if ".nic" in a or ".nic" in b]
        for m in range(4):
            assert (f"m{m}.gpu{c ^ 1}", f"m{m}.nic{c}") in nic_hops
            assert (f"m{m}.nic{c}", f"m{(m + 1) % 4}.gpu{c}") in nic_hops
    for hops in channels:                                           # NIC to NIC on its own rail
        for a, b in hops:
            if ".nic" in a:
                route = [v for _, v in topo.route(a, b)]
                assert f"{b.split('.')[0]}.{a.split('.')[1]}" in route


def test_nccl_latencies_worked_by_hand():
    """tuning.cc (2.20.3): ring lat = baseLat + (nsteps - nInterSteps) intraLat + nInterSteps
    interLat, intraLat at least 3 x 1 us of network overhead (Simple) across machines."""
    assert nccl.latency_us("allreduce", "ring", "Simple", 8, 1, "nvlink") == pytest.approx(8.4 + 14 * 3.4)
    assert nccl.latency_us("allreduce", "ring", "LL", 8, 1, "nvlink") == pytest.approx(6.6 + 14 * 0.6)
    assert nccl.latency_us("allreduce", "ring", "LL128", 8, 1, "nvlink") == pytest.approx(14.0 + 14 * 1.9)
    assert nccl.latency_us("allreduce", "ring", "Simple", 16, 2, "nvlink") == pytest.approx(8.4 + 26 * 3.4 + 4 * 14)
    # the ring's plateau (x1.4) once every rank's share of a channel is at least 64 bytes
    big = nccl.latency_us("allreduce", "ring", "Simple", 16, 2, "nvlink", nbytes=2**30, channels=8)
    assert big == pytest.approx(1.4 * (8.4 + 26 * 3.4 + 4 * 14))
    assert nccl.latency_us("allreduce", "ring", "LL", 16, 2, "nvlink") == pytest.approx(6.6 + 26 * 1.0 + 4 * 2.7)
    assert nccl.latency_us("allreduce", "tree", "LL", 16, 2, "nvlink") == pytest.approx(6.8 + 2 * (7 * 0.6 + 5.0))


def test_tuner_picks_by_the_least_predicted_time():
    per_byte = {"ring": 1 / 384e3, "tree": 1 / 397e3}          # us per byte at 384 and 397 GB/s
    assert nccl.choose("allreduce", 1024, per_byte, 16, 2, "nvlink") == ("tree", "LL")
    assert nccl.choose("allreduce", 2**30, per_byte, 16, 2, "nvlink")[1] in ("Simple", "LL128")
    algo, proto = nccl.choose("allreduce", 2**30, {"ring": 1 / 371e3}, 8, 1, "nvlink")
    assert (algo, proto) == ("ring", "Simple")
    for size in (8, 2**20, 2**30):                             # and it is the minimum of all options
        t = min(nccl.predicted_us("allreduce", a, p, size, per_byte[a], 16, 2, "nvlink")
                for a in per_byte for p in nccl.PROTOCOLS)
        a, p = nccl.choose("allreduce", size, per_byte, 16, 2, "nvlink")
        assert nccl.predicted_us("allreduce", a, p, size, per_byte[a], 16, 2, "nvlink") == t


def run_time(topo, coll):
    env = simpy.Environment()
    env.process(collectives.run(env, FlowNetwork(env, topo), coll))
    env.run()
    return env.now


def test_one_dgx_ring_allreduce_is_nccls_latency_plus_bytes_at_nvlink_speed():
    """8 H100 on NVSwitch, ring Simple: 56 us + 2 (n-1)/n S over 450 GB/s x 20.6/25 = 370.8."""
    topo = load_topology("dgx-h100")
    devices = topo.compute_devices()
    size = 2.0**30
    coll = collectives.layout(topo, "allreduce", "ring", devices, size, proto="Simple")
    assert run_time(topo, coll) == pytest.approx(56e-6 + 1.75 * size / 370.8e9, rel=1e-9)


def test_two_dgx_ring_runs_one_channel_per_nic():
    """16 GPUs on two DGX H100: 8 channels, each through its own NICs at 48 GB/s (NCCL's
    speed of a 400 Gb/s NIC): 2 (n-1)/n S/8 / 48 GB/s plus NCCL's latency."""
    topo = load_topology("dgx-h100-fat-tree", machines=2)
    devices = topo.compute_devices()
    size = 2.0**30
    coll = collectives.layout(topo, "allreduce", "ring", devices, size, proto="Simple")
    assert len(coll.phases) == 8
    lat = nccl.latency_us("allreduce", "ring", "Simple", 16, 2, "nvlink", size, 8) * 1e-6
    assert run_time(topo, coll) == pytest.approx(lat + 2 * 15 / 16 * size / 8 / 48e9, rel=1e-9)


def test_hierarchical_is_three_rings_in_sequence():
    """Reduce-scatter over NVLink, an allreduce of S/8 per rail across machines, all-gather."""
    topo = load_topology("dgx-h100-fat-tree", machines=2)
    devices = topo.compute_devices()
    size = 2.0**30
    coll = collectives.layout(topo, "allreduce", "hierarchical", devices, size, proto="Simple")
    assert [ph.wave for ph in coll.phases] == [0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2]
    inside = 7 / 8 * size / 370.8e9
    across = 2 * 1 / 2 * size / 8 / 48e9
    assert run_time(topo, coll) == pytest.approx(sum(coll.wave_latency) + 2 * inside + across, rel=1e-9)


def test_auto_picks_tree_for_small_and_nvls_tree_for_large_messages_across_machines():
    """Two DGX H100: NCCL 2.20's tuner takes the tree at 1 KiB and NVLS_TREE (NVLink SHARP
    inside, trees over the NICs) at 1 GiB (tests/test_nvls.py checks its time)."""
    rows = api.collective("dgx-h100-fat-tree", sizes=[2**10, 2**30], machines=2)
    assert [r["algo"] for r in rows] == ["tree", "nvls_tree"]
    assert rows[1]["busbw_gbps"] > 300                      # the floor at 1 GiB on 2 nodes
    assert all(r["protocol"] in nccl.PROTOCOLS for r in rows)


def test_host_collectives_keep_the_routes_latency_and_full_speed():
    topo = load_topology("distbelief-2012", machines=4)
    devices = topo.compute_devices()
    coll = collectives.layout(topo, "allreduce", "auto", devices, 1e6)
    assert (coll.algo, coll.proto, coll.wave_latency) == ("ring", "", ())
    assert coll.phases == tuple(phases("allreduce", "ring", devices, 1e6, [0, 1, 2, 3]))


def test_a100_nvlink_runs_at_nccls_ampere_lane_speed():
    """12 NVLink3 lanes of an A100 at NCCL's 20.0 GB/s each (SM80_NVLINK_BW): 240 GB/s."""
    topo = load_topology("dgx-a100")
    size = 2.0**30
    coll = collectives.layout(topo, "allreduce", "ring", topo.compute_devices(), size, proto="Simple")
    assert run_time(topo, coll) == pytest.approx(56e-6 + 1.75 * size / 240e9, rel=1e-9)


def test_hierarchical_and_a_forced_protocol_run_in_training_and_from_the_command():
    """hierarchical is not in NCCL's tuner: it runs Simple, also inside a training step;
    a forced protocol limits auto's choice to it (NCCL_PROTO): Simple at 1 KiB on 4 DGX H100
    is NVLS_TREE, whose latency (79 us) is the least of the three."""
    from clustersim.core.plan import plan
    from sim.engine import simulate
    from helpers import scenario
    res = simulate(plan(scenario(batch=32, parallel={"replicas": 8}, training={"allreduce": "hierarchical",
                                                                                "steps": 2})))
    assert res.stalled_at_s is None and len(res.trace.step_ends) == 2
    [row] = api.collective("dgx-h100-fat-tree", "allreduce", "hierarchical", [2**20], machines=2)
    assert (row["algo"], row["protocol"]) == ("hierarchical", "Simple")
    topo = load_topology("dgx-h100-fat-tree", machines=4)
    devices = topo.compute_devices()
    forced = collectives.layout(topo, "allreduce", "auto", devices, 1024, proto="Simple")
    cache = {}
    nodes, nvs = [topo.machine_of(d) for d in devices], collectives.switches(topo, devices)
    per_byte = {a: collectives._us_per_byte(topo, "allreduce", a, devices, nodes, collectives.ports(topo, devices),
                                            cache, nvs) for a in ("ring", "tree", "nvls_tree")}
    best = min(per_byte, key=lambda a: nccl.predicted_us("allreduce", a, "Simple", 1024, per_byte[a], 32, 4,
                                                         "nvlink", 8))
    assert (forced.algo, forced.proto) == (best, "Simple") == ("nvls_tree", "Simple")


def test_a_layout_cache_keeps_its_topologies_alive_so_their_ids_stay_theirs():
    """A topology a layout cache keys by stays alive while the cache lives, so a clone (a cut
    link) cannot be collected and its id, and so its entries, taken by another."""
    import gc
    import weakref
    cache: dict = {}
    topo = load_topology("dgx-h100-fat-tree", machines=2).without_link("m0.nic0", "fab.leaf0")
    cpus = [d.name for d in topo.devices.values() if d.kind == "cpu"][:2]    # no NCCL speeds kept for them
    assert len(cpus) == 2
    collectives.layout(topo, "allreduce", "ring", cpus, 2**20, cache=cache)
    alive = weakref.ref(topo)
    del topo
    gc.collect()
    assert alive() is not None


SLOW_NET = """name = "pcie-{nic}"
[machine.cpu]
cores = 8
core_gflops = 50
memory_gib = 64
memory_bandwidth_gbps = 100
[machine.gpu]
count = 2
peak_tflops_fp32 = 19.5
memory_gib = 80
memory_bandwidth_gbps = 1935
[machine.pcie]
switches = 1
generation = 4
lanes = 16
latency_us = 0.5
[machine.nic]
count = 1
bandwidth_gbps = 12.5
latency_us = {nic}
[network]
kind = "switch"
machines = 2
bandwidth_gbps = 12.5
latency_us = {switch}
"""


def test_a_step_across_machines_takes_at_least_the_clusters_latency(tmp_path):
    """U36: a cluster file's latencies never reached a GPU collective (NCCL's table alone
    set its latency): 200 us NICs behind a 100 us switch gave the 4 KiB ring allreduce of
    1 us ones.  A run's step that leaves a machine now takes at least the route's one-way
    latency (``net_latency_us``); NCCL's tuner, which knows only its table, chooses alike."""
    rows = {}
    for nic, switch in ((1.0, 0.5), (200.0, 100.0)):
        f = tmp_path / f"t{nic:g}.toml"
        f.write_text(SLOW_NET.format(nic=nic, switch=switch))
        topo = load_topology(str(f), tmp_path)
        route = topo.route(topo.compute_devices()[0], topo.compute_devices()[-1])
        floor = collectives.net_latency_us(topo, topo.compute_devices())
        assert floor == pytest.approx(topo.route_latency(route) * 1e6)
        rows[nic] = (floor, api.collective(f, "allreduce", "ring", [4096], protocol="LL")[0])
        assert rows[nic][1]["algo"] == "ring" and rows[nic][1]["protocol"] == "LL"
    (fast, a), (slow, b) = rows[1.0], rows[200.0]
    assert slow == pytest.approx(4 * 0.5 + 2 * 200 + 2 * 100)        # GPU-PCIe-NIC-switch-NIC-PCIe-GPU
    _, inter = nccl.steps("allreduce", 4, 2)
    ll_net = nccl.HW_LAT["net"]["ring"][0]
    grown = (slow - max(fast, ll_net)) * inter * 1e-6
    assert b["time_s"] - a["time_s"] == pytest.approx(grown, rel=1e-6)
    chosen = [[(r["algo"], r["protocol"]) for r in api.collective(tmp_path / f"t{nic:g}.toml", "allreduce", "auto",
                                                                   [4096, 2**20, 2**26])] for nic in (1.0, 200.0)]
    assert chosen[0] == chosen[1]


def test_the_latency_floor_counts_each_crossing_once_however_nccls_steps_count():
    """Review R36: hierarchical's ring across machines runs ``latency_us`` with one rank a
    machine, where NCCL's 2 x nodes crossings exceed its 2(m - 1) steps, and paid about four
    floors over 2 machines where the tree pays two.  The floor now adds to at most every
    step, and to the tree's 2 log2(nodes) crossings."""
    floor = 600.0
    for algo, proto, ranks, nodes, crossings, nbytes in (
            ("ring", "LL", 2, 2, 2, 0), ("ring", "LL", 8, 2, 4, 0), ("tree", "LL", 8, 4, 4, 0),
            ("ring", "Simple", 16, 4, 8, 0), ("ring", "Simple", 16, 4, 8, 2**22)):   # the plateau: not the wire's
        without = nccl.latency_us("allreduce", algo, proto, ranks, nodes, "nvlink", nbytes)
        with_floor = nccl.latency_us("allreduce", algo, proto, ranks, nodes, "nvlink", nbytes, net_floor_us=floor)
        table = nccl.HW_LAT["net"][algo][nccl.PROTOCOLS.index(proto)]
        assert with_floor - without == pytest.approx(crossings * (floor - table))
    assert nccl.latency_us("allreduce", "ring", "LL", 16, 2, "nvlink", net_floor_us=1.0) == \
        nccl.latency_us("allreduce", "ring", "LL", 16, 2, "nvlink")      # under the table: NCCL's own
