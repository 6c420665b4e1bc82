"""Inference networks q_φ(z|x): Pyro guides that sample every latent site of their model.

``GUIDES`` maps a name to a constructor called with the keyword arguments it accepts among
``data_dim``, ``latent_dim``, ``hidden`` and ``activation``.
"""

from pyrovae.registry import Registry

from .gaussian import DiagonalGaussianEncoder
from .linear import LinearGaussianGuide

GUIDES = Registry("guide")
GUIDES.register("diagonal")(DiagonalGaussianEncoder)

__all__ = ["GUIDES", "DiagonalGaussianEncoder", "LinearGaussianGuide"]
