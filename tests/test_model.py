import math

import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.distributions.kl import kl_divergence
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from pyro_cvae.config import TrainConfig
from pyro_cvae.data import hidden_masks, make_batch
from pyro_cvae.model import CVAE, VARIANTS, get_variant, hidden_pixels
from pyro_cvae.nets import GenerationNet
from pyro_cvae.objectives import Elbo, GuideGradient, make_elbo, objective_backward
from pyro_cvae.train import make_optimizer, train_step

from .helpers import fake_images

B = 6


def batch(seed=0, mask="random", inputs=1):
    images = fake_images(B, seed)
    return make_batch(images, hidden_masks(B, mask, inputs, torch.Generator().manual_seed(seed)))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_traces_have_the_paper_sites(name):
    pyro.set_rng_seed(0)
    cvae = CVAE(get_variant(name))
    b = batch()
    guide_trace = poutine.trace(cvae.guide).get_trace(b.x, b.y, b.hidden)
    model_trace = poutine.trace(poutine.replay(cvae.model, trace=guide_trace)).get_trace(
        b.x, b.y, b.hidden
    )
    y = model_trace.nodes["y"]
    assert y["is_observed"] and y["fn"].batch_shape == (B,) and y["fn"].event_shape == (588,)
    assert torch.equal(y["value"], b.y[b.hidden].view(B, 588))
    if name == "baseline":
        assert "z" not in model_trace.nodes and "z" not in guide_trace.nodes
        return
    z = model_trace.nodes["z"]
    assert z["fn"].batch_shape == (B,) and z["fn"].event_shape == (200,)
    assert z["value"].shape == (B, 200)
    assert ("z" in guide_trace.nodes) == (name != "gsnn")  # a GSNN has no recognition net
    if name == "unconditioned-prior":
        assert torch.equal(z["fn"].base_dist.loc, torch.zeros(B, 200))
        assert torch.equal(z["fn"].base_dist.scale, torch.ones(B, 200))
    # the same model samples hidden pixels when y is not given
    sampled = poutine.trace(cvae.model).get_trace(b.x, None, b.hidden).nodes["y"]
    assert not sampled["is_observed"] and sampled["value"].shape == (B, 588)


def test_registry_is_the_ten_variants_of_the_design_and_the_importance_weighted_rows():
    assert list(VARIANTS) == [
        "baseline",
        "cvae",
        "no-baseline",
        "cond-decoder",
        "cond-decoder-no-baseline",
        "unconditioned-prior",
        "joint-pretrained",
        "joint-scratch",
        "gsnn",
        "hybrid",
        "joint-scratch-iwae",
        "joint-scratch-pixelcnn",
        "cvae-iwae",
    ]
    for name, like in [("joint-scratch-iwae", "joint-scratch"), ("cvae-iwae", "cvae")]:
        new, old = VARIANTS[name], VARIANTS[like]
        assert (new.baseline, new.pretrained, new.prior, new.conditioned_decoder) == (
            old.baseline,
            old.pretrained,
            old.prior,
            old.conditioned_decoder,
        )  # the same model
        assert (
            TrainConfig(variant=name).elbo == "iwae" and TrainConfig(variant=name).particles == 10
        )
        assert TrainConfig(variant=name, elbo="meanfield").particles == 1
    assert TrainConfig(variant="joint-scratch", elbo="iwae").particles == 5
    with pytest.raises(ValueError, match="choose one of"):
        get_variant("cvea")


def test_only_hidden_pixels_enter_the_likelihood():
    pyro.set_rng_seed(0)
    cvae = CVAE(get_variant("no-baseline"))
    b = batch()
    guide_trace = poutine.trace(cvae.guide).get_trace(b.x, b.y, b.hidden)

    def log_lik(y):
        tr = poutine.trace(poutine.replay(cvae.model, trace=guide_trace)).get_trace(
            b.x, y, b.hidden
        )
        return tr.nodes["y"]["fn"].log_prob(tr.nodes["y"]["value"])

    before = log_lik(b.y)
    visible_changed = b.y.clone()
    visible_changed[~b.hidden] = 1 - visible_changed[~b.hidden]
    assert torch.equal(log_lik(visible_changed), before)
    hidden_changed = b.y.clone()
    hidden_changed[b.hidden] = 1 - hidden_changed[b.hidden]
    assert not torch.allclose(log_lik(hidden_changed), before)


def test_hidden_pixels_refuses_unequal_masks():
    hidden = torch.zeros(2, 784, dtype=torch.bool)
    hidden[0, :10] = True
    hidden[1, :11] = True
    with pytest.raises(ValueError, match="same number"):
        hidden_pixels(hidden)


def test_conditioned_decoder_is_the_mlp_on_the_concatenation():
    torch.manual_seed(0)
    net = GenerationNet(conditioned=True)
    z, x = torch.randn(3, 200), torch.randn(3, 784)
    first = torch.nn.Linear(984, 500)
    with torch.no_grad():
        first.weight.copy_(torch.cat([net.z_in.weight, net.x_in.weight], 1))
        first.bias.copy_(net.z_in.bias)
    assert torch.allclose(net(z, x), net.rest(first(torch.cat([z, x], -1))), atol=1e-5)
    # particles broadcast against a per-image x
    assert torch.allclose(net(z.expand(4, 3, 200), x)[2], net(z, x), atol=1e-5)


def hand_traced_elbo(cvae, b):
    """The objective as the first landing computed it by hand: the guide's trace replayed in the
    model, -log p(y|x,z) plus the analytic KL, per image."""
    guide_trace = poutine.trace(cvae.guide).get_trace(b.x, b.y, b.hidden)
    model_trace = poutine.trace(poutine.replay(cvae.model, trace=guide_trace)).get_trace(
        b.x, b.y, b.hidden
    )
    y = model_trace.nodes["y"]
    recon = -y["fn"].log_prob(y["value"]).sum()
    kl = kl_divergence(guide_trace.nodes["z"]["fn"], model_trace.nodes["z"]["fn"]).sum()
    return (recon + kl) / B, recon / B, kl / B


def close(a, b, tol=1e-4):
    """Equal up to float32 rounding, relative to the tensor's largest entry."""
    return bool((a - b).abs().max() <= tol * b.abs().max() + 1e-8)


def gradients(cvae):
    return {n: p.grad.clone() for n, p in cvae.named_parameters() if p.grad is not None}


def backward(cvae, b, elbo="meanfield", particles=1, seed=0, **kw):
    cvae.zero_grad(set_to_none=True)
    pyro.set_rng_seed(seed)
    terms = objective_backward(cvae, b, make_elbo(Elbo(elbo), particles), **kw)
    return terms, gradients(cvae)


def test_meanfield_elbo_gives_the_loss_and_gradients_of_the_hand_written_objective():
    cvae = CVAE(get_variant("joint-scratch"))
    b = batch()
    terms, ours = backward(cvae, b, seed=3)
    cvae.zero_grad(set_to_none=True)
    pyro.set_rng_seed(3)
    loss, recon, kl = hand_traced_elbo(cvae, b)
    loss.backward()
    reference = gradients(cvae)
    assert terms["loss"] == pytest.approx(loss.item(), rel=1e-6)
    assert terms["recon"] == pytest.approx(recon.item(), rel=1e-6) and terms["kl"] == pytest.approx(
        kl.item(), rel=1e-4
    )
    assert (
        ours.keys() == reference.keys() and len(ours) == 24
    )  # baseline, prior, recognition, generation nets
    for name in ours:
        assert close(ours[name], reference[name]), name


def test_iwae_with_one_particle_is_trace_elbo_on_the_same_draws():
    cvae = CVAE(get_variant("joint-scratch"))
    b = batch()
    iwae, iwae_grads = backward(cvae, b, "iwae", 1, seed=7)
    trace, trace_grads = backward(cvae, b, "trace", 1, seed=7)
    assert iwae["loss"] == pytest.approx(trace["loss"], rel=1e-6)
    assert iwae["loss"] == pytest.approx(
        iwae["recon"] + iwae["kl"], rel=1e-6
    )  # one draw: the ELBO itself
    for name in trace_grads:
        assert close(iwae_grads[name], trace_grads[name]), name


def test_importance_weighted_bound_is_per_image_and_tighter_with_more_particles():
    cvae = CVAE(get_variant("no-baseline"))
    b = batch()
    elbo = make_elbo(Elbo.iwae, 5)
    with torch.no_grad():
        one = [elbo.loss(cvae.model, cvae.guide, b.x, b.y, b.hidden) for _ in range(40)]
        pyro.set_rng_seed(0)
        five = [elbo.loss(cvae.model, cvae.guide, b.x, b.y, b.hidden) for _ in range(40)]
        single = make_elbo(Elbo.iwae, 1)
        one = [single.loss(cvae.model, cvae.guide, b.x, b.y, b.hidden) for _ in range(40)]
    assert sum(five) / 40 < sum(one) / 40 - 0.5  # -log mean_k w_k <= mean_k -log w_k, per image
    # per image, not one weight for the whole batch: K=5 on a batch equals the sum over its images
    pyro.set_rng_seed(1)
    whole = elbo.loss(cvae.model, cvae.guide, b.x, b.y, b.hidden)
    pyro.set_rng_seed(1)
    with pyro.plate("particles", 5, dim=-2):
        gt = poutine.trace(cvae.guide).get_trace(b.x, b.y, b.hidden)
        mt = poutine.trace(poutine.replay(cvae.model, trace=gt)).get_trace(b.x, b.y, b.hidden)
    gt.compute_log_prob(), mt.compute_log_prob()
    log_w = (
        mt.nodes["y"]["log_prob"] + mt.nodes["z"]["log_prob"] - gt.nodes["z"]["log_prob"]
    )  # (5, B)
    per_image = -(log_w.logsumexp(0) - math.log(5)).sum().item()
    assert whole == pytest.approx(per_image, rel=1e-5)


@pytest.mark.parametrize("gradient", [GuideGradient.dreg, GuideGradient.rws])
def test_dreg_gradient_is_the_doubly_reparameterised_estimator(gradient):
    """Tucker et al. (2019): the model gets sum_k w~_k grad log w_k, the guide sum_k w~_k^2 (IWAE's
    DReG) or sum_k (w~_k - w~_k^2) (the wake-phase update's) times the path derivative of log w_k,
    with q scored at stopped parameters; computed here by hand."""
    cvae = CVAE(get_variant("joint-scratch"))
    b = batch()
    K = 6
    _, ours = backward(cvae, b, "iwae", K, seed=1, guide_gradient=gradient)
    pyro.set_rng_seed(1)
    with pyro.plate("particles", K, dim=-2):
        gt = poutine.trace(cvae.guide).get_trace(b.x, b.y, b.hidden)
        mt = poutine.trace(poutine.replay(cvae.model, trace=gt)).get_trace(b.x, b.y, b.hidden)
    z, q = gt.nodes["z"]["value"], gt.nodes["z"]["fn"].base_dist
    stopped = pyro.distributions.Normal(q.loc.detach(), q.scale.detach()).to_event(1)
    log_w = (
        mt.nodes["y"]["fn"].log_prob(mt.nodes["y"]["value"])
        + mt.nodes["z"]["fn"].log_prob(z)
        - stopped.log_prob(z)
    )
    w = torch.softmax(log_w.detach(), 0)
    named = dict(cvae.named_parameters())
    guide_names = [n for n in named if n.startswith("recognition_net")]
    model_names = [n for n in named if n not in guide_names]
    expected = dict(
        zip(
            model_names,
            torch.autograd.grad(
                -(w * log_w).sum() / B, [named[n] for n in model_names], retain_graph=True
            ),
        )
    )
    guide_weights = w**2 if gradient == GuideGradient.dreg else w - w**2
    expected.update(
        zip(
            guide_names,
            torch.autograd.grad(
                -(guide_weights * log_w).sum() / B, [named[n] for n in guide_names]
            ),
        )
    )
    for name, grad in expected.items():
        assert close(ours[name], grad, 1e-3), name


def test_sticking_the_landing_drops_the_score_of_the_guide():
    """With STL and one particle, the guide's gradient is the path derivative of log p(y,z) - log q(z)
    with q's parameters stopped; Pyro's own Trace_ELBO (without it) differs by the score term."""
    cvae = CVAE(get_variant("no-baseline"))
    b = batch()
    _, stl = backward(cvae, b, "trace", 1, seed=2, guide_gradient=GuideGradient.stl)
    _, plain = backward(cvae, b, "trace", 1, seed=2)
    pyro.set_rng_seed(2)
    gt = poutine.trace(cvae.guide).get_trace(b.x, b.y, b.hidden)
    mt = poutine.trace(poutine.replay(cvae.model, trace=gt)).get_trace(b.x, b.y, b.hidden)
    z, q = gt.nodes["z"]["value"], gt.nodes["z"]["fn"].base_dist
    stopped = pyro.distributions.Normal(q.loc.detach(), q.scale.detach()).to_event(1)
    log_w = (
        mt.nodes["y"]["fn"].log_prob(mt.nodes["y"]["value"])
        + mt.nodes["z"]["fn"].log_prob(z)
        - stopped.log_prob(z)
    )
    params = list(cvae.recognition_net.parameters())
    expected = torch.autograd.grad(-log_w.sum() / B, params)
    names = [f"recognition_net.{n}" for n, _ in cvae.recognition_net.named_parameters()]
    for name, grad in zip(names, expected):
        assert close(stl[name], grad, 1e-3), name
    assert not close(stl[names[0]], plain[names[0]], 1e-2)
    assert close(stl["generation_net.z_in.weight"], plain["generation_net.z_in.weight"])


def test_gsnn_objective_is_the_likelihood_under_the_prior():
    cvae = CVAE(get_variant("gsnn"))
    b = batch()
    terms, _ = backward(cvae, b, seed=4)
    pyro.set_rng_seed(4)
    # with the prior as guide, log p(z|x) - log q(z) cancels: the ELBO is E_prior[log p(y|x,z)]
    reference = (
        Trace_ELBO().differentiable_loss(cvae.model, cvae.prior_guide, b.x, b.y, b.hidden) / B
    )
    assert terms["loss"] == pytest.approx(reference.item(), rel=1e-5)
    assert terms["kl"] == 0


def test_hybrid_weights_the_two_objectives():
    cvae = CVAE(get_variant("hybrid"))
    b = batch()
    half, half_grads = backward(cvae, b, seed=5, hybrid_weight=0.5)
    pyro.set_rng_seed(5)
    cvae_term = (
        TraceMeanField_ELBO().differentiable_loss(cvae.model, cvae.guide, b.x, b.y, b.hidden) / B
    )
    gsnn_term = (
        Trace_ELBO().differentiable_loss(cvae.model, cvae.prior_guide, b.x, b.y, b.hidden) / B
    )
    assert half["loss"] == pytest.approx((0.5 * cvae_term + 0.5 * gsnn_term).item(), rel=1e-5)
    full, _ = backward(cvae, b, seed=5, hybrid_weight=1.0)
    pyro.set_rng_seed(5)
    elbo = TraceMeanField_ELBO().differentiable_loss(cvae.model, cvae.guide, b.x, b.y, b.hidden) / B
    assert full["loss"] == pytest.approx(elbo.item(), rel=1e-5)
    # RenyiELBO runs its own backward pass: each term's gradient is weighted after the fact
    _, ours = backward(cvae, b, "iwae", 3, seed=5, hybrid_weight=0.25)
    elbo = make_elbo(Elbo.iwae, 3)
    cvae.zero_grad(set_to_none=True)
    pyro.set_rng_seed(5)
    elbo.loss_and_grads(cvae.model, cvae.guide, b.x, b.y, b.hidden)
    first = gradients(cvae)
    cvae.zero_grad(set_to_none=True)
    elbo.loss_and_grads(cvae.model, cvae.prior_guide, b.x, b.y, b.hidden)
    second = gradients(cvae)
    assert ours.keys() == first.keys() and not any(n.startswith("recognition_net") for n in second)
    for name in ours:
        expected = 0.25 * first[name] / B + (0.75 * second[name] / B if name in second else 0)
        assert close(ours[name], expected), name


def _step(cvae, b, steps=1):
    optimizer = make_optimizer(cvae, 1e-3)
    return [train_step(cvae, b, optimizer, TrainConfig())["loss"] for _ in range(steps)]


def test_frozen_baseline_stays_fixed_and_joint_one_learns_through_the_prior():
    b = batch()
    frozen = CVAE(get_variant("cvae"))
    before = [p.clone() for p in frozen.baseline_net.parameters()]
    _step(frozen, b, 3)
    assert all(torch.equal(a, p) for a, p in zip(before, frozen.baseline_net.parameters()))
    assert not any(p.requires_grad for p in frozen.baseline_net.parameters())

    joint = CVAE(get_variant("joint-scratch"))
    before = [p.clone() for p in joint.baseline_net.parameters()]
    _step(joint, b, 3)
    assert not any(torch.equal(a, p) for a, p in zip(before, joint.baseline_net.parameters()))
    # no loss of its own: the baseline's gradient is exactly what flows through the prior net
    backward(joint, b)
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0 for p in joint.baseline_net.parameters()
    )
    with torch.no_grad():
        joint.prior_net.net[0].weight.zero_()  # cut the only path from the baseline to the loss
    backward(joint, b)
    assert all(p.grad is None or not p.grad.any() for p in joint.baseline_net.parameters())


def test_a_few_steps_reduce_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    pyro.set_rng_seed(0)
    losses = _step(
        CVAE(get_variant("joint-scratch")), batch(), 30
    )  # the real step: fused Adam, clipping
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


def test_grey_bernoulli_is_torchs_bernoulli_on_grey_targets():
    from pyro_cvae.model import GreyBernoulli

    logits = torch.randn(3, 5, 588) * 6
    y = torch.rand(5, 588)
    expected = torch.distributions.Bernoulli(logits=logits, validate_args=False).log_prob(y)
    assert torch.allclose(GreyBernoulli(logits).log_prob(y), expected, atol=1e-5)
    expanded = GreyBernoulli(logits[0]).expand((3, 5, 588))
    assert isinstance(expanded, GreyBernoulli) and expanded.batch_shape == (3, 5, 588)
    assert torch.allclose(expanded.mean, torch.sigmoid(logits[0]).expand(3, 5, 588))


def test_dreg_leaves_nothing_alive_after_the_step():
    """The hook on z refers to the kept draws, which refer to z: a cycle through autograd that
    Python's collector cannot see. Each step must drop it, or every step's graph stays in memory."""
    import gc

    from pyro_cvae.objectives import GuidePathGradient

    cvae = CVAE(get_variant("joint-scratch"))
    for seed in range(3):
        backward(cvae, batch(), "iwae", 4, seed=seed, guide_gradient=GuideGradient.dreg)
    gc.collect()
    assert not [o for o in gc.get_objects() if type(o) is GuidePathGradient]
