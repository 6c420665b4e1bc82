"""Likelihoods p_θ(x|z): Pyro programs ``likelihood(out, x)`` that observe site ``x``.

Each is called inside the model's ``pyro.plate("data", N)`` with the decoder's output ``out``
(..., N, P × params_per_dim) and the data ``x`` (N, P); the site has batch (N,) and event (P,).
A likelihood with more than one parameter per value declares ``params_per_dim`` and reads ``out``
parameter-major (``out.chunk(params_per_dim, -1)``). ``binary_data`` says whether it needs binary
data (the command line then binarizes). ``data_bounds`` is the interval the data lie in, or None
for real values (the VampPrior keeps its pseudo-inputs there).

``output_bias(x)`` (where a likelihood has one) is the decoder output, (P × params_per_dim,), whose
distribution fits each value's marginal over the data ``x`` (N, P) — the best a decoder that
ignores z can do. A model starts its decoder's output bias there (:meth:`VAE.initialize`), as
Burda et al. (2016) do: with the bias at 0 a Bernoulli decoder starts at p = 0.5 for every pixel,
and its first steps spend the hidden layers on drawing the mean image (see :mod:`pyrovae.models.vae`).

References:
    Loaiza-Ganem & Cunningham (2019), *The continuous Bernoulli: fixing a pervasive error in variational autoencoders*.
    Salimans, Karpathy, Chen & Kingma (2017), *PixelCNN++* (the discretized logistic).
    Kingma, Salimans, Jozefowicz, Chen, Sutskever & Welling (2016), *Improved variational inference with inverse autoregressive flow*.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions import constraints
from torch.distributions.utils import broadcast_all
from torch import nn

from pyrovae.errors import PyrovaeError
from pyrovae.nn import register
from pyrovae.registry import Registry

LIKELIHOODS: Registry[nn.Module] = Registry("likelihood", context=("data_dim",))

MIN_SCALE = 1e-3  # floor of learned observation scales: a Gaussian density is unbounded as σ → 0
LEVELS = 256  # 8-bit values k / 255, k = 0 … 255
_SOFTPLUS_OF_ONE = math.log(math.e - 1)  # softplus(0.5413…) = 1


def _positive(raw: torch.Tensor, floor: float = MIN_SCALE) -> torch.Tensor:
    return F.softplus(raw) + floor


LOGIT_CLIP = 1e-3  # the data's mean is clipped to [0.001, 0.999] before its logit (Burda et al. 2016)


def _mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of each value over the data points, (P,)."""
    return x.reshape(-1, x.shape[-1]).mean(0)


class Bernoulli(nn.Module):
    """x_p ~ Bernoulli(sigmoid(logits_p)) for binary pixels."""

    binary_data = True
    data_bounds = (0.0, 1.0)

    def output_bias(self, x: torch.Tensor) -> torch.Tensor:
        """logit of each pixel's mean, the mean clipped to [0.001, 0.999]: the maximum-likelihood
        Bernoulli per pixel when z is ignored."""
        mean = _mean(x).clamp(LOGIT_CLIP, 1 - LOGIT_CLIP)
        return torch.log(mean) - torch.log1p(-mean)

    def forward(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)


class ContinuousBernoulli(nn.Module):
    """x_p ~ ContinuousBernoulli(sigmoid(logits_p)) for grey levels in [0, 1] (Loaiza-Ganem & Cunningham, 2019).

    A normalized density on [0, 1], unlike the Bernoulli applied to grey levels.
    """

    binary_data = False
    data_bounds = (0.0, 1.0)

    def forward(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return pyro.sample("x", dist.ContinuousBernoulli(logits=logits).to_event(1), obs=x)


# ---------------------------------------------------------------- Gaussian, for real-valued data


class Gaussian(nn.Module):
    """Gaussian with a fixed scale for real-valued data: x_p ~ N(μ_p, σ²), μ = the decoder's output.

    log p(x|z) = −½ Σ_p (x_p − μ_p)²/σ² − P log σ − (P/2) log 2π. σ = 1 by default (standardized
    data); for other data pick σ, or learn it (``gaussian-shared``, ``gaussian-pixel``).
    """

    binary_data = False

    data_bounds = None

    def __init__(self, scale: float = 1.0):
        super().__init__()
        if not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale > 0):
            raise PyrovaeError(f"the Gaussian likelihood's scale must be a positive number, got {scale!r}")
        self.register_buffer("scale", torch.tensor(float(scale)))  # follows .to(device) and .double()

    def output_bias(self, x: torch.Tensor) -> torch.Tensor:
        """Each value's mean: the maximum-likelihood μ when z is ignored."""
        return _mean(x)

    def forward(self, loc: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return pyro.sample("x", dist.Normal(loc, self.scale).to_event(1), obs=x)


class GaussianSharedScale(nn.Module):
    """Gaussian with one learned scale shared by all values: x_p ~ N(μ_p, σ²), σ a parameter.

    σ = softplus(s) + 10⁻³ (1 at initialization); the floor keeps the density bounded.
    """

    binary_data = False
    data_bounds = None
    output_bias = Gaussian.output_bias

    def __init__(self):
        super().__init__()
        self.raw_scale = nn.Parameter(torch.tensor(_SOFTPLUS_OF_ONE))

    def forward(self, loc: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        register(self)
        return pyro.sample("x", dist.Normal(loc, _positive(self.raw_scale)).to_event(1), obs=x)


class GaussianPixelScale(nn.Module):
    """Gaussian with a learned scale per value (pixel): x_p ~ N(μ_p, σ_p²), σ a parameter vector (P,).

    σ_p = softplus(s_p) + 10⁻³ (1 at initialization), the same for every data point.
    """

    binary_data = False
    data_bounds = None
    output_bias = Gaussian.output_bias

    def __init__(self, data_dim: int):
        super().__init__()
        self.raw_scale = nn.Parameter(torch.full((data_dim,), _SOFTPLUS_OF_ONE))

    def forward(self, loc: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        register(self)
        return pyro.sample("x", dist.Normal(loc, _positive(self.raw_scale)).to_event(1), obs=x)


# ---------------------------------------------------------------- 8-bit values


class _EightBit(constraints.Constraint):
    """Values k / 255 for k = 0 … 255."""

    is_discrete = True
    event_dim = 0

    def check(self, value: torch.Tensor) -> torch.Tensor:
        k = value * (LEVELS - 1)
        return (value >= 0) & (value <= 1) & ((k - k.round()).abs() < 1e-3)

    def __repr__(self) -> str:
        return "EightBit()"


eight_bit = _EightBit()


def _log1mexp(d: torch.Tensor) -> torch.Tensor:
    """log(1 − eᵈ) for d < 0, accurate at both ends (Mächler, 2012); both branches finite, so no nan gradients."""
    cut = -math.log(2)
    return torch.where(d > cut, torch.log(-torch.expm1(d.clamp(min=cut))), torch.log1p(-torch.exp(d.clamp(max=cut))))


class DiscretizedLogistic(dist.TorchDistribution):
    """A logistic distribution rounded to the 256 values k/255 of 8-bit data (Salimans et al., 2017).

    With u ~ Logistic(μ, s) and bins of half-width h = 1/510 around each value v::

        P(v) = σ((v + h − μ)/s) − σ((v − h − μ)/s)     for 0 < v < 1
        P(0) = σ((h − μ)/s),  P(1) = 1 − σ((1 − h − μ)/s)

    which telescope to a sum of exactly 1 over the 256 values. Interior bins are computed as
    log σ(a) + log(1 − e^{−(a−b)}) − softplus(b), where a − b = 2h/s exactly: no cancellation
    in either tail. Batch shape is the broadcast of μ and s; no event dimensions.
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    support = eight_bit
    has_rsample = False

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor, validate_args=None):
        self.loc, self.scale = broadcast_all(loc, scale)
        super().__init__(self.loc.shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(DiscretizedLogistic, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc, new.scale = self.loc.expand(batch_shape), self.scale.expand(batch_shape)
        super(DiscretizedLogistic, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        h = 0.5 / (LEVELS - 1)
        a = (value + h - self.loc) / self.scale
        b = (value - h - self.loc) / self.scale
        interior = F.logsigmoid(a) + _log1mexp(-2 * h / self.scale) - F.softplus(b)
        return torch.where(value < h, F.logsigmoid(a), torch.where(value > 1 - h, -F.softplus(b), interior))

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            u = torch.rand(shape, dtype=self.loc.dtype, device=self.loc.device).clamp(1e-12, 1 - 1e-12)
            logistic = self.loc + self.scale * (torch.log(u) - torch.log1p(-u))
            return (logistic * (LEVELS - 1)).round().clamp(0, LEVELS - 1) / (LEVELS - 1)

    def levels(self) -> torch.Tensor:
        """The 256 values k/255, (256,), in the distribution's dtype and device."""
        return torch.arange(LEVELS, dtype=self.loc.dtype, device=self.loc.device) / (LEVELS - 1)

    def probs(self) -> torch.Tensor:
        """P(v) for every value v, batch_shape + (256,)."""
        per_level = DiscretizedLogistic(self.loc.unsqueeze(-1), self.scale.unsqueeze(-1), validate_args=False)
        return per_level.log_prob(self.levels()).exp()

    @property
    def mean(self) -> torch.Tensor:
        return (self.probs() * self.levels()).sum(-1)

    @property
    def variance(self) -> torch.Tensor:
        return (self.probs() * (self.levels() - self.mean.unsqueeze(-1)) ** 2).sum(-1)


class DiscretizedLogisticLikelihood(nn.Module):
    """Discretized logistic for 8-bit images, values k/255 in [0, 1] (as in PixelCNN++ and IAF).

    x_p ~ DiscretizedLogistic(μ_p, s_p) (see :class:`DiscretizedLogistic`): a proper probability
    over the 256 levels of each pixel, so −log p(x) / (P log 2) is in bits per dimension. The decoder
    gives two values per pixel (``params_per_dim = 2``): μ_p, and s_p = softplus(·) + 10⁻³.
    """

    binary_data = False
    data_bounds = (0.0, 1.0)
    params_per_dim = 2

    def output_bias(self, x: torch.Tensor) -> torch.Tensor:
        """μ_p at each value's mean, s_p at its initial softplus(0) + 10⁻³: (2P,), parameter-major."""
        mean = _mean(x)
        return torch.cat([mean, torch.zeros_like(mean)])

    def forward(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        loc, raw_scale = out.chunk(2, dim=-1)
        return pyro.sample("x", DiscretizedLogistic(loc, _positive(raw_scale)).to_event(1), obs=x)


LIKELIHOODS.register("bernoulli")(Bernoulli)
LIKELIHOODS.register("continuous-bernoulli")(ContinuousBernoulli)
LIKELIHOODS.register("gaussian")(Gaussian)
LIKELIHOODS.register("gaussian-shared")(GaussianSharedScale)
LIKELIHOODS.register("gaussian-pixel")(GaussianPixelScale)
LIKELIHOODS.register("discretized-logistic")(DiscretizedLogisticLikelihood)
