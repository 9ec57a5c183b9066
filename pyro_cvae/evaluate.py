"""Negative conditional log-likelihood (NCLL) of the hidden pixels, by importance sampling.

For each image, with S draws z_s from the proposal q(z|x,y):

    NCLL = -log (1/S) sum_s p(y|x,z_s) p(z_s|x) / q(z_s|x,y)

computed in log space, per image, from Pyro traces: the proposal is traced under a particle
plate and replayed in the model, so that all particles of a chunk of images pass through each
net as one matrix product, and the prior and recognition nets run once per image.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import pyro
import pyro.poutine as poutine
import torch

from .config import (
    Context,
    EvalConfig,
    TrainConfig,
    require_at_least_one,
    require_memory,
    with_options,
)
from .data import PIXELS, check_images, evaluation_masks, visible_input, whole_split_limit
from .model import CVAE, Proposal, Variant, get_variant
from .proposals import ChunkProposal, choose, filed_kind, plan
from .runs import Run, RunError, require_trained_runs


def _log_prob_per_image(trace) -> torch.Tensor:
    """Sum of the log-densities of a trace's sample sites, kept per particle and image ``(S, B)``."""
    trace.compute_log_prob()
    return sum(site["log_prob"] for site in trace.nodes.values() if site["type"] == "sample")


def log_weights(
    cvae: CVAE,
    x: torch.Tensor,
    y: torch.Tensor,
    hidden: torch.Tensor,
    samples: int,
    proposal: Callable | None = None,
) -> torch.Tensor:
    """Importance log-weights ``(S, B)``: log p(y, z_s | x) - log q(z_s | x, y), with z_s drawn
    from ``proposal`` (a guide of these images; default the model's, ``CVAE.proposal``)."""
    if proposal is None:
        proposal, _ = cvae.proposal()
    with pyro.plate("particles", samples, dim=-2):
        guide_trace = poutine.trace(proposal).get_trace(x, y, hidden)
        model_trace = poutine.trace(poutine.replay(cvae.model, trace=guide_trace)).get_trace(
            x, y, hidden
        )
    log_p = _log_prob_per_image(model_trace)
    log_q = _log_prob_per_image(guide_trace)  # 0 for a model without latent
    return (log_p - log_q).expand(samples, x.shape[0])


CHUNK_TENSORS = 8  # an evaluation chunk's peak, in (rows, 784) float tensors (no gradients)


@torch.no_grad()
def ncll_per_image(
    cvae: CVAE,
    images: torch.Tensor,
    hidden: torch.Tensor,
    samples: int = 100,
    image_batch: int = 50,
    max_rows: int = 5_000,
    progress: Callable[[int], None] | None = None,
    proposal: ChunkProposal | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """NCLL ``(N,)`` and effective sample size ``(N,)`` of each image ``(N, 784)``.

    Work is chunked: ``image_batch`` images at a time and, within those, as many particles as
    keep ``particles * images <= max_rows``, so memory is bounded whatever S is (chunks of
    about 5,000 rows stay in the CPU's cache: 30% faster than 25,000 here). Chunks of
    particles are combined exactly with a running logsumexp. ``progress`` is told the number of
    images done after each chunk. ``proposal`` gives the guide of each chunk of images (default:
    the model's, ``CVAE.proposal``); it is made before the chunk's S draws (``proposals``)."""
    require_at_least_one(samples=samples)
    check_images(images, hidden)
    samples = cvae.variant.importance_samples(samples)
    return _ncll_drawn(cvae, images, hidden, samples, image_batch, max_rows, progress, proposal)


@torch.no_grad()  # a refined proposal turns gradients on for its own fitting only
def _ncll_drawn(
    cvae, images, hidden, samples, image_batch, max_rows=5_000, progress=None, proposal=None
):
    """``ncll_per_image`` with ``samples`` the S drawn; refused before it allocates a chunk
    that cannot fit. Without gradients: each chunk's graph would otherwise be kept with its
    result, about 2 MB per image at S=100 (an evaluation of the 10,000 test images ran out of
    24 GB)."""
    per_chunk = min(image_batch, len(images))
    rows = per_chunk * max(1, min(samples, max_rows // per_chunk))  # as the loop below cuts them
    require_memory(
        images.device,
        per_unit=PIXELS * 4 * CHUNK_TENSORS,
        units=rows,
        what=f"a chunk of {rows:,} rows (images x particles, --batch-size {image_batch}) x "
        f"{PIXELS} pixels x 4 bytes x ~{CHUNK_TENSORS} tensors",
        fits=lambda n: f"ask for --batch-size {max(1, n)} or fewer",
    )
    ncll, ess = [], []
    for start in range(0, len(images), image_batch):
        y = images[start : start + image_batch]
        h = hidden[start : start + image_batch]
        x = visible_input(y, h)
        per_chunk = max(1, min(samples, max_rows // len(y)))
        guide = None if proposal is None else proposal(x, y, h)
        lse = lse2 = torch.full((len(y),), -math.inf, device=y.device)
        for done in range(0, samples, per_chunk):
            lw = log_weights(cvae, x, y, h, min(per_chunk, samples - done), guide)
            lse = torch.logaddexp(lse, lw.logsumexp(0))
            lse2 = torch.logaddexp(lse2, (2 * lw).logsumexp(0))
        ncll.append(math.log(samples) - lse)
        ess.append(torch.exp(2 * lse - lse2))  # (sum w)^2 / sum w^2
        if progress is not None:
            progress(start + len(y))
    return torch.cat(ncll), torch.cat(ess)


@dataclass
class Evaluation:
    """What ``evaluate`` reports and writes to the run directory (``Run.evaluation_path``)."""

    run_dir: str
    variant: str
    epochs: int
    split: str
    mask: str
    inputs: int
    samples: int
    images: int
    ncll: float
    ncll_se: float
    ess_mean: float
    proposal: str  # guide, tuned or refined (proposals.ProposalKind)
    seed: int
    seconds: float
    step: int | None = (
        None  # of the checkpoint evaluated: the result counts while that checkpoint is the run's
    )
    run_id: str | None = None
    proposal_detail: str | None = None  # what the proposal is, and its settings
    proposal_id: str | None = None  # proposals.Chosen.identity
    path: str | None = None  # where it was saved


def filed(config: EvalConfig, variant: Variant, split_size: int) -> EvalConfig:
    """The options as a result of ``variant`` is filed under: S as drawn (one for the
    deterministic baseline), no limit where it covers the split's ``split_size`` images, and
    the proposal used (``proposals.filed_kind``)."""
    samples = variant.importance_samples(config.samples)
    limit = whole_split_limit(config.limit, split_size)
    proposal = filed_kind(variant, config.proposal).value
    return replace(config, samples=samples, limit=limit, proposal=proposal)


def evaluation_inputs(
    config: EvalConfig, run: TrainConfig, context: Context
) -> tuple[torch.Tensor, torch.Tensor]:
    """The images ``(N, 784)`` evaluated and their hidden masks ``(N, 784)``: masks fixed per
    image index by the seed over the whole split, so that a limit takes a prefix of them."""
    images = context.split_images(config.split)
    hidden = evaluation_masks(len(images), run.mask, run.inputs, config.seed)
    if config.limit is not None:
        images, hidden = images[: config.limit], hidden[: config.limit]
    return images.to(context.device), hidden.to(context.device)


def evaluate_run(
    run_dir: str | Path,
    config: EvalConfig | None = None,
    context: Context | None = None,
    **options,
) -> Evaluation:
    """Evaluate a trained run and write its results file (one per split, S, image count, seed
    and proposal). ``options``: fields of ``EvalConfig`` or ``Context`` by name (``samples=10``,
    ``proposal="guide"``; proposal None: the best the run has, ``proposals.filed_kind``). A
    result that cannot be saved is a ``RunError`` whose message holds the NCLL."""
    config, context = with_options(EvalConfig, config, context, options)
    run = Run(run_dir)
    loaded = run.load(context.device, context.log)
    context = replace(context, images=context.split_images(config.split))  # read once
    return _evaluate(run, loaded, filed(config, loaded[0].variant, len(context.images)), context)


def _evaluate(run: Run, loaded: tuple, config: EvalConfig, context: Context) -> Evaluation:
    """``evaluate_run`` on a loaded run (model, config, checkpoint), ``config`` as ``filed``
    and ``context`` holding the split's images."""
    (cvae, trained, checkpoint), log = loaded, context.log
    if checkpoint["epoch"] < trained.epochs:
        log(f"note: {run.path} is trained for {checkpoint['epoch']} of {trained.epochs} epochs.")
    images, hidden = evaluation_inputs(config, trained, context)
    chosen = choose(run, cvae, checkpoint, config.proposal, config.refine, log)
    if cvae.proposal()[1] is Proposal.prior and chosen.kind.value == "guide":
        log("note: this run has no recognition net: the prior p(z|x) is the importance proposal.")
    pyro.set_rng_seed(config.seed)
    started = time.perf_counter()
    progress = context.progress
    report = None if progress is None else lambda done: progress(done, len(images), run.path.name)
    ncll, ess = _ncll_drawn(
        cvae,
        images,
        hidden,
        config.samples,
        config.batch_size,
        progress=report,
        proposal=chosen.chunks,
    )
    result = Evaluation(
        run_dir=str(run.path),
        variant=trained.variant,
        epochs=int(checkpoint["epoch"]),
        split=config.split.value,
        mask=trained.mask.value,
        inputs=trained.inputs,
        samples=config.samples,
        images=len(ncll),
        ncll=ncll.mean().item(),
        ncll_se=(ncll.std() / math.sqrt(len(ncll))).item() if len(ncll) > 1 else float("nan"),
        ess_mean=ess.mean().item(),
        proposal=chosen.kind.value,
        seed=config.seed,
        seconds=round(time.perf_counter() - started, 2),
        step=int(checkpoint["step"]),
        run_id=checkpoint.get("run_id"),
        proposal_detail=chosen.detail,
        proposal_id=chosen.identity,
    )
    record = asdict(result)
    del record["path"]
    try:
        result.path = str(run.write_evaluation(record, config.limit))
    except OSError as e:
        raise RunError(
            f"NCLL {result.ncll:.3f} ± {result.ncll_se:.3f} ({result.images} {result.split} "
            f"images, S={result.samples}, {result.proposal} proposal) could not be saved in "
            f"{run.path} ({type(e).__name__}: {e}); free space or fix its permissions and "
            "evaluate again."
        ) from None
    return result


def saved_evaluation(run_dir: str | Path, config: EvalConfig) -> Evaluation | None:
    """The run's saved evaluation under these options as ``filed`` (S as drawn, the proposal
    named), if it is of its present weights."""
    record = Run(run_dir).current_evaluation(
        config.split.value, config.samples, config.limit, config.seed, config.proposal
    )
    try:
        return Evaluation(**record) if record is not None else None
    except TypeError:  # a record of another shape
        return None


def evaluate_runs(
    runs_dir: str | Path,
    config: EvalConfig | None = None,
    context: Context | None = None,
    force: bool = False,
    **options,
) -> list[tuple[Evaluation, bool]]:
    """Evaluate every trained run in ``runs_dir`` (``runs.trained_runs``), reusing a saved
    evaluation that is still current (same weights, same proposal) unless ``force``:
    (evaluation, whether it was reused) per run. ``config.proposal`` None: each run's best; a
    run that cannot have the one asked (no tuned proposal, or a void one) is left out, saying
    why. ``context.progress`` is told (images done, images in all, run name) over all the runs
    to do; ``options`` as for ``evaluate_run``."""
    config, context = with_options(EvalConfig, config, context, options)
    runs = require_trained_runs(runs_dir, context.log)
    context = replace(context, images=context.split_images(config.split))  # read once for all
    size = len(context.images)
    configs = {d: filed(config, get_variant(trained.variant), size) for d, trained in runs}
    results: dict[Path, tuple[Evaluation, bool]] = {}
    for run_dir, run_config in list(configs.items()):
        try:  # the proposal the run would be evaluated with now
            planned = plan(run_dir, run_config.proposal, run_config.refine)
        except RunError as e:
            context.log(f"{run_dir.name} left out: {e}")
            del configs[run_dir]
            continue
        saved = None if force else saved_evaluation(run_dir, run_config)
        if saved is not None and (saved.proposal_id or "guide") == planned.identity:
            results[run_dir] = (saved, True)
    if not configs:
        raise RunError(
            f"no run in {runs_dir} has a {config.proposal} proposal; fit them with pyro-cvae "
            "tune-proposal --run-dir DIR, or drop --proposal to use each run's best."
        )
    to_do = [run_dir for run_dir, _ in runs if run_dir in configs and run_dir not in results]
    count = min(config.limit or size, size)  # images per run
    for k, run_dir in enumerate(to_do):
        report = None
        if context.progress is not None:

            def report(done: int, _all: int, name: str, before: int = k * count) -> None:
                context.progress(before + done, len(to_do) * count, name)

        run = Run(run_dir)
        loaded = run.load(context.device, context.log)
        result = _evaluate(run, loaded, configs[run_dir], replace(context, progress=report))
        context.log(
            f"{run_dir.name}: NCLL {result.ncll:.3f} ± {result.ncll_se:.3f} on {result.images} "
            f"{result.split} images with the {result.proposal} proposal ({result.seconds:.1f} s)"
        )
        results[run_dir] = (result, False)
    return [results[run_dir] for run_dir, _ in runs if run_dir in results]
