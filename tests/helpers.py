"""Small builders shared by tests: topologies and scenarios as plain dicts."""
from clustersim.core.scenario import scenario_from_dict
from clustersim.core.topogen import build_topology


def gpu(name, tflops=10.0, machine=0, overhead_us=0.0):
    return {"name": name, "kind": "gpu", "machine": machine, "peak_tflops_fp32": tflops, "memory_gib": 16,
            "memory_bandwidth_gbps": 1000, "efficiency": 1.0, "op_overhead_us": overhead_us}


def link(a, b, gbps, lat_us):
    return {"a": a, "b": b, "bandwidth_gbps": gbps, "latency_us": lat_us}


def ring_topology(n, gbps=10.0, lat_us=2.0):
    """n GPUs in a ring, neighbours joined by identical links."""
    devs = [gpu(f"g{i}", machine=i) for i in range(n)]
    links = [link(f"g{i}", f"g{(i + 1) % n}", gbps, lat_us) for i in range(n if n > 2 else 1)]
    return build_topology({"name": f"ring{n}", "device": devs, "link": links}, f"ring{n}.toml")


def star_topology(n, leaf_gbps=100.0, hub_gbps=10.0, lat_us=1.0, kind="gpu"):
    """n GPUs (or CPUs) s0..s(n-1) on a switch by fast links, and a sink behind one slower link."""
    def rank(i):
        return gpu(f"s{i}", machine=i) if kind == "gpu" else {"name": f"s{i}", "kind": kind, "machine": i,
                                                               "cores": 1, "core_gflops": 10.0, "memory_gib": 16,
                                                               "memory_bandwidth_gbps": 100}
    devs = [rank(i) for i in range(n)] + [gpu("sink", machine=n), {"name": "sw", "kind": "switch"}]
    links = [link(f"s{i}", "sw", leaf_gbps, lat_us) for i in range(n)] + [link("sw", "sink", hub_gbps, lat_us)]
    return build_topology({"name": "star", "device": devs, "link": links}, "star.toml")


def scenario(topology="dgx-h100", model="mlp-digits", batch=32, file="test.toml", **sections):
    data = {"cluster": {"topology": topology}, "model": {"name": model, "batch_size": batch}}
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    return scenario_from_dict(data, file)


def dump_toml(data: dict) -> str:
    """A small TOML writer for tests (scalars, arrays of scalars, tables, arrays of tables)."""
    import json
    import math

    def scalar(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, float):
            return "nan" if math.isnan(v) else ("inf" if v == math.inf else "-inf" if v == -math.inf else repr(v))
        if isinstance(v, int):
            return str(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, list):
            return "[" + ", ".join(scalar(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{json.dumps(k)} = {scalar(x)}" for k, x in v.items()) + "}"
        raise TypeError(type(v))

    def table(d, prefix):
        lines, subs = [], []
        for k, v in d.items():
            key = json.dumps(k)
            if isinstance(v, dict) and v:
                subs.append((f"{prefix}.{key}" if prefix else key, v, False))
            elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
                subs.append((f"{prefix}.{key}" if prefix else key, v, True))
            else:
                lines.append(f"{key} = {scalar(v)}")
        for name, v, many in subs:
            for item in (v if many else [v]):
                lines.append(f"\n[[{name}]]" if many else f"\n[{name}]")
                lines.extend(table(item, name) if not many else _flat(item))
        return lines

    def _flat(d):
        return [f"{json.dumps(k)} = {scalar(v)}" for k, v in d.items()]

    return "\n".join(table(data, "")) + "\n"


def nccl_ring_seconds(n, nbytes, link_gbps=450.0, intra="nvlink", machines=1):
    """Closed form of a single-channel ring allreduce of ``n`` GPUs as the simulator runs it:
    the protocol NCCL's tuner picks, its latency, and 2 (n-1)/n S at NCCL's link speed times
    the protocol's share (clustersim.core.nccl)."""
    from clustersim.core import nccl
    us_per_byte = 2 * (n - 1) / n / (link_gbps * 1e3 * nccl.LINK_EFFICIENCY[intra])
    _, proto = nccl.choose("allreduce", nbytes, {"ring": us_per_byte}, n, machines, intra,
                           allowed=nccl.default_protocols(intra, 0.0))
    share = nccl.protocol_factor("ring", proto, "allreduce", machines, n / machines)
    lat = nccl.latency_us("allreduce", "ring", proto, n, machines, intra, nbytes)
    return (lat + nbytes * us_per_byte / share) * 1e-6
