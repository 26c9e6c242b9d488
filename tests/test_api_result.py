"""The Python API's Result and its inputs, as a scripting user meets them (U41)."""
import copy
import pickle
from concurrent.futures import ProcessPoolExecutor

import pytest

import clustersim


def test_a_result_pickles_copies_and_crosses_a_process_pool():
    """``Result.__getattr__`` read ``self.data`` while pickle and copy built an instance
    without it, and recursed: a result could not come back from a process pool."""
    r = clustersim.simulate("scenarios/quickstart.toml", {"training.steps": 2}, speedup=False)
    for again in (pickle.loads(pickle.dumps(r)), copy.copy(r), copy.deepcopy(r)):
        assert again.data == r.data and again.step_time_s == r.step_time_s
    with ProcessPoolExecutor(1) as pool:
        far = pool.submit(clustersim.simulate, "scenarios/quickstart.toml", {"training.steps": 2}, speedup=False)
        far = far.result(timeout=120).data
    assert far.pop("wall_s") > 0 and far == {k: v for k, v in r.data.items() if k != "wall_s"}
    with pytest.raises(AttributeError, match="has no 'nothing' \\(keys: name, "):
        r.nothing


def test_overrides_beside_a_loaded_scenario_are_refused():
    """``simulate(scenario, overrides)`` ran the loaded scenario and dropped the overrides."""
    sc = clustersim.load("scenarios/quickstart.toml", {"parallel.replicas": 4})
    with pytest.raises(clustersim.ConfigError, match="overrides apply to a scenario file or dict"):
        clustersim.simulate(sc, {"parallel.replicas": 2})
    assert clustersim.simulate(sc, speedup=False).replicas == 4


def test_a_step_chart_of_many_gpus_keeps_rows_for_transfers():
    """U41: on 128 GPUs the 24 rows all went to devices; the allreduce, the step's gap,
    had no row. Up to a third of the rows go to the busiest transfers now."""
    from clustersim.plots import gantt_rows
    r = clustersim.simulate("scenarios/alexnet-fat-tree.toml", {"training.steps": 2}, speedup=False)
    spans = [s for s in r.trace.spans if s.step == 1]
    rows = list(gantt_rows(spans, r.plan, 24))
    assert len(rows) == 24 and sum("->" in w for w in rows) == 8 and rows[0] == "m0.gpu0"
    small = clustersim.simulate("scenarios/quickstart.toml", {"training.steps": 2, "parallel.replicas": 2},
                                speedup=False)
    rows = list(gantt_rows([s for s in small.trace.spans if s.step == 1], small.plan, 24))
    assert rows[:2] == ["m0.gpu0", "m0.gpu1"] and all("->" in w for w in rows[2:])


def test_a_string_of_overrides_or_a_scalar_to_vary_is_one_clear_error():
    """U41: a string of overrides was split into characters ("p: must look like KEY=VALUE"),
    and a scalar to vary over raised Python's TypeError."""
    with pytest.raises(clustersim.ConfigError, match="a dict or a list of KEY=VALUE strings; got the string"):
        clustersim.simulate("scenarios/quickstart.toml", "parallel.replicas=2")
    with pytest.raises(clustersim.ConfigError, match="parallel.replicas: give a list of values to vary it over; got 4"):
        clustersim.sweep("scenarios/quickstart.toml", {"parallel.replicas": 4})


def test_sweep_and_search_take_a_file_or_dict_and_a_whole_device_count():
    """U41: a loaded Scenario or devices="8" raised Python's TypeError."""
    sc = clustersim.load("scenarios/quickstart.toml")
    with pytest.raises(clustersim.ConfigError, match="sweep takes a scenario file or dict"):
        clustersim.sweep(sc, {"parallel.replicas": [1, 2]})
    with pytest.raises(clustersim.ConfigError, match="search takes a scenario file or dict"):
        clustersim.search(sc, 8)
    with pytest.raises(clustersim.ConfigError, match="devices: a whole number of devices; got '8'"):
        clustersim.search("scenarios/quickstart.toml", "8")
