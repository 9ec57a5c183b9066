"""Training: the objective from Pyro traces, the optimisation loop, run directories and checkpoints.

A run directory holds ``config.json`` (the resolved configuration), ``checkpoint.pt`` (model,
optimiser and RNG state, epoch and batch, written atomically), ``metrics.jsonl`` (one line per
epoch) and, later, evaluation results and pictures.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import pyro
import torch
from pyro.infer import ELBO, RenyiELBO, Trace_ELBO, TraceMeanField_ELBO
from pyro.poutine.messenger import Messenger

from .atomic import atomic_write, atomic_write_text
from .console import Progress, StopOnInterrupt
from .data import Batch, epoch_batches, load_split, steps_per_epoch
from .estimators import GuideGradient, GuidePathGradient
from .model import CVAE, VARIANTS, Elbo, get_variant

CHECKPOINT = "checkpoint.pt"
CONFIG = "config.json"
METRICS = "metrics.jsonl"


class RunError(RuntimeError):
    """A run directory is missing, unfinished, inconsistent or diverged; the message says what to do."""


@dataclass
class TrainConfig:
    """Everything that defines a run. Defaults are the reference implementation's protocol."""

    variant: str = "joint-scratch"
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    clip_norm: float = 1.0  # on the gradient of the per-image mean loss
    seed: int = 0
    mask: str = "random"
    inputs: int = 1  # visible quadrants, with mask="fixed"
    limit: int | None = None  # use the first N training images only
    hybrid_weight: float = 0.5  # weight of the CVAE objective in "hybrid" (the GSNN gets 1 - it)
    elbo: str | None = None  # meanfield, trace or iwae; default: the variant's (meanfield but for *-iwae)
    particles: int | None = None  # K; default: the variant's with its own ELBO, else 5 for iwae and 1 otherwise
    guide_gradient: str | None = None  # reparam, stl or dreg (estimators.GuideGradient); default: the variant's

    def __post_init__(self) -> None:
        if self.mask == "random":
            self.inputs = 1  # only the fixed protocol has a number of visible quadrants
        variant = VARIANTS.get(self.variant)
        if variant is not None:
            if self.elbo is None:
                self.elbo = variant.elbo.value
            if self.guide_gradient is None:
                self.guide_gradient = variant.guide_gradient.value
            if self.particles is None:
                same = self.elbo == variant.elbo.value
                self.particles = variant.particles if same else 5 if self.elbo == Elbo.iwae.value else 1

    def validate(self) -> None:
        variant = get_variant(self.variant)
        require_at_least_one(epochs=self.epochs, batch_size=self.batch_size, limit=self.limit, particles=self.particles)
        checks = [
            (self.lr > 0 and math.isfinite(self.lr), f"--lr must be a positive number, got {self.lr}"),
            (self.clip_norm > 0, f"clip norm must be positive, got {self.clip_norm}"),
            (self.mask in ("random", "fixed"), f"--mask must be random or fixed, got {self.mask!r}"),
            (self.inputs in (1, 2, 3), f"--inputs must be 1, 2 or 3 visible quadrants, got {self.inputs}"),
            (0.0 <= self.hybrid_weight <= 1.0, f"--hybrid-weight must lie in [0, 1], got {self.hybrid_weight}"),
            (self.elbo in {e.value for e in Elbo}, f"--elbo must be one of {', '.join(e.value for e in Elbo)}, got {self.elbo!r}"),
            (variant.objective != "baseline" or (self.elbo != Elbo.iwae.value and self.particles == 1),
             "the baseline has no latent variable: --elbo iwae and --particles do not apply to it"),
            (self.guide_gradient in {g.value for g in GuideGradient},
             f"--guide-gradient must be one of {', '.join(g.value for g in GuideGradient)}, got {self.guide_gradient!r}"),
            (self.guide_gradient != GuideGradient.stl.value or self.elbo != Elbo.meanfield.value,
             "--guide-gradient stl needs a Monte Carlo KL: use it with --elbo trace or iwae"),
            (self.guide_gradient != GuideGradient.dreg.value or self.elbo == Elbo.iwae.value,
             "--guide-gradient dreg is for the importance-weighted bound: use it with --elbo iwae"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message + ".")

    def same_run(self, other: "TrainConfig") -> bool:
        """Whether two configs describe the same run (the number of epochs may grow)."""
        return all(getattr(self, f.name) == getattr(other, f.name) for f in fields(self) if f.name != "epochs")

    @classmethod
    def from_json(cls, path: Path) -> "TrainConfig":
        try:
            raw = json.loads(path.read_text())
            return cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw})
        except (OSError, ValueError, TypeError) as e:
            raise RunError(f"{path} cannot be read ({type(e).__name__}: {e}); train the run again with --force.") from None

    def baseline(self) -> "TrainConfig":
        """The config of the pretrained baseline this run's variant starts from."""
        return TrainConfig(**{**asdict(self), "variant": "baseline", "hybrid_weight": 0.5, "elbo": None, "particles": None,
                                           "guide_gradient": None})

    def make_elbo(self) -> ELBO:
        return make_elbo(Elbo(self.elbo), self.particles)


def run_name(variant: str, mask: str = "random", inputs: int = 1, seed: int = 0) -> str:
    """``joint-scratch``, ``cvae-fixed2``; a training seed other than 0 is named: ``joint-scratch-seed1``."""
    name = variant if mask == "random" else f"{variant}-fixed{inputs}"
    return name if seed == 0 else f"{name}-seed{seed}"


def default_run_dir(runs_dir: str | Path, config: TrainConfig) -> Path:
    return Path(runs_dir) / run_name(config.variant, config.mask, config.inputs, config.seed)


def require_at_least_one(**options: int | None) -> None:
    """Refuse a count option below 1 (None means "not given"), naming it as the CLI does."""
    for name, value in options.items():
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}.")


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but no CUDA device is available; use --device cpu.")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {device!r}.")
    return torch.device(device)


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
    if kind == "gsnn":
        return [(1.0, cvae.prior_guide)]
    if kind == "hybrid":
        return [(hybrid_weight, cvae.guide), (1.0 - hybrid_weight, cvae.prior_guide)]
    return [(1.0, cvae.guide)]  # cvae, and baseline (whose guide is empty)


@torch.no_grad()
def _log_terms(model: "Draws", guide: "Draws | None") -> tuple[torch.Tensor, torch.Tensor]:
    """log p(y|x,z) and log p(z|x) - log q(z|x,y) of the draws an ELBO used, per particle and image
    ``(K, B)`` (``(B,)`` with one particle), recomputed from the sites' distributions."""
    y = model.sites["y"]
    log_lik = y["fn"].log_prob(y["value"])
    if guide is None or "z" not in guide.sites:  # not asked, no latent (baseline), no recognition net (GSNN)
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


def _normalized_weights(model, guide) -> Callable[[], torch.Tensor]:
    """The particles' normalised importance weights ``(K, B)``, read from the ``Draws`` of ``model``
    and ``guide`` when called: in the backward pass, after the draws."""

    def weights() -> torch.Tensor:
        log_lik, log_ratio = _log_terms(model, guide)
        log_w = log_lik + log_ratio
        return torch.softmax(log_w, 0) if log_w.dim() > 1 else torch.ones_like(log_w)

    return weights


def objective_backward(cvae: CVAE, batch: Batch, elbo: ELBO, hybrid_weight: float = 0.5,
                       guide_gradient: GuideGradient = GuideGradient.reparam) -> dict[str, float]:
    """Accumulate into ``.grad`` the gradient of the variant's loss, a mean over the batch's images,
    through the Pyro ELBO object ``elbo``; returns its terms per image: ``loss``, ``recon``, ``kl``.

    ``differentiable_loss`` gives the loss of ``Trace_ELBO``/``TraceMeanField_ELBO`` as a tensor;
    ``RenyiELBO`` has none, and its ``loss_and_grads`` runs the backward pass itself, on the sum
    over images, so its gradient is scaled afterwards. recon and KL come from the traces of the
    first term's draws (for meanfield, KL is the closed form: loss - recon). ``guide_gradient``
    stl or dreg wraps the ELBO call in ``GuidePathGradient``."""
    args = (batch.x, batch.y, batch.hidden)
    n = batch.x.shape[0]
    params = cvae.trainable_parameters()
    loss, recon, kl = 0.0, 0.0, 0.0
    for i, (weight, guide) in enumerate(_terms(cvae, hybrid_weight)):
        if weight == 0:
            continue
        model_draws, guide_draws = Draws(), Draws()  # keep the draws for recon and KL
        model, guide = model_draws(cvae.model), guide_draws(guide)
        path_gradient = contextlib.nullcontext()
        if guide_gradient != GuideGradient.reparam:
            weights = _normalized_weights(model_draws, guide_draws) if guide_gradient == GuideGradient.dreg else None
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
        if i == 0:
            closed_form_kl = isinstance(elbo, TraceMeanField_ELBO)  # then KL = loss - recon, nothing to recompute
            log_lik, log_ratio = _log_terms(model_draws, None if closed_form_kl else guide_draws)
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


def train_step(cvae: CVAE, batch: Batch, optimizer: torch.optim.Optimizer, config: "TrainConfig",
               elbo: ELBO | None = None) -> dict[str, float]:
    """One optimisation step on the per-image mean loss; returns its terms. A non-finite loss
    leaves the parameters untouched (the caller stops the run). ``elbo``: the run's ELBO object
    (``config.make_elbo()``; built once by the loop, here when not given)."""
    optimizer.zero_grad(set_to_none=True)
    with pyro.validation_enabled(False):  # argument checks cost time, and NaN is caught below
        values = objective_backward(cvae, batch, elbo or config.make_elbo(), config.hybrid_weight,
                                    GuideGradient(config.guide_gradient))
    params = [p for group in optimizer.param_groups for p in group["params"]]
    torch.nn.utils.clip_grad_norm_(params, config.clip_norm, foreach=True)
    if math.isfinite(values["loss"]):
        optimizer.step()
    return values


# ---------------------------------------------------------------------------------------------
# Run directories and checkpoints


def atomic_save(obj, path: Path) -> None:
    """torch.save, atomically: never a half-written checkpoint."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def read_checkpoint(run_dir: Path, device: torch.device | str = "cpu") -> dict:
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise RunError(f"no checkpoint in {run_dir}; train it first: pyro-cvae train --run-dir {run_dir} --variant NAME.")
    try:
        return torch.load(path, map_location=device, weights_only=False)
    except Exception as e:
        raise RunError(f"{path} cannot be read ({type(e).__name__}); delete it and train again with --force.") from None


def load_run(run_dir: str | Path, device: torch.device | str = "cpu") -> tuple[CVAE, TrainConfig, dict]:
    """A trained (or partly trained) run: the model with its weights, its config and checkpoint."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).is_file():
        raise RunError(
            f"{run_dir} is not a run (no {CONFIG}); train one with: pyro-cvae train --variant NAME --run-dir {run_dir}."
        )
    config = TrainConfig.from_json(run_dir / CONFIG)
    checkpoint = read_checkpoint(run_dir, device)
    cvae = CVAE(get_variant(config.variant)).to(device)
    try:
        cvae.load_state_dict(checkpoint["model"])
    except (KeyError, RuntimeError) as e:
        raise RunError(f"{run_dir / CHECKPOINT} does not fit a {config.variant} model ({type(e).__name__}); "
                       "train it again with --force.") from None
    return cvae, config, checkpoint


def read_metrics(run_dir: Path) -> list[dict]:
    """The per-epoch records of a run (the last line written for an epoch wins), in epoch order;
    a torn line of a run being written is skipped."""
    by_epoch = {}
    try:
        lines = (Path(run_dir) / METRICS).read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            record = json.loads(line)
            by_epoch[int(record["epoch"])] = record
        except (ValueError, KeyError, TypeError):
            continue
    return [by_epoch[e] for e in sorted(by_epoch)]


def epochs_trained(run_dir: Path) -> int:
    """Epochs completed by the run's checkpoint (0 without a readable one)."""
    try:
        checkpoint = torch.load(Path(run_dir) / CHECKPOINT, map_location="cpu", weights_only=False, mmap=True)
        return int(checkpoint["epoch"])
    except Exception:
        return 0


def is_finished(run_dir: Path) -> bool:
    """Whether the run directory holds a run trained for all the epochs of its config."""
    try:
        config = TrainConfig.from_json(run_dir / CONFIG)
    except RunError:
        return False
    return epochs_trained(run_dir) >= config.epochs


def trained_runs(runs_dir: str | Path) -> list[tuple[Path, TrainConfig]]:
    """The runs in ``runs_dir`` with at least one epoch trained, and their configs, in the order
    of the variant registry (then by name)."""
    runs_dir = Path(runs_dir)
    found = []
    for run_dir in sorted(runs_dir.iterdir()) if runs_dir.is_dir() else []:
        if (run_dir / CONFIG).is_file() and epochs_trained(run_dir) > 0:
            try:
                found.append((run_dir, TrainConfig.from_json(run_dir / CONFIG)))
            except RunError:
                continue
    order = list(VARIANTS)
    return sorted(found, key=lambda run: (order.index(run[1].variant) if run[1].variant in order else len(order),
                                          run[0].name))


def require_trained_runs(runs_dir: str | Path) -> list[tuple[Path, TrainConfig]]:
    """``trained_runs``, or a RunError that says how to train one."""
    runs = trained_runs(runs_dir)
    if not runs:
        raise RunError(f"no trained run in {runs_dir}; train one with: pyro-cvae train --variant joint-scratch "
                       f"--runs-dir {runs_dir} (or point --runs-dir at the folder that holds your runs).")
    return runs


# ---------------------------------------------------------------------------------------------
# The loop


@dataclass
class TrainResult:
    run_dir: Path
    epochs_done: int
    steps: int
    seconds: float
    status: str  # "finished", "already finished", "interrupted"


def _pretrained_baseline(config: TrainConfig, runs_dir: Path, device, data_dir, log, progress) -> dict:
    """State dict of the pretrained baseline net, training it first when it is missing."""
    base_config = config.baseline()
    base_dir = default_run_dir(runs_dir, base_config)
    if not is_finished(base_dir):
        log(f"{config.variant} needs a pretrained baseline; none finished in {base_dir}: training it first.")
        result = train(base_config, run_dir=base_dir, data_dir=data_dir, device=device, log=log, progress=progress)
        if result.status != "finished":
            raise RunError(f"interrupted while pretraining the baseline in {base_dir}; run the same command to resume.")
    else:
        found = TrainConfig.from_json(base_dir / CONFIG)
        log(f"using the pretrained baseline in {base_dir}")
        if found != base_config:
            log(f"note: that baseline was trained with {found}, this run asks {base_config}")
    cvae, _, _ = load_run(base_dir, device)
    return cvae.baseline_net.state_dict()


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
    run. ``images`` ``(N, 784)`` replaces the MNIST training split (tests)."""
    config.validate()
    device = resolve_device(device) if isinstance(device, str) else device
    if run_dir is None:
        runs_dir = Path(runs_dir if runs_dir is not None else "runs")
        run_dir = default_run_dir(runs_dir, config)
    run_dir = Path(run_dir)
    runs_dir = Path(runs_dir) if runs_dir is not None else run_dir.parent
    variant = get_variant(config.variant)

    checkpoint = None
    if (run_dir / CHECKPOINT).exists() and not force:
        saved = TrainConfig.from_json(run_dir / CONFIG)
        if not saved.same_run(config):
            diff = {f.name: (getattr(saved, f.name), getattr(config, f.name)) for f in fields(config)
                    if f.name != "epochs" and getattr(saved, f.name) != getattr(config, f.name)}
            raise RunError(
                f"{run_dir} holds a different run ({', '.join(f'{k}: {a!r} there, {b!r} asked' for k, (a, b) in diff.items())}); "
                "pass --force to start it over or choose another --run-dir."
            )
        checkpoint = read_checkpoint(run_dir, device)
        if checkpoint["epoch"] >= config.epochs:
            log(f"{run_dir} is already trained for {checkpoint['epoch']} epochs; pass --force to train it again.")
            return TrainResult(run_dir, checkpoint["epoch"], checkpoint["step"], 0.0, "already finished")
    elif force and run_dir.exists():
        for name in [CHECKPOINT, METRICS]:
            (run_dir / name).unlink(missing_ok=True)
    for stale in [*run_dir.glob("eval-*.json"), *run_dir.glob("samples-*.png")]:  # of weights about to change
        stale.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)

    if images is None:
        images, _ = load_split("train", data_dir, config.limit)
    elif config.limit is not None:
        images = images[: config.limit]
    images = images.to(device)

    pretrained = None
    if checkpoint is None and variant.needs_pretrained_baseline:
        pretrained = _pretrained_baseline(config, runs_dir, device, data_dir, log, progress)
    pyro.clear_param_store()
    pyro.set_rng_seed(config.seed)
    cvae = CVAE(variant).to(device)
    if pretrained is not None:
        cvae.baseline_net.load_state_dict(pretrained)
    optimizer = make_optimizer(cvae, config.lr)
    elbo = config.make_elbo()
    epoch, start_batch, step = 0, 0, 0
    if checkpoint is not None:
        cvae.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        epoch, start_batch, step = checkpoint["epoch"], checkpoint["batch"], checkpoint["step"]
        torch.set_rng_state(checkpoint["rng"].cpu())
        if "cuda_rng" in checkpoint and device.type == "cuda":
            torch.cuda.set_rng_state(checkpoint["cuda_rng"].cpu())
        log(f"resuming {run_dir} at epoch {epoch + 1}, batch {start_batch}, step {step}")
    atomic_write_text(json.dumps(asdict(config), indent=2) + "\n", run_dir / CONFIG)

    def save(epoch: int, batch: int, partial: dict | None = None) -> None:
        state = {"model": cvae.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch, "batch": batch,
                 "step": step, "rng": torch.get_rng_state(), "config": asdict(config)}
        if partial is not None:
            state["partial"] = partial
        if device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state()
        atomic_save(state, run_dir / CHECKPOINT)

    per_epoch = steps_per_epoch(len(images), config.batch_size)
    total = per_epoch * config.epochs
    started = time.perf_counter()
    status = "finished"
    batch_index = start_batch
    with Progress(run_dir.name, total, step, enabled=progress) as bar, StopOnInterrupt() as stop:
        try:
            while epoch < config.epochs:
                sums = {"loss": 0.0, "recon": 0.0, "kl": 0.0}
                count, epoch_start = 0, time.perf_counter()
                if start_batch and checkpoint is not None and "partial" in checkpoint:  # an interrupted epoch
                    sums, count = dict(checkpoint["partial"]["sums"]), checkpoint["partial"]["count"]
                    epoch_start -= checkpoint["partial"]["seconds"]
                batch_index = start_batch
                for batch in epoch_batches(images, config.batch_size, epoch, config.seed, config.mask, config.inputs,
                                           start=start_batch):
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
                save(epoch, 0)
                if count == 0:
                    continue
                seconds = time.perf_counter() - epoch_start
                record = {"epoch": epoch, "step": step, **{k: v / count for k, v in sums.items()},
                          "seconds": round(seconds, 2), "steps_per_s": round(count / max(seconds, 1e-9), 2),
                          "elbo": config.elbo, "particles": config.particles, "guide_gradient": config.guide_gradient}
                with open(run_dir / METRICS, "a") as f:
                    f.write(json.dumps(record) + "\n")
                bar.update(step, _progress_status(epoch - 1, config.epochs, sums, count, done=True), milestone=True)
                if not progress:
                    log(f"epoch {epoch}/{config.epochs}: loss {record['loss']:.3f} "
                        f"(recon {record['recon']:.3f}, kl {record['kl']:.3f}), {record['steps_per_s']:.1f} steps/s")
                if stop.requested and epoch < config.epochs:
                    raise _Stop
        except _Stop:
            partial = {"sums": sums, "count": count, "seconds": time.perf_counter() - epoch_start} if batch_index else None
            save(epoch, batch_index, partial)
            log(f"interrupted at step {step}: checkpoint saved in {run_dir}; run the same command to resume.")
            status = "interrupted"
        except _Diverged as e:
            raise RunError(
                f"loss became {e.value} at step {e.step} (epoch {e.epoch + 1}); training stopped and the last good "
                f"checkpoint in {run_dir} is kept. Try a smaller --lr or another --seed."
            ) from None
    return TrainResult(run_dir, epoch, step, time.perf_counter() - started, status)


class _Stop(Exception):
    pass


class _Diverged(Exception):
    def __init__(self, step: int, epoch: int, value: float):
        self.step, self.epoch, self.value = step, epoch, value


def _progress_status(epoch: int, epochs: int, sums: dict[str, float], count: int, done: bool = False) -> str:
    """Where training is, for the progress display: the epoch (0-based) and its mean loss terms so far."""
    terms = " ".join(f"{k} {v / max(count, 1):.2f}" for k, v in sums.items())
    return f"epoch {epoch + 1}/{epochs}{' done' if done else ''}, {terms}"
