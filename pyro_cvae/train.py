"""Training: the objective from Pyro traces, the optimisation loop, run directories and checkpoints.

A run directory holds ``config.json`` (the resolved configuration), ``checkpoint.pt`` (model,
optimiser and RNG state, epoch and batch, written atomically), ``metrics.jsonl`` (one line per
epoch) and, later, evaluation results and pictures.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.kl import kl_divergence

from .atomic import atomic_write, atomic_write_text
from .console import Progress, StopOnInterrupt
from .data import Batch, epoch_batches, load_split, steps_per_epoch
from .model import CVAE, VARIANTS, get_variant

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

    def __post_init__(self) -> None:
        if self.mask == "random":
            self.inputs = 1  # only the fixed protocol has a number of visible quadrants

    def validate(self) -> None:
        get_variant(self.variant)
        require_at_least_one(epochs=self.epochs, batch_size=self.batch_size, limit=self.limit)
        checks = [
            (self.lr > 0 and math.isfinite(self.lr), f"--lr must be a positive number, got {self.lr}"),
            (self.clip_norm > 0, f"clip norm must be positive, got {self.clip_norm}"),
            (self.mask in ("random", "fixed"), f"--mask must be random or fixed, got {self.mask!r}"),
            (self.inputs in (1, 2, 3), f"--inputs must be 1, 2 or 3 visible quadrants, got {self.inputs}"),
            (0.0 <= self.hybrid_weight <= 1.0, f"--hybrid-weight must lie in [0, 1], got {self.hybrid_weight}"),
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
        return TrainConfig(**{**asdict(self), "variant": "baseline", "hybrid_weight": 0.5})


def run_name(variant: str, mask: str = "random", inputs: int = 1) -> str:
    return variant if mask == "random" else f"{variant}-fixed{inputs}"


def default_run_dir(runs_dir: str | Path, config: TrainConfig) -> Path:
    return Path(runs_dir) / run_name(config.variant, config.mask, config.inputs)


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
# The objective


def _log_likelihood(model_trace) -> torch.Tensor:
    site = model_trace.nodes["y"]
    return site["fn"].log_prob(site["value"])


def elbo_terms(cvae: CVAE, batch: Batch, guide: Callable | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(reconstruction, KL), each summed over the batch, from one draw of z.

    With a guide: the guide's trace is replayed in the model, reconstruction is -log p(y|x,z)
    and KL(q(z|x,y) || p(z|x)) is analytic (``TraceMeanField_ELBO``, as the reference computes it;
    a test checks the two agree). Without one, z comes from the model's own prior (the GSNN
    objective: reparameterised, no KL); a model with no latent gives the baseline's BCE."""
    args = (batch.x, batch.y, batch.hidden)
    if guide is None:
        model_trace = poutine.trace(cvae.model).get_trace(*args)
        return -_log_likelihood(model_trace).sum(), batch.x.new_zeros(())
    guide_trace = poutine.trace(guide).get_trace(*args)
    model_trace = poutine.trace(poutine.replay(cvae.model, trace=guide_trace)).get_trace(*args)
    kl = kl_divergence(guide_trace.nodes["z"]["fn"], model_trace.nodes["z"]["fn"])
    return -_log_likelihood(model_trace).sum(), kl.sum()


def objective(cvae: CVAE, batch: Batch, hybrid_weight: float = 0.5) -> dict[str, torch.Tensor]:
    """The variant's loss for one batch, per image: ``loss``, ``recon`` and ``kl`` (scalars)."""
    n = batch.x.shape[0]
    kind = cvae.variant.objective
    if kind in ("baseline", "gsnn"):
        recon, kl = elbo_terms(cvae, batch, guide=None)
        loss = recon
    elif kind == "cvae":
        recon, kl = elbo_terms(cvae, batch, guide=cvae.guide)
        loss = recon + kl
    elif kind == "hybrid":
        recon, kl = elbo_terms(cvae, batch, guide=cvae.guide)
        gsnn_recon, _ = elbo_terms(cvae, batch, guide=None)
        loss = hybrid_weight * (recon + kl) + (1 - hybrid_weight) * gsnn_recon
    else:
        raise ValueError(f"unknown objective {kind!r}")
    return {"loss": loss / n, "recon": recon / n, "kl": kl / n}


def make_optimizer(cvae: CVAE, lr: float) -> torch.optim.Adam:
    """One fused Adam over all trainable parameters (not Pyro's one optimiser per parameter), so
    that clipping is on the global norm, as in the reference, and the update is one pass over
    memory (about 4x faster on CPU than the per-tensor loop; same update rule)."""
    return torch.optim.Adam(cvae.trainable_parameters(), lr=lr, fused=True)


def train_step(cvae: CVAE, batch: Batch, optimizer: torch.optim.Optimizer, config: "TrainConfig") -> dict[str, float]:
    """One optimisation step on the per-image mean loss; returns its terms. A non-finite loss
    leaves the parameters untouched (the caller stops the run)."""
    terms = objective(cvae, batch, config.hybrid_weight)
    optimizer.zero_grad(set_to_none=True)
    terms["loss"].backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    torch.nn.utils.clip_grad_norm_(params, config.clip_norm, foreach=True)
    values = {k: v.item() for k, v in terms.items()}
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
                    values = train_step(cvae, batch, optimizer, config)
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
                          "seconds": round(seconds, 2), "steps_per_s": round(count / max(seconds, 1e-9), 2)}
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
