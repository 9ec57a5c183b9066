"""The CVAE as one Pyro model and one guide, and the registry of the variants that reshape it.

    model:  z ~ p(z|x) = N(prior_net(x filled by the baseline)),   y ~ Bernoulli(generation_net(z[, x]))
    guide:  z ~ q(z|x,y) = N(recognition_net(x filled with y))

Only hidden pixels enter the likelihood: the ``y`` site is the hidden pixels of the image,
gathered densely (both masking protocols hide the same number of pixels in every image), so
no work is spent on pixels that are not scored. Visible pixels of ``x`` are set, hidden ones
are -1. Tensors: ``x``, ``y`` ``(B, 784)``, ``hidden`` ``(B, 784)`` bool, ``z`` ``(B, 200)``,
the ``y`` site ``(B, n_hidden)``; or ``(S, B, ...)`` under an outer particle plate at ``dim=-2``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

from .nets import Z_DIM, BaselineNet, GaussianNet, GenerationNet, PixelHead
from .objectives import Elbo, GuideGradient, Objective
from .references import TABLE


class Baseline(str, enum.Enum):
    """A variant's baseline net: none, pretrained and fixed, or trained through the prior."""

    none = "none"
    frozen = "frozen"
    joint = "joint"


class Prior(str, enum.Enum):
    conditional = "conditional"  # p(z|x) from the prior net
    standard = "standard"  # N(0, I)


class Decoder(str, enum.Enum):
    """p(y|z): pixels independent given z (the reference's MLP), or autoregressive over the
    hidden pixels in raster order (the MLP's logits reshaped by a ``PixelHead``)."""

    mlp = "mlp"
    pixelcnn = "pixelcnn"


class Proposal(str, enum.Enum):
    """The importance-sampling proposal; its value is what evaluation reports."""

    recognition = "recognition net q(z|x,y)"
    prior = "prior p(z|x) (no recognition net)"
    none = "none (deterministic: exact likelihood)"


@dataclass(frozen=True)
class Variant:
    """One row of the results table, as data. ``pretrained``: the baseline net starts from the
    runs directory's ``baseline`` run (else from scratch)."""

    name: str
    summary: str
    baseline: Baseline = Baseline.none
    pretrained: bool = False  # the baseline starts from the runs folder's pretrained baseline run
    prior: Prior = Prior.conditional
    conditioned_decoder: bool = False
    objective: Objective = Objective.cvae
    elbo: Elbo = Elbo.meanfield  # the default training objective (--elbo overrides)
    particles: int = 1  # K of that objective (--particles overrides)
    guide_gradient: GuideGradient = GuideGradient.reparam  # (--guide-gradient overrides)
    decoder: Decoder = Decoder.mlp

    @property
    def reference_config(self) -> str | None:
        """The reference implementation's config file of this row (``references.TABLE``)."""
        row = TABLE.get(self.name)
        return row.config if row else None

    @property
    def has_recognition_net(self) -> bool:
        return self.objective in (Objective.cvae, Objective.hybrid)

    def importance_samples(self, samples: int) -> int:
        """S actually drawn: the deterministic baseline has no latent, so one is exact."""
        return 1 if self.objective is Objective.baseline else samples


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in [
        Variant(
            "baseline",
            "deterministic net alone",
            objective=Objective.baseline,
        ),
        Variant(
            "cvae",
            "prior fed by a pretrained, frozen baseline",
            baseline=Baseline.frozen,
            pretrained=True,
        ),
        Variant(
            "no-baseline",
            "no baseline; prior sees x alone",
        ),
        Variant(
            "cond-decoder",
            "as cvae, decoder p(y|z,x)",
            baseline=Baseline.frozen,
            pretrained=True,
            conditioned_decoder=True,
        ),
        Variant(
            "cond-decoder-no-baseline",
            "as no-baseline, decoder p(y|z,x)",
            conditioned_decoder=True,
        ),
        Variant(
            "unconditioned-prior",
            "prior N(0, I), no baseline",
            prior=Prior.standard,
        ),
        Variant(
            "joint-pretrained",
            "baseline starts pretrained and trains with the CVAE",
            baseline=Baseline.joint,
            pretrained=True,
        ),
        Variant(
            "joint-scratch",
            "baseline starts random and trains with the CVAE",
            baseline=Baseline.joint,
        ),
        Variant(
            "gsnn",
            "paper's GSNN: log p(y|x,z), z from the prior; as joint-scratch, no recognition net",
            baseline=Baseline.joint,
            objective=Objective.gsnn,
        ),
        Variant(
            "hybrid",
            "paper's weighted sum of the CVAE and GSNN objectives; as joint-scratch",
            baseline=Baseline.joint,
            objective=Objective.hybrid,
        ),
        # beyond the table: the same models trained on the importance-weighted bound (K=10) with
        # doubly reparameterised gradients
        Variant(
            "joint-scratch-iwae",
            "as joint-scratch, trained on the IWAE bound (K=10, DReG)",
            baseline=Baseline.joint,
            elbo=Elbo.iwae,
            particles=10,
            guide_gradient=GuideGradient.dreg,
        ),
        # beyond the table: the decoder made autoregressive over the hidden pixels (PixelHead)
        Variant(
            "joint-scratch-pixelcnn",
            "as joint-scratch, decoder autoregressive over hidden pixels (PixelHead, 3,170 weights)",
            baseline=Baseline.joint,
            decoder=Decoder.pixelcnn,
        ),
        Variant(
            "cvae-iwae",
            "as cvae, trained on the IWAE bound (K=10, DReG)",
            baseline=Baseline.frozen,
            pretrained=True,
            elbo=Elbo.iwae,
            particles=10,
            guide_gradient=GuideGradient.dreg,
        ),
    ]
}


def get_variant(name: str) -> Variant:
    """The registry entry of a variant name; a ValueError lists the valid names."""
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(
            f"unknown variant {name!r}; choose one of: {', '.join(VARIANTS)}."
        ) from None


class GreyBernoulli(dist.Bernoulli):
    """Bernoulli pixels on logits, scored against grey targets in [0, 1] (hence no validation):
    log p(y) = y * logits - softplus(logits), minus the binary cross-entropy. The same values as
    ``Bernoulli.log_prob``, computed in fewer passes than its BCE kernel: evaluation calls this
    on 100 particles x 588 pixels of every image."""

    def __init__(self, logits: torch.Tensor):
        super().__init__(logits=logits, validate_args=False)

    def expand(self, batch_shape, _instance=None):
        return GreyBernoulli(self.logits.expand(torch.Size(batch_shape)))

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return value * self.logits - F.softplus(self.logits)


def hidden_pixels(hidden: torch.Tensor) -> torch.Tensor:
    """Indices ``(B, n_hidden)`` of each image's hidden pixels, in increasing order."""
    counts = hidden.sum(-1)
    if counts.numel() and counts.min() != counts.max():
        raise ValueError(
            "every image of a batch must hide the same number of pixels (both masking protocols do)."
        )
    return hidden.nonzero()[:, -1].view(hidden.shape[:-1] + (-1,))


def take(pixels_of: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """``pixels_of[..., b, pixels[b]]``: the chosen pixels of each image; leading particle dims broadcast."""
    return pixels_of.gather(-1, pixels.expand(pixels_of.shape[:-1] + pixels.shape[-1:]))


class CausalPixels(dist.TorchDistribution):
    """p(y|z,x) of an autoregressive decoder: each hidden pixel a Bernoulli on the logit
    ``b + 2 sigmoid(a) * decoded`` where ``decoded`` ``(..., B, 784)`` is the MLP's logit from z
    and (a, b) come from ``head`` (a ``PixelHead``) on the pixels before it in raster order and
    on the visible ones. Scored in one pass (the image is known); drawn pixel by pixel.

    ``x`` ``(B, 784)`` is the input (hidden pixels -1), ``pixels`` ``(B, n_hidden)`` the hidden
    pixels in increasing order (``hidden_pixels``); the event is their grey values."""

    arg_constraints = {}
    support = dist.constraints.independent(dist.constraints.unit_interval, 1)

    def __init__(self, decoded, head, x, pixels):
        self.decoded, self.head, self.x, self.pixels = decoded, head, x, pixels
        super().__init__(decoded.shape[:-1], pixels.shape[-1:], validate_args=False)

    def expand(self, batch_shape, _instance=None):
        decoded = self.decoded.expand(torch.Size(batch_shape) + self.decoded.shape[-1:])
        return CausalPixels(decoded, self.head, self.x, self.pixels)

    def logits(self, value: torch.Tensor) -> torch.Tensor:
        """Logits ``(..., B, n_hidden)`` of the hidden pixels when they hold ``value``."""
        image = self.x.expand(value.shape[:-1] + self.x.shape[-1:])
        image = image.scatter(-1, self.pixels.expand_as(value), value)
        gate, bias = self.head(image, self.x)
        logits = bias + 2 * torch.sigmoid(gate) * self.decoded
        return take(logits, self.pixels)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        logits = self.logits(value)
        return (value * logits - F.softplus(logits)).sum(-1)

    def _rollout(self, draw: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        value = self.decoded.new_zeros(self.batch_shape + self.event_shape)
        for i in range(self.event_shape[0]):  # pixel i depends on pixels < i only
            value[..., i] = draw(self.logits(value)[..., i])
        return value

    def sample(self, sample_shape=torch.Size()):
        if sample_shape:
            return self.expand(torch.Size(sample_shape) + self.batch_shape).sample()
        with torch.no_grad():
            return self._rollout(lambda logits: torch.bernoulli(torch.sigmoid(logits)))

    @property
    def mean(self) -> torch.Tensor:
        """Each pixel's probability given the probabilities before it (a deterministic rollout:
        what ``sample`` draws pictures of)."""
        with torch.no_grad():
            return self._rollout(torch.sigmoid)


class CVAE(nn.Module):
    """Nets of one variant, with the Pyro ``model`` and ``guide`` that use them."""

    def __init__(self, variant: Variant, z_dim: int = Z_DIM):
        super().__init__()
        self.variant = variant
        self.z_dim = z_dim
        deterministic = variant.objective is Objective.baseline
        self.baseline_net = (
            BaselineNet() if (deterministic or variant.baseline is not Baseline.none) else None
        )
        self.prior_net = (
            GaussianNet(z_dim)
            if (variant.prior is Prior.conditional and not deterministic)
            else None
        )
        self.recognition_net = GaussianNet(z_dim) if variant.has_recognition_net else None
        self.generation_net = (
            None if deterministic else GenerationNet(z_dim, variant.conditioned_decoder)
        )
        self.pixel_head = PixelHead() if variant.decoder is Decoder.pixelcnn else None
        if variant.baseline is Baseline.frozen:
            self.baseline_net.requires_grad_(False)

    @property
    def deterministic(self) -> bool:
        return self.generation_net is None

    def baseline_guess(self, x: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """x with its hidden pixels filled by the baseline's predicted probabilities (a frozen
        baseline's parameters need no gradient, so no graph is built through it)."""
        return torch.where(hidden, torch.sigmoid(self.baseline_net(x)), x)

    def prior(self, x: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loc, scale) of p(z|x), each ``(B, z_dim)``."""
        if self.prior_net is None:  # the unconditioned prior N(0, I)
            loc = x.new_zeros(x.shape[:-1] + (self.z_dim,))
            return loc, torch.ones_like(loc)
        if self.baseline_net is not None:
            x = self.baseline_guess(x, hidden)
        return self.prior_net(x)

    def model(
        self, x: torch.Tensor, y: torch.Tensor | None = None, hidden: torch.Tensor | None = None
    ):
        """p(y|x) = ∫ p(y|z,x) p(z|x) dz; observes the hidden pixels of ``y`` when given, else
        samples them; returns them ``(..., B, n_hidden)`` (``hidden_pixels`` says which)."""
        if (
            self.variant.baseline is not Baseline.frozen and self.baseline_net is not None
        ):  # a frozen net is no parameter
            pyro.module("baseline_net", self.baseline_net)
        if self.prior_net is not None:
            pyro.module("prior_net", self.prior_net)
        if self.generation_net is not None:
            pyro.module("generation_net", self.generation_net)
        if self.pixel_head is not None:
            pyro.module("pixel_head", self.pixel_head)
        with pyro.plate("data", x.shape[-2], dim=-1):
            if self.deterministic:
                logits = self.baseline_net(x)
            else:
                loc, scale = self.prior(x, hidden)
                z = pyro.sample("z", dist.Normal(loc, scale).to_event(1))
                logits = self.generation_net(z, x)
            pixels = hidden_pixels(hidden)
            if self.pixel_head is not None:
                likelihood = CausalPixels(logits, self.pixel_head, x, pixels)
            else:
                likelihood = GreyBernoulli(take(logits, pixels)).to_event(1)
            return pyro.sample("y", likelihood, obs=None if y is None else take(y, pixels))

    def guide(
        self, x: torch.Tensor, y: torch.Tensor | None = None, hidden: torch.Tensor | None = None
    ):
        """q(z|x,y): the recognition net sees the whole image (x with its hidden pixels from y)."""
        if self.recognition_net is None:  # the baseline and the GSNN have none
            return None
        pyro.module("recognition_net", self.recognition_net)
        with pyro.plate("data", x.shape[-2], dim=-1):
            loc, scale = self.recognition_net(torch.where(hidden, y, x))
            return pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    def prior_guide(
        self, x: torch.Tensor, y: torch.Tensor | None = None, hidden: torch.Tensor | None = None
    ):
        """The prior p(z|x) used as a proposal (for a GSNN, which has no recognition net)."""
        with pyro.plate("data", x.shape[-2], dim=-1):
            loc, scale = self.prior(x, hidden)
            return pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    def proposal(self) -> tuple[Callable, Proposal]:
        """The importance-sampling proposal and what it is: the guide q(z|x,y); for a GSNN, which
        has no recognition net, the prior; for the deterministic baseline, nothing to sample."""
        if self.deterministic:
            return self.guide, Proposal.none
        if self.recognition_net is None:
            return self.prior_guide, Proposal.prior
        return self.guide, Proposal.recognition

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]
