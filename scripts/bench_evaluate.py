"""Time the NCLL estimator: ours, vectorised and chunked, against a naive per-image loop over
``pyro.infer.Importance``.

    python scripts/bench_evaluate.py                              # an untrained joint-scratch
    python scripts/bench_evaluate.py --run-dir runs/joint-scratch # a trained run (same speed)

Ours runs S importance samples on all 10,000 test images; the naive loop runs
``Importance(model, guide, num_samples=S)`` on each of the first ``--naive-images`` images
alone. Prints images per second for both and the ratio.
"""

from __future__ import annotations

import argparse
import time

import pyro
import torch
from pyro.infer import Importance

from pyro_cvae.data import evaluation_masks, load_split, visible_input
from pyro_cvae.evaluate import ncll_per_image
from pyro_cvae.model import CVAE, get_variant
from pyro_cvae.runs import load_run


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--run-dir", default=None, help="a trained run (default: an untrained joint-scratch)"
    )
    p.add_argument("--samples", type=int, default=100)
    p.add_argument("--images", type=int, default=10_000)
    p.add_argument("--naive-images", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data-dir", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    pyro.set_rng_seed(0)

    cvae = load_run(args.run_dir)[0] if args.run_dir else CVAE(get_variant("joint-scratch"))
    images, _ = load_split("test", args.data_dir, limit=args.images)
    hidden = evaluation_masks(len(images))

    start = time.perf_counter()
    ncll, _ = ncll_per_image(cvae, images, hidden, args.samples)
    ours = time.perf_counter() - start

    n = args.naive_images
    naive = []
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(n):
            y, h = images[i : i + 1], hidden[i : i + 1]
            posterior = Importance(cvae.model, cvae.guide, num_samples=args.samples).run(
                visible_input(y, h), y, h
            )
            naive.append(-posterior.get_log_normalizer().item())
    naive_s = time.perf_counter() - start

    ours_rate, naive_rate = len(images) / ours, n / naive_s
    print(f"S={args.samples}, {args.threads} thread(s)")
    print(
        f"ours : {len(images)} images in {ours:6.1f} s = {ours_rate:8.1f} images/s  (NCLL {ncll.mean():.2f})"
    )
    print(
        f"naive: {n} images in {naive_s:6.1f} s = {naive_rate:8.1f} images/s  "
        f"(NCLL {sum(naive) / n:.2f} on them; ours {ncll[:n].mean():.2f})"
    )
    print(f"speed-up: {ours_rate / naive_rate:.0f}x")


if __name__ == "__main__":
    main()
