"""Training: the optimisation step and the loop that trains (or resumes) a run. The objective
is ``objectives``'s; what a run directory holds, and how it is read and written, ``runs``'s.
"""

from __future__ import annotations

import enum
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyro
import torch

from .config import TrainConfig, require_memory, resolve_device
from .console import Progress, StopOnInterrupt, signal_name
from .data import PIXELS, Batch, check_limit, epoch_batches, load_split, steps_per_epoch
from .model import CVAE, get_variant
from .objectives import TrainingObjective, objective_backward
from .runs import Run, RunError, baseline_run_dir, default_run_dir, new_run_id

# ---------------------------------------------------------------------------------------------
# The step


def make_optimizer(cvae: CVAE, lr: float) -> torch.optim.Adam:
    """One fused Adam over all trainable parameters (not Pyro's one optimiser per parameter), so
    that clipping is on the global norm, as in the reference, and the update is one pass over
    memory (about 4x faster on CPU than the per-tensor loop; same update rule)."""
    return torch.optim.Adam(cvae.trainable_parameters(), lr=lr, fused=True)


def train_step(
    cvae: CVAE,
    batch: Batch,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    objective: TrainingObjective | None = None,
) -> dict[str, float]:
    """One optimisation step on the per-image mean loss; returns its terms. A non-finite loss
    leaves the parameters untouched (the caller stops the run). ``objective``: the run's, built
    once by the loop (here when not given)."""
    optimizer.zero_grad(set_to_none=True)
    with pyro.validation_enabled(False):  # argument checks cost time, and NaN is caught below
        values = objective_backward(cvae, batch, objective or config.objective())
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
    on_checkpoint: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Train (or resume) one run in ``run_dir`` (default ``runs_dir/<variant>``). A pretrained
    baseline is looked up in (or trained into) ``runs_dir``, by default the folder holding the
    run. ``images`` ``(N, 784)`` replaces the MNIST training split (tests, a sweep's workers).
    ``on_checkpoint`` is handed every checkpoint once it is saved (a sweep ships it to its driver).

    The run is locked while it trains. Nothing of what it held before changes until the new run
    has its data and baseline and writes its first checkpoint (``--force`` included)."""
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
            saved = run.valid_config(checkpoint, log)
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
        return _train_loop(
            config, run, checkpoint, images, pretrained, device, log, progress, on_checkpoint
        )


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
    on_checkpoint: Callable[[dict], None] | None = None,
) -> TrainResult:
    """The optimisation loop, from ``checkpoint`` (a resumed run) or from scratch, saving a
    checkpoint, with the epoch's metrics record, at the end of every epoch and on Ctrl-C."""
    training = _Training.start(config, run, checkpoint, pretrained, device, log)
    training.on_checkpoint = on_checkpoint
    total = steps_per_epoch(len(images), config.batch_size) * config.epochs
    started = time.perf_counter()
    status = Status.finished
    with (
        Progress(run.path.name, total, training.step, enabled=progress) as bar,
        StopOnInterrupt() as stop,
        warnings.catch_warnings(),
    ):
        warnings.filterwarnings("ignore", "Encountered NaN", UserWarning)  # the loop says so
        try:
            while training.epoch < config.epochs:
                record = training.one_epoch(images, bar, stop)
                if record and not progress:
                    log(
                        f"epoch {training.epoch}/{config.epochs}: loss {record['loss']:.3f} "
                        f"(recon {record['recon']:.3f}, kl {record['kl']:.3f}), "
                        f"{record['steps_per_s']:.1f} steps/s"
                    )
                if stop.requested and training.epoch < config.epochs:
                    raise _Stop
        except _Stop:
            # stopped mid-epoch: the epoch's sums so far are saved, to count in its record
            training.save(training.tally.partial() if training.batch else None)
            log(
                f"interrupted at step {training.step} ({signal_name(stop.signum)}): checkpoint "
                f"saved in {run.path}; run the same command to resume."
            )
            status = Status.interrupted
        except _Diverged as e:
            raise RunError(
                f"loss became {e.value} at step {e.step} (epoch {e.epoch + 1}); training stopped "
                f"and {training.kept()}. Try a smaller --lr or another --seed."
            ) from None
    seconds = time.perf_counter() - started
    return TrainResult(run.path, training.epoch, training.step, seconds, status, stop.signum)


class _Stop(Exception):
    pass


class _Diverged(Exception):
    def __init__(self, step: int, epoch: int, value: float):
        self.step, self.epoch, self.value = step, epoch, value


@dataclass
class _Tally:
    """An epoch's sums of the steps' loss terms, its steps and when it started."""

    sums: dict[str, float] = field(default_factory=lambda: dict(loss=0.0, recon=0.0, kl=0.0))
    count: int = 0
    started: float = field(default_factory=time.perf_counter)

    @classmethod
    def resumed(cls, partial: dict) -> _Tally:
        """The tally a checkpoint saved mid-epoch (``partial``) holds, its time still running."""
        return cls(
            dict(partial["sums"]), partial["count"], time.perf_counter() - partial["seconds"]
        )

    def add(self, values: dict[str, float]) -> None:
        self.count += 1
        for k in self.sums:
            self.sums[k] += values[k]

    def partial(self) -> dict:
        return {
            "sums": self.sums,
            "count": self.count,
            "seconds": time.perf_counter() - self.started,
        }

    def record(self, epoch: int, step: int, config: TrainConfig) -> dict:
        """The epoch's line of metrics: mean terms per step, time, and the objective."""
        seconds = time.perf_counter() - self.started
        return {
            "epoch": epoch,
            "step": step,
            **{k: v / self.count for k, v in self.sums.items()},
            "seconds": round(seconds, 2),
            "steps_per_s": round(self.count / max(seconds, 1e-9), 2),
            "elbo": config.elbo,
            "particles": config.particles,
            "guide_gradient": config.guide_gradient,
        }

    def status(self, epoch: int, epochs: int, done: bool = False) -> str:
        """Where training is, for the progress display: the epoch (0-based) and its mean terms."""
        terms = " ".join(f"{k} {v / max(self.count, 1):.2f}" for k, v in self.sums.items())
        return f"epoch {epoch + 1}/{epochs}{' done' if done else ''}, {terms}"


@dataclass
class _Training:
    """A run being trained: its nets, optimiser and objective, and where it is. ``batch``: the
    batches of ``epoch`` done (a run stopped mid-epoch resumes after them); ``partial``: the
    tally of that stopped epoch; ``saved_step``: the step of the checkpoint on disk (None
    before the first), kept if the loss diverges."""

    config: TrainConfig
    run: Run
    device: torch.device
    cvae: CVAE
    optimizer: torch.optim.Optimizer
    objective: TrainingObjective
    run_id: str
    epoch: int = 0
    batch: int = 0
    step: int = 0
    metrics: list[dict] = field(default_factory=list)
    partial: dict | None = None
    saved_step: int | None = None
    tally: _Tally = field(default_factory=_Tally)
    on_checkpoint: Callable[[dict], None] | None = None  # handed each checkpoint once it is saved

    @classmethod
    def start(
        cls,
        config: TrainConfig,
        run: Run,
        checkpoint: dict | None,
        pretrained: dict | None,
        device: torch.device,
        log: Callable[[str], None],
    ) -> _Training:
        """The run's nets (seeded), optimiser and objective, at ``checkpoint`` if there is one."""
        pyro.clear_param_store()
        pyro.set_rng_seed(config.seed)
        cvae = CVAE(get_variant(config.variant)).to(device)
        if pretrained is not None:
            cvae.baseline_net.load_state_dict(pretrained)
        optimizer = make_optimizer(cvae, config.lr)
        training = cls(config, run, device, cvae, optimizer, config.objective(), new_run_id())
        if checkpoint is None:
            log(f"training {run.path} from scratch")
        else:
            training.restore(checkpoint)
            log(
                f"resuming {run.path} at epoch {training.epoch + 1}, batch {training.batch}, "
                f"step {training.step}"
            )
        return training

    def restore(self, checkpoint: dict) -> None:
        """Continue where the checkpoint stopped, RNG included: the resumed run draws the batches
        and z the uninterrupted one would have."""
        self.cvae.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.epoch, self.batch, self.step = (
            checkpoint["epoch"],
            checkpoint["batch"],
            checkpoint["step"],
        )
        self.run_id = checkpoint.get("run_id", self.run_id)
        # checkpoints of the first landing held no metrics: metrics.jsonl has them
        self.metrics = checkpoint["metrics"] if "metrics" in checkpoint else self.run.read_metrics()
        self.partial = checkpoint.get("partial")
        torch.set_rng_state(checkpoint["rng"].cpu())
        if "cuda_rng" in checkpoint and self.device.type == "cuda":
            torch.cuda.set_rng_state(checkpoint["cuda_rng"].cpu())
        self.saved_step = self.step

    def one_epoch(self, images: torch.Tensor, bar: Progress, stop: StopOnInterrupt) -> dict | None:
        """Train the epoch's batches from ``batch`` on, then record the epoch and save a
        checkpoint; the epoch's metrics record (None if it had no step). ``_Stop`` when Ctrl-C
        comes before the epoch's last batch, ``_Diverged`` on a non-finite loss."""
        config = self.config
        # a resumed epoch continues the tally it was stopped with: its record counts every step
        self.tally = _Tally.resumed(self.partial) if self.batch and self.partial else _Tally()
        self.partial = None
        per_epoch = steps_per_epoch(len(images), config.batch_size)
        batches = epoch_batches(
            images,
            config.batch_size,
            self.epoch,
            config.seed,
            config.mask,
            config.inputs,
            self.batch,
        )
        for batch in batches:
            values = train_step(self.cvae, batch, self.optimizer, config, self.objective)
            if not math.isfinite(values["loss"]):
                raise _Diverged(self.step, self.epoch, values["loss"])
            self.step += 1
            self.batch += 1
            self.tally.add(values)
            if self.step % 25 == 0:  # one update in 25 steps is plenty for a display
                bar.update(self.step, self.tally.status(self.epoch, config.epochs))
            if stop.requested and self.batch < per_epoch:
                raise _Stop
        self.epoch, self.batch = self.epoch + 1, 0
        record = self.tally.record(self.epoch, self.step, config) if self.tally.count else None
        if record:
            self.metrics = [*self.metrics, record]
        self.save()
        status = self.tally.status(self.epoch - 1, config.epochs, done=True)
        bar.update(self.step, status, milestone=True)
        return record

    def save(self, partial: dict | None = None) -> None:
        """A checkpoint of where the run is; ``partial``: the tally of an epoch stopped mid-way."""
        state = {
            "model": self.cvae.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "batch": self.batch,
            "step": self.step,
            "rng": torch.get_rng_state(),
            "config": self.config.to_dict(),
            "run_id": self.run_id,
            "metrics": self.metrics,
        }
        if partial is not None:
            state["partial"] = partial
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state()
        self.run.write_checkpoint(state)
        if self.on_checkpoint is not None:
            self.on_checkpoint(state)
        self.saved_step = self.step

    def kept(self) -> str:
        """What is left of the run after the loss diverged."""
        if self.saved_step is not None:
            return f"the last good checkpoint (step {self.saved_step}) in {self.run.path} is kept"
        if self.run.exists():
            return f"{self.run.path} keeps the run it held before"
        return "no checkpoint had been written"
