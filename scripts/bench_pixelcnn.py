"""What the autoregressive decoder costs: `joint-scratch` against `joint-scratch-pixelcnn`.

    python scripts/bench_pixelcnn.py --threads 1

Both routes hold the same initial weights for every net they share (the pixelcnn one adds its
``PixelHead``), train on the same MNIST batches with the same optimizer and objective
(``TraceMeanField_ELBO``, fused Adam, clipping 1.0), and alternate round by round so that both
see the same machine state. Then both models, as they are after those steps, estimate the NCLL of
the same test images at S=100 with the guide, alternating too. Prints ms per training step, ms
per evaluated image, and the ratios.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import pyro
import torch

from pyro_cvae.config import TrainConfig
from pyro_cvae.data import epoch_batches, evaluation_masks, load_split
from pyro_cvae.evaluate import ncll_per_image
from pyro_cvae.model import CVAE, get_variant
from pyro_cvae.train import make_optimizer, train_step


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=100, help="training steps per round and route")
    p.add_argument("--images", type=int, default=200, help="test images per evaluation round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-dir", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    images, _ = load_split("train", args.data_dir, limit=32 * (args.steps + 10))
    batches = list(epoch_batches(images, 32, epoch=0, seed=0))
    warm, timed_batches = batches[:10], batches[10 : 10 + args.steps]
    test, _ = load_split("test", args.data_dir, limit=args.images)
    hidden = evaluation_masks(len(test), seed=0)

    plain = CVAE(get_variant("joint-scratch"))
    pixel = CVAE(get_variant("joint-scratch-pixelcnn"))
    pixel.load_state_dict(plain.state_dict(), strict=False)  # the shared nets start equal
    routes = {}
    for name, cvae in [("joint-scratch", plain), ("joint-scratch-pixelcnn", pixel)]:
        cvae = copy.deepcopy(cvae)
        config = TrainConfig(variant=name)
        optimizer, objective = make_optimizer(cvae, config.lr), config.objective()
        routes[name] = (
            cvae,
            lambda b, c=cvae, o=optimizer, f=config, j=objective: train_step(c, b, o, f, j),
        )

    def timed(run, n) -> float:
        start = time.perf_counter()
        run()
        return (time.perf_counter() - start) / n * 1000

    for _, step in routes.values():
        for b in warm:
            step(b)
    train_ms = {name: [] for name in routes}
    eval_ms = {name: [] for name in routes}
    for _ in range(args.rounds):
        for name, (_, step) in routes.items():
            train_ms[name].append(
                timed(lambda s=step: [s(b) for b in timed_batches], len(timed_batches))
            )
        for name, (cvae, _) in routes.items():
            pyro.set_rng_seed(0)
            eval_ms[name].append(
                timed(lambda c=cvae: ncll_per_image(c.eval(), test, hidden, 100), len(test))
            )
            cvae.train()
    base_train = statistics.median(train_ms["joint-scratch"])
    base_eval = statistics.median(eval_ms["joint-scratch"])
    print(
        f"{args.threads} thread(s); {args.steps} steps and {args.images} test images (S=100, "
        f"guide) x {args.rounds} rounds, medians; ratios to joint-scratch"
    )
    for name in routes:
        t, e = statistics.median(train_ms[name]), statistics.median(eval_ms[name])
        print(
            f"{name:24s} {t:6.1f} ms/step ({t / base_train:.2f}x)   "
            f"{e:6.2f} ms/image at S=100 ({e / base_eval:.2f}x)"
        )


if __name__ == "__main__":
    main()
