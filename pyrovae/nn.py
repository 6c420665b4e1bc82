"""Network building blocks shared by models and guides, and parameter registration for ``SVI``."""

from __future__ import annotations

import itertools
import weakref
from contextlib import contextmanager
from typing import Sequence

import pyro
from torch import nn

from .errors import PyrovaeError

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "softplus": nn.Softplus, "elu": nn.ELU}

_counter = itertools.count()
_names: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()  # not in the module's __dict__, so a deepcopy gets its own
_skip_registration = False


def mlp(sizes: Sequence[int], activation: str = "relu") -> nn.Sequential:
    """A multilayer perceptron ``sizes[0] → … → sizes[-1]``, activation between layers, none after the last.

    Accepts any leading dimensions: (..., sizes[0]) → (..., sizes[-1]).
    """
    if activation not in ACTIVATIONS:
        raise PyrovaeError(f"unknown activation {activation!r}; known: {', '.join(ACTIVATIONS)}")
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


def register(module: nn.Module) -> nn.Module:
    """``pyro.module`` under a name unique to this instance, so that ``SVI`` trains its parameters
    and two models in one process never share parameters by accident.

    Call it in the model or guide that uses ``module``. It is skipped inside
    :func:`skip_registration` (pyrovae's own loops), whose optimizer holds ``module.parameters()``
    directly and need not pay for a param-store lookup per parameter per step.
    """
    if _skip_registration:
        return module
    if module not in _names:
        _names[module] = f"{type(module).__name__}{next(_counter)}"
    return pyro.module(_names[module], module)


@contextmanager
def skip_registration():
    """Within this context, :func:`register` does nothing."""
    global _skip_registration
    previous, _skip_registration = _skip_registration, True
    try:
        yield
    finally:
        _skip_registration = previous
