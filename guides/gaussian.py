"""Diagonal-Gaussian inference network q_φ(z|x) = N(μ_φ(x), diag σ_φ(x)²)."""

from __future__ import annotations

from typing import Sequence

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

from pyrovae.nn import mlp, register

MIN_SCALE = 1e-4


class DiagonalGaussianEncoder(nn.Module):
    """Amortized guide: site ``z``, batch (N,), event (D,), all latents local to each data point.

    An MLP ``P → hidden → 2D`` gives μ and a raw scale; σ = softplus(raw) + 1e-4, so σ ≈ 0.69
    at initialization and never reaches 0. Call it inside ``pyro.plate("data", N)``.
    """

    def __init__(self, data_dim: int, latent_dim: int, hidden: Sequence[int] = (400,), activation: str = "relu", site: str = "z"):
        super().__init__()
        self.latent_dim = latent_dim
        self.site = site
        self.net = mlp([data_dim, *hidden, 2 * latent_dim], activation)

    def loc_scale(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (..., P) → μ (..., D), σ (..., D)."""
        loc, raw_scale = self.net(x).chunk(2, dim=-1)
        return loc, F.softplus(raw_scale) + MIN_SCALE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        register(self)
        loc, scale = self.loc_scale(x)
        return pyro.sample(self.site, dist.Normal(loc, scale).to_event(1))
