"""Reproduce the results table: train and evaluate every variant (or a chosen subset).

    python scripts/reproduce.py --jobs 2                       # the whole table, random masks
    python scripts/reproduce.py --mask fixed --inputs 1 2 3 --variants baseline cvae
    python scripts/reproduce.py --epochs 2 --limit 2000 --runs-dir /tmp/quick   # a smoke run
    python scripts/reproduce.py --variants joint-scratch joint-scratch-iwae --seeds 0 1 2   # seed spread

Runs already finished are not trained again, evaluations already on disk are not repeated
(``--re-evaluate`` repeats them). Each run trains on one thread; ``--jobs`` runs that many at
once (2 fills this project's 2-core machines). NCLL is measured with S importance samples on
the test images and on the first ``--train-images`` training images (the reference measured
on training images). With ``--seeds``, every chosen variant is trained once per training seed
(``runs/joint-scratch``, ``runs/joint-scratch-seed1``, ...; the evaluation masks and draws stay
seeded 0, so every run is measured on the same inputs), and the table adds each variant's mean
and standard deviation over its seeds. Writes ``results.md`` and ``results.json`` in the runs
directory.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

from pyro_cvae.atomic import atomic_write_text
from pyro_cvae.config import Mask, TrainConfig
from pyro_cvae.console import Progress, console
from pyro_cvae.data import split_size, whole_split_limit
from pyro_cvae.model import VARIANTS, get_variant
from pyro_cvae.references import reference_for
from pyro_cvae.runs import Run, baseline_run_dir, default_run_dir, run_name

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


def run_one(
    config: dict,
    run_dir: str,
    runs_dir: str,
    data_dir: str | None,
    evaluations: list[dict],
    threads: int,
    re_evaluate: bool,
) -> dict:
    """Train (unless finished) and evaluate one run, in a worker process with its own thread count."""
    import torch

    torch.set_num_threads(threads)
    from pyro_cvae.evaluate import evaluate_run
    from pyro_cvae.train import Status, train

    run = Run(run_dir)
    run_dir = run.path
    run_dir.mkdir(parents=True, exist_ok=True)
    log_file = open(run.sweep_log_path, "a")

    def log(msg: str) -> None:
        log_file.write(msg + "\n")
        log_file.flush()

    out = {"run_dir": str(run_dir), "evaluations": []}
    try:
        result = train(
            TrainConfig.from_dict(config),
            run_dir=run_dir,
            runs_dir=runs_dir,
            data_dir=data_dir,
            device="cpu",
            log=log,
            progress=False,
        )
        out["train_status"] = result.status.value
        if result.status is Status.interrupted:
            raise RuntimeError("training was interrupted; run the same command to resume")
        variant = get_variant(config["variant"])
        for ev in evaluations:
            saved = run.current_evaluation(
                ev["split"], variant.importance_samples(ev["samples"]), ev["limit"]
            )
            if saved is not None and not re_evaluate:
                out["evaluations"].append(saved)
                continue
            r = evaluate_run(
                run_dir,
                samples=ev["samples"],
                split=ev["split"],
                limit=ev["limit"],
                data_dir=data_dir,
                device="cpu",
                log=log,
                proposal="guide",  # the table's protocol, the reference's: the guide as trained
            )
            out["evaluations"].append(r.__dict__)
            log(
                f"evaluated {ev['split']}: NCLL {r.ncll:.3f} ± {r.ncll_se:.3f} in {r.seconds:.1f} s"
            )
    except Exception as e:  # reported in the table; the sweep goes on with the other runs
        log(traceback.format_exc())
        out["error"] = f"{type(e).__name__}: {e}"
    log_file.close()
    return out


def _epochs_done(run_dir: Path) -> int:
    return len(Run(run_dir).read_metrics())


def _train_seconds(run_dir: Path) -> tuple[float, int]:
    """Training time and steps, summed over the epochs of the run's metrics."""
    rows = Run(run_dir).read_metrics()
    return sum(r["seconds"] for r in rows), (rows[-1]["step"] if rows else 0)


def write_results(
    rows: list[dict], runs_dir: Path, name: str, command: str, wall: float, fixed: bool
) -> Path:
    # the reference measured on training images, the Pyro tutorial on test images
    reference, compare = (
        ("Pyro tutorial (test, a bound)", "test") if fixed else ("reference (train)", "train")
    )
    lines = [
        f"Command: `{command}`  ",
        f"Wall time of this invocation: {wall / 60:.1f} min on {os.cpu_count()} CPU cores.",
        "",
        f"| run | epochs | NCLL test ± SE | NCLL train (first 10k) ± SE | {reference} | {compare} − reference "
        "| ESS test | train time | ms/step |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        test, tr, ref = r.get("test"), r.get("train"), r.get("reference_ncll")
        fmt = lambda e: f"{e['ncll']:.2f} ± {e['ncll_se']:.2f}" if e else "-"  # noqa: E731
        ours = r.get(compare)
        diff = f"{ours['ncll'] - ref:+.2f}" if (ours and ref is not None) else "-"
        ess = f"{test['ess_mean']:.1f}" if test else "-"
        error = f" ({r['error']})" if "error" in r else ""
        lines.append(
            f"| {r['run']}{error} | {r['epochs']} | {fmt(test)} | {fmt(tr)} | {ref if ref is not None else '-'} | "
            f"{diff} | {ess} | {r['train_seconds'] / 60:.1f} min | {r['ms_per_step']:.1f} |"
        )
    summary = seed_summary(rows)
    if summary:
        lines += [
            "",
            "Over training seeds (mean ± standard deviation of the runs' NCLL; n seeds):",
            "",
            "| variant | seeds | NCLL test | NCLL train (first 10k) |",
            "| --- | --- | --- | --- |",
        ]
        spread = lambda s: f"{s['mean']:.2f} ± {s['sd']:.2f}" if s else "-"  # noqa: E731
        for s in summary:
            lines.append(
                f"| {s['group']} | {', '.join(map(str, s['seeds']))} | {spread(s['test'])} | {spread(s['train'])} |"
            )
    atomic_write_text(
        json.dumps(
            {"command": command, "wall_seconds": wall, "runs": rows, "over_seeds": summary},
            indent=2,
        )
        + "\n",
        runs_dir / f"{name}.json",
    )
    path = runs_dir / f"{name}.md"
    atomic_write_text("\n".join(lines) + "\n", path)
    return path


def seed_summary(rows: list[dict]) -> list[dict]:
    """Mean and standard deviation over training seeds of each variant (and mask) run with several."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        key = run_name(r["variant"], r["mask"], r["inputs"])  # the run's name without its seed
        groups.setdefault(key, []).append(r)
    summary = []
    for key, members in groups.items():
        if len({r["seed"] for r in members}) < 2:
            continue
        entry = {"group": key, "seeds": [r["seed"] for r in members]}
        for split in ("test", "train"):
            values = [r[split]["ncll"] for r in members if r.get(split)]
            entry[split] = (
                {
                    "mean": statistics.mean(values),
                    "sd": statistics.stdev(values),
                    "n": len(values),
                    "per_seed": values,
                }
                if len(values) > 1
                else None
            )
        summary.append(entry)
    return summary


def main(argv: list[str] | None = None) -> int:
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
    p.add_argument("--threads", type=int, default=1, help="threads per run")
    p.add_argument("--samples", type=int, default=100)
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
    if args.epochs < 1 or args.jobs < 1 or args.samples < 1:
        p.error("--epochs, --jobs and --samples must be at least 1")

    command = "python scripts/reproduce.py " + " ".join(sys.argv[1:] if argv is None else argv)
    evaluations = (
        []
        if args.no_eval
        else [
            {
                "split": "test",
                "samples": args.samples,
                "limit": whole_split_limit(args.test_images, split_size("test")),
            }
        ]
    )
    if args.train_images and not args.no_eval:
        evaluations.append(
            {
                "split": "train",
                "samples": args.samples,
                "limit": whole_split_limit(args.train_images, split_size("train")),
            }
        )

    runs = []  # (name, config, run_dir, depends_on)
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
                dep = (
                    baseline_run_dir(args.runs_dir, config)
                    if get_variant(name).pretrained
                    else None
                )
                run_dir = default_run_dir(args.runs_dir, config)
                runs.append((run_dir.name, config, run_dir, dep))
    # a variant that needs the pretrained baseline waits for it (trained here even when not asked for)
    for _, config, _, dep in list(runs):
        if dep is not None and dep not in [r[2] for r in runs]:
            runs.insert(0, (dep.name, config.baseline(), dep, None))

    started = time.perf_counter()
    results: dict[str, dict] = {}
    pending = list(runs)
    running: dict = {}  # future -> run name

    def status() -> str:
        epochs = ", ".join(
            f"{name} epoch {_epochs_done(rd)}/{cfg.epochs}"
            for name, cfg, rd, _ in runs
            if name in running.values()
        )
        return f"{len(results)}/{len(runs)} runs done" + (f"; running {epochs}" if epochs else "")

    def epochs_done() -> int:
        return sum(min(_epochs_done(rd), cfg.epochs) for _, cfg, rd, _ in runs)

    # a live bar on a terminal; in a log, a line every minute and one per run finished
    with Progress(
        "reproduce",
        total=sum(cfg.epochs for _, cfg, _, _ in runs),
        completed=epochs_done(),
        unit="epochs",
    ) as progress:
        with ProcessPoolExecutor(
            max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")
        ) as pool:
            while pending or running:
                done_dirs = {Path(r["run_dir"]) for r in results.values() if "error" not in r}
                for item in list(pending):
                    name, cfg, rd, dep = item
                    if len(running) >= args.jobs:
                        break
                    if dep is None or dep in done_dirs or Run(dep).is_finished():
                        pending.remove(item)
                        fut = pool.submit(
                            run_one,
                            cfg.to_dict(),
                            str(rd),
                            str(args.runs_dir),
                            args.data_dir,
                            evaluations,
                            args.threads,
                            args.re_evaluate,
                        )
                        running[fut] = name
                finished, _ = wait(list(running), timeout=5, return_when=FIRST_COMPLETED)
                for fut in finished:
                    name = running.pop(fut)
                    results[name] = fut.result()
                    error = results[name].get("error")
                    console.print(
                        f"{name}: {'failed: ' + error if error else 'done'}",
                        markup=False,
                        highlight=False,
                    )
                progress.update(epochs_done(), status(), milestone=bool(finished))
                if not running and pending and not finished:
                    # nothing runs and nothing can start: a dependency failed
                    for name, *_ in pending:
                        results[name] = {
                            "run_dir": "",
                            "error": "its pretrained baseline failed",
                            "evaluations": [],
                        }
                    pending.clear()

    wall = time.perf_counter() - started
    rows = []
    for name, cfg, rd, _ in runs:
        r = results.get(name, {})
        evs = {e["split"]: e for e in r.get("evaluations", [])}
        seconds, steps = _train_seconds(rd)
        # the figure the table compares with: Pyro's tutorial on test images, else the reference's table (train)
        outside = reference_for(
            cfg.variant, cfg.mask, cfg.inputs, "test" if cfg.mask is Mask.fixed else "train"
        )
        reference = outside.ncll if outside else None
        rows.append(
            {
                "run": name,
                "variant": cfg.variant,
                "seed": cfg.seed,
                "epochs": _epochs_done(rd),
                "mask": cfg.mask.value,
                "inputs": cfg.inputs,
                "reference_ncll": reference,
                "test": evs.get("test"),
                "train": evs.get("train"),
                "train_seconds": seconds,
                "ms_per_step": 1000 * seconds / max(steps, 1),
                **({"error": r["error"]} if "error" in r else {}),
            }
        )
    out = args.out or ("results" if args.mask == "random" else "results-fixed")
    path = write_results(rows, args.runs_dir, out, command, wall, fixed=args.mask == "fixed")
    console.print(path.read_text(), markup=False, highlight=False)
    console.print(f"wrote {path} and {path.with_suffix('.json')} in {wall / 60:.1f} min")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
