"""Linear-Gaussian models with exact evidence and posterior: the oracles the estimators are tested on.

Both stack their latent sites into u = (z_1, …, z_S) with u ~ N(0, Σ_u) and observe
x | u ~ N(H u + b, σ² I), so that (Bishop, *PRML*, §2.3.3 and §12.2)::

    log p(x) = log N(x; b, H Σ_u Hᵀ + σ² I)
    p(u | x) = N(C Hᵀ (x − b) / σ², C),   C = (Σ_u⁻¹ + Hᵀ H / σ²)⁻¹
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyrovae.nn import register


class LinearGaussian(nn.Module):
    """Base class: subclasses define ``sites``, ``prior_cov()``, ``observation_matrix()`` and ``model``."""

    sites: dict[str, int]  # latent site name → its dimension, in sampling order

    def __init__(self, data_dim: int, noise_scale: float):
        super().__init__()
        self.data_dim = data_dim
        self.b = nn.Parameter(torch.randn(data_dim))
        self.noise_scale = noise_scale

    def marginal(self) -> dist.MultivariateNormal:
        """p(x) = N(b, H Σ_u Hᵀ + σ² I), event (P,)."""
        H = self.observation_matrix()
        cov = H @ self.prior_cov() @ H.T + self.noise_scale**2 * torch.eye(self.data_dim, dtype=H.dtype, device=H.device)
        return dist.MultivariateNormal(self.b, covariance_matrix=cov)

    def log_px(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x): x (N, P) → (N,)."""
        return self.marginal().log_prob(x)

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact p(u | x) over the stacked latents: x (N, P) → mean (N, D_u), covariance (D_u, D_u)."""
        H = self.observation_matrix()
        precision = torch.linalg.inv(self.prior_cov()) + H.T @ H / self.noise_scale**2
        cov = torch.linalg.inv(precision)
        mean = (x - self.b) @ H @ cov.T / self.noise_scale**2
        return mean, cov


class PPCA(LinearGaussian):
    """Probabilistic PCA (Tipping & Bishop, 1999): z ~ N(0, I_D), x | z ~ N(W z + b, σ² I_P).

    Sites: ``z`` batch (N,) event (D,); ``x`` batch (N,) event (P,).
    """

    def __init__(self, data_dim: int, latent_dim: int, noise_scale: float = 0.5):
        super().__init__(data_dim, noise_scale)
        self.sites = {"z": latent_dim}
        self.W = nn.Parameter(torch.randn(data_dim, latent_dim) / latent_dim**0.5)

    def prior_cov(self) -> torch.Tensor:
        return torch.eye(self.sites["z"], dtype=self.W.dtype, device=self.W.device)

    def observation_matrix(self) -> torch.Tensor:
        return self.W

    def model(self, x: torch.Tensor) -> None:
        register(self)
        D = self.sites["z"]
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(D), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.W.T + self.b, self.noise_scale).to_event(1), obs=x)


class HierarchicalLinearGaussian(LinearGaussian):
    """Two latent layers: z1 ~ N(0, I), z2 | z1 ~ N(A z1, s² I), x | z2 ~ N(W z2 + b, σ² I).

    Sites: ``z1`` event (D1,), ``z2`` event (D2,), ``x`` event (P,), all batch (N,).
    """

    def __init__(self, data_dim: int, top_dim: int, bottom_dim: int, noise_scale: float = 0.5, top_noise: float = 0.7):
        super().__init__(data_dim, noise_scale)
        self.sites = {"z1": top_dim, "z2": bottom_dim}
        self.A = nn.Parameter(torch.randn(bottom_dim, top_dim) / top_dim**0.5)
        self.W = nn.Parameter(torch.randn(data_dim, bottom_dim) / bottom_dim**0.5)
        self.top_noise = top_noise

    def prior_cov(self) -> torch.Tensor:
        A, D1, D2 = self.A, self.sites["z1"], self.sites["z2"]
        eye1, eye2 = (torch.eye(d, dtype=A.dtype, device=A.device) for d in (D1, D2))
        return torch.cat([torch.cat([eye1, A.T], 1), torch.cat([A, A @ A.T + self.top_noise**2 * eye2], 1)], 0)

    def observation_matrix(self) -> torch.Tensor:
        return torch.cat([self.W.new_zeros(self.data_dim, self.sites["z1"]), self.W], 1)

    def model(self, x: torch.Tensor) -> None:
        register(self)
        with pyro.plate("data", x.shape[0]):
            z1 = pyro.sample("z1", dist.Normal(x.new_zeros(self.sites["z1"]), 1.0).to_event(1))
            z2 = pyro.sample("z2", dist.Normal(z1 @ self.A.T, self.top_noise).to_event(1))
            pyro.sample("x", dist.Normal(z2 @ self.W.T + self.b, self.noise_scale).to_event(1), obs=x)
