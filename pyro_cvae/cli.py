"""The ``pyro-cvae`` command: thin Typer wrappers over the library, printing with rich."""

from __future__ import annotations

import enum
import functools
import os
import signal
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from . import data as data_lib
from .config import EvalConfig, Refine, SampleConfig, TrainConfig
from .console import Column, Progress, console, errors, print_table
from .data import Mask, Split
from .model import VARIANTS
from .objectives import Elbo, GuideGradient
from .proposals import TUNE_BATCH, TUNE_LR, TUNE_PARTICLES, TUNE_STEPS

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Conditional VAE (Sohn, Lee & Yan 2015) in Pyro: predict hidden MNIST quadrants, measure NCLL.",
)

VariantName = enum.Enum("VariantName", {name: name for name in VARIANTS}, type=str)


class Device(str, enum.Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


DataDir = Annotated[
    Optional[Path],
    typer.Option(
        help=f"Folder with the four MNIST IDX files (raw or .gz). Default: ${data_lib.DATA_ENV}, else a cache folder."
    ),
]
RunsDir = Annotated[Path, typer.Option(help="Folder of run directories, one per variant.")]
RunDir = Annotated[
    Optional[Path],
    typer.Option(help="The run directory itself (default: RUNS_DIR/VARIANT[-fixedK][-seedS])."),
]
DeviceOpt = Annotated[Device, typer.Option(help="Where to compute.")]
Threads = Annotated[
    Optional[int], typer.Option(min=1, help="CPU threads for PyTorch (default: all cores).")
]
# which run, for the commands that read one: RUNS_DIR/VARIANT (with its mask protocol) or RUN_DIR
RunOf = Annotated[
    Optional[VariantName], typer.Option("--variant", help="The run of this variant in RUNS_DIR.")
]
RunMask = Annotated[
    Optional[Mask], typer.Option("--mask", help="The run's masking protocol (default: random).")
]
RunInputs = Annotated[
    Optional[int],
    typer.Option("--inputs", help="With --mask fixed: the run's visible quadrants (default: 1)."),
]
Seed = Annotated[int, typer.Option(help="Seed of the masks and of the z draws.")]
ForceOut = Annotated[
    bool,
    typer.Option(
        help="Replace an existing --out file that is not a picture this program wrote (a run's "
        "own files are never replaced)."
    ),
]


class ProposalName(str, enum.Enum):  # proposals.ProposalKind, without importing torch here
    guide = "guide"
    tuned = "tuned"
    refined = "refined"


def _friendly(
    fn, interrupted: str = "nothing was written (no half-written file); run the same command again."
):
    """Expected failures end in one red line: a refused option with exit code 2 (as a usage
    error), missing data, a bad run or a failed write with 1, a termination signal (Ctrl-C,
    SIGTERM, SIGHUP, one that came while the command started included) with 128 + its number
    (130, 143, 129), saying ``interrupted``: what became of the work."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .config import OptionError
        from .console import Terminated, raise_on_termination, signal_name
        from .data import DataError
        from .runs import RunError

        try:
            with raise_on_termination():
                return fn(*args, **kwargs)
        except (DataError, RunError, ValueError, OSError) as e:
            errors.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
            raise typer.Exit(2 if isinstance(e, OptionError) else 1) from None
        except KeyboardInterrupt as e:
            signum = e.signum if isinstance(e, Terminated) else signal.SIGINT
            errors.print(
                f"[bold red]interrupted[/] ({signal_name(signum)}); {interrupted}", highlight=False
            )
            raise typer.Exit(128 + signum) from None

    return wrapper


# what the library says as it works: paths and run names are printed as they are, never as markup
_log = functools.partial(console.print, markup=False, highlight=False)


def _threads(threads: int | None) -> None:
    import torch

    torch.set_num_threads(threads or os.cpu_count() or 1)


@app.command("data")
@_friendly
def data_cmd(data_dir: DataDir = None) -> None:
    """Find and verify MNIST (checksums of the uncompressed files); print what was found."""
    statuses = data_lib.check(data_dir)
    print_table(
        f"MNIST in {escape(str(data_lib.resolve_data_dir(data_dir)))}",
        [
            Column("file", whole=True),
            Column("items", justify="right"),
            Column("md5"),
            Column("path", whole=True),
        ],
        [
            [s.stem, str(s.count), f"[green]OK[/] ({s.checksum})", escape(str(s.path))]
            for s in statuses
        ],
    )
    counts = {s.stem: s.count for s in statuses}
    console.print(
        f"train: {counts['train-images-idx3-ubyte']} images, test: {counts['t10k-images-idx3-ubyte']} images"
    )


@app.command("variants")
def variants_cmd() -> None:
    """List the variants: what each changes, and the reference implementation's NCLL."""
    from .references import TABLE

    columns = [
        Column("variant", whole=True),
        Column("what changes"),
        Column("reference config", whole=True),
        Column("reference NCLL (train)", justify="right"),
    ]
    rows = [
        [
            v.name,
            escape(v.summary),
            TABLE[v.name].config if v.name in TABLE else "(paper)",
            f"{TABLE[v.name].ncll:.3f}" if v.name in TABLE else "-",
        ]
        for v in VARIANTS.values()
    ]
    print_table("Variants", columns, rows)


@app.command("train")
@functools.partial(
    _friendly,
    interrupted="no checkpoint was saved since the last one, and nothing was half-written: "
    "run the same command to resume (or to start).",
)
def train_cmd(
    variant: Annotated[VariantName, typer.Option(help="Which variant to train.")] = VariantName(
        TrainConfig.variant
    ),
    epochs: Annotated[
        int, typer.Option(help="Passes over the training images.")
    ] = TrainConfig.epochs,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = TrainConfig.batch_size,
    lr: Annotated[float, typer.Option(help="Adam learning rate (> 0).")] = TrainConfig.lr,
    seed: Annotated[
        int, typer.Option(help="Seed of data order, masks, initialisation and z draws.")
    ] = TrainConfig.seed,
    mask: Annotated[
        Mask, typer.Option(help="Masking protocol: random (1 of 4 quadrants visible) or fixed.")
    ] = TrainConfig.mask,
    inputs: Annotated[
        Optional[int], typer.Option(help="Visible quadrants (1-3) with --mask fixed (default: 1).")
    ] = TrainConfig.inputs,
    limit: Annotated[
        Optional[int], typer.Option(help="Train on the first N images only.")
    ] = TrainConfig.limit,
    hybrid_weight: Annotated[
        Optional[float],
        typer.Option(help="Weight in [0, 1] of the CVAE term in 'hybrid' (default: 0.5)."),
    ] = TrainConfig.hybrid_weight,
    elbo: Annotated[
        Optional[Elbo],
        typer.Option(
            help="Training objective: meanfield (TraceMeanField_ELBO, closed-form KL), trace (Trace_ELBO), iwae (RenyiELBO alpha=0). Default: the variant's."
        ),
    ] = TrainConfig.elbo,
    particles: Annotated[
        Optional[int],
        typer.Option(help="Particles K of the ELBO (default: the variant's; 5 with iwae, else 1)."),
    ] = TrainConfig.particles,
    guide_gradient: Annotated[
        Optional[GuideGradient],
        typer.Option(
            help="Guide gradient: reparam (Pyro's), stl (sticking the landing; trace or iwae), dreg (doubly reparameterised; iwae), rws (reweighted wake-sleep's wake update, doubly reparameterised: a mass-covering proposal; iwae, K>1). Default: the variant's."
        ),
    ] = TrainConfig.guide_gradient,
    force: Annotated[
        bool, typer.Option(help="Start over even if the run directory holds a run.")
    ] = False,
    data_dir: DataDir = None,
    runs_dir: Annotated[
        Optional[Path],
        typer.Option(
            help="Folder of run directories (default: runs; with --run-dir, the folder holding it: where the pretrained baseline is found)."
        ),
    ] = None,
    run_dir: RunDir = None,
    device: DeviceOpt = Device.auto,
    threads: Threads = None,
    progress: Annotated[
        bool, typer.Option(help="Show a progress bar (else a line per epoch).")
    ] = True,
) -> None:
    """Train a variant (or resume its unfinished run) on a Pyro ELBO; leaves RUNS_DIR/VARIANT[-fixedK][-seedS]/."""
    from .train import Status, train

    _threads(threads)
    config = TrainConfig(
        variant=variant.value,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        mask=mask,
        inputs=inputs,
        limit=limit,
        hybrid_weight=hybrid_weight,
        elbo=elbo.value if elbo else None,
        particles=particles,
        guide_gradient=guide_gradient.value if guide_gradient else None,
    )
    result = train(
        config,
        run_dir=run_dir,
        runs_dir=runs_dir,
        data_dir=data_dir,
        device=device.value,
        force=force,
        log=_log,
        progress=progress,
    )
    if result.status is Status.finished:
        console.print(
            f"[green]trained[/] {escape(str(result.run_dir))} for {result.epochs_done} epochs "
            f"({result.steps} steps, {result.seconds:.0f} s)"
        )
    elif result.status is Status.interrupted:
        raise typer.Exit(128 + (result.signum or signal.SIGINT))


@app.command("evaluate")
@_friendly
def evaluate_cmd(
    variant: RunOf = None,
    run_dir: RunDir = None,
    runs_dir: RunsDir = Path("runs"),
    samples: Annotated[
        int, typer.Option(help="Importance samples S per image.")
    ] = EvalConfig.samples,
    split: Annotated[
        Split, typer.Option(help="Images to evaluate on (the reference measured on train).")
    ] = EvalConfig.split,
    limit: Annotated[
        Optional[int], typer.Option(help="Evaluate the first N images only.")
    ] = EvalConfig.limit,
    batch_size: Annotated[
        int,
        typer.Option(
            help="Images per chunk; with S particles each, 5,000 rows fit the CPU cache best."
        ),
    ] = EvalConfig.batch_size,
    seed: Seed = EvalConfig.seed,
    force: Annotated[
        bool,
        typer.Option(
            help="With no run named: evaluate again runs whose saved evaluation is current."
        ),
    ] = False,
    mask: RunMask = None,
    inputs: RunInputs = None,
    proposal: Annotated[
        Optional[ProposalName],
        typer.Option(
            help="Importance proposal: guide (the recognition net as trained), tuned (fitted by "
            "tune-proposal), refined (per image, from tuned or else the guide). Default: the best "
            "the run has (refined)."
        ),
    ] = None,
    refine_steps: Annotated[
        int, typer.Option(help="refined: Adam steps per image.")
    ] = Refine.steps,
    refine_particles: Annotated[
        int, typer.Option(help="refined: draws K per step, fresh each step.")
    ] = Refine.particles,
    refine_lr: Annotated[
        float, typer.Option(help="refined: Adam learning rate on loc and log-scale.")
    ] = Refine.lr,
    data_dir: DataDir = None,
    device: DeviceOpt = Device.auto,
    threads: Threads = None,
) -> None:
    """NCLL of a trained run by importance sampling, printed and saved in the run directory; with
    no run named, of every trained run in RUNS_DIR, in one table. Each figure names its proposal."""
    from .config import Context
    from .evaluate import evaluate_run, evaluate_runs
    from .runs import select_run

    _threads(threads)
    config = EvalConfig(
        samples,
        split,
        limit,
        batch_size,
        seed,
        proposal and proposal.value,
        Refine(refine_steps, refine_particles, refine_lr),
    )
    target = select_run(run_dir, runs_dir, variant and variant.value, mask, inputs)
    with Progress(
        target.name if target else "evaluating", total=0, unit="images", transient=True
    ) as bar:
        context = Context(data_dir, device.value, log=_log)
        if target is not None:  # the bar names the run already
            context.progress = lambda done, total, _: bar.update(done, total=total)
            results = [(evaluate_run(target, config, context), False)]
        else:
            context.progress = lambda done, total, name: bar.update(done, name, total=total)
            results = evaluate_runs(runs_dir, config, context, force=force)
    _print_evaluations(results, split.value)
    if target is not None:
        r = results[0][0]
        console.print(
            f"masks: {r.mask}{'' if r.inputs is None else f' ({r.inputs} visible)'}, seed {r.seed}; "
            f"proposal: {r.proposal}, {escape(r.proposal_detail or '')}; saved {escape(str(r.path))}",
            highlight=False,
        )


def _exact(variant: str) -> bool:
    """Whether a variant's NCLL is exact (no latent): no proposal to name."""
    return variant in VARIANTS and VARIANTS[variant].importance_samples(2) == 1


def _print_evaluations(results, split: str) -> None:
    """One table of evaluations (and whether each was a saved one), each beside the outside figure
    measured the same way, if any."""
    from .references import comparable, reference_for

    rows = []
    for r, reused in results:
        ref = reference_for(r.variant, r.mask, r.inputs, split)
        # a difference only for an evaluation measured as the reference was (whole split, S=100)
        difference = (
            f"{r.ncll - ref.ncll:+.2f}"
            if ref and comparable(r.variant, r.images, r.samples, r.proposal)
            else "-"
        )
        compared = [f"{ref.ncll:.2f}", difference, ref.source.value] if ref else ["-"] * 3
        rows.append(
            [
                escape(Path(r.run_dir).name),
                str(r.epochs),
                str(r.images),
                str(r.samples),
                "exact" if _exact(r.variant) else r.proposal,
                f"{r.ncll:.2f} ± {r.ncll_se:.2f}",
                *compared,
                f"{r.ess_mean:.1f}",
                f"{r.seconds:.1f}" + (" (saved)" if reused else ""),
            ]
        )
    columns = [
        Column("run", whole=True),
        Column("epochs", justify="right"),
        Column("images", justify="right"),
        Column("S", justify="right"),
        Column("proposal"),
        Column("NCLL ± SE (nats)", justify="right"),
        Column("reference", justify="right"),
        Column("− reference", justify="right"),
        Column("reference from"),
        Column("ESS", justify="right"),
        Column("seconds", justify="right"),
    ]
    print_table(f"NCLL of the hidden pixels, {split} images (lower is better)", columns, rows)


@app.command("tune-proposal")
@_friendly
def tune_proposal_cmd(
    variant: RunOf = None,
    run_dir: RunDir = None,
    runs_dir: RunsDir = Path("runs"),
    particles: Annotated[
        int, typer.Option(help="K of the bound, = the S it will be evaluated with.")
    ] = TUNE_PARTICLES,
    steps: Annotated[int, typer.Option(help="Adam steps at most.")] = TUNE_STEPS,
    batch_size: Annotated[int, typer.Option(help="Training images per step.")] = TUNE_BATCH,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = TUNE_LR,
    budget: Annotated[
        Optional[float],
        typer.Option(
            help="Seconds at most (default: 15% of the run's training time, from its metrics)."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the order, masks and draws.")] = 0,
    mask: RunMask = None,
    inputs: RunInputs = None,
    data_dir: DataDir = None,
    device: DeviceOpt = Device.auto,
    threads: Threads = None,
    progress: Annotated[
        bool, typer.Option(help="Show a progress bar (else a line now and then).")
    ] = True,
) -> None:
    """Fit an evaluation proposal (a copy of the recognition net) to a run's frozen model on its
    training images; saved as RUN_DIR/proposal-tuned.pt, for evaluate --proposal tuned or refined.
    Ctrl-C leaves nothing half-written (and the previous tuned proposal, if any)."""
    from .proposals import tune_proposal
    from .runs import select_run

    _threads(threads)
    target = select_run(run_dir, runs_dir, variant and variant.value, mask, inputs)
    if target is None:
        from .config import OptionError

        raise OptionError("name the run to tune: --run-dir DIR or --variant NAME.")
    with Progress(target.name, total=steps, enabled=progress) as bar:
        result = tune_proposal(
            target,
            particles=particles,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            budget_s=budget,
            seed=seed,
            data_dir=data_dir,
            device=device.value,
            log=console.print,
            progress=lambda done, total, bound: (
                bar.update(done, f"bound {bound:.2f}") if done % 10 == 0 or done == total else None
            ),
        )
    stopped = f", stopped by the budget of {result.budget_s:.0f} s" if result.steps < steps else ""
    console.print(
        f"[green]tuned[/] a proposal for {escape(str(target))}: {result.steps} steps in "
        f"{result.seconds:.1f} s{stopped}, mean bound {result.bound:.2f} nats per image over the "
        f"last steps; saved {escape(str(result.path))}",
        highlight=False,
    )


@app.command("sample")
@_friendly
def sample_cmd(
    variant: RunOf = None,
    run_dir: RunDir = None,
    runs_dir: RunsDir = Path("runs"),
    num_images: Annotated[
        int, typer.Option(help="Images, one column each: the first N of the split.")
    ] = SampleConfig.num_images,
    num_samples: Annotated[
        Optional[int],
        typer.Option(
            help=f"CVAE completions per image, one row each (default: {SampleConfig.num_samples} for one run, 3 per run when comparing)."
        ),
    ] = None,
    split: Annotated[Split, typer.Option(help="Images to complete.")] = SampleConfig.split,
    seed: Seed = SampleConfig.seed,
    out: Annotated[
        Optional[Path],
        typer.Option(
            help="PNG to write (default: in the run directory, or in RUNS_DIR comparing every run)."
        ),
    ] = None,
    force: ForceOut = False,
    mask: RunMask = None,
    inputs: RunInputs = None,
    data_dir: DataDir = None,
    device: DeviceOpt = Device.auto,
    threads: Threads = None,
) -> None:
    """A PNG grid of a trained run: input | truth | baseline | CVAE samples, a column per image;
    with no run named, one picture comparing every trained run in RUNS_DIR on the same digits."""
    from .config import Context
    from .runs import check_output, select_run
    from .sample import compare_runs, sample_grid

    _threads(threads)
    comparing = run_dir is None and variant is None  # three draws a run: the picture holds all
    default = 3 if comparing else SampleConfig.num_samples
    config = SampleConfig(num_images, default if num_samples is None else num_samples, split, seed)
    if out is not None:
        check_output(out, force)
    target = select_run(run_dir, runs_dir, variant and variant.value, mask, inputs)
    context = Context(data_dir, device.value)
    if target is None:
        paths = compare_runs(runs_dir, config, context, out)
    else:  # a run without a baseline net takes its baseline row from a baseline run beside it
        paths = [sample_grid(target, config, context, out)]
    for path in paths:
        console.print(f"wrote {escape(str(path))}", highlight=False)


@app.command("plot")
@_friendly
def plot_cmd(
    runs_dir: RunsDir = Path("runs"),
    out: Annotated[
        Optional[Path], typer.Option(help="PNG to write (default: RUNS_DIR/plots.png).")
    ] = None,
    force: ForceOut = False,
) -> None:
    """Training curves of every run in RUNS_DIR and, where evaluated, its NCLL on test and train images beside the outside figure measured the same way."""
    from .plots import plot_runs
    from .runs import check_output

    if out is not None:
        check_output(out, force)
    console.print(f"wrote {escape(str(plot_runs(runs_dir, out)))}", highlight=False)
