"""A VAE whose prior is a Gaussian mixture written with its component index, summed out by enumeration:

    c_n ~ Categorical(π)                  site c: batch (N,), marked infer={"enumerate": "parallel"}
    z_n | c_n ~ N(μ_c, diag σ_c²)         site z: batch (N,), event (D,)
    x_n ~ Bernoulli(decoder(z_n))         as the built-in VAE

The guide draws z only; pyrovae trains with TraceEnum_ELBO (c summed out exactly) and evaluates with
log p(z) = log Σ_c π_c N(z; μ_c, σ_c²) in every importance weight: the same model as the built-in
``--prior mixture`` (a ``MixtureSameFamily``), written the way a new discrete prior is written.

    pyrovae train --model examples/models/enumerated_mixture.py:mixture_vae --model-arg components=10
"""

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.nn import functional as F

from pyrovae.models import vae
from pyrovae.nn import register


class EnumeratedMixturePrior(nn.Module):
    """K learned components (means, softplus scales, mixing logits) and an explicit component site."""

    def __init__(self, latent_dim: int, components: int):
        super().__init__()
        self.locs = nn.Parameter(torch.randn(components, latent_dim))
        self.raw_scales = nn.Parameter(torch.full((components, latent_dim), 0.5413))  # softplus → 1
        self.logits = nn.Parameter(torch.zeros(components))

    def forward(self):
        register(self)
        c = pyro.sample("c", dist.Categorical(logits=self.logits), infer={"enumerate": "parallel"})
        scale = F.softplus(self.raw_scales) + 1e-4
        return pyro.sample("z", dist.Normal(self.locs[c], scale[c]).to_event(1))


def mixture_vae(data_dim, image_shape=None, components=10, latent_dim=16, hidden=(256,)):
    model = vae(data_dim, image_shape, latent_dim=latent_dim, hidden=hidden)
    model.prior = EnumeratedMixturePrior(latent_dim, components)
    return model
