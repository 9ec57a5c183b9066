"""Training: the objective from Pyro traces, the optimisation step, and the loop that trains
(or resumes) a run. What a run directory holds, and how it is read and written, is ``runs``'s.
"""

from __future__ import annotations

import contextlib
import enum
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pyro
import torch
from pyro.infer import ELBO, RenyiELBO, Trace_ELBO, TraceMeanField_ELBO
from pyro.poutine.messenger import Messenger

from .config import TrainConfig, require_memory, resolve_device
from .console import Progress, StopOnInterrupt, signal_name
from .data import PIXELS, Batch, check_limit, epoch_batches, load_split, steps_per_epoch
from .estimators import GuideGradient, GuidePathGradient
from .model import CVAE, Elbo, Objective, get_variant, guide_gradient_problem
from .runs import Run, RunError, baseline_run_dir, default_run_dir, new_run_id

# ---------------------------------------------------------------------------------------------
# The objective: Pyro's ELBO objects


def make_elbo(kind: Elbo, particles: int) -> ELBO:
    """The Pyro ELBO object of a training objective, K particles vectorised over a plate at dim -2.

    meanfield: ``TraceMeanField_ELBO`` (the closed-form KL: the reference's objective);
    trace: ``Trace_ELBO`` (Monte Carlo KL); iwae: ``RenyiELBO(alpha=0)``, the importance-weighted
    bound log (1/K) sum_k p(y, z_k|x) / q(z_k|x,y), per image (the data plate is kept)."""
    options = dict(num_particles=particles, vectorize_particles=particles > 1, max_plate_nesting=1)
    if kind == Elbo.iwae:
        return RenyiELBO(alpha=0.0, **options)
    return (TraceMeanField_ELBO if kind == Elbo.meanfield else Trace_ELBO)(**options)


def _terms(cvae: CVAE, hybrid_weight: float) -> list[tuple[float, Callable]]:
    """The variant's objective as (weight, guide) pairs, each an ELBO of ``cvae.model``: the CVAE
    (the recognition net as guide), the GSNN (the prior as guide: log p(z|x) - log q(z) cancels,
    leaving E_prior[log p(y|x,z)]), their weighted sum (hybrid), or the baseline (no latent: the
    guide samples nothing and the ELBO is log p(y|x), minus the BCE)."""
    kind = cvae.variant.objective
    if kind is Objective.gsnn:
        return [(1.0, cvae.prior_guide)]
    if kind is Objective.hybrid:
        return [(hybrid_weight, cvae.guide), (1.0 - hybrid_weight, cvae.prior_guide)]
    return [(1.0, cvae.guide)]  # cvae, and baseline (whose guide is empty)


@torch.no_grad()
def _log_terms(model: "Draws", guide: "Draws | None") -> tuple[torch.Tensor, torch.Tensor]:
    """log p(y|x,z) and log p(z|x) - log q(z|x,y) of the draws an ELBO used, per particle and image
    ``(K, B)`` (``(B,)`` with one particle), recomputed from the sites' distributions."""
    y = model.sites["y"]
    log_lik = y["fn"].log_prob(y["value"])
    if (
        guide is None or "z" not in guide.sites
    ):  # not asked, no latent (baseline), no recognition net (GSNN)
        return log_lik, torch.zeros_like(log_lik)
    q, p = guide.sites["z"], model.sites["z"]
    return log_lik, p["fn"].log_prob(q["value"]) - q["fn"].log_prob(q["value"])


class Draws(Messenger):
    """Keeps the sample sites (distribution and value) of the last run of the function it wraps
    (``draws(fn)``): the draws an ELBO used. ``poutine.trace`` would do, but it also copies every parameter site
    (24 per step here), which costs more than the step's recon and KL are worth."""

    def __init__(self):
        super().__init__()
        self.sites: dict[str, dict] = {}

    def _postprocess_message(self, msg) -> None:
        if msg["type"] == "sample":
            self.sites[msg["name"]] = msg


def _normalized_weights(model, guide, kept: dict) -> Callable[[], torch.Tensor]:
    """The particles' normalised importance weights ``(K, B)``, read from the ``Draws`` of ``model``
    and ``guide`` when called: in the backward pass, after the draws. The log terms they come from
    are left in ``kept["terms"]``, for the step's record."""

    def weights() -> torch.Tensor:
        kept["terms"] = log_lik, log_ratio = _log_terms(model, guide)
        log_w = log_lik + log_ratio
        return torch.softmax(log_w, 0) if log_w.dim() > 1 else torch.ones_like(log_w)

    return weights


def objective_backward(
    cvae: CVAE,
    batch: Batch,
    elbo: ELBO,
    hybrid_weight: float = 0.5,
    guide_gradient: GuideGradient = GuideGradient.reparam,
) -> dict[str, float]:
    """Accumulate into ``.grad`` the gradient of the variant's loss, a mean over the batch's images,
    through the Pyro ELBO object ``elbo``; returns its terms per image: ``loss``, ``recon``, ``kl``.

    ``differentiable_loss`` gives the loss of ``Trace_ELBO``/``TraceMeanField_ELBO`` as a tensor;
    ``RenyiELBO`` has none, and its ``loss_and_grads`` runs the backward pass itself, on the sum
    over images, so its gradient is scaled afterwards. recon and KL come from the traces of the
    first term's draws (for meanfield, KL is the closed form: loss - recon). ``guide_gradient``
    stl, dreg or rws wraps the ELBO call in ``GuidePathGradient``."""
    guide_gradient = GuideGradient(guide_gradient)
    kind = (
        Elbo.iwae
        if isinstance(elbo, RenyiELBO)
        else Elbo.meanfield
        if isinstance(elbo, TraceMeanField_ELBO)
        else Elbo.trace
    )
    problem = guide_gradient_problem(
        guide_gradient, kind, elbo.num_particles, cvae.variant.objective
    )
    if problem:
        raise ValueError(problem + ".")
    args = (batch.x, batch.y, batch.hidden)
    n = batch.x.shape[0]
    params = cvae.trainable_parameters()
    loss, recon, kl = 0.0, 0.0, 0.0
    first = True
    for weight, guide in _terms(cvae, hybrid_weight):
        if weight == 0:
            continue
        model_draws, guide_draws = Draws(), Draws()  # keep the draws for recon and KL
        model, guide = model_draws(cvae.model), guide_draws(guide)
        path_gradient = contextlib.nullcontext()
        kept = {}  # the log terms the weights were computed from, if they were
        if guide_gradient != GuideGradient.reparam:
            weights = None  # stl
            if guide_gradient != GuideGradient.stl:
                w = _normalized_weights(model_draws, guide_draws, kept)
                # RenyiELBO's path gradient reaching z_k is w~_k dlog w_k/dz_k: times w~_k (DReG), or times
                # 1 - w~_k (the wake-phase update, w~_k - w~_k^2)
                weights = w if guide_gradient == GuideGradient.dreg else (lambda w=w: 1 - w())
            path_gradient = GuidePathGradient(weights)
        with path_gradient:
            if isinstance(elbo, RenyiELBO):
                earlier = [p.grad for p in params]
                for p in params:
                    p.grad = None
                term = elbo.loss_and_grads(model, guide, *args)
                torch._foreach_mul_([p.grad for p in params if p.grad is not None], weight / n)
                for p, g in zip(params, earlier):
                    if g is not None:
                        p.grad = g if p.grad is None else p.grad.add_(g)
            else:
                term_tensor = elbo.differentiable_loss(model, guide, *args)
                (term_tensor * (weight / n)).backward()
                term = term_tensor.item()
        loss += weight * term / n
        if first:  # recon and KL of the first term computed (the CVAE's, in a hybrid)
            first = False
            closed_form_kl = isinstance(
                elbo, TraceMeanField_ELBO
            )  # then KL = loss - recon, nothing to recompute
            log_lik, log_ratio = kept.get("terms") or _log_terms(
                model_draws, None if closed_form_kl else guide_draws
            )
            particles = log_lik.numel() / n
            recon = -log_lik.sum().item() / particles / n
            kl = term / n - recon if closed_form_kl else -log_ratio.sum().item() / particles / n
        # DReG's hook on z refers to the draws, which refer to z: a cycle through autograd that
        # Python's collector cannot see; dropping the draws breaks it (else every step leaks its graph)
        model_draws.sites.clear()
        guide_draws.sites.clear()
    return {"loss": loss, "recon": recon, "kl": kl}


def make_optimizer(cvae: CVAE, lr: float) -> torch.optim.Adam:
    """One fused Adam over all trainable parameters (not Pyro's one optimiser per parameter), so
    that clipping is on the global norm, as in the reference, and the update is one pass over
    memory (about 4x faster on CPU than the per-tensor loop; same update rule)."""
    return torch.optim.Adam(cvae.trainable_parameters(), lr=lr, fused=True)


def train_step(
    cvae: CVAE,
    batch: Batch,
    optimizer: torch.optim.Optimizer,
    config: "TrainConfig",
    elbo: ELBO | None = None,
) -> dict[str, float]:
    """One optimisation step on the per-image mean loss; returns its terms. A non-finite loss
    leaves the parameters untouched (the caller stops the run). ``elbo``: the run's ELBO object
    (built once by the loop, here when not given)."""
    optimizer.zero_grad(set_to_none=True)
    with pyro.validation_enabled(False):  # argument checks cost time, and NaN is caught below
        elbo = elbo or make_elbo(Elbo(config.elbo), config.particles)
        values = objective_backward(
            cvae, batch, elbo, config.hybrid_weight, GuideGradient(config.guide_gradient)
        )
    params = [p for group in optimizer.param_groups for p in group["params"]]
    torch.nn.utils.clip_grad_norm_(params, config.clip_norm, foreach=True)
    if math.isfinite(values["loss"]):
        optimizer.step()
    return values


# ---------------------------------------------------------------------------------------------
# The loop


class Status(str, enum.Enum):
    finished = "finished"
    already_finished = "already finished"
    interrupted = "interrupted"


@dataclass
class TrainResult:
    run_dir: Path
    epochs_done: int
    steps: int
    seconds: float
    status: Status
    signum: int | None = None  # the signal that interrupted it


def train(
    config: TrainConfig,
    run_dir: str | Path | None = None,
    runs_dir: str | Path | None = None,
    data_dir: str | Path | None = None,
    device: str | torch.device = "auto",
    force: bool = False,
    log: Callable[[str], None] = print,
    progress: bool = True,
    images: torch.Tensor | None = None,
) -> TrainResult:
    """Train (or resume) one run in ``run_dir`` (default ``runs_dir/<variant>``). A pretrained
    baseline is looked up in (or trained into) ``runs_dir``, by default the folder holding the
    run. ``images`` ``(N, 784)`` replaces the MNIST training split (tests).

    The run is locked while it trains. Nothing of what it held before changes until the new run
    has its data and baseline and writes its first checkpoint (``--force`` included)."""
    config.validate()
    device = resolve_device(device) if isinstance(device, str) else device
    if run_dir is None:
        runs_dir = Path(runs_dir if runs_dir is not None else "runs")
        run_dir = default_run_dir(runs_dir, config)
    run = Run(Path(run_dir))
    runs_dir = Path(runs_dir) if runs_dir is not None else run.path.parent
    with run.lock():
        checkpoint = None
        if run.exists() and not force:
            checkpoint = run.read_checkpoint(device)
            try:
                saved = run.config(checkpoint, log)
            except ValueError as e:
                raise RunError(
                    f"{run.checkpoint_path} holds a config that is not valid ({e}); "
                    "pass --force to start the run over."
                ) from None
            diff = saved.differences(config)
            if diff:
                raise RunError(
                    f"{run.path} holds a different run ({', '.join(f'{k}: {a!r} there, {b!r} asked' for k, (a, b) in diff.items())}); "
                    "pass --force to start it over or choose another --run-dir."
                )
            run.write_copies(checkpoint)  # were they lost to a kill after the checkpoint was saved?
            if checkpoint["epoch"] >= config.epochs:
                log(
                    f"{run.path} is already trained for {checkpoint['epoch']} epochs; pass --force to train it again."
                )
                return TrainResult(
                    run.path, checkpoint["epoch"], checkpoint["step"], 0.0, Status.already_finished
                )

        if images is None:
            images, _ = load_split("train", data_dir, config.limit)
        elif config.limit is not None:
            check_limit(config.limit, len(images))
            images = images[: config.limit]
        _require_step_memory(config, min(config.batch_size, len(images)), device)
        images = images.to(device)
        pretrained = None
        if checkpoint is None and get_variant(config.variant).pretrained:
            pretrained = _pretrained_baseline(config, runs_dir, device, data_dir, log, progress)
        return _train_loop(config, run, checkpoint, images, pretrained, device, log, progress)


STEP_TENSORS = 16  # a step's peak, in (K, B, 784) float tensors (measured: 8 to 14 on CPU)


def _require_step_memory(config: TrainConfig, batch: int, device: torch.device) -> None:
    """Refuse K particles of a batch whose step cannot fit in memory, before it allocates."""
    k = config.particles
    require_memory(
        device,
        per_unit=batch * PIXELS * 4 * STEP_TENSORS,
        units=k,
        what=f"--particles {k} with --batch-size {config.batch_size} (K x B x {PIXELS} pixels "
        f"x 4 bytes x ~{STEP_TENSORS} tensors of a step)",
        fits=lambda n: (
            f"at most --particles {n} fits with this batch size"
            if n >= 1
            else "a smaller --batch-size is needed"
        ),
    )


def _pretrained_baseline(
    config: TrainConfig, runs_dir: Path, device, data_dir, log, progress
) -> dict:
    """State dict of the pretrained baseline net, training it first when it is missing. A
    baseline trained on other data (images, masks) than the run's is refused."""
    wanted = config.baseline()
    base = Run(baseline_run_dir(runs_dir, config))
    found = None
    if base.exists():
        try:
            found = base.config()
        except ValueError as e:
            raise RunError(
                f"the pretrained baseline in {base.path} has a config that is not valid ({e}); "
                f"train it again: pyro-cvae train --variant baseline --run-dir {base.path} --force."
            ) from None
        if found.data_options() != wanted.data_options():
            there = ", ".join(
                f"{k} {v}" for k, v in found.data_options().items() if v != wanted.data_options()[k]
            )
            asked = ", ".join(
                f"{k} {v}" for k, v in wanted.data_options().items() if v != found.data_options()[k]
            )
            raise RunError(
                f"the pretrained baseline in {base.path} was trained on other data ({there}) than this run asks "
                f"({asked}); train it again with this run's options (pyro-cvae train --variant baseline "
                f"--run-dir {base.path} --force ...) or use another --runs-dir."
            )
    if not base.is_finished():
        log(
            f"{config.variant} needs a pretrained baseline; none finished in {base.path}: training it first."
        )
        result = train(
            wanted, run_dir=base.path, data_dir=data_dir, device=device, log=log, progress=progress
        )
        if result.status is not Status.finished:
            raise RunError(
                f"interrupted while pretraining the baseline in {base.path}; run the same command to resume."
            )
    else:
        log(f"using the pretrained baseline in {base.path}")
        if found.differences(wanted) or found.epochs != wanted.epochs:
            log(f"note: that baseline was trained with {found}, this run asks {wanted}")
    cvae, _, _ = base.load(device)
    return cvae.baseline_net.state_dict()


def _train_loop(
    config: TrainConfig,
    run: Run,
    checkpoint: dict | None,
    images: torch.Tensor,
    pretrained: dict | None,
    device: torch.device,
    log: Callable[[str], None],
    progress: bool,
) -> TrainResult:
    """The optimisation loop, from ``checkpoint`` (a resumed run) or from scratch, saving a
    checkpoint, with the epoch's metrics record, at the end of every epoch and on Ctrl-C."""
    variant = get_variant(config.variant)
    pyro.clear_param_store()
    pyro.set_rng_seed(config.seed)
    cvae = CVAE(variant).to(device)
    if pretrained is not None:
        cvae.baseline_net.load_state_dict(pretrained)
    optimizer = make_optimizer(cvae, config.lr)
    elbo = make_elbo(Elbo(config.elbo), config.particles)
    epoch, start_batch, step, run_id, metrics = 0, 0, 0, new_run_id(), []
    if checkpoint is not None:
        cvae.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        epoch, start_batch, step = checkpoint["epoch"], checkpoint["batch"], checkpoint["step"]
        run_id = checkpoint.get("run_id", run_id)
        metrics = checkpoint["metrics"] if "metrics" in checkpoint else run.read_metrics()
        torch.set_rng_state(checkpoint["rng"].cpu())
        if "cuda_rng" in checkpoint and device.type == "cuda":
            torch.cuda.set_rng_state(checkpoint["cuda_rng"].cpu())
        log(f"resuming {run.path} at epoch {epoch + 1}, batch {start_batch}, step {step}")
    else:
        log(f"training {run.path} from scratch")
    saved_step = step if checkpoint is not None else None

    def save(epoch: int, batch: int, partial: dict | None = None) -> None:
        nonlocal saved_step
        state = {
            "model": cvae.state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": epoch,
            "batch": batch,
            "step": step,
            "rng": torch.get_rng_state(),
            "config": config.to_dict(),
            "run_id": run_id,
            "metrics": metrics,
        }
        if partial is not None:
            state["partial"] = partial
        if device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state()
        run.write_checkpoint(state)
        saved_step = step

    per_epoch = steps_per_epoch(len(images), config.batch_size)
    total = per_epoch * config.epochs
    started = time.perf_counter()
    status = Status.finished
    batch_index = start_batch
    with (
        Progress(run.path.name, total, step, enabled=progress) as bar,
        StopOnInterrupt() as stop,
        warnings.catch_warnings(),
    ):
        warnings.filterwarnings(
            "ignore", "Encountered NaN", UserWarning
        )  # the loop says so itself, below
        try:
            while epoch < config.epochs:
                sums = {"loss": 0.0, "recon": 0.0, "kl": 0.0}
                count, epoch_start = 0, time.perf_counter()
                if (
                    start_batch and checkpoint is not None and "partial" in checkpoint
                ):  # an interrupted epoch
                    sums, count = (
                        dict(checkpoint["partial"]["sums"]),
                        checkpoint["partial"]["count"],
                    )
                    epoch_start -= checkpoint["partial"]["seconds"]
                batch_index = start_batch
                for batch in epoch_batches(
                    images,
                    config.batch_size,
                    epoch,
                    config.seed,
                    config.mask,
                    config.inputs,
                    start=start_batch,
                ):
                    values = train_step(cvae, batch, optimizer, config, elbo)
                    if not math.isfinite(values["loss"]):
                        raise _Diverged(step, epoch, values["loss"])
                    step += 1
                    batch_index += 1
                    count += 1
                    for k in sums:
                        sums[k] += values[k]
                    if step % 25 == 0:  # one update in 25 steps is plenty for a display
                        bar.update(step, _progress_status(epoch, config.epochs, sums, count))
                    if stop.requested and batch_index < per_epoch:
                        raise _Stop
                epoch += 1
                start_batch = batch_index = 0
                if count:
                    seconds = time.perf_counter() - epoch_start
                    record = {
                        "epoch": epoch,
                        "step": step,
                        **{k: v / count for k, v in sums.items()},
                        "seconds": round(seconds, 2),
                        "steps_per_s": round(count / max(seconds, 1e-9), 2),
                        "elbo": config.elbo,
                        "particles": config.particles,
                        "guide_gradient": config.guide_gradient,
                    }
                    metrics = [*metrics, record]
                save(epoch, 0)
                bar.update(
                    step,
                    _progress_status(epoch - 1, config.epochs, sums, count, done=True),
                    milestone=True,
                )
                if count and not progress:
                    log(
                        f"epoch {epoch}/{config.epochs}: loss {record['loss']:.3f} "
                        f"(recon {record['recon']:.3f}, kl {record['kl']:.3f}), {record['steps_per_s']:.1f} steps/s"
                    )
                if stop.requested and epoch < config.epochs:
                    raise _Stop
        except _Stop:
            partial = (
                {"sums": sums, "count": count, "seconds": time.perf_counter() - epoch_start}
                if batch_index
                else None
            )
            save(epoch, batch_index, partial)
            log(
                f"interrupted at step {step} ({signal_name(stop.signum)}): checkpoint saved in "
                f"{run.path}; run the same command to resume."
            )
            status = Status.interrupted
        except _Diverged as e:
            if saved_step is not None:
                kept = f"the last good checkpoint (step {saved_step}) in {run.path} is kept"
            elif run.exists():
                kept = f"{run.path} keeps the run it held before"
            else:
                kept = "no checkpoint had been written"
            raise RunError(
                f"loss became {e.value} at step {e.step} (epoch {e.epoch + 1}); training stopped and "
                f"{kept}. Try a smaller --lr or another --seed."
            ) from None
    seconds = time.perf_counter() - started
    return TrainResult(run.path, epoch, step, seconds, status, stop.signum)


class _Stop(Exception):
    pass


class _Diverged(Exception):
    def __init__(self, step: int, epoch: int, value: float):
        self.step, self.epoch, self.value = step, epoch, value


def _progress_status(
    epoch: int, epochs: int, sums: dict[str, float], count: int, done: bool = False
) -> str:
    """Where training is, for the progress display: the epoch (0-based) and its mean loss terms so far."""
    terms = " ".join(f"{k} {v / max(count, 1):.2f}" for k, v in sums.items())
    return f"epoch {epoch + 1}/{epochs}{' done' if done else ''}, {terms}"
