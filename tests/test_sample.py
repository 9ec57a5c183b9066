"""Sample grids (``pyro-cvae sample``) and training plots (``pyro-cvae plot``)."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from pyro_cvae import sample as sample_mod
from pyro_cvae.cli import app
from pyro_cvae.data import evaluation_masks, visible_input
from pyro_cvae.evaluate import evaluate_run
from pyro_cvae.plots import plot_runs
from pyro_cvae.runs import RunError, load_run
from pyro_cvae.sample import compare_runs, completions, grid_tensor, sample_grid

from .helpers import fake_images, train_tiny

CELL = 28 + sample_mod.PAD


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``with-baseline/``: joint-scratch, no-baseline and baseline runs side by side;
    ``alone/``: a no-baseline run with no baseline run beside it."""
    root = tmp_path_factory.mktemp("sample")
    for variant in ("joint-scratch", "no-baseline", "baseline"):
        train_tiny(root / "with-baseline" / variant, variant)
    train_tiny(root / "alone" / "no-baseline", "no-baseline")
    return root


def _size(path):
    with Image.open(path) as image:
        return image.size


def _expected_size(columns: int, rows: int) -> tuple[int, int]:
    return (
        max(
            sample_mod.MIN_WIDTH_PX,
            sample_mod.LABEL_PX + sample_mod.SCALE * (columns * CELL + sample_mod.PAD),
        ),
        sample_mod.TITLE_PX + sample_mod.SCALE * (rows * CELL + sample_mod.PAD),
    )


# ------------------------------------------------------------------ completions


@pytest.mark.parametrize("mask,inputs", [("random", 1), ("fixed", 2)])
def test_completions_keep_the_visible_pixels_and_draw_probabilities(runs, mask, inputs):
    cvae, _, _ = load_run(runs / "with-baseline" / "joint-scratch")
    images = fake_images(5, seed=1)
    hidden = evaluation_masks(5, mask, inputs, seed=0)
    out = completions(cvae, images, hidden, num_samples=3)
    assert out.shape == (3, 5, 784)
    assert torch.equal(out[:, ~hidden], images[~hidden].expand(3, -1)), (
        "visible pixels are the input's, exactly"
    )
    predicted = out[:, hidden]
    assert ((predicted > 0) & (predicted < 1)).all(), "probabilities, not binary draws or targets"
    assert not torch.equal(out[0], out[1]), "each sample row has its own z"


def test_a_deterministic_run_completes_with_its_baseline_probabilities(runs):
    cvae, _, _ = load_run(runs / "with-baseline" / "baseline")
    images = fake_images(4, seed=2)
    hidden = evaluation_masks(4, seed=3)
    out = completions(cvae, images, hidden, num_samples=7)
    assert out.shape == (1, 4, 784), "no z: one completion, whatever num_samples"
    with torch.no_grad():
        expected = torch.where(
            hidden, torch.sigmoid(cvae.baseline_net(visible_input(images, hidden))), images
        )
    torch.testing.assert_close(out[0], expected)


def test_grid_tensor_has_a_row_per_tensor_and_paints_the_hidden_area():
    images = torch.zeros(3, 784)
    hidden = evaluation_masks(3, "fixed", 1)
    grid = grid_tensor([images, images, images, images], hidden)
    assert grid.shape == (3, 4 * CELL + sample_mod.PAD, 3 * CELL + sample_mod.PAD)
    pad = sample_mod.PAD
    top_right = grid[:, pad, pad + 27]  # first cell, input row: hidden in the fixed protocol
    bottom_left = grid[:, pad + 27, pad]  # visible
    assert torch.allclose(top_right, torch.tensor(sample_mod.HIDDEN_COLOUR))
    assert torch.equal(bottom_left, torch.zeros(3))
    assert torch.equal(grid[:, CELL + pad, pad + 27], torch.zeros(3)), (
        "only the input row is painted"
    )


# ------------------------------------------------------------------ sample_grid


@pytest.mark.parametrize(
    "run,baseline_rows",
    [
        ("with-baseline/joint-scratch", 1),  # its own (joint) baseline net
        ("with-baseline/no-baseline", 1),  # the finished baseline run beside it
        ("alone/no-baseline", 0),  # no baseline anywhere: the row is left out
    ],
)
def test_grid_size_follows_the_options(runs, tmp_path, run, baseline_rows):
    images = fake_images(12)
    small = sample_grid(
        runs / run, num_images=3, num_samples=2, out=tmp_path / "a.png", images=images
    )
    large = sample_grid(
        runs / run, num_images=4, num_samples=4, out=tmp_path / "b.png", images=images
    )
    assert _size(small) == _expected_size(3, 2 + baseline_rows + 2)
    assert _size(large) == _expected_size(4, 2 + baseline_rows + 4)
    assert _size(large)[1] - _size(small)[1] == 2 * sample_mod.SCALE * CELL


def test_a_deterministic_run_has_input_truth_and_baseline_rows_only(runs, tmp_path):
    path = sample_grid(
        runs / "with-baseline" / "baseline",
        num_images=2,
        num_samples=5,
        out=tmp_path / "b.png",
        images=fake_images(4),
    )
    assert _size(path) == _expected_size(2, 3)


def test_default_path_and_no_temporary_files(runs):
    run_dir = runs / "alone" / "no-baseline"
    path = sample_grid(run_dir, num_images=2, num_samples=1, split="train", images=fake_images(4))
    assert path == run_dir / "samples-train.png" and path.is_file()
    assert not list(run_dir.glob(".*tmp*"))


def test_same_seed_same_bytes_other_seed_other_bytes(runs, tmp_path):
    run_dir, images = runs / "with-baseline" / "joint-scratch", fake_images(8)
    a = sample_grid(
        run_dir, num_images=4, num_samples=3, seed=5, out=tmp_path / "a.png", images=images
    )
    b = sample_grid(
        run_dir, num_images=4, num_samples=3, seed=5, out=tmp_path / "b.png", images=images
    )
    c = sample_grid(
        run_dir, num_images=4, num_samples=3, seed=6, out=tmp_path / "c.png", images=images
    )
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


@pytest.mark.parametrize(
    "options,message",
    [
        ({"num_images": 0}, "--num-images must be at least 1"),
        ({"num_samples": 0}, "--num-samples must be at least 1"),
        ({"num_images": 9}, "--num-images is 9 but the test split has 8 images"),
    ],
)
def test_bad_options_raise_value_error(runs, tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        sample_grid(
            runs / "alone" / "no-baseline", out=tmp_path / "x.png", images=fake_images(8), **options
        )
    assert not (tmp_path / "x.png").exists()


def test_missing_run_raises_run_error(tmp_path):
    with pytest.raises(RunError, match="not a run"):
        sample_grid(tmp_path / "nothing", images=fake_images(4))


def test_cli_sample_on_a_missing_run_fails_in_one_line(tmp_path):
    result = CliRunner().invoke(
        app, ["sample", "--variant", "no-baseline", "--runs-dir", str(tmp_path)]
    )
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "not a run" in lines[0]


def test_cli_sample_writes_and_prints_the_path(runs, tmp_path, mnist_dir):
    out = tmp_path / "grid.png"
    result = CliRunner().invoke(
        app,
        [
            "sample",
            "--run-dir",
            str(runs / "alone" / "no-baseline"),
            "--num-images",
            "2",
            "--num-samples",
            "1",
            "--out",
            str(out),
            "--data-dir",
            str(mnist_dir),
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    assert str(out) in "".join(result.output.split()) and _size(out) == _expected_size(2, 3)


# ------------------------------------------------------------------ compare_runs


def test_compare_runs_puts_every_trained_run_on_the_same_digits(runs, tmp_path, monkeypatch):
    drawn = []  # (grid, labels) of each picture
    render = sample_mod.render_grid
    monkeypatch.setattr(
        sample_mod,
        "render_grid",
        lambda grid, labels, *a, **k: drawn.append((grid, labels)) or render(grid, labels, *a, **k),
    )
    runs_dir = tmp_path / "runs"
    shutil.copytree(runs / "with-baseline", runs_dir)
    train_tiny(runs_dir / "cvae-fixed2", "cvae", mask="fixed", inputs=2)
    (runs_dir / "cvae").mkdir()
    (runs_dir / "cvae" / "config.json").write_text(
        json.dumps({"variant": "cvae"})
    )  # never trained: left out
    images = fake_images(6)
    paths = compare_runs(runs_dir, num_images=4, num_samples=2, images=images)
    assert paths == [runs_dir / "samples-test.png", runs_dir / "samples-test-fixed2.png"]
    # input, truth, then the runs in the registry's order: a deterministic run one row, a CVAE num_samples
    (grid, labels), (fixed_grid, fixed_labels) = drawn
    assert [
        label if isinstance(label, str) else (label[0].split()[0], label[1]) for label in labels
    ] == ["input", "truth", ("baseline", 1), ("no-baseline", 2), ("joint-scratch", 2)]
    assert [label[0].split()[0] for label in fixed_labels[2:]] == ["baseline-fixed2", "cvae-fixed2"]
    assert _size(paths[0]) == (_size(paths[0])[0], _expected_size(4, 7)[1])
    assert _size(paths[1])[1] == _expected_size(4, 5)[1]
    # a run's block is what it draws alone (same digits, masks and seed), whatever runs sit beside it
    sample_grid(
        runs_dir / "no-baseline",
        num_images=4,
        num_samples=2,
        out=tmp_path / "alone.png",
        images=images,
    )
    alone, _ = drawn[-1]  # input, truth, baseline (from the run beside it), sample 1, sample 2
    rows = lambda g, first, last: g[:, first * CELL : last * CELL + sample_mod.PAD]  # noqa: E731
    assert torch.equal(rows(grid, 0, 2), rows(alone, 0, 2)), "the same inputs and truth"
    assert torch.equal(rows(grid, 3, 5), rows(alone, 3, 5)), "no-baseline's completions"


def test_compare_runs_refuses_one_out_for_two_mask_protocols(runs, tmp_path):
    runs_dir = tmp_path / "runs"
    shutil.copytree(runs / "alone", runs_dir)
    compare_runs(
        runs_dir, num_images=2, num_samples=1, out=tmp_path / "one.png", images=fake_images(4)
    )
    assert (tmp_path / "one.png").is_file()
    train_tiny(runs_dir / "baseline-fixed1", "baseline", mask="fixed", inputs=1)
    with pytest.raises(
        ValueError, match="--out names one picture, but the runs in .* use 2 masking protocols"
    ):
        compare_runs(runs_dir, out=tmp_path / "two.png", images=fake_images(4))


def test_cli_sample_without_a_run_writes_the_comparison(runs, tmp_path, mnist_dir):
    runs_dir = tmp_path / "runs"
    shutil.copytree(runs / "with-baseline", runs_dir)
    result = CliRunner().invoke(
        app,
        [
            "sample",
            "--runs-dir",
            str(runs_dir),
            "--num-images",
            "3",
            "--data-dir",
            str(mnist_dir),
            "--device",
            "cpu",
            "--threads",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.output == f"wrote {runs_dir / 'samples-test.png'}\n"
    assert _size(runs_dir / "samples-test.png")[1] == _expected_size(3, 2 + 1 + 3 + 3)[1], (
        "3 completions per CVAE"
    )
    assert not (runs_dir / "no-baseline" / "samples-test.png").exists()


# ------------------------------------------------------------------ plot_runs


def _has_colour(path, rgb, tolerance=8) -> bool:
    """Whether some pixel of the PNG is close to ``rgb`` (a line or bar drawn in that colour)."""
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.int16)
    return bool((np.abs(pixels - np.array(rgb)).max(-1) <= tolerance).any())


TAB_BLUE, TAB_ORANGE, TAB_RED, TAB_PURPLE, TAB_OLIVE = (
    (31, 119, 180),
    (255, 127, 14),
    (214, 39, 40),
    (148, 103, 189),
    (188, 189, 34),
)


def test_plot_runs_draws_a_curve_per_run_and_points_for_evaluations(runs, tmp_path):
    runs_dir = tmp_path / "runs"
    shutil.copytree(runs / "with-baseline", runs_dir)
    curves = plot_runs(runs_dir, out=tmp_path / "curves.png")
    width, height = _size(curves)
    assert _has_colour(curves, TAB_BLUE) and _has_colour(curves, TAB_ORANGE), "a line per run"

    quiet = dict(images=fake_images(6), device="cpu", log=lambda m: None)
    evaluate_run(runs_dir / "no-baseline", samples=2, proposal="guide", **quiet)
    assert (runs_dir / "no-baseline" / "eval-test-S2.json").is_file()
    both = plot_runs(runs_dir)
    assert both == runs_dir / "plots.png"
    assert _size(both)[0] == width and _size(both)[1] > height, "NCLL points below the curves"
    assert _has_colour(both, TAB_RED), "on test images: the reference's own test figure"
    assert not _has_colour(both, TAB_PURPLE), "not its table, which is of training images"
    assert not _has_colour(both, TAB_OLIVE), "no refined evaluation yet"
    # a refined evaluation is drawn beside the guide's, in its own colour
    evaluate_run(runs_dir / "no-baseline", samples=2, proposal="refined", **quiet)
    assert _has_colour(plot_runs(runs_dir), TAB_OLIVE)
    evaluate_run(runs_dir / "no-baseline", samples=2, split="train", **quiet)
    assert _has_colour(plot_runs(runs_dir), TAB_PURPLE), "on training images: the reference's table"
    assert not list(runs_dir.glob(".*tmp*"))


def test_plot_runs_ignores_torn_metrics_and_odd_eval_files(tmp_path, runs):
    run_dir = tmp_path / "runs" / "no-baseline"
    shutil.copytree(runs / "alone" / "no-baseline", run_dir)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "loss"')  # a line being written
    (run_dir / "eval-test-S5.json").write_text(
        json.dumps(
            {
                "variant": "no-baseline",
                "ncll": 80.0,
                "ncll_se": float("nan"),
                "samples": 5,
                "split": "test",
            }
        )
    )
    (run_dir / "eval-test-S9.json").write_text("not json")
    assert plot_runs(tmp_path / "runs").is_file()


def test_plot_runs_without_runs_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    for where in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(ValueError, match="no runs in"):
            plot_runs(where)
    result = CliRunner().invoke(app, ["plot", "--runs-dir", str(tmp_path / "empty")])
    assert result.exit_code == 1 and result.output.startswith("error: no runs in")
