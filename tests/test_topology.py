"""Topology files, generators and routing."""
import re

import pytest

from clustersim.core.config import ConfigError
from clustersim.core.topogen import PCIE_LANE_GBPS, build_topology, builtin_topologies, load_topology


def test_every_builtin_loads_with_compute_devices():
    for name in builtin_topologies():
        topo = load_topology(name)
        assert topo.compute_devices(), name


def test_dgx_h100_counts_and_nvlink_route():
    topo = load_topology("dgx-h100")
    kinds = [d.kind for d in topo.devices.values()]
    assert kinds.count("gpu") == 8 and kinds.count("nic") == 8 and kinds.count("pcie_switch") == 4
    assert topo.route("m0.gpu0", "m0.gpu7") == (("m0.gpu0", "m0.nvswitch"), ("m0.nvswitch", "m0.gpu7"))
    assert topo.route_bandwidth(topo.route("m0.gpu0", "m0.gpu7")) == 450e9


def test_cross_host_route_goes_gpu_pcie_nic_switch_nic_pcie_gpu():
    topo = load_topology("ethernet-cluster")
    route = topo.route("m0.gpu3", "m5.gpu0")
    kinds = [topo.devices[u].kind for u, _ in route] + [topo.devices[route[-1][1]].kind]
    assert kinds == ["gpu", "pcie_switch", "cpu", "pcie_switch", "nic", "switch",
                     "nic", "pcie_switch", "gpu"]
    # six PCIe hops of 0.7 us, the NIC's 2 us at each end, two switch-port hops of 0.6 us
    assert topo.route_latency(route) == pytest.approx((0.7 * 6 + 2.0 * 2 + 0.6 * 2) * 1e-6, rel=1e-9)
    assert topo.route_bandwidth(route) == pytest.approx(12.5e9)


def test_gpus_under_one_pcie_switch_share_its_uplink():
    topo = load_topology("pcie-4gpu")
    uplink = ("m0.pcie0", "m0.cpu")
    to_host = [topo.route(f"m0.gpu{i}", "m0.cpu") for i in range(4)]
    assert all(uplink in r for r in to_host)
    assert topo.capacity[uplink] == pytest.approx(PCIE_LANE_GBPS[4] * 16 * 1e9)
    # peer traffic stays inside the switch
    assert topo.route("m0.gpu0", "m0.gpu1") == (("m0.gpu0", "m0.pcie0"), ("m0.pcie0", "m0.gpu1"))


def test_no_route_through_a_gpu_or_another_host():
    topo = load_topology("dgx-h100-rail", machines=4)
    for src, dst in [("m0.gpu0", "m1.gpu1"), ("m2.gpu7", "m3.gpu0"), ("m0.cpu", "m3.gpu4")]:
        route = topo.route(src, dst)
        inner = [v for _, v in route[:-1]]
        assert all(topo.devices[n].kind != "gpu" for n in inner)
        assert all(topo.devices[n].machine in (None, topo.machine_of(src), topo.machine_of(dst)) for n in inner)


def test_fat_tree_sizes_and_hop_counts():
    topo = load_topology("dgx-h100-fat-tree", machines=160)     # 1,280 ports on k = 64 switches: 2 pods
    switches = [d for d in topo.devices.values() if d.kind == "switch"]
    assert sum(d.name.startswith("core") for d in switches) == 32 * 32
    assert len(topo.compute_devices()) == 1280
    # inside a pod (1,024 ports): edge-agg-edge; between pods edge-agg-core-agg-edge; plus
    # gpu-pcie-nic at each end
    assert len(topo.route("m0.gpu0", "m127.gpu0")) == 8
    assert len(topo.route("m0.gpu0", "m159.gpu0")) == 10


def test_ecmp_spreads_pairs_over_core_switches():
    topo = load_topology("dgx-h100-fat-tree", machines=160)
    cores = {v for m in range(128, 160) for u, v in topo.route("m0.gpu0", f"m{m}.gpu0") if v.startswith("core")}
    assert len(cores) > 1


def _tiny(**over):
    data = {"name": "t", "machine": {"cpu": {"cores": 4, "core_gflops": 10, "memory_gib": 8,
                                             "memory_bandwidth_gbps": 20}},
            "network": {"kind": "none"}}
    data.update(over)
    return data


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d["machine"]["cpu"].update(cores=0), "machine.cpu.cores"),
    (lambda d: d["machine"]["cpu"].update(memory_bandwidth_gbps=-1), "machine.cpu.memory_bandwidth_gbps"),
    (lambda d: d["machine"]["cpu"].update(speed=3), "machine.cpu.speed"),
    (lambda d: d.update(link=[{"a": "m0.cpu", "b": "ghost", "bandwidth_gbps": 1, "latency_us": 1}]), "link[0].b"),
    (lambda d: d.update(link=[{"a": "m0.cpu", "b": "m0.cpu", "bandwidth_gbps": 0, "latency_us": 1}]),
     "link[0].bandwidth_gbps"),
    (lambda d: d["network"].update(machines=3), "network.machines"),
    (lambda d: d["network"].update(kind="torus"), "network.kind"),
    (lambda d: d["machine"].update(gpu={"count": 0, "compute_capability": 9.0}), "machine.gpu.count"),
])
def test_bad_topology_names_the_field(mutate, field):
    data = _tiny()
    mutate(data)
    with pytest.raises(ConfigError) as err:
        build_topology(data, "t.toml")
    assert err.value.field == field and err.value.file == "t.toml"


def test_base_merges_subtables_and_missing_file_is_a_config_error(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text('base = "pcie-4gpu"\n[machine.nic]\ncount = 2\nbandwidth_gbps = 50\n')
    topo = load_topology(str(f))
    assert sum(d.kind == "nic" for d in topo.devices.values()) == 2
    assert sum(d.kind == "gpu" for d in topo.devices.values()) == 4      # kept from the base
    with pytest.raises(ConfigError, match="'no-such-topology' is neither a built-in topology .* nor a file"):
        load_topology("no-such-topology")


def test_one_key_of_a_base_machine_table_is_overridden_alone(tmp_path):
    """An A100 40GB over dgx-a100 is ``[machine.gpu] memory_gib = 40``: the GPU's other keys
    stay the base's (the whole table was replaced, and the file refused as incomplete, a
    new-user sweep found)."""
    f = tmp_path / "a40.toml"
    f.write_text('base = "dgx-a100"\n[machine.gpu]\nmemory_gib = 40\n')
    topo, base = load_topology(str(f)), load_topology("dgx-a100")
    gpu, was = topo.devices["m0.gpu0"], base.devices["m0.gpu0"]
    assert gpu.memory_bytes == 40 * 2**30 and was.memory_bytes == 80 * 2**30
    assert (gpu.peak_flops, gpu.achievable_bw, gpu.sms) == (was.peak_flops, was.achievable_bw, was.sms)
    assert len(topo.devices) == len(base.devices)


def test_a_base_path_is_read_beside_the_file_that_names_it(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "my-machine.toml").write_text('base = "pcie-4gpu"\n[machine.nic]\ncount = 3\n')
    (tmp_path / "sub" / "cluster.toml").write_text('base = "my-machine.toml"\nname = "cluster"\n')
    monkeypatch.chdir(tmp_path)                        # not the folder that holds them
    topo = load_topology("sub/cluster.toml")
    assert topo.name == "cluster" and sum(d.kind == "nic" for d in topo.devices.values()) == 3


@pytest.mark.parametrize("extra, field", [
    ({"op_costs": {"dense": [1.0, 2.0]}}, "op_costs.dense"),
    ({"op_costs": {"dense": [1.0, -2.0, 0]}}, "op_costs.dense"),
    ({"op_costs": [1, 2, 3]}, "op_costs"),
    ({"op_curves": {"allreduce": [[64, 10.0], [32, 20.0]]}}, "op_curves.allreduce"),
    ({"op_curves": {"allreduce": [[64, -1.0]]}}, "op_curves.allreduce"),
    ({"op_curves": {"allreduce": []}}, "op_curves.allreduce"),
    ({"op_curves": [[64, 1.0]]}, "op_curves"),
    ({"core_pool": "nowhere"}, "core_pool")])
def test_bad_measured_costs_and_pools_name_the_field(extra, field):
    from clustersim.core.config import ConfigError
    dev = {"name": "c", "kind": "cpu", "cores": 1, "core_gflops": 1, "memory_gib": 1, "memory_bandwidth_gbps": 1}
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        build_topology({"name": "t", "device": [{**dev, **extra}]}, "t.toml")


def test_a_topology_of_explicit_devices_takes_a_machine_price_at_its_top():
    """Without [machine] there was nowhere to price a hand-built cluster ([machine] then
    wants a cpu): its one machine's price and power go at the top of the file."""
    dev = {"name": "c", "kind": "cpu", "cores": 1, "core_gflops": 1, "memory_gib": 1, "memory_bandwidth_gbps": 1}
    topo = build_topology({"name": "t", "price_usd_per_hour": 3.0, "power_w": 400, "device": [dev]}, "t.toml")
    assert (topo.price_usd_per_hour, topo.power_w) == (3.0, 400)
    with pytest.raises(ConfigError) as err:
        build_topology({"name": "t", "price_usd_per_hour": -1, "device": [dev]}, "t.toml")
    assert err.value.field == "price_usd_per_hour"


@pytest.mark.parametrize("section, key", [("cluster", "topology"), ("model", "file")])
def test_a_nul_byte_in_a_file_reference_is_a_config_error(tmp_path, section, key):
    """Found by the fuzz test: open() raises ValueError, not OSError, on a NUL in a path."""
    from clustersim.core.scenario import load_scenario
    f = tmp_path / "s.toml"
    model = 'file = "m\\u0000.toml"' if key == "file" else 'name = "mlp-digits"'
    topo = '"\\u0000"' if key == "topology" else '"dgx-h100"'
    f.write_text(f'[cluster]\ntopology = {topo}\n[model]\n{model}\nbatch_size = 8\n')
    with pytest.raises(ConfigError, match="s.toml: model.file: .* does not exist" if key == "file"
                       else "s.toml: cluster.topology: .* nor a file"):
        load_scenario(str(f))


def test_a_config_error_is_one_line_whatever_the_input_holds():
    """Found by the fuzz test: a topology named "\\n" gave a two-line error."""
    err = ConfigError("a\nb.toml", "cluster.topology", "cannot read \x00 it")
    assert str(err) == "a\\nb.toml: cluster.topology: cannot read \\x00 it"
    assert err.file == "a\nb.toml"                                     # the field values themselves are kept


def test_between_machines_a_route_leaves_and_enters_by_each_ends_own_nic():
    """RDMA goes NIC to NIC: m0.gpu7 -> m1.gpu0 on the rail fabric leaves by NIC 7, crosses
    the spine and enters by NIC 0, never through m1's CPU root complex."""
    topo = load_topology("dgx-h100-rail", machines=4)
    hops = [v for _, v in topo.route("m0.gpu7", "m1.gpu0")]
    assert hops == ["m0.pcie3", "m0.nic7", "rail7", "spine0", "rail0", "m1.nic0", "m1.pcie0", "m1.gpu0"] or (
        hops[:2] == ["m0.pcie3", "m0.nic7"] and hops[-3:] == ["m1.nic0", "m1.pcie0", "m1.gpu0"])
    assert not any(h.endswith(".cpu") for h in hops)


def test_machines_for_a_one_machine_topology_is_bad_input_where_a_user_named_them(tmp_path):
    """A scenario's ``cluster.machines`` (or ``--machines``) on a topology with no network
    to repeat its machine over was silently one machine; now one line naming the field."""
    from clustersim import api
    from clustersim.core.scenario import load_scenario
    f = tmp_path / "s.toml"
    f.write_text('[cluster]\ntopology = "dgx-h100"\nmachines = 4\n[model]\nname = "mlp-digits"\nbatch_size = 8\n')
    with pytest.raises(ConfigError, match=r"s\.toml: cluster\.machines: 4 machines of dgx-h100, which has no \[network\] table"):
        load_scenario(str(f))
    f.write_text(f.read_text().replace("machines = 4", "machines = 1"))
    assert len(load_scenario(str(f)).topology.compute_devices()) == 8
    with pytest.raises(ConfigError, match=r"--machines: 2 machines of pcie-4gpu"):
        api.collective("pcie-4gpu", machines=2)
    with pytest.raises(ConfigError, match=r"s\.toml: cluster\.topology: 'dgx-h1000' is neither a built-in"):
        f.write_text(f.read_text().replace('"dgx-h100"', '"dgx-h1000"'))
        load_scenario(str(f))
    from clustersim.cli import main
    assert main(["topology", "show", "dgx-h100", "--machines", "4"]) == 2


def test_a_cluster_file_that_is_not_text_or_bases_on_itself_says_so(tmp_path):
    """U36: a binary file was "neither a built-in topology nor a file that can be read
    (UnicodeDecodeError)" under the command's name, and a base naming itself "must name one
    topology (at most 4 levels deep)"."""
    f = tmp_path / "bin.toml"
    f.write_bytes(b"\xff\xfe\x00name")
    with pytest.raises(ConfigError, match=r"bin.toml: is not UTF-8 text") as err:
        load_topology(str(f), tmp_path, None, ("topology show", ""))
    assert err.value.file == str(f)
    (tmp_path / "a.toml").write_text('base = "b.toml"\n')
    (tmp_path / "b.toml").write_text('base = "a.toml"\n')
    with pytest.raises(ConfigError, match=r"b.toml: base: 'a.toml' leads back to a file that names it"):
        load_topology(str(tmp_path / "a.toml"))


def test_a_twice_used_device_name_and_a_link_listed_twice_name_their_table(tmp_path):
    """U36: both were reported as field ``link`` ("self-loop or listed twice" for either)."""
    f = tmp_path / "t.toml"
    f.write_text('base = "pcie-4gpu"\n[[device]]\nname = "m0.gpu0"\nkind = "switch"\n')
    with pytest.raises(ConfigError, match=r"t.toml: device: device name 'm0.gpu0' is used twice"):
        load_topology(str(f))
    f.write_text('base = "pcie-4gpu"\n[[device]]\nname = "x"\nkind = "switch"\n'
                 '[[link]]\na = "x"\nb = "x"\nbandwidth_gbps = 1\nlatency_us = 0\n')
    with pytest.raises(ConfigError, match=r"t.toml: link: link x - x is a self-loop"):
        load_topology(str(f))


def test_a_network_key_of_another_kind_says_whose_it_is():
    """U36: ``k`` under kind = "switch", ``spines`` under a fat-tree and ``bandwidth_gbps``
    without a network were each "unknown key", as if misspelt."""
    from clustersim.core.topogen import build_topology
    machine = {"gpu": {"count": 1, "peak_tflops_fp32": 10, "memory_gib": 16, "memory_bandwidth_gbps": 900},
               "cpu": {"cores": 8, "core_gflops": 10, "memory_gib": 64, "memory_bandwidth_gbps": 100},
               "nic": {"count": 1, "bandwidth_gbps": 12.5}}
    for net, field, says in (({"kind": "switch", "machines": 2, "k": 4}, "network.k", "a fat-tree network's key"),
                             ({"kind": "fat-tree", "machines": 2, "spines": 2}, "network.spines", "a rail network's"),
                             ({"kind": "none", "bandwidth_gbps": 4}, "network.bandwidth_gbps", 'kind = "none" has')):
        with pytest.raises(ConfigError, match=says) as err:
            build_topology({"network": net, "machine": machine}, "t.toml")
        assert err.value.field == field
    ok = build_topology({"network": {"kind": "rail", "machines": 2, "spines": 1}, "machine": machine}, "t.toml")
    assert len(ok.compute_devices()) == 2


def test_a_file_named_as_a_built_in_may_base_on_that_built_in(tmp_path, monkeypatch):
    """Review R36: the cycle check took a built-in for ./topologies/<name>.toml, so a user's
    topologies/dgx-h100.toml with base = "dgx-h100" was "a cycle of bases"."""
    (tmp_path / "topologies").mkdir()
    (tmp_path / "topologies" / "dgx-h100.toml").write_text('name = "mine"\nbase = "dgx-h100"\n')
    monkeypatch.chdir(tmp_path)
    topo = load_topology("topologies/dgx-h100.toml")
    assert topo.name == "mine" and len(topo.compute_devices()) == 8


@pytest.mark.parametrize("table, key, value, says", [
    ("nic", "bandwidth_gbps", 1e300, "must be <= 1e+12"), ("nic", "latency_us", 1e300, "must be <= 1e+07"),
    ("gpu", "memory_bandwidth_gbps", 1e300, "must be <= 1e+12"), ("nic", "bandwidth_gbps", 1e-300, "must be >= 1e-09"),
    ("nic", "bandwidth_gbps", 0, "must be > 0"),
    # U51: 1e300 TFLOP/s and GiB overflowed to inf (topology show "inf TFLOP/s", plans simulated)
    ("gpu", "peak_tflops_fp32", 1e300, "must be <= 1e+09"), ("gpu", "memory_gib", 1e300, "must be <= 1e+12"),
    ("cpu", "core_gflops", 1e300, "must be <= 1e+12"), ("cpu", "memory_gib", 1e300, "must be <= 1e+12")])
def test_a_bandwidth_or_latency_past_any_hardware_is_refused(table, key, value, says):
    """U36: a NIC of 1e300 GB/s, a latency of 1e300 us (topology show: "2e+294 s") and a
    bandwidth of 1e-300 (a step of 7.5e+295 s, exit 0) were taken."""
    from clustersim.core.topogen import build_topology
    machine = {"gpu": {"count": 1, "peak_tflops_fp32": 10, "memory_gib": 16, "memory_bandwidth_gbps": 900},
               "cpu": {"cores": 8, "core_gflops": 10, "memory_gib": 64, "memory_bandwidth_gbps": 100},
               "nic": {"count": 1, "bandwidth_gbps": 12.5}}
    machine[table] = {**machine[table], key: value}
    with pytest.raises(ConfigError, match=re.escape(says)) as err:
        build_topology({"network": {"kind": "switch", "machines": 2}, "machine": machine}, "t.toml")
    assert err.value.field == f"machine.{table}.{key}"


def test_a_checkout_imported_without_installing_finds_its_own_data_folders(monkeypatch):
    """Where the wheel's data packages do not import (the source tree first on sys.path on
    a host where the wheel is installed), the checkout's topologies/ and scenarios/ serve."""
    from importlib import resources
    from pathlib import Path

    from clustersim.core import config
    from clustersim.core.scenario import builtin_scenario_folder
    installed = builtin_topologies()

    def missing(package):
        raise ModuleNotFoundError(f"No module named {package!r}")
    monkeypatch.setattr(resources, "files", missing)
    root = Path(config.__file__).resolve().parents[2]
    assert config.bundled_folder("clustersim.builtin_topologies") == root / "topologies"
    assert config.bundled_folder("clustersim.builtin_scenarios.published") == root / "scenarios" / "published"
    assert builtin_scenario_folder() == root / "scenarios"
    assert builtin_topologies() == installed
    assert load_topology("dgx-h100").devices
