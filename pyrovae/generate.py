"""Generation through the model/guide contract only: prior samples, reconstructions, interpolations.

Each returns the mean of the observed site's distribution (e.g. Bernoulli probabilities), which is
what a picture of a VAE shows; none of them knows the model's class or its site names.

Prior samples run ``model(x)`` on a placeholder batch of zeros shaped like the data: the latent
sites draw from the prior, and the placeholder is only the observed site's value, which is never
read (the picture is the mean of that site's distribution, not a score of the placeholder). A model
whose latent draws depend on the values of x breaks the contract anyway. Reconstructions and
interpolations replay the guide's means through the model (a draw at a site whose distribution has
no closed-form mean, such as a flow).
"""

from __future__ import annotations

from typing import Callable

import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from .evidence import _sample_sites


def _observed_mean(model: Callable, x: torch.Tensor, latents: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Run ``model(x)`` with its latent sites set to ``latents`` (or drawn from the prior where absent);
    return the mean of the observed site, shaped like ``x``."""
    program = poutine.condition(model, data=latents) if latents else model
    trace = poutine.trace(program).get_trace(x)
    observed = [site for _, site in _sample_sites(trace) if site["is_observed"] and site["name"] not in (latents or {})]
    return observed[0]["fn"].mean.expand(x.shape)


class _Means(Messenger):
    """Take the mean of each latent site's distribution instead of a draw (a draw where the
    distribution has no closed-form mean, e.g. a flow)."""

    def _pyro_sample(self, msg) -> None:
        if msg["value"] is None and not site_is_subsample(msg):
            try:
                msg["value"] = msg["fn"].mean
            except NotImplementedError:
                pass


def _guide_means(guide: Callable, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The mean of q at each latent site, each later site given the means of the earlier ones."""
    trace = poutine.trace(_Means()(guide)).get_trace(x)
    return {name: site["value"] for name, site in _sample_sites(trace)}


@torch.no_grad()
def sample_prior(model: Callable, like: torch.Tensor, n: int) -> torch.Tensor:
    """n draws z ~ p(z), decoded: the mean of p(x | z), (n, P). ``like`` (·, P) gives P, dtype and device."""
    x = like.new_zeros(n, like.shape[-1])
    return _observed_mean(model, x)


@torch.no_grad()
def reconstruct(model: Callable, guide: Callable, x: torch.Tensor) -> torch.Tensor:
    """E[x | z = mean of q(z | x)] for each row of x: (N, P) → (N, P)."""
    return _observed_mean(model, x, _guide_means(guide, x))


@torch.no_grad()
def interpolate(model: Callable, guide: Callable, x_a: torch.Tensor, x_b: torch.Tensor, steps: int = 10) -> torch.Tensor:
    """Decode the straight line between the posterior means of x_a and x_b (each (P,)): (steps, P)."""
    pair = torch.stack([x_a, x_b])
    ends = _guide_means(guide, pair)
    t = torch.linspace(0, 1, steps, dtype=pair.dtype, device=pair.device)[:, None]
    line = {name: (1 - t) * z[0] + t * z[1] for name, z in ends.items()}
    return _observed_mean(model, pair.new_zeros(steps, pair.shape[-1]), line)
