"""Per-data-point importance log-weights of any (model, guide) pair.

    log w_k(x_n) = log p(x_n, z_k) − log q(z_k | x_n),   z_k ~ q(· | x_n),   shape (K, N)

kept apart site by site (log-likelihood of each observed site, log prior and log q of each latent
site). The guide is traced under an outer ``pyro.plate("particles", K, dim=-2)`` and the model
replayed on its samples, so every density is the sites' own Pyro distribution. Pyro's
``vectorized_importance_weights`` sums over the data plate; these weights keep one column per
data point, which every estimator in :mod:`pyrovae.estimators` needs.

The contract (see the README): data points are the rightmost batch dimension, inside
``pyro.plate("data", ...)`` at dim −1; all other dimensions of a site are event dimensions;
the guide samples every latent site of the model, or the model marks a discrete one for enumeration.

Discrete latent sites. A model site the guide does not sample, marked ``infer={"enumerate":
"parallel"}``, is summed out exactly: the model is run under ``poutine.enum`` (enumeration dims
left of the particle plate, :func:`pyrovae.traces.particle_traces`), the log-densities of the sites
whose shape carries those dims are added up and reduced by ``logsumexp`` over them,

    log p(x, z_k) = Σ_{sites without c} log p(·) + log Σ_c exp Σ_{sites with c} log p(·),

and that marginal term is kept under the name of the one guide site it involves (the prior of z
with the component summed out: ``log_prior["z"]``), or of the observed site where the data depend
on c (``log_likelihood["x"]``), or under the joined names ``"z1+z2"`` of several. A discrete site the
guide samples (whether or not training enumerates it) is drawn from q and its log q enters the weight
like any other site's: the weights stay unbiased for p(x), and the ELBO (1/K) Σ_k log w_k estimates
the same ELBO that ``TraceEnum_ELBO`` sums exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .errors import ContractError, PyrovaeError
from .kl import site_kl
from .traces import (
    check_data_plate,
    check_enumeration_dims,
    enumeration,
    enumeration_dims,
    particle_traces,
    sample_sites,
    sum_out,
    unscaled_log_prob,
)


@dataclass
class SiteLogProbs:
    """Per-site log-densities, each (K, N): K particles, N data points."""

    log_likelihood: dict[str, torch.Tensor]  # observed sites: log p(x | parents)
    log_prior: dict[str, torch.Tensor]  # latent sites: log p(z_s | parents)
    log_q: dict[str, torch.Tensor]  # latent sites: log q(z_s | x, …)
    kl_analytic: dict[str, torch.Tensor | None] = field(default_factory=dict)  # KL(q_s ‖ p_s) given the particle's parents; None: no closed form, not applicable, or not asked for
    kl_method: dict[str, str] = field(default_factory=dict)  # per latent site: "analytic", "no closed form" or "not applicable: …" (pyrovae.kl)

    @property
    def log_w(self) -> torch.Tensor:
        """log p(x, z) − log q(z | x), (K, N)."""
        return sum(self.log_likelihood.values()) + sum(self.log_prior.values()) - sum(self.log_q.values())

    @property
    def latent_sites(self) -> list[str]:
        """Latent sites with a log q and a log prior of their own (a site whose prior is summed out
        together with another's or with the likelihood has none)."""
        return [s for s in self.log_q if s in self.log_prior]

    @staticmethod
    def cat(chunks: list[SiteLogProbs]) -> SiteLogProbs:
        """Join chunks of particles along K."""
        def join(name):
            parts = [getattr(c, name) for c in chunks]
            return {s: None if parts[0][s] is None else torch.cat([p[s] for p in parts]) for s in parts[0]}

        return SiteLogProbs(*(join(n) for n in ("log_likelihood", "log_prior", "log_q", "kl_analytic")), dict(chunks[0].kl_method))


def site_log_probs(
    model: Callable, guide: Callable, x: torch.Tensor, num_particles: int, *args,
    analytic_kl: bool = True, compiled: bool = False, **kwargs,
) -> SiteLogProbs:
    """One vectorized pass: K = ``num_particles`` draws from the guide for each of the N points in ``x``.

    ``model(x, *args, **kwargs)`` and ``guide(x, *args, **kwargs)`` are called once each; the
    result's tensors are (K, N). Densities are unscaled (subsampling scales are ignored).
    ``analytic_kl``: also compute KL(q_s ‖ p_s) in closed form per latent site where one exists and
    is the site's KL term (:func:`pyrovae.kl.site_kl`), with the method or the reason in ``kl_method``.
    ``compiled``: compute the log-densities with ``torch.compile`` (one fused kernel per site; the
    observed site's K × N × P terms are the costly part for images), falling back to eager mode.
    """
    N = x.shape[0]
    shape = torch.Size([num_particles, N])
    guide_trace, model_trace = particle_traces(model, guide, x, num_particles, *args, enumerate_model=True, **kwargs)
    terms = SiteLogProbs({}, {}, {}, {}, {})
    summed: list[tuple[str, dict, torch.Tensor]] = []  # sites whose log-density carries enumeration dims
    enum_dims = enumeration_dims(model_trace)
    for name, site in sample_sites(model_trace):
        check_data_plate(name, site, "model")
        if not site["is_observed"] and name not in guide_trace.nodes and enumeration(site) is None:
            raise ContractError(f"the guide does not sample latent site {name!r} of the model: a guide must sample every "
                                "latent site, or the model mark a discrete one infer={'enumerate': 'parallel'}")
        log_p = unscaled_log_prob(name, site, shape, compiled, enumerated=bool(enum_dims))
        check_enumeration_dims(name, log_p, shape, enum_dims)
        if log_p.dim() > len(shape):
            summed.append((name, site, log_p))
            continue
        log_p = log_p.expand(shape)
        if site["is_observed"]:
            terms.log_likelihood[name] = log_p
            continue
        terms.log_prior[name] = log_p
    for name, site in sample_sites(model_trace):  # in the model's order, as the sites above
        if site["is_observed"] or name not in guide_trace.nodes:
            continue
        q_site = guide_trace.nodes[name]
        check_data_plate(name, q_site, "guide")
        terms.log_q[name] = unscaled_log_prob(name, q_site, shape, compiled)
        if name not in terms.log_prior:
            continue
        if analytic_kl:
            kl = site_kl(name, model_trace, guide_trace)
            terms.kl_analytic[name] = None if kl.value is None else kl.value.expand(shape)
            terms.kl_method[name] = kl.method
        else:
            terms.kl_analytic[name] = None
    if summed:
        marginal = sum_out(sum(log_p for _, _, log_p in summed)).expand(shape)
        observed = [name for name, site, _ in summed if site["is_observed"]]
        drawn = [name for name, _, _ in summed if name in terms.log_q]
        if observed:
            terms.log_likelihood[observed[0]] = marginal
        else:
            key = "+".join(drawn) if drawn else "+".join(name for name, _, _ in summed)
            terms.log_prior[key] = marginal
            if len(drawn) == 1:
                terms.kl_analytic[key] = None
                terms.kl_method[key] = "no closed form"
    if not terms.log_likelihood:
        raise ContractError("the model has no observed site: observe the data with pyro.sample(..., obs=x)")
    return terms


def log_weights(
    model: Callable, guide: Callable, x: torch.Tensor, num_particles: int, chunk_size: int | None = None, *args,
    analytic_kl: bool = True, compiled: bool = False, on_chunk: Callable[[int], None] | None = None, **kwargs,
) -> SiteLogProbs:
    """:func:`site_log_probs` for K = ``num_particles``, computed ``chunk_size`` particles at a time.

    For each point x_n, K draws z_k ~ q(z | x_n) from the guide (under an outer particle plate),
    the model replayed on them, and each site's unscaled log-density kept apart; their sum is the
    log-weight every estimator (:mod:`pyrovae.estimators`) is a function of::

        log w_k(x_n) = Σ_obs log p(x_n | ·) + Σ_s log p(z_s,k | ·) − Σ_s log q(z_s,k | x_n, ·),   (K, N)

    Memory for the model's activations is bounded by chunk × N whatever K is; the result holds
    K × N numbers per site. Chunks are independent draws, so chunked and unchunked results agree
    in distribution. ``on_chunk(k)`` is called after each chunk of k particles (for progress bars).

    Args:
        model: a Pyro program ``model(x, *args, **kwargs)`` that keeps the model/guide contract: data
            points in ``pyro.plate("data", ...)`` at dim −1, the rest of each site an event dimension.
        guide: a Pyro program with the same signature that samples every latent site of the model
            (or the model marks a discrete one for enumeration).
        x: the data points, (N, P).
        num_particles: K, draws per point.
        chunk_size: draws per pass (default: all K in one pass).
        args: passed on to ``model`` and ``guide`` after ``x``, as are ``kwargs``.
        analytic_kl: also compute KL(q_s ‖ p_s) in closed form per latent site where one exists.
        compiled: compute the log-densities with ``torch.compile``.
        on_chunk: called with the number of particles after each chunk.

    Returns:
        :class:`SiteLogProbs`: per observed site its log-likelihood, per latent site its log prior and
        log q, each (K, N), and ``log_w`` their sum; the closed-form KL per site where computed.

    Raises:
        PyrovaeError: ``num_particles`` or ``chunk_size`` below 1, or a pair that breaks the contract.
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
