"""Ray's overhead per sweep job, on a running cluster (``ray start --head`` first):

    python scripts/bench_ray.py auto

joining the cluster, a fresh worker's first task (and how much of it is importing the
package, which a pool process pays too), and one ``cvae`` checkpoint (weights and Adam state)
handed by a worker to ``cluster.RunStore`` and written by the driver, five times.
"""

import os
import sys
import tempfile
import time
from pathlib import Path

started = time.perf_counter()
import ray  # noqa: E402  (its import is part of what is timed)

from pyro_cvae import cluster  # noqa: E402
from pyro_cvae.runs import Run  # noqa: E402


def first_task(_) -> float:
    t = time.perf_counter()
    import pyro_cvae.evaluate  # noqa: F401  (what a job imports)
    import pyro_cvae.sweep  # noqa: F401
    import pyro_cvae.train  # noqa: F401

    return time.perf_counter() - t


def cvae_checkpoint() -> dict:
    import torch

    from pyro_cvae.config import TrainConfig
    from pyro_cvae.data import make_batch, random_hidden
    from pyro_cvae.model import CVAE, get_variant
    from pyro_cvae.train import make_optimizer, train_step

    config = TrainConfig(variant="cvae")
    cvae = CVAE(get_variant("cvae"))
    optimizer = make_optimizer(cvae, 1e-3)
    train_step(cvae, make_batch(torch.rand(32, 784), random_hidden(32)), optimizer, config)
    return {
        "model": cvae.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": 1,
        "batch": 0,
        "step": 1,
        "rng": torch.get_rng_state(),
        "config": config.to_dict(),
        "metrics": [],
    }


def hand(store, times: int) -> list[float]:
    state, seconds = cvae_checkpoint(), []
    for _ in range(times):
        t = time.perf_counter()
        ray.get(store.hand.remote("cvae", "checkpoint", state, {}, True))
        seconds.append(time.perf_counter() - t)
    return seconds


def main() -> None:
    cluster.connect(sys.argv[1] if len(sys.argv) > 1 else "auto")
    print(f"joining the cluster (import ray, ray.init): {time.perf_counter() - started:.2f} s")
    t = time.perf_counter()
    imports = ray.get(ray.remote(first_task).remote(0))
    print(
        f"first task on a fresh worker: {time.perf_counter() - t:.2f} s "
        f"(importing torch, Pyro and the package: {imports:.2f} s)"
    )
    store = ray.remote(cluster.RunStore).options(num_cpus=0).remote()
    handing = ray.remote(hand).remote(store, 5)
    run = Run(Path(tempfile.mkdtemp()) / "cvae")
    run.path.mkdir()
    writes = []
    while True:  # the driver's side: take, write, let the worker go on
        ready, _ = ray.wait([handing], timeout=0.05)
        ids = []
        for msg_id, _name, _kind, state, _where in ray.get(store.take.remote()):
            t = time.perf_counter()
            run.write_checkpoint(state)
            writes.append(time.perf_counter() - t)
            ids.append(msg_id)
        if ids:
            ray.get(store.written.remote(ids))
        if ready:
            break
    seconds = ray.get(handing)
    size = os.path.getsize(run.checkpoint_path) / 1e6
    print(
        f"checkpoint of {size:.1f} MB handed to the driver and written: "
        + ", ".join(f"{s:.2f}" for s in seconds)
        + " s (the write alone: "
        + ", ".join(f"{s:.2f}" for s in writes)
        + " s)"
    )
    ray.shutdown()


if __name__ == "__main__":
    main()
