"""The four MLPs of the CVAE: two hidden layers of 500 units with GELU each."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .data import PIXELS

WIDTH = 500  # units of each hidden layer
Z_DIM = 200


def mlp(n_in: int, n_out: int, width: int = WIDTH) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(n_in, width),
        nn.GELU(),
        nn.Linear(width, width),
        nn.GELU(),
        nn.Linear(width, n_out),
    )


class BaselineNet(nn.Module):
    """f(x): logits ``(B, 784)`` of every pixel from the masked input ``(B, 784)``."""

    def __init__(self, width: int = WIDTH):
        super().__init__()
        self.net = mlp(PIXELS, PIXELS, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class GaussianNet(nn.Module):
    """An image ``(B, 784)`` -> (loc, scale) of a diagonal Gaussian ``(B, z_dim)``.

    Serves as the prior net p(z|x) and the recognition net q(z|x,y)."""

    def __init__(self, z_dim: int = Z_DIM, width: int = WIDTH):
        super().__init__()
        self.net = mlp(PIXELS, 2 * z_dim, width)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, raw_scale = self.net(image).chunk(2, dim=-1)
        return loc, F.softplus(raw_scale) + 1e-4


class GenerationNet(nn.Module):
    """p(y|z) or, conditioned, p(y|z,x): pixel logits ``(..., 784)`` from z ``(..., z_dim)``.

    The conditioned net is an MLP on the concatenation [z, x] (n_in = 984). Its first layer is
    written as W_z z + W_x x, the same affine map, so that with S particles per image the x
    part is computed once per image, not once per particle."""

    def __init__(self, z_dim: int = Z_DIM, conditioned: bool = False, width: int = WIDTH):
        super().__init__()
        self.conditioned = conditioned
        self.z_in = nn.Linear(z_dim, width)
        self.x_in = nn.Linear(PIXELS, width, bias=False) if conditioned else None
        self.rest = nn.Sequential(
            nn.GELU(), nn.Linear(width, width), nn.GELU(), nn.Linear(width, PIXELS)
        )

    def forward(self, z: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        h = self.z_in(z)
        if self.x_in is not None:
            h = h + self.x_in(x)  # (B, H) broadcasts over leading particle dims of z
        return self.rest(h)
