"""Hamiltonian Monte Carlo transitions for the intermediate targets of annealed importance sampling.

Chains move in an unconstrained space, u (C, B, D): C chains on each of B data points, D
coordinates. The target at inverse temperature β is f_β(u) ∝ exp(log_f0(u) + β · log_ratio(u)),
both parts and their gradients carried in a :class:`State` and computed by a density function
u ↦ State (:class:`pyrovae.annealing.AnnealingPath`). One transition (Neal 2011): momentum
v ~ N(0, I) drawn afresh, L leapfrog steps of the Hamiltonian H(u, v) = −log f_β(u) + ½ |v|²,
a Metropolis test per chain with probability min(1, e^{−ΔH}). It leaves f_β invariant.

:class:`CapturedTransition` is the whole transition — the momentum draw, the L leapfrog steps with
their density evaluations (model, guide, log-densities and both backward passes), the energies and
the accept test — traced once into one graph of tensor operations (:mod:`pyrovae.graphs`), with
what depends on no input (the encoder on x, transposed weights) computed once per refolding, and
replayed op by op with fresh noise from torch's generator, drawn in the eager order.

References:
    R. M. Neal (2011). MCMC using Hamiltonian dynamics. Handbook of MCMC, ch. 5.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, NamedTuple

import torch

from . import graphs

log = logging.getLogger(__name__)


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


def same_state(a: tuple, b: tuple, rtol: float = 1e-4, atol: float = 1e-5) -> bool:
    """Whether two tuples of tensors agree within float tolerance, nan where nan."""
    return all(torch.allclose(x, y, rtol=rtol, atol=atol, equal_nan=True) for x, y in zip(a, b))


class CapturedTransition:
    """:func:`hmc_transition` with ``density`` and ``num_leapfrog`` traced once, at ``state``, β and
    step size (the graph's inputs: the five tensors of the state, β as a 0-d tensor, the step size),
    and replayed. Tracing draws nothing. The first call is checked: the graph is replayed and the
    eager transition run on the same draws (torch's generator reset between the two); if they
    disagree, or drew different amounts of noise, this and every later call run eagerly (``failure``
    says why, after one logged line). The first call returns the eager result.

    ``refold()`` recomputes the parts computed once (after the data or the parameters the density
    reads have been changed in place). Raises what ``make_fx`` raises when the transition cannot be
    traced."""

    def __init__(self, density: Callable[[torch.Tensor], State], state: State, beta: float, step_size: torch.Tensor,
                 num_leapfrog: int):
        self.density, self.num_leapfrog = density, num_leapfrog
        self.checked, self.failure = False, None

        def transition(*inputs):
            new, accept = hmc_transition(State(*inputs[:5]), density, inputs[5], inputs[6], num_leapfrog)
            return (*new, accept)

        self.graph = graphs.fold_constants(graphs.trace(transition, *state, self._beta(beta, state), step_size))

    @staticmethod
    def _beta(beta: float, state: State) -> torch.Tensor:
        return torch.tensor(beta, dtype=state.u.dtype, device=state.u.device)

    def refold(self) -> None:
        inner = getattr(self.density, "graph", None)  # a traced density (annealing.captured_density) that this graph calls
        if inner is not None:
            graphs.refold(inner)
        graphs.refold(self.graph)

    def __call__(self, state: State, beta: float, step_size: torch.Tensor) -> tuple[State, torch.Tensor]:
        if self.failure is not None:
            return hmc_transition(state, self.density, beta, step_size, self.num_leapfrog)
        inputs = (*state, self._beta(beta, state), step_size)
        if not self.checked:
            return self._check(inputs, state, beta, step_size)
        with torch.no_grad():
            *new, accept = self.graph(*inputs)
        return State(*new), accept

    def _check(self, inputs: tuple, state: State, beta: float, step_size: torch.Tensor) -> tuple[State, torch.Tensor]:
        self.checked = True
        with graphs.preserved_rng(inputs), torch.no_grad():
            replayed = tuple(t.clone() for t in self.graph(*inputs))
            drawn = graphs.rng_states(inputs)
        new, accept = hmc_transition(state, self.density, beta, step_size, self.num_leapfrog)
        if not same_state(replayed, (*new, accept)):
            self.failure = "the traced transition differs from the eager one (Python control flow that depends on the values?)"
        elif not graphs.same_rng_states(drawn, graphs.rng_states(inputs)):
            self.failure = "the traced transition drew a different amount of noise than the eager one"
        if self.failure is not None:
            log.warning("%s; continuing without tracing", self.failure)
        return new, accept


__all__ = ["CapturedTransition", "State", "hmc_transition", "same_state"]
