"""The inference gaps and ELBO surgery against the closed forms of linear-Gaussian models.

Probabilistic PCA has a Gaussian posterior p(z|x) = N(m(x), C) with C the same for every x, and a
Gaussian guide linear in x can be set to anything from the exact posterior to a poor diagonal
fit, so every number the gaps report has a closed form here:

- a full-covariance family contains the posterior: approximation gap 0, amortization gap
  KL(q ‖ p(z|x)) (large for an untrained encoder);
- the best diagonal Gaussian under KL(q ‖ p) has the posterior's mean and variances 1/(C⁻¹)_ii, so
  the approximation gap is ½ [Σ_i log (C⁻¹)_ii + log det C] at every point;
- for a linear guide q(z|x) = N(F x + c, S) and data x ~ N(b, Σ_x), the aggregate posterior is
  N(F b + c, F Σ_x Fᵀ + S): I_q(x; z) = ½ log det(F Σ_x Fᵀ + S) − ½ log det S, and KL(q(z) ‖ p(z))
  is a Gaussian KL.

Each comparison is a z-score against the standard error across points of the per-point
differences from the closed form (Monte Carlo and optimization noise both), with a round-off
floor for estimates that are exact. Each assertion is shown to fail on a deliberately broken
variant of the code (``BROKEN``).
"""

import dataclasses
import math
import re

import pytest
import torch
from torch.distributions import MultivariateNormal, Normal, kl_divergence

from pyrovae import gaps
from pyrovae.errors import PyrovaeError
from pyrovae.estimators import Estimate
from pyrovae import evaluate as evaluate_module
from pyrovae.evaluate import evaluate
from pyrovae.guides import IAFEncoder, LinearGaussianGuide
from pyrovae.models import PPCA, HierarchicalLinearGaussian, TwoLayerVAE, m2

pytestmark = pytest.mark.usefixtures("one_thread", "float64")

P, D, N = 6, 2, 40
COSINE = 0.5625  # WᵀW = [[1, c], [c, 1]], σ = 0.5: posterior correlation −4c/5 = −0.45
ROUNDOFF = 1e-6
Z = 4.0


def correlated_ppca(cosine: float = COSINE) -> PPCA:
    """PPCA whose two loading vectors have unit length and the given cosine, in a random plane."""
    torch.manual_seed(0)
    model = PPCA(P, D, noise_scale=0.5)
    q, _ = torch.linalg.qr(torch.randn(P, D))
    with torch.no_grad():
        model.W.copy_(torch.stack([q[:, 0], cosine * q[:, 0] + math.sqrt(1 - cosine**2) * q[:, 1]], 1))
    return model


def data(model, n: int = N, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return model.marginal().sample((n,)).detach()


def guide_gaussian(guide: LinearGaussianGuide, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q(z|x_n) = N(mean_n, cov): means (N, D) and the covariance (D, D) the guide samples from."""
    L = guide.L.detach().tril()
    cov = torch.diag(L.diagonal() ** 2) if guide.diagonal else L @ L.T
    return (x @ guide.F.T + guide.c).detach(), cov


def kl_to_posterior(model, guide, x) -> torch.Tensor:
    """KL(q(z|x_n) ‖ p(z|x_n)) per point, (N,)."""
    mean, cov = guide_gaussian(guide, x)
    post_mean, post_cov = (t.detach() for t in model.posterior(x))
    return kl_divergence(MultivariateNormal(mean, cov), MultivariateNormal(post_mean, post_cov))


def mean_field_kl(model) -> float:
    """min over diagonal q of KL(q ‖ N(m, C)) = ½ [Σ_i log (C⁻¹)_ii + log det C]."""
    _, C = model.posterior(model.b[None].detach())
    C = C.detach()
    return 0.5 * (torch.linalg.inv(C).diagonal().log().sum() + torch.logdet(C)).item()


def z_score(estimate: Estimate, target) -> float:
    """|mean(estimate − target)| over the points in Monte Carlo standard errors of that mean,
    √(Σ se_n²)/N (the targets are exact given the points), floored at round-off."""
    d = estimate.value - target
    se = estimate.stderr.pow(2).sum().sqrt().item() / len(d)
    return abs(d.mean().item()) / (se + ROUNDOFF)


def z_across(values: torch.Tensor, target) -> float:
    """|mean(values − target)| in standard errors across points (for targets of the population the
    points are drawn from), floored at round-off."""
    d = values - target
    return abs(d.mean().item()) / (d.std().item() / math.sqrt(len(d)) + ROUNDOFF)


# ---------------------------------------------------------------- broken variants


def mean_of_logs(z, components, num_points, **kwargs):
    """log q(z) as the mean of log q(z | x_m) instead of the log of their mean."""
    parts = [fn.log_prob(z.reshape(-1, 1, *fn.event_shape)) for fn in components]
    return torch.cat(parts, -1).mean(-1).reshape(z.shape[: z.dim() - len(components[0].event_shape)])


def scale_not_free(families):
    name, parameters, build = families[Normal]
    return {**families, Normal: (name, parameters, lambda p: build({"loc": p["loc"], "log_scale": p["log_scale"].detach() + 0 * p["log_scale"]}))}


BROKEN = {  # name → (attribute of pyrovae.gaps, replacement given the original)
    "not-fitted": ("lr_factor", lambda f: lambda step, steps: 0.0),
    "descent": ("stl_elbo", lambda f: lambda *args, **kwargs: -f(*args, **kwargs)),
    "scale-not-free": ("FAMILIES", scale_not_free),
    "amortization-sign": ("amortization_gap", lambda f: lambda optimal, elbo: f(elbo, optimal)),
    "log-sum": ("aggregate_log_density", lambda f: lambda z, c, n, **kw: f(z, c, n, **kw) + math.log(n)),
    "mean-of-logs": ("aggregate_log_density", lambda f: mean_of_logs),
}


def apply(monkeypatch, variant: str) -> None:
    if variant != "correct":
        name, replace = BROKEN[variant]
        monkeypatch.setattr(gaps, name, replace(getattr(gaps, name)))


def check(variant: str, problems: list[str], expected: str) -> None:
    """The correct code has no problem; a broken variant has the one it must cause."""
    if variant == "correct":
        assert problems == []
    else:
        assert any(expected in p for p in problems), problems


def fitted(model, guide, x, **settings) -> gaps.Gaps:
    return gaps.inference_gaps(model.model, guide.forward, x, gaps.GapSettings(**{"batch_size": len(x), **settings}), seed=0)


# ---------------------------------------------------------------- the gaps


@pytest.mark.parametrize("variant", ["correct", "descent"])
def test_exact_posterior_has_no_gaps(monkeypatch, variant):
    """q = p(z|x): ELBO[q] = log p(x) at every draw; q* starts there and stays (its gradient is 0)."""
    apply(monkeypatch, variant)
    model = correlated_ppca()
    x = data(model)
    guide = LinearGaussianGuide(P, model.sites).set_exact_posterior(model)
    result = fitted(model, guide, x, steps=100)
    problems = []
    for name in ("approximation", "amortization"):
        if z_score(getattr(result, name), 0.0) > Z:
            problems.append(f"{name} gap not 0")
    check(variant, problems, "gap not 0")
    if variant == "correct":
        error = (result.log_px.value - model.log_px(x).detach()).abs()
        assert (error <= Z * result.log_px.stderr + ROUNDOFF).all()
        assert result.families == {"z": "MultivariateNormal"}


@pytest.mark.parametrize("variant", ["correct", "not-fitted", "amortization-sign"])
def test_full_covariance_family_has_no_approximation_gap(monkeypatch, variant):
    """An untrained encoder (q = N(0, I) for every x) in a family that holds the posterior: the
    approximation gap is 0 and the amortization gap is all of KL(q ‖ p(z|x)), several nats."""
    apply(monkeypatch, variant)
    model = correlated_ppca()
    x = data(model)
    guide = LinearGaussianGuide(P, model.sites)
    result = fitted(model, guide, x, steps=400, lr=0.05)
    kl = kl_to_posterior(model, guide, x)
    assert kl.mean() > 2  # the oracle's premise: a poor encoder
    problems = []
    if z_score(result.approximation, 0.0) > Z:
        problems.append("approximation gap not 0")
    if z_score(result.amortization, kl) > Z or result.amortization.value.mean() < 2:
        problems.append("amortization gap is not KL(q ‖ posterior)")
    check(variant, problems, "not" if variant == "not-fitted" else "amortization gap")
    if variant == "not-fitted":
        assert len(problems) == 2
    if variant == "correct":
        assert not result.still_rising().any()


@pytest.mark.parametrize("variant", ["correct", "scale-not-free", "amortization-sign"])
def test_diagonal_family_on_a_correlated_posterior(monkeypatch, variant):
    """The best diagonal q* has variances 1/(C⁻¹)_ii: approximation gap ½[Σ log (C⁻¹)_ii + log det C]
    at every point; the encoder's mean (shifted) and scales (1.5 × the diagonal of the Cholesky
    factor of C) add the rest of KL(q ‖ p(z|x)) as the amortization gap."""
    apply(monkeypatch, variant)
    model = correlated_ppca()
    x = data(model)
    guide = LinearGaussianGuide(P, model.sites, diagonal=True).set_exact_posterior(model)
    with torch.no_grad():
        guide.c.add_(0.2)
        guide.L.mul_(1.5)
    result = fitted(model, guide, x, steps=300, num_samples=4000)
    best = mean_field_kl(model)
    kl = kl_to_posterior(model, guide, x)
    assert best > 0.1 and (kl - best).mean() > 0.1  # the oracle's premise: both gaps matter
    problems = []
    if z_score(result.approximation, best) > Z:
        problems.append("approximation gap is not the mean-field KL")
    if z_score(result.amortization, kl - best) > Z:
        problems.append("amortization gap is not KL(q ‖ posterior) − mean-field KL")
    check(variant, problems, "amortization gap" if variant == "amortization-sign" else "approximation gap")
    if variant == "correct":
        assert result.families == {"z": "Normal"}
        assert result.khat.mean() < 0.7  # importance sampling with q* as proposal holds


@pytest.mark.parametrize("variant", ["correct", "amortization-sign"])
def test_gaps_add_up_to_the_total_gap_of_evaluate(monkeypatch, variant):
    """approximation + amortization (log p(x) with q* as proposal, ELBO[q] drawn anew) against
    evaluate's gap (log p(x) with q as proposal, its own ELBO draws): independent estimates of the
    same KL(q ‖ p(z|x)), equal within their standard errors."""
    apply(monkeypatch, variant)
    model = correlated_ppca()
    x = data(model)
    guide = LinearGaussianGuide(P, model.sites, diagonal=True).set_exact_posterior(model)
    with torch.no_grad():
        guide.c.add_(0.3)
        guide.L.mul_(1.3)
    result = evaluate(model.model, guide.forward, x, num_samples=2000, iwae_ks=(), particles_elbo=100,
                      batch_size=len(x), seed=0, gaps=gaps.GapSettings(steps=300, num_samples=2000, batch_size=len(x)))
    g = result.gaps
    total = g.approximation.value + g.amortization.value
    difference = total - result.gap.value
    se = (g.approximation.stderr**2 + g.amortization.stderr**2 + result.gap.stderr**2).sum().sqrt() / len(x)
    problems = [] if abs(difference.mean()) < Z * se else ["the gaps do not add up to the total gap"]
    check(variant, problems, "add up")
    if variant == "correct":
        exact = kl_to_posterior(model, guide, x)
        assert z_score(result.gap, exact) < Z
        summary = result.summary()["gaps"]
        assert summary["approximation"][0] == pytest.approx(g.approximation.value.mean().item())
        assert "approximation gap" in result.table() and "amortization gap" in result.table()


def test_convergence_check_flags_too_few_steps():
    """From an untrained encoder, 20 steps leave the ELBO rising through the annealed half; 400 do not."""
    model = correlated_ppca()
    x = data(model, 20)
    guide = LinearGaussianGuide(P, model.sites)
    short = fitted(model, guide, x, steps=20, lr=0.05, num_particles=32, num_samples=100)
    assert short.still_rising().double().mean() > 0.3
    assert "not converged" in "\n".join(short.notes())
    long = fitted(model, guide, x, steps=400, lr=0.05, num_particles=32, num_samples=100)
    assert not long.still_rising().any()
    assert (long.rise_annealed.value.abs() < 0.01).all() and (long.rise.value.abs() < 0.01).all()


def test_batches_of_points_are_independent_problems():
    """Adam is elementwise: a point's q* does not depend on which points it was fitted with."""
    model = correlated_ppca()
    x = data(model, 6)
    guide = LinearGaussianGuide(P, model.sites)
    settings = gaps.GapSettings(steps=30, num_particles=4)
    torch.manual_seed(3)
    together, _ = gaps.fit_optimal(model.model, guide.forward, x, settings)
    torch.manual_seed(3)
    alone, _ = gaps.fit_optimal(model.model, guide.forward, x[:3], settings)
    # different draws, so compare the first few steps' direction: the same initial point, and both moved
    a, b = together.sites["z"].params["loc"][:3], alone.sites["z"].params["loc"]
    start = guide_gaussian(guide, x[:3])[0]
    assert (a - start).abs().min() > 0 and (b - start).abs().min() > 0
    assert torch.allclose(a, b, atol=0.3)


def test_fit_leaves_the_model_and_the_guide_unchanged():
    model = correlated_ppca()
    x = data(model, 5)
    guide = LinearGaussianGuide(P, model.sites)
    before = [p.detach().clone() for p in (*model.parameters(), *guide.parameters())]
    gaps.fit_optimal(model.model, guide.forward, x, gaps.GapSettings(steps=20))
    for p, q in zip((*model.parameters(), *guide.parameters()), before):
        assert torch.equal(p.detach(), q) and p.grad is None


# ---------------------------------------------------------------- unsupported guides


def test_guides_outside_the_families_are_refused_in_one_line():
    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((4, 8), 0.5))
    iaf = IAFEncoder(8, 2, hidden=(8,))

    def model(x):
        import pyro
        import pyro.distributions as dist
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(x.new_zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=z.sum(-1, keepdim=True).expand(*z.shape[:-1], 8)).to_event(1), obs=x)

    def guide(x):
        import pyro
        with pyro.plate("data", len(x)):
            iaf(x)

    with pytest.raises(PyrovaeError, match=r"site 'z' is a TransformedDistribution, not a plain parameterized family") as e:
        gaps.inference_gaps(model, guide, x)
    assert "\n" not in str(e.value)
    two = TwoLayerVAE(8, top_dim=2, bottom_dim=3, hidden=(8,), top_hidden=(8,))
    with pytest.raises(PyrovaeError, match=r"site 'z1' depends on the latent sample\(s\) 'z2'"):
        gaps.inference_gaps(two.model, two.guide, x)


@pytest.mark.parametrize("variant", ["correct", "broken-no-check"])
def test_models_with_discrete_latent_sites_are_refused_in_one_line(monkeypatch, variant):
    """M2's class y is summed out: q* and the aggregate posterior are densities of continuous latents only."""
    if variant != "correct":
        monkeypatch.setattr(gaps, "check_continuous", lambda *args, **kwargs: None)
    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((4, 8), 0.5))
    labelled = m2(8, num_classes=3, latent_dim=2, hidden=(8,))
    refused = []
    for call, name in ((lambda: gaps.inference_gaps(labelled.model, labelled.guide, x, gaps.GapSettings(steps=2)), "gaps"),
                       (lambda: gaps.surgery(labelled.model, labelled.guide, x), "surgery")):
        try:
            call()
        except Exception as e:  # the broken variant fails, if at all, somewhere else
            refused.append(isinstance(e, PyrovaeError) and re.match(
                rf"`{name}` does not apply to a model with discrete latent sites \(y\): [^\n]*$", str(e)) is not None)
        else:
            refused.append(False)
    assert refused == ([True, True] if variant == "correct" else [False, False])


@pytest.mark.parametrize("option", ["gaps", "surgery"])
def test_evaluate_refuses_a_discrete_model_before_its_passes(monkeypatch, option):
    def evaluated(*args, **kwargs):
        raise AssertionError("the points were evaluated before the refusal")

    monkeypatch.setattr(evaluate_module, "log_weights", evaluated)
    monkeypatch.setattr(evaluate_module, "importance_log_weights", evaluated)
    torch.manual_seed(0)
    x = torch.bernoulli(torch.full((4, 8), 0.5))
    labelled = m2(8, num_classes=3, latent_dim=2, hidden=(8,))
    with pytest.raises(PyrovaeError, match=rf"^`{option}` does not apply to a model with discrete latent sites \(y\)"):
        evaluate(labelled.model, labelled.guide, x, num_samples=5, **{option: True})


def test_hierarchical_full_covariance_guide_is_refused_and_its_diagonal_one_supported():
    model = HierarchicalLinearGaussian(P, 2, 2)
    x = data(model, 4)
    full = LinearGaussianGuide(P, model.sites).set_exact_posterior(model)
    with pytest.raises(PyrovaeError, match=r"site 'z2' depends on the latent sample\(s\) 'z1'"):
        gaps.inference_gaps(model.model, full.forward, x)
    diagonal = LinearGaussianGuide(P, model.sites, diagonal=True)
    result = fitted(model, diagonal, x, steps=20, num_samples=50)
    assert result.families == {"z1": "Normal", "z2": "Normal"}
    assert (result.approximation.value.isfinite()).all()


@pytest.mark.parametrize("settings, message", [
    ({"steps": 0}, "`steps` must be at least 1"),
    ({"lr": 0.0}, "`lr` must be positive"),
    ({"num_particles": 0}, "`num_particles` must be at least 1"),
    ({"batch_size": 0}, "`batch_size` must be at least 1"),
], ids=["steps", "lr", "particles", "batch"])
def test_bad_settings_name_the_parameter(settings, message):
    model = correlated_ppca()
    guide = LinearGaussianGuide(P, model.sites)
    with pytest.raises(PyrovaeError, match=message):
        gaps.inference_gaps(model.model, guide.forward, data(model, 3), gaps.GapSettings(**settings))


# ---------------------------------------------------------------- ELBO surgery


def linear_guide_aggregate(model, guide) -> tuple[float, float]:
    """For x ~ p(x) = N(b, Σ_x) and q(z|x) = N(F x + c, S): I_q and KL(q(z) ‖ N(0, I)) in closed form."""
    px = model.marginal()
    F, c = guide.F.detach(), guide.c.detach()
    _, S = guide_gaussian(guide, model.b[None].detach())
    agg_cov = F @ px.covariance_matrix.detach() @ F.T + S
    agg = MultivariateNormal(F @ model.b.detach() + c, agg_cov)
    mutual_information = 0.5 * (torch.logdet(agg_cov) - torch.logdet(S)).item()
    prior = MultivariateNormal(torch.zeros(D), torch.eye(D))
    return mutual_information, kl_divergence(agg, prior).item()


@pytest.mark.parametrize("variant", ["correct", "log-sum"])
def test_surgery_of_an_encoder_that_ignores_x_finds_no_information(monkeypatch, variant):
    """q(z|x) = q(z) for every x: I_q = 0 and the whole KL term is KL(q(z) ‖ p(z))."""
    apply(monkeypatch, variant)
    model = correlated_ppca()
    x = data(model, 200)
    guide = LinearGaussianGuide(P, model.sites)
    with torch.no_grad():
        guide.c.copy_(torch.tensor([0.5, -1.0]))
        guide.L.copy_(torch.tensor([[0.7, 0.0], [0.3, 0.4]]))
    result = gaps.surgery(model.model, guide.forward, x, num_particles=5, batch_size=64)
    site = result.sites["z"]
    problems = [] if z_across(site.mutual_information.value, 0.0) < Z else ["mutual information not 0"]
    check(variant, problems, "mutual information")
    if variant == "correct":
        _, kl = linear_guide_aggregate(model, guide)
        assert z_across(site.marginal_kl.value, kl) < Z
        assert z_across(site.kl.value, kl) < Z
        assert site.active_units == 0


@pytest.mark.parametrize("variant", ["correct", "log-sum", "mean-of-logs"])
@pytest.mark.parametrize("guide_kind", ["exact", "inexact"])
def test_surgery_finds_the_known_mutual_information(monkeypatch, variant, guide_kind):
    """x ~ p(x), q linear-Gaussian: I_q and KL(q(z) ‖ p(z)) have closed forms (the exact posterior:
    I = −½ log det C and KL(q(z) ‖ p(z)) = 0); the estimates agree within their standard errors,
    their bias (≲ e^I/N) being far below them here; the parts add up to the KL term draw by draw."""
    apply(monkeypatch, variant)
    model = correlated_ppca()
    x = data(model, 1000)
    guide = LinearGaussianGuide(P, model.sites).set_exact_posterior(model)
    if guide_kind == "inexact":
        with torch.no_grad():
            guide.F.mul_(0.6)
            guide.c.add_(0.4)
            guide.L.mul_(1.5)
    mutual_information, marginal_kl = linear_guide_aggregate(model, guide)
    result = gaps.surgery(model.model, guide.forward, x, num_particles=2, batch_size=300)
    site = result.sites["z"]
    problems = []
    if z_across(site.mutual_information.value, mutual_information) > Z:
        problems.append("mutual information differs from the closed form")
    if z_across(site.marginal_kl.value, marginal_kl) > Z:
        problems.append("KL(q(z) ‖ p(z)) differs from the closed form")
    check(variant, problems, "mutual information")
    if variant == "correct":
        torch.testing.assert_close(site.kl.value, site.mutual_information.value + site.marginal_kl.value)
        assert mutual_information > 0.3 and result.max_mutual_information == pytest.approx(math.log(1000))
        assert site.active_units == 2 and site.dims == 2


@pytest.mark.parametrize("variant", ["correct", "log-sum"])
def test_surgery_says_when_the_information_is_at_its_bound(monkeypatch, variant):
    """An encoder whose q(z|x) is far narrower than the spread of its means tells the N points apart:
    I_q ≈ log N, reported as the estimate's ceiling; the exact posterior (I_q ≈ 0.6 nats) is not."""
    apply(monkeypatch, variant)
    model = correlated_ppca()
    x = data(model, 50)
    sharp = LinearGaussianGuide(P, model.sites).set_exact_posterior(model)
    with torch.no_grad():
        sharp.F.mul_(20.0)
        sharp.L.mul_(0.05)
    at_bound = gaps.surgery(model.model, sharp.forward, x, num_particles=2)
    below = gaps.surgery(model.model, LinearGaussianGuide(P, model.sites).set_exact_posterior(model).forward, x, num_particles=2)
    problems = []
    if at_bound.saturated() != ["z"] or not any("at its bound log N" in line for line in at_bound.notes()):
        problems.append("the information at its bound is not reported")
    if below.saturated() != [] or any("at its bound" in line for line in below.notes()):
        problems.append("information below its bound reported at it")
    check(variant, problems, "information")
    if variant == "correct":
        assert at_bound.sites["z"].mutual_information.value.mean() == pytest.approx(math.log(50), abs=gaps.SATURATION)


def test_surgery_skips_what_has_no_density():
    """Hierarchical model: the prior at z2 depends on z1, so only I_q is reported there; a guide
    site that depends on another latent sample has no q(z|x) of its own and is skipped."""
    model = HierarchicalLinearGaussian(P, 2, 2)
    x = data(model, 30)
    result = gaps.surgery(model.model, LinearGaussianGuide(P, model.sites, diagonal=True).forward, x, num_particles=2)
    assert result.sites["z1"].marginal_kl is not None and result.sites["z2"].marginal_kl is None
    assert "depends on 'z1'" in result.sites["z2"].note
    full = gaps.surgery(model.model, LinearGaussianGuide(P, model.sites).forward, x, num_particles=2)
    assert set(full.sites) == {"z1"} and "depends on the latent sample(s) 'z1'" in full.skipped["z2"]
    assert any("no ELBO surgery" in line for line in full.notes())


@pytest.mark.parametrize("variant", ["correct", "broken-own-particles-ignored"])
def test_evaluate_with_gaps_true_uses_the_default_fit_and_adds_the_surgery(monkeypatch, variant):
    """``evaluate(..., gaps=True)``: GapSettings' defaults with evaluate's own ``particles_elbo``, the
    ELBO surgery of the same points, and the same per-point gaps as ``inference_gaps`` with that seed."""
    defaults = gaps.GapSettings()
    if variant != "correct":
        monkeypatch.setattr(gaps, "GapSettings", lambda **kwargs: defaults)
    model = correlated_ppca()
    x = data(model, 8)
    guide = LinearGaussianGuide(P, model.sites)
    result = evaluate(model.model, guide.forward, x, num_samples=50, iwae_ks=(), particles_elbo=20, seed=3, gaps=True)
    problems = [] if result.gaps.settings == {**defaults.to_dict(), "particles_elbo": 20} else ["not evaluate's particles"]
    check(variant, problems, "particles")
    if variant != "correct":
        return
    assert result.surgery is not None and result.surgery.num_points == 8
    alone = gaps.inference_gaps(model.model, guide.forward, x, dataclasses.replace(defaults, particles_elbo=20), seed=3)
    torch.testing.assert_close(result.gaps.approximation.value, alone.approximation.value, rtol=0, atol=0)
    torch.testing.assert_close(result.gaps.amortization.value, alone.amortization.value, rtol=0, atol=0)
    assert evaluate(model.model, guide.forward, x, num_samples=50, iwae_ks=(), particles_elbo=20, gaps=True,
                    surgery=False).surgery is None
