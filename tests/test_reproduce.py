import json
import os
import re
import subprocess
import sys
from pathlib import Path

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
