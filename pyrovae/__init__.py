"""pyrovae: variational autoencoders as Pyro programs.

Train a (model, guide) pair with SVI, draw from it, and estimate its evidence per data point
with the standard error and the diagnostics that say how far to trust each number.
"""

__version__ = "0.1.0"
