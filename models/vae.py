"""The variational autoencoder of Kingma & Welling (2014) as a Pyro model and guide.

Generative model::

    z_n ~ p(z)                       prior (default N(0, I))
    x_n ~ p(x | decoder_θ(z_n))      likelihood (Bernoulli or continuous Bernoulli)

Guide: q_φ(z_n | x_n) = N(μ_φ(x_n), diag σ_φ(x_n)²). Site shapes for a batch x (N, P):
``z`` batch (N,) event (D,); ``x`` batch (N,) event (P,).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import pyro
import torch
from torch import nn

from pyrovae.guides import GUIDES
from pyrovae.nn import mlp, register

from .likelihoods import LIKELIHOODS
from .priors import PRIORS


@dataclass
class VAEConfig:
    data_dim: int  # P, pixels per image
    latent_dim: int = 50  # D
    hidden: tuple[int, ...] = (400,)  # decoder hidden sizes; the encoder mirrors them
    activation: Literal["relu", "tanh", "softplus", "elu"] = "relu"
    likelihood: str = "bernoulli"  # see LIKELIHOODS.names()
    prior: str = "normal"  # see PRIORS.names()
    guide: str = "diagonal"  # see GUIDES.names()

    def to_dict(self) -> dict:
        return {"name": "vae", **asdict(self), "hidden": list(self.hidden)}

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        d = {k: v for k, v in d.items() if k != "name"}
        return cls(**{**d, "hidden": tuple(d.get("hidden", cls.hidden))})


class VAE(nn.Module):
    """A VAE whose ``model(x)`` and ``guide(x)`` are Pyro programs; see the module docstring.

    The decoder is registered with Pyro's param store (``pyrovae.nn.register``) in ``model``,
    the encoder in ``guide``, each under its own name, so ``SVI`` trains every parameter and two
    VAEs in one process never share parameters.
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, prior: nn.Module, likelihood: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.prior = prior
        self.likelihood = likelihood

    def model(self, x: torch.Tensor) -> torch.Tensor:
        register(self.decoder)
        with pyro.plate("data", x.shape[0]):
            z = self.prior()
            return self.likelihood(self.decoder(z), x)

    def guide(self, x: torch.Tensor) -> torch.Tensor:
        with pyro.plate("data", x.shape[0]):
            return self.encoder(x)


def build_vae(config: VAEConfig) -> VAE:
    """The VAE a config describes: MLP decoder D → hidden → P (× the likelihood's parameters per
    value), and the guide, prior and likelihood named in it, built through their registries."""
    likelihood = LIKELIHOODS.build(config.likelihood, data_dim=config.data_dim)
    out_dim = config.data_dim * getattr(likelihood, "params_per_dim", 1)
    encoder = GUIDES.build(config.guide, data_dim=config.data_dim, latent_dim=config.latent_dim,
                           hidden=config.hidden[::-1], activation=config.activation)
    return VAE(
        encoder=encoder,
        decoder=mlp([config.latent_dim, *config.hidden, out_dim], config.activation),
        prior=PRIORS.build(config.prior, latent_dim=config.latent_dim, data_dim=config.data_dim, encoder=encoder),
        likelihood=likelihood,
    )


def vae(
    data_dim: int,
    image_shape: tuple[int, ...] | None = None,
    latent_dim: int = 50,
    hidden: tuple[int, ...] = (400,),
    activation: str = "relu",
    likelihood: str = "bernoulli",
    prior: str = "normal",
    guide: str = "diagonal",
) -> VAE:
    """The built-in VAE as a model factory (``pyrovae train --model pyrovae.models:vae``, the default).

    Called as every factory is, ``vae(data_dim=P, image_shape=(C, H, W) or None, **model_args)``;
    the other arguments are the fields of :class:`VAEConfig`.
    """
    return build_vae(VAEConfig(data_dim, latent_dim, tuple(hidden), activation, likelihood, prior, guide))
