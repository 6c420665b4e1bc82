"""Properties of the estimators' algebra, on log-weights and shapes that hypothesis draws.

- Chunking: with the exact posterior as guide every log-weight is log p(x), whatever z was
  drawn, so chunked and unchunked log-weights give the same estimates to float64 round-off,
  for any chunk size (dividing K or not).
- Permutations: the ELBO and the importance-sampled log p(x) are symmetric functions of the K
  draws. The IWAE estimate of L_k splits the draws into ⌊K/k⌋ groups of *consecutive* draws and
  drops the K mod k left over, so it is invariant under exactly those permutations that keep the
  groups: reordering draws within a group, reordering whole groups, and anything done to the
  left-over draws. For 1 < k < K a permutation that mixes groups changes its value (it is
  exchangeable only in distribution, for i.i.d. draws); for k = 1 and k = K every permutation
  leaves it unchanged.
- Shifts: every location functional of the log-weights (ELBO, log p(x), L_k, the mean over
  points) moves by exactly c when every log-weight does; the gap log p(x) − ELBO and every
  standard error do not move.
- Monotonicity: E[L̂_k] ≤ E[L̂_m] for k < m (Burda et al. 2016, Theorem 1), checked on the
  linear-Gaussian oracles with a guide that is not the posterior, as means over many points
  against their standard errors.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pyrovae import estimators
from pyrovae.estimators import Estimate
from pyrovae.evidence import log_weights
from pyrovae.guides import LinearGaussianGuide
from pyrovae.models import PPCA, HierarchicalLinearGaussian

P = 5
ORACLES = {
    "ppca": lambda: PPCA(P, 2),
    "hierarchical": lambda: HierarchicalLinearGaussian(P, 2, 3),
}
EPS = torch.finfo(torch.float64).eps

# The autouse clean_pyro fixture is function-scoped: every example of a test shares its state
# (param store, seeds, dtype), which these tests reset themselves where it matters.
def fast(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )


@st.composite
def log_weight_tables(draw, max_particles=24, max_points=3, bound=50.0):
    """Finite float64 log-weights (K, N); columns spread up to 2·bound nats."""
    K = draw(st.integers(1, max_particles))
    N = draw(st.integers(1, max_points))
    values = draw(arrays(np.float64, (K, N), elements=st.floats(-bound, bound, allow_nan=False, allow_infinity=False)))
    return torch.from_numpy(values)


def assert_estimates_equal(a: Estimate, b: Estimate, atol: float) -> None:
    torch.testing.assert_close(a.value, b.value, atol=atol, rtol=0)
    torch.testing.assert_close(a.stderr, b.stderr, atol=atol, rtol=0, equal_nan=True)


def all_estimates(log_w: torch.Tensor, ks) -> dict[str, Estimate]:
    out = {"elbo": estimators.elbo(log_w), "log_px": estimators.log_px(log_w), "gap": estimators.gap(log_w)}
    out.update({f"L_{k}": estimators.iwae_bound(log_w, k) for k in ks})
    return out


def iwae_ks(K: int) -> list[int]:
    """Several k between 1 and K: the ends, small ones, one that divides K and one that need not."""
    return sorted({1, 2, 3, max(1, K // 2), max(1, K // 3 + 1), K} & set(range(1, K + 1)))


# ---------------------------------------------------------------- chunking


def exact_oracle(name: str, seed: int, n_points: int):
    torch.manual_seed(seed)
    model = ORACLES[name]()
    x = model.marginal().sample((n_points,))
    guide = LinearGaussianGuide(model.data_dim, model.sites).set_exact_posterior(model)
    return model, guide, x


@fast(15)
@given(
    oracle=st.sampled_from(list(ORACLES)),
    seed=st.integers(0, 2**16),
    n_points=st.integers(1, 4),
    K=st.integers(1, 24),
    chunk=st.integers(1, 28),
)
@torch.no_grad()
def test_chunked_log_weights_give_the_unchunked_estimates(float64, oracle, seed, n_points, K, chunk):
    model, guide, x = exact_oracle(oracle, seed, n_points)
    exact = model.log_px(x)
    sizes = []
    chunked = log_weights(model.model, guide, x, K, chunk_size=chunk, on_chunk=sizes.append).log_w
    whole = log_weights(model.model, guide, x, K).log_w
    assert sizes == [min(chunk, K - start) for start in range(0, K, chunk)]
    assert chunked.shape == whole.shape == (K, n_points)
    atol = 64 * EPS * (1 + exact.abs().max().item())  # a few ulps of the densities summed into log w
    torch.testing.assert_close(chunked, exact.expand(K, -1), atol=atol, rtol=0)
    a, b = all_estimates(chunked, iwae_ks(K)), all_estimates(whole, iwae_ks(K))
    for name in a:
        assert_estimates_equal(a[name], b[name], 4 * atol)


# ---------------------------------------------------------------- permutations


def roundoff(log_w: torch.Tensor, c: float = 0.0) -> float:
    """An absolute tolerance for reordering or shifting sums over log_w: K·16 ulps of the largest magnitude."""
    return 16 * log_w.shape[0] * EPS * (1 + abs(c) + log_w.abs().max().item())


@fast(60)
@given(log_w=log_weight_tables(), data=st.data())
def test_elbo_and_log_px_are_symmetric_in_the_draws(log_w, data):
    K = log_w.shape[0]
    order = torch.tensor(data.draw(st.permutations(range(K)), label="permutation"))
    shuffled = log_w[order]
    for name in ("elbo", "log_px", "gap"):
        assert_estimates_equal(getattr(estimators, name)(shuffled), getattr(estimators, name)(log_w), roundoff(log_w))
    for k in {1, K}:  # one draw per group, or one group of all: no grouping left to break
        assert_estimates_equal(estimators.iwae_bound(shuffled, k), estimators.iwae_bound(log_w, k), roundoff(log_w))


@fast(60)
@given(log_w=log_weight_tables(), data=st.data())
def test_iwae_bound_is_invariant_to_permutations_that_keep_its_groups(log_w, data):
    """Groups are draws [g·k, (g+1)·k), g < G = ⌊K/k⌋; draws from G·k on are left over and unused."""
    K, N = log_w.shape
    k = data.draw(st.integers(1, K), label="k")
    G = K // k
    group_order = data.draw(st.permutations(range(G)), label="group order")
    within = [data.draw(st.permutations(range(k)), label=f"order within group {g}") for g in range(G)]
    order = [group_order[g] * k + i for g in range(G) for i in within[g]]
    kept = log_w[torch.tensor(order, dtype=torch.long)] if order else log_w[:0]
    leftover = torch.from_numpy(data.draw(arrays(np.float64, (K - G * k, N), elements=st.floats(-1e3, 1e3)), label="left-over draws"))
    permuted = torch.cat([kept, leftover])
    assert_estimates_equal(estimators.iwae_bound(permuted, k), estimators.iwae_bound(log_w, k), roundoff(log_w))


def test_iwae_bound_changes_under_a_permutation_that_mixes_groups():
    """The invariance above is all there is: for 1 < k < K the grouping is part of the estimate."""
    log_w = torch.tensor([[0.0], [0.0], [10.0], [10.0]], dtype=torch.float64)
    mixed = log_w[[0, 2, 1, 3]]
    assert estimators.iwae_bound(log_w, 2).value.item() == pytest.approx(5.0)  # groups {0, 0}, {10, 10}
    assert estimators.iwae_bound(mixed, 2).value.item() == pytest.approx(math.log((1 + math.exp(10)) / 2))
    assert estimators.log_px(mixed).value.item() == pytest.approx(estimators.log_px(log_w).value.item())


# ---------------------------------------------------------------- shifts


@fast(80)
@given(log_w=log_weight_tables(), c=st.floats(-1e3, 1e3, allow_nan=False), data=st.data())
def test_every_estimate_moves_with_a_shift_of_the_log_weights(log_w, c, data):
    K = log_w.shape[0]
    ks = sorted(set(iwae_ks(K)) | {data.draw(st.integers(1, K), label="k")})
    shifted, base = all_estimates(log_w + c, ks), all_estimates(log_w, ks)
    tol = roundoff(log_w, c)
    for name in base:
        moves_by = 0.0 if name == "gap" else c  # the gap is a difference of two location functionals
        torch.testing.assert_close(shifted[name].value, base[name].value + moves_by, atol=tol, rtol=0, msg=name)
        torch.testing.assert_close(shifted[name].stderr, base[name].stderr, atol=tol, rtol=1e-9, equal_nan=True, msg=name)
    (m_shifted, se_shifted), (m_base, se_base) = shifted["elbo"].mean(), base["elbo"].mean()
    assert m_shifted == pytest.approx(m_base + c, abs=tol, rel=0)
    assert se_shifted == pytest.approx(se_base, abs=tol, rel=1e-9, nan_ok=True)


# ---------------------------------------------------------------- L_k rises with k


N_POINTS, K_DRAWS = 200, 512


@pytest.fixture(scope="module")
def mismatched_log_weights() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per oracle: log-weights (K_DRAWS, N_POINTS) from a guide that is not the posterior (mean-field,
    shifted and too narrow: heavy-tailed weights), and the exact log p(x), (N_POINTS,)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        out = {}
        for i, name in enumerate(ORACLES):
            torch.manual_seed(100 + i)
            model = ORACLES[name]()
            x = model.marginal().sample((N_POINTS,))
            guide = LinearGaussianGuide(model.data_dim, model.sites, diagonal=True).set_exact_posterior(model)
            with torch.no_grad():
                guide.c.add_(0.3)
                guide.L.mul_(0.8)
                log_w = log_weights(model.model, guide, x, K_DRAWS).log_w
                out[name] = (log_w, model.log_px(x))
        return out
    finally:
        torch.set_default_dtype(previous)


def mean_z(d: torch.Tensor) -> float:
    """The mean of d over points, in standard errors across points."""
    return (d.mean() / (d.std() / math.sqrt(d.numel()))).item()


@pytest.mark.parametrize("oracle", list(ORACLES))
def test_iwae_bounds_rise_with_k_and_stay_below_log_px(mismatched_log_weights, oracle):
    log_w, exact = mismatched_log_weights[oracle]
    ks = [1, 2, 4, 8, 16, 64, K_DRAWS]
    bounds = [estimators.iwae_bound(log_w, k) for k in ks]
    for k_lo, k_hi, lo, hi in zip(ks, ks[1:], bounds, bounds[1:]):
        assert mean_z(hi.value - lo.value) > -3, (k_lo, k_hi)  # paired: the same draws
    assert mean_z(bounds[3].value - bounds[0].value) > 10  # the guide is far enough from the posterior to tell
    for k, bound in zip(ks, bounds):
        assert mean_z(exact - bound.value) > -3, k  # a lower bound on log p(x)
    print(oracle, [round(mean_z(hi.value - lo.value), 1) for lo, hi in zip(bounds, bounds[1:])], mean_z(bounds[3].value - bounds[0].value))


@fast(20)
@given(oracle=st.sampled_from(list(ORACLES)), pair=st.lists(st.integers(1, 64), min_size=2, max_size=2, unique=True))
def test_iwae_bound_is_non_decreasing_in_k_in_expectation(mismatched_log_weights, oracle, pair):
    log_w, _ = mismatched_log_weights[oracle]
    k_lo, k_hi = sorted(pair)
    z = mean_z(estimators.iwae_bound(log_w, k_hi).value - estimators.iwae_bound(log_w, k_lo).value)
    assert z > -3, (k_lo, k_hi, z)
