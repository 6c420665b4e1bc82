"""The annealing path of AIS for a (model, guide) pair: the schedule of β and the densities f_β.

For each data point x the path runs from f_0 = q(z | x) (the guide; or the prior p(z)) to the
unnormalized posterior p(x, z) along the geometric bridge

    f_β(z) = f_0(z)^(1−β) p(x, z)^β,     0 = β_0 < β_1 < … < β_T = 1

(sigmoidal in t by default, as Wu et al. 2017). The chains live in unconstrained space: all latent
sites at once, flattened and concatenated into u (C, B, D); a site with a constrained support is
mapped by ``biject_to(site["fn"].support)``, and the log-abs-det Jacobian is added to both log f_0
and log p(x, z) (it cancels in the weights). Every density is the sites' own Pyro distribution:
log p(x, z) by ``poutine.replay`` of the model on a trace holding the chains' current values,
log q(z | x) by replaying the guide on the same values (so a guide site whose distribution depends on
earlier latents is scored with those latents' current values), all under an outer
``pyro.plate("particles", chains, dim=-2)`` (:func:`pyrovae.traces.replay_traces`). Gradients come
from ``torch.autograd.grad``.

Discrete sites. HMC moves continuous latents only. A discrete site the model marks
``infer={"enumerate": "parallel"}`` (and the guide does not draw) is not part of u: the model is
replayed under ``poutine.enum`` and the site summed out of every density, so that the path runs
between f_0 and p(x, z) = Σ_c p(x, z, c) (with the prior start, f_0 = p(z) = Σ_c p(z, c)). A discrete
site the guide draws has no place on this path; AIS refuses it.

Pyro's tracing costs about a millisecond per call, more than a small decoder's arithmetic:
:func:`captured_density` traces the density once per pass (:mod:`pyrovae.graphs`) — model, guide,
log-densities and both backward passes, parameters and data as constants, what does not depend on u
(the encoder) computed once — and checks the graph against the eager evaluation before use.

References:
    R. B. Grosse, Z. Ghahramani, R. P. Adams (2015). Sandwiching the marginal likelihood using
        bidirectional Monte Carlo. arXiv:1511.02543.
    Y. Wu, Y. Burda, R. Salakhutdinov, R. Grosse (2017). On the quantitative analysis of
        decoder-based generative models. ICLR.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from pyro.distributions.transforms import biject_to
from pyro.poutine.trace_struct import Trace
from torch.distributions import constraints
from torch.distributions.transforms import ComposeTransform, IndependentTransform

from . import graphs
from .errors import ContractError, PyrovaeError
from .hmc import State
from .traces import (
    check_data_plate,
    check_enumeration_dims,
    enumeration,
    enumeration_dims,
    is_discrete,
    particle_traces,
    replay_traces,
    sample_sites,
    sum_out,
    unscaled_log_prob,
)

log = logging.getLogger(__name__)

Start = Literal["guide", "prior"]


# ---------------------------------------------------------------- schedules


def sigmoid_schedule(num_steps: int, radius: float = 4.0) -> torch.Tensor:
    """β_0..β_T, (T+1,) float64: σ(s) for s evenly spaced in [−radius, radius], rescaled to run from
    exactly 0 to exactly 1 (Grosse et al. 2015; Wu et al. 2017 use radius 4). Small steps at both ends."""
    if num_steps < 1:
        raise PyrovaeError(f"the number of AIS steps must be at least 1, got {num_steps}")
    if num_steps == 1:
        return torch.tensor([0.0, 1.0], dtype=torch.float64)
    s = torch.sigmoid(torch.linspace(-radius, radius, num_steps + 1, dtype=torch.float64))
    betas = (s - s[0]) / (s[-1] - s[0])
    betas[0], betas[-1] = 0.0, 1.0
    return betas


def linear_schedule(num_steps: int) -> torch.Tensor:
    """β_t = t / T, (T+1,) float64."""
    if num_steps < 1:
        raise PyrovaeError(f"the number of AIS steps must be at least 1, got {num_steps}")
    return torch.linspace(0.0, 1.0, num_steps + 1, dtype=torch.float64)


SCHEDULES = {"sigmoid": sigmoid_schedule, "linear": linear_schedule}


# ---------------------------------------------------------------- the path of a (model, guide) pair


def support(fn) -> constraints.Constraint:
    """The support of a site's distribution; a ``MixtureSameFamily``'s is its components' (torch
    wraps it in a constraint that ``biject_to`` has no entry for)."""
    s = fn.support
    return s.base_constraint if isinstance(s, constraints.MixtureSameFamilyConstraint) else s


def _is_identity(t) -> bool:
    base = t.base_transform if isinstance(t, IndependentTransform) else t
    return isinstance(base, ComposeTransform) and not base.parts


@dataclass
class _Site:
    name: str
    transform: object  # constrained ← unconstrained; None for the identity
    shape: torch.Size  # unconstrained event shape
    size: int  # its number of elements


class AnnealingPath:
    """The densities of the annealing path for C chains on each of the B points of x, as functions of
    the chains' flattened unconstrained latents u (C, B, D)."""

    def __init__(self, model: Callable, guide: Callable, x: torch.Tensor, num_chains: int, start: Start, args, kwargs):
        self.model, self.guide, self.x, self.start, self.args, self.kwargs = model, guide, x, start, args, kwargs
        self.shape = torch.Size([num_chains, x.shape[0]])  # (C, B)
        with torch.no_grad():
            first, model_trace = particle_traces(model, guide if start == "guide" else model, x, num_chains, *args,
                                                 enumerate_model=True, **kwargs)
        self.sites: list[_Site] = []
        self.summed: list[str] = []  # discrete sites the model enumerates: summed out of every density
        values = {}
        for name, site in sample_sites(model_trace):
            check_data_plate(name, site, "model")
            if site["is_observed"]:
                continue
            if is_discrete(site) and enumeration(site) == "parallel" and (start == "prior" or name not in first.nodes):
                self.summed.append(name)
                continue
            if start == "guide" and name not in first.nodes:
                raise ContractError(f"the guide does not sample latent site {name!r} of the model: a guide must sample every latent site")
            value = site["value"]
            if value.shape[:2] != self.shape:
                raise ContractError(
                    f"latent site {name!r} has shape {tuple(value.shape)} under {num_chains} particles, expected "
                    f"(particles, data, *event) = {tuple(self.shape)} + …: all latent sites must be local to each data point"
                )
            try:
                transform = biject_to(support(site["fn"]))
            except NotImplementedError:
                raise ContractError(f"latent site {name!r} has support {site['fn'].support}: HMC needs continuous latents "
                                    "with a bijection to real space") from None
            transform = None if _is_identity(transform) else transform
            shape = value.shape[2:] if transform is None else transform.inverse_shape(value.shape)[2:]
            self.sites.append(_Site(name, transform, shape, shape.numel()))
            values[name] = value
        if start == "guide":
            extra = [name for name, _ in sample_sites(first) if name not in values and name not in self.summed]
            if extra:
                raise ContractError(f"the guide samples {extra}, which the model has no latent site for: AIS needs q over the model's latents only")
        if not self.sites:
            raise ContractError("the model has no latent sites to anneal over")
        self.initial = self.to_unconstrained(values)

    def to_unconstrained(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """{site: (C, B, *event) or (B, *event)} → u (C, B, D)."""
        parts = []
        for s in self.sites:
            v = values[s.name].detach()
            u = v if s.transform is None else s.transform.inv(v)
            parts.append(u.expand(*self.shape, *s.shape).reshape(*self.shape, s.size))
        return torch.cat(parts, -1)

    def _unflatten(self, u: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor | float]:
        values, log_det, start = {}, 0.0, 0
        for s in self.sites:
            us = u[..., start:start + s.size].reshape(*self.shape, *s.shape)
            start += s.size
            if s.transform is None:
                values[s.name] = us
            else:
                z = s.transform(us)
                values[s.name] = z
                log_det = log_det + s.transform.log_abs_det_jacobian(us, z).reshape(*self.shape, -1).sum(-1)
        return values, log_det

    def __call__(self, u: torch.Tensor) -> State:
        with torch.enable_grad():
            u = u.detach().requires_grad_(True)
            values, log_det = self._unflatten(u)
            chains = Trace()
            for name, value in values.items():
                chains.add_node(name, name=name, type="sample", is_observed=False, value=value, infer={})
            guide_trace, model_trace = replay_traces(self.model, self.guide, chains, self.x, self.shape[0], *self.args,
                                                     guide_too=self.start == "guide", enumerate_model=bool(self.summed),
                                                     **self.kwargs)
            log_joint, log_prior = self.log_densities(model_trace)
            if guide_trace is None:
                log_f0 = log_prior + log_det
            else:
                log_q = sum(unscaled_log_prob(s.name, guide_trace.nodes[s.name], self.shape) for s in self.sites)
                log_f0 = log_q + log_det
            log_p = log_joint + log_det
            grad_f0, = torch.autograd.grad(log_f0.sum(), u, retain_graph=True)
            grad_p, = torch.autograd.grad(log_p.sum(), u)
        return State(u.detach(), log_f0.detach(), (log_p - log_f0).detach(), grad_f0, grad_p - grad_f0)

    def log_densities(self, model_trace) -> tuple:
        """(log p(x, z), log p(z)) at the chains' z, each (C, B), with the sites the model enumerates
        summed out: for those sites c, log Σ_c exp of the sum of the terms that carry c's dims (in the
        joint all of them, the likelihood's included; in the prior the latent sites' only)."""
        log_lik = log_prior = 0.0
        joint, latent = [], []
        enum_dims = enumeration_dims(model_trace) if self.summed else set()
        for name, site in sample_sites(model_trace):
            log_p = unscaled_log_prob(name, site, self.shape, enumerated=bool(self.summed))
            check_enumeration_dims(name, log_p, self.shape, enum_dims)
            if log_p.dim() > len(self.shape):
                joint.append(log_p)
                if not site["is_observed"]:
                    latent.append(log_p)
            elif site["is_observed"]:
                log_lik = log_lik + log_p
            else:
                log_prior = log_prior + log_p
        if joint:
            log_joint = log_lik + log_prior + sum_out(sum(joint)).expand(self.shape)
            if latent:
                log_prior = log_prior + sum_out(sum(latent)).expand(self.shape)
            return log_joint, log_prior
        return log_lik + log_prior, log_prior


def captured_density(path: AnnealingPath, state: State) -> Callable[[torch.Tensor], State]:
    """``path`` as one graph of tensor operations: the model, the guide, their log-densities and the
    backward passes traced once by ``make_fx`` at ``state`` (parameters and data become constants),
    simplified (:func:`pyrovae.graphs.simplify`) and with the parts that do not depend on u (the encoder on x,
    transposed weights) computed once. Replaying it skips Pyro's per-call tracing. The trace fixes
    Python control flow at its first evaluation, so the graph is checked against ``state``; ``path``
    itself is returned (with a logged warning) if tracing fails or disagrees.
    """
    def f(u):
        return tuple(path(u)[1:])

    try:
        graph = graphs.fold_constants(graphs.trace(f, state.u))
        with torch.no_grad():
            replayed = graph(state.u)
    except Exception as e:  # an operation make_fx cannot trace
        log.warning("tracing the AIS log-density failed (%s: %s); continuing without tracing", type(e).__name__, e)
        return path
    if not all(torch.allclose(a, b, rtol=1e-4, atol=1e-5, equal_nan=True) for a, b in zip(replayed, state[1:])):
        log.warning("the traced AIS log-density differs from the model's (Python control flow that depends on "
                    "the latent values?); continuing without tracing")
        return path

    def density(u: torch.Tensor) -> State:
        with torch.no_grad():  # the graph holds its backward pass: no autograd needed
            return State(u, *graph(u))

    density.graph = graph  # for graphs.refold, after the data or the parameters changed in place
    return density


__all__ = ["SCHEDULES", "AnnealingPath", "Start", "captured_density", "linear_schedule", "sigmoid_schedule"]
