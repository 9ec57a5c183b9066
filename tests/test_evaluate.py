import inspect
import json
import math

import pyro
import pytest
import torch
import torch.nn.functional as F
from pyro.infer import Importance, Trace_ELBO
from pyro.infer.importance import vectorized_importance_weights
from typer.testing import CliRunner

from pyro_cvae.cli import app
from pyro_cvae.data import evaluation_masks, make_batch, visible_input
from pyro_cvae.evaluate import evaluate_run, log_weights, ncll_per_image
from pyro_cvae.runs import RunError, load_run

from .helpers import fake_images, train_tiny


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "joint-scratch"
    train_tiny(run_dir, epochs=3, n=128)
    cvae, _, _ = load_run(run_dir)
    return run_dir, cvae


def _one(images, hidden, i):
    y, h = images[i : i + 1], hidden[i : i + 1]
    return visible_input(y, h), y, h


def test_log_weights_equal_pyros_vectorized_importance_weights(trained):
    _, cvae = trained
    images, hidden = fake_images(4, seed=9), evaluation_masks(4, seed=0)
    for i in range(4):
        x, y, h = _one(images, hidden, i)
        pyro.set_rng_seed(i)
        ours = log_weights(cvae, x, y, h, 50)[:, 0]
        pyro.set_rng_seed(i)
        theirs, _, _ = vectorized_importance_weights(
            cvae.model, cvae.guide, x, y, h, num_samples=50, max_plate_nesting=1, normalized=False
        )
        assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-3)


def test_ncll_agrees_with_pyro_importance_within_its_spread(trained):
    _, cvae = trained
    images, hidden = fake_images(2, seed=11), evaluation_masks(2, seed=0)
    pyro.set_rng_seed(0)
    ours, _ = ncll_per_image(cvae, images, hidden, samples=300)
    for i in range(2):
        x, y, h = _one(images, hidden, i)
        pyro.set_rng_seed(100 + i)
        posterior = Importance(cvae.model, cvae.guide, num_samples=300).run(x, y, h)
        reference = -posterior.get_log_normalizer().item()
        w = torch.stack(posterior.log_weights).detach()
        # standard error of log(mean w) by the delta method, for both estimates
        se = (
            torch.exp(w - w.max()).std() / torch.exp(w - w.max()).mean() / math.sqrt(len(w))
        ).item()
        assert abs(ours[i].item() - reference) < 5 * math.sqrt(2) * se + 0.05, (
            ours[i].item(),
            reference,
            se,
        )


def test_one_sample_averages_to_the_negative_elbo_and_more_samples_do_better(trained):
    _, cvae = trained
    images, hidden = fake_images(400, seed=12), evaluation_masks(400, seed=3)
    pyro.set_rng_seed(0)
    s1, ess1 = ncll_per_image(cvae, images, hidden, samples=1)
    assert torch.equal(ess1, torch.ones(400))
    b = make_batch(images, hidden)
    pyro.set_rng_seed(1)
    with torch.no_grad():
        neg_elbo = (
            sum(Trace_ELBO().loss(cvae.model, cvae.guide, b.x, b.y, b.hidden) for _ in range(5))
            / 5
            / 400
        )
    assert abs(s1.mean().item() - neg_elbo) < 4 * (s1.std().item() / math.sqrt(400)), (
        s1.mean(),
        neg_elbo,
    )
    pyro.set_rng_seed(2)
    s10, _ = ncll_per_image(cvae, images, hidden, samples=10)
    pyro.set_rng_seed(3)
    s50, ess50 = ncll_per_image(cvae, images, hidden, samples=50)
    assert s50.mean() <= s10.mean() <= s1.mean()
    assert ((ess50 >= 1) & (ess50 <= 50 + 1e-3)).all()


@pytest.mark.parametrize("proposal", ["guide", "refined"])
def test_the_estimate_keeps_no_graph_whatever_the_proposal(trained, monkeypatch, proposal):
    """The estimator's draws are made without gradients (a kept graph per chunk once filled 24 GB
    on the 10,000 test images); a refined proposal's fitting, and only it, has them."""
    import pyro_cvae.evaluate as evaluate_mod

    run_dir, _ = trained
    seen = {"estimate": [], "fit": []}
    real = evaluate_mod.log_weights

    def spy(*args, **kwargs):
        fitting = any(f.function == "refine" for f in inspect.stack()[1:4])
        seen["fit" if fitting else "estimate"].append(torch.is_grad_enabled())
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate_mod, "log_weights", spy)
    result = evaluate_run(run_dir, samples=4, limit=3, images=fake_images(3), proposal=proposal)
    assert math.isfinite(result.ncll)
    assert seen["estimate"] and not any(seen["estimate"])
    assert all(seen["fit"]) and (len(seen["fit"]) > 0) == (proposal == "refined")


def test_chunking_over_particles_and_images_is_exact(trained):
    _, cvae = trained
    images, hidden = fake_images(10, seed=13), evaluation_masks(10, seed=0)
    pyro.set_rng_seed(0)
    whole, ess = ncll_per_image(cvae, images, hidden, samples=30, image_batch=10, max_rows=10_000)
    # the same draws, chunked: 3 particles x 10 images at a time
    pyro.set_rng_seed(0)
    x, y, h = visible_input(images, hidden), images, hidden
    lw = log_weights(cvae, x, y, h, 30)
    expected = math.log(30) - lw.logsumexp(0)
    assert torch.allclose(whole, expected, atol=1e-4)
    assert torch.allclose(ess, torch.exp(2 * lw.logsumexp(0) - (2 * lw).logsumexp(0)), rtol=1e-4)
    pyro.set_rng_seed(0)
    chunked, _ = ncll_per_image(cvae, images, hidden, samples=30, image_batch=10, max_rows=30)
    pyro.set_rng_seed(0)
    draws = torch.cat([log_weights(cvae, x, y, h, 3) for _ in range(10)])
    assert torch.allclose(chunked, math.log(30) - draws.logsumexp(0), atol=1e-4)


def test_baseline_ncll_is_the_bce_of_the_hidden_pixels(tmp_path):
    run_dir = tmp_path / "runs" / "baseline"
    train_tiny(run_dir, "baseline")
    cvae, _, _ = load_run(run_dir)
    images, hidden = fake_images(20, seed=14), evaluation_masks(20, seed=0)
    ncll, ess = ncll_per_image(cvae, images, hidden, samples=100)
    with torch.no_grad():
        bce = F.binary_cross_entropy_with_logits(
            cvae.baseline_net(visible_input(images, hidden)), images, reduction="none"
        )
    assert torch.allclose(ncll, (bce * hidden).sum(1), rtol=1e-5)
    assert torch.equal(ess, torch.ones(20))


def test_results_file(trained):
    run_dir, _ = trained
    images = fake_images(30, seed=15)
    r = evaluate_run(
        run_dir,
        samples=5,
        split="test",
        images=images,
        device="cpu",
        log=lambda m: None,
        proposal="guide",
    )
    saved = json.loads((run_dir / "eval-test-S5.json").read_text())
    assert (
        saved["images"] == 30
        and saved["samples"] == 5
        and saved["split"] == "test"
        and saved["mask"] == "random"
    )
    assert (
        saved["ncll"] == pytest.approx(r.ncll)
        and saved["ncll_se"] > 0
        and 1 <= saved["ess_mean"] <= 5
    )
    assert saved["epochs"] == 3 and saved["proposal"] == "guide"
    assert saved["proposal_detail"].startswith("recognition")
    # the same seed gives the same number (fixed masks and draws); limit takes a prefix of the same masks
    again = evaluate_run(
        run_dir, samples=5, images=images, device="cpu", log=lambda m: None, proposal="guide"
    )
    assert again.ncll == r.ncll
    prefix = evaluate_run(
        run_dir,
        samples=5,
        images=images,
        limit=10,
        device="cpu",
        log=lambda m: None,
        proposal="guide",
    )
    assert prefix.images == 10


def test_gsnn_uses_the_prior_as_proposal_and_says_so(tmp_path):
    run_dir = tmp_path / "runs" / "gsnn"
    train_tiny(run_dir, "gsnn")
    messages = []
    r = evaluate_run(
        run_dir,
        samples=4,
        images=fake_images(8),
        device="cpu",
        log=messages.append,
        proposal="guide",
    )
    assert r.proposal == "guide" and "prior" in r.proposal_detail
    assert any("no recognition net" in m for m in messages)
    assert math.isfinite(r.ncll)


def test_bad_options_and_missing_runs(tmp_path, trained):
    run_dir, _ = trained
    with pytest.raises(ValueError, match="--samples must be at least 1"):
        evaluate_run(run_dir, samples=0, images=fake_images(4))
    with pytest.raises(RunError, match=r"not a run .*pyro-cvae train"):
        evaluate_run(tmp_path / "nothing", samples=5)
    runner = CliRunner()
    result = runner.invoke(app, ["evaluate", "--run-dir", str(run_dir), "--samples", "0"])
    assert result.exit_code == 2 and "--samples" in result.output
    result = runner.invoke(app, ["evaluate", "--variant", "cvae", "--runs-dir", str(tmp_path)])
    assert (
        result.exit_code == 1
        and "pyro-cvae train" in result.output
        and "Traceback" not in result.output
    )


# ------------------------------------------------------------------ every trained run


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """A runs folder with a trained no-baseline and baseline, and an untrained (config only) run."""
    runs = tmp_path_factory.mktemp("every") / "runs"
    train_tiny(runs / "no-baseline", "no-baseline")
    train_tiny(runs / "baseline", "baseline")
    (runs / "cvae").mkdir()
    (runs / "cvae" / "config.json").write_text(json.dumps({"variant": "cvae"}))
    return runs


def _table_rows(output: str) -> dict[str, list[str]]:
    """Plain table rows (the output is not a terminal) by run name."""
    return {line.split()[0]: line.split() for line in output.splitlines() if line[:1].isalpha()}


def test_evaluate_without_a_run_evaluates_every_trained_run_and_reuses_current_results(
    two_runs, mnist_dir
):
    runner = CliRunner()
    args = [
        "evaluate",
        "--runs-dir",
        str(two_runs),
        "--samples",
        "3",
        "--limit",
        "8",
        "--data-dir",
        str(mnist_dir),
        "--device",
        "cpu",
        "--threads",
        "1",
    ]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    rows = _table_rows(first.output)
    assert "cvae" not in rows, "a run without a trained epoch is not evaluated"
    # registry order: baseline first; run, epochs, images, S, proposal, NCLL ± SE, reference, ...
    assert [name for name in rows if name in ("baseline", "no-baseline")] == [
        "baseline",
        "no-baseline",
    ]
    assert rows["baseline"][1:4] == ["1", "8", "1"] and rows["no-baseline"][1:4] == ["1", "8", "3"]
    # each run's best proposal, named in its row: the baseline's NCLL is exact
    assert rows["baseline"][4] == "exact" and rows["no-baseline"][4] == "refined"
    assert rows["no-baseline"][8] == "71.36", "on test images: the reference's own test figure"
    assert rows["baseline"][8] == "-", "the reference measured no baseline on test images"
    result_file = two_runs / "no-baseline" / "eval-test-S3-n8-seed0-refined.json"
    saved = json.loads(result_file.read_text())
    assert (
        saved["ncll"] == pytest.approx(float(rows["no-baseline"][5]), abs=0.01)
        and saved["images"] == 8
        and saved["proposal"] == "refined"
    )
    stamp = result_file.stat().st_mtime_ns

    again = runner.invoke(app, args)
    assert again.exit_code == 0 and again.output.count("(saved)") == 2, again.output
    assert result_file.stat().st_mtime_ns == stamp
    other = runner.invoke(
        app, [*args[:-4], "--limit", "6", *args[-4:]]
    )  # other options: evaluated again
    assert (
        other.exit_code == 0
        and "(saved)" not in other.output
        and _table_rows(other.output)["baseline"][2] == "6"
    )
    forced = runner.invoke(app, [*args, "--force", "--limit", "6"])
    assert forced.exit_code == 0 and "(saved)" not in forced.output


def test_evaluate_with_a_named_run_evaluates_that_run_only(two_runs, mnist_dir):
    result = CliRunner().invoke(
        app,
        [
            "evaluate",
            "--variant",
            "no-baseline",
            "--runs-dir",
            str(two_runs),
            "--samples",
            "2",
            "--limit",
            "4",
            "--data-dir",
            str(mnist_dir),
            "--threads",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    rows = _table_rows(result.output)
    assert (
        "no-baseline" in rows and "baseline" not in rows and rows["no-baseline"][2:4] == ["4", "2"]
    )
    assert str(two_runs / "no-baseline" / "eval-test-S2-n4-seed0-refined.json") in result.output


@pytest.mark.parametrize("command", ["evaluate", "sample"])
def test_no_trained_run_says_in_one_line_how_to_train_one(tmp_path, command):
    (tmp_path / "empty").mkdir()
    for runs_dir in (tmp_path / "empty", tmp_path / "missing"):
        result = CliRunner().invoke(app, [command, "--runs-dir", str(runs_dir)])
        assert result.exit_code == 1
        assert result.output.count("\n") == 1 and "Traceback" not in result.output
        assert result.output.startswith(
            f"error: no trained run in {runs_dir}; train one with: pyro-cvae train"
        )
