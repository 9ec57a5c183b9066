"""Evaluation proposals: the distribution q(z|x,y) that ``evaluate``'s importance sampler draws from.

    guide     the recognition net as trained (the reference's protocol); a GSNN's prior
    tuned     a copy of the recognition net fitted after training to the frozen model, on the
              *training* images with masks drawn as in training, maximising each image's
              importance-weighted bound with K = S and doubly reparameterised gradients
              (``tune_proposal``); stored beside the checkpoint it was fitted to
    refined   per evaluated image, the loc and log-scale of the tuned proposal (else the guide)
              improved by a few Adam steps on that image's own importance-weighted bound, the
              model frozen, then S fresh draws (``Refine``)

The estimate (1/S) sum_s p(y, z_s|x) / q(z_s) is unbiased for p(y|x) with any proposal fixed
before its S draws: the refined one looks at the image's y, as the guide does, and its fitting
draws are independent of the final ones. So -log of it is an upper bound on NCLL in expectation
with each of them; a better proposal makes it a tighter one at the same S.
"""

from __future__ import annotations

import copy
import enum
import math
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pyro
import pyro.distributions as dist
import torch

from .config import Refine, require_at_least_one, resolve_device
from .data import Split, epoch_batches, load_split
from .model import CVAE, Variant
from .nets import GaussianNet
from .objectives import (
    Elbo,
    GuideGradient,
    GuidePathGradient,
    Objective,
    TrainingObjective,
    make_elbo,
)
from .runs import Run, RunError

# a chunk of images -> the guide function (x, y, hidden) that draws their z
ChunkProposal = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Callable]


class ProposalKind(str, enum.Enum):
    """Which proposal an evaluation used; its value names the evaluation's file and table row."""

    guide = "guide"
    tuned = "tuned"
    refined = "refined"


def frozen(cvae: CVAE) -> CVAE:
    """The model for fitting a proposal: no parameter takes a gradient (so autograd computes only
    the path through the nets to z), and eval mode, so that ``pyro.module`` quietly skips the
    frozen parameters instead of warning."""
    cvae.requires_grad_(False)
    return cvae.eval()


def gaussian_guide(loc: torch.Tensor, scale: torch.Tensor) -> Callable:
    """A guide drawing z ~ N(loc, scale) per image of a chunk ``(B, z_dim)``."""

    def guide(x, y=None, hidden=None):
        with pyro.plate("data", x.shape[-2], dim=-1):
            return pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    return guide


def net_guide(net: GaussianNet, name: str = "tuned_recognition_net") -> Callable:
    """The guide q(z|x,y) of a recognition net, as ``CVAE.guide`` with another net."""

    def guide(x, y=None, hidden=None):
        pyro.module(name, net)
        with pyro.plate("data", x.shape[-2], dim=-1):
            loc, scale = net(torch.where(hidden, y, x))
            return pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    return guide


# ---------------------------------------------------------------------------------------------
# tuned: a copy of the recognition net fitted on training images

TUNE_PARTICLES = 100  # K = S of the evaluation it is for
TUNE_STEPS = 600  # the probe: 600 steps recovered 0.7 nat, 1,200 no more
TUNE_BATCH = 32
TUNE_LR = 3e-4
TUNE_BUDGET = 0.15  # at most this share of the run's training time
TUNE_CLIP = 1.0  # as in training


@dataclass
class TuneResult:
    path: Path
    steps: int
    seconds: float
    budget_s: float | None
    bound: float  # the mean per-image bound over the last steps (nats, higher is better)


def tune_recognition_net(
    cvae: CVAE,
    images: torch.Tensor,
    mask: str = "random",
    inputs: int | None = None,
    particles: int = TUNE_PARTICLES,
    steps: int = TUNE_STEPS,
    batch_size: int = TUNE_BATCH,
    lr: float = TUNE_LR,
    seed: int = 0,
    budget_s: float | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[GaussianNet, int, float]:
    """A copy of ``cvae``'s recognition net fitted to its frozen model on ``images`` (training
    images; fresh masks each pass, drawn as ``epoch_batches`` draws them in training), each step
    on Pyro's ``RenyiELBO(alpha=0)`` with K = ``particles`` and DReG gradients, through the
    training step's ``TrainingObjective``. Stops after ``steps`` steps or ``budget_s`` seconds.
    Returns the net, the steps taken and the mean bound per image of the last 50 steps."""
    if cvae.recognition_net is None:
        raise ValueError(f"{cvae.variant.name} has no recognition net to tune.")
    tuning = frozen(copy.deepcopy(cvae))
    tuning.recognition_net.requires_grad_(True)
    params = list(tuning.recognition_net.parameters())
    optimizer = torch.optim.Adam(params, lr=lr)
    # hybrid weight 1: a hybrid run's proposal is its CVAE term's guide alone
    objective = TrainingObjective.around(
        make_elbo(Elbo.iwae, particles), 1.0, GuideGradient.dreg, cvae.variant.objective
    )
    pyro.clear_param_store()
    started, done, recent = time.perf_counter(), 0, []
    epoch = 0
    with pyro.validation_enabled(False):
        while done < steps:
            for batch in epoch_batches(images, batch_size, epoch, seed, mask, inputs or 1):
                optimizer.zero_grad(set_to_none=True)
                values = objective.backward(tuning, batch)
                torch.nn.utils.clip_grad_norm_(params, TUNE_CLIP)
                optimizer.step()
                done += 1
                recent = [*recent[-49:], -values["loss"]]
                if progress is not None:
                    progress(done, sum(recent) / len(recent))
                out_of_time = budget_s is not None and time.perf_counter() - started >= budget_s
                if done >= steps or out_of_time:
                    break
            epoch += 1
            if budget_s is not None and time.perf_counter() - started >= budget_s:
                break
    net = tuning.recognition_net.requires_grad_(False)
    return net, done, sum(recent) / max(len(recent), 1)


def training_seconds(run: Run) -> float | None:
    """How long the run trained, from its per-epoch records (None if they do not say)."""
    seconds = [r.get("seconds") for r in run.read_metrics()]
    return sum(seconds) if seconds and all(isinstance(s, (int, float)) for s in seconds) else None


def tune_proposal(
    run_dir: str | Path,
    particles: int = TUNE_PARTICLES,
    steps: int = TUNE_STEPS,
    batch_size: int = TUNE_BATCH,
    lr: float = TUNE_LR,
    budget_s: float | None = None,
    seed: int = 0,
    data_dir: str | Path | None = None,
    device: str | torch.device = "auto",
    images: torch.Tensor | None = None,
    log: Callable[[str], None] = print,
    progress: Callable[[int, int, float], None] | None = None,
) -> TuneResult:
    """Fit the run's tuned proposal on its training images (``images`` replaces them: tests) and
    save it as ``proposal-tuned.pt`` beside the checkpoint it was fitted to. The budget is
    ``budget_s`` seconds, by default ``TUNE_BUDGET`` of the run's training time. Nothing is
    written until it is done: an interrupted tuning leaves what was there."""
    require_at_least_one(particles=particles, steps=steps, batch_size=batch_size)
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"--lr must be a positive number, got {lr}.")
    device = resolve_device(device) if isinstance(device, str) else device
    run = Run(run_dir)
    cvae, config, checkpoint = run.load(device, log)
    if cvae.recognition_net is None:
        raise RunError(
            f"{run.path} is a {config.variant} run, which has no recognition net to tune; "
            "evaluate it with --proposal guide or refined."
        )
    if budget_s is None:
        trained = training_seconds(run)
        budget_s = None if trained is None else TUNE_BUDGET * trained
    if images is None:  # the training split only: a tuned proposal never sees a test image
        images, _ = load_split(Split.train, data_dir, config.limit)
    elif config.limit is not None:
        images = images[: config.limit]
    budget = "no time limit" if budget_s is None else f"at most {budget_s:.0f} s"
    log(
        f"tuning a proposal for {run.path} (step {checkpoint['step']}) on {len(images)} training "
        f"images: up to {steps} steps of {batch_size} images, K={particles}, Adam {lr:g}, {budget}"
    )
    pyro.set_rng_seed(seed)
    started = time.perf_counter()
    net, done, bound = tune_recognition_net(
        cvae,
        images.to(device),
        config.mask.value,
        config.inputs,
        particles,
        steps,
        batch_size,
        lr,
        seed,
        budget_s,
        None if progress is None else lambda k, b: progress(k, steps, b),
    )
    seconds = time.perf_counter() - started
    state = {
        "recognition_net": {k: v.cpu() for k, v in net.state_dict().items()},
        "run_id": checkpoint.get("run_id"),
        "step": int(checkpoint["step"]),
        "id": uuid.uuid4().hex,  # names this fit in the evaluations that use it
        "particles": particles,
        "steps": done,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "images": len(images),
        "seconds": round(seconds, 2),
        "bound": bound,
    }
    path = run.write_tuned_proposal(state)
    return TuneResult(path, done, seconds, budget_s, bound)


def load_tuned(run: Run, cvae: CVAE, checkpoint: dict) -> tuple[GaussianNet, dict]:
    """The run's tuned recognition net (``RunError`` if missing or void) and its record."""
    state = run.read_tuned_proposal(checkpoint)
    net = copy.deepcopy(cvae.recognition_net)
    net.load_state_dict(state.pop("recognition_net"))
    device = next(cvae.parameters()).device
    return net.to(device).requires_grad_(False).eval(), state


# ---------------------------------------------------------------------------------------------
# refined: per image, a few steps on its own bound, then fresh draws


def refine(
    cvae: CVAE,
    x: torch.Tensor,
    y: torch.Tensor,
    hidden: torch.Tensor,
    loc: torch.Tensor,
    scale: torch.Tensor,
    options: Refine,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's (loc, scale) ``(B, z_dim)`` after ``options.steps`` Adam steps on its own
    importance-weighted bound log (1/K) sum_k p(y, z_k|x) / q(z_k), ``cvae`` frozen, all images
    of the chunk at once (Adam is elementwise: each image's parameters move on its own bound).
    The gradient is DReG's: ``GuidePathGradient`` scores z with a stopped q and weights each
    particle's path gradient by its normalised weight, which the bound's logsumexp weights once
    more."""
    from .evaluate import log_weights

    loc = loc.detach().clone().requires_grad_(True)
    log_scale = scale.log().detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([loc, log_scale], lr=options.lr)
    kept = {}
    weights = GuidePathGradient(lambda: torch.softmax(kept["log_w"].detach(), 0))
    with torch.enable_grad(), pyro.validation_enabled(False):
        for _ in range(options.steps):
            optimizer.zero_grad(set_to_none=True)
            with weights:
                guide = gaussian_guide(loc, log_scale.exp())
                kept["log_w"] = log_w = log_weights(cvae, x, y, hidden, options.particles, guide)
            (-log_w.logsumexp(0).sum()).backward()
            optimizer.step()
    kept.clear()
    return loc.detach(), log_scale.detach().exp()


def start_of(cvae: CVAE, tuned: GaussianNet | None) -> Callable:
    """(x, y, hidden) -> (loc, scale) of the proposal that refinement starts from: the tuned net,
    else the recognition net, else (a GSNN) the prior."""

    def start(x, y, hidden):
        if tuned is not None:
            return tuned(torch.where(hidden, y, x))
        if cvae.recognition_net is not None:
            return cvae.recognition_net(torch.where(hidden, y, x))
        return cvae.prior(x, hidden)

    return start


def refined(cvae: CVAE, tuned: GaussianNet | None, options: Refine) -> ChunkProposal:
    """The refined proposal of each chunk of images: ``refine`` run on the chunk (drawing its
    own particles), then a guide whose draws, made after, are fresh."""
    start = start_of(cvae, tuned)

    def proposal(x, y, hidden):
        loc, scale = refine(cvae, x, y, hidden, *start(x, y, hidden), options)
        return gaussian_guide(loc, scale)

    return proposal


# ---------------------------------------------------------------------------------------------
# choosing the proposal of an evaluation


@dataclass
class Chosen:
    """The proposal an evaluation uses: its kind, what it is, and the chunk proposal to pass to
    ``ncll_per_image`` (None: the model's own, the guide)."""

    kind: ProposalKind
    detail: str
    identity: str  # equal for evaluations of the same proposal (a saved one is reused only then)
    chunks: ChunkProposal | None = None


def filed_kind(variant: Variant, kind: str | ProposalKind | None) -> ProposalKind:
    """The proposal an evaluation of ``variant`` asked for ``kind`` uses, and is filed under: the
    guide for a model without a latent (exact: nothing to propose), else ``kind``, by default
    the best a run has, refined."""
    if variant.objective is Objective.baseline:
        return ProposalKind.guide
    return ProposalKind.refined if kind is None else ProposalKind(kind)


def unavailable(variant: Variant, kind: str | ProposalKind) -> str | None:
    """Why ``variant`` cannot be evaluated with the proposal ``kind`` (a sweep's table says so in
    that cell), or None: a model without a latent has nothing to propose (its NCLL is exact,
    filed under the guide), and a model without a recognition net has nothing to tune."""
    kind = ProposalKind(kind)
    if variant.objective is Objective.baseline and kind is not ProposalKind.guide:
        return f"{variant.name} has no latent: its NCLL is exact, under guide"
    if kind is ProposalKind.tuned and not variant.has_recognition_net:
        return f"{variant.name} has no recognition net to tune"
    return None


def choose(
    run: Run,
    cvae: CVAE,
    checkpoint: dict,
    kind: str | ProposalKind | None = None,
    options: Refine | None = None,
    log: Callable[[str], None] = print,
) -> Chosen:
    """The proposal ``kind`` of a loaded run (``filed_kind``); ``RunError`` when asked for a
    tuned proposal that is missing or void. Refined starts from the tuned proposal when the run
    has a current one, else from the guide (and says why)."""
    kind = filed_kind(cvae.variant, kind)
    _, guide_kind = cvae.proposal()
    if kind is ProposalKind.guide:
        return Chosen(ProposalKind.guide, guide_kind.value, "guide")
    frozen(cvae)
    if kind is ProposalKind.tuned:
        if cvae.recognition_net is None:
            raise RunError(
                f"{run.path} is a {cvae.variant.name} run, which has no recognition net to tune; "
                "evaluate it with --proposal guide or refined."
            )
        net, state = load_tuned(run, cvae, checkpoint)
        detail = f"tuned recognition net ({state['steps']} steps, K={state['particles']})"
        return Chosen(kind, detail, f"tuned {state['id']}", lambda x, y, h, g=net_guide(net): g)
    options = options or Refine()
    tuned, base, base_id = None, guide_kind.value, "guide"
    if cvae.recognition_net is not None and run.tuned_proposal_path.is_file():
        try:
            tuned, state = load_tuned(run, cvae, checkpoint)
            base, base_id = "the tuned proposal", f"tuned {state['id']}"
        except RunError as e:
            log(f"note: refining from the guide: {e}")
    detail = f"refined per image from {base}: {options.describe()}"
    identity = f"refined from {base_id}: {options}"
    return Chosen(kind, detail, identity, refined(cvae, tuned, options))


def plan(run_dir: str | Path, kind: str | None, options: Refine | None) -> Chosen:
    """The proposal ``choose`` would give the run now (to tell whether a saved evaluation used it)."""
    run = Run(run_dir)
    cvae, _, checkpoint = run.load("cpu")
    return choose(run, cvae, checkpoint, kind, options, log=lambda message: None)
