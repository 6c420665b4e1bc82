"""A VAE with a Student-t prior, p(z) = Π_d StudentT(z_d; ν, 0, 1): heavier tails than N(0, I).

    pyrovae train --model examples/models/student_t_prior.py:student_t_vae --model-arg df=3
"""

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyrovae.models import vae


class StudentTPrior(nn.Module):
    """Site ``z``: batch (N,) from the model's data plate, event (D,)."""

    def __init__(self, latent_dim: int, df: float):
        super().__init__()
        self.register_buffer("df", torch.tensor(float(df)))
        self.register_buffer("loc", torch.zeros(latent_dim))

    def forward(self):
        return pyro.sample("z", dist.StudentT(self.df, self.loc, 1.0).to_event(1))


def student_t_vae(data_dim, image_shape=None, df=3.0, latent_dim=16, hidden=(256,)):
    model = vae(data_dim, image_shape, latent_dim=latent_dim, hidden=hidden)
    model.prior = StudentTPrior(latent_dim, df)
    return model
