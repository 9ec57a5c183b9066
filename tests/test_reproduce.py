import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_reproduce_trains_evaluates_and_writes_the_table(tmp_path, mnist_dir):
    runs = tmp_path / "runs"
    cmd = [sys.executable, str(ROOT / "scripts" / "reproduce.py"), "--variants", "cvae", "unconditioned-prior",
           "--epochs", "1", "--limit", "64", "--samples", "2", "--test-images", "20", "--train-images", "20",
           "--jobs", "2", "--runs-dir", str(runs), "--data-dir", str(mnist_dir)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's package, whatever is installed
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    results = json.loads((runs / "results.json").read_text())
    by_run = {r["run"]: r for r in results["runs"]}
    # the pretrained baseline that cvae needs is trained too, first
    assert set(by_run) == {"baseline", "cvae", "unconditioned-prior"}
    for r in by_run.values():
        assert r["epochs"] == 1 and r["test"]["images"] == 20 and r["train"]["images"] == 20
    assert by_run["baseline"]["test"]["samples"] == 1 and by_run["cvae"]["test"]["samples"] == 2
    table = (runs / "results.md").read_text()
    assert "| cvae | 1 |" in table and "72.255" in table
    assert all(line.count("|") == 10 for line in table.splitlines() if line.startswith("|"))
    # a second invocation trains and evaluates nothing again
    stamp = (runs / "cvae" / "checkpoint.pt").stat().st_mtime_ns
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert second.returncode == 0, second.stdout + second.stderr
    assert (runs / "cvae" / "checkpoint.pt").stat().st_mtime_ns == stamp
    again = {r["run"]: r for r in json.loads((runs / "results.json").read_text())["runs"]}
    assert again["cvae"]["test"]["ncll"] == by_run["cvae"]["test"]["ncll"]
