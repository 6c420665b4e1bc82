"""A Gaussian guide linear in x, which can be set to the exact posterior of a linear-Gaussian model.

q(u | x) = N(F x + c, L Lᵀ) over the stacked latents u = (z_1, …, z_S). Site s is sampled from
its conditional given the sites before it: with ε = L⁻¹ (u − m), block s is
z_s = m_s + L_{s,<s} ε_{<s} + L_{ss} ε_s, i.e. N(m_s + L_{s,<s} ε_{<s}, L_{ss} L_{ss}ᵀ).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyrovae.nn import register


class LinearGaussianGuide(nn.Module):
    """q(u|x) = N(F x + c, L Lᵀ), sites in ``sites`` order, all local to each data point.

    With ``diagonal=True`` each site is a mean-field ``Normal(...).to_event(1)`` using only diag(L),
    so the analytic KL against a Normal prior exists.
    """

    def __init__(self, data_dim: int, sites: dict[str, int], diagonal: bool = False):
        super().__init__()
        self.sites = dict(sites)
        D = sum(self.sites.values())
        self.diagonal = diagonal
        self.F = nn.Parameter(torch.zeros(D, data_dim))
        self.c = nn.Parameter(torch.zeros(D))
        self.L = nn.Parameter(torch.eye(D))

    @torch.no_grad()
    def set_posterior(self, F: torch.Tensor, c: torch.Tensor, cov: torch.Tensor) -> "LinearGaussianGuide":
        """Set q to N(F x + c, cov)."""
        self.F.copy_(F)
        self.c.copy_(c)
        self.L.copy_(torch.linalg.cholesky(cov))
        return self

    def set_exact_posterior(self, model) -> "LinearGaussianGuide":
        """Set q(u|x) to the exact posterior of a :class:`~pyrovae.models.LinearGaussian` model."""
        H, b, s2 = model.observation_matrix(), model.b, model.noise_scale**2
        _, cov = model.posterior(b[None])
        F = cov @ H.T / s2
        return self.set_posterior(F, -F @ b, cov)

    def forward(self, x: torch.Tensor) -> None:
        register(self)
        with pyro.plate("data", x.shape[0]):
            L = self.L.tril()
            mean = x @ self.F.T + self.c  # (N, D)
            eps = []  # ε_{<s}, each (..., N, d_s)
            start = 0
            for name, d in self.sites.items():
                block = slice(start, start + d)
                loc = mean[..., block]
                if self.diagonal:
                    pyro.sample(name, dist.Normal(loc, L.diagonal()[block].abs()).to_event(1))
                    start += d
                    continue
                if eps:
                    loc = loc + torch.cat(eps, -1) @ L[block, :start].T
                L_ss = L[block, block]
                z = pyro.sample(name, dist.MultivariateNormal(loc, scale_tril=L_ss))
                eps.append(torch.linalg.solve_triangular(L_ss, (z - loc).unsqueeze(-1), upper=False).squeeze(-1))
                start += d
