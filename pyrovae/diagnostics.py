"""When can an importance-sampling estimate of log p(x) be trusted?

Two per-data-point diagnostics of the importance weights w_k = p(x, z_k) / q(z_k | x),
z_k ~ q(z | x), k = 1..K, given as log-weights of shape (K, N) (particles first, as
Pyro's particle plate puts them):

- effective sample size, ESS = (Σ_k w_k)² / Σ_k w_k² ∈ [1, K] (Kong 1992);
- the Pareto shape k̂ of the weights' upper tail, fitted by PSIS (Vehtari et al. 2024):
  k̂ < 0.5 the weights have finite variance; 0.5 ≤ k̂ ≤ 0.7 the estimate is usable but
  converges slowly; k̂ > 0.7 it is not reliable (Yao et al. 2018 use the same scale for
  variational approximations); k̂ > 1 the weights have no finite mean.

Both are computed from the K draws that were made, so neither can see a part of the posterior
that q misses altogether: the fitted tail then looks light, k̂ comes out at 0.7 or below, and
log p̂(x) is still too low. k̂ ≤ 0.7 says that no problem was seen, not that the estimate is
reliable; annealed importance sampling (:mod:`pyrovae.ais`) is the check where the evidence matters.

References
----------
- A. Kong (1992). A note on importance sampling using standardized weights. Tech. rep. 348,
  Dept. of Statistics, University of Chicago.
- A. Vehtari, D. Simpson, A. Gelman, Y. Yao, J. Gabry (2024). Pareto smoothed importance
  sampling. JMLR 25(72):1-58. https://arxiv.org/abs/1507.02646
- Y. Yao, A. Vehtari, D. Simpson, A. Gelman (2018). Yes, but did it work?: Evaluating
  variational inference. ICML. https://arxiv.org/abs/1802.02538
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from pyrovae.errors import PyrovaeError

MIN_PSIS_SAMPLES = 25
"""Fewest importance samples per point for which k̂ is reported (the tail fit needs ≥ 5)."""

KHAT_THRESHOLD = 0.7
"""k̂ above this: the importance-sampling estimate is not reliable (Vehtari et al. 2024)."""


@dataclass(frozen=True)
class Reliability:
    """Per-data-point reliability of an importance-sampling estimate; N data points, K samples.

    ess:          (N,) float64, (Σ_k w_k)² / Σ_k w_k², in [1, K].
    ess_fraction: (N,) float64, ess / K, in [1/K, 1].
    khat:         (N,) float64, PSIS Pareto shape k̂; ``-inf`` where the weights are constant
                  (perfect proposal), ``nan`` where not computed (see ``note``).
    note:         ``""``, or a sentence saying what was not computed and why.
    """

    ess: torch.Tensor
    ess_fraction: torch.Tensor
    khat: torch.Tensor
    note: str


def _checked(log_w: torch.Tensor) -> torch.Tensor:
    """``log_w`` (K, N) as detached float64, after rejecting points no estimate can use.

    Entries equal to -inf (zero weight) are allowed while a point has at least one finite
    log-weight; nan, +inf, or all -inf make the point unusable.
    """
    if not isinstance(log_w, torch.Tensor) or not log_w.is_floating_point():
        raise PyrovaeError(f"log-weights must be a floating-point torch.Tensor, got {log_w!r:.80}")
    if log_w.dim() != 2 or log_w.shape[0] == 0:
        raise PyrovaeError(
            f"log-weights must have shape (K, N) with K >= 1 samples per point, "
            f"got shape {tuple(log_w.shape)}"
        )
    lw = log_w.detach().to(torch.float64)
    has_nan, has_posinf = lw.isnan().any(0), lw.isposinf().any(0)
    all_neginf = lw.isneginf().all(0)
    bad = has_nan | has_posinf | all_neginf
    if bad.any():
        i = int(bad.nonzero()[0])
        why = (
            "contain nan" if has_nan[i]
            else "contain +inf" if has_posinf[i]
            else "are all -inf (every weight zero)"
        )
        raise PyrovaeError(
            f"{int(bad.sum())} of {lw.shape[1]} data points have unusable log-weights "
            f"(nan, +inf, or all -inf); the first is point {i}, whose log-weights {why}. "
            f"Check the model's and the guide's log-densities for it."
        )
    return lw


def effective_sample_size(log_w: torch.Tensor) -> torch.Tensor:
    """ESS_n = (Σ_k w_kn)² / Σ_k w_kn², from log-weights log_w: (K, N) → (N,) float64.

    Computed as w_kn = exp(log_w_kn − max_j log_w_jn), so it is exact for equal weights
    (ESS = K), invariant to a constant added per point, and safe for log-weights of any
    magnitude. Clamped to [1, K] against round-off. Not differentiable (detached).
    """
    lw = _checked(log_w)
    w = (lw - lw.max(0).values).exp()  # (K, N), largest weight of each point is 1
    ess = w.sum(0) ** 2 / (w * w).sum(0)
    return ess.clamp(1.0, lw.shape[0])


def _psis_khat_numpy(log_w_nk: np.ndarray) -> np.ndarray:
    """PSIS k̂ of each row of ``log_w_nk`` (N, K) (samples on the last axis) → (N,) float64.

    ``reff = 1``: the samples are independent draws from q. arviz 0.x (Python 3.11):
    ``arviz.psislw(log_weights)``. arviz ≥ 1 (Python ≥ 3.12) moved PSIS to arviz_stats,
    whose ``array_stats.psislw`` takes log-*likelihoods* and negates them internally (PSIS-LOO
    convention), so it gets ``-log_w``. That branch follows arviz_stats' source and is not run
    in this project's environment (its test fakes the module).
    """
    log_w_nk = np.ascontiguousarray(log_w_nk, dtype=np.float64)
    with warnings.catch_warnings():
        # arviz 0.23 warns (FutureWarning) at import; numpy may warn on degenerate tails.
        warnings.simplefilter("ignore")
        import arviz

        if int(arviz.__version__.split(".")[0]) == 0:
            _, khat = arviz.psislw(log_w_nk, reff=1.0)
        else:
            from arviz_stats.base import array_stats

            _, khat = array_stats.psislw(-log_w_nk, r_eff=1.0, axis=-1)
    return np.asarray(khat, dtype=np.float64).reshape(log_w_nk.shape[:-1])


def psis_khat(log_w: torch.Tensor) -> torch.Tensor:
    """Pareto k̂ of the importance weights of each point; log_w: (K, N) → (N,) float64.

    k̂ is the shape of a generalized Pareto distribution fitted by PSIS (via arviz) to the
    largest min(K/5, 3√K) weights of a point. Special values:

    - ``-inf``: all K log-weights of the point are finite and equal up to round-off
      (max − min ≤ rtol · max(1, max |log w|), rtol = max(1e-10, 64 · eps of log_w's dtype)):
      q(z|x) ∝ p(z|x), the perfect proposal. arviz reports k̂ = inf for it (no tail to fit);
      we report the best case instead, and :func:`khat_summary` counts it as reliable.
    - ``nan``: K < ``MIN_PSIS_SAMPLES`` (too few samples for the tail fit); nothing computed.
    - ``+inf`` (from arviz): the tail has ≤ 4 distinct values above the cutoff, e.g. only a
      few non-zero weights; treated as unreliable.
    """
    lw = _checked(log_w).cpu()
    K, N = lw.shape
    khat = torch.full((N,), math.nan, dtype=torch.float64)
    if K >= MIN_PSIS_SAMPLES:
        eps = torch.finfo(log_w.dtype).eps
        rtol = max(1e-10, 64 * eps)
        spread = lw.max(0).values - lw.min(0).values  # (N,); nan-free, -inf → inf
        scale = lw.abs().max(0).values.clamp(min=1.0)
        constant = lw.isfinite().all(0) & (spread <= rtol * scale)
        khat[constant] = -math.inf
        rest = ~constant
        if rest.any():
            khat[rest] = torch.from_numpy(_psis_khat_numpy(lw[:, rest].T.numpy()))
    return khat.to(log_w.device)


def reliability(log_w: torch.Tensor) -> Reliability:
    """ESS, ESS / K and PSIS k̂ of each point from log-weights log_w: (K, N)."""
    ess = effective_sample_size(log_w)
    K = log_w.shape[0]
    note = ""
    if K < MIN_PSIS_SAMPLES:
        note = f"k̂ needs at least {MIN_PSIS_SAMPLES} importance samples per point; got K={K}."
    return Reliability(ess=ess, ess_fraction=ess / K, khat=psis_khat(log_w), note=note)


def khat_summary(khat) -> dict:
    """Summary of per-point k̂ (tensor or array-like); points with k̂ = nan are left out.

    Returns ``{"mean", "max", "share_above_0.7", "share_above_1", "n_points"}``:
    mean over finite k̂; max over the rest (so +inf shows, and -inf when every point has a
    perfect proposal); shares of the ``n_points`` non-nan points with k̂ > 0.7 and > 1
    (-inf, the perfect proposal, counts as reliable). nan where no value qualifies.
    """
    if isinstance(khat, torch.Tensor):
        khat = khat.detach().cpu()
    k = np.asarray(khat, dtype=np.float64).ravel()
    k = k[~np.isnan(k)]
    finite = k[np.isfinite(k)]
    return {
        "mean": float(finite.mean()) if finite.size else math.nan,
        "max": float(k.max()) if k.size else math.nan,
        "share_above_0.7": float((k > KHAT_THRESHOLD).mean()) if k.size else math.nan,
        "share_above_1": float((k > 1.0).mean()) if k.size else math.nan,
        "n_points": int(k.size),
    }
