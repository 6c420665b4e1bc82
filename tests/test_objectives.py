"""Tests of pyrovae.objectives: the ELBO, mean-field, IWAE and DReG losses, β and KL warm-up.

References computed independently: Pyro's ``Trace_ELBO`` and ``RenyiELBO(alpha=0)`` with β put
on the latent sites by the test's own handler, the ELBO with closed-form KLs from
``torch.distributions`` written out by hand, and the exact posterior of a linear-Gaussian model
(for which log w is constant, so the DReG gradient of the guide is 0). Statistical checks are
z-scores on fixed seeds; each check is shown to fail on deliberately broken variants.
"""

import logging
import math

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import RenyiELBO, Trace_ELBO
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch.distributions import kl_divergence

from pyrovae import objectives
from pyrovae.errors import PyrovaeError
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


class latents_scaled(Messenger):
    """The reference's own β: every latent sample site's log-density multiplied by ``beta`` (Pyro
    then scales ``log_prob`` in the traces, which ``Trace_ELBO`` and ``RenyiELBO`` read)."""

    def __init__(self, beta: float):
        super().__init__()
        self.beta = beta

    def _process_message(self, msg) -> None:
        if msg["type"] == "sample" and not msg["is_observed"] and not site_is_subsample(msg):
            msg["scale"] = self.beta * msg["scale"]


def module_of(kind: str):
    if kind == "two-layer":
        return two_layer(P, top_dim=2, bottom_dim=3, hidden=(8,), top_hidden=(6,))
    return small_vae(guide={"vae": "diagonal", "full-covariance": "full-covariance", "iaf-guide": "iaf"}[kind])


# the latent sites whose KL term has a closed form for mean-field: the two-layer model's z1 (prior
# N(0, I), no parents), not its z2 (its prior p(z2 | z1) reads z1, which the guide draws from z2),
# nothing for the IAF guide (a transformed distribution)
CLOSED_FORM_SITES = {"vae": {"z"}, "full-covariance": {"z"}, "iaf-guide": set(), "two-layer": {"z1"}}


def mean_field_reference(kind: str, module, x, beta: float) -> torch.Tensor:
    """−[log p(x | z) + Σ_s β (log p(z_s | ·) − log q(z_s | ·)), with −β KL(q_s ‖ p_s) in closed form
    (``torch.distributions.kl_divergence``) at the sites that have one], on one draw of the guide."""
    guide_trace = poutine.trace(module.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(module.model, trace=guide_trace)).get_trace(x)
    value = model_trace.nodes["x"]["fn"].log_prob(x).sum()
    for name, site in guide_trace.nodes.items():
        if site["type"] != "sample":
            continue
        q, p = site["fn"], model_trace.nodes[name]["fn"]
        if name in CLOSED_FORM_SITES[kind]:
            value = value - beta * kl_divergence(q, p).sum()
        else:
            value = value + beta * (p.log_prob(site["value"]) - q.log_prob(site["value"])).sum()
    return -value


def reference(objective: str, kind: str, module, x, k: int, beta: float, seed: int):
    """The loss and its gradient (zeros where none) on the draws of ``seed``, computed without the engine:
    ``elbo`` by Pyro's ``Trace_ELBO``, ``iwae`` and ``iwae-dreg`` by Pyro's ``RenyiELBO(alpha=0)``
    (DReG has the IWAE gradient for the model's parameters only; None for the others), ``mean-field``
    by :func:`mean_field_reference`; β by :class:`latents_scaled` on the model and the guide."""
    pyro.set_rng_seed(seed)
    module.zero_grad(set_to_none=True)
    model, guide = latents_scaled(beta)(module.model), latents_scaled(beta)(module.guide)
    if objective == "elbo":
        loss = Trace_ELBO(num_particles=k, vectorize_particles=k > 1, max_plate_nesting=1).differentiable_loss(model, guide, x)
        loss.backward()
        value = loss.detach()
    elif objective == "mean-field":
        loss = mean_field_reference(kind, module, x, beta)
        loss.backward()
        value = loss.detach()
    else:
        renyi = RenyiELBO(alpha=0, num_particles=k, vectorize_particles=True, max_plate_nesting=1)
        value = torch.tensor(renyi.loss_and_grads(model, guide, x), dtype=torch.float64)
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in module.parameters()]
    if objective == "iwae-dreg":
        guide_params = {id(p) for name, m in module.named_children() if name in GUIDE_PARTS for p in m.parameters()}
        grads = [None if id(p) in guide_params else g for p, g in zip(module.parameters(), grads)]
    return value, grads


GUIDE_PARTS = {"encoder", "q_z1", "q_z2"}  # the children holding the guide's networks (VAE, two-layer model)


def flipped_gradient(loss_fn):
    """The same value with the gradient's sign flipped."""
    def broken(x):
        value = loss_fn(x)
        return 2 * value.detach() - value

    return broken


ENGINE = {  # name → the loss under test given (objective, model, guide, k, β), and the problem it must show
    "correct": (lambda name, m, g, k, beta: objectives.loss(name, m, g, k, beta), None),
    "beta-ignored": (lambda name, m, g, k, beta: objectives.loss(name, m, g, k), "value"),
    "beta-scales-the-whole-objective": (lambda name, m, g, k, beta: lambda x: beta * objectives.loss(name, m, g, k)(x), "value"),
    "gradient-sign-flipped": (lambda name, m, g, k, beta: flipped_gradient(objectives.loss(name, m, g, k, beta)), "gradient"),
    "iwae-averages-the-log-weights": (lambda name, m, g, k, beta: objectives.loss("elbo", m, g, k, beta), "value"),
    "mean-field-without-the-closed-form": (lambda name, m, g, k, beta: objectives.loss("elbo", m, g, k, beta), "value"),
}


def objective_problems(objective: str, kind: str, engine: str = "correct") -> list[str]:
    """The engine's loss and gradient against :func:`reference` on the same draws, at β = 0, 0.3 and 1."""
    module, x = module_of(kind), binary()
    k = 1 if objective == "mean-field" else 3
    problems = []
    for beta in (0.0, 0.3, 1.0):
        value, grads = value_and_grads(ENGINE[engine][0](objective, module.model, module.guide, k, beta), module, x, seed=4)
        ref_value, ref_grads = reference(objective, kind, module, x, k, beta, seed=4)
        if not torch.allclose(value, ref_value, rtol=1e-10, atol=1e-10):
            problems.append(f"β = {beta}: value {value.item()} where the reference has {ref_value.item()}")
        if not all(r is None or torch.allclose(g, r, rtol=1e-8, atol=1e-10) for g, r in zip(grads, ref_grads)):
            problems.append(f"β = {beta}: the gradient is not the reference's")
    return problems


@pytest.mark.parametrize("kind", ["vae", "full-covariance", "iaf-guide", "two-layer"])
@pytest.mark.parametrize("objective", ["elbo", "mean-field", "iwae", "iwae-dreg"])
def test_each_objective_is_an_independent_reference_on_the_same_draws(float64, objective, kind):
    """Value and gradient equal Pyro's ``Trace_ELBO`` (elbo), Pyro's ``RenyiELBO(alpha=0)`` (IWAE;
    for DReG the value and the model's gradient) and the closed-form ELBO written out by hand
    (mean-field), with β applied to the latent sites by the test's own handler, at β = 0, 0.3, 1."""
    assert objective_problems(objective, kind) == []


@pytest.mark.parametrize("engine, objective", [
    ("beta-ignored", "elbo"), ("beta-ignored", "iwae"), ("beta-scales-the-whole-objective", "mean-field"),
    ("beta-scales-the-whole-objective", "iwae-dreg"), ("gradient-sign-flipped", "elbo"), ("gradient-sign-flipped", "iwae"),
    ("iwae-averages-the-log-weights", "iwae"), ("mean-field-without-the-closed-form", "mean-field"),
])
def test_a_broken_objective_differs_from_the_reference(float64, engine, objective):
    problems = objective_problems(objective, "vae", engine)
    assert any(ENGINE[engine][1] in p for p in problems), problems


def test_mean_field_on_the_bottom_up_guide_says_which_site_is_monte_carlo(float64, caplog):
    """The two-layer model's z2 has no applicable closed form (see CLOSED_FORM_SITES): the loss says
    so once, in a logged warning naming the site, and its value is the reference's."""
    module, x = module_of("two-layer"), binary()
    loss_fn = objectives.loss("mean-field", module.model, module.guide)
    with caplog.at_level(logging.WARNING):
        value, _ = value_and_grads(loss_fn, module, x, seed=1)
        loss_fn(x)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "'z2'" in warnings[0] and "'z1'" not in warnings[0], warnings
    pyro.set_rng_seed(1)
    torch.testing.assert_close(value, mean_field_reference("two-layer", module, x, 1.0).detach(), rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("prior", ["mixture", "flow"])
def test_mean_field_falls_back_to_monte_carlo_without_a_closed_form(float64, prior):
    module, x = small_vae(prior), binary()
    elbo = value_and_grads(objectives.loss("elbo", module.model, module.guide), module, x, seed=2)
    mean_field = value_and_grads(objectives.loss("mean-field", module.model, module.guide), module, x, seed=2)
    torch.testing.assert_close(mean_field[0], elbo[0], rtol=1e-12, atol=1e-10)
    assert_grads_close(mean_field[1], elbo[1], rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- β and warm-up


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


def losses_on_fixed_draws(name: str, module, x, seeds=range(10)) -> torch.Tensor:
    """The objective's loss at x on the draws of each seed, (len(seeds),): common random numbers, so
    that before and after training differ by the parameters only (DReG's value is the IWAE bound's)."""
    loss_fn = objectives.loss("iwae" if name == "iwae-dreg" else name, module.model, module.guide, num_particles=3)
    values = []
    with torch.no_grad(), fast_context():
        for seed in seeds:
            pyro.set_rng_seed(seed)
            values.append(loss_fn(x))
    return torch.stack(values)


@pytest.mark.parametrize("name, variant", [(name, "correct") for name in objectives.OBJECTIVES]
                         + [("elbo", "gradient-sign-flipped"), ("iwae-dreg", "gradient-sign-flipped")])
def test_each_objective_trains_through_train_step(name, variant):
    """20 steps on 32 fixed points lower the objective's loss there: on the same 10 draws before and
    after, the mean paired difference is below 0 by more than 4 of its standard errors. Every
    parameter moves. A step along the gradient with its sign flipped raises the loss instead."""
    module, x = small_vae(guide="full-covariance"), binary(n=32)
    loss_fn = objectives.loss(name, module.model, module.guide, num_particles=3)
    if variant != "correct":
        loss_fn = flipped_gradient(loss_fn)
    optimizer = make_optimizer(module.parameters(), lr=1e-2)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    start = losses_on_fixed_draws(name, module, x)
    with fast_context():
        losses = [train_step(loss_fn, optimizer, x) for _ in range(20)]
    assert all(math.isfinite(v) for v in losses)
    assert [n for n, p in module.named_parameters() if torch.equal(p.detach(), before[n])] == []
    change = losses_on_fixed_draws(name, module, x) - start
    fell = change.mean() + 4 * change.std() / len(change) ** 0.5 < 0
    assert fell == (variant == "correct"), change
