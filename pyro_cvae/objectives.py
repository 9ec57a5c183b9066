"""Lower-variance gradient estimators for the guide that Pyro does not ship, as one poutine.

Pyro's ELBOs differentiate a reparameterised guide's log q(z) through both the path of z and
q's parameters. The second part has zero expectation and only adds noise: "sticking the
landing" (STL; Roeder, Wu & Duvenaud 2017) drops it. With the importance-weighted bound, the
guide's gradient also degrades as K grows (Rainforth et al. 2018); doubly reparameterised
gradients (DReG; Tucker, Lawson, Gu & Maddison 2019) fix that, unbiasedly, by weighting each
particle's path gradient by its normalised importance weight once more (w~_k^2 instead of w~_k).
Both train the guide on the bound, which makes q mode-seeking: a tight bound for K draws, but a
narrow proposal for the importance sampler that measures NCLL. Reweighted wake-sleep's wake-phase
update (Bornschein & Bengio 2015; Le et al. 2019) instead trains q to minimise KL(p(z|x,y) || q),
which covers the posterior's mass; its doubly reparameterised form (Tucker et al. 2019, sec. 4)
weights each path gradient by w~_k - w~_k^2. Pyro's ``ReweightedWakeSleep`` has the score-function
form only, with one weight for a whole mini-batch ("mini-batch training is not supported yet", its
docstring says), so it cannot train this amortised guide per image. Pyro has no DReG estimator
(pyro-ppl/pyro issue #2598, draft PR #2605 for an IWAE-DReG loss, unmerged), so
``GuidePathGradient`` adds them around an unchanged Pyro ELBO call:

    with GuidePathGradient(weights=...):
        RenyiELBO(alpha=0, ...).loss_and_grads(model, guide, ...)
"""

from __future__ import annotations

import enum
from typing import Callable

import pyro.distributions as dist
import torch
from pyro.poutine.messenger import Messenger


class GuideGradient(str, enum.Enum):
    """How the guide's parameters get their gradient."""

    reparam = "reparam"  # Pyro's default: path and score of log q
    stl = "stl"  # sticking the landing: the path only (needs a Monte Carlo KL: trace or iwae)
    dreg = "dreg"  # doubly reparameterised (iwae only): the path, weighted by w~_k^2
    rws = "rws"  # wake-phase update, doubly reparameterised (iwae, K > 1): the path, weighted by w~_k - w~_k^2


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
