"""A VAE whose encoder is a Laplace distribution, q(z|x) = Π_d Laplace(z_d; μ_d(x), b_d(x)).

    pyrovae train --model examples/models/laplace_guide.py:laplace_vae
"""

import pyro
import pyro.distributions as dist
import torch.nn.functional as F
from torch import nn

from pyrovae.models import vae
from pyrovae.nn import mlp, register


class LaplaceEncoder(nn.Module):
    """Site ``z``: batch (N,), event (D,); all latents local to each data point."""

    def __init__(self, data_dim, latent_dim, hidden=(256,)):
        super().__init__()
        self.net = mlp([data_dim, *hidden, 2 * latent_dim])

    def forward(self, x):
        register(self)  # pyro.module under a name of its own, so that SVI trains it
        loc, raw_scale = self.net(x).chunk(2, dim=-1)
        return pyro.sample("z", dist.Laplace(loc, F.softplus(raw_scale) + 1e-4).to_event(1))


def laplace_vae(data_dim, image_shape=None, latent_dim=16, hidden=(256,)):
    model = vae(data_dim, image_shape, latent_dim=latent_dim, hidden=hidden)
    model.encoder = LaplaceEncoder(data_dim, latent_dim, hidden)
    return model
