"""The autoregressive decoder (``joint-scratch-pixelcnn``): causal, normalised, trained through
Pyro's ELBO, and scored by the same importance sampler as Pyro's own."""

import itertools

import pyro
import pytest
import torch
from pyro.infer.importance import vectorized_importance_weights

from pyro_cvae.data import evaluation_masks, visible_input
from pyro_cvae.evaluate import log_weights, ncll_per_image
from pyro_cvae.model import CVAE, CausalPixels, GreyBernoulli, get_variant, hidden_pixels
from pyro_cvae.nets import PixelHead
from pyro_cvae.runs import load_run
from pyro_cvae.sample import completions

from .helpers import fake_images, train_tiny


def _live_head(seed=0) -> PixelHead:
    """A head whose outputs are not the zeros it starts with."""
    torch.manual_seed(seed)
    head = PixelHead()
    torch.nn.init.normal_(head.out.weight, std=0.5)
    torch.nn.init.normal_(head.out.bias, std=0.5)
    return head


def test_each_hidden_pixel_depends_only_on_the_pixels_before_it_and_on_x():
    head = _live_head()
    hidden = evaluation_masks(2, seed=3)
    images = fake_images(2, seed=4)
    x, pixels = visible_input(images, hidden), hidden_pixels(hidden)
    decoded = torch.randn(2, 784)
    p = CausalPixels(decoded, head, x, pixels)
    value = images.gather(-1, pixels)
    logits = p.logits(value)
    for i in [0, 57, 300, 587]:
        changed = value.clone()
        changed[:, i:] = torch.rand_like(changed[:, i:])  # pixel i and every later one
        after = p.logits(changed)
        assert torch.allclose(after[:, : i + 1], logits[:, : i + 1], atol=1e-6)
        if i < 587:  # later pixels do see it
            assert not torch.allclose(after[:, i + 1 :], logits[:, i + 1 :])


def test_the_pixels_probabilities_sum_to_one_over_every_binary_completion():
    """Three hidden pixels (neighbours, so each sees the one before): the 8 completions' chain-rule
    probabilities sum to one per particle and image; a mask that let a pixel see itself or a later
    one would not."""
    head = _live_head(1)
    x = fake_images(2, seed=5)
    pixels = torch.tensor([[200, 201, 228], [400, 428, 429]])
    x = x.scatter(-1, pixels, -1.0)
    decoded = torch.randn(3, 2, 784)  # three particles of z
    p = CausalPixels(decoded, head, x, pixels)
    total = sum(
        p.log_prob(torch.tensor(bits, dtype=torch.float).expand(3, 2, 3)).exp()
        for bits in itertools.product([0.0, 1.0], repeat=3)
    )
    assert torch.allclose(total, torch.ones(3, 2), atol=1e-5)


def test_a_fresh_head_leaves_the_decoder_as_it_was():
    hidden = evaluation_masks(3, seed=0)
    images = fake_images(3)
    x, pixels = visible_input(images, hidden), hidden_pixels(hidden)
    decoded = torch.randn(4, 3, 784)
    value = images.gather(-1, pixels)
    ours = CausalPixels(decoded, PixelHead(), x, pixels).log_prob(value)
    plain = GreyBernoulli(decoded.gather(-1, pixels.expand(4, 3, -1))).to_event(1).log_prob(value)
    assert torch.allclose(ours, plain, atol=1e-4)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "joint-scratch-pixelcnn"
    train_tiny(run_dir, variant="joint-scratch-pixelcnn", epochs=2, n=64)
    cvae, _, _ = load_run(run_dir)
    return cvae


def test_training_moves_the_head_and_evaluation_is_pyros_importance_sampler(trained):
    cvae = trained
    assert cvae.pixel_head.out.weight.abs().sum() > 0  # it left its zero start: gradients reach it
    images, hidden = fake_images(3, seed=9), evaluation_masks(3, seed=0)
    for i in range(3):
        y, h = images[i : i + 1], hidden[i : i + 1]
        x = visible_input(y, h)
        pyro.set_rng_seed(i)
        ours = log_weights(cvae, x, y, h, 20)[:, 0]
        pyro.set_rng_seed(i)
        theirs, _, _ = vectorized_importance_weights(
            cvae.model, cvae.guide, x, y, h, num_samples=20, max_plate_nesting=1, normalized=False
        )
        assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-3)
    ncll, ess = ncll_per_image(cvae, images, hidden, samples=10)
    assert torch.isfinite(ncll).all() and (ess >= 1).all()


def test_completions_roll_out_pixel_by_pixel_and_keep_the_visible_pixels(trained):
    cvae = trained
    images, hidden = fake_images(2, seed=6), evaluation_masks(2, seed=1)
    pyro.set_rng_seed(0)
    drawn = completions(cvae, images, hidden, num_samples=2)
    assert drawn.shape == (2, 2, 784)
    assert torch.equal(drawn[:, ~hidden], images[~hidden].expand(2, -1))
    assert ((drawn >= 0) & (drawn <= 1)).all()
    # the rollout is the chain rule's: each hidden pixel is its probability given those before it
    x, pixels = visible_input(images, hidden), hidden_pixels(hidden)
    with torch.no_grad():
        z = cvae.prior(x, hidden)[0]  # any z: the check is of the rollout, given z
        p = CausalPixels(cvae.generation_net(z), cvae.pixel_head, x, pixels)
        rolled = p.mean
        assert torch.allclose(torch.sigmoid(p.logits(rolled)), rolled, atol=1e-5)


def test_the_variant_is_joint_scratch_with_another_decoder():
    new, old = get_variant("joint-scratch-pixelcnn"), get_variant("joint-scratch")
    assert (new.baseline, new.prior, new.objective, new.elbo) == (
        old.baseline,
        old.prior,
        old.objective,
        old.elbo,
    )
    assert CVAE(new).pixel_head is not None and CVAE(old).pixel_head is None
