"""scripts/reproduce.py --address: the sweep on a real Ray cluster (two nodes on this machine,
started by ray.cluster_utils.Cluster, each with its own temporary folder), and its signals."""

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import ray
import torch
from ray.cluster_utils import Cluster

from pyro_cvae.config import TrainConfig
from pyro_cvae.data import load_split
from pyro_cvae.runs import Run
from pyro_cvae.train import train

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def _reproduce():
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "scripts" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


reproduce = _reproduce()


def _tiny(runs: Path, mnist_dir: Path, *variants: str, epochs: int = 2) -> list[str]:
    return [
        "--variants",
        *variants,
        "--epochs",
        str(epochs),
        "--limit",
        "64",
        "--samples",
        "2",
        "--test-images",
        "20",
        "--train-images",
        "0",
        "--runs-dir",
        str(runs),
        "--data-dir",
        str(mnist_dir),
    ]


@pytest.fixture(scope="module")
def nodes():
    """Two Ray nodes of one CPU each, each with its own temporary folder (its workers' scratch)."""
    roots = [Path(tempfile.mkdtemp(prefix="pcr")) for _ in range(2)]
    cluster = None
    try:
        options = [
            {
                "num_cpus": 1,
                "object_store_memory": 300 * 1024 * 1024,
                "env_vars": {"TMPDIR": str(root)},
            }
            for root in roots
        ]
        cluster = Cluster(initialize_head=True, head_node_args=options[0])
        cluster.add_node(**options[1])
        cluster.wait_for_nodes()
        yield cluster, roots
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        for root in roots:
            shutil.rmtree(root, ignore_errors=True)


def _metrics(run_dir: Path) -> list[dict]:
    return [
        {k: r[k] for k in ("epoch", "step", "loss", "recon", "kl")}
        for r in Run(run_dir).read_metrics()
    ]


def test_a_baseline_and_its_variant_on_ray_equal_the_sweep_without_it(
    nodes, tmp_path, mnist_dir, capsys
):
    cluster, _ = nodes
    here, there = tmp_path / "here", tmp_path / "ray"
    assert reproduce.main(_tiny(here, mnist_dir, "cvae") + ["--jobs", "2"]) == 0
    capsys.readouterr()
    assert reproduce.main(_tiny(there, mnist_dir, "cvae") + ["--address", cluster.address]) == 0
    out = capsys.readouterr().out
    for name in ("baseline", "cvae"):  # same losses, epoch by epoch; same NCLL
        assert _metrics(there / name) == _metrics(here / name)
        for epoch in (1, 2):  # each epoch trained once: the baseline is not trained twice
            assert out.count(f"{name}: epoch {epoch}/2, loss") == 1, out
    rows = {
        s: {r["run"]: r for r in json.loads((d / "results.json").read_text())["runs"]}
        for s, d in (("here", here), ("ray", there))
    }
    for name in ("baseline", "cvae"):
        assert rows["ray"][name]["test"]["ncll"] == rows["here"][name]["test"]["ncll"]
        assert rows["ray"][name]["test"]["run_dir"] == str(there / name)
        assert rows["ray"][name]["ran_on"]  # where it ran, in results.json and results.md
    assert "| cvae | 2 |" in (there / "results.md").read_text()


def test_jobs_run_on_both_nodes_and_every_file_lands_on_the_driver(nodes, tmp_path, mnist_dir):
    cluster, roots = nodes
    runs = tmp_path / "runs"
    argv = _tiny(runs, mnist_dir, "no-baseline", "unconditioned-prior", epochs=1)
    assert reproduce.main(argv + ["--address", cluster.address]) == 0
    results = json.loads((runs / "results.json").read_text())["runs"]
    places = {place for r in results for place in r["ran_on"]}
    assert len(places) == 2, places  # one job on each node (each has one CPU)
    for name in ("no-baseline", "unconditioned-prior"):
        files = {p.name for p in (runs / name).iterdir()}
        assert {"checkpoint.pt", "config.json", "metrics.jsonl", "reproduce.log"} <= files
        assert any(f.startswith("eval-test-S") for f in files), files
        assert "train.lock" not in files
        assert Run(runs / name).is_finished()
    assert {"results.md", "results.json"} <= {p.name for p in runs.iterdir()}
    for root in roots:  # the workers' scratch folders are gone
        assert not list(root.glob("pyro-cvae-job-*"))


def test_a_worker_killed_after_its_first_checkpoint_is_retried_and_resumes_exactly(
    nodes, tmp_path, mnist_dir
):
    cluster, _ = nodes
    runs = tmp_path / "runs"
    killed = []

    def kill_once(job, checkpoint, where):
        # the worker waits for this write: it dies after its first checkpoint, before epoch 2
        if not killed:
            killed.append(where["pid"])
            os.kill(where["pid"], signal.SIGKILL)

    argv = _tiny(runs, mnist_dir, "no-baseline", epochs=3) + ["--no-eval"]
    assert reproduce.main(argv + ["--address", cluster.address], on_saved=kill_once) == 0
    assert killed
    log = (runs / "no-baseline" / "reproduce.log").read_text()
    assert "resuming" in log and "at epoch 2" in log, log
    reference = tmp_path / "uninterrupted"
    config = TrainConfig(variant="no-baseline", epochs=3, limit=64)
    images, _ = load_split("train", mnist_dir, 64)
    train(
        config, run_dir=reference, images=images, progress=False, log=lambda m: None, device="cpu"
    )
    ours, theirs = Run(runs / "no-baseline").read_checkpoint(), Run(reference).read_checkpoint()
    assert ours["step"] == theirs["step"] and ours["epoch"] == 3
    for key, value in theirs["model"].items():
        assert torch.equal(ours["model"][key], value), key


def _stamps(run: Path) -> dict[str, int]:
    return {
        p.name: p.stat().st_mtime_ns
        for p in run.iterdir()
        if p.name.startswith("eval-") or p.name == "proposal-tuned.pt"
    }


def test_proposals_travel_with_the_job_and_its_tuned_proposal_lands_on_the_driver(
    nodes, tmp_path, mnist_dir
):
    cluster, _ = nodes
    runs, run = tmp_path / "runs", tmp_path / "runs" / "no-baseline"
    argv = _tiny(runs, mnist_dir, "no-baseline", epochs=1) + ["--address", cluster.address]
    assert reproduce.main(argv + ["--proposals", "guide", "tuned"]) == 0
    tuned = torch.load(run / "proposal-tuned.pt", weights_only=True)  # fitted by the worker
    assert tuned["step"] == Run(run).read_checkpoint()["step"]
    [row] = json.loads((runs / "results.json").read_text())["runs"]
    assert row["proposals"]["tuned"]["test"]["proposal_id"] == f"tuned {tuned['id']}"
    assert row["proposals"]["guide"]["test"]["proposal"] == "guide"
    stamps = _stamps(run)
    # adding refined: the worker computes it alone, from the driver's tuned proposal
    more = ["--proposals", "guide", "tuned", "refined", "--refine-steps", "2"]
    assert reproduce.main(argv + more) == 0
    after = _stamps(run)
    assert {name: after[name] for name in stamps} == stamps  # nothing fitted or evaluated again
    [added] = set(after) - set(stamps)
    refined = json.loads((run / added).read_text())
    assert refined["proposal"] == "refined"
    assert refined["proposal_id"].startswith(f"refined from tuned {tuned['id']}")
    [row] = json.loads((runs / "results.json").read_text())["runs"]
    assert row["proposals"]["refined"]["test"]["ncll"] == refined["ncll"]


def test_an_unreachable_address_is_one_line_within_seconds(tmp_path, mnist_dir):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    cmd = [sys.executable, str(ROOT / "scripts" / "reproduce.py")]
    cmd += _tiny(tmp_path / "runs", mnist_dir, "cvae") + ["--address", f"127.0.0.1:{port}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=ENV)
    assert done.returncode == 1
    assert time.monotonic() - started < 30
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"no Ray cluster answers at 127.0.0.1:{port}" in lines[0], (
        done.stderr
    )
    assert not (tmp_path / "runs").exists()  # nothing was started
