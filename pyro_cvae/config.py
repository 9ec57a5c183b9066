"""What a command is asked to do: one dataclass per kind of job, holding each option's default
and its check, run on construction; and the ``Context`` a command works in. The CLI reads its
defaults from here, and every check fails with an ``OptionError`` (a ``ValueError``) that
names the option as the CLI spells it."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

import torch

from .data import Mask, Split, load_split
from .model import VARIANTS, get_variant
from .objectives import (
    Elbo,
    GuideGradient,
    Objective,
    TrainingObjective,
    guide_gradient_problem,
)

PROPOSALS = ("guide", "tuned", "refined")  # evaluation proposals (proposals.ProposalKind)
SEED_LIMIT = 2**32  # numpy's seeds (set by pyro.set_rng_seed) are 32-bit


class OptionError(ValueError):
    """An option's value is refused; the message names the option as the CLI spells it."""


def check_split(split: str) -> Split:
    if split not in [s.value for s in Split]:
        raise OptionError(f"--split must be test or train, got {split!r}.")
    return Split(split)


def require_at_least_one(**options: int | None) -> None:
    """Refuse a count option below 1 (None means "not given"), naming it as the CLI does."""
    for name, value in options.items():
        if value is not None and value < 1:
            raise OptionError(f"--{name.replace('_', '-')} must be at least 1, got {value}.")


def check_seed(seed: int) -> None:
    if not 0 <= seed < SEED_LIMIT:
        raise OptionError(f"--seed must be an integer from 0 to {SEED_LIMIT - 1}, got {seed}.")


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "--device cuda asked for, but no CUDA device is available; use --device cpu."
        )
    if device not in ("cpu", "cuda"):
        raise OptionError(f"--device must be auto, cpu or cuda, got {device!r}.")
    return torch.device(device)


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on ``device`` (the GPU's free memory; on CPU the system's
    MemAvailable), or None where that cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def require_memory(
    device: torch.device, per_unit: int, units: int, what: str, fits: Callable[[int], str]
) -> None:
    """Refuse, before it allocates, work of ``units`` times ``per_unit`` bytes that cannot fit
    on ``device``: the message says ``what`` needs that, and ``fits(n)`` what would (n units)."""
    available = available_memory(device)
    if available is None or per_unit * units <= available:
        return
    raise OptionError(
        f"{what} needs about {_gigabytes(per_unit * units)} of memory, more than the "
        f"{_gigabytes(available)} free on {device.type}; {fits(available // per_unit)}."
    )


def _gigabytes(n: int) -> str:
    return f"{n / 2**30:,.1f} GB"


@dataclass
class TrainConfig:
    """Everything that defines a run. Defaults are the reference implementation's protocol.

    ``inputs`` belongs to the fixed protocol (default 1 there) and ``hybrid_weight`` to the
    ``hybrid`` variant (default 0.5 there); given elsewhere they are refused, not ignored."""

    variant: str = "joint-scratch"
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    clip_norm: float = 1.0  # on the gradient of the per-image mean loss
    seed: int = 0
    mask: Mask = Mask.random
    inputs: int | None = None  # visible quadrants, with mask="fixed"
    limit: int | None = None  # use the first N training images only
    hybrid_weight: float | None = (
        None  # weight of the CVAE objective in "hybrid" (the GSNN gets 1 - it)
    )
    elbo: str | None = (
        None  # meanfield, trace or iwae; default: the variant's (meanfield but for *-iwae)
    )
    particles: int | None = (
        None  # K; default: the variant's with its own ELBO, else 5 for iwae and 1 otherwise
    )
    guide_gradient: str | None = (
        None  # reparam, stl, dreg or rws (estimators.GuideGradient); default: the variant's
    )

    def __post_init__(self) -> None:
        if self.mask in (Mask.random, Mask.fixed):
            self.mask = Mask(self.mask)
        if self.mask is Mask.fixed and self.inputs is None:
            self.inputs = 1
        if self.hybrid_weight is None and _is_hybrid(self.variant):
            self.hybrid_weight = 0.5
        variant = VARIANTS.get(self.variant)
        if variant is not None:
            if self.elbo is None:
                self.elbo = variant.elbo.value
            same = (
                self.elbo == variant.elbo.value
            )  # else the variant's K and guide gradient do not apply
            if self.guide_gradient is None:
                self.guide_gradient = (
                    variant.guide_gradient.value if same else GuideGradient.reparam.value
                )
            if self.particles is None:
                self.particles = (
                    variant.particles if same else 5 if self.elbo == Elbo.iwae.value else 1
                )
        self.validate()

    def validate(self) -> "TrainConfig":
        """The checks, run on construction; returns the config."""
        variant = get_variant(self.variant)
        require_at_least_one(
            epochs=self.epochs,
            batch_size=self.batch_size,
            limit=self.limit,
            particles=self.particles,
        )
        check_seed(self.seed)
        hybrid = variant.objective is Objective.hybrid
        checks = [
            (
                self.lr > 0 and math.isfinite(self.lr),
                f"--lr must be a positive number, got {self.lr}",
            ),
            (self.clip_norm > 0, f"clip norm must be positive, got {self.clip_norm}"),
            (isinstance(self.mask, Mask), f"--mask must be random or fixed, got {self.mask!r}"),
            (
                self.mask is Mask.fixed or self.inputs is None,
                f"--inputs {self.inputs} applies to --mask fixed only (random masks show one quadrant); drop it or add --mask fixed",
            ),
            (
                self.inputs in (None, 1, 2, 3),
                f"--inputs must be 1, 2 or 3 visible quadrants, got {self.inputs}",
            ),
            (
                hybrid or self.hybrid_weight is None,
                f"--hybrid-weight applies to --variant hybrid only, not {self.variant}; drop it",
            ),
            (
                not hybrid or 0.0 <= self.hybrid_weight <= 1.0,
                f"--hybrid-weight must lie in [0, 1], got {self.hybrid_weight}",
            ),
            (
                self.elbo in {e.value for e in Elbo},
                f"--elbo must be one of {', '.join(e.value for e in Elbo)}, got {self.elbo!r}",
            ),
            (
                variant.objective is not Objective.baseline
                or (self.elbo != Elbo.iwae.value and self.particles == 1),
                "the baseline has no latent variable: --elbo iwae and --particles do not apply to it",
            ),
            (
                self.guide_gradient in {g.value for g in GuideGradient},
                f"--guide-gradient must be one of {', '.join(g.value for g in GuideGradient)}, got {self.guide_gradient!r}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise OptionError(message + ".")
        problem = guide_gradient_problem(
            GuideGradient(self.guide_gradient), Elbo(self.elbo), self.particles, variant.objective
        )
        if problem:
            raise OptionError(problem + ".")
        return self

    def objective(self) -> TrainingObjective:
        """The run's objective (its Pyro ELBO object and all), built from this checked config."""
        return TrainingObjective.of(
            Elbo(self.elbo), self.particles, GuideGradient(self.guide_gradient), self.hybrid_weight
        )

    def differences(self, other: "TrainConfig") -> dict[str, tuple[Any, Any]]:
        """Fields where two configs describe different runs (the number of epochs may grow)."""
        return {
            f.name: (getattr(self, f.name), getattr(other, f.name))
            for f in fields(self)
            if f.name != "epochs" and getattr(self, f.name) != getattr(other, f.name)
        }

    def data_options(self) -> dict[str, Any]:
        """What decides the images and masks a run trains on: a pretrained baseline must share them."""
        return {"mask": self.mask.value, "inputs": self.inputs, "limit": self.limit}

    def baseline(self) -> "TrainConfig":
        """The config of the pretrained baseline this run's variant starts from."""
        return TrainConfig(
            **{
                **self.to_dict(),
                "variant": "baseline",
                "hybrid_weight": None,
                "elbo": None,
                "particles": None,
                "guide_gradient": None,
            }
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mask": self.mask.value}

    @classmethod
    def from_dict(cls, raw: Any) -> "TrainConfig":
        """A config as saved; ``ValueError`` naming the first field of the wrong type or value.
        Runs saved before ``inputs`` and ``hybrid_weight`` were refused where they do not apply
        stored their defaults there: those are read as "not given"."""
        if not isinstance(raw, dict):
            raise ValueError(f"a config is a JSON object, not {type(raw).__name__}")
        values = {}
        for f in fields(cls):
            if f.name not in raw:
                continue
            value = raw[f.name]
            kind = f.type.split(" | ")[
                0
            ]  # "int", "float", "str" or "Mask"; "| None" when it may be absent
            expected, what = {"int": (int, "an integer"), "float": ((int, float), "a number")}.get(
                kind, (str, "a string")
            )
            absent = value is None and "None" in f.type
            if not absent and (isinstance(value, bool) or not isinstance(value, expected)):
                raise ValueError(f"{f.name} is {value!r}, not {what}")
            values[f.name] = value
        if values.get("mask", "random") == "random" and values.get("inputs") == 1:
            values["inputs"] = None
        if not _is_hybrid(
            values.get("variant")
        ):  # stored, and ignored, by runs of the first landing
            values["hybrid_weight"] = None
        return cls(**values)


def _is_hybrid(variant: str | None) -> bool:
    return variant in VARIANTS and VARIANTS[variant].objective is Objective.hybrid


@dataclass(frozen=True)
class Refine:
    """How ``evaluate``'s refined proposal (``proposals.refined``) is made for each image: Adam
    ``steps`` on its importance-weighted bound with K = ``particles`` draws per step (fresh each
    step), learning rate ``lr``, on loc and log-scale."""

    # chosen on the first 1,000 training images (README, "Proposals"): 90% of the gain of the
    # issue's probe (100 steps, K=32, lr 1e-2) at about a quarter of its cost
    steps: int = 80
    particles: int = 8
    lr: float = 0.01

    def __post_init__(self) -> None:
        require_at_least_one(refine_steps=self.steps, refine_particles=self.particles)
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise OptionError(f"--refine-lr must be a positive number, got {self.lr}.")

    def describe(self) -> str:
        return f"{self.steps} Adam steps (lr {self.lr:g}) on the IWAE-{self.particles} bound"


@dataclass
class EvalConfig:
    """How ``evaluate`` measures NCLL."""

    samples: int = 100  # importance samples S per image
    split: Split = Split.test
    limit: int | None = None  # the first N images of the split only
    batch_size: int = (
        50  # images per chunk: with S = 100 particles, 5,000 rows fit the CPU cache best
    )
    seed: int = 0  # of the evaluation masks and the z draws
    proposal: str | None = None  # guide, tuned or refined (proposals); None: the best the run has
    refine: Refine = field(default_factory=Refine)  # the refined proposal's settings

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "EvalConfig":
        require_at_least_one(samples=self.samples, limit=self.limit, batch_size=self.batch_size)
        check_seed(self.seed)
        self.split = check_split(self.split)
        if self.proposal is not None:
            self.proposal = getattr(self.proposal, "value", self.proposal)
            if self.proposal not in PROPOSALS:
                raise OptionError(
                    f"--proposal must be one of {', '.join(PROPOSALS)}, got {self.proposal!r}."
                )
        if not isinstance(self.refine, Refine):
            raise OptionError(f"refine must be a Refine, got {self.refine!r}.")
        return self


@dataclass
class SampleConfig:
    """What ``sample`` draws."""

    num_images: int = 10  # columns: the first N images of the split
    num_samples: int = 10  # CVAE completions per image, one row each
    split: Split = Split.test
    seed: int = 0  # of the masks (as evaluate draws them) and the z draws

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> "SampleConfig":
        require_at_least_one(num_images=self.num_images, num_samples=self.num_samples)
        check_seed(self.seed)
        self.split = check_split(self.split)
        return self


@dataclass
class Context:
    """Where a command works, resolved once per command: the MNIST folder, the device, images
    ``(N, 784)`` that replace the MNIST split read (tests), where messages go, and who hears of
    progress ``(images done, images in all, run name)``."""

    data_dir: str | Path | None = None
    device: torch.device | str = "auto"
    images: torch.Tensor | None = None
    log: Callable[[str], None] = print
    progress: Callable[[int, int, str], None] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.device, str):
            self.device = resolve_device(self.device)

    def split_images(self, split: Split) -> torch.Tensor:
        """The images ``(N, 784)`` of ``split``: ``images`` when given, else MNIST's."""
        return self.images if self.images is not None else load_split(split, self.data_dir)[0]


def with_options(kind: type, config: Any, context: Context | None, options: dict) -> tuple:
    """A command's config (of ``kind``) and context, with ``options`` (fields of either, by name)
    set on them: the keyword form of a call from Python (``evaluate_run(run, samples=10)``)."""
    own = {f.name for f in fields(kind)}
    mine = {k: options.pop(k) for k in list(options) if k in own}
    if config is None or mine:  # a config given whole is used as it is (checked already)
        config = kind(**mine) if config is None else replace(config, **mine)
    if context is None or options:
        context = Context(**options) if context is None else replace(context, **options)
    return config, context
