"""Choose the refined proposal's settings on *training* images: NCLL at S draws, mean ESS and
seconds of each proposal setting, on the first N training images (evaluation masks of seed 0,
the same draws for every row). Never reads the test split.

    python scripts/refine_grid.py RUN_DIR --images 1000 --grid 80,8,0.01 40,8,0.02 --threads 1

Each grid point is STEPS,K,LR of the refined proposal; the guide and (when the run has a
current one) the tuned proposal are measured first, for reference.
"""

from __future__ import annotations

import argparse
import math
import time

import pyro
import torch

from pyro_cvae.config import Refine
from pyro_cvae.data import evaluation_masks, load_split
from pyro_cvae.evaluate import ncll_per_image
from pyro_cvae.proposals import choose
from pyro_cvae.runs import Run, RunError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--images", type=int, default=1000, help="first N training images")
    parser.add_argument("--samples", type=int, default=100, help="S of the estimate")
    parser.add_argument("--grid", nargs="+", default=["80,8,0.01"], help="STEPS,K,LR points")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = Run(args.run_dir)
    cvae, config, checkpoint = run.load("cpu")
    images, _ = load_split("train", args.data_dir, args.images)
    hidden = evaluation_masks(len(images), config.mask, config.inputs, seed=0)
    points = [("guide", None), ("tuned", None)]
    for point in args.grid:
        steps, particles, lr = point.split(",")
        points.append(("refined", Refine(int(steps), int(particles), float(lr))))
    print("proposal | steps | K | lr | NCLL ± SE | mean ESS | seconds")
    for kind, options in points:
        try:
            chosen = choose(run, cvae, checkpoint, kind, options, log=lambda message: None)
        except RunError as e:  # no tuned proposal: the row is left out
            print(f"{kind}: {e}")
            continue
        pyro.set_rng_seed(0)
        started = time.perf_counter()
        ncll, ess = ncll_per_image(cvae, images, hidden, args.samples, proposal=chosen.chunks)
        seconds = time.perf_counter() - started
        se = ncll.std().item() / math.sqrt(len(ncll))
        where = (
            "" if options is None else f" | {options.steps} | {options.particles} | {options.lr}"
        )
        print(
            f"{kind}{where or ' | | |'} | {ncll.mean():.2f} ± {se:.2f} | {ess.mean():.1f} | "
            f"{seconds:.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
