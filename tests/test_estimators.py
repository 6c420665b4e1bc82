"""Estimators on synthetic log-weights whose expectations are known in closed form.

With log w ~ N(μ, s²) (log-normal weights): E[log w] = μ, so the ELBO estimator targets μ, and
log E[w] = μ + s²/2, the target of the importance-sampled log p(x).
"""

import math

import pytest
import torch

from pyrovae import estimators
from pyrovae.errors import PyrovaeError

MU, S = -3.0, 0.8


@pytest.fixture
def lognormal_log_w(float64):
    torch.manual_seed(0)
    return MU + S * torch.randn(40_000, 6)  # (K, N)


def z_scores(estimate, target):
    return (estimate.value - target) / estimate.stderr


def test_elbo_targets_mean_log_weight(lognormal_log_w):
    z = z_scores(estimators.elbo(lognormal_log_w), MU)
    assert z.abs().max() < 3.5, z


def test_log_px_targets_log_mean_weight(lognormal_log_w):
    z = z_scores(estimators.log_px(lognormal_log_w), MU + S**2 / 2)
    assert z.abs().max() < 3.5, z


def test_log_px_stderr_matches_spread_of_repeats(float64):
    """The delta-method standard error agrees with the spread of independent repeats."""
    torch.manual_seed(1)
    repeats = MU + S * torch.randn(200, 2000, 1)  # 200 independent estimates with K = 2000
    values = torch.stack([estimators.log_px(lw).value for lw in repeats]).squeeze()
    stderrs = torch.stack([estimators.log_px(lw).stderr for lw in repeats]).squeeze()
    # the sample sd of 200 repeats has relative standard error ≈ 1/√(2·199) = 5 %
    assert values.std().item() == pytest.approx(stderrs.mean().item(), rel=0.2)


def test_iwae_bounds_rise_with_k_and_meet_the_estimators_at_the_ends(lognormal_log_w):
    bounds = {k: estimators.iwae_bound(lognormal_log_w, k) for k in (1, 10, 100)}
    torch.testing.assert_close(bounds[1].value, estimators.elbo(lognormal_log_w).value)
    for lo, hi in ((1, 10), (10, 100)):
        diff = bounds[hi].value - bounds[lo].value
        assert (diff > 3 * (bounds[hi].stderr + bounds[lo].stderr)).all()
    K = lognormal_log_w.shape[0]
    full = estimators.iwae_bound(lognormal_log_w, K)
    torch.testing.assert_close(full.value, estimators.log_px(lognormal_log_w).value)
    assert full.stderr.isnan().all()  # one group: no spread to estimate


def test_iwae_bound_uses_disjoint_groups():
    log_w = torch.tensor([[0.0], [math.log(3.0)], [math.log(5.0)], [math.log(7.0)], [100.0]])
    bound = estimators.iwae_bound(log_w, 2)  # groups {1, 3}, {5, 7}; the fifth draw is left over
    expected = (math.log(2.0) + math.log(6.0)) / 2
    assert bound.value.item() == pytest.approx(expected)


@pytest.mark.parametrize("k", [0, 6], ids=["zero", "above-K"])
def test_iwae_bound_rejects_bad_k(k):
    with pytest.raises(PyrovaeError, match="1 <= k <= K = 5"):
        estimators.iwae_bound(torch.zeros(5, 2), k)


def test_log_weights_must_be_two_dimensional():
    with pytest.raises(PyrovaeError, match=r"\(particles, data points\)"):
        estimators.elbo(torch.zeros(5))


def test_gap_is_log_px_minus_elbo(lognormal_log_w):
    gap = estimators.gap(lognormal_log_w)
    torch.testing.assert_close(gap.value, estimators.log_px(lognormal_log_w).value - estimators.elbo(lognormal_log_w).value)
    z = z_scores(gap, S**2 / 2)
    assert z.abs().max() < 3.5


def test_single_sample_has_nan_stderr():
    est = estimators.elbo(torch.zeros(1, 3))
    assert est.stderr.isnan().all()
