"""Generative models p(z) p_θ(x|z) written as Pyro programs.

``MODELS`` maps the ``"name"`` in a run's config to a function building the model from it.
"""

from pyrovae.registry import Registry

from .likelihoods import LIKELIHOODS, Bernoulli, ContinuousBernoulli
from .linear_gaussian import PPCA, HierarchicalLinearGaussian, LinearGaussian
from .priors import PRIORS, StandardNormal
from .vae import VAE, VAEConfig, build_vae, vae

MODELS = Registry("model")
MODELS.register("vae")(lambda config: build_vae(VAEConfig.from_dict(config)))


def build_model(config: dict):
    """The model a config dict describes (``config["name"]`` picks the entry of ``MODELS``)."""
    return MODELS[config.get("name", "vae")](config)


__all__ = [
    "MODELS", "build_model", "VAE", "VAEConfig", "build_vae", "vae",
    "PRIORS", "StandardNormal", "LIKELIHOODS", "Bernoulli", "ContinuousBernoulli",
    "LinearGaussian", "PPCA", "HierarchicalLinearGaussian",
]
