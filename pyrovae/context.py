"""Runtime settings shared by the engine's own loops (training and evaluation)."""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import pyro
import torch

from .nn import skip_registration


_depth = 0  # flush_denormals blocks entered and not left (the engine's loops nest: an evaluation inside training)
_in_every_thread = False  # set by flush_denormals_in_every_thread: no block turns the flag off


def flush_denormals_in_every_thread() -> None:
    """Denormal floats flushed to zero for the rest of the process, in torch's intra-op threads too.
    A thread inherits the flag from the thread that creates it, and torch creates its pool at the
    first parallel operation: called before that (the ``pyrovae`` command does so first thing), it
    reaches every thread, where :func:`flush_denormals` reaches only the one that enters it. On
    two threads the built-in M2's late MNIST steps ran at 34 steps/s with it, 14 without."""
    global _in_every_thread
    _in_every_thread = torch.set_flush_denormal(True)


@contextmanager
def flush_denormals():
    """Floats below the smallest normal number (≈ 1.2e-38 in float32) read and written as 0 on the
    CPU (``torch.set_flush_denormal``, where the processor supports it). Without it, Adam's moments
    of weights that rarely get a gradient (an MNIST encoder's border pixels) and units far in an
    activation's flat tail decay into that range, where each operation on them is far slower: the
    built-in M2's epoch on MNIST grew from 22 s to 74–82 s over 30 epochs on 2 threads, and a fused
    Adam step on its moments ran 4× slower on one thread. Values that small change no sum they are
    added to. Torch sets the flag for the calling thread only: with it, that M2 epoch (at epoch 35)
    took 39 s on one thread and 59 s on two, whose second thread keeps the denormals
    (:func:`flush_denormals_in_every_thread` reaches it)."""
    global _depth
    supported = torch.set_flush_denormal(True)  # False, with nothing changed, where it is not supported
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if supported and _depth == 0 and not _in_every_thread:  # the outermost one restores torch's default (it cannot report the setting it had)
            torch.set_flush_denormal(False)


@contextmanager
def fast_context():
    """Settings for the engine's own loops: no per-call validation of distribution arguments (the
    data are checked once when loaded), no param-store registration (the optimizer holds the
    parameters), and denormal floats flushed to zero (:func:`flush_denormals`)."""
    with pyro.validation_enabled(False), skip_registration(), flush_denormals(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Encountered NaN", category=UserWarning)  # train_step reports it
        yield
