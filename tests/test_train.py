import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

from pyro_cvae import train as train_mod
from pyro_cvae.cli import app
from pyro_cvae.config import TrainConfig
from pyro_cvae.runs import CHECKPOINT, RunError, load_run
from pyro_cvae.train import train

from .helpers import fake_images, train_tiny


def test_run_directory_holds_config_checkpoint_and_metrics(tmp_path):
    run_dir = tmp_path / "runs" / "joint-scratch"
    result = train_tiny(run_dir, epochs=2)
    assert result.status == "finished" and result.epochs_done == 2 and result.steps == 8
    config = json.loads((run_dir / "config.json").read_text())
    assert (
        config["variant"] == "joint-scratch" and config["batch_size"] == 16 and config["lr"] == 1e-3
    )
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2] and [m["step"] for m in lines] == [4, 8]
    assert all(abs(m["loss"] - m["recon"] - m["kl"]) < 1e-3 for m in lines)
    checkpoint = torch.load(run_dir / CHECKPOINT, weights_only=False)
    assert (
        checkpoint["epoch"] == 2
        and checkpoint["step"] == 8
        and "optimizer" in checkpoint
        and "rng" in checkpoint
    )
    assert not list(run_dir.glob(".*tmp*")), "no temporary files left behind"


def test_finished_run_is_not_retrained_unless_forced(tmp_path):
    run_dir = tmp_path / "runs" / "no-baseline"
    train_tiny(run_dir, "no-baseline")
    stamp = (run_dir / CHECKPOINT).stat().st_mtime_ns
    assert train_tiny(run_dir, "no-baseline").status == "already finished"
    assert (run_dir / CHECKPOINT).stat().st_mtime_ns == stamp
    config = TrainConfig(variant="no-baseline", epochs=1, batch_size=16, limit=64)
    forced = train(
        config,
        run_dir=run_dir,
        images=fake_images(64),
        progress=False,
        log=lambda m: None,
        force=True,
    )
    assert forced.status == "finished" and forced.steps == 4


def test_resume_continues_exactly_where_it_stopped(tmp_path):
    straight = tmp_path / "a" / "joint-scratch"
    train_tiny(straight, epochs=2)
    resumed = tmp_path / "b" / "joint-scratch"
    train_tiny(resumed, epochs=1)
    result = train_tiny(resumed, epochs=2)
    assert result.steps == 8
    a, _, ca = load_run(straight)
    b, _, cb = load_run(resumed)
    assert ca["step"] == cb["step"] == 8
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), f"{name} differs after resuming"
    sa, sb = ca["optimizer"]["state"], cb["optimizer"]["state"]
    assert all(torch.equal(sa[k]["exp_avg"], sb[k]["exp_avg"]) for k in sa)


def test_the_elbo_is_part_of_the_run(tmp_path):
    run_dir = tmp_path / "runs" / "joint-scratch"
    train_tiny(run_dir, elbo="iwae")
    config = json.loads((run_dir / "config.json").read_text())
    assert (
        config["elbo"] == "iwae"
        and config["particles"] == 5
        and config["guide_gradient"] == "reparam"
    )
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["elbo"] == "iwae" and record["particles"] == 5
    assert (
        record["recon"] > 0 and record["kl"] > 0 and record["loss"] < record["recon"] + record["kl"]
    )  # a tighter bound
    with pytest.raises(RunError, match=r"elbo: 'iwae' there, 'meanfield' asked"):
        train_tiny(run_dir, epochs=2, elbo="meanfield")
    assert (
        train_tiny(run_dir, epochs=2, elbo="iwae", particles=5).steps == 8
    )  # the same objective resumes


@pytest.mark.parametrize(
    "options,message",
    [
        ({"variant": "baseline", "elbo": "iwae"}, "no latent variable"),
        ({"elbo": "meanfield", "guide_gradient": "stl"}, "needs a Monte Carlo KL"),
        ({"elbo": "trace", "guide_gradient": "dreg"}, "use it with --elbo iwae"),
        (
            {"elbo": "meanfield", "guide_gradient": "rws"},
            "rws is for the importance-weighted bound",
        ),
        ({"elbo": "iwae", "particles": 1, "guide_gradient": "rws"}, "--particles 2 or more"),
        (
            {"variant": "hybrid", "elbo": "iwae", "guide_gradient": "rws"},
            "rws trains a recognition net",
        ),
        ({"elbo": "iwae", "particles": 0}, "--particles must be at least 1"),
        ({"elbo": "renyi"}, "--elbo must be one of meanfield, trace, iwae"),
    ],
)
def test_objectives_that_do_not_apply_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**options).validate()


def test_a_different_run_in_the_same_directory_is_refused(tmp_path):
    run_dir = tmp_path / "runs" / "joint-scratch"
    train_tiny(run_dir)
    with pytest.raises(
        RunError, match=r"holds a different run \(lr: 0.001 there, 0.01 asked\).*--force"
    ):
        train_tiny(run_dir, lr=0.01)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    run_dir = tmp_path / "runs" / "joint-scratch"
    train_tiny(run_dir, epochs=1)
    good = torch.load(run_dir / CHECKPOINT, weights_only=False)
    real = train_mod.objective_backward
    calls = {"n": 0}

    def exploding(*args, **kwargs):
        calls["n"] += 1
        terms = real(*args, **kwargs)
        if calls["n"] == 2:
            terms["loss"] = float("nan")
        return terms

    monkeypatch.setattr(train_mod, "objective_backward", exploding)
    with pytest.raises(RunError, match=r"loss became nan at step 5 .*last good checkpoint"):
        train_tiny(run_dir, epochs=2)
    kept = torch.load(run_dir / CHECKPOINT, weights_only=False)
    assert kept["step"] == good["step"] == 4
    assert all(torch.equal(kept["model"][k], good["model"][k]) for k in good["model"])


def test_pretrained_baseline_is_trained_first_when_missing(tmp_path):
    messages = []
    config = TrainConfig(variant="cvae", epochs=1, batch_size=16, limit=64)
    train(
        config,
        run_dir=tmp_path / "runs" / "cvae",
        runs_dir=tmp_path / "runs",
        images=fake_images(64),
        progress=False,
        log=messages.append,
    )
    assert any("training it first" in m for m in messages)
    baseline, _, _ = load_run(tmp_path / "runs" / "baseline")
    cvae, _, _ = load_run(tmp_path / "runs" / "cvae")
    # the frozen copy inside the CVAE is the pretrained net
    for p, q in zip(baseline.baseline_net.parameters(), cvae.baseline_net.parameters()):
        assert torch.equal(p, q)
    messages.clear()
    train(
        TrainConfig(variant="joint-pretrained", epochs=1, batch_size=16, limit=64),
        runs_dir=tmp_path / "runs",
        images=fake_images(64),
        progress=False,
        log=messages.append,
    )
    assert any("using the pretrained baseline" in m for m in messages)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--variant", "nope"], "'nope' is not one of"),
        (["--epochs", "0"], "--epochs"),
        (["--batch-size", "0"], "--batch-size"),
        (["--lr", "0"], "--lr"),
        (["--lr", "-1e-3"], "--lr"),
        (["--inputs", "4"], "--inputs"),
        (["--mask", "diagonal"], "'diagonal' is not one of"),
        (["--device", "tpu"], "'tpu' is not one of"),
    ],
)
def test_cli_refuses_bad_options(args, message, tmp_path):
    result = CliRunner().invoke(app, ["train", "--runs-dir", str(tmp_path), *args])
    assert result.exit_code == 2
    assert (
        message in " ".join(result.output.split()).replace("│", "").replace("  ", " ")
        or message in result.output
    )
    assert not list(tmp_path.iterdir()), "nothing written for a refused command"


def test_interrupted_run_saves_and_resumes_exactly(mnist_dir, tmp_path):
    """Ctrl-C stops after the current step with a consistent checkpoint; the same command resumes
    and ends with exactly the weights of an uninterrupted run."""
    args = [
        "train",
        "--variant",
        "baseline",
        "--limit",
        "3200",
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--threads",
        "1",
        "--no-progress",
        "--data-dir",
        str(mnist_dir),
    ]
    cmd = [sys.executable, "-m", "pyro_cvae", *args, "--runs-dir", str(tmp_path / "a")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 60
    while not (tmp_path / "a" / "baseline" / "config.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "interrupted at step" in out and "resume" in out
    checkpoint = torch.load(tmp_path / "a" / "baseline" / CHECKPOINT, weights_only=False)
    assert 0 < checkpoint["step"] < 800 and (checkpoint["batch"] > 0 or checkpoint["epoch"] == 1)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "resuming" in done.stdout
    straight = subprocess.run(
        [sys.executable, "-m", "pyro_cvae", *args, "--runs-dir", str(tmp_path / "b")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert straight.returncode == 0, straight.stdout + straight.stderr
    a, _, ca = load_run(tmp_path / "a" / "baseline")
    b, _, cb = load_run(tmp_path / "b" / "baseline")
    assert ca["step"] == cb["step"] == 800
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    metrics = [
        json.loads(line)
        for line in (tmp_path / "a" / "baseline" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [m["epoch"] for m in metrics] == [1, 2] and all(m["loss"] > 0 for m in metrics)


def test_fixed_masks_name_their_runs_and_baselines(tmp_path, mnist_dir):
    runner = CliRunner()
    common = ["--runs-dir", str(tmp_path), "--data-dir", str(mnist_dir)]
    result = runner.invoke(
        app,
        [
            "train",
            "--variant",
            "cvae",
            "--mask",
            "fixed",
            "--inputs",
            "2",
            "--epochs",
            "1",
            "--limit",
            "64",
            "--no-progress",
            "--threads",
            "1",
            *common,
        ],
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cvae-fixed2" / "checkpoint.pt").exists() and (
        tmp_path / "baseline-fixed2" / "checkpoint.pt"
    ).exists()
    assert json.loads((tmp_path / "cvae-fixed2" / "config.json").read_text())["inputs"] == 2
    result = runner.invoke(
        app,
        [
            "evaluate",
            "--variant",
            "cvae",
            "--mask",
            "fixed",
            "--inputs",
            "2",
            "--samples",
            "2",
            "--limit",
            "10",
            "--proposal",
            "guide",
            "--threads",
            "1",
            *common,
        ],
    )
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "cvae-fixed2" / "eval-test-S2-n10-seed0.json").read_text())
    assert saved["mask"] == "fixed" and saved["inputs"] == 2 and saved["images"] == 10


def test_extending_or_forcing_a_run_removes_its_stale_results(tmp_path):
    run_dir = tmp_path / "runs" / "no-baseline"
    train_tiny(run_dir, "no-baseline")
    (run_dir / "eval-test-S5.json").write_text("{}")
    (run_dir / "samples-test.png").write_bytes(b"png")
    train_tiny(run_dir, "no-baseline", epochs=2)
    assert (
        not (run_dir / "eval-test-S5.json").exists() and not (run_dir / "samples-test.png").exists()
    )
    (run_dir / "eval-test-S5.json").write_text("{}")
    assert train_tiny(run_dir, "no-baseline", epochs=2).status == "already finished"
    assert (run_dir / "eval-test-S5.json").exists(), "a finished run keeps its results"


def test_variants_command_lists_the_registry():
    result = CliRunner().invoke(app, ["variants"])
    assert result.exit_code == 0
    for name in ("baseline", "joint-scratch", "gsnn", "hybrid", "67.813", "112.382"):
        assert name in result.output
