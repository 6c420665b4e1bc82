"""Inference networks q_φ(z|x): Pyro guides that sample every latent site of their model."""

from .gaussian import DiagonalGaussianEncoder
from .linear import LinearGaussianGuide

__all__ = ["DiagonalGaussianEncoder", "LinearGaussianGuide"]
