"""Training objectives for any (model, guide) pair that keeps the contract, as differentiable losses.

``loss(objective, model, guide, num_particles, beta)`` returns a callable x ↦ −objective(x) summed
over the batch, whose gradient is the objective's reparameterized gradient estimator:

``elbo``
    ELBO(x) = E_q[log p(x, z) − log q(z|x)], Monte Carlo over ``num_particles`` draws: the
    surrogate of Pyro's ``Trace_ELBO`` (:func:`elbo_surrogate`) on the traces ``Trace_ELBO`` makes,
    −(1/K) Σ_k [Σ_model log p − Σ_guide log q], plus its score-function terms for a guide site that
    is not reparameterized; the same value and gradients as ``Trace_ELBO.differentiable_loss``,
    without its host syncs.
    Discrete latent sites (:func:`pyrovae.traces.discrete_sites`): where the model or the guide marks a
    site ``infer={"enumerate": "parallel"}``, the ELBO is Pyro's ``TraceEnum_ELBO`` (a model site the
    guide does not sample summed out exactly, a guide site summed over with its weights q); a
    discrete site the guide draws without that mark gets the score-function term above. The
    estimator used is logged once per kind of batch (:attr:`Loss.estimators`).
``enum``
    ``elbo`` with every discrete site of the guide marked for enumeration (``config_enumerate(guide,
    "parallel")``): a guide that draws a discrete site without the mark gets ``TraceEnum_ELBO``'s exact
    sum over it instead of the score-function estimator; the same as ``elbo`` where there is none.
``mean-field``
    The same bound with KL(q ‖ p) in closed form at each latent site where
    ``torch.distributions.kl_divergence`` has one and it is the site's KL term (:mod:`pyrovae.kl`):
    Pyro's ``TraceMeanField_ELBO``, except that a site whose prior may depend on a latent the guide
    draws after it keeps its Monte Carlo term (``TraceMeanField_ELBO`` would use a closed form that
    is not the term there, and only warn).
``iwae``
    L_k(x) = E[log (1/k) Σ_i w_i], w_i = p(x, z_i) / q(z_i|x), k = ``num_particles`` draws
    (Burda et al., 2016), from the engine's per-point log-weights (:func:`pyrovae.evidence.site_log_probs`).
``iwae-dreg``
    The same value; the guide's gradient is the doubly reparameterized estimator of Tucker et al.
    (2019), Σ_i w̃_i² ∂log w_i/∂z_i · ∂z_i/∂φ: the same expectation as the IWAE gradient, without
    its score-function term, so its signal-to-noise ratio for the guide grows with k instead of
    decaying as the IWAE gradient's does (Rainforth et al., 2018).

β and KL warm-up: ``beta`` multiplies the log-densities of the latent sites, log p(z) and log q(z|x),
in every objective (β = 1: the plain objective; β = 0: reconstruction only). For ``elbo`` and
``mean-field`` this is :class:`scale_latents`, a handler that scales latent sites only (``poutine.scale``
scales every site and refuses 0), under which Pyro's traces carry β in every latent term; the IWAE objectives apply β to the per-site log-weights, so that
log w_β = log p(x|z) + β (log p(z) − log q(z|x)). :func:`warmup_scale` is the usual linear schedule
for it (Bowman et al., 2016; Sønderby et al., 2016).

References:
    Burda, Grosse & Salakhutdinov (2016), *Importance Weighted Autoencoders*.
    Tucker, Lawson, Gu & Maddison (2019), *Doubly Reparameterized Gradient Estimators for Monte Carlo Objectives*.
    Rainforth, Kosiorek, Le, Maddison, Igl, Wood & Teh (2018), *Tighter Variational Bounds are Not Necessarily Better*.
    Higgins et al. (2017), *β-VAE*; Bowman et al. (2016), *Generating Sentences from a Continuous Space*;
    Sønderby et al. (2016), *Ladder Variational Autoencoders* (KL warm-up).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from typing import Literal

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer import Trace_ELBO, TraceEnum_ELBO, config_enumerate
from pyro.infer.trace_elbo import _compute_log_r
from pyro.infer.util import is_identically_zero
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch.fx.experimental.proxy_tensor import get_proxy_mode

from .contract import check_objective
from .contract import traces as contract_traces
from .data import Labelled
from .errors import PyrovaeError
from .evidence import SiteLogProbs, site_log_probs
from .kl import site_kl
from .traces import (
    PARTICLE_DIM,
    DiscreteSites,
    at,
    discrete_sites,
    latent_values,
    sample_sites,
)

log = logging.getLogger(__name__)

Objective = Literal["elbo", "mean-field", "iwae", "iwae-dreg", "enum"]
OBJECTIVES: tuple[str, ...] = ("elbo", "mean-field", "iwae", "iwae-dreg", "enum")


class scale_latents(Messenger):
    """Multiply the log-density of every latent (unobserved, non-subsample) sample site by ``scale`` ≥ 0.

    Under it, ``Trace_ELBO`` estimates E_q[log p(x|z)] + β E_q[log p(z) − log q(z|x)], and
    ``TraceMeanField_ELBO`` scales each analytic KL by the guide site's scale, i.e. by β as well.
    Use it as a context manager around the loss, so that it covers the model and the guide.
    """

    def __init__(self, scale: float | torch.Tensor):
        if not torch.is_tensor(scale) and not scale >= 0:  # a 0-d tensor (a captured step's β) is checked by its owner
            raise PyrovaeError(f"the scale of the latent sites (beta) must be at least 0, got {scale}")
        super().__init__()
        self.scale = scale

    def _process_message(self, msg) -> None:
        if msg["type"] == "sample" and not msg["is_observed"] and not site_is_subsample(msg):
            msg["scale"] = self.scale * msg["scale"]


def warmup_scale(epoch: int, step: int, steps_per_epoch: int, warmup_epochs: float) -> float:
    """KL warm-up: β rising linearly from 0 at the first step to 1 after ``warmup_epochs`` epochs.

    ``epoch`` counts from 1 (as :func:`pyrovae.train.fit` does) and ``step`` from 0 within the epoch:
    β = min(1, ((epoch − 1) · steps_per_epoch + step) / (warmup_epochs · steps_per_epoch)), and 1
    throughout when ``warmup_epochs`` is 0. Multiply by a target β for a β-VAE with warm-up.
    """
    if epoch < 1 or step < 0 or steps_per_epoch < 1 or warmup_epochs < 0:
        raise PyrovaeError(
            f"warm-up needs epoch >= 1, step >= 0, steps per epoch >= 1 and warm-up epochs >= 0; "
            f"got epoch {epoch}, step {step}, {steps_per_epoch} steps per epoch, {warmup_epochs} warm-up epochs"
        )
    if warmup_epochs == 0:
        return 1.0
    return min(1.0, ((epoch - 1) * steps_per_epoch + step) / (warmup_epochs * steps_per_epoch))


def elbo_surrogate(model_trace, guide_trace, mean_field: bool = False, inapplicable: set | None = None) -> torch.Tensor:
    """One particle's differentiable ELBO from a pair of Pyro importance traces, as ``Trace_ELBO``
    (and with ``mean_field``, ``TraceMeanField_ELBO``) builds it:

        Σ_model log p − Σ_guide log q  [+ Σ_s sg(log r_s) · log q_s for guide sites s without reparameterization]

    whose value is the ELBO's (the score-function terms enter the gradient only);
    with every term scaled as Pyro scales the site (plates, subsampling, β under :class:`scale_latents`).
    With ``mean_field``, a latent site whose KL(q ‖ p) has a closed form that is the site's term
    (:func:`pyrovae.kl.site_kl`) contributes −KL instead of log p − log q; the names of sites where a
    closed form exists but is not applicable are added to ``inapplicable``.
    """
    elbo, log_r, analytic = 0.0, None, set()
    for name, site in sample_sites(model_trace):
        if mean_field and not site["is_observed"]:
            kl = site_kl(name, model_trace, guide_trace)
            if kl.value is not None:
                guide_site = guide_trace.nodes[name]
                kl_value = scale_and_mask(kl.value, scale=guide_site["scale"], mask=guide_site["mask"])
                elbo = elbo - kl_value.sum()
                analytic.add(name)
                continue
            if inapplicable is not None and kl.method != "no closed form":
                inapplicable.add(name)
        elbo = elbo + site["log_prob_sum"]
    for name, site in sample_sites(guide_trace):
        _, score_function, entropy = site["score_parts"]
        if name not in analytic:
            if not is_identically_zero(entropy):
                elbo = elbo - entropy.sum()
            else:  # not reparameterized: the value of −log q here, its gradient through the score-function term
                elbo = elbo - site["log_prob_sum"].detach()
        if not is_identically_zero(score_function):
            if log_r is None:
                log_r = _compute_log_r(model_trace, guide_trace)
            term = (log_r.sum_to(site["cond_indep_stack"]) * score_function).sum()
            elbo = elbo + (term - term.detach())  # gradient only: the value stays the ELBO
    return elbo


def _tracing() -> bool:
    """Whether the loss is being recorded into a graph (``make_fx`` or ``torch.compile``), not run."""
    return get_proxy_mode() is not None or torch.compiler.is_compiling()


def _log_w(terms: SiteLogProbs, beta: float) -> torch.Tensor:
    """log p(x|z) + β (log p(z) − log q(z|x)), (K, N)."""
    log_lik = sum(terms.log_likelihood.values())
    if not torch.is_tensor(beta) and beta == 0:
        return log_lik
    return log_lik + beta * (sum(terms.log_prior.values()) - sum(terms.log_q.values()))


class Loss:
    """x ↦ −objective(x) summed over the batch: a differentiable scalar; see :func:`loss`.

    ``beta`` may be changed between calls (KL warm-up): ``loss_fn.beta = warmup_scale(...)``.
    Extra arguments are passed to the model and the guide.
    """

    def __init__(self, objective: str, model: Callable, guide: Callable, num_particles: int = 1, beta: float = 1.0):
        if objective not in OBJECTIVES:
            raise PyrovaeError(f"unknown objective {objective!r}; known: {', '.join(OBJECTIVES)}")
        if num_particles < 1:
            raise PyrovaeError(f"the number of particles must be at least 1, got {num_particles}")
        self.objective = objective
        self.model, self.guide = model, config_enumerate(guide, "parallel") if objective == "enum" else guide
        self.num_particles = num_particles
        self.beta = beta
        self._traces = Trace_ELBO(num_particles=num_particles, vectorize_particles=num_particles > 1, max_plate_nesting=1)
        self._enum = TraceEnum_ELBO(num_particles=num_particles, vectorize_particles=num_particles > 1, max_plate_nesting=1,
                                    strict_enumeration_warning=False)
        self._warned: set[str] = set()
        self.estimators: dict[str, str] = {}  # "unlabelled" (x alone) or "labelled" (x and more) → the estimator used
        self._discrete: dict[tuple, DiscreteSites] = {}

    def discrete(self, x: torch.Tensor, *args, **kwargs) -> DiscreteSites:
        """The discrete sites of the model and guide called on these arguments (traced once per kind of
        call: a labelled batch may have none where an unlabelled one has some); refuses an objective
        that cannot train them (:func:`pyrovae.contract.check_objective`)."""
        if isinstance(x, Labelled):
            x, args = x.x, (x.y, *args)
        key = (tuple(a is None for a in args), tuple(sorted(k for k, v in kwargs.items() if v is not None)))
        if key not in self._discrete and _tracing():  # a captured step records the loss: none of this in its graph
            return DiscreteSites((), (), (), (), ())
        if key not in self._discrete:
            devices = [x.device] if x.device.type == "cuda" else []  # the trace's draws leave the random streams as they were
            with torch.random.fork_rng(devices=devices), torch.no_grad(), pyro.validation_enabled(False), poutine.block():
                guide_trace, model_trace = contract_traces(self.model, self.guide, x, *args, **kwargs)
            found = discrete_sites(model_trace, guide_trace)
            check_objective(self.objective, found)
            self._discrete[key] = found
            estimator = self._estimator(found)
            what = "labelled" if any(a is not None for a in args) or any(v is not None for v in kwargs.values()) else "unlabelled"
            self.estimators[what] = estimator
            log.info("objective %s on %s batches: %s", self.objective, what, estimator)
        return self._discrete[key]

    def _estimator(self, found: DiscreteSites) -> str:
        if self.objective not in ("elbo", "enum") or not found.any:
            return {"elbo": "Trace_ELBO", "enum": "Trace_ELBO", "mean-field": "TraceMeanField_ELBO"}.get(self.objective, f"{self.objective} (reparameterized)")
        if found.summed or found.enumerated:
            return f"TraceEnum_ELBO (enumerated: {', '.join(found.summed + found.enumerated)})"
        return f"Trace_ELBO with score-function terms (guide samples: {', '.join(found.sampled)})"

    def __call__(self, x: torch.Tensor, *args, beta: float | torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """−objective summed over the batch at ``x``; ``beta`` (a float, or a 0-d tensor as a captured
        step passes it) overrides ``self.beta`` for this call."""
        if isinstance(x, Labelled):  # a labelled batch: model(x, y), guide(x, y)
            x, args = x.x, (x.y, *args)
        if beta is None:
            beta = float(self.beta)
        if not torch.is_tensor(beta) and not beta >= 0:
            raise PyrovaeError(f"beta must be at least 0, got {beta}")
        if self.objective in ("elbo", "mean-field", "enum"):
            return -self.elbo(x, *args, beta=beta, **kwargs)
        if self.objective == "iwae":
            return -self.iwae(x, *args, beta=beta, **kwargs).sum()
        return self._dreg(x, *args, beta=beta, **kwargs)

    def elbo(self, x: torch.Tensor, *args, beta: float | torch.Tensor = 1.0, **kwargs) -> torch.Tensor:
        """(1/K) Σ_k :func:`elbo_surrogate` on the traces of ``Trace_ELBO(num_particles=K,
        vectorize_particles=K > 1)``, β on the latent sites: the batch's ELBO (a differentiable scalar)."""
        scaled = not (not torch.is_tensor(beta) and beta == 1)
        found = self.discrete(x, *args, **kwargs)
        if found.summed or found.enumerated:
            if scaled:
                raise PyrovaeError("`beta` other than 1 (and KL warm-up) is not defined for a model with enumerated discrete "
                                   "sites: TraceEnum_ELBO needs one scale for all the sites it sums out; use `beta` 1")
            if not torch.is_grad_enabled():  # differentiable_loss refuses a value without a graph
                return torch.as_tensor(-self._enum.loss(self.model, self.guide, x, *args, **kwargs), dtype=x.dtype, device=x.device)
            return -self._enum.differentiable_loss(self.model, self.guide, x, *args, **kwargs)
        inapplicable: set[str] = set()
        total = 0.0
        with scale_latents(beta) if scaled else contextlib.nullcontext():
            for model_trace, guide_trace in self._traces._get_traces(self.model, self.guide, (x, *args), kwargs):
                total = total + elbo_surrogate(model_trace, guide_trace, self.objective == "mean-field", inapplicable)
        for name in inapplicable - self._warned:
            self._warned.add(name)
            log.warning("mean-field: the closed-form KL at latent site %r is not its KL term (its prior may depend on a "
                        "latent the guide draws after it); that site uses its Monte Carlo term instead", name)
        return total / self.num_particles

    def iwae(self, x: torch.Tensor, *args, beta: float | torch.Tensor = 1.0, **kwargs) -> torch.Tensor:
        """L_k(x_n) on one set of k draws per point, differentiable, (N,); ``beta`` may be a 0-d tensor."""
        k = self.num_particles
        self.discrete(x, *args, **kwargs)
        terms = site_log_probs(self.model, self.guide, x, k, *args, analytic_kl=False, **kwargs)
        return torch.logsumexp(_log_w(terms, beta), 0) - math.log(k)

    def _dreg(self, x: torch.Tensor, *args, beta: float = 1.0, **kwargs) -> torch.Tensor:
        """−L_k summed over the batch, with the doubly reparameterized gradient for the guide.

        1. Draw z_i = z_i(φ, ε_i) from the guide under a particle plate (the path of φ into z).
        2. Score the same values as fresh leaves z'_i (the guide run again with its sites set to them,
           the model replayed on that): log w'_i, whose gradient in z' is ∂log w_i/∂z_i with the guide's parameters held fixed.
        3. Surrogate: Σ_i w̃_i (log p(x|z'_i) + β log p(z'_i)) for the model's parameters (the IWAE
           gradient), plus Σ_i sg(c_i ∂log w_i/∂z_i) · z_i(φ) for the guide's, where
           c_i = (1 − β) w̃_i + β w̃_i² (w̃_i² at β = 1, Tucker et al. 2019, eq. 7; at other β the
           same identity applied to the β-weighted bound). The direct score term of log q is dropped:
           the identity moves it into c_i.
        """
        k = self.num_particles
        self.discrete(x, *args, **kwargs)
        with pyro.plate("particles", k, dim=PARTICLE_DIM):
            guide_trace = poutine.trace(self.guide).get_trace(x, *args, **kwargs)
        paths = latent_values(guide_trace)  # z_i(φ)
        leaves = {name: z.detach().requires_grad_() for name, z in paths.items()}
        terms = site_log_probs(self.model, at(leaves)(self.guide), x, k, *args, analytic_kl=False, **kwargs)
        log_w = _log_w(terms, beta)  # (K, N)
        grads = torch.autograd.grad(log_w.sum(), list(leaves.values()), retain_graph=True, allow_unused=True)
        w = torch.softmax(log_w.detach(), 0)  # normalized weights w̃, (K, N)
        coefficient = (1 - beta) * w + beta * w**2
        model_part = sum(terms.log_likelihood.values())
        if beta != 0:
            model_part = model_part + beta * sum(terms.log_prior.values())
        surrogate = (w * model_part).sum()
        for (name, z), g in zip(paths.items(), grads):
            if g is None or not z.requires_grad:
                continue
            c = coefficient.reshape(coefficient.shape + (1,) * (z.dim() - coefficient.dim()))
            surrogate = surrogate + ((c * g).detach() * z).sum()
        value = (torch.logsumexp(log_w.detach(), 0) - math.log(k)).sum()
        return -(value + surrogate - surrogate.detach())


def elbo_loss(model: Callable, guide: Callable, num_particles: int = 1) -> Loss:
    """x ↦ −ELBO(x) summed over the batch (``Trace_ELBO``'s loss): ``loss("elbo", model, guide, num_particles)``."""
    return Loss("elbo", model, guide, num_particles)


def loss(objective: str, model: Callable, guide: Callable, num_particles: int = 1, beta: float = 1.0) -> Loss:
    """A differentiable loss x ↦ −objective(x) summed over the batch, for ``SVI``-style training.

    ``objective`` is one of ``"elbo"``, ``"mean-field"``, ``"iwae"``, ``"iwae-dreg"``, ``"enum"`` (see the module
    docstring); ``num_particles`` is the number of draws per point (k for the IWAE bounds); ``beta``
    scales the latent sites' log-densities (settable later through the returned object's ``beta``).

    .. warning:: ``mean-field`` uses a closed form only where it is the site's KL term: at a site
       whose prior may depend on a latent the guide draws after it (the bottom-up guide of
       :func:`pyrovae.models.two_layer` at ``z2``) it keeps the Monte Carlo term and logs a warning
       once (:mod:`pyrovae.kl`). Where ``kl_divergence`` has no closed form for a site — mixtures, VampPrior, flow priors or
       the IAF guide, Normal ‖ StudentT — it silently falls back to the Monte Carlo term
       log p(z) − log q(z|x) for that site, which is exactly what ``elbo`` computes there. Closed
       forms exist for Normal ‖ Normal, Normal ‖ Laplace and (registered by
       :mod:`pyrovae.guides.gaussian`) the full-covariance guide against a diagonal Normal prior.

    ``iwae-dreg`` runs the guide twice per call and, for a guide whose density at a point it did not
    draw needs an inversion (the IAF guide), inverts the flow in D network passes.
    """
    return Loss(objective, model, guide, num_particles, beta)


__all__ = ["OBJECTIVES", "Loss", "elbo_loss", "elbo_surrogate", "loss", "scale_latents", "warmup_scale"]
