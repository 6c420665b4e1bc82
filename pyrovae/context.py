"""Runtime settings shared by the engine's own loops (training and evaluation)."""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import pyro
import torch

from .nn import skip_registration


_depth = 0  # flush_denormals blocks entered and not left (the engine's loops nest: an evaluation inside training)


@contextmanager
def flush_denormals():
    """Floats below the smallest normal number (≈ 1.2e-38 in float32) read and written as 0 on the
    CPU (``torch.set_flush_denormal``, where the processor supports it). Without it, Adam's moments
    of weights that rarely get a gradient (an MNIST encoder's border pixels) and units far in an
    activation's flat tail decay into that range, where each operation on them is far slower: the
    built-in M2's epoch on MNIST grew from 22 s to 74–82 s over 30 epochs on 2 threads, and a fused
    Adam step on its moments ran 4× slower on one thread. Values that small change no sum they are
    added to. Torch sets the flag for the calling thread only: with it, that M2 epoch (at epoch 35)
    took 39 s on one thread and 59 s on two, whose second thread keeps the denormals."""
    global _depth
    supported = torch.set_flush_denormal(True)  # False, with nothing changed, where it is not supported
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if supported and _depth == 0:  # the outermost one restores torch's default (it cannot report the setting it had)
            torch.set_flush_denormal(False)


@contextmanager
def fast_context():
    """Settings for the engine's own loops: no per-call validation of distribution arguments (the
    data are checked once when loaded), no param-store registration (the optimizer holds the
    parameters), and denormal floats flushed to zero (:func:`flush_denormals`)."""
    with pyro.validation_enabled(False), skip_registration(), flush_denormals(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Encountered NaN", category=UserWarning)  # train_step reports it
        yield
