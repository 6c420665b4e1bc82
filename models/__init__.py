"""Generative models p(z) p_θ(x|z) written as Pyro programs.

``MODELS`` maps the ``"name"`` in a run's config to a function building the model from it.
Components, each registered by name: ``PRIORS`` (priors.py), ``LIKELIHOODS`` (likelihoods.py),
networks (networks.py); guides are in :mod:`pyrovae.guides`.
"""

from pyrovae.registry import Registry

from .likelihoods import (
    LIKELIHOODS,
    Bernoulli,
    ContinuousBernoulli,
    DiscretizedLogistic,
    DiscretizedLogisticLikelihood,
    Gaussian,
    GaussianPixelScale,
    GaussianSharedScale,
)
from .linear_gaussian import PPCA, HierarchicalLinearGaussian, LinearGaussian
from .labelled import LabelledVAE, cvae, m2
from .networks import ConvDecoder, ConvEncoder
from .priors import PRIORS, FlowPrior, MixturePrior, StandardNormal, VampPrior
from .two_layer import TwoLayerVAE, two_layer
from .vae import VAE, VAEConfig, build_vae, vae

MODELS = Registry("model")


@MODELS.register("vae")
def _vae_from_config(config: dict) -> VAE:
    """The VAE of Kingma & Welling (2014) with the prior, likelihood, guide and networks named in its config."""
    return build_vae(VAEConfig.from_dict(config))


@MODELS.register("two_layer")  # the factory's name: --model pyrovae.models:two_layer
def _two_layer_from_config(config: dict) -> TwoLayerVAE:
    """The two-stochastic-layer VAE of Burda, Grosse & Salakhutdinov (2016), sites z1 (top) and z2."""
    return two_layer(**{k: v for k, v in config.items() if k != "name"})


def build_model(config: dict):
    """The model a config dict describes (``config["name"]`` picks the entry of ``MODELS``)."""
    return MODELS[config.get("name", "vae")](config)


__all__ = [
    "MODELS", "build_model", "VAE", "VAEConfig", "build_vae", "vae", "TwoLayerVAE", "two_layer",
    "PRIORS", "StandardNormal", "MixturePrior", "VampPrior", "FlowPrior",
    "LIKELIHOODS", "Bernoulli", "ContinuousBernoulli", "Gaussian", "GaussianSharedScale", "GaussianPixelScale",
    "DiscretizedLogistic", "DiscretizedLogisticLikelihood", "ConvEncoder", "ConvDecoder",
    "LinearGaussian", "PPCA", "HierarchicalLinearGaussian", "LabelledVAE", "m2", "cvae",
]
