import os
from pathlib import Path

import pytest
import torch

from .helpers import train_tiny

torch.set_num_threads(1)  # tiny tensors: threads only add overhead

# CI gives PYRO_CVAE_DATA=../shared/mnist, relative to the checkout: made absolute, it still holds
# for tests that change directory and for the commands they start elsewhere
if os.environ.get("PYRO_CVAE_DATA"):
    os.environ["PYRO_CVAE_DATA"] = os.path.abspath(os.environ["PYRO_CVAE_DATA"])


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Each test gets its own cache folder (verified-checksum record, default data folder)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The real MNIST (CI sets PYRO_CVAE_DATA=../shared/mnist)."""
    path = os.environ.get("PYRO_CVAE_DATA")
    if not path or not Path(path).is_dir():
        pytest.skip("real MNIST not available: set PYRO_CVAE_DATA=../shared/mnist")
    return Path(path)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "joint-scratch"
    train_tiny(run_dir, epochs=2)
    return run_dir
