"""Flow guides: a Gaussian base made more flexible by invertible transforms.

Reference: Kingma, Salimans, Jozefowicz, Chen, Sutskever & Welling (2016), *Improved variational
inference with inverse autoregressive flow* (IAF).
"""

from __future__ import annotations

from typing import Callable, Sequence

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions.transforms import ConditionalAffineAutoregressive
from pyro.nn import ConditionalAutoRegressiveNN
from torch import nn

from pyrovae.errors import PyrovaeError
from pyrovae.nn import ACTIVATIONS, mlp, register

from .gaussian import MIN_SCALE


class IAFEncoder(nn.Module):
    """Inverse autoregressive flow on a diagonal Gaussian, each step conditioned on a context h(x) as IAF requires.

    One network ``P → hidden → 2D + H`` gives the base N(μ(x), diag σ(x)²) and a context h(x) (H =
    ``context_dim``, default D), as in Kingma et al.'s code, where h is an extra output of the
    encoder. Then T = ``num_transforms`` steps, each an affine autoregressive map whose shift and
    log-scale come from a MADE network reading z_{t−1} and h (Pyro's ``ConditionalAffineAutoregressive``)::

        z_0 = μ + σ ⊙ ε,   z_t = m_t + exp(l_t) ⊙ z_{t−1},   [m_t, l_t] = MADE_t(z_{t−1}, h)
        log q(z_T|x) = log N(z_0; μ, diag σ²) − Σ_t Σ_i l_{t,i}

    with m_{t,i}, l_{t,i} depending on the components of z_{t−1} before i only, orders reversed
    between steps; MADE_t (hidden sizes ``flow_hidden``, default 3D + 1, the encoder's ``activation``,
    ELU in Kingma et al.'s code) reads h in its first layer, as the paper's autoregressive networks add
    the context to their first hidden layer. The Jacobian
    ∂z_t/∂z_{t−1} is triangular with diagonal exp(l_t), hence the log-determinant Σ_i l_{t,i}
    (tested against autograd's Jacobian).

    Initialization at the identity. Each MADE's output layer starts at zero, so every step starts as
    z_t = z_{t−1} and q(z|x) starts as the diagonal Gaussian base, as in Kingma et al.'s code (whose
    steps are z ↦ (z − 0.1 m)/exp(0.1 l), the outputs scaled down so that each step starts near the
    identity). The flow then only adds to what the diagonal guide does, and its log-scales learn at the
    rate of the rest of the network.

    Why it once lost to the diagonal guide. Its steps were the paper's gated form (eq. 14, kept as
    ``gated=True``, Pyro's ``stable=True``): z_t = s_t ⊙ z_{t−1} + (1 − s_t) ⊙ m_t with
    s_t = sigmoid(a_t + 2). The +2 (the paper's advice, s "close to 1") makes every step start as a
    contraction by s ≈ 0.88 plus a shift by 12 % of an untrained network's output, so the guide starts
    away from its base; and a scale s ∈ (0, 1) cannot grow a coordinate and learns through log s, whose
    slope d log s / da = 1 − s ≈ 0.12 is an eighth of a free log-scale's. The flow's scales hardly
    moved while the base network made up for them, and the guide trained slower than the diagonal one
    it contains (``benchmarks/quality.py --configs iaf iaf-gated``). With ``gated=True`` the output
    layer starts at zero as well (m = 0, s = sigmoid(2)).

    Sampling and the density of a sample the guide drew cost one pass per step; the density at any
    other point (e.g. under ``iwae-dreg``) inverts each step in D passes. A ``TransformedDistribution``:
    no closed-form KL (the ELBO's KL term is Monte Carlo), and no ``mean``. Site ``z``, batch (N,), event (D,).
    """

    def __init__(self, data_dim: int, latent_dim: int, hidden: Sequence[int] = (400,), activation: str = "elu",
                 num_transforms: int = 2, context_dim: int | None = None, flow_hidden: Sequence[int] | None = None,
                 gated: bool = False, site: str = "z", make_net: Callable[[int], nn.Module] | None = None):
        super().__init__()
        if latent_dim < 2:
            raise PyrovaeError(f"the IAF guide needs a latent dimension of at least 2, got {latent_dim}: use the diagonal guide")
        if not isinstance(num_transforms, int) or isinstance(num_transforms, bool) or num_transforms < 1:
            raise PyrovaeError(f"the IAF guide's number of transforms must be a positive whole number, got {num_transforms!r}")
        if context_dim is not None and (not isinstance(context_dim, int) or isinstance(context_dim, bool) or context_dim < 1):
            raise PyrovaeError(f"the IAF guide's context_dim must be a positive whole number, got {context_dim!r}")
        if activation not in ACTIVATIONS:
            raise PyrovaeError(f"unknown activation {activation!r}; known: {', '.join(ACTIVATIONS)}")
        if not isinstance(gated, bool):
            raise PyrovaeError(f"the IAF guide's gated must be true or false, got {gated!r}")
        self.latent_dim = latent_dim
        self.context_dim = context_dim or latent_dim
        self.site = site
        out_dim = 2 * latent_dim + self.context_dim
        self.net = make_net(out_dim) if make_net else mlp([data_dim, *hidden, out_dim], activation)
        flow_hidden = list(flow_hidden) if flow_hidden else [3 * latent_dim + 1]
        identity = torch.arange(latent_dim)
        self.gated = gated
        self.flows = nn.ModuleList(
            ConditionalAffineAutoregressive(
                ConditionalAutoRegressiveNN(latent_dim, self.context_dim, flow_hidden,
                                            permutation=identity if t % 2 == 0 else identity.flip(0),
                                            nonlinearity=ACTIVATIONS[activation]()),
                stable=gated,
            )
            for t in range(num_transforms)
        )
        with torch.no_grad():  # each step starts at the identity (gated: at s = sigmoid(2), m = 0)
            for flow in self.flows:
                output = flow.nn.layers[-1]
                output.weight.zero_()
                output.bias.zero_()

    def base(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (..., P) → μ (..., D), σ (..., D), context h (..., H)."""
        D = self.latent_dim
        out = self.net(x)
        return out[..., :D], F.softplus(out[..., D : 2 * D]) + MIN_SCALE, out[..., 2 * D :]

    def distribution(self, x: torch.Tensor) -> dist.TransformedDistribution:
        """q(z|x) for x (N, P): batch (N,), event (D,). The transforms are made afresh for each call.

        Not named ``posterior``: the VampPrior, which evaluates q at every pseudo-input for every z,
        takes only guides whose density costs one pass anywhere.
        """
        loc, scale, context = self.base(x)
        transforms = [flow.condition(context) for flow in self.flows]
        return dist.TransformedDistribution(dist.Normal(loc, scale).to_event(1), transforms)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        register(self)
        return pyro.sample(self.site, self.distribution(x))


__all__ = ["IAFEncoder"]
