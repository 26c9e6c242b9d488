"""A small DistBelief Figure 3 (scenarios/studies/distbelief_fig3.py) on distbelief-2012
with the kernel stack's 15 us a message on each side (docs/decisions/025): a few points
against the values this session simulated, and the shape that must hold whatever the
numbers: the fully connected speech model peaks between 1.5x and 3x at 8-16 machines and
is slower at 32 (every machine sends and receives m - 1 messages at each layer boundary
while its share of the wire stays a whole activation), and the locally connected 1.7B
model keeps gaining and leads at every count."""
import tomllib
from pathlib import Path

import pytest

import clustersim
from clustersim.core.topogen import load_topology
from helpers import dump_toml
from study_loader import load_study

TOPOLOGY = Path(__file__).resolve().parents[1] / "topologies/distbelief-2012.toml"

SPEECH = {1: 1.0, 8: 1.7097, 16: 1.7658, 32: 1.7388}
IMAGE_1_7B = {1: 1.0, 4: 3.0478, 16: 5.1486}


def test_distbelief_2012_states_a_kernel_stacks_cost_per_message_and_side():
    cpu = load_topology("distbelief-2012", machines=2).devices["m1.cpu"]
    for side in ("send", "recv"):                               # Rumble et al. 2011, Table 1: 15 us a traversal
        assert cpu.op_time(side, 0.0, 0.0) == pytest.approx(15e-6)
        assert cpu.op_time(side, 0.0, 1e6) == pytest.approx(15e-6)   # no per-byte term (025)


def speedups(model: str, machines: tuple[int, ...]) -> dict[int, float]:
    return {p["machines"]: p["speedup"] for p in load_study("distbelief_fig3").sweep_model(model, machines)}


def test_small_fig3_speech_peaks_and_falls_and_the_image_model_keeps_gaining():
    speech = speedups("distbelief-speech", tuple(SPEECH))
    image = speedups("distbelief-image-1.7b", tuple(IMAGE_1_7B))
    assert speech == pytest.approx(SPEECH, rel=1e-3) and image == pytest.approx(IMAGE_1_7B, rel=1e-3)
    peak = max(speech, key=speech.get)
    assert 8 <= peak <= 16 and 1.5 <= speech[peak] <= 3.0
    assert speech[32] < speech[peak]
    assert image[1] < image[4] < image[16] and image[16] > 2 * speech[32]


def test_each_speech_boundary_adds_every_messages_send_and_receive_cost(tmp_path):
    """All-to-all at each of the 8 boundaries (4 forward, 4 backward): every machine sends
    and receives m - 1 messages, and each costs 15 us of its CPU on the critical path."""
    data = tomllib.loads(TOPOLOGY.read_text())
    del data["machine"]["cpu"]["op_costs"]
    (tmp_path / "free.toml").write_text(dump_toml(data))
    study, m = load_study("distbelief_fig3"), 4
    step = {}
    for name, topo in (("costed", "distbelief-2012"), ("free", str(tmp_path / "free.toml"))):
        sc = study.scenario("distbelief-speech", m)
        sc["cluster"]["topology"], sc["parallel"]["model_parallel"] = topo, m
        step[name] = clustersim.simulate(sc, speedup=False).step_time_s
    assert step["costed"] - step["free"] == pytest.approx(2 * (m - 1) * 8 * 15e-6, rel=1e-6)


@pytest.mark.slow
def test_the_1_7b_model_on_81_machines():
    """The paper: "more than 12x using 81 machines"; simulated 8.96x (see 025)."""
    image = speedups("distbelief-image-1.7b", (1, 81))
    assert image[81] == pytest.approx(8.955, rel=1e-3)
