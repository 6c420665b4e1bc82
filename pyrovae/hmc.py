"""Hamiltonian Monte Carlo transitions for the intermediate targets of annealed importance sampling.

Chains move in an unconstrained space, u (C, B, D): C chains on each of B data points, D
coordinates. The target at inverse temperature β is f_β(u) ∝ exp(log_f0(u) + β · log_ratio(u)),
both parts and their gradients carried in a :class:`State` and computed by a density function
u ↦ State (:class:`pyrovae.annealing.AnnealingPath`). One transition (Neal 2011): momentum
v ~ N(0, I) drawn afresh, L leapfrog steps of the Hamiltonian H(u, v) = −log f_β(u) + ½ |v|²,
a Metropolis test per chain with probability min(1, e^{−ΔH}). It leaves f_β invariant.

References:
    R. M. Neal (2011). MCMC using Hamiltonian dynamics. Handbook of MCMC, ch. 5.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch


class State(NamedTuple):
    """Chains at unconstrained position u (C, B, D), with the two parts of their log-density:

    ``log_f0`` = log f_0(z(u)) + log |det ∂z/∂u|, ``log_ratio`` = log p(x, z) − log f_0(z), both (C, B),
    and their gradients in u, (C, B, D). The intermediate target is log f_β = log_f0 + β · log_ratio.
    """

    u: torch.Tensor
    log_f0: torch.Tensor
    log_ratio: torch.Tensor
    grad_log_f0: torch.Tensor
    grad_log_ratio: torch.Tensor


def _where(mask: torch.Tensor, new: State, old: State) -> State:
    return State(*(torch.where(mask if a.dim() == 2 else mask[..., None], a, b) for a, b in zip(new, old)))


def hmc_transition(
    state: State, density: Callable[[torch.Tensor], State], beta: float | torch.Tensor, step_size: torch.Tensor,
    num_leapfrog: int,
) -> tuple[State, torch.Tensor]:
    """One HMC transition (Neal 2011) leaving f_β invariant, for every chain: momentum v ~ N(0, I)
    drawn afresh, ``num_leapfrog`` leapfrog steps of size ``step_size`` ((B,), one per point, or a
    scalar), then a Metropolis accept/reject per chain. Returns the new state and the acceptance
    probabilities min(1, e^{−ΔH}), (C, B); a proposal whose energy is nan is rejected.
    """
    eps = step_size if step_size.dim() == 0 else step_size[:, None]  # (B, 1): broadcasts over (C, B, D)

    def energy(s: State, v: torch.Tensor) -> torch.Tensor:
        return -(s.log_f0 + beta * s.log_ratio) + 0.5 * (v * v).sum(-1)

    def grad_potential(s: State) -> torch.Tensor:
        return -(s.grad_log_f0 + beta * s.grad_log_ratio)

    v0 = torch.randn_like(state.u)
    s, v = state, v0 - 0.5 * eps * grad_potential(state)
    for step in range(num_leapfrog):
        s = density(s.u + eps * v)
        v = v - (eps if step < num_leapfrog - 1 else 0.5 * eps) * grad_potential(s)
    log_accept = (energy(state, v0) - energy(s, v)).clamp(max=0.0).nan_to_num(nan=-math.inf)
    accept = torch.rand_like(log_accept).log() < log_accept
    return _where(accept, s, state), log_accept.exp()


__all__ = ["State", "hmc_transition"]
