"""The evidence engine against linear-Gaussian models, whose log p(x) and posterior are closed forms.

Tolerances are z-scores against each estimator's own standard error; everything runs in float64.
"""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.importance import vectorized_importance_weights
from torch.distributions import kl_divergence

from pyrovae import diagnostics, estimators
from pyrovae.errors import ContractError, PyrovaeError
from pyrovae.evidence import log_weights
from pyrovae.guides import LinearGaussianGuide
from pyrovae.models import PPCA, HierarchicalLinearGaussian

N, P = 6, 5
MODELS = {
    "ppca": lambda: PPCA(P, 2),
    "hierarchical": lambda: HierarchicalLinearGaussian(P, 2, 3),
}


@pytest.fixture(params=list(MODELS), ids=list(MODELS))
def oracle(request, float64):
    """A linear-Gaussian model, data drawn from it, and its exact log p(x)."""
    torch.manual_seed(0)
    model = MODELS[request.param]()
    x = model.marginal().sample((N,))  # (N, P)
    return model, x, model.log_px(x).detach()


def exact_guide(model, diagonal=False):
    return LinearGaussianGuide(model.data_dim, model.sites, diagonal=diagonal).set_exact_posterior(model)


def mismatched_guide(model, diagonal=True):
    """The exact posterior, shifted and widened, and (if diagonal) without its correlations."""
    guide = exact_guide(model, diagonal)
    with torch.no_grad():
        guide.c.add_(0.3)
        guide.L.mul_(1.3)
    return guide


def kl_to_posterior(model, guide, x):
    """Exact KL(q(u|x) ‖ p(u|x)) over the stacked latents, for a LinearGaussianGuide q."""
    mean, cov = model.posterior(x)
    L = guide.L.tril()
    q_scale_tril = torch.diag(L.diagonal().abs()) if guide.diagonal else L
    q = dist.MultivariateNormal(x @ guide.F.T + guide.c, scale_tril=q_scale_tril)
    return kl_divergence(q, dist.MultivariateNormal(mean, cov))


@torch.no_grad()
def test_exact_posterior_makes_every_estimate_exact(oracle):
    model, x, exact = oracle
    guide = exact_guide(model)
    log_w = log_weights(model.model, guide, x, 64).log_w  # (K, N)
    assert log_w.shape == (64, N)
    torch.testing.assert_close(log_w, exact.expand(64, N), atol=1e-10, rtol=0)
    for estimate in (estimators.elbo(log_w), estimators.log_px(log_w), estimators.iwae_bound(log_w, 8)):
        torch.testing.assert_close(estimate.value, exact, atol=1e-10, rtol=0)
        assert (estimate.stderr < 1e-10).all()
    assert diagnostics.reliability(log_w).khat.eq(float("-inf")).all()  # constant weights: a perfect proposal


@torch.no_grad()
def test_exact_posterior_chunked_equals_unchunked(oracle):
    model, x, exact = oracle
    guide = exact_guide(model)
    sizes = []
    chunked = log_weights(model.model, guide, x, 50, chunk_size=7, on_chunk=sizes.append).log_w  # 7 does not divide 50
    assert chunked.shape == (50, N)
    assert sizes == [7] * 7 + [1]
    torch.testing.assert_close(chunked, log_weights(model.model, guide, x, 50).log_w, atol=1e-10, rtol=0)


@torch.no_grad()
def test_mismatched_guide_importance_sampling_finds_log_px(oracle):
    model, x, exact = oracle
    log_w = log_weights(model.model, mismatched_guide(model), x, 20_000, chunk_size=3000).log_w
    est = estimators.log_px(log_w)
    z = (est.value - exact) / est.stderr
    assert z.abs().max() < 3, z
    assert diagnostics.reliability(log_w).khat.max() < 0.7  # a wider proposal: reliable weights


@torch.no_grad()
def test_mismatched_guide_elbo_is_log_px_minus_kl_to_posterior(oracle):
    """ELBO(x) = log p(x) − KL(q(z|x) ‖ p(z|x)) exactly; the estimate must agree within 3 s.e."""
    model, x, exact = oracle
    guide = mismatched_guide(model)
    gap = kl_to_posterior(model, guide, x)
    assert (gap > 0.1).all()
    log_w = log_weights(model.model, guide, x, 20_000).log_w
    elbo = estimators.elbo(log_w)
    z = (elbo.value - (exact - gap)) / elbo.stderr
    assert z.abs().max() < 3, z
    est_gap = estimators.gap(log_w)
    z_gap = (est_gap.value - gap) / est_gap.stderr
    assert z_gap.abs().max() < 3, z_gap


@torch.no_grad()
def test_mismatched_guide_iwae_bounds_rise_with_k(oracle):
    model, x, exact = oracle
    log_w = log_weights(model.model, mismatched_guide(model), x, 20_000).log_w
    bounds = [estimators.iwae_bound(log_w, k) for k in (1, 5, 50)]
    for lo, hi in zip(bounds, bounds[1:]):
        assert ((hi.value - lo.value) > 3 * (hi.stderr + lo.stderr)).all()
    assert ((exact - bounds[-1].value) > -3 * bounds[-1].stderr).all()  # still a lower bound


@torch.no_grad()
def test_analytic_kl_agrees_with_monte_carlo_and_closed_form(oracle):
    model, x, _ = oracle
    guide = mismatched_guide(model)
    report = estimators.kl(log_weights(model.model, guide, x, 20_000))
    assert set(report) == set(model.sites)
    for site, kl in report.items():
        assert kl.method == "analytic"
        assert kl.z_score.abs().max() < 3, (site, kl.z_score)
    if isinstance(model, PPCA):  # no latent parents: the analytic KL is exact, with no spread
        q_loc, q_scale = x @ guide.F.T + guide.c, guide.L.diagonal().abs()
        closed_form = 0.5 * (q_scale**2 + q_loc**2 - 1 - torch.log(q_scale**2)).sum(-1)
        torch.testing.assert_close(report["z"].analytic.value, closed_form)
        assert (report["z"].analytic.stderr < 1e-12).all()


@torch.no_grad()
def test_kl_without_closed_form_reports_monte_carlo_only(oracle):
    model, x, _ = oracle
    guide = mismatched_guide(model, diagonal=False)  # MultivariateNormal q vs Normal(..).to_event(1) p: no registered KL
    report = estimators.kl(log_weights(model.model, guide, x, 100))
    for kl in report.values():
        assert kl.method == "monte-carlo" and kl.analytic is None and kl.z_score is None
        assert kl.best is kl.monte_carlo


@torch.no_grad()
def test_site_terms_add_up_to_log_weights(oracle):
    model, x, _ = oracle
    terms = log_weights(model.model, mismatched_guide(model), x, 30)
    recon = estimators.reconstruction(terms).value
    kl_mc = sum(k.monte_carlo.value for k in estimators.kl(terms).values())
    torch.testing.assert_close(recon - kl_mc, estimators.elbo(terms.log_w).value)


@torch.no_grad()
def test_per_point_log_weights_sum_to_pyros_joint_weights(oracle):
    """Pyro's vectorized_importance_weights sums over the data plate; ours keep one column per point."""
    model, x, _ = oracle
    guide = mismatched_guide(model)
    pyro.set_rng_seed(3)
    ours = log_weights(model.model, guide, x, 40).log_w  # (K, N)
    pyro.set_rng_seed(3)
    theirs, _, _ = vectorized_importance_weights(model.model, guide, x, num_samples=40, max_plate_nesting=1)  # (K,)
    torch.testing.assert_close(ours.sum(-1), theirs)


@torch.no_grad()
def test_too_narrow_guide_gets_large_khat(float64):
    torch.manual_seed(0)
    model = PPCA(P, 2)
    x = model.marginal().sample((20,))
    guide = exact_guide(model)
    with torch.no_grad():
        guide.L.mul_(0.4)
    khat = diagnostics.reliability(log_weights(model.model, guide, x, 2000).log_w).khat
    assert diagnostics.khat_summary(khat)["share_above_0.7"] > 0.5


# ------------------------------------------------------------------ the contract, enforced


def guide_for(model):
    return LinearGaussianGuide(model.data_dim, model.sites, diagonal=True)


def test_model_without_data_plate_is_rejected():
    def model(x):
        with pyro.plate("points", x.shape[0]):  # the contract names it "data"
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True).expand(z.shape[:-1] + x.shape[-1:]), 1.0).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("points", x.shape[0]):
            pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))

    with pytest.raises(ContractError, match=r"site 'z' of the model is not inside pyro.plate\('data', \.\.\.\) at dim -1"):
        log_weights(model, guide, torch.zeros(3, 4), 5)


def test_guide_missing_a_latent_site_is_rejected():
    model = HierarchicalLinearGaussian(P, 2, 3)
    guide = LinearGaussianGuide(P, {"z1": 2}, diagonal=True)
    with pytest.raises(ContractError, match="does not sample latent site 'z2'"):
        log_weights(model.model, guide, torch.zeros(3, P), 5)


def test_global_latent_is_rejected():
    def model(x):
        scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(torch.zeros_like(x), scale[..., None]).to_event(1), obs=x)

    def guide(x):
        pyro.sample("scale", dist.LogNormal(0.0, 1.0))

    with pytest.raises(ContractError, match="site 'scale'"):
        log_weights(model, guide, torch.zeros(3, 4), 5)


@pytest.mark.parametrize("kwargs, message", [
    ({"num_particles": 0}, "particles must be at least 1"),
    ({"num_particles": 5, "chunk_size": 0}, "chunk size must be at least 1"),
], ids=["K=0", "chunk=0"])
def test_bad_particle_counts_are_rejected(kwargs, message):
    model = PPCA(P, 2)
    with pytest.raises(PyrovaeError, match=message):
        log_weights(model.model, guide_for(model), torch.zeros(3, P), **kwargs)


@pytest.mark.slow
def test_compiled_observed_log_density_equals_eager():
    """The torch.compile path computes the same Pyro log-density as eager mode, to float32 round-off."""
    from pyrovae.models import VAEConfig, build_vae

    vae = build_vae(VAEConfig(64, latent_dim=4, hidden=(32,)))
    x = torch.rand(3, 64).bernoulli()
    results = []
    for compiled in (False, True):
        pyro.set_rng_seed(0)
        results.append(log_weights(vae.model, vae.guide, x, 100, chunk_size=40, compiled=compiled).log_likelihood["x"])
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-4)
