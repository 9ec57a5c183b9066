"""A sweep's job: one run, trained (or resumed) and then evaluated, wherever it runs: in a
process of this machine (``scripts/reproduce.py``) or on a Ray worker (``cluster``)."""

from __future__ import annotations

import os
import signal
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from .config import TrainConfig
from .model import get_variant
from .runs import Run


@dataclass(frozen=True)
class Job:
    """One run of a sweep. ``baseline``: the run of the pretrained baseline it starts from,
    which must be finished first."""

    name: str
    config: TrainConfig
    run_dir: Path
    baseline: Path | None = None


class Interrupted(RuntimeError):
    """The job's training was stopped by a signal after saving its checkpoint."""


def run_job(
    job: Job,
    evaluations: list[dict],
    runs_dir: str | Path,
    threads: int = 1,
    re_evaluate: bool = False,
    device: str = "cpu",
    data_dir: str | Path | None = None,
    images: dict[str, torch.Tensor] | None = None,
    log: Callable[[str], None] = print,
    on_checkpoint: Callable[[dict], None] | None = None,
    on_evaluation: Callable[[dict, int | None], None] | None = None,
) -> dict:
    """Train ``job`` (unless finished) and evaluate it as ``evaluations`` ask (split, samples,
    limit), reusing evaluations of its present weights unless ``re_evaluate``. ``images``
    (split -> ``(N, 784)``) replaces MNIST from ``data_dir``; ``on_checkpoint`` and
    ``on_evaluation`` hear of every checkpoint and evaluation saved. Returns the run's folder,
    how training ended and the evaluations; ``Interrupted`` if training was stopped."""
    from .evaluate import evaluate_run
    from .train import Status, train

    torch.set_num_threads(threads)
    images = images or {}
    run = Run(job.run_dir)
    result = train(
        job.config,
        run_dir=run.path,
        runs_dir=runs_dir,
        data_dir=data_dir,
        device=device,
        log=log,
        progress=False,
        images=images.get("train"),
        on_checkpoint=on_checkpoint,
    )
    if result.status is Status.interrupted:
        raise Interrupted("training was interrupted; run the same command to resume")
    out = {"run_dir": str(run.path), "train_status": result.status.value, "evaluations": []}
    for ev in evaluations:
        saved = saved_evaluation(run, job, ev)
        if saved is not None and not re_evaluate:
            out["evaluations"].append(saved)
            continue
        r = evaluate_run(
            run.path,
            samples=ev["samples"],
            split=ev["split"],
            limit=ev["limit"],
            data_dir=data_dir,
            device=device,
            images=images.get(ev["split"]),
            log=log,
            proposal="guide",  # the table's protocol, the reference's: the guide as trained
        )
        record = asdict(r)
        if on_evaluation is not None:
            on_evaluation(record, ev["limit"])
        out["evaluations"].append(record)
        log(f"evaluated {ev['split']}: NCLL {r.ncll:.3f} ± {r.ncll_se:.3f} in {r.seconds:.1f} s")
    return out


def saved_evaluation(run: Run, job: Job, ev: dict) -> dict | None:
    """The run's saved evaluation that ``ev`` (split, samples as asked, limit) asks for, if it
    is of the present weights: S as drawn (one for the deterministic baseline)."""
    samples = get_variant(job.config.variant).importance_samples(ev["samples"])
    return run.current_evaluation(ev["split"], samples, ev["limit"])


def run_logged(
    job: Job,
    runs_dir: str,
    data_dir: str | None,
    evaluations: list[dict],
    threads: int,
    re_evaluate: bool,
    device: str = "cpu",
) -> dict:
    """``run_job`` in a process of a pool, logging to the run's ``reproduce.log``; an error is
    returned, for the sweep's table, not raised."""
    run = Run(job.run_dir)
    run.path.mkdir(parents=True, exist_ok=True)
    with open(run.sweep_log_path, "a") as log_file:

        def log(msg: str) -> None:
            log_file.write(msg + "\n")
            log_file.flush()

        try:
            return run_job(
                job, evaluations, runs_dir, threads, re_evaluate, device, data_dir, log=log
            )
        except Interrupted as e:
            return {
                "run_dir": str(run.path),
                "error": str(e),
                "interrupted": True,
                "evaluations": [],
            }
        except Exception as e:  # reported in the table; the sweep goes on with the other runs
            log(traceback.format_exc())
            return {
                "run_dir": str(run.path),
                "error": f"{type(e).__name__}: {e}",
                "evaluations": [],
            }


def pool_worker_start() -> None:
    """A pool worker takes its signals from the driver alone (which passes on one SIGINT: stop
    after the step and save), not from the terminal's process group or a scheduler's SIGTERM."""
    os.setpgrp()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
