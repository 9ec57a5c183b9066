"""Evaluation proposals (``pyro_cvae.proposals``): guide, tuned and refined; the estimator against
an exact likelihood; what the tuned proposal may see; how it is stored and voided."""

import json
import math

import pyro
import pyro.poutine as poutine
import pytest
import torch
from typer.testing import CliRunner

import pyro_cvae.data as data_lib
from pyro_cvae import proposals
from pyro_cvae.cli import app
from pyro_cvae.data import epoch_batches, evaluation_masks, visible_input
from pyro_cvae.evaluate import evaluate_run, ncll_per_image
from pyro_cvae.model import CVAE, get_variant
from pyro_cvae.nets import BaselineNet, GaussianNet, GenerationNet
from pyro_cvae.objectives import Elbo, make_elbo, objective_backward
from pyro_cvae.proposals import Refine, net_guide, refined, tune_proposal, tune_recognition_net
from pyro_cvae.runs import Run, RunError

from .helpers import fake_images, train_tiny

# ------------------------------------------------------------------ against the exact likelihood


def _small_cvae(z_dim: int = 1, width: int = 32, steps: int = 60) -> CVAE:
    """``joint-scratch`` with z of ``z_dim`` dimensions and 32-unit nets, trained a little on fake
    digits (the meanfield ELBO), so that its guide is a proposal of the usual kind: close, not exact."""
    torch.manual_seed(0)
    cvae = CVAE(get_variant("joint-scratch"), z_dim=z_dim)
    cvae.baseline_net = BaselineNet(width)
    cvae.prior_net = GaussianNet(z_dim, width)
    cvae.recognition_net = GaussianNet(z_dim, width)
    cvae.generation_net = GenerationNet(z_dim, width=width)
    optimizer = torch.optim.Adam(cvae.parameters(), lr=3e-3)
    elbo = make_elbo(Elbo.meanfield, 1)
    pyro.clear_param_store()
    images = fake_images(256, seed=1)
    done = 0
    while done < steps:
        for batch in epoch_batches(images, 32, done, seed=0):
            optimizer.zero_grad()
            objective_backward(cvae, batch, elbo)
            optimizer.step()
            done += 1
    return proposals.frozen(cvae)


@torch.no_grad()
def _exact_ncll(cvae: CVAE, y: torch.Tensor, hidden: torch.Tensor, points: int) -> torch.Tensor:
    """-log p(y|x) ``(B,)`` by quadrature over a 1-dimensional z: log p(y, z|x) of the model
    (z given by ``poutine.condition``) on a grid of ``points`` over the prior's loc ± 12 scales,
    summed by the trapezoidal rule (its end points carry nothing)."""
    x = visible_input(y, hidden)
    loc, scale = cvae.prior(x, hidden)
    grid = torch.linspace(-12, 12, points).view(-1, 1, 1)  # (G, 1, 1) in prior scales
    z = loc + scale * grid  # (G, B, 1)
    with pyro.plate("grid", points, dim=-2):
        trace = poutine.trace(poutine.condition(cvae.model, data={"z": z})).get_trace(x, y, hidden)
    trace.compute_log_prob()
    log_joint = trace.nodes["z"]["log_prob"] + trace.nodes["y"]["log_prob"]  # (G, B)
    step = (24 / (points - 1)) * scale.squeeze(-1)  # dz per image
    return -(log_joint.logsumexp(0) + step.log())


@pytest.fixture(scope="module")
def small():
    cvae = _small_cvae()
    images = fake_images(4, seed=7)  # not the images it was trained or tuned on
    hidden = evaluation_masks(4, seed=0)
    exact = _exact_ncll(cvae, images, hidden, 4001)
    assert torch.allclose(exact, _exact_ncll(cvae, images, hidden, 8001), atol=1e-4), (
        "the grid resolves the integrand"
    )
    pyro.set_rng_seed(0)
    tuned, _, _ = tune_recognition_net(
        cvae, fake_images(256, seed=2), particles=20, steps=60, batch_size=32, lr=3e-3
    )
    chunk_proposals = {
        "guide": None,
        "tuned": lambda x, y, h: net_guide(tuned),
        "refined": refined(cvae, tuned, Refine(steps=10, particles=8, lr=0.05)),
    }
    return cvae, images, hidden, exact, chunk_proposals


@pytest.mark.parametrize("kind", ["guide", "tuned", "refined"])
def test_each_proposal_converges_to_the_exact_likelihood_and_bounds_it_in_expectation(small, kind):
    cvae, images, hidden, exact, chunk_proposals = small
    proposal = chunk_proposals[kind]
    pyro.set_rng_seed(1)
    errors = {}
    for samples in (10, 300, 5_000):
        ncll, ess = ncll_per_image(cvae, images, hidden, samples, proposal=proposal)
        errors[samples] = (ncll - exact).abs().max().item()
    # the estimate's own error at S=5,000: sd(w)/mean(w)/sqrt(S) by the delta method, from the ESS
    relative_se = ((samples / ess - 1).clamp(min=0) / samples).sqrt().max().item()
    assert errors[5_000] < 4 * relative_se + 1e-3, (kind, errors, relative_se)
    assert errors[5_000] < errors[10], (kind, errors)
    # S=100, repeated: the mean of -log(mean w) is above the exact value (Jensen), never below
    repeats = 200
    ncll, _ = ncll_per_image(
        cvae, images.repeat(repeats, 1), hidden.repeat(repeats, 1), 100, proposal=proposal
    )
    ncll = ncll.view(repeats, -1)
    mean, se = ncll.mean(0), ncll.std(0) / math.sqrt(repeats)
    assert (mean > exact - 4 * se).all(), (kind, mean - exact, se)


def test_the_exact_likelihood_catches_an_estimator_that_forgets_the_proposal(small):
    """The quadrature test can fail: weights that leave out -log q(z) are far from it."""
    cvae, images, hidden, exact, _ = small
    x = visible_input(images, hidden)
    pyro.set_rng_seed(2)
    with torch.no_grad(), pyro.plate("particles", 2000, dim=-2):
        guide = poutine.trace(cvae.guide).get_trace(x, images, hidden)
        model = poutine.trace(poutine.replay(cvae.model, trace=guide)).get_trace(x, images, hidden)
    model.compute_log_prob()
    wrong = math.log(2000) - (
        model.nodes["z"]["log_prob"] + model.nodes["y"]["log_prob"]
    ).logsumexp(0)
    assert ((wrong - exact).abs() > 0.5).any()


# ------------------------------------------------------------------ refined: fresh final draws


def test_refined_final_draws_are_fresh(small, monkeypatch):
    """Every draw of the refined proposal is recorded as its standard noise (z - loc) / scale:
    the S final draws are standard normal and unrelated to each fitting step's draws, which
    they would equal if they were reused (or drawn again from the same random state)."""
    cvae, images, hidden, _, _ = small
    draws = []
    original = proposals.gaussian_guide

    def recording(loc, scale):
        guide = original(loc, scale)

        def recorded(*args):
            z = guide(*args)
            draws.append(((z - loc) / scale).detach())
            return z

        return recorded

    monkeypatch.setattr(proposals, "gaussian_guide", recording)
    steps, particles, samples = 6, 50, 50
    pyro.set_rng_seed(3)
    ncll_per_image(
        cvae,
        images,
        hidden,
        samples,
        proposal=refined(cvae, None, Refine(steps=steps, particles=particles)),
    )
    fitting, final = draws[:steps], torch.cat(draws[steps:])
    assert len(draws) > steps and final.shape == (samples, len(images), 1)
    assert abs(final.mean()) < 0.35 and 0.7 < final.std() < 1.3
    for noise in fitting:
        corr = torch.corrcoef(torch.stack([noise.flatten(), final.flatten()]))[0, 1]
        assert abs(corr) < 0.3, corr
        assert not torch.isclose(noise, final).any()


# ------------------------------------------------------------------ tuned: training images only


def test_tune_proposal_reads_the_training_split_only(tmp_path, mnist_dir, monkeypatch):
    run_dir = tmp_path / "runs" / "joint-scratch"
    train_tiny(run_dir, n=32)
    read = []
    real_read_idx = data_lib.read_idx

    def recording(path, stem, verify=True):
        read.append(stem)
        if stem.startswith("t10k"):
            raise AssertionError(f"tune-proposal read the test split ({stem})")
        return real_read_idx(path, stem, verify)

    monkeypatch.setattr(data_lib, "read_idx", recording)
    args = ["tune-proposal", "--run-dir", str(run_dir), "--data-dir", str(mnist_dir)]
    result = CliRunner().invoke(
        app,
        [
            *args,
            "--steps",
            "2",
            "--particles",
            "3",
            "--budget",
            "600",
            "--threads",
            "1",
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "train-images-idx3-ubyte" in read and not any(s.startswith("t10k") for s in read)
    state = torch.load(run_dir / "proposal-tuned.pt", weights_only=True)
    assert state["images"] == 32 and state["steps"] == 2 and state["particles"] == 3


def test_tuning_changes_the_proposal_only(tmp_path):
    run_dir = tmp_path / "runs" / "joint-scratch"
    train_tiny(run_dir)
    before = Run(run_dir).checkpoint_path.read_bytes()
    result = tune_proposal(
        run_dir,
        particles=4,
        steps=5,
        budget_s=600,
        images=fake_images(64),
        device="cpu",
        log=lambda m: None,
    )
    assert Run(run_dir).checkpoint_path.read_bytes() == before, "the model is frozen"
    cvae, _, checkpoint = Run(run_dir).load()
    tuned, state = proposals.load_tuned(Run(run_dir), cvae, checkpoint)
    assert state["step"] == checkpoint["step"] and state["run_id"] == checkpoint["run_id"]
    assert result.steps == 5
    moved = [
        not torch.equal(a, b) for a, b in zip(tuned.parameters(), cvae.recognition_net.parameters())
    ]
    assert all(moved), "every layer of the copy was fitted"


def test_the_budget_stops_tuning(tmp_path):
    run_dir = tmp_path / "runs" / "joint-scratch"
    train_tiny(run_dir)
    result = tune_proposal(
        run_dir,
        particles=4,
        steps=10_000,
        budget_s=0.5,
        images=fake_images(64),
        device="cpu",
        log=lambda m: None,
    )
    assert 1 <= result.steps < 10_000 and result.seconds < 10


# ------------------------------------------------------------------ stored, voided, keyed


def _evaluate(run_dir, proposal=None, **kw):
    return evaluate_run(
        run_dir,
        samples=3,
        images=fake_images(6, seed=5),
        device="cpu",
        log=kw.pop("log", lambda m: None),
        proposal=proposal,
        refine=Refine(steps=2, particles=4),
        **kw,
    )


def test_a_missing_or_void_tuned_proposal_is_refused(tmp_path):
    run_dir = tmp_path / "runs" / "joint-scratch"
    train_tiny(run_dir)
    with pytest.raises(
        RunError, match="has no tuned proposal; fit one with: pyro-cvae tune-proposal"
    ):
        _evaluate(run_dir, "tuned")
    tune_proposal(
        run_dir, particles=3, steps=2, budget_s=600, images=fake_images(64), device="cpu", log=print
    )
    assert _evaluate(run_dir, "tuned").proposal == "tuned"
    refined_from = _evaluate(run_dir, "refined").proposal_detail
    assert "from the tuned proposal" in refined_from

    train_tiny(run_dir, epochs=2)  # trained further: the tuned proposal is of other weights
    with pytest.raises(
        RunError,
        match=r"void: it was fitted to step 4 of this run, which is now at step 8; tune it again",
    ):
        _evaluate(run_dir, "tuned")
    result = CliRunner().invoke(
        app, ["evaluate", "--run-dir", str(run_dir), "--proposal", "tuned", "--threads", "1"]
    )
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert "tune-proposal --run-dir" in result.output and "Traceback" not in result.output
    notes = []
    fallback = _evaluate(run_dir, log=notes.append)  # the best it has: refined, from the guide
    assert fallback.proposal == "refined" and "from recognition net" in fallback.proposal_detail
    assert any("refining from the guide" in n and "void" in n for n in notes)

    tune_proposal(
        run_dir, particles=3, steps=2, budget_s=600, images=fake_images(64), device="cpu", log=print
    )
    state = torch.load(run_dir / "proposal-tuned.pt", weights_only=True)
    torch.save({**state, "run_id": "another training"}, run_dir / "proposal-tuned.pt")
    with pytest.raises(RunError, match="trained anew since"):
        _evaluate(run_dir, "tuned")


def test_evaluations_are_keyed_by_proposal(tmp_path):
    run_dir = tmp_path / "runs" / "joint-scratch"
    train_tiny(run_dir)
    guide = _evaluate(run_dir, "guide")
    best = _evaluate(run_dir)
    assert best.proposal == "refined" and guide.proposal == "guide"
    files = {p.name for p in run_dir.glob("eval-*.json")}
    assert files == {"eval-test-S3.json", "eval-test-S3-refined.json"}
    assert json.loads((run_dir / "eval-test-S3.json").read_text())["ncll"] == guide.ncll
    run = Run(run_dir)
    assert run.best_evaluation("test", "refined")["ncll"] == best.ncll
    assert run.best_evaluation("test", "guide")["ncll"] == guide.ncll
    # a file of an earlier version, whose proposal field described the guide: read as the guide's
    old = json.loads((run_dir / "eval-test-S3.json").read_text())
    old["proposal"] = "recognition net q(z|x,y)"
    del old["proposal_detail"], old["proposal_id"]
    (run_dir / "eval-test-S3.json").write_text(json.dumps(old))
    assert run.best_evaluation("test", "guide")["ncll"] == guide.ncll
    assert run.current_evaluation("test", 3)["proposal_detail"].startswith("recognition")


def test_evaluating_every_run_reuses_a_saved_evaluation_of_the_same_proposal_only(tmp_path):
    from pyro_cvae.evaluate import evaluate_runs

    runs = tmp_path / "runs"
    train_tiny(runs / "joint-scratch")
    train_tiny(runs / "no-baseline", "no-baseline")
    options = dict(samples=3, images=fake_images(6, seed=5), device="cpu", log=lambda m: None)
    options["refine"] = Refine(steps=2, particles=4)
    first = evaluate_runs(runs, **options)
    assert [(r.proposal, reused) for r, reused in first] == [("refined", False)] * 2
    assert [reused for _, reused in evaluate_runs(runs, **options)] == [True, True]
    assert [Run(r.run_dir).path.name for r, _ in first] == ["no-baseline", "joint-scratch"]
    other = dict(options, refine=Refine(steps=3, particles=4))  # another refined proposal
    assert [reused for _, reused in evaluate_runs(runs, **other)] == [False, False]
    # a tuned proposal for one run: asked for, the other run is left out, saying why
    tune_proposal(
        runs / "no-baseline",
        particles=3,
        steps=2,
        budget_s=600,
        images=fake_images(64),
        device="cpu",
        log=print,
    )
    notes = []
    tuned = evaluate_runs(runs, proposal="tuned", **dict(options, log=notes.append))
    assert [(Run(r.run_dir).path.name, r.proposal) for r, _ in tuned] == [("no-baseline", "tuned")]
    assert any(n.startswith("joint-scratch left out:") and "tune-proposal" in n for n in notes)
    # and the refined evaluations now start from it: not the saved ones
    again = evaluate_runs(runs, **other)
    assert [reused for _, reused in again] == [False, True]
    assert "from the tuned proposal" in again[0][0].proposal_detail


def test_tune_proposal_refuses_what_it_cannot_tune(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["tune-proposal", "--runs-dir", str(tmp_path)])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "--run-dir DIR or --variant NAME" in result.output
    run_dir = tmp_path / "runs" / "gsnn"
    train_tiny(run_dir, "gsnn")
    result = runner.invoke(app, ["tune-proposal", "--run-dir", str(run_dir), "--threads", "1"])
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert (
        "no recognition net to tune" in result.output
        and "--proposal guide or refined" in result.output
    )
    assert not (run_dir / "proposal-tuned.pt").exists()
