"""Network building blocks shared by models and guides."""

from __future__ import annotations

from typing import Sequence

from pyro.nn import PyroModule
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "softplus": nn.Softplus, "elu": nn.ELU}


def mlp(sizes: Sequence[int], activation: str = "relu") -> PyroModule:
    """A multilayer perceptron ``sizes[0] → … → sizes[-1]``, activation between layers, none after the last.

    Its layers are ``PyroModule[nn.Linear]`` so that their parameters reach Pyro's param store
    and ``SVI`` trains them. Accepts any leading dimensions: (..., sizes[0]) → (..., sizes[-1]).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; known: {', '.join(ACTIVATIONS)}")
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(PyroModule[nn.Linear](n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return PyroModule[nn.Sequential](*layers)
