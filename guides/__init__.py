"""Inference networks q_φ(z|x): Pyro guides that sample every latent site of their model.

``GUIDES`` maps a name to a constructor called with the keyword arguments it accepts among
``data_dim``, ``latent_dim``, ``hidden``, ``activation`` and ``make_net`` (a function
``out_dim ↦ network x ↦ (..., out_dim)``, for encoders other than the default MLP), and with the
user's options (its other keyword arguments, e.g. the IAF's ``num_transforms``: ``--guide-arg``). A guide whose
q(z|x) has a density at any point in one network pass offers it as ``posterior(x)``; the
VampPrior needs one.
"""

from pyrovae.registry import Registry

from .flows import IAFEncoder
from .gaussian import DiagonalGaussianEncoder, FullCovarianceGaussianEncoder
from .linear import LinearGaussianGuide

GUIDES = Registry("guide", context=("data_dim", "latent_dim", "hidden", "activation", "make_net", "site"))
GUIDES.register("diagonal")(DiagonalGaussianEncoder)
GUIDES.register("full-covariance")(FullCovarianceGaussianEncoder)
GUIDES.register("iaf")(IAFEncoder)

__all__ = ["GUIDES", "DiagonalGaussianEncoder", "FullCovarianceGaussianEncoder", "IAFEncoder", "LinearGaussianGuide"]
