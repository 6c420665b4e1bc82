"""The variational autoencoder of Kingma & Welling (2014) as a Pyro model and guide.

Generative model::

    z_n ~ p(z)                       prior (default N(0, I))
    x_n ~ p(x | decoder_θ(z_n))      likelihood (default Bernoulli; see LIKELIHOODS)

Guide: q_φ(z_n | x_n), by default N(μ_φ(x_n), diag σ_φ(x_n)²). Site shapes for a batch x (N, P):
``z`` batch (N,) event (D,); ``x`` batch (N,) event (P,). The prior, likelihood and guide are
picked by name from their registries, each with its own options (``prior_args``, ``guide_args``,
``likelihood_args``); the networks are MLPs, or convolutional for 28 × 28 images.

Initialization and the plateau where the decoder ignores z. With its output bias at 0 a Bernoulli
decoder starts at p = 0.5 for every pixel. The first steps' gradient at the output, x − 0.5, has
the same sign for most pixels of every image, so the fastest descent draws the mean image; tanh
hidden units do part of that by saturating at ±1, and a saturated unit passes no gradient back to
z. The decoder then ignores z, the KL pulls q(z|x) to the prior, and the ELBO sits at the mean
image's (≈ −206 nats on MNIST) until the units come back — a plateau the standard normal prior
leaves within an epoch, and a prior without a fixed point there (the VampPrior, a second
stochastic layer) may never leave (see :class:`~pyrovae.models.VampPrior` and
:mod:`pyrovae.models.two_layer`). Two things keep a model off it: :meth:`VAE.initialize`, called once
on a new model before its first step, starts the output bias at the data's logit mean, as Burda et
al. (2016) do, so that common gradient is 0 from the first step; and the default activation, ELU
(Clevert et al., 2016), does not saturate for positive inputs (tanh remains the IWAE paper's choice,
``activation="tanh"``, and needs the initialization).
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import pyro
import torch
from torch import nn

from pyrovae.errors import PyrovaeError
from pyrovae.guides import GUIDES
from pyrovae.nn import mlp, register

from .likelihoods import LIKELIHOODS
from .networks import IMAGE_SHAPE, ConvDecoder, ConvEncoder, check_image_shape, initialize_output_bias
from .priors import PRIORS

NETWORKS = ("mlp", "conv")


@dataclass
class VAEConfig:
    data_dim: int  # P, pixels per image
    latent_dim: int = 50  # D
    hidden: tuple[int, ...] = (400,)  # decoder hidden sizes; the encoder mirrors them
    activation: Literal["relu", "tanh", "softplus", "elu"] = "elu"  # ELU: no saturation for positive inputs (see above)
    likelihood: str = "bernoulli"  # see LIKELIHOODS.names()
    prior: str = "normal"  # see PRIORS.names()
    guide: str = "diagonal"  # see GUIDES.names()
    network: Literal["mlp", "conv"] = "mlp"  # conv: 28 × 28 single-channel images only
    prior_args: dict[str, Any] = field(default_factory=dict)  # the prior's options, e.g. {"components": 50}
    guide_args: dict[str, Any] = field(default_factory=dict)  # the guide's options, e.g. {"num_transforms": 4}
    likelihood_args: dict[str, Any] = field(default_factory=dict)  # the likelihood's options, e.g. {"scale": 0.1}

    def __post_init__(self):
        for name in ("data_dim", "latent_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PyrovaeError(f"{name} must be a positive whole number, got {value!r}")
        hidden = self.hidden
        if not isinstance(hidden, (list, tuple)) or not all(isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in hidden):
            raise PyrovaeError(f"hidden must be a list of positive whole numbers (layer sizes), got {hidden!r}")
        self.hidden = tuple(hidden)
        for name in ("prior_args", "guide_args", "likelihood_args"):
            value = getattr(self, name)
            if value is None:
                setattr(self, name, {})
            elif not isinstance(value, dict):
                raise PyrovaeError(f"{name} must be a dictionary of a component's options (NAME: VALUE), got {value!r}")

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

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """Data-dependent initialization, once, before a new model's first step, x (N, P) the
        training data (grey levels where the data are binarized afresh: their mean is the same):
        the decoder's output bias at the data's marginal fit (:func:`initialize_output_bias`; see
        the module docstring for why), and the prior's own ``initialize(x)`` where it has one (the
        VampPrior's ``pseudo_init="data"``). Not for a model restored from a checkpoint."""
        initialize_output_bias(self.decoder, self.likelihood, x)
        if callable(getattr(self.prior, "initialize", None)):
            self.prior.initialize(x)


def build_vae(config: VAEConfig) -> VAE:
    """The VAE a config describes: decoder D → hidden → P (× the likelihood's parameters per
    value), the encoder mirroring it, and the guide, prior and likelihood named in it, built
    through their registries. ``network="conv"`` puts convolutions next to the images on both
    sides (:class:`~pyrovae.models.networks.ConvEncoder`, :class:`~pyrovae.models.networks.ConvDecoder`)."""
    if config.network not in NETWORKS:
        raise PyrovaeError(f"unknown network {config.network!r}; known: {', '.join(NETWORKS)}")
    likelihood = LIKELIHOODS.build(config.likelihood, config.likelihood_args, data_dim=config.data_dim)
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
    encoder = GUIDES.build(config.guide, config.guide_args, **context, **({"make_net": make_net} if make_net else {}))
    prior = PRIORS.build(config.prior, config.prior_args, latent_dim=config.latent_dim, data_dim=config.data_dim,
                         encoder=encoder, data_bounds=getattr(likelihood, "data_bounds", None))
    return VAE(encoder=encoder, decoder=decoder, prior=prior, likelihood=likelihood)


def vae(
    data_dim: int,
    image_shape: tuple[int, ...] | None = None,
    latent_dim: int = 50,
    hidden: tuple[int, ...] = (400,),
    activation: str = "elu",
    likelihood: str = "bernoulli",
    prior: str = "normal",
    guide: str = "diagonal",
    network: str = "mlp",
    prior_args: dict[str, Any] | None = None,
    guide_args: dict[str, Any] | None = None,
    likelihood_args: dict[str, Any] | None = None,
) -> VAE:
    """The built-in VAE as a model factory (``pyrovae train --model pyrovae.models:vae``, the default).

    Called as every factory is, ``vae(data_dim=P, image_shape=(C, H, W) or None, **model_args)``;
    the other arguments are the fields of :class:`VAEConfig`: ``prior_args``, ``guide_args`` and
    ``likelihood_args`` are the named component's options (``pyrovae list`` shows them; on the
    command line ``--prior-arg components=50``). ``network="conv"`` needs ``image_shape=(1, 28, 28)``.
    """
    if network == "conv":
        check_image_shape(image_shape)
    return build_vae(VAEConfig(data_dim, latent_dim, (hidden,) if isinstance(hidden, int) else hidden, activation, likelihood,
                               prior, guide, network, prior_args, guide_args, likelihood_args))
