"""A run directory from elsewhere, a scheduler's signals, sizes that cannot fit and inputs of the
wrong kind: no code run, nothing lost, one true line for each."""

import builtins
import importlib
import io
import json
import math
import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
import torchvision
from rich.console import Console
from typer.testing import CliRunner

from pyro_cvae import console as console_module
from pyro_cvae import data
from pyro_cvae import train as train_module
from pyro_cvae.cli import app
from pyro_cvae.evaluate import evaluate_run, evaluate_runs, ncll_per_image
from pyro_cvae.plots import plot_runs
from pyro_cvae.references import comparable
from pyro_cvae.runs import CHECKPOINT, LOCK, Run, RunError, load_run
from pyro_cvae.sample import completions
from pyro_cvae.train import Status

from .helpers import fake_images, one_line_error, train_tiny


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
    one_line_error(CliRunner().invoke(app, args), 1, "could run code", "refused")
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


def test_with_no_run_named_a_refused_run_is_left_out_saying_why(booby_trapped, tmp_path):
    trapped, marker = booby_trapped
    runs_dir = tmp_path / "mixed"
    shutil.copytree(trapped, runs_dir / "trapped")
    train_tiny(runs_dir / "no-baseline", "no-baseline", epochs=1)
    said = {}
    for command, args in (
        ("evaluate", ["--samples", "2", "--limit", "4", "--proposal", "guide"]),
        ("sample", ["--out", str(tmp_path / "all.png")]),
    ):
        result = CliRunner().invoke(app, [command, "--runs-dir", str(runs_dir), *args])
        assert result.exit_code == 0, result.output
        said[command] = " ".join(result.output.split())
        assert "trapped left out:" in said[command] and "could run code" in said[command]
    assert "no-baseline" in said["evaluate"].split("left out")[-1]  # the good run is evaluated
    assert (tmp_path / "all.png").is_file() and not marker.exists()


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
            "_ncll_drawn",
            signal.SIGINT,
        ),
        (
            ["evaluate", "--samples", "2", "--limit", "8"],
            "pyro_cvae.evaluate",
            "_ncll_drawn",
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
    line = one_line_error(result, 128 + signum, "interrupted", "nothing was written")
    assert "checkpoint" not in line, "evaluate, sample and plot save no checkpoint"
    assert sorted(p.name for p in finished.parent.rglob("*")) == before, "no file, no temporary"


# ------------------------------------------------------------------ outputs and folders not ours


@pytest.mark.parametrize(
    "name", ["checkpoint.pt", "config.json", "metrics.jsonl", "eval-test-S2.json"]
)
@pytest.mark.parametrize("command", ["sample", "plot"])
def test_out_never_replaces_a_file_of_a_run(finished, command, name):
    if name.startswith("eval-"):
        (finished / name).write_text("{}")
    before = (finished / name).read_bytes()
    where = (
        ["--run-dir", str(finished)]
        if command == "sample"
        else ["--runs-dir", str(finished.parent)]
    )
    for force in ([], ["--force"]):
        result = CliRunner().invoke(app, [command, *where, "--out", str(finished / name), *force])
        one_line_error(result, 2, "file of the run", "choose another path")
        assert (finished / name).read_bytes() == before


def test_out_replaces_a_file_not_ours_only_with_force(finished, tmp_path):
    mine = tmp_path / "notes.png"
    mine.write_text("my notes")
    args = ["plot", "--runs-dir", str(finished.parent), "--out", str(mine)]
    one_line_error(CliRunner().invoke(app, args), 2, "not a picture this program wrote", "--force")
    assert mine.read_text() == "my notes"
    assert CliRunner().invoke(app, [*args, "--force"]).exit_code == 0
    assert CliRunner().invoke(app, args).exit_code == 0, "our own picture is replaced freely"


def test_train_into_a_folder_of_other_files_is_refused_and_deletes_nothing(tmp_path):
    folder = tmp_path / "my-figures"
    folder.mkdir()
    for name in ("samples-test.png", "eval-test-S100.json", "notes.txt"):
        (folder / name).write_text(name)
    with pytest.raises(
        RunError, match=r"is not a run but holds files \(eval-test-S100.json, notes"
    ):
        train_tiny(folder, "no-baseline")
    assert sorted(p.name for p in folder.iterdir()) == [
        "eval-test-S100.json",
        "notes.txt",
        "samples-test.png",
    ]


def test_a_run_dir_that_is_a_file_or_a_dangling_link_says_so(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(RunError, match=r"file is a file, not a folder"):
        train_tiny(a_file, "no-baseline")
    link = tmp_path / "runs"
    link.symlink_to(tmp_path / "gone")
    with pytest.raises(RunError, match=r"runs is a symbolic link to .*gone, which does not exist"):
        train_tiny(link / "no-baseline", "no-baseline")
    for command in ("evaluate", "plot"):
        one_line_error(
            CliRunner().invoke(app, [command, "--runs-dir", str(a_file)]),
            1,
            "is a file, not a folder",
        )


def test_a_long_out_name_is_written(finished, tmp_path):
    out = tmp_path / ("p" * 247 + ".png")  # 251 characters: its temporary name would be too long
    result = CliRunner().invoke(
        app, ["plot", "--runs-dir", str(finished.parent), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert out.read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["runs", out.name])


# ------------------------------------------------------------------ sizes that cannot fit


def test_particles_that_cannot_fit_are_refused_before_allocating(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"--particles 100000000 with --batch-size 16 .* needs about .* GB.* at most --particles \d+ fits",
    ):
        train_tiny(tmp_path / "runs" / "cvae-iwae", "cvae-iwae", particles=100_000_000)
    assert not (tmp_path / "runs").exists()


def test_sample_sizes_that_cannot_be_drawn_are_refused_before_work(finished):
    result = CliRunner().invoke(
        app, ["sample", "--run-dir", str(finished), "--num-samples", "10000000"]
    )
    one_line_error(result, 2, "--num-samples 10000000 makes a picture", "ask for at most 724")


def test_an_evaluation_chunk_that_cannot_fit_is_refused(tiny_run):
    cvae, _, _ = load_run(tiny_run)
    images, hidden = fake_images(2), torch.ones(2, 784, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"a chunk of 2,000,000,000 rows .* needs about .* GB"):
        ncll_per_image(cvae, images, hidden, samples=10**9, image_batch=2, max_rows=10**12)


@pytest.mark.parametrize(
    "command", [["evaluate", "--samples", "2"], ["train", "--variant", "no-baseline"]]
)
def test_a_limit_beyond_the_split_is_refused(tmp_path, mnist_dir, finished, command):
    where = (
        ["--run-dir", str(finished)]
        if command[0] == "evaluate"
        else ["--runs-dir", str(tmp_path / "new")]
    )
    result = CliRunner().invoke(
        app, [*command, *where, "--limit", "100000000", "--data-dir", str(mnist_dir)]
    )
    one_line_error(result, 1, "--limit 100000000 asks for 100000000 of", "at most")


# ------------------------------------------------------------------ the API checks its inputs


@pytest.mark.parametrize(
    "images,hidden,expected",
    [
        (lambda: fake_images(3) * 255, None, r"must lie in \[0, 1\].*divide by 255"),
        (lambda: fake_images(3), lambda: torch.zeros(3, 784, dtype=torch.bool), "hides no pixel"),
        (lambda: fake_images(1)[0], None, r"shape \(N, 784\).*unsqueeze\(0\)"),
        (lambda: fake_images(3).double(), None, r"float32.*got torch.float64.*images.float\(\)"),
        (lambda: (fake_images(3) * 255).to(torch.uint8), None, r"got torch.uint8.*/ 255"),
        (lambda: fake_images(0), None, "empty batch"),
        (lambda: fake_images(3), lambda: torch.ones(3, 784), "bool mask.*got torch.float32"),
    ],
)
def test_the_api_names_what_it_expected(tiny_run, images, hidden, expected):
    cvae, _, _ = load_run(tiny_run)
    images = images()
    hidden = hidden() if hidden else torch.ones(images.shape, dtype=torch.bool)
    for call in (
        lambda: ncll_per_image(cvae, images, hidden, 2),
        lambda: completions(cvae, images, hidden, 2),
    ):
        with pytest.raises(ValueError, match=expected):
            call()


def test_load_split_limit_is_positive_and_within_the_split(mnist_dir):
    for limit in (-5, 0, 10_001):
        with pytest.raises(ValueError, match=f"--limit {limit} asks for"):
            data.load_split("test", mnist_dir, limit=limit)


# ------------------------------------------------------------------ files of a run, checked


# a quiet S=2 evaluation of the eight generated digits, with the guide
QUIET_S2 = dict(
    samples=2, images=fake_images(8), device="cpu", log=lambda m: None, proposal="guide"
)


def _saved_evaluation(run_dir):
    return json.loads((run_dir / "eval-test-S2.json").read_text())


@pytest.fixture
def evaluated(finished):
    evaluate_run(finished, **QUIET_S2)
    return finished


def test_a_copied_run_is_listed_under_its_own_name(evaluated):
    copy = evaluated.parent / "copy"
    shutil.copytree(evaluated, copy)
    results = evaluate_runs(evaluated.parent, **QUIET_S2)
    assert sorted(Path(r.run_dir).name for r, reused in results) == ["copy", "no-baseline"]
    assert all(reused for _, reused in results)


@pytest.mark.parametrize(
    "field,value",
    [
        ("samples", "1e999"),
        ("ncll", "1e308"),
        ("ncll", "NaN"),
        ("epochs", '"x"'),
        ("images", '"[/]"'),
    ],
)
def test_a_saved_evaluation_with_wrong_values_is_not_believed(evaluated, field, value):
    path = evaluated / "eval-test-S2.json"
    record = _saved_evaluation(evaluated)
    text = json.dumps({**record, field: "PLACEHOLDER"}).replace('"PLACEHOLDER"', value)
    path.write_text(text)
    assert Run(evaluated).current_evaluation("test", 2) is None
    assert Run(evaluated).best_evaluation("test") is None
    plot_runs(evaluated.parent)  # no traceback
    [(result, reused)] = evaluate_runs(evaluated.parent, **QUIET_S2)
    assert not reused and math.isfinite(result.ncll), "evaluated again, not reused"


def test_a_run_named_with_markup_is_printed_as_it_is(tmp_path, mnist_dir, monkeypatch):
    run_dir = tmp_path / "runs" / "x[/]"
    result = CliRunner().invoke(
        app,
        [
            *["train", "--variant", "no-baseline", "--limit", "64", "--batch-size", "16"],
            *["--epochs", "1", "--data-dir", str(mnist_dir), "--run-dir", str(run_dir)],
        ],
    )
    assert result.exit_code == 0, result.output
    assert f"training {run_dir} from scratch" in result.output and "x[/]" in result.output
    Progress = console_module.Progress
    with Progress("x[/]", 2, out=Console(file=io.StringIO(), force_terminal=True)) as bar:
        bar.update(1, "[/] run")


@pytest.fixture
def alarm():
    """Fail a test that hangs (a FIFO opened for reading waits for a writer forever)."""

    def hung(signum, frame):  # pytest's Failed is no OSError: no except clause swallows it
        pytest.fail("hung: a FIFO was opened for reading")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize(
    "name", ["config.json", "eval-test-S2.json", "metrics.jsonl", "train.lock"]
)
def test_a_fifo_in_a_run_folder_does_not_hang(evaluated, name, alarm):
    (evaluated / name).unlink(missing_ok=True)
    os.mkfifo(evaluated / name)
    load_run(evaluated, log=lambda m: None)
    assert (Run(evaluated).best_evaluation("test") is None) == (name == "eval-test-S2.json")
    plot_runs(evaluated.parent)
    if name == "train.lock":
        assert train_tiny(evaluated, "no-baseline", epochs=2).status is Status.finished


def test_a_reference_difference_only_for_the_reference_protocol(finished, mnist_dir):
    result = CliRunner().invoke(
        app,
        [
            *["evaluate", "--runs-dir", str(finished.parent), "--samples", "2", "--limit", "8"],
            *["--data-dir", str(mnist_dir)],
        ],
    )
    row = [line for line in result.output.splitlines() if "71.36" in line]
    assert row and "71.36" in row[0], result.output
    assert not re.search(r"[+-]\d+\.\d\d", row[0].split("71.36")[1]), "no difference from it"
    assert comparable("no-baseline", 10_000, 100) and not comparable("no-baseline", 8, 2)
    assert comparable("baseline", 10_000, 1), "a deterministic run draws one sample"


# ------------------------------------------------------------------ the data and its cache


def test_a_changed_file_is_verified_again_even_with_its_mtime_restored(tmp_path, mnist_dir):
    stem = "t10k-labels-idx1-ubyte"
    raw = data._read_bytes(
        data.find_file(mnist_dir, stem)
    )  # uncompressed: a change reaches md5 alone
    copy = tmp_path / stem
    copy.write_bytes(raw)
    assert data.read_idx(copy, stem)[1] == "verified now"
    assert data.read_idx(copy, stem)[1] == "verified before"
    before = copy.stat()
    time.sleep(0.05)  # past the file system's clock tick, as any real edit is
    with open(copy, "r+b") as f:  # the same size, another label for the last image
        f.seek(len(raw) - 1)
        f.write(bytes([raw[-1] ^ 1]))
    os.utime(copy, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert copy.stat().st_mtime_ns == before.st_mtime_ns
    with pytest.raises(data.DataError, match="md5"):
        data.read_idx(copy, stem)


def test_a_missing_home_is_not_created(tmp_path, monkeypatch, mnist_dir):
    home = tmp_path / "nonexistent" / "x"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    data.read_idx(data.find_file(mnist_dir, "t10k-labels-idx1-ubyte"), "t10k-labels-idx1-ubyte")
    with pytest.raises(data.DataError, match=r"home folder .*x does not exist"):
        data.load_split("test")
    assert not (tmp_path / "nonexistent").exists()


def test_a_failed_download_leaves_no_empty_folders(tmp_path, monkeypatch):
    monkeypatch.delenv(data.DATA_ENV, raising=False)

    class Offline:
        def __init__(self, root, train, download):
            (Path(root) / "MNIST" / "raw").mkdir(parents=True, exist_ok=True)
            raise OSError("no network")

    monkeypatch.setattr(torchvision.datasets, "MNIST", Offline)
    with pytest.raises(data.DataError, match="downloading failed"):
        data.load_split("test")
    assert not data.cache_dir().exists()
