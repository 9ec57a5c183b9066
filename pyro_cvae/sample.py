"""Sample grids: what a trained run predicts for the hidden quadrants, as one PNG.

A column per image; rows, top to bottom:

    input      the visible quadrant(s) in grey, the hidden area in a muted blue
    truth      the whole image
    baseline   the deterministic prediction, when there is one (see ``baseline_row``)
    sample k   a CVAE completion: z ~ p(z|x), pixel probabilities from the generation net
               (an autoregressive decoder's rolled out in raster order, each pixel's
               probability given the probabilities before it)

Every prediction shows Bernoulli means (probabilities, not binary draws) in the hidden pixels
and the true visible pixels pasted back, so a row differs from the truth only where the model
had to guess. Completions come from the Pyro model itself, traced under a particle plate.
"""

from __future__ import annotations

import math
from pathlib import Path

import pyro
import pyro.poutine as poutine
import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.textpath import TextPath
from torchvision.utils import make_grid

from .config import Context, OptionError, SampleConfig, require_at_least_one, with_options
from .data import SIDE, Mask, check_images, evaluation_masks, visible_input
from .model import CVAE, Baseline, hidden_pixels
from .plots import DPI, save_png
from .runs import Run, baseline_run_dir, comparison_path, require_trained_runs

HIDDEN_COLOUR = (
    0.33,
    0.42,
    0.60,
)  # muted blue: no grey level of ink or paper can be mistaken for it
PAD = 2  # grey-white lines between the cells of the grid
SCALE = 3  # screen pixels per image pixel
LABEL_PX = 150  # left margin for the row labels, at least
LABEL_PT = 10  # their font size
TITLE_PX = 62  # top margin for the three short lines of the title
MIN_WIDTH_PX = 480  # so that the title fits above a grid of one or two columns


@torch.no_grad()
def completions(
    cvae: CVAE, images: torch.Tensor, hidden: torch.Tensor, num_samples: int = 10
) -> torch.Tensor:
    """Completed images ``(S, B, 784)``: hidden pixels are the model's probabilities, visible ones
    those of ``images`` ``(B, 784)``.

    The model is traced with ``y`` unobserved under a particle plate, so each particle draws its
    own z from the prior p(z|x); the ``y`` site's distribution is over the hidden pixels only and
    its mean is their probabilities. A deterministic model has no z: S is 1."""
    require_at_least_one(num_samples=num_samples)
    check_images(images, hidden)
    particles = 1 if cvae.deterministic else num_samples
    with pyro.plate("particles", particles, dim=-2):
        trace = poutine.trace(cvae.model).get_trace(visible_input(images, hidden), None, hidden)
    pixels = hidden_pixels(hidden)  # (B, n_hidden)
    probs = trace.nodes["y"]["fn"].mean.expand((particles,) + pixels.shape)
    return images.expand((particles,) + images.shape).scatter(-1, pixels.expand_as(probs), probs)


def baseline_row(
    cvae: CVAE, images: torch.Tensor, hidden: torch.Tensor, baseline_dir: Path | None, device
) -> tuple[str, torch.Tensor] | None:
    """(label, completed images ``(B, 784)``) of the deterministic baseline, or None.

    A deterministic run *is* its baseline (its y site's mean); a frozen baseline is the pretrained
    one; otherwise a finished ``baseline`` run in ``baseline_dir``. Without one, a jointly trained
    baseline net is shown, labelled as such: it learns only through the prior (no loss of its
    own), so what it draws is a code for the prior, not a prediction."""
    if cvae.deterministic:
        return "baseline", completions(cvae, images, hidden, 1)[0]
    if cvae.variant.baseline is Baseline.frozen:  # the pretrained baseline itself
        with torch.no_grad():
            return "baseline", cvae.baseline_guess(visible_input(images, hidden), hidden)
    if baseline_dir is not None and Run(baseline_dir).is_finished():
        baseline, _, _ = Run(baseline_dir).load(device)
        return "baseline", completions(baseline.eval(), images, hidden, 1)[0]
    if (
        cvae.baseline_net is not None
    ):  # no standalone baseline: show what the joint one feeds the prior
        with torch.no_grad():
            return "joint baseline", cvae.baseline_guess(visible_input(images, hidden), hidden)
    return None


def grid_tensor(rows: list[torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
    """RGB grid ``(3, H, W)`` of ``rows`` (each ``(B, 784)`` in [0, 1]), a row of cells per tensor.

    The first row is the input: its ``hidden`` ``(B, 784)`` pixels are painted ``HIDDEN_COLOUR``.
    H = R * (28 + PAD) + PAD and W = B * (28 + PAD) + PAD for R rows."""
    cells = torch.stack(rows).detach().float().cpu().clamp(0, 1)  # (R, B, 784)
    rgb = cells.unsqueeze(2).expand(-1, -1, 3, -1).clone()  # (R, B, 3, 784)
    colour = torch.tensor(HIDDEN_COLOUR).view(3, 1).expand(-1, cells.shape[-1])
    rgb[0] = torch.where(hidden.cpu().unsqueeze(1), colour, rgb[0])
    return make_grid(
        rgb.reshape(-1, 3, SIDE, SIDE), nrow=cells.shape[1], padding=PAD, pad_value=0.85
    )


def _text_px(text: str) -> float:
    """Width in screen pixels of one line of label text."""
    return TextPath((0, 0), text, size=LABEL_PT).get_extents().width * DPI / 72 if text else 0.0


def render_grid(
    grid: torch.Tensor, labels: list[str | tuple[str, int]], title: str, separate: bool = False
) -> Figure:
    """A figure of exactly ``(max(MIN_WIDTH_PX, label margin + SCALE * W), TITLE_PX + SCALE * H)``
    pixels: the grid ``(3, H, W)`` with each image pixel a ``SCALE`` x ``SCALE`` block, a label
    left of each row, the title (three short lines) above. A label given as (text, k) names a
    block of k rows; with ``separate``, a line is drawn between blocks. The label margin is
    ``LABEL_PX``, wider when a label needs it."""
    blocks = [label if isinstance(label, tuple) else (label, 1) for label in labels]
    _, h, w = grid.shape
    label_px = max(
        [LABEL_PX]
        + [math.ceil(_text_px(line)) + 20 for text, _ in blocks for line in text.splitlines()]
    )
    width, height = max(MIN_WIDTH_PX, label_px + SCALE * w), TITLE_PX + SCALE * h
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, facecolor="white")
    ax = fig.add_axes((label_px / width, 0, SCALE * w / width, SCALE * h / height))
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest", aspect="auto")
    ax.set_axis_off()
    cell = SIDE + PAD
    first = 0  # the block's first row
    for text, rows in blocks:
        y = (
            SCALE * (h - PAD - cell * first - (cell * rows - PAD) / 2) / height
        )  # centre of the block, from the bottom
        fig.text(
            (label_px - 10) / width,
            y,
            text,
            ha="right",
            va="center",
            fontsize=LABEL_PT,
            multialignment="right",
        )
        if separate and first > 0:
            y = (
                SCALE * (h - cell * first - PAD / 2) / height
            )  # middle of the padding above the block
            fig.add_artist(Line2D([4 / width, 1 - 4 / width], [y, y], color="0.3", linewidth=1.2))
        first += rows
    fig.text(6 / width, 1 - 6 / height, title, ha="left", va="top", fontsize=8, color="0.25")
    return fig


def _first_images(config: SampleConfig, context: Context) -> tuple[torch.Tensor, int]:
    """The first ``num_images`` images ``(num_images, 784)`` of the split, on the device, and the
    size of the split, over which evaluation draws its masks."""
    images = context.split_images(config.split)
    if config.num_images > len(images):
        raise ValueError(
            f"--num-images is {config.num_images} but the {config.split.value} split has "
            f"{len(images)} images; ask for fewer."
        )
    return images[: config.num_images].to(context.device), len(images)


MAX_PICTURE_PX = 2**16 - 1  # Agg draws no picture larger than this in either direction


def _require_picture_fits(num_images: int, num_samples: int, blocks: int, fixed_rows: int) -> None:
    """Refuse a grid too large to draw, before any work: ``fixed_rows`` rows, plus ``num_samples``
    rows for each of ``blocks`` runs, of ``num_images`` columns of 28-pixel cells."""
    cell = SCALE * (SIDE + PAD)
    height = TITLE_PX + SCALE * PAD + cell * (fixed_rows + blocks * num_samples)
    width = LABEL_PX + SCALE * PAD + cell * num_images
    if height > MAX_PICTURE_PX:
        most = (MAX_PICTURE_PX - TITLE_PX - SCALE * PAD) // cell - fixed_rows
        raise OptionError(
            f"--num-samples {num_samples} makes a picture {height:,} pixels tall (a row of "
            f"{cell} pixels per sample{f' for each of {blocks} runs' if blocks > 1 else ''}); "
            f"at most {MAX_PICTURE_PX:,} can be drawn: ask for at most {max(1, most // blocks)}."
        )
    if width > MAX_PICTURE_PX:
        most = (MAX_PICTURE_PX - LABEL_PX - SCALE * PAD) // cell
        raise OptionError(
            f"--num-images {num_images} makes a picture {width:,} pixels wide; at most "
            f"{MAX_PICTURE_PX:,} can be drawn: ask for at most {most}."
        )


def _masks_text(mask: Mask, inputs: int | None) -> str:
    return "random masks" if mask is Mask.random else f"fixed masks, {inputs} visible"


def sample_grid(
    run_dir: str | Path,
    config: SampleConfig | None = None,
    context: Context | None = None,
    out: str | Path | None = None,
    runs_dir: str | Path | None = None,
    **options,
) -> Path:
    """Write the sample grid of a run (see the module docstring) and return its path.

    Images are the first ``num_images`` of the split with the masks evaluation uses (fixed per
    image index by the seed); z draws are seeded by the seed too, so the file is reproducible.
    The baseline row comes from the run, else from a finished ``baseline`` run of the same
    masks in ``runs_dir`` (default: the folder holding ``run_dir``). A deterministic run (the
    ``baseline`` variant) has no z to sample: its grid stops after its baseline row.
    ``options``: fields of ``SampleConfig`` or ``Context`` by name (device: cpu unless given).
    Default output: the run's ``Run.samples_path``."""
    if context is None:
        options.setdefault("device", "cpu")
    config, context = with_options(SampleConfig, config, context, options)
    device, seed, num_images = context.device, config.seed, config.num_images
    _require_picture_fits(num_images, config.num_samples, blocks=1, fixed_rows=3)
    run = Run(run_dir)
    cvae, trained, checkpoint = run.load(device)
    cvae.eval()
    images, split_size = _first_images(config, context)
    # masks fixed per image index over the whole split, as evaluation draws them
    hidden = evaluation_masks(split_size, trained.mask, trained.inputs, seed)[:num_images]
    hidden = hidden.to(device)

    rows, labels = [images, images], ["input", "truth"]
    runs_dir = Path(runs_dir) if runs_dir is not None else run.path.parent
    baseline = baseline_row(cvae, images, hidden, baseline_run_dir(runs_dir, trained), device)
    if baseline is not None:
        labels.append(baseline[0])
        rows.append(baseline[1])
    if not cvae.deterministic:
        pyro.set_rng_seed(seed)  # z draws as in the picture comparing runs
        rows.extend(completions(cvae, images, hidden, config.num_samples))
        labels.extend(f"sample {k + 1}" for k in range(config.num_samples))

    masks = _masks_text(trained.mask, trained.inputs)
    name = run.path.name
    name = name if name == trained.variant else f"{name} ({trained.variant})"
    drawn = "pixel probabilities" + ("" if cvae.deterministic else ", z from the prior p(z|x)")
    if cvae.pixel_head is not None:
        drawn += ", each pixel given those before it"
    title = (
        f"{name}, epoch {checkpoint['epoch']}/{trained.epochs}\n"
        f"{config.split.value} images 0-{num_images - 1}, {masks}, seed {seed}\n{drawn}"
    )
    fig = render_grid(grid_tensor(rows, hidden), labels, title)
    return save_png(fig, out if out is not None else run.samples_path(config.split.value))


def compare_runs(
    runs_dir: str | Path = "runs",
    config: SampleConfig | None = None,
    context: Context | None = None,
    out: str | Path | None = None,
    **options,
) -> list[Path]:
    """One picture comparing every trained run in ``runs_dir`` on the same digits: the input and
    truth rows, then a labelled block per run (one row for a deterministic run, ``num_samples``
    completions for a CVAE, 3 unless given), z draws seeded alike for each run. Runs on
    different masks cannot share inputs: a picture per masking protocol, in ``runs_dir``
    (``runs.comparison_path``; ``out`` replaces the path when there is one protocol). Returns
    the paths written; ``options`` as for ``sample_grid``."""
    if config is None:
        options.setdefault("num_samples", 3)
    if context is None:
        options.setdefault("device", "cpu")
    config, context = with_options(SampleConfig, config, context, options)
    device, seed, num_images = context.device, config.seed, config.num_images
    runs_dir = Path(runs_dir)
    groups: dict[tuple[Mask, int | None], list[Path]] = {}
    for run_dir, trained in require_trained_runs(runs_dir, context.log):
        groups.setdefault((trained.mask, trained.inputs), []).append(run_dir)
    for run_dirs in groups.values():
        _require_picture_fits(num_images, config.num_samples, blocks=len(run_dirs), fixed_rows=2)
    if out is not None and len(groups) > 1:
        raise ValueError(
            f"--out names one picture, but the runs in {runs_dir} use {len(groups)} masking "
            "protocols (a picture each); leave --out out or name a run with --variant."
        )
    images, split_size = _first_images(config, context)
    split = config.split.value
    written = []
    for (mask, inputs), run_dirs in groups.items():
        hidden = evaluation_masks(split_size, mask, inputs, seed)[:num_images].to(device)
        rows, labels = [images, images], ["input", "truth"]
        for run_dir in run_dirs:
            cvae, trained, checkpoint = Run(run_dir).load(device)
            pyro.set_rng_seed(seed)  # each run draws as it would alone
            completed = completions(cvae.eval(), images, hidden, config.num_samples)
            rows.extend(completed)
            labels.append(
                (f"{run_dir.name}\nepoch {checkpoint['epoch']}/{trained.epochs}", len(completed))
            )
        title = (
            f"trained runs in {runs_dir}\n{split} images 0-{num_images - 1}, "
            f"{_masks_text(mask, inputs)}, seed {seed}\npixel probabilities; a CVAE's rows: "
            f"{config.num_samples} draws of z from the prior p(z|x)"
        )
        fig = render_grid(grid_tensor(rows, hidden), labels, title, separate=True)
        path = out if out is not None else comparison_path(runs_dir, split, mask, inputs)
        written.append(save_png(fig, path))
    return written
