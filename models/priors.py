"""Priors p(z): Pyro programs called inside the model's ``pyro.plate("data", N)``.

A prior samples its latent site(s) and returns the value the decoder reads. To add one,
write an ``nn.Module`` whose ``forward()`` does that (calling ``pyrovae.nn.register(self)`` first
if it has parameters) and register a constructor::

    @PRIORS.register("my-prior")
    def my_prior(latent_dim: int) -> nn.Module: ...
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyrovae.registry import Registry

PRIORS: Registry[nn.Module] = Registry("prior")


class StandardNormal(nn.Module):
    """p(z) = N(0, I): site ``z``, batch (N,) from the enclosing plate, event (D,)."""

    def __init__(self, latent_dim: int, site: str = "z"):
        super().__init__()
        self.site = site
        self.register_buffer("loc", torch.zeros(latent_dim))  # follows .to(device) and .double()

    def forward(self) -> torch.Tensor:
        return pyro.sample(self.site, dist.Normal(self.loc, 1.0).to_event(1))


PRIORS.register("normal")(StandardNormal)
