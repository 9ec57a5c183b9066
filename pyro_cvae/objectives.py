"""The training objectives: which loss a variant optimises, the Pyro ELBO object that computes
it, and the guide gradients Pyro does not ship (sticking the landing, DReG, the wake update of
reweighted wake-sleep), added as one poutine around an unchanged Pyro ELBO call::

    with GuidePathGradient(weights=...):
        RenyiELBO(alpha=0, ...).loss_and_grads(model, guide, ...)

The README ("Training objectives") says where each estimator comes from.
"""

from __future__ import annotations

import contextlib
import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import pyro.distributions as dist
import torch
from pyro.infer import ELBO, RenyiELBO, Trace_ELBO, TraceMeanField_ELBO
from pyro.poutine.messenger import Messenger

if TYPE_CHECKING:  # the model imports this module's enums
    from .data import Batch
    from .model import CVAE


class Objective(str, enum.Enum):
    baseline = "baseline"  # the deterministic net alone: BCE of the hidden pixels
    cvae = "cvae"  # the ELBO with the recognition net
    gsnn = "gsnn"  # log p(y|x,z) with z from the prior; no recognition net
    hybrid = "hybrid"  # weighted sum of the CVAE and GSNN objectives


class Elbo(str, enum.Enum):
    """The training objective, a Pyro ELBO object (``make_elbo``)."""

    meanfield = "meanfield"  # TraceMeanField_ELBO: closed-form KL, the reference's objective
    trace = "trace"  # Trace_ELBO: Monte Carlo KL, as in Pyro's CVAE example
    iwae = "iwae"  # RenyiELBO(alpha=0): the importance-weighted bound of Burda et al. (2016)


class GuideGradient(str, enum.Enum):
    """How the guide's parameters get their gradient."""

    reparam = "reparam"  # Pyro's default: path and score of log q
    stl = "stl"  # sticking the landing: the path only (needs a Monte Carlo KL: trace or iwae)
    dreg = "dreg"  # doubly reparameterised (iwae only): the path, weighted by w~_k^2
    # wake-phase update, doubly reparameterised (iwae, K > 1): the path, weighted by w~_k - w~_k^2
    rws = "rws"


def guide_gradient_problem(
    gradient: GuideGradient, elbo: Elbo, particles: int, objective: Objective
) -> str | None:
    """Why a guide gradient does not apply to an objective, or None: the one rule behind the
    run's config check."""
    if gradient is GuideGradient.stl and elbo is Elbo.meanfield:
        return "--guide-gradient stl needs a Monte Carlo KL: use it with --elbo trace or iwae"
    if gradient in (GuideGradient.dreg, GuideGradient.rws) and elbo is not Elbo.iwae:
        return (
            f"--guide-gradient {gradient.value} is for the importance-weighted bound: "
            "use it with --elbo iwae"
        )
    if gradient is GuideGradient.rws and objective is not Objective.cvae:
        return (
            f"--guide-gradient rws trains a recognition net; the {objective.value} objective also "
            "uses the prior as a proposal, where it would bend the model's gradient: "
            "use --guide-gradient dreg"
        )
    if gradient is GuideGradient.rws and particles < 2:
        return (
            "--guide-gradient rws weighs particles against each other: "
            "use it with --particles 2 or more"
        )
    return None


def make_elbo(kind: Elbo, particles: int) -> ELBO:
    """The Pyro ELBO object of a training objective, K particles vectorised over a plate at dim -2.

    meanfield: ``TraceMeanField_ELBO`` (the closed-form KL: the reference's objective);
    trace: ``Trace_ELBO`` (Monte Carlo KL); iwae: ``RenyiELBO(alpha=0)``, the importance-weighted
    bound log (1/K) sum_k p(y, z_k|x) / q(z_k|x,y), per image (the data plate is kept)."""
    options = dict(num_particles=particles, vectorize_particles=particles > 1, max_plate_nesting=1)
    if kind == Elbo.iwae:
        return RenyiELBO(alpha=0.0, **options)
    return (TraceMeanField_ELBO if kind == Elbo.meanfield else Trace_ELBO)(**options)


def stopped(fn: dist.Distribution) -> dist.Distribution:
    """The same diagonal Gaussian with its parameters cut from the graph."""
    base = fn.base_dist if isinstance(fn, dist.Independent) else fn
    if not isinstance(base, dist.Normal):
        raise NotImplementedError(
            f"path gradients need a Normal guide site, got {type(base).__name__}"
        )
    detached = dist.Normal(base.loc.detach(), base.scale.detach())
    return (
        detached.to_event(fn.reinterpreted_batch_ndims)
        if isinstance(fn, dist.Independent)
        else detached
    )


class GuidePathGradient(Messenger):
    """Draws every latent site that has no value yet (the guide's; the model's replay them) with
    ``rsample`` and scores it with a stopped copy of its distribution (STL). With ``weights``, a
    function returning the normalised importance weights ``(K, B)`` of the particles, called in
    the backward pass when the traces are complete, each particle's gradient reaching z is
    multiplied by its weight (DReG). Must sit outside the ELBO call, so that it sees the sites
    after the particle plate has broadcast them and before the ELBO's trace records them."""

    def __init__(self, weights: Callable[[], torch.Tensor] | None = None):
        super().__init__()
        self.weights = weights

    def _process_message(self, msg) -> None:
        if msg["type"] != "sample" or msg["is_observed"] or msg["value"] is not None:
            return
        if not getattr(
            msg["fn"], "has_rsample", False
        ):  # plates' subsampling sites, discrete latents
            return
        fn = msg["fn"]
        value = fn.rsample(msg["kwargs"].get("sample_shape", torch.Size()))
        if self.weights is not None and value.requires_grad:
            value.register_hook(self._reweight)
        msg["value"], msg["fn"] = value, stopped(fn)

    def _reweight(self, grad: torch.Tensor) -> torch.Tensor:
        weights = self.weights()  # (K, B): a particle dim leads z (K, B, z_dim)
        return grad * weights.reshape(weights.shape + (1,) * (grad.dim() - weights.dim()))


# ---------------------------------------------------------------------------------------------
# A run's objective, and its gradient on a batch


@dataclass(frozen=True)
class TrainingObjective:
    """What a run optimises, built once per run from its checked config: the Pyro ELBO object
    of ``kind`` with K = ``particles``, the guide gradient, and the weight of the CVAE term in
    a hybrid (None elsewhere). A step uses it as it is."""

    kind: Elbo
    elbo: ELBO
    particles: int
    guide_gradient: GuideGradient = GuideGradient.reparam
    hybrid_weight: float | None = None

    @classmethod
    def of(
        cls,
        kind: Elbo,
        particles: int,
        guide_gradient: GuideGradient = GuideGradient.reparam,
        hybrid_weight: float | None = None,
    ) -> "TrainingObjective":
        kind, guide_gradient = Elbo(kind), GuideGradient(guide_gradient)
        return cls(kind, make_elbo(kind, particles), particles, guide_gradient, hybrid_weight)

    @classmethod
    def around(
        cls, elbo: ELBO, hybrid_weight: float, guide_gradient: GuideGradient, objective: Objective
    ) -> "TrainingObjective":
        """The objective of a bare Pyro ELBO object (tests, benchmarks), checked by the rule a
        run's config is checked by."""
        kind = (
            Elbo.iwae
            if isinstance(elbo, RenyiELBO)
            else Elbo.meanfield
            if isinstance(elbo, TraceMeanField_ELBO)
            else Elbo.trace
        )
        guide_gradient = GuideGradient(guide_gradient)
        problem = guide_gradient_problem(guide_gradient, kind, elbo.num_particles, objective)
        if problem:
            raise ValueError(problem + ".")
        return cls(kind, elbo, elbo.num_particles, guide_gradient, hybrid_weight)

    def backward(self, cvae: CVAE, batch: Batch) -> dict[str, float]:
        """Accumulate into ``.grad`` the gradient of the variant's loss, a mean over the batch's
        images; returns its terms per image: ``loss``, ``recon``, ``kl``. recon and KL are of the
        first term's draws (the CVAE's, in a hybrid)."""
        args, n = (batch.x, batch.y, batch.hidden), batch.x.shape[0]
        params = cvae.trainable_parameters()
        loss, recon, kl = 0.0, 0.0, 0.0
        first = True
        for weight, guide in _terms(cvae, self.hybrid_weight):
            if weight == 0:
                continue
            model_draws, guide_draws = Draws(), Draws()  # keep the draws for recon and KL
            model, guide = model_draws(cvae.model), guide_draws(guide)
            kept = {}  # the log terms the weights were computed from, if they were
            with self._path_gradient(model_draws, guide_draws, kept):
                term = self._term_backward(model, guide, args, params, weight / n)
            loss += weight * term / n
            if first:
                first = False
                recon, kl = self._recon_and_kl(term, n, model_draws, guide_draws, kept)
            # DReG's hook on z refers to the draws, which refer to z: a cycle through autograd
            # that Python's collector cannot see; dropping the draws breaks it (else every step
            # leaks its graph)
            model_draws.sites.clear()
            guide_draws.sites.clear()
        return {"loss": loss, "recon": recon, "kl": kl}

    def _path_gradient(self, model_draws: Draws, guide_draws: Draws, kept: dict):
        """The poutine around the ELBO call that the guide gradient asks for (none: reparam)."""
        if self.guide_gradient is GuideGradient.reparam:
            return contextlib.nullcontext()
        if self.guide_gradient is GuideGradient.stl:
            return GuidePathGradient(None)
        w = _normalized_weights(model_draws, guide_draws, kept)
        # RenyiELBO's path gradient reaching z_k is w~_k dlog w_k/dz_k: times w~_k (DReG), or
        # times 1 - w~_k (the wake-phase update, w~_k - w~_k^2)
        return GuidePathGradient(
            w if self.guide_gradient is GuideGradient.dreg else (lambda w=w: 1 - w())
        )

    def _term_backward(self, model, guide, args: tuple, params: list, scale: float) -> float:
        """One ELBO term's loss (summed over images), its gradient times ``scale`` added to
        ``.grad``. ``differentiable_loss`` gives the loss of ``Trace_ELBO`` and
        ``TraceMeanField_ELBO`` as a tensor; ``RenyiELBO`` has none, and its ``loss_and_grads``
        runs the backward pass itself, so its gradient is scaled afterwards."""
        if self.kind is not Elbo.iwae:
            term = self.elbo.differentiable_loss(model, guide, *args)
            (term * scale).backward()
            return term.item()
        earlier = [p.grad for p in params]
        for p in params:
            p.grad = None
        term = self.elbo.loss_and_grads(model, guide, *args)
        torch._foreach_mul_([p.grad for p in params if p.grad is not None], scale)
        for p, g in zip(params, earlier):
            if g is not None:
                p.grad = g if p.grad is None else p.grad.add_(g)
        return term

    def _recon_and_kl(
        self, term: float, n: int, model_draws: Draws, guide_draws: Draws, kept: dict
    ) -> tuple[float, float]:
        """-log p(y|x,z) and KL per image of a term's draws; meanfield's KL is its closed form,
        loss - recon, so only the likelihood is recomputed."""
        closed_form_kl = self.kind is Elbo.meanfield
        log_lik, log_ratio = kept.get("terms") or _log_terms(
            model_draws, None if closed_form_kl else guide_draws
        )
        particles = log_lik.numel() / n
        recon = -log_lik.sum().item() / particles / n
        kl = term / n - recon if closed_form_kl else -log_ratio.sum().item() / particles / n
        return recon, kl


def objective_backward(
    cvae: CVAE,
    batch: Batch,
    objective: TrainingObjective | ELBO,
    hybrid_weight: float = 0.5,
    guide_gradient: GuideGradient = GuideGradient.reparam,
) -> dict[str, float]:
    """``objective.backward(cvae, batch)``: the gradient of the run's loss into ``.grad``, its
    terms per image returned. A bare Pyro ELBO object is taken with ``hybrid_weight`` and
    ``guide_gradient`` beside it (tests, benchmarks)."""
    if isinstance(objective, ELBO):
        objective = TrainingObjective.around(
            objective, hybrid_weight, guide_gradient, cvae.variant.objective
        )
    return objective.backward(cvae, batch)


def _terms(cvae: CVAE, hybrid_weight: float | None) -> list[tuple[float, Callable]]:
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
