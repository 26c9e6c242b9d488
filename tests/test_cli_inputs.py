"""The clustersim command at its edges: stalled runs with --plot, plot file types,
topologies without routes, and counts that must be positive.  Each case runs the
command's main function and checks the exit code and what reaches stdout and stderr."""
from pathlib import Path

from clustersim.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOWNPOUR = str(ROOT / "scenarios" / "downpour.toml")
STALL = "faults.fail=[{machine=8, at_s=0.01}]"     # the shard on m8 fails: Downpour waits on it forever
PNG = b"\x89PNG\r\n\x1a\n"


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_stalled_run_with_plot_prints_its_summary_draws_and_exits_3(tmp_path, capsys):
    plot = tmp_path / "stalled.png"
    code, out, err = run(capsys, "simulate", DOWNPOUR, "--set", STALL, "--plot", plot)
    assert code == 3, err
    assert "STALLED          at 11.29 ms after 7 steps" in out and f"wrote plot: {plot}" in out
    assert err == ""
    assert plot.read_bytes()[:8] == PNG


def test_a_sweep_with_no_finished_point_skips_its_plot_in_one_line(tmp_path, capsys):
    plot = tmp_path / "sweep.png"
    code, out, err = run(capsys, "sweep", DOWNPOUR, "--set", "faults.fail=[{machine=8, at_s=0.001}]",
                         "--vary", "training.steps=50,100", "--plot", plot)
    assert out.count("stalled: waiting forever on parameter-server shard 0") == 2
    assert err == f"clustersim: no plot written to {plot}: no point ran to its end\n"
    assert not plot.exists()
    assert code == 0          # api.sweep: points that stall are rows, not bad input
