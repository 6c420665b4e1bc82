"""Pyro traces of a (model, guide) pair: the one way every estimator and objective reads them.

The idiom everything is built on: run the guide under an outer ``pyro.plate("particles", K, dim=-2)``,
replay the model on its draws, and read each site's own Pyro distribution from the two traces::

    with pyro.plate("particles", K, dim=-2):
        guide_trace = poutine.trace(guide).get_trace(x)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x)

so that a site's log-density has shape (K, N): K particles, N data points (the contract puts the data
plate at dim −1 and every other dimension in the event). Pyro's own ``vectorized_importance_weights``
sums over the data plate; these traces keep one column per data point.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator
from typing import NamedTuple

import pyro
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from .errors import ContractError

PARTICLE_DIM = -2
"""The particle plate's dim: one left of the data plate (dim −1)."""

log = logging.getLogger(__name__)


def sample_sites(trace) -> Iterator[tuple[str, dict]]:
    """(name, site) of every sample site of ``trace`` in the order it ran, subsample sites left out."""
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and not site_is_subsample(site):
            yield name, site


def latent_values(trace) -> dict[str, torch.Tensor]:
    """{name: value} of the trace's latent (unobserved) sample sites."""
    return {name: site["value"] for name, site in sample_sites(trace) if not site["is_observed"]}


def check_data_plate(name: str, site: dict, program: str) -> None:
    """ContractError unless ``site`` is inside ``pyro.plate("data", ...)`` at dim −1."""
    frames = [f for f in site["cond_indep_stack"] if f.name == "data"]
    if not frames or frames[0].dim != -1:
        raise ContractError(
            f"site {name!r} of the {program} is not inside pyro.plate('data', ...) at dim -1: "
            "data points must be the rightmost batch dimension of every site (use .to_event() for the rest)"
        )


def _log_prob(fn, value: torch.Tensor) -> torch.Tensor:
    return fn.log_prob(value)


_compiled_log_prob: Callable | None = None


def fused_log_prob(fn, value: torch.Tensor) -> torch.Tensor:
    """``fn.log_prob(value)`` compiled by ``torch.compile`` into one fused kernel (the sum over the
    event included); eager if compilation is unavailable or fails."""
    global _compiled_log_prob
    if _compiled_log_prob is None:
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime is found" on CPU machines
        _compiled_log_prob = torch.compile(_log_prob)
    if _compiled_log_prob is not _log_prob:
        try:
            return _compiled_log_prob(fn, value)
        except Exception as e:  # no C compiler, an unsupported distribution, …
            log.warning("torch.compile of a log-density failed (%s); continuing in eager mode", e)
            _compiled_log_prob = _log_prob
    return fn.log_prob(value)


def unscaled_log_prob(name: str, site: dict, shape: torch.Size, compiled: bool = False, enumerated: bool = False) -> torch.Tensor:
    """log p(value) of ``site`` without Pyro's scale (subsampling, β), checked to be ``shape`` = (K, N).

    ``enumerated``: the site may carry enumeration dims left of (K, N) (:func:`particle_traces` with
    ``enumerate_model``), and K or N may be 1 there (broadcast): shape (C…, K or 1, N or 1)."""
    log_p = (fused_log_prob if compiled else _log_prob)(site["fn"], site["value"])
    if enumerated and log_p.dim() >= len(shape) and all(a in (1, b) for a, b in zip(log_p.shape[-len(shape):], shape)) \
            and (log_p.dim() > len(shape) or log_p.shape == shape):
        return log_p
    if log_p.shape != shape:
        raise ContractError(
            f"site {name!r} has log-probability shape {tuple(log_p.shape)}, expected (particles, data) = {tuple(shape)}: "
            "declare every dimension but the data dimension as an event dimension with .to_event(n)"
        )
    return log_p


ENUM_DIM = PARTICLE_DIM - 1
"""The first dim free for enumeration: left of the particle plate (−2) and the data plate (−1)."""


def is_discrete(site: dict) -> bool:
    """Whether a sample site's distribution is discrete (has a finite support Pyro can enumerate)."""
    return bool(getattr(site["fn"], "has_enumerate_support", False))


def enumeration(site: dict) -> str | None:
    """How the site asks to be enumerated: ``"parallel"``, ``"sequential"``, or None (not at all)."""
    return (site.get("infer") or {}).get("enumerate")


def is_reparameterized(site: dict) -> bool:
    """Whether a draw at the site is a differentiable function of its parameters (``has_rsample``)."""
    return bool(getattr(site["fn"], "has_rsample", False))


class DiscreteSites(NamedTuple):
    """The discrete latent sites of a (model, guide) pair, from one trace of each (see :func:`discrete_sites`)."""

    summed: tuple[str, ...]  # model sites the guide does not sample, marked for enumeration: summed out exactly
    enumerated: tuple[str, ...]  # guide sites marked for enumeration: summed over in TraceEnum_ELBO's expectation
    sampled: tuple[str, ...]  # guide sites drawn, discrete and not marked: score-function gradient, log q in the weight
    missing: tuple[str, ...]  # model latents neither sampled by the guide nor marked for enumeration
    sequential: tuple[str, ...]  # sites marked "sequential" (not supported: only parallel enumeration)

    @property
    def any(self) -> bool:
        return bool(self.summed or self.enumerated or self.sampled)


def discrete_sites(model_trace, guide_trace) -> DiscreteSites:
    """Classify the latent sites of the model trace (replayed on the guide trace) and the guide trace."""
    model = {n: s for n, s in sample_sites(model_trace) if not s["is_observed"]}
    guide = dict(sample_sites(guide_trace))
    summed = tuple(n for n, s in model.items() if n not in guide and enumeration(s) == "parallel" and is_discrete(s))
    missing = tuple(n for n in model if n not in guide and n not in summed)
    enumerated = tuple(n for n, s in guide.items() if enumeration(s) == "parallel")
    sampled = tuple(n for n, s in guide.items()
                    if n not in enumerated and is_discrete(s) and not is_reparameterized(s))
    sequential = tuple(dict.fromkeys(n for n, s in [*model.items(), *guide.items()] if enumeration(s) == "sequential"))
    return DiscreteSites(summed, enumerated, sampled, missing, sequential)


@contextlib.contextmanager
def quiet_enumeration_warnings():
    """Silence the two warnings Pyro's ``Trace_ELBO`` gives for a program with sites marked for
    enumeration (a guide site so marked; a model site left to enumeration), where a pass of it only
    looks for the parameters (:func:`pyrovae.params.trainable`), not for the ELBO."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"(?s).*If you want to enumerate sites, you need to use TraceEnum_ELBO",
                                category=UserWarning)
        warnings.filterwarnings("ignore", message="Found vars in model but not guide", category=UserWarning)
        yield


def enumeration_dims(trace) -> set[int]:
    """The dims ``poutine.enum`` gave the enumerated sites of ``trace`` (−3, −4, …)."""
    return {s["infer"]["_enumerate_dim"] for _, s in sample_sites(trace) if s["infer"].get("_enumerate_dim") is not None}


def check_enumeration_dims(name: str, log_p: torch.Tensor, shape: torch.Size, enum_dims: set[int]) -> None:
    """ContractError if ``log_p`` has a dim left of (K, N) of size above 1 that no enumerated site made."""
    extra = [d for d in range(-log_p.dim(), -len(shape)) if log_p.shape[d] != 1 and d not in enum_dims]
    if extra:
        raise ContractError(
            f"site {name!r} has log-probability shape {tuple(log_p.shape)}, expected (particles, data) = {tuple(shape)}: "
            "declare every dimension but the data dimension as an event dimension with .to_event(n)"
        )


def sum_out(log_p: torch.Tensor) -> torch.Tensor:
    """log Σ_c exp log_p over every enumeration dim: (C…, K or 1, N or 1) → (K or 1, N or 1)."""
    return torch.logsumexp(log_p.reshape(-1, *log_p.shape[-2:]), 0)


def particle_traces(model: Callable, guide: Callable, x: torch.Tensor, num_particles: int, *args,
                    enumerate_model: bool = False, **kwargs):
    """(guide trace, model trace): the guide run under ``pyro.plate("particles", K, dim=-2)``, K =
    ``num_particles`` draws per data point, and the model replayed on its draws. Sites of the model
    that the guide did not sample (the observed site, or a latent the guide left out) are drawn or
    scored by the model as usual.

    ``enumerate_model``: the model's sites that the guide did not sample and that are marked
    ``infer={"enumerate": "parallel"}`` take all their values at once, each in a dim of its own left
    of the particle plate (−3, −4, …: ``poutine.enum``), so that a site's log-density has shape
    (C…, K, N) up to broadcasting and summing it out is a ``logsumexp`` over those dims. The guide is
    never enumerated here: a discrete site the guide samples (enumerated in training or not) is
    drawn from q, and its log q enters the weight."""
    with pyro.plate("particles", num_particles, dim=PARTICLE_DIM):
        guide_trace = poutine.trace(guide).get_trace(x, *args, **kwargs)
        replayed = poutine.replay(model, trace=guide_trace)
        if enumerate_model:  # outside the replay, so that the guide's values are never enumerated
            replayed = poutine.enum(replayed, first_available_dim=ENUM_DIM)
        model_trace = poutine.trace(replayed).get_trace(x, *args, **kwargs)
    return guide_trace, model_trace


def replay_traces(model: Callable, guide: Callable, values, x: torch.Tensor, num_particles: int, *args,
                  guide_too: bool = True, enumerate_model: bool = False, **kwargs):
    """(guide trace or None, model trace) with the latent sites at ``values`` (a trace), under the
    particle plate: the model's and (with ``guide_too``) the guide's densities at given latents, as
    annealing needs them. ``enumerate_model``: the model's sites marked for enumeration that
    ``values`` does not hold take all their values at once, as in :func:`particle_traces`."""
    with pyro.plate("particles", num_particles, dim=PARTICLE_DIM):
        replayed = poutine.replay(model, trace=values)
        if enumerate_model:
            replayed = poutine.enum(replayed, first_available_dim=ENUM_DIM)
        model_trace = poutine.trace(replayed).get_trace(x, *args, **kwargs)
        guide_trace = poutine.trace(poutine.replay(guide, trace=values)).get_trace(x, *args, **kwargs) if guide_too else None
    return guide_trace, model_trace


class at(Messenger):
    """Give the named sample sites these values instead of drawing them; unlike ``poutine.condition``
    the sites stay latent (not observed), so that a model can be replayed on a guide's trace."""

    def __init__(self, values: dict[str, torch.Tensor]):
        super().__init__()
        self.values = values

    def _pyro_sample(self, msg) -> None:
        if msg["name"] in self.values and not msg["is_observed"]:
            msg["value"] = self.values[msg["name"]]
            msg["done"] = True


class means(Messenger):
    """Take the mean of each latent site's distribution instead of a draw (a draw where the
    distribution has no closed-form mean, e.g. a flow; the mode at a discrete site, whose mean is
    not one of its values)."""

    def _pyro_sample(self, msg) -> None:
        if msg["value"] is None and not site_is_subsample(msg):
            try:
                msg["value"] = msg["fn"].mode if is_discrete(msg) else msg["fn"].mean
            except NotImplementedError:
                pass


def guide_means(guide: Callable, x: torch.Tensor, continuous_only: bool = False) -> dict[str, torch.Tensor]:
    """The mean of q at each latent site, each later site given the means of the earlier ones
    (a discrete site keeps its draw; ``continuous_only`` leaves it out of the result)."""
    trace = poutine.trace(means()(guide)).get_trace(x)
    return {name: site["value"] for name, site in sample_sites(trace) if not (continuous_only and is_discrete(site))}


def class_probabilities(guide: Callable, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """q(c | x) at each discrete site of the guide whose distribution has class probabilities
    (``Categorical``, ``OneHotCategorical``): {name: (N, C)}, the guide called as ``guide(x)``."""
    trace = poutine.trace(guide).get_trace(x)
    out = {}
    for name, site in sample_sites(trace):
        probs = getattr(site["fn"], "probs", None)
        if is_discrete(site) and probs is not None and probs.dim() >= 2:
            out[name] = probs.expand(x.shape[0], probs.shape[-1]) if probs.dim() == 2 else probs.reshape(-1, x.shape[0], probs.shape[-1])[0]
    return out


def observed_mean(model: Callable, x: torch.Tensor, latents: dict[str, torch.Tensor] | None = None, *args) -> torch.Tensor:
    """Run ``model(x, *args)`` with its latent sites set to ``latents`` (or drawn from the prior where
    absent); return the mean of the observed site of x (the one whose value is x), shaped like ``x``.
    ``args``: further arguments, e.g. the class labels y of a conditional model."""
    program = poutine.condition(model, data=latents) if latents else model
    trace = poutine.trace(program).get_trace(x, *args)
    observed = [site for _, site in sample_sites(trace) if site["is_observed"] and site["name"] not in (latents or {})]
    of_x = [site for site in observed if site["value"] is x] or observed
    return of_x[0]["fn"].mean.expand(x.shape)


__all__ = [
    "ENUM_DIM",
    "PARTICLE_DIM",
    "DiscreteSites",
    "at",
    "check_data_plate",
    "check_enumeration_dims",
    "class_probabilities",
    "discrete_sites",
    "enumeration",
    "enumeration_dims",
    "fused_log_prob",
    "guide_means",
    "is_discrete",
    "is_reparameterized",
    "latent_values",
    "means",
    "observed_mean",
    "particle_traces",
    "quiet_enumeration_warnings",
    "replay_traces",
    "sample_sites",
    "sum_out",
    "unscaled_log_prob",
]
