"""A VAE with two stochastic layers: the architecture of Burda, Grosse & Salakhutdinov (2016, §5).

Generative model (top-down), for MNIST 784-(200-200)-100-(100-100)-50 in the paper's notation::

    z1 ~ N(0, I_50)                                    site "z1", the top layer
    z2 | z1 ~ N(μ(z1), diag σ(z1)²)                    site "z2"; MLP 50 → 100 → 100 → 2·100
    x | z2 ~ p(x | decoder(z2))                        site "x"; MLP 100 → 200 → 200 → P (× params per value)

Guide (bottom-up, as in the paper)::

    q(z2 | x) = N(μ(x), diag σ(x)²)                    MLP P → 200 → 200 → 2·100
    q(z1 | z2) = N(μ(z2), diag σ(z2)²)                 MLP 100 → 100 → 100 → 2·50

All layer sizes are arguments; σ = softplus(·) + 1e-4. The guide samples z2 before z1, the reverse
of the model's order: q(z1 | z2) conditions on a descendant of z1, so the closed-form KL of site z2,
KL(q(z2|x) ‖ p(z2|z1)) with z1 held fixed, is not that site's term of the ELBO (z1 is drawn from
q(z1|z2), after z2); ``TraceMeanField_ELBO``'s analytic KL per site does not apply (Pyro warns),
while ``Trace_ELBO`` and the IWAE bound do. Sites have batch (N,) inside ``pyro.plate("data", N)``
and event (D_s,).

Why the top layer went dead, and what keeps it alive. The top layer pays KL(q(z1|z2) ‖ N(0, I)) and
earns only what it improves p(z2 | z1) over a z1-free diagonal Gaussian: it is useful only where the
codes z2 the guide draws, taken over the data, are spread in a way (correlated, not Gaussian) that a
diagonal Gaussian fits badly. Near the state where q(z1|z2) ignores z2 and p(z2|z1) ignores z1, the
gain is the product of two small couplings (q reading z2, p reading z1) while each costs on its own
(KL for the first, noise in p(z2|z1) for the second): that state is a local optimum, as the
zero-loading solution of a factor model is for nearly uncorrelated data. Two things put the model
there:

1. The plateau. With tanh units and the decoder's output bias at 0 the decoder saturates its hidden
   units to draw the mean image and stops reading z2 (see :mod:`pyrovae.models.vae`); z2 carries
   nothing, and q(z1|z2) settles on N(0, I) and p(z2|z1) stops reading z1 before z2 comes alive.
   The defaults avoid it: ELU units, and :meth:`TwoLayerVAE.initialize` (the output bias at the
   data's logit mean, as in Burda et al.'s code), called once on a new model before its first step.
   (``activation="tanh"``, the paper's network, needs the initialization.)
2. The full KL from the first step. While the top layer finds its footing, z2 carries little, and
   the KL at z2 then rewards a bottom encoder whose codes a diagonal p(z2) fits — which keeps the
   top layer unnecessary. KL warm-up (Sønderby et al. 2016; ``--warmup-epochs W``) scales the
   latent terms by β < 1 at first: z2 then carries much more, its spread is far from a diagonal
   Gaussian, and the top layer earns its KL before β reaches 1. The IWAE bound
   (``--objective iwae --particles 5``) also keeps more units active (Burda et al. 2016, §5.2).

The paper's schedule: Adam at 10⁻³·10^(−i/7) for 3^i epochs, i = 0 … 7 (3280 epochs), batch 20 in
their code, the same for one and two layers (``benchmarks/quality.py --full --batch-size 20``).

References:
    Burda, Grosse & Salakhutdinov (2016), *Importance weighted autoencoders*.
    Sønderby, Raiko, Maaløe, Sønderby & Winther (2016), *Ladder variational autoencoders* (warm-up).
"""

from __future__ import annotations

from typing import Sequence

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

from pyrovae.errors import PyrovaeError
from pyrovae.nn import mlp, register

from .likelihoods import LIKELIHOODS
from .priors import StandardNormal
from .networks import initialize_output_bias

MIN_SCALE = 1e-4


class GaussianLayer(nn.Module):
    """A conditional diagonal Gaussian N(μ(h), diag σ(h)²) with an MLP ``in → hidden → 2·out``."""

    def __init__(self, in_dim: int, out_dim: int, hidden: Sequence[int], activation: str):
        super().__init__()
        self.net = mlp([in_dim, *hidden, 2 * out_dim], activation)

    def forward(self, h: torch.Tensor) -> dist.TorchDistribution:
        loc, raw_scale = self.net(h).chunk(2, dim=-1)
        return dist.Normal(loc, F.softplus(raw_scale) + MIN_SCALE).to_event(1)


class TwoLayerVAE(nn.Module):
    """Two stochastic layers z1 (top) → z2 → x, with a bottom-up guide; see the module docstring."""

    def __init__(self, data_dim: int, top_dim: int = 50, bottom_dim: int = 100, hidden: Sequence[int] = (200, 200),
                 top_hidden: Sequence[int] = (100, 100), activation: str = "elu", likelihood: str = "bernoulli",
                 likelihood_args: dict | None = None):
        super().__init__()
        for name, value in (("top_dim", top_dim), ("bottom_dim", bottom_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PyrovaeError(f"{name} must be a positive whole number, got {value!r}")
        for name, sizes in (("hidden", hidden), ("top_hidden", top_hidden)):
            if not all(isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in sizes):
                raise PyrovaeError(f"{name} must be a list of positive whole numbers (layer sizes), got {list(sizes)!r}")
        self.likelihood = LIKELIHOODS.build(likelihood, likelihood_args, data_dim=data_dim)
        out_dim = data_dim * getattr(self.likelihood, "params_per_dim", 1)
        self.prior = StandardNormal(top_dim, site="z1")
        self.p_z2 = GaussianLayer(top_dim, bottom_dim, top_hidden, activation)
        self.decoder = mlp([bottom_dim, *hidden, out_dim], activation)
        self.q_z2 = GaussianLayer(data_dim, bottom_dim, hidden, activation)
        self.q_z1 = GaussianLayer(bottom_dim, top_dim, top_hidden, activation)

    def model(self, x: torch.Tensor) -> torch.Tensor:
        register(self.p_z2)
        register(self.decoder)
        with pyro.plate("data", x.shape[0]):
            z1 = self.prior()
            z2 = pyro.sample("z2", self.p_z2(z1))
            return self.likelihood(self.decoder(z2), x)

    def guide(self, x: torch.Tensor) -> None:
        register(self.q_z2)
        register(self.q_z1)
        with pyro.plate("data", x.shape[0]):
            z2 = pyro.sample("z2", self.q_z2(x))
            pyro.sample("z1", self.q_z1(z2))

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Data-dependent initialization before a new model's first step, x (N, P) the training
        data: the decoder's output bias at the data's marginal fit (the logit of each pixel's mean
        for a Bernoulli), as Burda et al. (2016) initialize theirs; see the module docstring."""
        initialize_output_bias(self.decoder, self.likelihood, x)


def two_layer(
    data_dim: int,
    image_shape: tuple[int, ...] | None = None,
    top_dim: int = 50,
    bottom_dim: int = 100,
    hidden: Sequence[int] = (200, 200),
    top_hidden: Sequence[int] = (100, 100),
    activation: str = "elu",
    likelihood: str = "bernoulli",
    likelihood_args: dict | None = None,
) -> TwoLayerVAE:
    """The two-stochastic-layer VAE of Burda, Grosse & Salakhutdinov (2016) as a model factory (``--model pyrovae.models:two_layer``).

    Sites ``z1`` (top, ``top_dim``) and ``z2`` (``bottom_dim``); ``hidden`` are the sizes between x
    and z2, ``top_hidden`` those between z2 and z1, on both sides. ELU units by default;
    ``activation="tanh"`` is the paper's network. ``likelihood_args`` are the likelihood's options.
    ``image_shape`` is not used.
    """
    hidden = (hidden,) if isinstance(hidden, int) else hidden
    top_hidden = (top_hidden,) if isinstance(top_hidden, int) else top_hidden
    return TwoLayerVAE(data_dim, top_dim, bottom_dim, tuple(hidden), tuple(top_hidden), activation, likelihood, likelihood_args)
