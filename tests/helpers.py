"""Small data and runs for the tests."""

from pathlib import Path

import torch

from pyro_cvae.config import TrainConfig
from pyro_cvae.train import train


def fake_images(n: int, seed: int = 0) -> torch.Tensor:
    """Digit-like grey images (N, 784): a blurred random stroke pattern in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.rand(n, 1, 7, 7, generator=g) > 0.6).float()
    img = torch.nn.functional.interpolate(base, size=(28, 28), mode="bilinear", align_corners=False)
    return img.clamp(0, 1).reshape(n, 784)


def train_tiny(run_dir: Path, variant: str = "joint-scratch", epochs: int = 1, n: int = 64, **kw):
    config = TrainConfig(variant=variant, epochs=epochs, batch_size=16, limit=n, **kw)
    return train(
        config,
        run_dir=run_dir,
        runs_dir=run_dir.parent,
        images=fake_images(n),
        progress=False,
        log=lambda m: None,
        device="cpu",
    )


def one_line_error(result, code: int, *phrases: str) -> str:
    """The CLI ended with ``code``, no traceback, and one line naming ``phrases``."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]
