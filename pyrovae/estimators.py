"""Estimators of the evidence, each a value per data point with its Monte Carlo standard error, in nats.

All take log-weights ``log_w`` of shape (K, N) — K draws z_k ~ q(z | x_n) for each of N points,
log w_k = log p(x_n, z_k) − log q(z_k | x_n) — as :func:`pyrovae.evidence.log_weights` gives.

References:
    Kingma & Welling (2014), *Auto-Encoding Variational Bayes* (the ELBO).
    Burda, Grosse & Salakhutdinov (2016), *Importance Weighted Autoencoders* (L_k).
    Vehtari, Simpson, Gelman, Yao & Gabry (2024), *Pareto Smoothed Importance Sampling* (k̂).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import PyrovaeError
from .evidence import SiteLogProbs


@dataclass
class Estimate:
    """A per-data-point estimate and its standard error, both (N,); stderr is nan where it cannot be estimated."""

    value: torch.Tensor
    stderr: torch.Tensor

    def mean(self) -> tuple[float, float]:
        """The mean over points and its standard error across points (sample variation of the data)."""
        n = self.value.numel()
        sd = self.value.std().item() if n > 1 else float("nan")
        return self.value.mean().item(), sd / math.sqrt(n)


def _mean_and_stderr(samples: torch.Tensor) -> Estimate:
    """Mean over dim 0 and its standard error sd/√K; (K, N) → (N,)."""
    K = samples.shape[0]
    stderr = samples.std(0) / math.sqrt(K) if K > 1 else torch.full_like(samples[0], float("nan"))
    return Estimate(samples.mean(0), stderr)


def _check(log_w: torch.Tensor) -> None:
    if log_w.dim() != 2 or log_w.shape[0] < 1:
        raise PyrovaeError(f"log-weights must have shape (particles, data points), got {tuple(log_w.shape)}")


def elbo(log_w: torch.Tensor) -> Estimate:
    """ELBO(x_n) = E_q[log p(x_n, z) − log q(z | x_n)] ≈ (1/K) Σ_k log w_k; log_w (K, N) → (N,) ± sd/√K."""
    _check(log_w)
    return _mean_and_stderr(log_w)


def log_px(log_w: torch.Tensor) -> Estimate:
    """Importance-sampled log p(x_n) ≈ log (1/K) Σ_k w_k, the guide as proposal; log_w (K, N) → (N,).

    Consistent as K → ∞ and, by Jensen, biased low for finite K. The standard error is the delta
    method's sd(w)/(√K · mean(w)); it understates the error when the weights are heavy-tailed
    (PSIS k̂ > 0.7, see :mod:`pyrovae.diagnostics`). A small k̂ does not prove the estimate right:
    where q misses part of the posterior, the K draws never reach the tail k̂ would need to see, and
    log p̂(x) is low with k̂ ≤ 0.7; annealed importance sampling (:func:`pyrovae.ais.ais`) is the check.

    Returns:
        :class:`Estimate`: log p̂(x_n) and its standard error, each (N,), in nats.
    """
    _check(log_w)
    K = log_w.shape[0]
    value = torch.logsumexp(log_w, 0) - math.log(K)
    w = torch.exp(log_w - value)  # w_k / mean(w), (K, N)
    stderr = w.std(0) / math.sqrt(K) if K > 1 else torch.full_like(value, float("nan"))
    return Estimate(value, stderr)


def iwae_bound(log_w: torch.Tensor, k: int) -> Estimate:
    """L_k(x_n) = E[log (1/k) Σ_{i≤k} w_i] (Burda et al., 2016); log_w (K, N) → (N,).

    The K draws are split into ⌊K/k⌋ disjoint groups of k; each group gives an independent unbiased
    estimate of L_k, averaged, with the standard error across groups (nan for a single group).
    L_1 is the ELBO; L_K is the importance-sampled log p(x) estimate.
    """
    _check(log_w)
    K = log_w.shape[0]
    if not 1 <= k <= K:
        raise PyrovaeError(f"the IWAE bound needs 1 <= k <= K = {K} samples, got k = {k}")
    groups = log_w[: (K // k) * k].reshape(K // k, k, -1)  # (G, k, N)
    return _mean_and_stderr(torch.logsumexp(groups, 1) - math.log(k))


def difference(a: Estimate, b: Estimate) -> Estimate:
    """a − b, standard errors added in quadrature (conservative when a and b share their draws)."""
    return Estimate(a.value - b.value, torch.sqrt(a.stderr**2 + b.stderr**2))


def gap(log_w: torch.Tensor) -> Estimate:
    """log p(x_n) − ELBO(x_n) ≈ KL(q(z | x_n) ‖ p(z | x_n)) ≥ 0; log_w (K, N) → (N,)."""
    return difference(log_px(log_w), elbo(log_w))


@dataclass
class KLEstimate:
    """KL(q ‖ p) at one latent site, per data point.

    ``monte_carlo`` averages log q(z) − log p(z) over the draws; ``analytic`` averages the closed
    form (``torch.distributions.kl_divergence``) over the draws of the site's parents (exact for a
    site without latent parents) and is None where no closed form is registered or where it is not
    the site's term (``why_not_analytic`` says which, :mod:`pyrovae.kl`). ``z_score`` is their mean
    difference in standard errors of the paired per-draw differences (nan if constant).
    """

    monte_carlo: Estimate
    analytic: Estimate | None
    z_score: torch.Tensor | None
    why_not_analytic: str | None = None  # "no closed form" or "not applicable: …" where analytic is None

    @property
    def method(self) -> str:
        return "monte-carlo" if self.analytic is None else "analytic"

    @property
    def best(self) -> Estimate:
        """The analytic value where it exists, else the Monte Carlo one."""
        return self.monte_carlo if self.analytic is None else self.analytic


def kl(terms: SiteLogProbs) -> dict[str, KLEstimate]:
    """Per latent site s: KL(q_s ‖ p_s) = E_q[log q_s(z_s) − log p_s(z_s)], analytic beside Monte Carlo."""
    report = {}
    for site in terms.latent_sites:
        mc_samples = terms.log_q[site] - terms.log_prior[site]  # (K, N)
        exact = terms.kl_analytic.get(site)
        analytic = z = None
        if exact is not None:
            analytic = _mean_and_stderr(exact)
            diff = _mean_and_stderr(exact - mc_samples)
            z = diff.value / diff.stderr
        why = None if exact is not None else terms.kl_method.get(site, "no closed form")
        report[site] = KLEstimate(_mean_and_stderr(mc_samples), analytic, z, why)
    return report


def reconstruction(terms: SiteLogProbs) -> Estimate:
    """E_q[log p(x_n | z)] summed over observed sites; (N,) ± sd/√K."""
    return _mean_and_stderr(sum(terms.log_likelihood.values()))


def accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """The share of points whose predicted class is their label, and its binomial standard error
    √(a (1 − a) / N); predicted and labels (N,). A classifier's test error is 1 − accuracy ± the same."""
    if predicted.shape != labels.shape or predicted.numel() == 0:
        raise PyrovaeError(f"predictions {tuple(predicted.shape)} and labels {tuple(labels.shape)} must be the same non-empty shape")
    a = (predicted == labels).double().mean().item()
    return a, math.sqrt(a * (1 - a) / labels.numel())
