"""Time a training step: plain PyTorch (the reference implementation's way) against ours.

    python scripts/bench_train.py                 # joint-scratch, batch 32, 2 threads
    python scripts/bench_train.py --threads 1 --steps 300

Both steps train the same nets from the same initial weights on the same MNIST batches:

(a) plain PyTorch, written the way the reference implementation writes it: the four MLPs
    called directly, BCE on the hidden pixels plus the analytic Gaussian KL, torch.optim.Adam
    with its defaults, clip_grad_norm_ at 1.0 on the per-image mean loss;
(b) ours: ``pyro_cvae.train.train_step``, the Pyro model and guide traced and replayed, the
    same objective, one fused Adam, the same clipping.

Rounds alternate (a) and (b) so that both see the same machine state. Prints ms/step for
each, the ratio (b)/(a), and what a 20-epoch run of 37,500 steps would take.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

from pyro_cvae.data import epoch_batches, load_split
from pyro_cvae.model import CVAE, get_variant
from pyro_cvae.config import TrainConfig
from pyro_cvae.train import make_optimizer, train_step


def plain_loss(cvae: CVAE, x, y, hidden) -> torch.Tensor:
    """The CVAE objective as the reference computes it: nets called by hand, analytic KL."""
    guess = torch.where(hidden, torch.sigmoid(cvae.baseline_net(x)), x)
    prior_loc, prior_scale = cvae.prior_net(guess)
    loc, scale = cvae.recognition_net(torch.where(hidden, y, x))
    z = loc + scale * torch.randn_like(scale)
    logits = cvae.generation_net(z)
    recon = (F.binary_cross_entropy_with_logits(logits, y, reduction="none") * hidden).sum()
    kl = (torch.log(prior_scale / scale) + (scale**2 + (loc - prior_loc) ** 2) / (2 * prior_scale**2) - 0.5).sum()
    return (recon + kl) / len(x)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="joint-scratch", choices=["joint-scratch", "joint-pretrained"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=200, help="steps per round and per implementation")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data-dir", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    images, _ = load_split("train", args.data_dir, limit=args.batch_size * (args.steps + 20))
    batches = list(epoch_batches(images, args.batch_size, epoch=0, seed=0))
    config = TrainConfig(variant=args.variant, batch_size=args.batch_size)

    ours = CVAE(get_variant(args.variant))
    plain = copy.deepcopy(ours)
    ours_opt = make_optimizer(ours, config.lr)
    plain_params = plain.trainable_parameters()
    plain_opt = torch.optim.Adam(plain_params, lr=config.lr)

    def plain_step(b):
        loss = plain_loss(plain, b.x, b.y, b.hidden)
        plain_opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain_params, config.clip_norm)
        plain_opt.step()
        return loss.item()

    def ours_step(b):
        return train_step(ours, b, ours_opt, config)["loss"]

    def timed(step, bs) -> float:
        start = time.perf_counter()
        for b in bs:
            step(b)
        return (time.perf_counter() - start) / len(bs) * 1000

    warm, timed_batches = batches[:20], batches[20 : 20 + args.steps]
    timed(plain_step, warm)
    timed(ours_step, warm)
    plain_ms, ours_ms = [], []
    for _ in range(args.rounds):
        plain_ms.append(timed(plain_step, timed_batches))
        ours_ms.append(timed(ours_step, timed_batches))
    a, b = statistics.median(plain_ms), statistics.median(ours_ms)
    steps = 37_500
    print(f"{args.variant}, batch {args.batch_size}, {args.threads} thread(s), {args.steps} steps x {args.rounds} rounds "
          f"(median of rounds)")
    print(f"(a) plain PyTorch step : {a:6.2f} ms   rounds {', '.join(f'{m:.2f}' for m in plain_ms)}")
    print(f"(b) pyro-cvae step     : {b:6.2f} ms   rounds {', '.join(f'{m:.2f}' for m in ours_ms)}")
    print(f"ratio (b)/(a)          : {b / a:6.3f}")
    print(f"20 epochs ({steps} steps): plain {a * steps / 60000:.1f} min, ours {b * steps / 60000:.1f} min; "
          f"epoch: plain {a * 1875 / 1000:.0f} s, ours {b * 1875 / 1000:.0f} s")


if __name__ == "__main__":
    main()
