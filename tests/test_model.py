import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from pyro_cvae.data import hidden_masks, make_batch
from pyro_cvae.model import CVAE, VARIANTS, get_variant, hidden_pixels
from pyro_cvae.nets import GenerationNet
from pyro_cvae.config import TrainConfig
from pyro_cvae.train import make_optimizer, objective, train_step

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
    model_trace = poutine.trace(poutine.replay(cvae.model, trace=guide_trace)).get_trace(b.x, b.y, b.hidden)
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


def test_registry_is_the_ten_variants_of_the_design():
    assert list(VARIANTS) == ["baseline", "cvae", "no-baseline", "cond-decoder", "cond-decoder-no-baseline",
                              "unconditioned-prior", "joint-pretrained", "joint-scratch", "gsnn", "hybrid"]
    with pytest.raises(ValueError, match="choose one of"):
        get_variant("cvea")


def test_only_hidden_pixels_enter_the_likelihood():
    pyro.set_rng_seed(0)
    cvae = CVAE(get_variant("no-baseline"))
    b = batch()
    guide_trace = poutine.trace(cvae.guide).get_trace(b.x, b.y, b.hidden)

    def log_lik(y):
        tr = poutine.trace(poutine.replay(cvae.model, trace=guide_trace)).get_trace(b.x, y, b.hidden)
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


def test_objective_matches_pyros_mean_field_elbo():
    cvae = CVAE(get_variant("joint-scratch"))
    b = batch()
    pyro.set_rng_seed(3)
    ours = objective(cvae, b)["loss"]
    pyro.set_rng_seed(3)
    reference = TraceMeanField_ELBO().differentiable_loss(cvae.model, cvae.guide, b.x, b.y, b.hidden) / B
    assert torch.allclose(ours, reference, rtol=1e-5)


def test_gsnn_objective_is_the_likelihood_under_the_prior():
    cvae = CVAE(get_variant("gsnn"))
    b = batch()
    pyro.set_rng_seed(4)
    terms = objective(cvae, b)
    pyro.set_rng_seed(4)
    # with the prior as guide, log p(z|x) - log q(z) cancels: the ELBO is E_prior[log p(y|x,z)]
    reference = Trace_ELBO().differentiable_loss(cvae.model, cvae.prior_guide, b.x, b.y, b.hidden) / B
    assert torch.allclose(terms["loss"], reference, rtol=1e-5)
    assert terms["kl"] == 0


def test_hybrid_weights_the_two_objectives():
    cvae = CVAE(get_variant("hybrid"))
    b = batch()
    pyro.set_rng_seed(5)
    half = objective(cvae, b, hybrid_weight=0.5)
    pyro.set_rng_seed(5)
    cvae_term = TraceMeanField_ELBO().differentiable_loss(cvae.model, cvae.guide, b.x, b.y, b.hidden) / B
    gsnn_term = Trace_ELBO().differentiable_loss(cvae.model, cvae.prior_guide, b.x, b.y, b.hidden) / B
    assert torch.allclose(half["loss"], 0.5 * cvae_term + 0.5 * gsnn_term, rtol=1e-5)
    pyro.set_rng_seed(5)
    full = objective(cvae, b, hybrid_weight=1.0)["loss"]
    pyro.set_rng_seed(5)
    elbo = TraceMeanField_ELBO().differentiable_loss(cvae.model, cvae.guide, b.x, b.y, b.hidden) / B
    assert torch.allclose(full, elbo, rtol=1e-5)


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
    joint.zero_grad()
    pyro.set_rng_seed(0)
    objective(joint, b)["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in joint.baseline_net.parameters())
    with torch.no_grad():
        joint.prior_net.net[0].weight.zero_()  # cut the only path from the baseline to the loss
    joint.zero_grad()
    objective(joint, b)["loss"].backward()
    assert all(p.grad is None or not p.grad.any() for p in joint.baseline_net.parameters())


def test_a_few_steps_reduce_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    pyro.set_rng_seed(0)
    losses = _step(CVAE(get_variant("joint-scratch")), batch(), 30)  # the real step: fused Adam, clipping
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
