"""A run directory from elsewhere, a scheduler's signals, sizes that cannot fit and inputs of the
wrong kind: no code run, nothing lost, one true line for each."""

import builtins

import pytest
import torch
from typer.testing import CliRunner

from pyro_cvae.cli import app
from pyro_cvae.runs import CHECKPOINT, RunError, load_run

from .helpers import train_tiny


def _one_line_error(result, code: int, *phrases: str) -> str:
    """The CLI ended with ``code``, no traceback, and one line naming ``phrases``."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def finished(tmp_path):
    run_dir = tmp_path / "runs" / "no-baseline"
    train_tiny(run_dir, "no-baseline")
    return run_dir


# ------------------------------------------------------------------ no code runs from a run folder


class _Payload:
    """Pickles as a call to ``open(marker, "w")``: loading it with pickle creates the marker."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


@pytest.fixture
def booby_trapped(finished, tmp_path):
    """A run whose checkpoint is a good one plus an object that runs code when unpickled."""
    marker = tmp_path / "code-ran"
    checkpoint = torch.load(finished / CHECKPOINT, weights_only=True)
    torch.save({**checkpoint, "note": _Payload(marker)}, finished / CHECKPOINT)
    assert not marker.exists()
    return finished, marker


def test_todays_checkpoints_load_as_weights_only(tmp_path):
    """model and optimiser state, counters, the RNG state, config, metrics and a mid-epoch
    "partial" record: all plain data."""
    run_dir = tmp_path / "runs" / "joint-scratch"
    train_tiny(run_dir, epochs=1)
    checkpoint = torch.load(run_dir / CHECKPOINT, weights_only=True)
    checkpoint["partial"] = {
        "sums": {"loss": 1.0, "recon": 0.5, "kl": 0.5},
        "count": 2,
        "seconds": 0.1,
    }
    torch.save(checkpoint, run_dir / CHECKPOINT)
    cvae, config, loaded = load_run(run_dir)
    assert config.variant == "joint-scratch" and loaded["partial"]["count"] == 2
    assert isinstance(loaded["metrics"], list) and loaded["metrics"][0]["epoch"] == 1


@pytest.mark.parametrize(
    "command",
    [
        ["evaluate", "--run-dir", "{run}", "--samples", "2"],
        ["sample", "--run-dir", "{run}"],
        ["train", "--variant", "no-baseline", "--run-dir", "{run}", "--epochs", "2"],
    ],
)
def test_a_checkpoint_that_would_run_code_is_refused_in_one_line(booby_trapped, command):
    run_dir, marker = booby_trapped
    args = [a.format(run=run_dir) for a in command]
    _one_line_error(CliRunner().invoke(app, args), 1, "could run code", "refused")
    assert not marker.exists()


def test_no_command_or_api_runs_the_code_of_a_checkpoint(booby_trapped, tmp_path):
    run_dir, marker = booby_trapped
    runs_dir = run_dir.parent
    runner = CliRunner()
    for args in (
        ["evaluate", "--runs-dir", str(runs_dir), "--samples", "2"],
        ["sample", "--runs-dir", str(runs_dir)],
        ["plot", "--runs-dir", str(runs_dir), "--out", str(tmp_path / "plots.png")],
    ):
        result = runner.invoke(app, args)
        assert "Traceback" not in result.output and not marker.exists(), args
    with pytest.raises(RunError, match="could run code"):
        load_run(run_dir)
    with pytest.raises(RunError, match="could run code"):
        train_tiny(run_dir, "no-baseline", epochs=2)
    assert not marker.exists()
