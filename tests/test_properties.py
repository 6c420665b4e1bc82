"""Properties of the estimators' algebra, on log-weights and shapes that hypothesis draws.

- Chunking: with the exact posterior as guide every log-weight is log p(x), whatever z was
  drawn, so chunked and unchunked log-weights give the same estimates to float64 round-off,
  for any chunk size (dividing K or not).
- Permutations: the ELBO and the importance-sampled log p(x) are symmetric functions of the K
  draws. The IWAE estimate of L_k splits the draws into G = ⌊K/k⌋ groups of *consecutive* draws
  and ignores the K mod k left over, so it is invariant under the permutations that keep the
  groups (reordering draws within a group, reordering whole groups), whatever the left-over draws
  are. For 1 < k < K a permutation that mixes groups changes its value in general (the estimate is
  exchangeable only in distribution, for i.i.d. draws); for k = 1 and k = K every permutation
  leaves it unchanged.
- Shifts: every location functional of the log-weights (ELBO, log p(x), L_k, the mean over
  points) moves by exactly c, to round-off, when every log-weight does, and none of the standard
  errors moves; the gap log p(x) − ELBO does not move. Per site: the reconstruction term moves with
  the log-likelihood, the Monte Carlo KL with log q, the analytic KL with neither.
- Monotonicity: E[L̂_k] ≤ E[L̂_m] for k < m (Burda et al. 2016, Theorem 1), checked on the
  linear-Gaussian oracles with a guide that is not the posterior, as means over many points
  against their standard errors.
"""

import math

import numpy as np
import pyro
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pyrovae import estimators
from pyrovae.estimators import Estimate
from pyrovae.evidence import SiteLogProbs, log_weights
from pyrovae.guides import LinearGaussianGuide
from pyrovae.models import PPCA, HierarchicalLinearGaussian

P = 5
ORACLES = {
    "ppca": lambda: PPCA(P, 2),
    "hierarchical": lambda: HierarchicalLinearGaussian(P, 2, 3),
}
EPS = torch.finfo(torch.float64).eps



pytestmark = pytest.mark.usefixtures("one_thread")


def fast(max_examples: int) -> settings:
    """Fixed examples (derandomized, nothing stored between runs), no per-example deadline.

    The autouse ``clean_pyro`` fixture is function-scoped, so all examples of a test share its
    state (param store, seeds, dtype); the tests seed what they draw themselves.
    """
    return settings(
        max_examples=max_examples, deadline=None, derandomize=True, database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )


def tables(K: int, N: int, bound: float = 50.0) -> st.SearchStrategy[torch.Tensor]:
    """Finite float64 tables (K, N) with entries in [-bound, bound]."""
    elements = st.floats(-bound, bound, allow_nan=False, allow_infinity=False)
    return arrays(np.float64, (K, N), elements=elements).map(torch.from_numpy)


@st.composite
def log_weight_tables(draw, max_particles=24, max_points=3):
    """Log-weights (K, N), K ≤ max_particles, N ≤ max_points; a column spreads up to 100 nats."""
    return draw(tables(draw(st.integers(1, max_particles)), draw(st.integers(1, max_points))))


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
    K=st.integers(1, 30),
    chunk=st.integers(1, 34),
)
@example(oracle="hierarchical", seed=0, n_points=3, K=23, chunk=7)  # 7 does not divide 23
@example(oracle="ppca", seed=0, n_points=2, K=5, chunk=9)  # one chunk larger than K
@torch.no_grad()
def test_chunked_log_weights_give_the_unchunked_estimates(float64, oracle, seed, n_points, K, chunk):
    model, guide, x = exact_oracle(oracle, seed, n_points)
    exact = model.log_px(x)
    sizes = []
    with pyro.validation_enabled(False):  # arithmetic, not arguments (test_evidence validates those): 4-6x faster
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
    leftover = data.draw(tables(K - G * k, N, bound=1e3), label="left-over draws")
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


@fast(40)
@given(K=st.integers(1, 12), N=st.integers(1, 3), a=st.floats(-1e3, 1e3), b=st.floats(-1e3, 1e3), data=st.data())
def test_site_estimates_move_with_a_shift_of_their_terms(K, N, a, b, data):
    """reconstruction = E log p(x|z) moves with the log-likelihood; the Monte Carlo KL of a site with
    its log q; the analytic KL with neither; the ELBO with both, in opposite signs."""
    log_lik, log_prior, log_q, analytic = (data.draw(tables(K, N), label=t) for t in ("log p(x|z)", "log p(z)", "log q(z)", "KL"))

    def terms(shift_lik, shift_q):
        return SiteLogProbs({"x": log_lik + shift_lik}, {"z": log_prior}, {"z": log_q + shift_q}, {"z": analytic})

    base, shifted = terms(0.0, 0.0), terms(a, b)
    tol = 16 * K * EPS * (1 + 3 * 50.0 + abs(a) + abs(b))
    pairs = [
        (estimators.reconstruction(shifted), estimators.reconstruction(base), a),
        (estimators.kl(shifted)["z"].monte_carlo, estimators.kl(base)["z"].monte_carlo, b),
        (estimators.kl(shifted)["z"].analytic, estimators.kl(base)["z"].analytic, 0.0),
        (estimators.elbo(shifted.log_w), estimators.elbo(base.log_w), a - b),
    ]
    for moved, still, by in pairs:
        torch.testing.assert_close(moved.value, still.value + by, atol=tol, rtol=0)
        torch.testing.assert_close(moved.stderr, still.stderr, atol=tol, rtol=1e-9, equal_nan=True)


# ---------------------------------------------------------------- L_k rises with k


N_POINTS, K_DRAWS = 200, 256


@pytest.fixture(scope="module")
def mismatched_log_weights() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per oracle: log-weights (K_DRAWS, N_POINTS) from a guide that is not the posterior (the exact
    one made mean-field, shifted by 0.3 and scaled by 0.8), and the exact log p(x), (N_POINTS,)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        out = {}
        for i, name in enumerate(ORACLES):
            torch.manual_seed(100 + i)
            model = ORACLES[name]()
            x = model.marginal().sample((N_POINTS,))
            guide = LinearGaussianGuide(model.data_dim, model.sites, diagonal=True).set_exact_posterior(model)
            with torch.no_grad(), pyro.validation_enabled(False):
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


@fast(15)
@given(oracle=st.sampled_from(list(ORACLES)), pair=st.lists(st.integers(1, 64), min_size=2, max_size=2, unique=True))
def test_iwae_bound_is_non_decreasing_in_k_in_expectation(mismatched_log_weights, oracle, pair):
    log_w, _ = mismatched_log_weights[oracle]
    k_lo, k_hi = sorted(pair)
    z = mean_z(estimators.iwae_bound(log_w, k_hi).value - estimators.iwae_bound(log_w, k_lo).value)
    assert z > -3, (k_lo, k_hi, z)
