"""A VAE for real-valued data: x ~ N(decoder(z), σ² I) with one learned scale σ, a bare ``pyro.param``.

    pyrovae train --dataset my_vectors.npy --model examples/models/gaussian_likelihood.py:gaussian_vae
"""

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from torch import nn

from pyrovae.models import vae


class GaussianLikelihood(nn.Module):
    """Site ``x``: batch (N,), event (P,); σ is trained like every other parameter."""

    def forward(self, loc, x):
        scale = pyro.param("obs_scale", lambda: torch.ones((), device=x.device), constraint=constraints.positive)
        return pyro.sample("x", dist.Normal(loc, scale).to_event(1), obs=x)


def gaussian_vae(data_dim, image_shape=None, latent_dim=16, hidden=(256,)):
    model = vae(data_dim, image_shape, latent_dim=latent_dim, hidden=hidden)
    model.likelihood = GaussianLikelihood()
    return model
