"""Per-data-point importance log-weights of any (model, guide) pair.

    log w_k(x_n) = log p(x_n, z_k) − log q(z_k | x_n),   z_k ~ q(· | x_n),   shape (K, N)

kept apart site by site (log-likelihood of each observed site, log prior and log q of each latent
site). The guide is traced under an outer ``pyro.plate("particles", K, dim=-2)`` and the model
replayed on its samples, so every density is the sites' own Pyro distribution. Pyro's
``vectorized_importance_weights`` sums over the data plate; these weights keep one column per
data point, which every estimator in :mod:`pyrovae.estimators` needs.

The contract (see the README): data points are the rightmost batch dimension, inside
``pyro.plate("data", ...)`` at dim −1; all other dimensions of a site are event dimensions;
the guide samples every latent site of the model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Iterator

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from torch.distributions import kl_divergence

from .errors import ContractError, PyrovaeError

PARTICLE_DIM = -2
log = logging.getLogger(__name__)


@dataclass
class SiteLogProbs:
    """Per-site log-densities, each (K, N): K particles, N data points."""

    log_likelihood: dict[str, torch.Tensor]  # observed sites: log p(x | parents)
    log_prior: dict[str, torch.Tensor]  # latent sites: log p(z_s | parents)
    log_q: dict[str, torch.Tensor]  # latent sites: log q(z_s | x, …)
    kl_analytic: dict[str, torch.Tensor | None] = field(default_factory=dict)  # KL(q_s ‖ p_s) given the particle's parents; None: no closed form, or not asked for

    @property
    def log_w(self) -> torch.Tensor:
        """log p(x, z) − log q(z | x), (K, N)."""
        return sum(self.log_likelihood.values()) + sum(self.log_prior.values()) - sum(self.log_q.values())

    @property
    def latent_sites(self) -> list[str]:
        return list(self.log_q)

    @staticmethod
    def cat(chunks: list["SiteLogProbs"]) -> "SiteLogProbs":
        """Join chunks of particles along K."""
        def join(name):
            parts = [getattr(c, name) for c in chunks]
            return {s: None if parts[0][s] is None else torch.cat([p[s] for p in parts]) for s in parts[0]}

        return SiteLogProbs(*(join(n) for n in ("log_likelihood", "log_prior", "log_q", "kl_analytic")))


def _sample_sites(trace) -> Iterator[tuple[str, dict]]:
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and not site_is_subsample(site):
            yield name, site


def _check_data_plate(name: str, site: dict, program: str) -> None:
    frames = [f for f in site["cond_indep_stack"] if f.name == "data"]
    if not frames or frames[0].dim != -1:
        raise ContractError(
            f"site {name!r} of the {program} is not inside pyro.plate('data', ...) at dim -1: "
            "data points must be the rightmost batch dimension of every site (use .to_event() for the rest)"
        )


def _log_prob(fn, value: torch.Tensor) -> torch.Tensor:
    return fn.log_prob(value)


_compiled_log_prob: Callable | None = None


def _fused_log_prob(fn, value: torch.Tensor) -> torch.Tensor:
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


def _unscaled_log_prob(name: str, site: dict, shape: torch.Size, compiled: bool = False) -> torch.Tensor:
    log_p = (_fused_log_prob if compiled else _log_prob)(site["fn"], site["value"])
    if log_p.shape != shape:
        raise ContractError(
            f"site {name!r} has log-probability shape {tuple(log_p.shape)}, expected (particles, data) = {tuple(shape)}: "
            "declare every dimension but the data dimension as an event dimension with .to_event(n)"
        )
    return log_p


def _kl(q_fn, p_fn, shape: torch.Size) -> torch.Tensor | None:
    try:
        return kl_divergence(q_fn, p_fn).expand(shape)
    except NotImplementedError:
        return None


def site_log_probs(
    model: Callable, guide: Callable, x: torch.Tensor, num_particles: int, *args,
    analytic_kl: bool = True, compiled: bool = False, **kwargs,
) -> SiteLogProbs:
    """One vectorized pass: K = ``num_particles`` draws from the guide for each of the N points in ``x``.

    ``model(x, *args, **kwargs)`` and ``guide(x, *args, **kwargs)`` are called once each; the
    result's tensors are (K, N). Densities are unscaled (subsampling scales are ignored).
    ``analytic_kl``: also compute KL(q_s ‖ p_s) in closed form per latent site where one exists.
    ``compiled``: compute the log-densities with ``torch.compile`` (one fused kernel per site; the
    observed site's K × N × P terms are the costly part for images), falling back to eager mode.
    """
    N = x.shape[0]
    shape = torch.Size([num_particles, N])
    with pyro.plate("particles", num_particles, dim=PARTICLE_DIM):
        guide_trace = poutine.trace(guide).get_trace(x, *args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, *args, **kwargs)

    terms = SiteLogProbs({}, {}, {}, {})
    for name, site in _sample_sites(model_trace):
        _check_data_plate(name, site, "model")
        if site["is_observed"]:
            terms.log_likelihood[name] = _unscaled_log_prob(name, site, shape, compiled)
            continue
        if name not in guide_trace.nodes:
            raise ContractError(f"the guide does not sample latent site {name!r} of the model: a guide must sample every latent site")
        q_site = guide_trace.nodes[name]
        _check_data_plate(name, q_site, "guide")
        terms.log_prior[name] = _unscaled_log_prob(name, site, shape, compiled)
        terms.log_q[name] = _unscaled_log_prob(name, q_site, shape, compiled)
        terms.kl_analytic[name] = _kl(q_site["fn"], site["fn"], shape) if analytic_kl else None
    if not terms.log_likelihood:
        raise ContractError("the model has no observed site: observe the data with pyro.sample(..., obs=x)")
    return terms


def log_weights(
    model: Callable, guide: Callable, x: torch.Tensor, num_particles: int, chunk_size: int | None = None, *args,
    analytic_kl: bool = True, compiled: bool = False, on_chunk: Callable[[int], None] | None = None, **kwargs,
) -> SiteLogProbs:
    """:func:`site_log_probs` for K = ``num_particles``, computed ``chunk_size`` particles at a time.

    Memory for the model's activations is bounded by chunk × N whatever K is; the result holds
    K × N numbers per site. Chunks are independent draws, so chunked and unchunked results agree
    in distribution. ``on_chunk(k)`` is called after each chunk of k particles (for progress bars).
    """
    if num_particles < 1:
        raise PyrovaeError(f"the number of particles must be at least 1, got {num_particles}")
    chunk_size = num_particles if chunk_size is None else chunk_size
    if chunk_size < 1:
        raise PyrovaeError(f"the chunk size must be at least 1, got {chunk_size}")
    chunks = []
    with torch.inference_mode():
        for start in range(0, num_particles, chunk_size):
            size = min(chunk_size, num_particles - start)
            chunks.append(site_log_probs(model, guide, x, size, *args, analytic_kl=analytic_kl, compiled=compiled, **kwargs))
            if on_chunk is not None:
                on_chunk(size)
    return chunks[0] if len(chunks) == 1 else SiteLogProbs.cat(chunks)
