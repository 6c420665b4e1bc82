"""Tests of pyrovae.objectives: the ELBO, mean-field, IWAE and DReG losses, β and KL warm-up.

References computed independently: Pyro's ``Trace_ELBO`` and ``RenyiELBO(alpha=0)``, the engine's
``iwae_bound`` on the same draws, analytic KLs from ``torch.distributions``, and the exact posterior
of a linear-Gaussian model (for which log w is constant, so the DReG gradient of the guide is 0).
Statistical checks are z-scores on fixed seeds.
"""

import math

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import RenyiELBO
from torch.distributions import kl_divergence

from pyrovae import objectives
from pyrovae.errors import PyrovaeError
from pyrovae.estimators import iwae_bound
from pyrovae.evidence import log_weights, site_log_probs
from pyrovae.guides import LinearGaussianGuide
from pyrovae.models import PPCA, HierarchicalLinearGaussian, two_layer, vae
from pyrovae.train import fast_context, make_optimizer, train_step

N, P, D = 6, 10, 3


pytestmark = pytest.mark.usefixtures("one_thread")


def binary(n: int = N, p: int = P, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.rand(n, p, generator=generator), generator=generator)


def small_vae(prior: str = "normal", guide: str = "diagonal"):
    return vae(P, latent_dim=D, hidden=(16,), prior=prior, guide=guide)


def value_and_grads(loss_fn, module, x, seed: int):
    """The loss and the gradient of every parameter of ``module`` (zeros where none), on the draws of ``seed``."""
    pyro.set_rng_seed(seed)
    module.zero_grad(set_to_none=True)
    with fast_context():
        value = loss_fn(x)
        value.backward()
    return value.detach(), [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in module.parameters()]


def assert_grads_close(a, b, **kwargs):
    assert len(a) == len(b)
    for ga, gb in zip(a, b):
        torch.testing.assert_close(ga, gb, **kwargs)


# ---------------------------------------------------------------- values on the same draws


@pytest.mark.parametrize("model_kind", ["vae", "vamp-full-covariance", "two-layer"])
def test_iwae_at_k1_equals_the_elbo_on_the_same_draws(float64, model_kind):
    if model_kind == "two-layer":
        module = two_layer(P, top_dim=2, bottom_dim=3, hidden=(8,), top_hidden=(6,))
    elif model_kind == "vae":
        module = small_vae()
    else:
        module = small_vae("vamp", "full-covariance")
    x = binary()
    elbo = value_and_grads(objectives.loss("elbo", module.model, module.guide), module, x, seed=3)
    for name in ("iwae", "iwae-dreg"):
        iwae = value_and_grads(objectives.loss(name, module.model, module.guide, num_particles=1), module, x, seed=3)
        torch.testing.assert_close(iwae[0], elbo[0], rtol=1e-12, atol=1e-10)
        if name == "iwae":  # at k = 1 the IWAE gradient is the reparameterized ELBO gradient; DReG's guide gradient differs
            assert_grads_close(iwae[1], elbo[1], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("guide", ["diagonal", "iaf"])
def test_iwae_value_is_the_engines_iwae_bound_on_the_same_draws(float64, guide):
    module, x, k = small_vae(guide=guide), binary(), 5
    pyro.set_rng_seed(7)
    with fast_context():
        expected = iwae_bound(log_weights(module.model, module.guide, x, k).log_w, k).value.sum()
    for name in ("iwae", "iwae-dreg"):
        value, _ = value_and_grads(objectives.loss(name, module.model, module.guide, num_particles=k), module, x, seed=7)
        torch.testing.assert_close(value, -expected, rtol=1e-12, atol=1e-10)


def test_iwae_gradient_equals_pyros_renyi_elbo_at_alpha_0(float64):
    """RenyiELBO(alpha=0) keeps the data plate when it forms the weights: the same per-point bound."""
    module, x, k = small_vae(), binary(), 4
    value, grads = value_and_grads(objectives.loss("iwae", module.model, module.guide, num_particles=k), module, x, seed=11)
    pyro.set_rng_seed(11)
    module.zero_grad(set_to_none=True)
    renyi = RenyiELBO(alpha=0, num_particles=k, vectorize_particles=True, max_plate_nesting=1)
    reference = renyi.loss_and_grads(module.model, module.guide, x)  # registers the parameters and calls backward
    assert value.item() == pytest.approx(reference, rel=1e-12)
    assert_grads_close(grads, [p.grad for p in module.parameters()], rtol=1e-9, atol=1e-10)


def test_mean_field_uses_the_analytic_kl_where_it_exists(float64):
    module, x = small_vae(), binary()
    value, _ = value_and_grads(objectives.loss("mean-field", module.model, module.guide), module, x, seed=5)
    pyro.set_rng_seed(5)
    guide_trace = poutine.trace(module.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(module.model, trace=guide_trace)).get_trace(x)
    reconstruction = model_trace.nodes["x"]["fn"].log_prob(x).sum()
    kl = kl_divergence(guide_trace.nodes["z"]["fn"], model_trace.nodes["z"]["fn"]).sum()
    torch.testing.assert_close(value, -(reconstruction - kl).detach(), rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("prior", ["mixture", "flow"])
def test_mean_field_falls_back_to_monte_carlo_without_a_closed_form(float64, prior):
    module, x = small_vae(prior), binary()
    elbo = value_and_grads(objectives.loss("elbo", module.model, module.guide), module, x, seed=2)
    mean_field = value_and_grads(objectives.loss("mean-field", module.model, module.guide), module, x, seed=2)
    torch.testing.assert_close(mean_field[0], elbo[0], rtol=1e-12, atol=1e-10)
    assert_grads_close(mean_field[1], elbo[1], rtol=1e-10, atol=1e-10)


def test_mean_field_warns_for_a_bottom_up_guide():
    module = two_layer(P, top_dim=2, bottom_dim=3, hidden=(8,), top_hidden=(6,))
    with pytest.warns(UserWarning, match="mean field restriction"):
        objectives.loss("mean-field", module.model, module.guide)(binary())


# ---------------------------------------------------------------- β and warm-up


@pytest.mark.parametrize("name", ["elbo", "mean-field", "iwae", "iwae-dreg"])
@pytest.mark.parametrize("beta", [0.0, 0.3])
def test_beta_scales_the_latent_log_densities(float64, name, beta):
    """−loss = Σ_n log mean_k exp(log p(x|z) + β (log p(z) − log q(z|x))) on the same draws (k = 1 for the ELBOs)."""
    module, x = small_vae(prior="mixture" if name == "mean-field" else "normal"), binary()
    k = 1 if name in ("elbo", "mean-field") else 3
    value, _ = value_and_grads(objectives.loss(name, module.model, module.guide, num_particles=k, beta=beta), module, x, seed=4)
    pyro.set_rng_seed(4)
    with torch.no_grad():
        terms = site_log_probs(module.model, module.guide, x, k)
    log_w = terms.log_likelihood["x"] + beta * (terms.log_prior["z"] - terms.log_q["z"])
    expected = -(torch.logsumexp(log_w, 0) - math.log(k)).sum()
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("name", ["elbo", "mean-field", "iwae", "iwae-dreg"])
def test_warmup_at_scale_0_leaves_the_prior_without_gradient(name):
    module, x = small_vae(prior="mixture"), binary()
    loss_fn = objectives.loss(name, module.model, module.guide, num_particles=2)
    loss_fn.beta = objectives.warmup_scale(epoch=1, step=0, steps_per_epoch=10, warmup_epochs=5)
    assert loss_fn.beta == 0
    with fast_context():
        loss_fn(x).backward()
    for p in module.prior.parameters():
        assert p.grad is None or torch.count_nonzero(p.grad) == 0
    assert all(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in module.decoder.parameters())
    # and at β > 0 the prior learns
    module.zero_grad(set_to_none=True)
    loss_fn.beta = 0.5
    with fast_context():
        loss_fn(x).backward()
    assert all(torch.count_nonzero(p.grad) > 0 for p in module.prior.parameters())


def test_warmup_scale_rises_linearly_to_one():
    schedule = [objectives.warmup_scale(epoch, step, 4, 2) for epoch in (1, 2, 3) for step in range(4)]
    assert schedule == [0, 1 / 8, 2 / 8, 3 / 8, 4 / 8, 5 / 8, 6 / 8, 7 / 8, 1, 1, 1, 1]
    assert objectives.warmup_scale(1, 0, 4, 0) == 1
    assert objectives.warmup_scale(2, 1, 10, 0.5) == 1
    with pytest.raises(PyrovaeError, match="warm-up needs epoch >= 1"):
        objectives.warmup_scale(0, 0, 4, 2)


def test_scale_latents_leaves_observed_sites_alone(float64):
    module, x = small_vae(), binary()
    with objectives.scale_latents(0.25):
        trace = poutine.trace(module.model).get_trace(x)
    assert trace.nodes["z"]["scale"] == 0.25
    assert trace.nodes["x"]["scale"] == 1.0
    with pytest.raises(PyrovaeError, match="must be at least 0"):
        objectives.scale_latents(-1.0)


def test_errors_name_what_is_known():
    module = small_vae()
    with pytest.raises(PyrovaeError, match="unknown objective 'vimco'; known: elbo, mean-field, iwae, iwae-dreg"):
        objectives.loss("vimco", module.model, module.guide)
    with pytest.raises(PyrovaeError, match="number of particles must be at least 1"):
        objectives.loss("iwae", module.model, module.guide, num_particles=0)


# ---------------------------------------------------------------- DReG


def perturbed_guide(model, seed: int = 0, diagonal: bool = False) -> LinearGaussianGuide:
    """The exact posterior of a linear-Gaussian model, moved away from it."""
    guide = LinearGaussianGuide(model.data_dim, model.sites, diagonal=diagonal).set_exact_posterior(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        guide.F.add_(0.3 * torch.randn(guide.F.shape, generator=generator))
        guide.c.add_(0.3 * torch.randn(guide.c.shape, generator=generator))
        guide.L.mul_(1.3)
    return guide


def linear_gaussian(kind: str):
    torch.manual_seed(0)
    return PPCA(4, 2, noise_scale=0.6) if kind == "ppca" else HierarchicalLinearGaussian(4, 2, 2, noise_scale=0.6)


@pytest.mark.parametrize("kind", ["ppca", "hierarchical"])
def test_dreg_guide_gradient_is_zero_at_the_exact_posterior(float64, kind):
    """log w = log p(x) for every z when q is the posterior: the DReG gradient of q vanishes, IWAE's does not."""
    model = linear_gaussian(kind)
    guide = LinearGaussianGuide(4, model.sites).set_exact_posterior(model)
    x = model.b.detach() + torch.randn(N, 4, generator=torch.Generator().manual_seed(1))
    _, dreg = value_and_grads(objectives.loss("iwae-dreg", model.model, guide, num_particles=5), guide, x, seed=0)
    _, iwae = value_and_grads(objectives.loss("iwae", model.model, guide, num_particles=5), guide, x, seed=0)
    assert max(g.abs().max().item() for g in dreg) < 1e-10
    assert max(g.abs().max().item() for g in iwae) > 1e-3


def test_dreg_model_gradient_is_the_iwae_gradient_on_the_same_draws(float64):
    model = linear_gaussian("hierarchical")
    guide = perturbed_guide(model)
    x = model.b.detach() + torch.randn(N, 4, generator=torch.Generator().manual_seed(1))
    _, dreg = value_and_grads(objectives.loss("iwae-dreg", model.model, guide, num_particles=5), model, x, seed=9)
    _, iwae = value_and_grads(objectives.loss("iwae", model.model, guide, num_particles=5), model, x, seed=9)
    assert_grads_close(dreg, iwae, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind, beta", [("ppca", 1.0), ("hierarchical", 1.0), ("ppca", 0.5)])
def test_dreg_guide_gradient_has_the_iwae_expectation_and_less_variance(float64, kind, beta):
    """R independent gradients of each estimator on a batch of M copies of one point, k = 10.

    Each component's mean difference is within 4.5 standard errors (about 30 components: a false
    alarm has probability < 1e-3), and the summed variance of DReG is below half that of IWAE
    (measured here at β = 1: 0.003 for PPCA, 0.24 for the hierarchical model). An estimator
    weighting by w̃ instead of w̃² (biased for IWAE) fails the first check with |z| ≈ 45. At β ≠ 1
    the bound is the β-weighted one and DReG's weights are (1 − β) w̃ + β w̃².
    """
    R, M, k = 100, 32, 10
    model = linear_gaussian(kind)
    guide = perturbed_guide(model)
    x = (model.b.detach() + torch.randn(4, generator=torch.Generator().manual_seed(1))).expand(M, 4)
    samples = {}
    for offset, name in enumerate(["iwae", "iwae-dreg"]):
        loss_fn = objectives.loss(name, model.model, guide, num_particles=k, beta=beta)
        samples[name] = torch.stack([torch.cat([g.flatten() for g in value_and_grads(loss_fn, guide, x, seed=offset * 10_000 + r)[1]])
                                     for r in range(R)])
    iwae, dreg = samples["iwae"], samples["iwae-dreg"]
    used = (iwae.var(0) > 0) | (dreg.var(0) > 0)  # L's upper triangle takes no part
    iwae, dreg = iwae[:, used], dreg[:, used]
    z = (iwae.mean(0) - dreg.mean(0)) / (iwae.var(0) / R + dreg.var(0) / R).sqrt()
    assert z.abs().max() < 4.5, z
    assert dreg.var(0).sum() < 0.5 * iwae.var(0).sum()


# ---------------------------------------------------------------- in the training loop


@pytest.mark.parametrize("name", ["elbo", "mean-field", "iwae", "iwae-dreg"])
def test_each_objective_trains_through_train_step(name):
    module, x = small_vae(guide="full-covariance"), binary(n=32)
    loss_fn = objectives.loss(name, module.model, module.guide, num_particles=3)
    optimizer = make_optimizer(module.parameters(), lr=1e-2)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    with fast_context():
        losses = [train_step(loss_fn, optimizer, x) for _ in range(3)]
    assert all(math.isfinite(v) for v in losses)
    assert [n for n, p in module.named_parameters() if torch.equal(p.detach(), before[n])] == []
