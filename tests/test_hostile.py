"""A run directory from elsewhere, a scheduler's signals, sizes that cannot fit and inputs of the
wrong kind: no code run, nothing lost, one true line for each."""

import builtins
import importlib
import os
import signal

import pytest
import torch
from typer.testing import CliRunner

from pyro_cvae import train as train_module
from pyro_cvae.cli import app
from pyro_cvae.runs import CHECKPOINT, LOCK, RunError, load_run
from pyro_cvae.train import Status

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


# ------------------------------------------------------------------ a scheduler's signals


@pytest.fixture
def killed_by_default():
    """SIGTERM and SIGHUP end the process, as by default, but as SystemExit(-N) (how Popen
    reports a kill), so that code that does not handle them fails the test, not the test run."""

    def die(signum, frame):
        raise SystemExit(-signum)

    previous = {s: signal.signal(s, die) for s in (signal.SIGTERM, signal.SIGHUP)}
    yield
    for s, handler in previous.items():
        signal.signal(s, handler)


def _signal_on_call(monkeypatch, module, name: str, signum: int, at: int = 1):
    """Make ``module.name`` send this process ``signum`` on its ``at``-th call, then do its work."""
    real = getattr(module, name)
    calls = []

    def signalled(*args, **kwargs):
        calls.append(1)
        if len(calls) == at:
            os.kill(os.getpid(), signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, signalled)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_or_sighup_in_training_saves_a_checkpoint_and_says_so(
    tmp_path, mnist_dir, monkeypatch, killed_by_default, signum
):
    _signal_on_call(monkeypatch, train_module, "train_step", signum, at=3)
    run_dir = tmp_path / "runs" / "no-baseline"
    result = CliRunner().invoke(
        app,
        [
            *["train", "--variant", "no-baseline", "--limit", "64", "--batch-size", "16"],
            *["--epochs", "2", "--no-progress", "--data-dir", str(mnist_dir)],
            *["--run-dir", str(run_dir)],
        ],
    )
    assert result.exit_code == 128 + signum, result.output
    assert f"interrupted at step 3 ({signal.Signals(signum).name}): checkpoint saved" in (
        result.output
    )
    checkpoint = torch.load(run_dir / CHECKPOINT, weights_only=True)
    assert (checkpoint["epoch"], checkpoint["batch"], checkpoint["step"]) == (0, 3, 3)
    assert not (run_dir / LOCK).exists()
    monkeypatch.undo()
    resumed = train_tiny(run_dir, "no-baseline", epochs=2, n=64)
    assert resumed.status is Status.finished


@pytest.mark.parametrize(
    "command,module,name,signum",
    [
        (
            ["evaluate", "--samples", "2", "--limit", "8"],
            "pyro_cvae.evaluate",
            "ncll_per_image",
            signal.SIGINT,
        ),
        (
            ["evaluate", "--samples", "2", "--limit", "8"],
            "pyro_cvae.evaluate",
            "ncll_per_image",
            signal.SIGTERM,
        ),
        (
            ["sample", "--num-images", "2", "--num-samples", "2"],
            "pyro_cvae.sample",
            "render_grid",
            signal.SIGHUP,
        ),
        (["plot"], "pyro_cvae.atomic", "os", None),
    ],
)
def test_a_signal_in_evaluate_sample_or_plot_leaves_nothing_partial(
    finished, mnist_dir, monkeypatch, killed_by_default, command, module, name, signum
):
    before = sorted(p.name for p in finished.parent.rglob("*"))
    if name == "os":  # plot: the signal comes while the picture is being written
        signum = signal.SIGTERM
        real_replace = os.replace

        class SignalledOs:
            def __getattr__(self, attr):
                return getattr(os, attr)

            @staticmethod
            def replace(src, dst):
                os.kill(os.getpid(), signal.SIGTERM)
                return real_replace(src, dst)

        monkeypatch.setattr(module + ".os", SignalledOs())
    else:
        _signal_on_call(monkeypatch, importlib.import_module(module), name, signum)
    extra = ["--data-dir", str(mnist_dir)] if command[0] != "plot" else []
    where = (
        ["--runs-dir", str(finished.parent)]
        if command[0] == "plot"
        else ["--run-dir", str(finished)]
    )
    result = CliRunner().invoke(app, [*command, *where, *extra])
    line = _one_line_error(result, 128 + signum, "interrupted", "nothing was written")
    assert "checkpoint" not in line, "evaluate, sample and plot save no checkpoint"
    assert sorted(p.name for p in finished.parent.rglob("*")) == before, "no file, no temporary"
