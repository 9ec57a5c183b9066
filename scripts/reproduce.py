"""Reproduce the results table: train and evaluate every variant (or a chosen subset).

    python scripts/reproduce.py --jobs 2                       # the whole table, random masks
    python scripts/reproduce.py --mask fixed --inputs 1 2 3 --variants baseline cvae
    python scripts/reproduce.py --epochs 2 --limit 2000 --runs-dir /tmp/quick   # a smoke run
    python scripts/reproduce.py --variants joint-scratch joint-scratch-iwae --seeds 0 1 2   # seed spread
    python scripts/reproduce.py --variants joint-scratch joint-scratch-iwae --seeds 0 1 2 \
        --proposals guide tuned refined --train-images 0   # each run under the three proposals

Runs already finished are not trained again, evaluations already on disk are not repeated
(``--re-evaluate`` repeats them). Each run trains on one thread; ``--jobs`` runs that many at
once (2 fills this project's 2-core machines). NCLL is measured with S importance samples on
the test images and on the first ``--train-images`` training images (the reference measured
on training images). With ``--seeds``, every chosen variant is trained once per training seed
(``runs/joint-scratch``, ``runs/joint-scratch-seed1``, ...; the evaluation masks and draws stay
seeded 0, so every run is measured on the same inputs), and the table adds each variant's mean
and standard deviation over its seeds. Writes ``results.md`` and ``results.json`` in the runs
directory.

``--proposals`` (default ``guide``, the reference's protocol) evaluates each run under each
importance proposal named, in that order (``pyro_cvae.proposals``), with a block of columns per
proposal: for ``tuned`` the job first fits the run's tuned proposal as ``pyro-cvae
tune-proposal`` does (its default budget) unless the run has a current one, and ``refined``
then starts from it. A run that cannot have a proposal (``baseline``: no latent; ``gsnn``: no
recognition net to tune) shows ``n/a`` there. The difference from the outside figure is given
beside the guide alone, and only where it was measured as that figure was (S=100, 10,000 images).

With ``--address`` (``auto``, ``HOST:6379`` or ``ray://HOST:10001``) the jobs run as tasks on a
Ray cluster instead (``pip install -e '.[cluster]'``; see ``pyro_cvae.cluster``); the runs
directory stays on this machine. SIGTERM, SIGHUP and Ctrl-C are passed on to the running jobs,
which stop after their step and save a checkpoint: the same command resumes them.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import statistics
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

from pyro_cvae.atomic import atomic_write_text
from pyro_cvae.config import PROPOSALS, Mask, OptionError, Refine, TrainConfig
from pyro_cvae.console import Progress, console, errors
from pyro_cvae.data import split_size, whole_split_limit
from pyro_cvae.model import VARIANTS, get_variant
from pyro_cvae.proposals import unavailable
from pyro_cvae.references import comparable, reference_for
from pyro_cvae.runs import Run, baseline_run_dir, default_run_dir, run_name
from pyro_cvae.sweep import Job, pool_worker_start, run_logged

# longest first, so that two workers finish close together; the baseline first, others depend on it
ORDER = [
    "baseline",
    "joint-scratch-iwae",
    "cvae-iwae",
    "hybrid",
    "joint-scratch",
    "joint-pretrained",
    "gsnn",
    "cvae",
    "cond-decoder",
    "cond-decoder-no-baseline",
    "no-baseline",
    "unconditioned-prior",
]


def _epochs_done(run_dir: Path) -> int:
    return len(Run(run_dir).read_metrics())


def _train_seconds(run_dir: Path) -> tuple[float, int]:
    """Training time and steps, summed over the epochs of the run's metrics."""
    rows = Run(run_dir).read_metrics()
    return sum(r["seconds"] for r in rows), (rows[-1]["step"] if rows else 0)


def write_results(
    rows: list[dict],
    runs_dir: Path,
    name: str,
    command: str,
    wall: float,
    fixed: bool,
    proposals: list[str] = ("guide",),
) -> Path:
    """``results.md`` and ``results.json``: a row per run, with a block of columns per proposal
    (named only when there are several), and the difference from the outside figure beside the
    guide alone, where it was measured as that figure was (``references.comparable``)."""
    # the reference measured on training images, the Pyro tutorial on test images
    reference, compare = (
        ("Pyro tutorial (test, a bound)", "test") if fixed else ("reference (train)", "train")
    )
    header = ["run", "epochs"]
    for proposal in proposals:
        named = _named(proposal, proposals)
        header += [f"{named}NCLL test ± SE", f"{named}NCLL train (first 10k) ± SE"]
        if proposal == "guide":
            header += [reference, f"{compare} − reference"]
        header.append(f"{named}ESS test")
    header += ["train time", "ms/step", "ran on"]
    lines = [
        f"Command: `{command}`  ",
        f"Wall time of this invocation: {wall / 60:.1f} min on {os.cpu_count()} CPU cores.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
    ]
    for r in rows:
        error = f" ({r['error']})" if "error" in r else ""
        cells = [f"{r['run']}{error}", str(r["epochs"])]
        for proposal in proposals:
            cells += _proposal_cells(r, proposal, compare)
        cells += [
            f"{r['train_seconds'] / 60:.1f} min",
            f"{r['ms_per_step']:.1f}",
            ", ".join(r.get("ran_on") or []) or "earlier",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    reasons: dict[str, list[str]] = {}  # why -> the proposals it rules out, in their order
    for proposal in proposals:
        for r in rows:
            why = r["proposals"][proposal].get("not_applicable")
            if why and proposal not in reasons.setdefault(why, []):
                reasons[why].append(proposal)
    if reasons:
        told = "; ".join(f"{why} ({', '.join(kinds)})" for why, kinds in reasons.items())
        lines += ["", f"n/a: the proposal does not apply to the run: {told}."]
    summary = seed_summary(rows, proposals)
    if summary:
        spread_header = []
        for proposal in proposals:
            named = _named(proposal, proposals)
            spread_header += [f"{named}NCLL test", f"{named}NCLL train (first 10k)"]
        lines += [
            "",
            "Over training seeds (mean ± standard deviation of the runs' NCLL; n seeds):",
            "",
            "| variant | seeds | " + " | ".join(spread_header) + " |",
            "|" + " --- |" * (2 + len(spread_header)),
        ]
        for s in summary:
            cells = [s["group"], ", ".join(map(str, s["seeds"]))]
            for proposal in proposals:
                entry = s["proposals"][proposal]
                cells += [_spread(entry, "test"), _spread(entry, "train")]
            lines.append("| " + " | ".join(cells) + " |")
    atomic_write_text(
        json.dumps(
            {
                "command": command,
                "wall_seconds": wall,
                "proposals": list(proposals),
                "runs": rows,
                "over_seeds": summary,
            },
            indent=2,
        )
        + "\n",
        runs_dir / f"{name}.json",
    )
    path = runs_dir / f"{name}.md"
    atomic_write_text("\n".join(lines) + "\n", path)
    return path


def _named(proposal: str, proposals: list[str]) -> str:
    """A column's prefix naming its proposal, when the table has several."""
    return f"{proposal}: " if len(proposals) > 1 else ""


def _proposal_cells(r: dict, proposal: str, compare: str) -> list[str]:
    """A run's cells under one proposal: NCLL test and train, (with the guide) the outside figure
    and the difference from it, ESS test; ``n/a`` where the run cannot have the proposal."""
    entry = r["proposals"][proposal]
    extra = 2 if proposal == "guide" else 0
    if "not_applicable" in entry:
        return ["n/a"] * (3 + extra)
    test, train = entry.get("test"), entry.get("train")
    fmt = lambda e: f"{e['ncll']:.2f} ± {e['ncll_se']:.2f}" if e else "-"  # noqa: E731
    cells = [fmt(test), fmt(train)]
    if proposal == "guide":
        ref, ours = r.get("reference_ncll"), entry.get(compare)
        same = ours and comparable(r["variant"], ours["images"], ours["samples"], ours["proposal"])
        diff = f"{ours['ncll'] - ref:+.2f}" if (same and ref is not None) else "-"
        cells += [str(ref) if ref is not None else "-", diff]
    return cells + [f"{test['ess_mean']:.1f}" if test else "-"]


def _spread(entry: dict | None, split: str) -> str:
    if entry is None:
        return "n/a"
    s = entry.get(split)
    return f"{s['mean']:.2f} ± {s['sd']:.2f}" if s else "-"


def seed_summary(rows: list[dict], proposals: list[str] = ("guide",)) -> list[dict]:
    """Mean and standard deviation over training seeds of each variant (and mask) run with
    several, under each proposal (``test`` and ``train``: the first proposal's)."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        key = run_name(r["variant"], r["mask"], r["inputs"])  # the run's name without its seed
        groups.setdefault(key, []).append(r)
    summary = []
    for key, members in groups.items():
        if len({r["seed"] for r in members}) < 2:
            continue
        entry = {"group": key, "seeds": [r["seed"] for r in members], "proposals": {}}
        for proposal in proposals:
            evaluated = [r["proposals"][proposal] for r in members]
            if all("not_applicable" in e for e in evaluated):
                entry["proposals"][proposal] = None
                continue
            entry["proposals"][proposal] = {
                split: _over_seeds([e[split]["ncll"] for e in evaluated if e.get(split)])
                for split in ("test", "train")
            }
        entry.update(entry["proposals"][proposals[0]] or {"test": None, "train": None})
        summary.append(entry)
    return summary


def _over_seeds(values: list[float]) -> dict | None:
    if len(values) < 2:
        return None
    return {
        "mean": statistics.mean(values),
        "sd": statistics.stdev(values),
        "n": len(values),
        "per_seed": values,
    }


def plan(args: argparse.Namespace) -> list[Job]:
    """The sweep's jobs, each baseline before the jobs that start from it."""
    jobs: list[Job] = []
    for seed in dict.fromkeys(args.seeds):
        for inputs in args.inputs:
            for name in sorted(
                args.variants, key=lambda v: ORDER.index(v) if v in ORDER else len(ORDER)
            ):
                config = TrainConfig(
                    variant=name,
                    epochs=args.epochs,
                    mask=Mask(args.mask),
                    inputs=inputs if args.mask == "fixed" else None,
                    limit=args.limit,
                    seed=seed,
                )
                baseline = (
                    baseline_run_dir(args.runs_dir, config)
                    if get_variant(name).pretrained
                    else None
                )
                run_dir = default_run_dir(args.runs_dir, config)
                jobs.append(Job(run_dir.name, config, run_dir, baseline))
    # a variant that needs the pretrained baseline waits for it (trained here even when not asked for)
    for job in list(jobs):
        if job.baseline is not None and job.baseline not in [j.run_dir for j in jobs]:
            jobs.insert(0, Job(job.baseline.name, job.config.baseline(), job.baseline))
    return jobs


def run_here(
    jobs: list[Job], args: argparse.Namespace, evaluations: list[dict]
) -> tuple[dict[str, dict], int | None]:
    """Run the jobs in a pool of ``--jobs`` processes of this machine. Returns each job's
    result by name, and the signal that stopped the sweep (None: it ran to the end)."""
    results: dict[str, dict] = {}
    pending = list(jobs)
    running: dict = {}  # future -> job
    stopped: list[int] = []

    def stop(signum, frame) -> None:
        if stopped:  # a second signal: stop now, the last epoch's checkpoints are kept
            raise KeyboardInterrupt
        stopped.append(signum)
        for worker in multiprocessing.active_children():  # each stops after its step and saves
            os.kill(worker.pid, signal.SIGINT)

    def status() -> str:
        epochs = ", ".join(
            f"{job.name} epoch {_epochs_done(job.run_dir)}/{job.config.epochs}"
            for job in running.values()
        )
        return f"{len(results)}/{len(jobs)} runs done" + (f"; running {epochs}" if epochs else "")

    def epochs_done() -> int:
        return sum(min(_epochs_done(job.run_dir), job.config.epochs) for job in jobs)

    kinds = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP]
    previous = {kind: signal.signal(kind, stop) for kind in kinds}
    # a live bar on a terminal; in a log, a line every minute and one per run finished
    try:
        with Progress(
            "reproduce",
            total=sum(job.config.epochs for job in jobs),
            completed=epochs_done(),
            unit="epochs",
        ) as progress:
            with ProcessPoolExecutor(
                max_workers=args.jobs,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=pool_worker_start,
            ) as pool:
                while pending or running:
                    done_dirs = {Path(r["run_dir"]) for r in results.values() if "error" not in r}
                    for job in list(pending):
                        if len(running) >= args.jobs or stopped:
                            break
                        if (
                            job.baseline is None
                            or job.baseline in done_dirs
                            or Run(job.baseline).is_finished()
                        ):
                            pending.remove(job)
                            fut = pool.submit(
                                run_logged,
                                job,
                                str(args.runs_dir),
                                args.data_dir,
                                evaluations,
                                args.threads,
                                args.re_evaluate,
                                args.device,
                            )
                            running[fut] = job
                    finished, _ = wait(list(running), timeout=1, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        job = running.pop(fut)
                        results[job.name] = {**fut.result(), "ran_on": [_here()]}
                        error = results[job.name].get("error")
                        console.print(
                            f"{job.name}: {'failed: ' + error if error else 'done'}",
                            markup=False,
                            highlight=False,
                        )
                    progress.update(epochs_done(), status(), milestone=bool(finished))
                    if stopped and not running:
                        break
                    if not running and pending and not finished:
                        # nothing runs and nothing can start: a dependency failed
                        for job in pending:
                            results[job.name] = {
                                "run_dir": "",
                                "error": "its pretrained baseline failed",
                                "evaluations": [],
                            }
                        pending.clear()
    finally:
        for kind, handler in previous.items():
            signal.signal(kind, handler)
    return results, (stopped[0] if stopped else None)


def _here() -> str:
    import socket

    return socket.gethostname()


def main(argv: list[str] | None = None, on_saved=None) -> int:
    """The command. ``on_saved``: with ``--address``, called after each checkpoint a worker
    hands in is written, before the worker goes on (``cluster.run_on_ray``; tests)."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="NAME"
    )
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0],
        help="training seeds, one run of each variant per seed",
    )
    p.add_argument("--mask", choices=["random", "fixed"], default="random")
    p.add_argument("--inputs", type=int, nargs="+", default=[1], choices=[1, 2, 3])
    p.add_argument("--jobs", type=int, default=2, help="runs at once, one thread each")
    p.add_argument("--threads", type=int, default=1, help="threads (CPUs) per run")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where each run trains")
    p.add_argument(
        "--address",
        default=None,
        help="run the jobs on the Ray cluster there: auto (started with `ray start` on this "
        "machine), HOST:PORT or ray://HOST:10001; default: a pool of --jobs processes here",
    )
    p.add_argument("--samples", type=int, default=100)
    p.add_argument(
        "--proposals",
        nargs="+",
        default=["guide"],
        metavar="NAME",
        help="importance proposals to evaluate each run with, in this order: guide (the "
        "reference's protocol), tuned (fitted first, as tune-proposal fits it, unless the run has "
        "a current one), refined; default: guide",
    )
    p.add_argument("--refine-steps", type=int, default=Refine.steps, help="refined: Adam steps")
    p.add_argument(
        "--refine-particles", type=int, default=Refine.particles, help="refined: draws K per step"
    )
    p.add_argument("--refine-lr", type=float, default=Refine.lr, help="refined: learning rate")
    p.add_argument(
        "--test-images", type=int, default=None, help="evaluate on the first N test images (all)"
    )
    p.add_argument(
        "--train-images", type=int, default=10000, help="training images to evaluate on (0: skip)"
    )
    p.add_argument(
        "--limit", type=int, default=None, help="train on the first N images (smoke runs)"
    )
    p.add_argument("--runs-dir", type=Path, default=Path("runs"))
    p.add_argument("--data-dir", type=str, default=None)
    p.add_argument("--no-eval", action="store_true", help="train only")
    p.add_argument("--re-evaluate", action="store_true", help="repeat evaluations already on disk")
    p.add_argument(
        "--out", default=None, help="results file stem (default: results or results-fixed)"
    )
    args = p.parse_args(argv)
    problem = _option_problem(args)
    if problem:
        errors.print(f"error: {problem}", markup=False, highlight=False)
        return 2

    command = "python scripts/reproduce.py " + " ".join(sys.argv[1:] if argv is None else argv)
    proposals = list(dict.fromkeys(args.proposals))
    evaluations = [] if args.no_eval else planned_evaluations(args, proposals)
    jobs = plan(args)

    started = time.perf_counter()
    if args.address is None:
        results, stopped = run_here(jobs, args, evaluations)
    else:
        results, stopped = run_on_cluster(jobs, args, evaluations, on_saved)
        if results is None:
            return 1
    wall = time.perf_counter() - started
    if stopped is not None:
        saved = sum(1 for r in results.values() if r.get("interrupted"))
        console.print(
            f"stopped by {signal.Signals(stopped).name}: {saved} running runs saved their "
            f"checkpoints and nothing was left half-written; run the same command to resume.",
            markup=False,
            highlight=False,
        )
        return 128 + stopped

    rows = []
    for job in jobs:
        cfg = job.config
        r = results.get(job.name, {})
        by_proposal = _by_proposal(cfg.variant, r.get("evaluations", []), proposals)
        first = by_proposal[proposals[0]]
        seconds, steps = _train_seconds(job.run_dir)
        # the figure the table compares with: Pyro's tutorial on test images, else the reference's table (train)
        outside = reference_for(
            cfg.variant, cfg.mask, cfg.inputs, "test" if cfg.mask is Mask.fixed else "train"
        )
        reference = outside.ncll if outside else None
        rows.append(
            {
                "run": job.name,
                "variant": cfg.variant,
                "seed": cfg.seed,
                "epochs": _epochs_done(job.run_dir),
                "mask": cfg.mask.value,
                "inputs": cfg.inputs,
                "reference_ncll": reference,
                "test": first.get("test"),  # the first proposal's, as each record says
                "train": first.get("train"),
                "proposals": by_proposal,
                "train_seconds": seconds,
                "ms_per_step": 1000 * seconds / max(steps, 1),
                "ran_on": r.get("ran_on", []),
                **({"error": r["error"]} if "error" in r else {}),
            }
        )
    out = args.out or ("results" if args.mask == "random" else "results-fixed")
    path = write_results(
        rows, args.runs_dir, out, command, wall, fixed=args.mask == "fixed", proposals=proposals
    )
    console.print(path.read_text(), markup=False, highlight=False)
    console.print(f"wrote {path} and {path.with_suffix('.json')} in {wall / 60:.1f} min")
    return 1 if any("error" in r for r in rows) else 0


def planned_evaluations(args: argparse.Namespace, proposals: list[str]) -> list[dict]:
    """What each job evaluates, in order: every proposal asked on the test images, then (unless
    ``--train-images 0``) on the first training images."""
    splits = [("test", args.test_images)] + (
        [("train", args.train_images)] if args.train_images else []
    )
    refine = Refine(args.refine_steps, args.refine_particles, args.refine_lr)
    return [
        {
            "split": split,
            "samples": args.samples,
            "limit": whole_split_limit(images, split_size(split)),
            "proposal": proposal,
            "refine": refine if proposal == "refined" else None,
        }
        for proposal in proposals
        for split, images in splits
    ]


def _by_proposal(variant: str, evaluations: list[dict], proposals: list[str]) -> dict:
    """A run's evaluations by proposal and split (each record names its proposal), or why the
    run cannot have a proposal."""
    out = {}
    for proposal in proposals:
        why = unavailable(get_variant(variant), proposal)
        out[proposal] = (
            {"not_applicable": why}
            if why
            else {e["split"]: e for e in evaluations if e and e["proposal"] == proposal}
        )
    return out


def _option_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the options, in one line naming the option, or None."""
    for option, value in [
        ("--epochs", args.epochs),
        ("--jobs", args.jobs),
        ("--threads", args.threads),
        ("--samples", args.samples),
        ("--limit", args.limit),
    ]:
        if value is not None and value < 1:
            return f"{option} must be at least 1, got {value}."
    if args.test_images is not None and args.test_images < 1:
        return (
            f"--test-images must be at least 1, got {args.test_images}; leave it out to "
            "evaluate on the whole test split."
        )
    if args.train_images < 0:
        return f"--train-images must be 0 (skip) or more, got {args.train_images}."
    return _proposal_problem(args)


def _proposal_problem(args: argparse.Namespace) -> str | None:
    """An unknown proposal, bad refine options, or a proposal that none of the variants asked for
    can have (a mix of variants gets n/a in the rows that cannot)."""
    unknown = [p for p in args.proposals if p not in PROPOSALS]
    if unknown:
        return (
            f"--proposals {' '.join(unknown)}: no such proposal; choose among "
            f"{', '.join(PROPOSALS)} (e.g. --proposals guide tuned refined)."
        )
    try:
        Refine(args.refine_steps, args.refine_particles, args.refine_lr)
    except OptionError as e:
        return str(e)
    for proposal in dict.fromkeys(args.proposals):
        reasons = [unavailable(get_variant(v), proposal) for v in dict.fromkeys(args.variants)]
        if all(reasons):
            return (
                f"--proposals {proposal}: none of the variants asked can have it "
                f"({'; '.join(reasons)}); drop {proposal} or add a variant that has a "
                + ("recognition net." if proposal == "tuned" else "latent.")
            )
    return None


def run_on_cluster(
    jobs: list[Job], args: argparse.Namespace, evaluations: list[dict], on_saved=None
) -> tuple[dict[str, dict] | None, int | None]:
    """The jobs as Ray tasks on the cluster at ``--address``; (None, None) after saying in one
    line why they cannot run there."""
    try:
        from pyro_cvae import cluster
    except ImportError as e:
        errors.print(
            f"error: --address needs Ray ({e}); install it with: pip install -e '.[cluster]'",
            markup=False,
            highlight=False,
        )
        return None, None
    import ray

    try:
        cluster.connect(args.address)
        return cluster.run_on_ray(
            jobs,
            evaluations,
            args.runs_dir,
            args.data_dir,
            args.threads,
            args.re_evaluate,
            args.device,
            on_saved=on_saved,
        )
    except cluster.ClusterError as e:
        errors.print(f"error: {e}", markup=False, highlight=False)
        return None, None
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
