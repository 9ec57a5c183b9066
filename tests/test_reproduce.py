import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

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
