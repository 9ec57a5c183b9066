"""Training curves and NCLL points of every run in a runs directory, as one PNG; and the one way
this package writes a matplotlib figure to a PNG file (Agg, atomically).

Figures are built with ``matplotlib.figure.Figure`` and drawn by the Agg canvas directly, never
through ``pyplot``: no global figure state, no GUI backend, the same bytes for the same figure.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .atomic import atomic_write_bytes
from .references import Source, comparable, reference_for
from .runs import Run, runs_in

DPI = 128  # a power of two: pixel sizes / DPI * DPI are exact, so a figure's pixel size is what was asked
CURVES = ("loss", "recon", "kl")


def save_png(fig: Figure, path: str | Path) -> Path:
    """Render ``fig`` with Agg and write it atomically to ``path`` (its folder is created)."""
    path = Path(path)
    buffer = io.BytesIO()
    FigureCanvasAgg(fig).print_png(
        buffer, metadata={"Software": "pyro-cvae"}
    )  # the mark of a picture --out may replace (runs.is_our_png); no version: same bytes
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(buffer.getvalue(), path)
    return path


def _masks(run: Run) -> tuple[str, int | None]:
    try:
        config = run.config()
        return config.mask, config.inputs
    except Exception:  # a run being written, or not one of ours: no outside figure for it
        return "random", None


# how each outside figure is drawn beside ours: marker, colour, legend
REFERENCE_STYLE = {
    Source.TABLE: ("D", "tab:purple", "reference implementation's table (its training images)"),
    Source.CODE: ("s", "tab:red", "reference implementation's code, run on this machine"),
    Source.PYRO_TUTORIAL: ("^", "tab:green", "Pyro's CVAE tutorial (fixed quadrants, a bound)"),
}


# how each proposal's points are drawn (``proposals``): colour and offset within its run's row
PROPOSAL_STYLE = {
    "guide": ("tab:blue", -0.3),
    "tuned": ("tab:cyan", -0.15),
    "refined": ("tab:olive", 0.0),
}
REFERENCE_OFFSET = 0.2


def _ncll_panel(ax, runs: list[Run], split: str, best: list[dict[str, dict[str, dict]]]) -> None:
    """Our NCLL on ``split`` as points with standard-error bars, a row per run (``runs``, top to
    bottom; ``best[i][split]`` its evaluation per proposal), the proposals side by side, each
    row beside the outside figure measured on the same split and masks; the axis spans the
    data, not from zero, so that differences of a nat show."""
    evaluations = {(i, kind): e for i in range(len(runs)) for kind, e in best[i][split].items()}
    # S of the sampled runs (a deterministic one is exact with S=1) and image counts, in the title when shared
    samples = {e["samples"] for e in evaluations.values() if e["samples"] > 1}
    images = {e.get("images") for e in evaluations.values()}
    for (i, kind), e in evaluations.items():
        colour, offset = PROPOSAL_STYLE[kind]
        se = e.get("ncll_se")
        se = se if se is not None and math.isfinite(se) else 0.0
        ax.errorbar(
            e["ncll"],
            i + offset,
            xerr=se or None,
            fmt="o",
            color=colour,
            capsize=3,
            label=f"this project, {kind} proposal (± 1 standard error)",
        )
        text = f"{e['ncll']:.2f}" + (f" ± {se:.2f}" if se else "")
        if len(samples) > 1 or len(images) > 1:
            text += f" (S={e['samples']}, {e.get('images', '?')} images)"
        ax.annotate(
            text,
            (e["ncll"], i + offset),
            xytext=(8, 0),
            textcoords="offset points",
            va="center",
            fontsize="small",
            color=colour,
        )
    for i in sorted({i for i, _ in evaluations}):  # the outside figure, against our guide's
        kinds = best[i][split]
        e = kinds.get("guide") or next(iter(kinds.values()))
        reference = reference_for(e.get("variant", runs[i].path.name), *_masks(runs[i]), split)
        if reference is not None:
            marker, colour, label = REFERENCE_STYLE[reference.source]
            ax.plot(
                reference.ncll,
                i + REFERENCE_OFFSET,
                marker=marker,
                color=colour,
                linestyle="none",
                label=label,
            )
            same_protocol = comparable(
                e.get("variant", ""), e.get("images", 0), e["samples"], e.get("proposal", "guide")
            )  # else a difference from the reference would mean nothing
            difference = f" ({e['ncll'] - reference.ncll:+.2f})" if same_protocol else ""
            ax.annotate(
                f"{reference.ncll:.2f}{difference}",
                (reference.ncll, i + REFERENCE_OFFSET),
                xytext=(8, 0),
                textcoords="offset points",
                va="center",
                fontsize="small",
                color=colour,
            )
    shared = [f"S={s}" for s in samples if len(samples) == 1] + [
        f"{n} images" for n in images if len(images) == 1 and n
    ]
    ax.set(
        title=f"{split} images" + (f" ({', '.join(shared)})" if shared else ""),
        xlabel="NCLL (nats per image)",
    )
    ax.margins(x=0.3)  # room for the numbers right of the points
    ax.grid(axis="x", alpha=0.3)


def plot_runs(runs_dir: str | Path = "runs", out: str | Path | None = None) -> Path:
    """Training curves (loss, recon, kl per epoch, a line per run) and, for each split with
    evaluations, NCLL points with standard-error bars, one per proposal the run was evaluated
    with, beside the outside figures measured on that split (``references``), as one PNG.

    Default output: ``<runs_dir>/plots.png``."""
    runs_dir = Path(runs_dir)
    runs = runs_in(runs_dir)
    if not runs:
        raise ValueError(
            f"no runs in {runs_dir} (no sub-folder holds a trained run); train one with: "
            f"pyro-cvae train --runs-dir {runs_dir}, or point --runs-dir at the right folder."
        )
    best_of = {
        run.path: {
            split: {kind: e for kind in PROPOSAL_STYLE if (e := run.best_evaluation(split, kind))}
            for split in ("test", "train")
        }
        for run in runs
    }
    splits = [split for split in ("test", "train") if any(best_of[run.path][split] for run in runs)]
    evaluated = [run for run in runs if any(best_of[run.path][split] for split in splits)]

    ncll_height = 1.5 + 0.6 * len(evaluated)
    fig = Figure(figsize=(12, 4 + (ncll_height if splits else 0)), dpi=DPI, layout="constrained")
    curves, ncll = fig.subfigures(2, 1, height_ratios=[4, ncll_height]) if splits else (fig, None)
    for ax, name in zip(curves.subplots(1, len(CURVES)), CURVES):
        for k, run in enumerate(runs):
            records = [r for r in run.read_metrics() if all(k in r for k in CURVES)]
            if records:  # ten colours, then the same ten dashed, then dotted
                ax.plot(
                    [r["epoch"] for r in records],
                    [r[name] for r in records],
                    marker=".",
                    label=run.path.name,
                    color=f"C{k % 10}",
                    linestyle=("-", "--", ":")[k // 10 % 3],
                )
        ax.set(title=f"{name} per image (nats)", xlabel="epoch")
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(handles, labels, fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1))

    if ncll is not None:  # test (against the reference's own test figures) beside train
        panels = ncll.subplots(1, len(splits), sharey=True, squeeze=False)[0]
        for ax, split in zip(panels, splits):
            _ncll_panel(ax, evaluated, split, [best_of[run.path] for run in evaluated])
        panels[0].set_yticks(range(len(evaluated)), [run.path.name for run in evaluated])
        panels[0].set_ylim(len(evaluated) - 0.5, -0.5)  # the first run at the top
        kinds = {}  # one legend entry per kind of point, however many points and panels
        for ax in panels:
            kinds.update({name: handle for handle, name in zip(*ax.get_legend_handles_labels())})
        ncll.legend(
            kinds.values(), kinds.keys(), loc="outside lower center", ncols=2, fontsize="small"
        )
        ncll.suptitle(
            "NCLL of the hidden pixels, lower is better, each beside the outside figure measured the same way"
        )
    return save_png(fig, out if out is not None else runs_dir / "plots.png")
