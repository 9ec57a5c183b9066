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


class MaskedConv2d(nn.Conv2d):
    """A convolution that sees only pixels before the centre in raster order (PixelCNN, van den
    Oord et al. 2016): mask ``"A"`` excludes the centre, ``"B"`` includes it."""

    def __init__(self, n_in: int, n_out: int, kernel: int, mask: str):
        super().__init__(n_in, n_out, kernel, padding=kernel // 2)
        causal = torch.zeros(kernel, kernel)
        causal[: kernel // 2] = 1  # the rows above
        causal[kernel // 2, : kernel // 2 + (mask == "B")] = 1  # left of (and at) the centre
        self.register_buffer("causal", causal)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return F.conv2d(image, self.weight * self.causal, self.bias, padding=self.padding)


SIDE = 28  # image side in pixels


class PixelHead(nn.Module):
    """The autoregressive part of an autoregressive decoder: for every pixel, a gate ``a`` and a
    bias ``b`` from the pixels before it in raster order (a causal 5x5 then 3x3 convolution of the
    whole image, ``channels`` wide) and from the visible pixels around it (a 5x5 convolution of
    x); the decoder's logits become ``b + 2 sigmoid(a) * decoded(z)``. Both outputs start at zero,
    so the decoder starts as the plain one. Its cost is per image, not per particle: the only
    per-particle work is that product."""

    def __init__(self, channels: int = 16):
        super().__init__()
        self.past = MaskedConv2d(1, channels, 5, "A")
        self.visible = nn.Conv2d(1, channels, 5, padding=2, bias=False)
        self.mix = MaskedConv2d(channels, channels, 3, "B")
        self.out = nn.Conv2d(channels, 2, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, image: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate, bias), each ``(..., 784)``, from the whole image and the input x ``(..., 784)``
        (hidden pixels -1); pixel i of each depends on ``image`` only through pixels before i."""
        lead = image.shape[:-1]
        x = x.expand(lead + x.shape[-1:])
        h = self.past(image.reshape(-1, 1, SIDE, SIDE)) + self.visible(x.reshape(-1, 1, SIDE, SIDE))
        h = F.gelu(self.mix(F.gelu(h)))
        gate, bias = self.out(h).flatten(-2).unbind(-2)
        return gate.reshape(lead + (PIXELS,)), bias.reshape(lead + (PIXELS,))
