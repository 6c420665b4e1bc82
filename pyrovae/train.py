"""Training by stochastic variational inference with Pyro's ``Trace_ELBO``.

The loss is Pyro's reparameterized ELBO estimator, −ELBO = −E_q[log p(x, z) − log q(z | x)],
summed over the minibatch as ``SVI(model, guide, optim, Trace_ELBO()).step(x)`` returns it.
The fast path differentiates ``Trace_ELBO().differentiable_loss`` and steps one ``torch.optim.Adam``
over exactly the parameters ``SVI`` would train (found as ``SVI`` finds them, :mod:`pyrovae.params`):
the same loss and gradients as ``SVI`` with ``pyro.optim.Adam`` (which keeps one optimizer per
parameter), with the state saved and resumed as torch state dicts.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import pyro
import torch
from pyro.infer import Trace_ELBO
from torch import nn
from tqdm.auto import tqdm

from . import contract, params as parameters
from .errors import PyrovaeError
from .context import fast_context

log = logging.getLogger(__name__)


class TrainingDiverged(PyrovaeError):
    """The loss became nan or infinite; the parameters were left as they were before that step."""


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3  # Adam learning rate
    num_particles: int = 1  # draws of z per data point in each ELBO estimate
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def elbo_loss(model: Callable, guide: Callable, num_particles: int = 1) -> Callable[..., torch.Tensor]:
    """x ↦ −ELBO(x) summed over the batch: Pyro's differentiable ``Trace_ELBO`` loss.

    Run it under :func:`fast_context`.
    """
    elbo = Trace_ELBO(num_particles=num_particles, vectorize_particles=num_particles > 1, max_plate_nesting=1)

    def loss(*args, **kwargs) -> torch.Tensor:
        return elbo.differentiable_loss(model, guide, *args, **kwargs)

    return loss


def make_optimizer(params, lr: float) -> torch.optim.Adam:
    """Adam, with torch's fused kernel (one pass over all parameters per step)."""
    return torch.optim.Adam(params, lr=lr, fused=True)


def train_step(loss_fn: Callable, optimizer: torch.optim.Optimizer, x: torch.Tensor, *args) -> float:
    """One optimizer step on −ELBO(x); returns the loss.

    Raises :class:`TrainingDiverged` before stepping if the loss or a gradient is nan or infinite,
    so the parameters are never corrupted.
    """
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(x, *args)
    value = loss.item()
    if not math.isfinite(value):
        raise TrainingDiverged(f"the loss became {value}; the parameters were not updated by that step. Try a smaller --lr")
    loss.backward()
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads).item()
    if not math.isfinite(norm):
        raise TrainingDiverged(f"the gradient became {norm} (loss {value:g}); the parameters were not updated by that step. Try a smaller --lr")
    optimizer.step()
    return value


@torch.no_grad()
def mean_elbo(loss_fn: Callable, x: torch.Tensor, batch_size: int = 1000) -> float:
    """ELBO per data point over ``x`` (one draw of z per point), in nats."""
    total = sum(loss_fn(x[i : i + batch_size]).item() for i in range(0, len(x), batch_size))
    return -total / len(x)


def first_batch(batches, n: int = 8) -> torch.Tensor:
    """A few rows as training will see them, without advancing ``batches``."""
    if hasattr(batches, "peek"):
        return batches.peek(n)
    return next(iter(batches))[1][:n]


def fit(
    module: nn.Module,
    batches: Iterable,
    config: TrainConfig,
    test_x: torch.Tensor | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    start_epoch: int = 0,
    on_epoch_end: Callable[[dict], None] | None = None,
    progress: bool = True,
) -> list[dict]:
    """Train ``module.model`` / ``module.guide`` for epochs ``start_epoch + 1 … config.epochs``.

    ``batches`` yields ``(idx, x)`` each epoch. Without an ``optimizer``, the contract is checked
    on a first batch and Adam is made over every parameter ``SVI`` would train
    (:func:`pyrovae.params.trainable`): ``pyro.module`` registrations, ``PyroModule`` parameters,
    ``PyroParam``s and bare ``pyro.param`` sites, constrained ones through their unconstrained values. Returns one metrics dict per epoch:
    ``train_elbo`` (mean over the epoch's steps, nats per point), ``test_elbo`` (nats per point,
    when ``test_x`` is given) and ``seconds``. ``on_epoch_end(metrics)`` runs after each epoch
    (the CLI saves its checkpoint there).
    """
    if optimizer is None:
        sample = first_batch(batches)
        contract.check(module.model, module.guide, sample, "the training data")
        optimizer = make_optimizer(parameters.trainable(module.model, module.guide, sample).values(), config.lr)
    loss_fn = elbo_loss(module.model, module.guide, config.num_particles)
    history = []
    steps = (config.epochs - start_epoch) * len(batches)
    with fast_context(), tqdm(total=steps, disable=not progress, unit="step", dynamic_ncols=True) as bar:
        for epoch in range(start_epoch + 1, config.epochs + 1):
            start, total, count = time.perf_counter(), 0.0, 0
            for step, (_, x) in enumerate(batches):
                try:
                    total += train_step(loss_fn, optimizer, x)
                except TrainingDiverged as e:
                    raise TrainingDiverged(f"epoch {epoch}, step {step}: {e}") from None
                count += len(x)
                bar.update()
            metrics = {"epoch": epoch, "train_elbo": -total / count, "seconds": time.perf_counter() - start}
            if test_x is not None:
                metrics["test_elbo"] = mean_elbo(loss_fn, test_x)
            bar.set_postfix(elbo=f"{metrics.get('test_elbo', metrics['train_elbo']):.2f}")
            log.info("epoch %d: %s", epoch, metrics)
            history.append(metrics)
            if on_epoch_end is not None:
                on_epoch_end(metrics)
    return history
