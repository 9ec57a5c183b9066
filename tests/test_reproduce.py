import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from pyro_cvae.runs import Run

ROOT = Path(__file__).resolve().parents[1]
ENV = {
    **os.environ,
    "PYTHONPATH": str(ROOT),
}  # the scripts import this checkout's package, whatever is installed


def test_reproduce_trains_evaluates_and_writes_the_table(tmp_path, mnist_dir):
    runs = tmp_path / "runs"
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "reproduce.py"),
        "--variants",
        "cvae",
        "unconditioned-prior",
        "--epochs",
        "1",
        "--limit",
        "64",
        "--samples",
        "2",
        "--test-images",
        "20",
        "--train-images",
        "20",
        "--jobs",
        "2",
        "--runs-dir",
        str(runs),
        "--data-dir",
        str(mnist_dir),
    ]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert first.returncode == 0, first.stdout + first.stderr
    # its output is a pipe: a plain line per run finished and a progress line, no bar
    assert {"baseline: done", "cvae: done", "unconditioned-prior: done"} <= set(
        first.stdout.splitlines()
    )
    assert re.search(
        r"^reproduce: 3/3 epochs \(100%\), 3/3 runs done, [\d.]+ epochs/s, ETA", first.stdout, re.M
    )
    assert "━" not in first.stdout
    results = json.loads((runs / "results.json").read_text())
    by_run = {r["run"]: r for r in results["runs"]}
    # the pretrained baseline that cvae needs is trained too, first
    assert set(by_run) == {"baseline", "cvae", "unconditioned-prior"}
    for r in by_run.values():
        assert r["epochs"] == 1 and r["test"]["images"] == 20 and r["train"]["images"] == 20
    assert by_run["baseline"]["test"]["samples"] == 1 and by_run["cvae"]["test"]["samples"] == 2
    table = (runs / "results.md").read_text()
    assert "| cvae | 1 |" in table and "72.255" in table
    assert all(line.count("|") == 11 for line in table.splitlines() if line.startswith("|"))
    # a second invocation trains and evaluates nothing again
    stamp = (runs / "cvae" / "checkpoint.pt").stat().st_mtime_ns
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert second.returncode == 0, second.stdout + second.stderr
    assert (runs / "cvae" / "checkpoint.pt").stat().st_mtime_ns == stamp
    again = {r["run"]: r for r in json.loads((runs / "results.json").read_text())["runs"]}
    assert again["cvae"]["test"]["ncll"] == by_run["cvae"]["test"]["ncll"]


def test_reproduce_over_seeds_names_each_run_by_its_seed_and_summarises_them(tmp_path, mnist_dir):
    runs = tmp_path / "runs"
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "reproduce.py"),
        "--variants",
        "no-baseline",
        "--seeds",
        "0",
        "3",
        "--epochs",
        "1",
        "--limit",
        "64",
        "--samples",
        "2",
        "--test-images",
        "20",
        "--train-images",
        "0",
        "--jobs",
        "2",
        "--runs-dir",
        str(runs),
        "--data-dir",
        str(mnist_dir),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((runs / "results.json").read_text())
    by_run = {r["run"]: r for r in results["runs"]}
    assert set(by_run) == {"no-baseline", "no-baseline-seed3"}
    assert json.loads((runs / "no-baseline-seed3" / "config.json").read_text())["seed"] == 3
    a, b = by_run["no-baseline"]["test"]["ncll"], by_run["no-baseline-seed3"]["test"]["ncll"]
    assert a != b  # another initialisation, data order and masks: another model
    [summary] = results["over_seeds"]
    assert summary["group"] == "no-baseline" and summary["seeds"] == [0, 3]
    assert (
        abs(summary["test"]["mean"] - (a + b) / 2) < 1e-9
        and abs(summary["test"]["sd"] - abs(a - b) / 2**0.5) < 1e-9
    )
    assert summary["train"] is None
    assert (
        f"| no-baseline | 0, 3 | {(a + b) / 2:.2f} ± {abs(a - b) / 2**0.5:.2f} | - |"
        in (runs / "results.md").read_text()
    )


def _wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_sigterm_is_passed_to_the_workers_which_save_and_a_rerun_resumes(tmp_path, mnist_dir):
    runs = tmp_path / "runs"
    run = runs / "no-baseline"
    cmd = [sys.executable, str(ROOT / "scripts" / "reproduce.py"), "--variants", "no-baseline"]
    cmd += ["--epochs", "8", "--limit", "1000", "--no-eval", "--jobs", "1"]
    cmd += ["--runs-dir", str(runs), "--data-dir", str(mnist_dir)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV
    )
    worker = None
    try:
        # the state to act on: the worker holds the run and has saved its first epoch
        assert _wait_for(lambda: (run / "metrics.jsonl").is_file(), 120), "no epoch saved"
        worker = int((run / "train.lock").read_text().split()[0])
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if worker is not None and _wait_for(lambda: not _alive(worker), 30) is False:
            os.kill(worker, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "stopped by SIGTERM" in out and "run the same command to resume" in out, out
    assert not _alive(worker)  # no orphan left training, holding the run
    assert not (run / "train.lock").exists()
    assert not (runs / "results.md").exists()  # no error table written over the results
    log = (run / "reproduce.log").read_text()
    assert "interrupted at step" in log, log  # it stopped after a step and saved there
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resuming" in (run / "reproduce.log").read_text()
    assert Run(run).read_checkpoint()["epoch"] == 8


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


def test_bad_counts_are_one_line_naming_the_option(tmp_path):
    for option, value, named in [
        ("--threads", "0", "--threads must be at least 1"),
        ("--test-images", "0", "--test-images must be at least 1"),
    ]:
        cmd = [sys.executable, str(ROOT / "scripts" / "reproduce.py"), option, value]
        done = subprocess.run(
            cmd + ["--runs-dir", str(tmp_path)],
            capture_output=True,
            text=True,
            timeout=120,
            env=ENV,
        )
        assert done.returncode == 2
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and named in lines[0] and "--limit" not in lines[0], done.stderr


def _reproduce(runs: Path, mnist_dir: Path, *argv: str) -> subprocess.CompletedProcess:
    """A tiny sweep: 1 epoch on 64 images, S=2 on the first 10 test images, no train split."""
    cmd = [sys.executable, str(ROOT / "scripts" / "reproduce.py"), *argv]
    cmd += ["--epochs", "1", "--limit", "64", "--samples", "2", "--test-images", "10"]
    cmd += ["--train-images", "0", "--runs-dir", str(runs), "--data-dir", str(mnist_dir)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def _stamps(run: Path) -> dict[str, int]:
    """The modification time of each evaluation and tuned proposal of a run."""
    return {
        p.name: p.stat().st_mtime_ns
        for p in run.iterdir()
        if p.name.startswith("eval-") or p.name == "proposal-tuned.pt"
    }


def test_reproduce_evaluates_each_proposal_asked_once_and_reuses_it(tmp_path, mnist_dir):
    runs, run = tmp_path / "runs", tmp_path / "runs" / "no-baseline"
    argv = ["--variants", "no-baseline", "--jobs", "1", "--proposals", "guide", "refined"]
    refine = ["--refine-steps", "2", "--refine-particles", "2"]
    _reproduce(runs, mnist_dir, *argv, *refine)
    results = json.loads((runs / "results.json").read_text())
    assert results["proposals"] == ["guide", "refined"]
    [row] = results["runs"]
    guide, refined = row["proposals"]["guide"]["test"], row["proposals"]["refined"]["test"]
    assert guide["proposal"] == "guide" and refined["proposal"] == "refined"
    assert refined["proposal_id"] == "refined from guide: Refine(steps=2, particles=2, lr=0.01)"
    assert row["test"] == guide  # the first proposal asked
    files = {"eval-test-S2-n10-seed0.json", "eval-test-S2-n10-seed0-refined.json"}
    assert set(_stamps(run)) == files
    assert (
        json.loads((run / "eval-test-S2-n10-seed0-refined.json").read_text())["ncll"]
        == (refined["ncll"])
    )
    table = (runs / "results.md").read_text().splitlines()
    header = next(line for line in table if line.startswith("| run |"))
    assert "| guide: NCLL test ± SE |" in header and "| refined: NCLL test ± SE |" in header
    assert header.index("guide:") < header.index("reference (train)") < header.index("refined:")
    [line] = [line for line in table if line.startswith("| no-baseline |")]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert len(cells) == header.count("|") - 1
    assert f"{guide['ncll']:.2f} ± {guide['ncll_se']:.2f}" == cells[2]
    assert f"{refined['ncll']:.2f} ± {refined['ncll_se']:.2f}" in cells[7:]
    assert cells[5] == "-"  # S=2 on 10 images: no difference from the reference's S=100 figure
    # a second invocation computes neither again
    stamps = _stamps(run)
    _reproduce(runs, mnist_dir, *argv, *refine)
    assert _stamps(run) == stamps
    again = json.loads((runs / "results.json").read_text())["runs"][0]["proposals"]
    assert again["refined"]["test"]["ncll"] == refined["ncll"]
    # other refine options are another proposal: refined again, the guide's kept
    _reproduce(runs, mnist_dir, *argv, "--refine-steps", "3", "--refine-particles", "2")
    after = _stamps(run)
    assert after["eval-test-S2-n10-seed0.json"] == stamps["eval-test-S2-n10-seed0.json"]
    assert (
        after["eval-test-S2-n10-seed0-refined.json"] > stamps["eval-test-S2-n10-seed0-refined.json"]
    )


def test_reproduce_fits_the_tuned_proposal_once_and_marks_what_a_run_cannot_have(
    tmp_path, mnist_dir
):
    runs, run = tmp_path / "runs", tmp_path / "runs" / "no-baseline"
    argv = ["--variants", "baseline", "no-baseline", "--jobs", "2"]
    argv += ["--proposals", "guide", "tuned", "refined", "--refine-steps", "2"]
    _reproduce(runs, mnist_dir, *argv)
    tuned = torch.load(run / "proposal-tuned.pt", weights_only=True)
    assert tuned["step"] == Run(run).read_checkpoint()["step"] and tuned["images"] == 64
    by_run = {r["run"]: r for r in json.loads((runs / "results.json").read_text())["runs"]}
    evaluated = by_run["no-baseline"]["proposals"]
    assert evaluated["tuned"]["test"]["proposal_id"] == f"tuned {tuned['id']}"
    assert evaluated["refined"]["test"]["proposal_id"].startswith(
        f"refined from tuned {tuned['id']}"
    )
    # the baseline has no latent: its exact NCLL under the guide, n/a under the others
    assert by_run["baseline"]["proposals"]["guide"]["test"]["samples"] == 1
    assert "not_applicable" in by_run["baseline"]["proposals"]["tuned"]
    table = (runs / "results.md").read_text()
    [line] = [line for line in table.splitlines() if line.startswith("| baseline |")]
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[2] != "n/a" and cells.count("n/a") == 6  # two NCLL and an ESS for each of two
    assert "n/a: the proposal does not apply to the run" in table
    assert "baseline has no latent: its NCLL is exact, under guide (tuned, refined)" in table
    assert (
        "tuned proposal: none fitted to this checkpoint; fitting one"
        in (run / "reproduce.log").read_text()
    )
    # a second invocation fits nothing and evaluates nothing again
    stamps = _stamps(run)
    _reproduce(runs, mnist_dir, *argv)
    assert _stamps(run) == stamps
    assert torch.load(run / "proposal-tuned.pt", weights_only=True)["id"] == tuned["id"]
    assert "tuned proposal: the run's current one, kept" in (run / "reproduce.log").read_text()


def test_a_bad_proposal_is_one_line_before_anything_trains(tmp_path, mnist_dir):
    runs = tmp_path / "runs"
    for argv, named in [
        (["--proposals", "guide", "tuend"], "--proposals tuend: no such proposal"),
        (["--variants", "baseline", "--proposals", "refined"], "none of the variants asked"),
        (["--variants", "gsnn", "--proposals", "tuned"], "gsnn has no recognition net"),
    ]:
        cmd = [sys.executable, str(ROOT / "scripts" / "reproduce.py"), *argv]
        cmd += ["--runs-dir", str(runs), "--data-dir", str(mnist_dir)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=ENV)
        assert done.returncode == 2, done.stdout + done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and named in lines[0], done.stderr
        assert "drop" in lines[0] or "choose among" in lines[0]  # and the fix
        assert not runs.exists()  # nothing trained
