"""A small DistBelief Figure 3 (scenarios/studies/distbelief_fig3.py): a few points of the
speech and 1.7B sweeps against stored expected speed-ups, and the shape that holds on
1 GbE: the fully connected speech model stays below the paper's 2.2x peak (every layer
boundary moves a whole activation through each machine's 0.125 GB/s port, whatever the
machine count), the locally connected 1.7B model keeps gaining and leads at every count."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = json.loads((ROOT / "tests/data/distbelief_fig3_small.json").read_text())


def study():
    spec = importlib.util.spec_from_file_location("distbelief_fig3", ROOT / "scenarios/studies/distbelief_fig3.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def speedups(model: str, machines: tuple[int, ...]) -> dict[int, float]:
    return {p["machines"]: p["speedup"] for p in study().sweep_model(model, machines)}


def test_small_fig3_speech_saturates_and_the_image_model_keeps_gaining():
    speech = speedups("distbelief-speech", (1, 4, 8, 32))
    image = speedups("distbelief-image-1.7b", (1, 4, 16))
    assert speech == pytest.approx({int(k): v for k, v in EXPECTED["distbelief-speech"].items()}, rel=1e-3)
    assert image == pytest.approx({int(k): v for k, v in EXPECTED["distbelief-image-1.7b"].items() if k != "81"},
                                  rel=1e-3)
    assert 1.5 <= speech[4] <= 3.0 and max(speech.values()) < 2.2
    assert speech[32] / speech[8] < 1.1                     # a plateau: the network, not compute
    assert image[4] > speech[4] and image[16] > 2 * speech[32]
    assert image[1] < image[4] < image[16]


@pytest.mark.slow
def test_the_1_7b_model_on_81_machines():
    """The paper: "more than 12x using 81 machines"; simulated about 9x (see 011)."""
    image = speedups("distbelief-image-1.7b", (1, 81))
    assert image[81] == pytest.approx(EXPECTED["distbelief-image-1.7b"]["81"], rel=1e-2)
