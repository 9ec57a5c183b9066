"""Time a training step: plain PyTorch (the reference implementation's way) against Pyro's ELBOs.

    python scripts/bench_train.py                 # joint-scratch, batch 32, 2 threads
    python scripts/bench_train.py --threads 1 --steps 300 --particles 10

Every route trains the same nets from the same initial weights on the same MNIST batches:

(a) plain PyTorch, written the way the reference implementation writes it: the four MLPs
    called directly, BCE on the hidden pixels plus the analytic Gaussian KL, torch.optim.Adam
    with its defaults, clip_grad_norm_ at 1.0 on the per-image mean loss;
(b) the same plain step with our optimizer (one fused Adam): the fair yardstick for Pyro's cost;
(c) ours, default: ``pyro_cvae.train.train_step`` through ``TraceMeanField_ELBO`` (same
    objective as (a) and (b), fused Adam, the same clipping);
(d) ours, ``--elbo iwae``: ``RenyiELBO(alpha=0)`` with K particles (``--particles``, and
    ``--guide-gradient``), the same step otherwise.

Rounds alternate the routes so that all see the same machine state. Prints ms/step for each,
the ratios to (b), and what a 20-epoch run of 37,500 steps would take.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from pyro_cvae.config import TrainConfig
from pyro_cvae.data import epoch_batches, load_split
from pyro_cvae.model import CVAE, get_variant
from pyro_cvae.train import make_optimizer, train_step


def plain_loss(cvae: CVAE, x, y, hidden) -> torch.Tensor:
    """The CVAE objective as the reference computes it: nets called by hand, analytic KL."""
    guess = torch.where(hidden, torch.sigmoid(cvae.baseline_net(x)), x)
    prior_loc, prior_scale = cvae.prior_net(guess)
    loc, scale = cvae.recognition_net(torch.where(hidden, y, x))
    z = loc + scale * torch.randn_like(scale)
    logits = cvae.generation_net(z)
    recon = (F.binary_cross_entropy_with_logits(logits, y, reduction="none") * hidden).sum()
    kl = (
        torch.log(prior_scale / scale)
        + (scale**2 + (loc - prior_loc) ** 2) / (2 * prior_scale**2)
        - 0.5
    ).sum()
    return (recon + kl) / len(x)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--variant", default="joint-scratch", choices=["joint-scratch", "joint-pretrained"]
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=200, help="steps per round and per route")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--particles", type=int, default=10, help="K of the iwae route")
    p.add_argument(
        "--guide-gradient",
        default="dreg",
        choices=["reparam", "stl", "dreg", "rws"],
        help="of the iwae route",
    )
    p.add_argument("--data-dir", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    images, _ = load_split("train", args.data_dir, limit=args.batch_size * (args.steps + 20))
    batches = list(epoch_batches(images, args.batch_size, epoch=0, seed=0))
    meanfield = TrainConfig(variant=args.variant, batch_size=args.batch_size)
    iwae = TrainConfig(
        variant=args.variant,
        batch_size=args.batch_size,
        elbo="iwae",
        particles=args.particles,
        guide_gradient=args.guide_gradient,
    )

    initial = CVAE(get_variant(args.variant))

    def plain_route(fused: bool):
        cvae = copy.deepcopy(initial)
        params = cvae.trainable_parameters()
        optimizer = (
            make_optimizer(cvae, meanfield.lr)
            if fused
            else torch.optim.Adam(params, lr=meanfield.lr)
        )

        def step(b):
            loss = plain_loss(cvae, b.x, b.y, b.hidden)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, meanfield.clip_norm)
            optimizer.step()

        return step

    def pyro_route(config: TrainConfig):
        cvae = copy.deepcopy(initial)
        optimizer, objective = make_optimizer(cvae, config.lr), config.objective()
        return lambda b: train_step(cvae, b, optimizer, config, objective)

    routes = {
        "(a) plain PyTorch, default Adam": plain_route(fused=False),
        "(b) plain PyTorch, fused Adam": plain_route(fused=True),
        "(c) Pyro TraceMeanField_ELBO": pyro_route(meanfield),
        f"(d) Pyro RenyiELBO K={args.particles} {args.guide_gradient}": pyro_route(iwae),
    }

    def timed(step, bs) -> float:
        start = time.perf_counter()
        for b in bs:
            step(b)
        return (time.perf_counter() - start) / len(bs) * 1000

    warm, timed_batches = batches[:20], batches[20 : 20 + args.steps]
    for step in routes.values():
        timed(step, warm)
    ms = {name: [] for name in routes}
    for _ in range(args.rounds):
        for name, step in routes.items():
            ms[name].append(timed(step, timed_batches))
    median = {name: statistics.median(v) for name, v in ms.items()}
    yardstick = median["(b) plain PyTorch, fused Adam"]
    steps = 37_500
    print(
        f"{args.variant}, batch {args.batch_size}, {args.threads} thread(s), {args.steps} steps x {args.rounds} rounds "
        f"(median of rounds; ratios to (b))"
    )
    for name, m in median.items():
        print(
            f"{name:<40} {m:6.2f} ms  x{m / yardstick:5.3f}  20 epochs {m * steps / 60000:5.1f} min   "
            f"rounds {', '.join(f'{r:.2f}' for r in ms[name])}"
        )


if __name__ == "__main__":
    main()
