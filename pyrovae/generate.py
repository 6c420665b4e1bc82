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

from .traces import guide_means, observed_mean


@torch.no_grad()
def sample_prior(model: Callable, like: torch.Tensor, n: int) -> torch.Tensor:
    """n draws z ~ p(z), decoded: the mean of p(x | z), (n, P). ``like`` (·, P) gives P, dtype and device."""
    x = like.new_zeros(n, like.shape[-1])
    return observed_mean(model, x)


@torch.no_grad()
def sample_per_class(model: Callable, like: torch.Tensor, n: int, num_classes: int) -> torch.Tensor:
    """n draws per class c = 0 … C−1 of a model written ``model(x, y)``, z ~ p(z), decoded with y = c:
    the mean of p(x | z, y), (C · n, P), class by class."""
    x = like.new_zeros(n, like.shape[-1])
    return torch.cat([observed_mean(model, x, None, torch.full((n,), c, dtype=torch.long, device=like.device))
                      for c in range(num_classes)])


@torch.no_grad()
def reconstruct(model: Callable, guide: Callable, x: torch.Tensor) -> torch.Tensor:
    """E[x | z = mean of q(z | x)] for each row of x: (N, P) → (N, P)."""
    return observed_mean(model, x, guide_means(guide, x))


@torch.no_grad()
def interpolate(model: Callable, guide: Callable, x_a: torch.Tensor, x_b: torch.Tensor, steps: int = 10) -> torch.Tensor:
    """Decode the straight line between the posterior means of x_a and x_b (each (P,)): (steps, P)."""
    pair = torch.stack([x_a, x_b])
    ends = guide_means(guide, pair)
    t = torch.linspace(0, 1, steps, dtype=pair.dtype, device=pair.device)[:, None]
    line = {name: (1 - t) * z[0] + t * z[1] if z.is_floating_point() else z[0].expand(steps, *z.shape[1:])  # a class: x_a's
            for name, z in ends.items()}
    return observed_mean(model, pair.new_zeros(steps, pair.shape[-1]), line)
