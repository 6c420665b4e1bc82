"""Runtime settings shared by the engine's own loops (training and evaluation)."""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import pyro

from .nn import skip_registration


@contextmanager
def fast_context():
    """Settings for the engine's own loops: no per-call validation of distribution arguments (the
    data are checked once when loaded), and no param-store registration (the optimizer holds the
    parameters)."""
    with pyro.validation_enabled(False), skip_registration(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Encountered NaN", category=UserWarning)  # train_step reports it
        yield
