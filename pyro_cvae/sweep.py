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
from .proposals import filed_kind, plan, tune_proposal, unavailable
from .runs import Run, RunError, load_checkpoint_file


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
    on_tuned: Callable[[dict], None] | None = None,
) -> dict:
    """Train ``job`` (unless finished) and evaluate it as ``evaluations`` ask (split, samples,
    limit, proposal: ``guide`` when not named, and ``refine``: ``config.Refine``), in their order,
    leaving out those its variant cannot have (``proposals.unavailable``) and reusing
    evaluations of its present weights and proposal unless ``re_evaluate``. When a ``tuned``
    evaluation is asked, the run's tuned proposal is fitted first (as ``pyro-cvae
    tune-proposal`` fits it, its default budget) unless it has a current one, before any
    evaluation that uses it (``refined`` starts from it). ``images`` (split -> ``(N, 784)``)
    replaces MNIST from ``data_dir``; ``on_checkpoint``, ``on_evaluation`` and ``on_tuned`` hear
    of every checkpoint, evaluation and tuned proposal saved. Returns the run's folder, how
    training ended and the evaluations; ``Interrupted`` if training was stopped."""
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
    evaluations = wanted(job, evaluations)
    tune = any(proposal_of(ev) == "tuned" for ev in evaluations)
    for ev in evaluations:
        if tune and proposal_of(ev) != "guide":
            fitted = ensure_tuned(run, device, data_dir, images.get("train"), log)
            if fitted is not None and on_tuned is not None:  # read back only to hand it on
                on_tuned(load_checkpoint_file(fitted))
            tune = False
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
            # guide: the table's protocol, the reference's: the guide as trained
            proposal=proposal_of(ev),
            **({"refine": ev["refine"]} if ev.get("refine") is not None else {}),
        )
        record = asdict(r)
        if on_evaluation is not None:
            on_evaluation(record, ev["limit"])
        out["evaluations"].append(record)
        log(
            f"evaluated {ev['split']} with the {r.proposal} proposal: NCLL {r.ncll:.3f} ± "
            f"{r.ncll_se:.3f} in {r.seconds:.1f} s"
        )
    return out


def proposal_of(ev: dict) -> str:
    """The proposal an evaluation of a sweep asks for (``guide`` in sweeps that named none)."""
    return ev.get("proposal") or "guide"


def wanted(job: Job, evaluations: list[dict]) -> list[dict]:
    """The evaluations that ``job``'s variant can have (``proposals.unavailable``)."""
    variant = get_variant(job.config.variant)
    return [ev for ev in evaluations if unavailable(variant, proposal_of(ev)) is None]


def ensure_tuned(
    run: Run,
    device: str,
    data_dir: str | Path | None,
    images: torch.Tensor | None,
    log: Callable[[str], None],
) -> Path | None:
    """Fit the run's tuned proposal with ``pyro-cvae tune-proposal``'s function and its default
    budget, unless the run has one fitted to its present checkpoint: the saved file when one
    was fitted, None when the current one is kept."""
    try:
        run.read_tuned_proposal(run.read_checkpoint(mmap=True))
        log("tuned proposal: the run's current one, kept")
        return None
    except RunError:  # missing, unreadable or void: fitted (again)
        log("tuned proposal: none fitted to this checkpoint; fitting one")
    fitted = tune_proposal(run.path, data_dir=data_dir, device=device, images=images, log=log)
    log(f"tuned proposal: {fitted.steps} steps in {fitted.seconds:.1f} s, saved {fitted.path}")
    return fitted.path


def saved_evaluation(run: Run, job: Job, ev: dict) -> dict | None:
    """The run's saved evaluation that ``ev`` (split, samples as asked, limit, proposal) asks
    for, if it is of the present weights (S as drawn: one for the deterministic baseline) and,
    for a tuned or refined one, of the proposal the run would use now (the same tuned fit, the
    same refine options: ``proposals.plan``)."""
    variant = get_variant(job.config.variant)
    samples = variant.importance_samples(ev["samples"])
    kind = filed_kind(variant, proposal_of(ev)).value
    record = run.current_evaluation(ev["split"], samples, ev["limit"], proposal=kind)
    if record is None or kind == "guide":
        return record
    try:
        planned = plan(run.path, kind, ev.get("refine"))
    except RunError:  # no current tuned proposal: the saved evaluation's is gone or void
        return None
    return record if record.get("proposal_id") == planned.identity else None


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
