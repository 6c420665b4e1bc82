"""Gaussian inference networks: q_φ(z|x) = N(μ_φ(x), diag σ_φ(x)²) and N(μ_φ(x), L_φ(x) L_φ(x)ᵀ).

Both are amortized (one network for all data points) and take an optional ``make_net(out_dim)``
that builds the network x ↦ (..., out_dim); the default is an MLP ``P → hidden → out_dim``.
Both give q(z|x) at any x outside a plate through ``posterior(x)`` (the VampPrior uses it).

This module also registers the closed form of KL(N(μ, LLᵀ) ‖ N(m, diag s²)) with
``torch.distributions.kl_divergence``, so that the full-covariance guide against a standard-normal
prior gets an analytic KL in the evaluation and in ``TraceMeanField_ELBO``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Independent, MultivariateNormal, Normal, register_kl

from pyrovae.nn import mlp, register

MIN_SCALE = 1e-4


class DiagonalGaussianEncoder(nn.Module):
    """Diagonal Gaussian q(z|x) = N(μ(x), diag σ(x)²), amortized by one network.

    A network ``P → hidden → 2D`` gives μ and a raw scale; σ = softplus(raw) + 1e-4, so σ ≈ 0.69
    at initialization and never reaches 0. Site ``z``, batch (N,), event (D,), all latents local
    to each data point; call it inside ``pyro.plate("data", N)``.
    """

    def __init__(self, data_dim: int, latent_dim: int, hidden: Sequence[int] = (400,), activation: str = "relu",
                 site: str = "z", make_net: Callable[[int], nn.Module] | None = None):
        super().__init__()
        self.latent_dim = latent_dim
        self.site = site
        self.net = make_net(2 * latent_dim) if make_net else mlp([data_dim, *hidden, 2 * latent_dim], activation)

    def loc_scale(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (..., P) → μ (..., D), σ (..., D)."""
        loc, raw_scale = self.net(x).chunk(2, dim=-1)
        return loc, F.softplus(raw_scale) + MIN_SCALE

    def posterior(self, x: torch.Tensor) -> dist.TorchDistribution:
        """q(z|x) for x (..., P): batch (...), event (D,)."""
        loc, scale = self.loc_scale(x)
        return dist.Normal(loc, scale).to_event(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        register(self)
        return pyro.sample(self.site, self.posterior(x))


class FullCovarianceGaussianEncoder(nn.Module):
    """Full-covariance Gaussian q(z|x) = N(μ(x), L(x) L(x)ᵀ) with a learned Cholesky factor, amortized.

    A network ``P → hidden → D + D + D(D−1)/2`` gives μ, the diagonal of L (softplus(·) + 1e-4 > 0)
    and its strictly lower triangle. log q(z|x) = −½‖L⁻¹(z − μ)‖² − Σ_i log L_ii − (D/2) log 2π.
    Site ``z``, batch (N,), event (D,). KL to a standard normal prior is analytic (registered in
    this module); the entropy ½ log det(2πe LLᵀ) no longer assumes independent coordinates.
    """

    def __init__(self, data_dim: int, latent_dim: int, hidden: Sequence[int] = (400,), activation: str = "relu",
                 site: str = "z", make_net: Callable[[int], nn.Module] | None = None):
        super().__init__()
        self.latent_dim = latent_dim
        self.site = site
        out_dim = 2 * latent_dim + latent_dim * (latent_dim - 1) // 2
        self.net = make_net(out_dim) if make_net else mlp([data_dim, *hidden, out_dim], activation)
        rows, cols = torch.tril_indices(latent_dim, latent_dim, offset=-1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    def loc_scale_tril(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (..., P) → μ (..., D), L (..., D, D) lower triangular with a positive diagonal."""
        D = self.latent_dim
        out = self.net(x)
        loc, raw_diag, lower = out[..., :D], out[..., D : 2 * D], out[..., 2 * D :]
        strictly_lower = out.new_zeros(*out.shape[:-1], D, D)
        strictly_lower[..., self.rows, self.cols] = lower
        return loc, strictly_lower + torch.diag_embed(F.softplus(raw_diag) + MIN_SCALE)

    def posterior(self, x: torch.Tensor) -> dist.TorchDistribution:
        """q(z|x) for x (..., P): batch (...), event (D,)."""
        loc, L = self.loc_scale_tril(x)
        return dist.MultivariateNormal(loc, scale_tril=L)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        register(self)
        return pyro.sample(self.site, self.posterior(x))


@register_kl(MultivariateNormal, Independent)
def _kl_mvn_diagonal_normal(p: MultivariateNormal, q: Independent) -> torch.Tensor:
    """KL(N(μ, LLᵀ) ‖ N(m, diag s²)) = ½ [Σ_i (LLᵀ)_ii / s_i² + Σ_i (μ_i − m_i)²/s_i² − D + Σ_i log s_i² − 2 Σ_i log L_ii]."""
    if not isinstance(q.base_dist, Normal) or q.reinterpreted_batch_ndims != 1:
        raise NotImplementedError
    m, s = q.base_dist.loc, q.base_dist.scale
    L = p.scale_tril
    D = p.event_shape[0]
    trace = (L.pow(2).sum(-1) / s.pow(2)).sum(-1)
    mahalanobis = ((p.loc - m) / s).pow(2).sum(-1)
    log_det = 2 * (s.log().sum(-1) - L.diagonal(dim1=-2, dim2=-1).log().sum(-1))
    return 0.5 * (trace + mahalanobis - D + log_det)


__all__ = ["DiagonalGaussianEncoder", "FullCovarianceGaussianEncoder", "MIN_SCALE"]
