"""The variational autoencoder of Kingma & Welling (2014) as a Pyro model and guide.

Generative model::

    z_n ~ p(z)                       prior (default N(0, I))
    x_n ~ p(x | decoder_θ(z_n))      likelihood (default Bernoulli; see LIKELIHOODS)

Guide: q_φ(z_n | x_n), by default N(μ_φ(x_n), diag σ_φ(x_n)²). Site shapes for a batch x (N, P):
``z`` batch (N,) event (D,); ``x`` batch (N,) event (P,). The prior, likelihood and guide are
picked by name from their registries; the networks are MLPs, or convolutional for 28 × 28 images.
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass
from typing import Literal

import pyro
import torch
from torch import nn

from pyrovae.errors import PyrovaeError
from pyrovae.guides import GUIDES
from pyrovae.nn import mlp, register

from .likelihoods import LIKELIHOODS
from .networks import IMAGE_SHAPE, ConvDecoder, ConvEncoder, check_image_shape
from .priors import PRIORS

NETWORKS = ("mlp", "conv")


@dataclass
class VAEConfig:
    data_dim: int  # P, pixels per image
    latent_dim: int = 50  # D
    hidden: tuple[int, ...] = (400,)  # decoder hidden sizes; the encoder mirrors them
    activation: Literal["relu", "tanh", "softplus", "elu"] = "relu"
    likelihood: str = "bernoulli"  # see LIKELIHOODS.names()
    prior: str = "normal"  # see PRIORS.names()
    guide: str = "diagonal"  # see GUIDES.names()
    network: Literal["mlp", "conv"] = "mlp"  # conv: 28 × 28 single-channel images only

    def __post_init__(self):
        for name in ("data_dim", "latent_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PyrovaeError(f"{name} must be a positive whole number, got {value!r}")
        hidden = self.hidden
        if not isinstance(hidden, (list, tuple)) or not all(isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in hidden):
            raise PyrovaeError(f"hidden must be a list of positive whole numbers (layer sizes), got {hidden!r}")
        self.hidden = tuple(hidden)

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
    """The VAE a config describes: decoder D → hidden → P (× the likelihood's parameters per
    value), the encoder mirroring it, and the guide, prior and likelihood named in it, built
    through their registries. ``network="conv"`` puts convolutions next to the images on both
    sides (:class:`~pyrovae.models.networks.ConvEncoder`, :class:`~pyrovae.models.networks.ConvDecoder`)."""
    if config.network not in NETWORKS:
        raise PyrovaeError(f"unknown network {config.network!r}; known: {', '.join(NETWORKS)}")
    likelihood = LIKELIHOODS.build(config.likelihood, data_dim=config.data_dim)
    params_per_dim = getattr(likelihood, "params_per_dim", 1)
    hidden, activation = tuple(config.hidden), config.activation
    make_net = None
    if config.network == "conv":
        if config.data_dim != 784:
            raise PyrovaeError(f"network 'conv' needs images of shape {IMAGE_SHAPE} (784 values), got {config.data_dim} values: use network='mlp'")
        if "make_net" not in inspect.signature(GUIDES[config.guide]).parameters:
            raise PyrovaeError(f"guide {config.guide!r} takes no network (no make_net argument): use network='mlp'")
        make_net = lambda out_dim: ConvEncoder(out_dim, hidden[::-1], activation)  # noqa: E731
        decoder = ConvDecoder(config.latent_dim, hidden, activation, channels=params_per_dim)
    else:
        decoder = mlp([config.latent_dim, *hidden, config.data_dim * params_per_dim], activation)
    context = dict(data_dim=config.data_dim, latent_dim=config.latent_dim, hidden=hidden[::-1], activation=activation)
    encoder = GUIDES.build(config.guide, **context, **({"make_net": make_net} if make_net else {}))
    return VAE(
        encoder=encoder,
        decoder=decoder,
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
    network: str = "mlp",
) -> VAE:
    """The built-in VAE as a model factory (``pyrovae train --model pyrovae.models:vae``, the default).

    Called as every factory is, ``vae(data_dim=P, image_shape=(C, H, W) or None, **model_args)``;
    the other arguments are the fields of :class:`VAEConfig`. ``network="conv"`` needs
    ``image_shape=(1, 28, 28)``.
    """
    if network == "conv":
        check_image_shape(image_shape)
    return build_vae(VAEConfig(data_dim, latent_dim, (hidden,) if isinstance(hidden, int) else hidden, activation, likelihood, prior, guide, network))
