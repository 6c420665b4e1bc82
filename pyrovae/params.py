"""The parameters a (model, guide) pair trains, found the way Pyro's ``SVI`` finds them.

``SVI.step`` traces the loss with ``poutine.trace(param_only=True)`` and optimizes the
unconstrained value of every param site it sees: ``pyro.module`` registrations, ``PyroModule``
parameters and ``PyroParam``s, bare ``pyro.param`` sites. :func:`trainable` does the same, once,
so that pyrovae's own loop optimizes exactly that set, and :func:`state_dict` /
:func:`load_state_dict` save and restore it (an ``nn.Module``'s own state dict, plus the
param-store values of the parameters that do not belong to the module).
"""

from __future__ import annotations

from typing import Callable

import pyro
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from torch import nn

from .errors import PyrovaeError
from .traces import quiet_enumeration_warnings


def trainable(model: Callable, guide: Callable, *args, **kwargs) -> dict[str, torch.Tensor]:
    """name → unconstrained leaf tensor of every param site the ELBO of (model, guide) touches on
    ``args``, in the order ``SVI`` meets them. Creates parameters that are initialized lazily."""
    elbo = Trace_ELBO(max_plate_nesting=1)
    with poutine.trace(param_only=True) as capture, quiet_enumeration_warnings():  # a pass for the parameters only
        elbo.differentiable_loss(model, guide, *args, **kwargs)
    return {name: site["value"].unconstrained() for name, site in capture.trace.nodes.items()}


def _module_names(obj) -> dict[int, str]:
    return {id(p): name for name, p in obj.named_parameters()} if isinstance(obj, nn.Module) else {}


def state_dict(obj, params: dict[str, torch.Tensor]) -> dict:
    """What restores the trained values: ``obj.state_dict()`` if it is an ``nn.Module`` (parameters
    and buffers), and the unconstrained values of the other params by their param-store names."""
    in_module = _module_names(obj)
    return {
        "module": obj.state_dict() if isinstance(obj, nn.Module) else {},
        "params": {name: p.detach().clone() for name, p in params.items() if id(p) not in in_module},
    }


@torch.no_grad()
def load_state_dict(obj, params: dict[str, torch.Tensor], state: dict) -> None:
    """Copy saved values into the live tensors (the optimizer keeps holding the same ones)."""
    if isinstance(obj, nn.Module) and state.get("module"):
        try:
            obj.load_state_dict(state["module"])
        except RuntimeError as e:  # names or shapes differ
            detail = " ".join(str(e).split("\n\t")[1:2]) or str(e).splitlines()[0]
            raise PyrovaeError(f"the checkpoint does not fit this model: {detail.strip()}") from None
    saved = state.get("params", {})
    in_module = _module_names(obj)
    missing = [name for name, p in params.items() if id(p) not in in_module and name not in saved]
    if missing:
        raise PyrovaeError(f"the checkpoint has no value for parameter(s) {', '.join(missing)}: it was written by another model")
    for name, value in saved.items():
        if name not in params:
            raise PyrovaeError(f"the checkpoint holds parameter {name!r}, which this model does not have: it was written by another model")
        if params[name].shape != value.shape:
            raise PyrovaeError(f"parameter {name!r} has shape {tuple(params[name].shape)} here but {tuple(value.shape)} in the checkpoint")
        params[name].copy_(value)


def clear() -> None:
    """Forget every parameter held by Pyro's param store (before building another model)."""
    pyro.clear_param_store()
