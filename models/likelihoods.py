"""Likelihoods p_θ(x|z): Pyro programs ``likelihood(logits, x)`` that observe site ``x``.

Each is called inside the model's ``pyro.plate("data", N)`` with the decoder's output
``logits`` (..., N, P) and the data ``x`` (N, P); the site has batch (N,) and event (P,).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyrovae.registry import Registry

LIKELIHOODS: Registry[nn.Module] = Registry("likelihood")


class Bernoulli(nn.Module):
    """x_p ~ Bernoulli(sigmoid(logits_p)) for binary pixels."""

    binary_data = True

    def forward(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)


class ContinuousBernoulli(nn.Module):
    """x_p ~ ContinuousBernoulli(sigmoid(logits_p)) for grey levels in [0, 1] (Loaiza-Ganem & Cunningham, 2019).

    A normalized density on [0, 1], unlike the Bernoulli applied to grey levels.
    """

    binary_data = False

    def forward(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return pyro.sample("x", dist.ContinuousBernoulli(logits=logits).to_event(1), obs=x)


LIKELIHOODS.register("bernoulli")(Bernoulli)
LIKELIHOODS.register("continuous-bernoulli")(ContinuousBernoulli)
