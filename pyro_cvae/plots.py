"""Training curves and NCLL bars of every run in a runs directory, as one PNG; and the one way
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
from .config import Mask
from .model import VARIANTS
from .runs import Run, runs_in

DPI = 128  # a power of two: pixel sizes / DPI * DPI are exact, so a figure's pixel size is what was asked
CURVES = ("loss", "recon", "kl")


def save_png(fig: Figure, path: str | Path) -> Path:
    """Render ``fig`` with Agg and write it atomically to ``path`` (its folder is created)."""
    path = Path(path)
    buffer = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buffer, metadata={"Software": None})
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(buffer.getvalue(), path)
    return path


def _reference(run: Run, variant: str) -> float | None:
    """The reference implementation's NCLL, which only applies to runs on its random masks."""
    v = VARIANTS.get(variant)
    try:
        mask = run.config().mask
    except Exception:  # a run being written, or not one of ours: no reference bar
        return None
    return v.reference_ncll if v is not None and mask is Mask.random else None


def plot_runs(runs_dir: str | Path = "runs", out: str | Path | None = None) -> Path:
    """Training curves (loss, recon, kl per epoch, a line per run) and, where runs have test
    evaluations, their NCLL with standard-error bars beside the reference's, as one PNG.

    Default output: ``<runs_dir>/plots.png``."""
    runs_dir = Path(runs_dir)
    runs = runs_in(runs_dir)
    if not runs:
        raise ValueError(f"no runs in {runs_dir} (no sub-folder holds a trained run); train one with: "
                         f"pyro-cvae train --runs-dir {runs_dir}, or point --runs-dir at the right folder.")
    evaluations = [(run, e) for run in runs if (e := run.best_evaluation("test")) is not None]

    fig = Figure(figsize=(12, 8 if evaluations else 4), dpi=DPI, layout="constrained")
    grid = fig.add_gridspec(2 if evaluations else 1, len(CURVES))
    for i, name in enumerate(CURVES):
        ax = fig.add_subplot(grid[0, i])
        for k, run in enumerate(runs):
            records = [r for r in run.read_metrics() if all(k in r for k in CURVES)]
            if records:  # ten colours, then the same ten dashed, then dotted
                ax.plot([r["epoch"] for r in records], [r[name] for r in records], marker=".", label=run.path.name,
                        color=f"C{k % 10}", linestyle=("-", "--", ":")[k // 10 % 3])
        ax.set(title=f"{name} per image (nats)", xlabel="epoch")
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles, labels = fig.axes[0].get_legend_handles_labels()
    if handles:
        fig.axes[-1].legend(handles, labels, fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1))

    if evaluations:
        ax = fig.add_subplot(grid[1, :])
        width = 0.4
        for i, (run, e) in enumerate(evaluations):
            reference = _reference(run, e.get("variant", run.path.name))
            at = i if reference is None else i - width / 2
            se = e.get("ncll_se")
            se = se if se is not None and math.isfinite(se) else 0.0
            ax.bar(at, e["ncll"], width, yerr=se or None, capsize=3, color="tab:blue",
                   label="this project (test split)")
            ax.annotate(f"{e['ncll']:.1f}", (at, e["ncll"] + se), ha="center", va="bottom", fontsize="small",
                        xytext=(0, 2), textcoords="offset points")
            if reference is not None:
                ax.bar(i + width / 2, reference, width, color="tab:gray", label="reference (its train split)")
                ax.annotate(f"{reference:.1f}", (i + width / 2, reference), ha="center", va="bottom",
                            fontsize="small", xytext=(0, 2), textcoords="offset points")
        ax.set_xlim(-0.7, len(evaluations) - 0.3)
        ax.margins(y=0.1)
        ticks = [f"{run.path.name} (S={e['samples']}" + (f", {e['images']} images)" if "images" in e else ")")
                 for run, e in evaluations]
        ax.set_xticks(range(len(evaluations)), ticks, fontsize="small", rotation=25, ha="right",
                      rotation_mode="anchor")
        ax.set(title="NCLL of the hidden pixels (nats per image, lower is better; ± one standard error)",
               ylabel="NCLL")
        # one legend entry per kind of bar, however many bars of each
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles))
        ax.legend(unique.values(), unique.keys(), fontsize="small")
        ax.grid(axis="y", alpha=0.3)
    return save_png(fig, out if out is not None else runs_dir / "plots.png")
