"""The training objectives: which loss a variant optimises, the Pyro ELBO object that computes
it, and the guide gradients Pyro does not ship (sticking the landing, DReG, the wake update of
reweighted wake-sleep), added as one poutine around an unchanged Pyro ELBO call::

    with GuidePathGradient(weights=...):
        RenyiELBO(alpha=0, ...).loss_and_grads(model, guide, ...)

The README ("Training objectives") says where each estimator comes from.
"""

from __future__ import annotations

import enum
from typing import Callable

import pyro.distributions as dist
import torch
from pyro.infer import ELBO, RenyiELBO, Trace_ELBO, TraceMeanField_ELBO
from pyro.poutine.messenger import Messenger


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
