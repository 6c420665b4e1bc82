"""The evidence engine against linear-Gaussian models, whose log p(x) and posterior are closed forms.

Tolerances are z-scores against each estimator's own standard error; everything runs in float64.
"""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer.importance import vectorized_importance_weights
from torch.distributions import kl_divergence

from pyrovae import diagnostics, estimators
from pyrovae.errors import ContractError, PyrovaeError
from pyrovae.evidence import SiteLogProbs, log_weights, site_log_probs
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


def chunks_of(model, guide, x, num_particles, chunk_size=None, before_chunk=None, join=SiteLogProbs.cat):
    """log_weights' chunked loop written out, with hooks to break it: ``before_chunk()`` runs before
    each chunk's draws, ``join(chunks)`` joins the chunks."""
    chunk_size = chunk_size or num_particles
    chunks = []
    for start in range(0, num_particles, chunk_size):
        if before_chunk is not None:
            before_chunk()
        chunks.append(site_log_probs(model, guide, x, min(chunk_size, num_particles - start)))
    return join(chunks)


def join_mispaired(chunks):
    """Chunks joined with the guide's log-densities one chunk out of step: each log q meets another draw's log p."""
    joined = SiteLogProbs.cat(chunks)
    joined.log_q = SiteLogProbs.cat(chunks[1:] + chunks[:1]).log_q
    return joined


CHUNKING = {  # name → a log_weights(model, guide, x, K, chunk_size) and the problem it must show
    "log_weights": (log_weights, None),
    "reused-stream": (lambda *a, **k: chunks_of(*a, **k, before_chunk=lambda: pyro.set_rng_seed(0)), "repeated draws"),
    "mispaired-chunks": (lambda *a, **k: chunks_of(*a, **k, join=join_mispaired), "spreads disagree"),
    "unseeded-chunks": (lambda *a, **k: chunks_of(*a, **k, before_chunk=torch.seed), "not reproducible"),
}


def chunking_problems(log_weights_fn, model, guide, x, exact, exact_elbo, K=1000, chunk_size=400) -> list[str]:
    """What goes wrong when ``log_weights_fn`` draws K particles ``chunk_size`` at a time (400 does not
    divide 1000) and all at once, each under its own fixed seed:

    - "not reproducible": the same seed does not give the same log-weights, to the bit;
    - "same draws": chunked and unchunked draws are equal (their seeds differ);
    - "repeated draws": a point's K log-weights are not K distinct numbers (a stream reused across chunks);
    - "estimates disagree": the ELBO or log p(x) of the chunked draws differs from that of the
      unchunked draws by 4 or more combined standard errors, or either from the exact value by 4 of its own;
    - "spreads disagree": the variances of the log-weights differ by 4 or more standard errors
      (the standard error of a sample variance: sqrt((m4 − s⁴) / K), m4 the fourth central moment).
    """
    def draw(seed, chunk):
        pyro.set_rng_seed(seed)
        return log_weights_fn(model.model, guide, x, K, chunk).log_w

    problems = []
    chunked, unchunked = draw(1, chunk_size), draw(2, None)
    if not (torch.equal(chunked, draw(1, chunk_size)) and torch.equal(unchunked, draw(2, None))):
        problems.append("not reproducible")
    if torch.equal(chunked, unchunked):
        problems.append("same draws")
    if any(len(column.unique()) < K for log_w in (chunked, unchunked) for column in log_w.T):
        problems.append("repeated draws")
    for estimator, truth in ((estimators.elbo, exact_elbo), (estimators.log_px, exact)):
        a, b = estimator(chunked), estimator(unchunked)
        z_between = (a.value - b.value) / (a.stderr**2 + b.stderr**2).sqrt()
        z_exact = torch.stack([(a.value - truth) / a.stderr, (b.value - truth) / b.stderr])
        if z_between.abs().max() >= 4 or z_exact.abs().max() >= 4:
            problems.append(f"estimates disagree: {estimator.__name__}")

    def variance_and_stderr(log_w):
        centred = log_w - log_w.mean(0)
        var, m4 = (centred**2).mean(0), (centred**4).mean(0)
        return var, ((m4 - var**2) / K).sqrt()

    (var_a, se_a), (var_b, se_b) = variance_and_stderr(chunked), variance_and_stderr(unchunked)
    if ((var_a - var_b) / (se_a**2 + se_b**2).sqrt()).abs().max() >= 4:
        problems.append("spreads disagree")
    return problems


@torch.no_grad()
@pytest.mark.parametrize("variant", list(CHUNKING))
def test_mismatched_guide_chunked_agrees_with_unchunked(oracle, variant):
    """With a guide that is not the posterior every draw has its own weight: chunked draws must be fresh,
    reproducible by seed and paired site by site, so that their estimates agree with the unchunked
    ones and with the exact values. Each broken chunking is rejected for what it breaks."""
    model, x, exact = oracle
    guide = mismatched_guide(model)
    exact_elbo = exact - kl_to_posterior(model, guide, x)
    log_weights_fn, expected = CHUNKING[variant]
    problems = chunking_problems(log_weights_fn, model, guide, x, exact, exact_elbo)
    if expected is None:
        assert problems == []
    else:
        assert any(expected in p for p in problems), problems


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
def test_kl_without_closed_form_reports_monte_carlo_only():
    from pyrovae.models import vae

    model = vae(6, latent_dim=2, hidden=(8,), prior="mixture", likelihood="gaussian")  # Normal q vs a mixture p
    x = torch.randn(5, 6)
    report = estimators.kl(log_weights(model.model, model.guide, x, 100))
    assert list(report) == ["z"]
    for kl in report.values():
        assert kl.method == "monte-carlo" and kl.analytic is None and kl.z_score is None
        assert kl.best is kl.monte_carlo


def recording(guide, values: dict):
    """The guide, keeping the values its latent sites draw in ``values``."""
    def program(x):
        trace = poutine.trace(guide).get_trace(x)
        values.update({name: site["value"] for name, site in trace.nodes.items() if name in guide.sites})

    return program


def independent_site_terms(model, guide, x, z: dict) -> SiteLogProbs:
    """Per-site log-densities (K, N) at the draws z (each (K, N, d)), from the oracle's and the
    (diagonal) guide's parameters with torch.distributions, not through Pyro's traces."""
    Normal = torch.distributions.Normal
    loc = x @ guide.F.T + guide.c  # (N, D_u): the guide's mean over the stacked latents
    scale = guide.L.diagonal().abs()
    log_q, start = {}, 0
    for site, d in guide.sites.items():
        log_q[site] = Normal(loc[:, start : start + d], scale[start : start + d]).log_prob(z[site]).sum(-1)
        start += d
    if isinstance(model, PPCA):
        log_prior = {"z": Normal(0.0, 1.0).log_prob(z["z"]).sum(-1)}
        bottom = z["z"]
    else:
        log_prior = {"z1": Normal(0.0, 1.0).log_prob(z["z1"]).sum(-1),
                     "z2": Normal(z["z1"] @ model.A.T, model.top_noise).log_prob(z["z2"]).sum(-1)}
        bottom = z["z2"]
    log_likelihood = {"x": Normal(bottom @ model.W.T + model.b, model.noise_scale).log_prob(x).sum(-1)}
    return SiteLogProbs(log_likelihood, log_prior, log_q)


def site_term_problems(terms: SiteLogProbs, expected: SiteLogProbs, log_joint: torch.Tensor) -> list[str]:
    """The per-site terms (and log p(x, z)) of ``terms`` that differ from ``expected`` beyond round-off."""
    problems = []
    for kind in ("log_likelihood", "log_prior", "log_q"):
        ours, theirs = getattr(terms, kind), getattr(expected, kind)
        if set(ours) != set(theirs):
            problems.append(f"{kind}: sites {sorted(ours)}, expected {sorted(theirs)}")
            continue
        problems += [f"{kind}[{site!r}]" for site in ours if not torch.allclose(ours[site], theirs[site], rtol=1e-10, atol=1e-10)]
    ours_joint = sum(terms.log_likelihood.values()) + sum(terms.log_prior.values())
    if not torch.allclose(ours_joint, log_joint, rtol=1e-10, atol=1e-10):
        problems.append("log p(x, z)")
    return problems


SITE_TERM_BREAKS = {  # name → a mutation of correct per-site terms that still add up to their own log_w, and what it must flag
    "correct": (lambda t: t, None),
    "prior-and-guide-swapped": (lambda t: SiteLogProbs(t.log_likelihood, t.log_q, t.log_prior, t.kl_analytic), "log_q["),
    "likelihood-of-another-particle": (lambda t: SiteLogProbs(
        {s: v.roll(1, 0) for s, v in t.log_likelihood.items()}, t.log_prior, t.log_q, t.kl_analytic), "log_likelihood['x']"),
    "prior-scaled": (lambda t: SiteLogProbs(
        t.log_likelihood, {s: 2 * v for s, v in t.log_prior.items()}, t.log_q, t.kl_analytic), "log_prior["),
}


@torch.no_grad()
@pytest.mark.parametrize("variant", list(SITE_TERM_BREAKS))
def test_site_terms_add_up_to_log_weights(oracle, variant):
    """Each site's term is the density of that site's distribution at the drawn z, computed here with
    torch.distributions on the oracle's parameters, and log p(x, z) is log p(x) + log p(z | x) from the
    closed forms. The parts add up to the ELBO (reconstruction − Monte Carlo KL), which holds by
    construction and so cannot tell right terms from wrong ones: mutated terms pass it and fail the rest."""
    model, x, exact = oracle
    guide = mismatched_guide(model)
    z = {}
    mutate, expected = SITE_TERM_BREAKS[variant]
    terms = mutate(log_weights(model.model, recording(guide, z), x, 30))
    u = torch.cat([z[site] for site in model.sites], -1)  # (K, N, D_u), the stacked latents
    mean, cov = model.posterior(x)
    log_joint = exact + dist.MultivariateNormal(mean, covariance_matrix=cov).log_prob(u)  # (K, N)
    problems = site_term_problems(terms, independent_site_terms(model, guide, x, z), log_joint)
    recon = estimators.reconstruction(terms).value
    kl_mc = sum(k.monte_carlo.value for k in estimators.kl(terms).values())
    torch.testing.assert_close(recon - kl_mc, estimators.elbo(terms.log_w).value)
    if expected is None:
        assert problems == []
    else:
        assert any(p.startswith(expected) for p in problems) and "log p(x, z)" in problems, problems


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
