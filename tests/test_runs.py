"""The run directory under a hostile user: nothing lost, nothing mixed, one line for each mistake."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from pyro_cvae import data, lock
from pyro_cvae.atomic import atomic_write_text
from pyro_cvae.cli import app
from pyro_cvae.config import TrainConfig
from pyro_cvae.evaluate import evaluate_run
from pyro_cvae.lock import LOCK, LOCK_MARK
from pyro_cvae.plots import plot_runs
from pyro_cvae.runs import CHECKPOINT, CONFIG, METRICS, Run, RunError, load_run
from pyro_cvae.train import Status, train

from .helpers import fake_images, one_line_error, train_tiny


def _snapshot(run_dir):
    return {p.name: p.read_bytes() for p in sorted(run_dir.iterdir()) if p.is_file()}


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.fixture
def finished(tmp_path):
    """A finished no-baseline run with an evaluation and a sample grid beside it."""
    run_dir = tmp_path / "runs" / "no-baseline"
    train_tiny(run_dir, "no-baseline")
    evaluate_run(
        run_dir,
        samples=2,
        images=fake_images(8),
        device="cpu",
        log=lambda m: None,
        proposal="guide",
    )
    (run_dir / "samples-test.png").write_bytes(b"png")
    return run_dir


# ------------------------------------------------------------------ nothing lost


@pytest.mark.parametrize("options", [["--force"], ["--epochs", "2"]])
def test_force_or_more_epochs_with_a_wrong_data_dir_keeps_the_run(finished, tmp_path, options):
    before = _snapshot(finished)
    args = [
        "train",
        "--variant",
        "no-baseline",
        "--runs-dir",
        str(finished.parent),
        "--limit",
        "64",
        "--batch-size",
        "16",
        "--epochs",
        "1",
        "--data-dir",
        str(tmp_path / "typo"),
        "--no-progress",
        *options,
    ]
    one_line_error(CliRunner().invoke(app, args), 1, "MNIST not found")
    assert _snapshot(finished) == before, "the trained run is untouched"


def test_force_replaces_the_old_run_only_when_its_first_checkpoint_is_written(
    finished, monkeypatch
):
    old = torch.load(finished / CHECKPOINT, weights_only=False)
    config = TrainConfig(variant="no-baseline", epochs=1, batch_size=16, limit=64, seed=3)
    result = train(
        config,
        run_dir=finished,
        images=fake_images(64),
        progress=False,
        log=lambda m: None,
        force=True,
    )
    assert result.status is Status.finished
    new = torch.load(finished / CHECKPOINT, weights_only=False)
    assert new["config"]["seed"] == 3 and new["run_id"] != old["run_id"]
    assert json.loads((finished / CONFIG).read_text())["seed"] == 3
    assert len((finished / METRICS).read_text().splitlines()) == 1
    assert not list(finished.glob("eval-*")) and not list(finished.glob("samples-*")), (
        "results of the old weights"
    )


@pytest.mark.parametrize("flocked", [False, True])
def test_a_second_trainer_is_refused_naming_the_holder(finished, flocked):
    """A live holder: its pid and its flock (or, for a lock without the flock mark, written
    where flock is missing or by an older version, its pid alone)."""
    (finished / LOCK).write_text(f"{os.getppid()}{LOCK_MARK if flocked else ''}\n")
    with open(finished / LOCK) as held:
        if flocked:
            fcntl = pytest.importorskip("fcntl")
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        before = _snapshot(finished)
        with pytest.raises(
            RunError, match=rf"being trained by process {os.getppid()}; wait for it"
        ):
            train_tiny(finished, "no-baseline", epochs=2)
        assert _snapshot(finished) == before


def test_a_flock_lock_whose_flock_is_free_is_stale_even_if_its_pid_lives_again(finished):
    """A pid can be reused by an unrelated process after a crash; the flock cannot outlive its
    process, so for a lock marked as flocked, the flock, not the pid, says whether the run is held."""
    pytest.importorskip("fcntl")
    (finished / LOCK).write_text(
        f"{os.getppid()}{LOCK_MARK}\n"
    )  # a live pid, but nobody holds the flock
    assert train_tiny(finished, "no-baseline", epochs=2).status is Status.finished
    assert not (finished / LOCK).exists()


def test_without_flock_the_pid_decides(finished, monkeypatch):
    monkeypatch.setattr(lock, "fcntl", None)
    (finished / LOCK).write_text(f"{os.getppid()}\n")
    with pytest.raises(RunError, match="being trained by process"):
        train_tiny(finished, "no-baseline", epochs=2)
    (finished / LOCK).write_text(f"{_dead_pid()}\n")
    assert train_tiny(finished, "no-baseline", epochs=2).status is Status.finished
    assert not (finished / LOCK).exists() and not list(finished.glob(".train.lock*"))


def test_the_lock_of_a_training_run_is_flocked_and_released(finished):
    fcntl = pytest.importorskip("fcntl")
    seen = {}

    def inside(*_args, **_kwargs):  # called while the run is locked
        with open(finished / LOCK) as f:
            seen["content"] = f.read()
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                seen["free"] = True
            except BlockingIOError:
                seen["free"] = False

    with Run(finished).lock():
        inside()
    assert seen == {"content": f"{os.getpid()}{LOCK_MARK}\n", "free": False}
    assert not (finished / LOCK).exists() and not list(finished.glob(".train.lock*"))


def test_a_stale_lock_of_a_dead_process_is_taken_over(finished):
    (finished / LOCK).write_text(f"{_dead_pid()}\n")
    assert train_tiny(finished, "no-baseline", epochs=2).status is Status.finished
    assert not (finished / LOCK).exists(), "the lock goes with the process"


def test_two_trainers_at_once_one_trains_the_other_is_refused(tmp_path, mnist_dir):
    args = [
        sys.executable,
        "-m",
        "pyro_cvae",
        "train",
        "--variant",
        "baseline",
        "--limit",
        "3200",
        "--epochs",
        "3",
        "--batch-size",
        "8",
        "--threads",
        "1",
        "--no-progress",
        "--data-dir",
        str(mnist_dir),
        "--runs-dir",
        str(tmp_path),
    ]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while not (tmp_path / "baseline" / LOCK).exists() and time.time() < deadline:
        time.sleep(0.05)
    second = subprocess.run(args, capture_output=True, text=True, timeout=120)
    first.send_signal(signal.SIGINT)
    first.communicate(timeout=120)
    assert second.returncode == 1 and "Traceback" not in second.stderr
    assert f"being trained by process {first.pid}" in second.stderr


def test_the_checkpoint_is_the_truth_not_an_edited_config_json(tmp_path):
    run_dir = tmp_path / "runs" / "joint-scratch"
    train_tiny(run_dir)
    edited = {
        **json.loads((run_dir / CONFIG).read_text()),
        "variant": "hybrid",
        "hybrid_weight": 0.5,
    }
    (run_dir / CONFIG).write_text(json.dumps(edited))
    messages = []
    r = evaluate_run(run_dir, samples=2, images=fake_images(8), device="cpu", log=messages.append)
    assert r.variant == "joint-scratch" and load_run(run_dir)[1].variant == "joint-scratch"
    assert any("does not match the checkpoint" in m for m in messages)
    (run_dir / CONFIG).write_text('{"epochs": "abc"}')  # hand-edited beyond repair
    assert train_tiny(run_dir).status is Status.already_finished
    assert json.loads((run_dir / CONFIG).read_text())["variant"] == "joint-scratch", (
        "train repairs the copy"
    )


def test_an_evaluation_of_part_of_a_split_or_another_seed_keeps_the_full_one(finished):
    full = json.loads((finished / "eval-test-S2.json").read_text())
    evaluate_run(
        finished,
        samples=2,
        limit=4,
        seed=7,
        images=fake_images(8),
        device="cpu",
        log=lambda m: None,
        proposal="guide",
    )
    assert json.loads((finished / "eval-test-S2.json").read_text()) == full
    part = json.loads((finished / "eval-test-S2-n4-seed7.json").read_text())
    assert part["images"] == 4 and part["seed"] == 7
    run = Run(finished)
    assert run.best_evaluation("test") == full and run.current_evaluation("test", 2, 4, 7) == part
    # more samples on fewer images is a different protocol: the plot keeps the whole split
    evaluate_run(
        finished,
        samples=5,
        limit=4,
        images=fake_images(8),
        device="cpu",
        log=lambda m: None,
        proposal="guide",
    )
    assert run.best_evaluation("test") == full


def test_results_of_other_weights_do_not_count(finished):
    stale = json.loads((finished / "eval-test-S2.json").read_text())
    train_tiny(finished, "no-baseline", epochs=2)
    (finished / "eval-test-S2.json").write_text(
        json.dumps(stale)
    )  # e.g. a kill before it was removed
    assert Run(finished).best_evaluation("test") is None


def test_a_pretrained_baseline_on_other_data_is_refused(tmp_path):
    runs = tmp_path / "runs"
    train_tiny(runs / "baseline", "baseline", n=32)  # a smoke run: --limit 32
    with pytest.raises(
        RunError,
        match=r"baseline in .* trained on other data \(limit 32\) than this run asks "
        r"\(limit 64\).*--force",
    ):
        train_tiny(runs / "cvae", "cvae", n=64)
    assert not (runs / "cvae").exists()


def test_atomic_writes_go_through_a_symlink_to_its_target(tmp_path, finished):
    target = tmp_path / "elsewhere" / "plots.png"
    target.parent.mkdir()
    target.write_text("old")
    link = tmp_path / "link.png"
    link.symlink_to(target)
    plot_runs(finished.parent, out=link)
    assert link.is_symlink() and target.read_bytes().startswith(b"\x89PNG")
    atomic_write_text("new", link)
    assert link.is_symlink() and target.read_text() == "new"


def test_temporary_files_of_a_killed_writer_are_cleaned_up(finished):
    leftover = finished / f".{CHECKPOINT}.tmp{_dead_pid()}"
    leftover.write_bytes(b"half a checkpoint")
    train_tiny(finished, "no-baseline", epochs=2)
    assert not leftover.exists()


def test_a_kill_between_checkpoint_and_metrics_loses_no_metrics_line(tmp_path, monkeypatch):
    run_dir = tmp_path / "runs" / "no-baseline"
    train_tiny(run_dir, "no-baseline", epochs=1)

    real = Run.write_copies

    def killed(self, checkpoint):
        if checkpoint["epoch"] == 2:  # right after the epoch's checkpoint was saved
            raise SystemExit("kill -9")
        real(self, checkpoint)

    with monkeypatch.context() as m:
        m.setattr(Run, "write_copies", killed)
        with pytest.raises(SystemExit):
            train_tiny(run_dir, "no-baseline", epochs=2)
    assert len((run_dir / METRICS).read_text().splitlines()) == 1, "the kill came before the line"
    assert [r["epoch"] for r in Run(run_dir).read_metrics()] == [1, 2]
    assert train_tiny(run_dir, "no-baseline", epochs=2).status is Status.already_finished
    assert [json.loads(line)["epoch"] for line in (run_dir / METRICS).read_text().splitlines()] == [
        1,
        2,
    ]


# ------------------------------------------------------------------ one line, not a traceback


def test_a_full_disk_while_saving_a_checkpoint_is_one_line(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise RuntimeError(
            "[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing file"
        )

    monkeypatch.setattr(torch, "save", full)
    run_dir = tmp_path / "runs" / "no-baseline"
    with pytest.raises(
        RunError, match=r"cannot save .*checkpoint.pt .*no checkpoint was written.*Free disk space"
    ):
        train_tiny(run_dir, "no-baseline")
    assert not run_dir.exists() and not run_dir.parent.exists(), (
        "a failed train leaves no empty run directory"
    )


@pytest.mark.parametrize(
    "content,problem", [({"model": {}}, "no optimizer, epoch"), ([1, 2], "a list, not a dict")]
)
def test_a_malformed_checkpoint_is_named(finished, content, problem):
    torch.save(content, finished / CHECKPOINT)
    for attempt in (
        lambda: train_tiny(finished, "no-baseline", epochs=2),
        lambda: load_run(finished),
    ):
        with pytest.raises(
            RunError, match=rf"not a checkpoint of this program \({problem}.*--force"
        ):
            attempt()


def test_a_saved_config_of_the_wrong_type_is_named():
    with pytest.raises(ValueError, match="epochs is 'abc', not an integer"):
        TrainConfig.from_dict({"variant": "cvae", "epochs": "abc"})
    # runs saved before options that do not apply were refused stored their defaults
    legacy = TrainConfig.from_dict(
        {"variant": "joint-scratch", "mask": "random", "inputs": 1, "hybrid_weight": 0.5}
    )
    assert legacy.inputs is None and legacy.hybrid_weight is None


def _wait_for(condition, proc: subprocess.Popen, seconds: float = 120) -> None:
    """Poll ``condition`` until it holds; fail if the process ends first or it never does."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert proc.poll() is None, f"the command ended first: {proc.communicate()}"
        assert time.monotonic() < deadline, "the state never came"
        time.sleep(0.01)


def _torch_loading(pid: int) -> bool:
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_ctrl_c_while_the_command_starts_is_one_line(tmp_path, signum):
    """Ctrl-C, a scheduler's SIGTERM or a closed terminal's SIGHUP while torch loads: the command
    ends on it (no training started), in one line, with 128 + the signal's number."""
    pytest.importorskip("fcntl")  # POSIX signals and /proc
    if not Path("/proc/self/maps").exists():
        pytest.skip("no /proc to see the imports under way")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyro_cvae", "train", "--runs-dir", str(tmp_path / "runs")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # interrupt once torch's library is loading: the heavy imports are under way, the run is not started
        _wait_for(lambda: _torch_loading(proc.pid), proc)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 128 + signum, out + err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "interrupted" in err and "from scratch" not in out
    assert not (tmp_path / "runs").exists()


def test_a_run_terminated_as_it_starts_leaves_no_lock(tmp_path, mnist_dir):
    """SIGTERM while the run is locked and its data load: the lock goes, and the run folder with it."""
    run_dir = tmp_path / "runs" / "baseline"
    proc = subprocess.Popen(
        [
            *[sys.executable, "-m", "pyro_cvae", "train", "--variant", "baseline"],
            *["--limit", "64", "--batch-size", "8", "--threads", "1", "--no-progress"],
            *["--data-dir", str(mnist_dir), "--run-dir", str(run_dir)],
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(lambda: (run_dir / LOCK).exists(), proc)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 143 and "Traceback" not in err, out + err
    assert "interrupted" in out + err
    assert not (run_dir / LOCK).exists()
    assert not run_dir.exists() or (run_dir / CHECKPOINT).is_file(), (
        "a folder holding only the lock"
    )


# ------------------------------------------------------------------ messages that say what is wrong


def test_a_diverging_lr_gives_the_divergence_message(tmp_path, recwarn):
    run_dir = tmp_path / "runs" / "no-baseline"
    with pytest.raises(
        RunError, match=r"loss became nan .*no checkpoint had been written.*smaller --lr"
    ) as e:
        train_tiny(run_dir, "no-baseline", lr=1e30)
    assert not [w for w in recwarn if "NaN" in str(w.message)], "no warning before the message"
    assert "tensor" not in str(e.value) and not run_dir.exists()


def test_an_unreadable_file_is_not_called_corrupt(tmp_path, monkeypatch, finished):
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(data.gzip, "open", denied)
    with pytest.raises(data.DataError, match=r"\(Permission denied\); check its permissions") as e:
        data.read_idx(tmp_path / "train-labels-idx1-ubyte.gz", "train-labels-idx1-ubyte")
    assert "corrupt" not in str(e.value)
    monkeypatch.setattr(torch, "load", denied)
    with pytest.raises(RunError, match=r"\(Permission denied\); check its permissions"):
        load_run(finished)


def test_a_data_dir_that_is_a_file_says_so(tmp_path):
    (tmp_path / "mnist.tar").write_bytes(b"")
    with pytest.raises(data.DataError, match="is a file, not a folder"):
        data.load_split("train", tmp_path / "mnist.tar")


@pytest.mark.parametrize(
    "args,phrase",
    [
        (["--seed", "-1"], "--seed"),
        (["--seed", "18446744073709551616"], "--seed"),
        (["--inputs", "2"], "--inputs 2 applies to --mask fixed only"),
        (
            ["--variant", "cvae", "--hybrid-weight", "0.3"],
            "--hybrid-weight applies to --variant hybrid only",
        ),
        (["--variant", "hybrid", "--hybrid-weight", "1.5"], "--hybrid-weight must lie in [0, 1]"),
        (["--lr", "nan"], "--lr"),
    ],
)
def test_train_refuses_options_it_would_ignore_or_could_not_use(args, phrase, tmp_path):
    one_line_error(
        CliRunner().invoke(app, ["train", "--runs-dir", str(tmp_path), *args]), 2, phrase
    )
    assert not list(tmp_path.iterdir()), "nothing written for a refused command"


@pytest.mark.parametrize(
    "args,phrase",
    [
        (["--mask", "fixed", "--inputs", "3"], "not --mask fixed"),
        (["--variant", "cvae"], "not --variant cvae"),
        (["--seed", "-1"], "--seed"),
    ],
)
@pytest.mark.parametrize("command", ["evaluate", "sample"])
def test_options_naming_another_run_than_run_dir_are_refused(finished, command, args, phrase):
    result = CliRunner().invoke(app, [command, "--run-dir", str(finished), *args])
    one_line_error(result, 2, phrase)


def test_evaluate_prints_the_ncll_it_cannot_save(finished, monkeypatch):
    def full(self, record, limit):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Run, "write_evaluation", full)
    with pytest.raises(
        RunError,
        match=r"NCLL \d+\.\d+ ± \d+\.\d+ \(8 test images, S=2, refined proposal\) could not be saved .*No space",
    ):
        evaluate_run(finished, samples=2, images=fake_images(8), device="cpu", log=lambda m: None)
