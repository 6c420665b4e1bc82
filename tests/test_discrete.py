"""Discrete latent sites: summed out where enumerated, weighted where the guide draws them.

Oracles: a VAE whose prior is a K-component Gaussian mixture written with an explicit enumerated
component index against the same model written with ``MixtureSameFamily`` and against its closed
form log p(x) (a linear-Gaussian decoder: each component gives a Gaussian marginal); a fully discrete
model whose log p(x) is a finite sum. Each check is shown to fail on a broken variant.
"""

import itertools
import json
import logging
import math
from pathlib import Path
from types import SimpleNamespace

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO

from pyrovae import ais, annealing, contract, estimators, evidence, objectives
from pyrovae.errors import ContractError, PyrovaeError

pytestmark = pytest.mark.usefixtures("one_thread")

C, D, P = 3, 2, 4
ROOT = Path(__file__).resolve().parents[1]


def mixture_parameters():
    g = torch.Generator().manual_seed(3)
    return {"pi": torch.tensor([0.2, 0.5, 0.3]), "mu": 2 * torch.randn(C, D, generator=g),
            "sd": torch.rand(C, D, generator=g) + 0.5, "W": torch.randn(P, D, generator=g), "b": torch.randn(P, generator=g),
            "s": torch.tensor(0.7)}


def mixture_models(t):
    """The same model twice: the component c enumerated, and c summed inside ``MixtureSameFamily``;
    and a guide q(z|x) = N(m(x), 1.5²) with m a fixed linear map (not the posterior)."""
    def enumerated(x):
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Categorical(t["pi"]), infer={"enumerate": "parallel"})
            z = pyro.sample("z", dist.Normal(t["mu"][c], t["sd"][c]).to_event(1))
            pyro.sample("x", dist.Normal(z @ t["W"].T + t["b"], t["s"]).to_event(1), obs=x)

    def mixture(x):
        with pyro.plate("data", x.shape[0]):
            prior = dist.MixtureSameFamily(dist.Categorical(t["pi"]), dist.Normal(t["mu"], t["sd"]).to_event(1))
            z = pyro.sample("z", prior)
            pyro.sample("x", dist.Normal(z @ t["W"].T + t["b"], t["s"]).to_event(1), obs=x)

    def guide(x):
        loc = pyro.param("loc_map", 0.3 * torch.ones(P, D))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal((x - t["b"]) @ loc, 1.5).to_event(1))

    return enumerated, mixture, guide


def shifted_mixture(t):
    """The mixture with x depending on c as well as on z: the sum over c takes in the likelihood."""
    shift = torch.randn(C, P, generator=torch.Generator().manual_seed(9))

    def model(x):
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Categorical(t["pi"]), infer={"enumerate": "parallel"})
            z = pyro.sample("z", dist.Normal(t["mu"][c], t["sd"][c]).to_event(1))
            pyro.sample("x", dist.Normal(z @ t["W"].T + t["b"] + shift[c], t["s"]).to_event(1), obs=x)

    return model, shift


def component_terms(t, shift, z, x):
    """Per component c of the shifted mixture, by hand: log π_c + log p(z | c) and log p(x | z, c), each (C, …)."""
    prior = torch.stack([torch.log(t["pi"][c]) + dist.Normal(t["mu"][c], t["sd"][c]).log_prob(z).sum(-1) for c in range(C)])
    likelihood = torch.stack([dist.Normal(z @ t["W"].T + t["b"] + shift[c], t["s"]).log_prob(x).sum(-1) for c in range(C)])
    return prior, likelihood


def exact_mixture_log_px(t, x):
    """log Σ_c π_c N(x; W μ_c + b, W diag(σ_c²) W^T + s² I): (N,)."""
    cov = torch.stack([t["W"] @ torch.diag(t["sd"][c] ** 2) @ t["W"].T + t["s"] ** 2 * torch.eye(P) for c in range(C)])
    per_component = dist.MultivariateNormal(t["mu"] @ t["W"].T + t["b"], cov).log_prob(x[:, None])  # (N, C)
    return torch.logsumexp(torch.log(t["pi"]) + per_component, -1)


def mixture_data(t, n=6):
    g = torch.Generator().manual_seed(5)
    c = torch.multinomial(t["pi"], n, replacement=True, generator=g)
    z = t["mu"][c] + t["sd"][c] * torch.randn(n, D, generator=g)
    return z @ t["W"].T + t["b"] + t["s"] * torch.randn(n, P, generator=g)


BROKEN_SUM = {  # name → a replacement for evidence.sum_out, or None for the engine as it is
    "correct": None,
    "broken-max-over-c": lambda log_p: log_p.reshape(-1, *log_p.shape[-2:]).max(0).values,
    "broken-mean-over-c": lambda log_p: torch.logsumexp(log_p.reshape(-1, *log_p.shape[-2:]), 0) - math.log(log_p.shape[:-2].numel()),
    "broken-first-value-only": lambda log_p: log_p.reshape(-1, *log_p.shape[-2:])[0],
}


def mixture_problems(K=20000):
    """The enumerated mixture's log-weights against MixtureSameFamily's on the same draws, and its
    importance-sampled log p(x) against the closed form, within 4 standard errors per point."""
    t = mixture_parameters()
    enumerated, mixture, guide = mixture_models(t)
    x = mixture_data(t)
    problems = []
    pyro.set_rng_seed(1)
    a = evidence.log_weights(enumerated, guide, x, K)
    pyro.set_rng_seed(1)
    m = evidence.log_weights(mixture, guide, x, K)
    if not torch.allclose(a.log_w, m.log_w, rtol=0, atol=1e-10):
        problems.append(f"log-weights differ from MixtureSameFamily's by up to {(a.log_w - m.log_w).abs().max():.3g}")
    estimate = estimators.log_px(a.log_w)
    z = (estimate.value - exact_mixture_log_px(t, x)) / estimate.stderr
    if not (z.abs() < 4).all():
        problems.append(f"log p(x) z-scores {z.tolist()}")
    return problems


@pytest.mark.parametrize("variant", list(BROKEN_SUM))
def test_enumerated_mixture_prior_equals_mixture_same_family_and_the_closed_form(float64, monkeypatch, variant):
    if BROKEN_SUM[variant] is not None:
        monkeypatch.setattr(evidence, "sum_out", BROKEN_SUM[variant])
    problems = mixture_problems()
    assert (problems == []) == (variant == "correct"), problems


def test_enumerated_site_is_summed_into_the_prior_of_the_site_it_conditions(float64):
    """The component's sum lands in log p(z) (no site c of its own), with no closed-form KL at z."""
    t = mixture_parameters()
    enumerated, _, guide = mixture_models(t)
    terms = evidence.log_weights(enumerated, guide, mixture_data(t), 10)
    assert set(terms.log_prior) == {"z"} and terms.latent_sites == ["z"]
    assert terms.kl_method == {"z": "no closed form"}
    assert set(estimators.kl(terms)) == {"z"}


@pytest.mark.parametrize("variant", list(BROKEN_SUM))
def test_a_component_the_data_depend_on_is_summed_with_the_likelihood(float64, monkeypatch, variant):
    """x | z, c as well as z | c: log Σ_c π_c p(z | c) p(x | z, c) goes to the likelihood, written
    out here on the guide's own draws."""
    if BROKEN_SUM[variant] is not None:
        monkeypatch.setattr(evidence, "sum_out", BROKEN_SUM[variant])
    t = mixture_parameters()
    model, shift = shifted_mixture(t)
    _, _, guide = mixture_models(t)
    x = mixture_data(t)
    pyro.set_rng_seed(4)
    terms = evidence.log_weights(model, guide, x, 7)
    pyro.set_rng_seed(4)
    with pyro.plate("particles", 7, dim=-2):
        z = pyro.poutine.trace(guide).get_trace(x).nodes["z"]["value"]  # (7, N, D)
    by_hand = torch.logsumexp(sum(component_terms(t, shift, z, x)), 0)
    assert set(terms.log_likelihood) == {"x"} and terms.latent_sites == []
    same = torch.allclose(terms.log_likelihood["x"], by_hand, rtol=0, atol=1e-10)
    assert same == torch.allclose(terms.log_w, by_hand - terms.log_q["z"], rtol=0, atol=1e-10) == (variant == "correct")


@pytest.mark.parametrize("with_enumeration, variant", [(False, "correct"), (True, "correct"), (True, "broken-any-dim-summed")],
                         ids=["alone", "beside-an-enumerated-site", "broken-any-dim-summed"])
def test_an_extra_batch_dimension_is_refused_not_summed(monkeypatch, with_enumeration, variant):
    """An observed site with a batch dimension left of the particles that no enumeration made is a
    contract error (declare it with .to_event), also in a model that enumerates another site."""
    def model(x):
        with pyro.plate("data", x.shape[0]):
            if with_enumeration:
                pyro.sample("c", dist.Categorical(torch.ones(4) / 4), infer={"enumerate": "parallel"})
            z = pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], 1), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=z.expand(2, 1, *z.shape[:-1], P)).to_event(1), obs=x)  # dim -4: no enumeration's

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], 1), 1.0).to_event(1))

    if variant != "correct":
        monkeypatch.setattr(evidence, "check_enumeration_dims", lambda *args: None)
        evidence.log_weights(model, guide, binary_points(), 5)  # summed over x's extra dim as if enumerated: no error
        return
    with pytest.raises(ContractError, match="site 'x' has log-probability shape \\(2, 1, 5, 8\\)"):
        evidence.log_weights(model, guide, binary_points(), 5)


# a fully discrete model: x | c1, c2 ~ Bernoulli(θ_{c1} · φ_{c2}), c1 ~ Cat(π1), c2 ~ Cat(π2)

def discrete_parameters():
    g = torch.Generator().manual_seed(7)
    return {"pi1": torch.tensor([0.1, 0.6, 0.3]), "pi2": torch.tensor([0.7, 0.3]),
            "theta": torch.rand(3, P, generator=g) * 0.8 + 0.1, "phi": torch.rand(2, P, generator=g) * 0.5 + 0.5}


def discrete_model(t):
    def model(x):
        with pyro.plate("data", x.shape[0]):
            c1 = pyro.sample("c1", dist.Categorical(t["pi1"]), infer={"enumerate": "parallel"})
            c2 = pyro.sample("c2", dist.Categorical(t["pi2"]), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Bernoulli(t["theta"][c1] * t["phi"][c2]).to_event(1), obs=x)

    return model


def no_guide(x):
    pass


def exact_discrete_log_px(t, x):
    """Σ over (c1, c2) of π1 π2 Π_p Bernoulli(x_p; θ φ), written out term by term: (N,)."""
    total = torch.zeros(len(x))
    for c1, c2 in itertools.product(range(3), range(2)):
        p = t["theta"][c1] * t["phi"][c2]
        likelihood = torch.prod(torch.where(x == 1, p, 1 - p), -1)
        total = total + t["pi1"][c1] * t["pi2"][c2] * likelihood
    return total.log()


def binary_points(n=8):
    return torch.bernoulli(torch.full((n, P), 0.5), generator=torch.Generator().manual_seed(11))


@pytest.mark.parametrize("variant", list(BROKEN_SUM))
def test_fully_discrete_model_gives_the_exact_finite_sum(float64, monkeypatch, variant):
    """With every latent enumerated every particle's log-weight is log p(x) itself."""
    if BROKEN_SUM[variant] is not None:
        monkeypatch.setattr(evidence, "sum_out", BROKEN_SUM[variant])
    t, x = discrete_parameters(), binary_points()
    log_w = evidence.log_weights(discrete_model(t), no_guide, x, 3).log_w
    exact = exact_discrete_log_px(t, x).expand(3, -1)
    assert torch.allclose(log_w, exact, rtol=0, atol=1e-12) == (variant == "correct")


# a discrete site the guide draws: q(c | x) = Categorical(softmax(ψ)), scored by its log q

def drawn_site_programs(t, enumerate_guide=False):
    def model(x):
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Categorical(t["pi1"]))
            pyro.sample("x", dist.Bernoulli(t["theta"][c]).to_event(1), obs=x)

    def guide(x):
        logits = pyro.param("psi", torch.tensor([0.5, -0.3, 0.2]))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("c", dist.Categorical(logits=logits), infer={"enumerate": "parallel"} if enumerate_guide else {})

    return model, guide


def exact_drawn_site_elbo(t, x, logits):
    """ELBO = Σ_c q_c (log π_c + log p(x | c) − log q_c), a differentiable function of the logits: (N,)."""
    log_q = torch.log_softmax(logits, -1)  # (C,)
    log_lik = torch.stack([torch.where(x == 1, th, 1 - th).log().sum(-1) for th in t["theta"]], -1)  # (N, C)
    return (log_q.exp() * (torch.log(t["pi1"]) + log_lik - log_q)).sum(-1)


def exact_drawn_site_log_px(t, x):
    log_lik = torch.stack([torch.where(x == 1, th, 1 - th).log().sum(-1) for th in t["theta"]], -1)
    return torch.logsumexp(torch.log(t["pi1"]) + log_lik, -1)


LOG_Q_BREAKS = {
    "correct": None,
    "broken-log-q-left-out": lambda log_q: torch.zeros_like(log_q),
}


@pytest.mark.parametrize("variant", list(LOG_Q_BREAKS))
def test_guide_drawn_discrete_site_enters_the_weight_with_its_log_q(float64, monkeypatch, variant):
    """IS log p(x) and the Monte Carlo ELBO against the finite sums, within 4 s.e. per point, and
    the closed-form KL(q(c) ‖ p(c)) (Categorical ‖ Categorical) against its Monte Carlo estimate."""
    t, x = discrete_parameters(), binary_points()
    model, guide = drawn_site_programs(t)
    if LOG_Q_BREAKS[variant] is not None:
        original = evidence.unscaled_log_prob

        def broken(name, site, shape, compiled=False, enumerated=False):
            value = original(name, site, shape, compiled, enumerated)
            return LOG_Q_BREAKS[variant](value) if site["name"] == "c" and not enumerated else value

        monkeypatch.setattr(evidence, "unscaled_log_prob", broken)
    terms = evidence.log_weights(model, guide, x, 4000)
    problems = []
    log_px = estimators.log_px(terms.log_w)
    z = (log_px.value - exact_drawn_site_log_px(t, x)) / log_px.stderr
    if not (z.abs() < 4).all():
        problems.append(f"log p(x) z {z.tolist()}")
    elbo = estimators.elbo(terms.log_w)
    z = (elbo.value - exact_drawn_site_elbo(t, x, pyro.param("psi").detach())) / elbo.stderr
    if not (z.abs() < 4).all():
        problems.append(f"ELBO z {z.tolist()}")
    assert terms.kl_method["c"] == "analytic"
    q = torch.softmax(pyro.param("psi").detach(), -1)
    by_hand = (q * (q.log() - t["pi1"].log())).sum()
    assert torch.allclose(terms.kl_analytic["c"], by_hand.expand(4000, len(x)), rtol=1e-12)
    assert (problems == []) == (variant == "correct"), problems


class _NoLogR:
    def sum_to(self, stack):
        return torch.zeros(())


@pytest.mark.parametrize("variant", ["correct", "broken-no-score-function"])
def test_guide_drawn_discrete_site_trains_by_its_score_function(float64, monkeypatch, variant):
    """The ``elbo`` objective's gradient in ψ, averaged over R independent replications, is the
    exact ELBO's gradient within 4 standard errors of that average."""
    if variant != "correct":
        monkeypatch.setattr(objectives, "_compute_log_r", lambda model_trace, guide_trace: _NoLogR())
    t, x = discrete_parameters(), binary_points(4)
    model, guide = drawn_site_programs(t)
    loss_fn = objectives.loss("elbo", model, guide, num_particles=500)
    loss_fn(x)
    psi = pyro.param("psi").unconstrained()
    grads = []
    for _ in range(40):
        g, = torch.autograd.grad(loss_fn(x), psi)
        grads.append(-g)
    grads = torch.stack(grads)  # (R, C)
    exact, = torch.autograd.grad(exact_drawn_site_elbo(t, x, psi).sum(), psi)
    z = (grads.mean(0) - exact) / (grads.std(0) / math.sqrt(len(grads)))
    assert "score-function" in next(iter(loss_fn.estimators.values()))
    assert bool((z.abs() < 4).all()) == (variant == "correct"), z


@pytest.mark.filterwarnings("ignore:Found vars in model but not guide:UserWarning")  # the broken variant's Trace_ELBO
@pytest.mark.parametrize("variant", ["correct", "broken-enumeration-ignored"])
def test_enumerated_training_loss_is_the_mixture_same_family_elbo(float64, caplog, monkeypatch, variant):
    """TraceEnum_ELBO on the enumerated model and Trace_ELBO on the MixtureSameFamily model: the
    same value and gradient on the same draws; the estimator is said once."""
    if variant != "correct":
        monkeypatch.setattr(objectives, "discrete_sites", lambda m, g: objectives.DiscreteSites((), (), (), (), ()))
    t = mixture_parameters()
    enumerated, mixture, guide = mixture_models(t)
    x = mixture_data(t)
    values, grads = [], []
    for model in (enumerated, mixture):
        loss_fn = objectives.loss("elbo", model, guide, num_particles=7)
        with caplog.at_level(logging.INFO, logger="pyrovae.objectives"):
            pyro.set_rng_seed(2)
            loss_fn.discrete(x)
            value = loss_fn(x)
        values.append(value)
        grads.append(torch.autograd.grad(value, pyro.param("loc_map").unconstrained())[0])
    same = torch.allclose(values[0], values[1], rtol=1e-12) and torch.allclose(grads[0], grads[1], rtol=1e-10)
    assert same == (variant == "correct")
    assert ("TraceEnum_ELBO (enumerated: c)" in caplog.text) == (variant == "correct")
    pyro.set_rng_seed(2)
    reference = Trace_ELBO(num_particles=7, vectorize_particles=True, max_plate_nesting=1).differentiable_loss(mixture, guide, x)
    assert torch.allclose(values[1], reference, rtol=1e-12)


def test_guide_enumeration_and_sampling_agree_on_the_elbo(float64):
    """The guide's site enumerated (TraceEnum_ELBO's exact sum over c) and drawn (the Monte Carlo
    ELBO of the weights): the same ELBO within 4 standard errors, and the closed form."""
    t, x = discrete_parameters(), binary_points()
    model, guide = drawn_site_programs(t, enumerate_guide=True)
    exact = exact_drawn_site_elbo(t, x, torch.tensor([0.5, -0.3, 0.2])).sum()
    summed = -objectives.loss("elbo", model, guide)(x)
    assert torch.allclose(summed, exact, rtol=1e-12)
    terms = evidence.log_weights(model, guide, x, 4000)
    elbo = estimators.elbo(terms.log_w)
    assert ((elbo.value.sum() - exact) / elbo.stderr.pow(2).sum().sqrt()).abs() < 4


@pytest.mark.parametrize("objective", ["enum", "elbo"])
def test_enum_objective_sums_out_a_discrete_site_the_guide_draws_unmarked(float64, objective):
    """``enum`` marks the guide's discrete site for enumeration: the loss is the exact ELBO (a sum
    over c, no draw); ``elbo`` on the same guide draws c (score-function) and is not."""
    t, x = discrete_parameters(), binary_points()
    model, guide = drawn_site_programs(t)
    loss_fn = objectives.loss(objective, model, guide)
    exact = exact_drawn_site_elbo(t, x, torch.tensor([0.5, -0.3, 0.2])).sum()
    summed = torch.allclose(-loss_fn(x), exact, rtol=1e-12)
    assert summed == (objective == "enum")
    assert ("TraceEnum_ELBO (enumerated: c)" in loss_fn.estimators["unlabelled"]) == (objective == "enum")


# refusals, one line each

def missing_discrete_site(x):
    with pyro.plate("data", x.shape[0]):
        c = pyro.sample("c", dist.Categorical(torch.ones(2) / 2))
        pyro.sample("x", dist.Bernoulli(torch.tensor([0.2, 0.8])[c][:, None].expand(-1, P)).to_event(1), obs=x)


def sequential_site(x):
    with pyro.plate("data", x.shape[0]):
        c = pyro.sample("c", dist.Categorical(torch.ones(2) / 2), infer={"enumerate": "sequential"})
        pyro.sample("x", dist.Bernoulli(torch.tensor([0.2, 0.8])[c][:, None].expand(-1, P)).to_event(1), obs=x)


def missing_continuous_site(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], P), 1.0).to_event(1))
        pyro.sample("x", dist.Bernoulli(logits=z).to_event(1), obs=x)


@pytest.mark.parametrize("model, message", [
    (missing_discrete_site, r"latent site 'c' of the model is not sampled by the guide: mark it infer=\{'enumerate': 'parallel'\}"),
    (sequential_site, "site 'c' is marked for sequential enumeration: only"),
    (missing_continuous_site, "latent site 'z' of the model is not sampled by the guide: the guide must sample every continuous"),
], ids=["discrete-unmarked", "sequential", "continuous"])
def test_contract_refuses_a_latent_site_neither_enumerated_nor_sampled(model, message):
    with pytest.raises(ContractError, match=message) as e:
        contract.check(model, no_guide, binary_points())
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("objective", ["mean-field", "iwae", "iwae-dreg"])
@pytest.mark.parametrize("kind", ["drawn", "enumerated"])
def test_objectives_that_need_reparameterized_sites_refuse_discrete_ones(objective, kind):
    t, x = discrete_parameters(), binary_points()
    model, guide = drawn_site_programs(t, enumerate_guide=kind == "enumerated")
    expected = "needs reparameterized guide sites" if kind == "drawn" else "cannot sum out the enumerated"
    with pytest.raises(ContractError, match=f"`objective` {objective} {expected}.*use `objective` elbo"):
        objectives.loss(objective, model, guide, num_particles=2)(x)


def test_beta_is_refused_where_sites_are_enumerated():
    t = mixture_parameters()
    enumerated, _, guide = mixture_models(t)
    with pytest.raises(PyrovaeError, match="`beta` other than 1"):
        objectives.loss("elbo", enumerated, guide, beta=0.5)(mixture_data(t))


def test_ais_refuses_a_discrete_site_the_guide_draws():
    t, x = discrete_parameters(), binary_points()
    model, guide = drawn_site_programs(t)
    with pytest.raises(ContractError, match=r"AIS and BDMC do not apply where the guide draws a discrete site \(c\): enumerate it in the model"):
        ais.ais(model, guide, x, num_steps=2, num_chains=2)


# ---------------------------------------------------------------- AIS with the component summed out


@pytest.mark.parametrize("variant", list(BROKEN_SUM))
def test_annealing_densities_sum_the_component_out(float64, monkeypatch, variant):
    """At given z, the path's log p(x, z) is log Σ_c π_c p(z | c) p(x | z, c) and the prior start's
    log f_0 is log Σ_c π_c p(z | c), written out by hand; the guide start's log f_0 is log q(z | x)."""
    if BROKEN_SUM[variant] is not None:
        monkeypatch.setattr(annealing, "sum_out", BROKEN_SUM[variant])
    t = mixture_parameters()
    model, shift = shifted_mixture(t)
    _, _, guide = mixture_models(t)
    x = mixture_data(t)
    agree = []
    for start in ("guide", "prior"):
        pyro.set_rng_seed(2)
        path = annealing.AnnealingPath(model, guide, x, 5, start, (), {})
        assert [s.name for s in path.sites] == ["z"] and path.summed == ["c"]
        state = path(path.initial)
        z = path.initial  # (chains, N, D): z has no bijection
        prior, likelihood = component_terms(t, shift, z, x)
        joint = torch.logsumexp(prior + likelihood, 0)
        f0 = torch.logsumexp(prior, 0) if start == "prior" else dist.Normal((x - t["b"]) @ (0.3 * torch.ones(P, D)), 1.5).log_prob(z).sum(-1)
        agree.append(torch.allclose(state.log_f0, f0, rtol=0, atol=1e-10)
                     and torch.allclose(state.log_ratio, joint - f0, rtol=0, atol=1e-10))
    assert all(agree) == (variant == "correct"), agree


@pytest.mark.parametrize("variant", list(BROKEN_SUM))
def test_ais_and_bdmc_on_an_enumerated_mixture_reach_its_exact_log_px(float64, monkeypatch, variant):
    """AIS (T = 200) on the mixture with its component enumerated: every point within 4 standard
    errors of the closed form, from the guide and from the prior; BDMC's bounds bracket the exact
    log p(x) of the simulated points within 4 standard errors. A broken sum moves the target."""
    if BROKEN_SUM[variant] is not None:
        monkeypatch.setattr(annealing, "sum_out", BROKEN_SUM[variant])
    t = mixture_parameters()
    enumerated, _, guide = mixture_models(t)
    x = mixture_data(t)
    options = dict(num_steps=200, num_chains=16, num_leapfrog=5, step_size=0.1)
    problems = []
    for start in ("guide", "prior"):
        result = ais.ais(enumerated, guide, x, start=start, seed=0, **options)
        z = (result.log_px.value - exact_mixture_log_px(t, x)) / result.log_px.stderr
        if not (z.abs() < 4).all():
            problems.append(f"AIS from the {start}: z-scores {z.tolist()}")
    pyro.set_rng_seed(3)
    sandwich = ais.bdmc(enumerated, guide, x, **options)
    exact = exact_mixture_log_px(t, sandwich.x)
    low = (sandwich.lower.log_px.value - exact) / sandwich.lower.log_px.stderr
    high = (sandwich.upper.log_px.value - exact) / sandwich.upper.log_px.stderr
    if not ((low < 4).all() and (high > -4).all()):
        problems.append(f"BDMC: lower z {low.tolist()}, upper z {high.tolist()}")
    assert (problems == []) == (variant == "correct"), problems


def test_fit_trains_an_enumerated_model_eagerly_and_says_so(caplog):
    """capture (the default) falls back to eager in one line; the loss goes down."""
    from pyrovae.data import Batches
    from pyrovae.train import TrainConfig, fit

    t = mixture_parameters()
    enumerated, _, guide = mixture_models(t)
    x = mixture_data(t, 64).float()

    with caplog.at_level(logging.INFO):
        history = fit(SimpleNamespace(model=enumerated, guide=guide), Batches(x, 16), TrainConfig(epochs=3, batch_size=16, lr=0.05, capture="auto"), test_x=x, progress=False)
    assert "capture: not for a model with discrete latent sites (c); training eagerly" in caplog.text
    assert "TraceEnum_ELBO (enumerated: c)" in caplog.text
    assert history[-1]["test_elbo"] > history[0]["test_elbo"]


# the example model files


def test_enumerated_mixture_example_is_the_built_in_mixture_prior(float64):
    """examples/models/enumerated_mixture.py with the built-in ``MixturePrior``'s parameters gives its
    log-weights on the same draws, and its AIS estimates on the same chains: the component summed out
    is the ``MixtureSameFamily``."""
    from pyrovae.models import MixturePrior

    from pyrovae import factory

    module = factory.load(f"{ROOT}/examples/models/enumerated_mixture.py:mixture_vae")(16, components=3, latent_dim=2, hidden=(8,)).double()
    x = binary_points(5).repeat(1, 4)
    built_in = MixturePrior(2, 3).double()
    built_in.load_state_dict(module.prior.state_dict())
    pyro.set_rng_seed(3)
    enumerated = evidence.log_weights(module.model, module.guide, x, 50).log_w
    annealed = ais.ais(module.model, module.guide, x, num_steps=20, num_chains=4, seed=0).log_px.value
    module.prior = built_in
    pyro.set_rng_seed(3)
    assert torch.allclose(enumerated, evidence.log_weights(module.model, module.guide, x, 50).log_w, rtol=0, atol=1e-10)
    assert torch.allclose(annealed, ais.ais(module.model, module.guide, x, num_steps=20, num_chains=4, seed=0).log_px.value,
                          rtol=0, atol=1e-8)  # AIS too: the same chains on the same path


def test_evaluate_ais_and_bdmc_on_the_enumerated_example(tmp_path, capsys):
    """``pyrovae evaluate --ais --bdmc`` on the example's model: the component summed out, both run."""
    from pyrovae.cli.main import main

    run = tmp_path / "r"
    assert main(["train", "--model", f"{ROOT}/examples/models/enumerated_mixture.py:mixture_vae", "--model-arg", "components=3",
                 "--latent-dim", "2", "--hidden", "16", "--epochs", "1", "--out", str(run), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(run), "--ais", "--bdmc", "--limit", "3", "--ais-steps", "10", "--ais-chains", "4", "-k", "50",
                 "--no-progress", "--json", str(tmp_path / "e.json")]) == 0
    out = capsys.readouterr().out
    assert "log p(x), AIS lower bound" in out and "log p(x) upper bound, reverse AIS" in out
    report = json.loads((tmp_path / "e.json").read_text())
    assert all(math.isfinite(v) for v in report["per_point"]["ais_log_px"] + report["bdmc"]["per_point"]["gap"])


def test_pyro_ss_vae_example_keeps_the_contract_and_trains_by_enumeration():
    """Pyro's ss_vae_M2 model and guide as adapted: TraceEnum_ELBO on unlabelled batches, the
    example's classifier loss as the observed site ``y_aux`` on labelled ones."""
    from pyrovae import factory
    from pyrovae.data import Labelled

    module = factory.load(f"{ROOT}/examples/models/ss_vae_m2.py:ss_vae")(16, num_classes=3, z_dim=2, hidden_layers=[8])
    x = binary_points(6).repeat(1, 4).float()
    assert contract.check(module.model, module.guide, x).enumerated == ("y",)
    loss_fn = objectives.loss("elbo", module.model, module.guide)
    assert torch.isfinite(loss_fn(x)) and torch.isfinite(loss_fn(Labelled(x, torch.tensor([0, 1, 2, 0, 1, 2]))))
    assert loss_fn.estimators == {"unlabelled": "TraceEnum_ELBO (enumerated: y)", "labelled": "Trace_ELBO"}
    terms = evidence.log_weights(module.model, module.guide, x, 10)
    assert set(terms.log_likelihood) == {"x"} and terms.kl_method["y"] == "not applicable: p(y | ·) may depend on z, which the guide draws after y"
