"""Annealed importance sampling and BDMC, checked against the linear-Gaussian oracles' exact log p(x).

Every tolerance is a number of the estimator's own standard errors (the delta method's, across
chains); seeds are fixed, so each test is deterministic.
"""

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.poutine.messenger import Messenger
from torch import nn

from pyrovae import ais as ais_module, graphs
from pyrovae.ais import AISSettings, State, ais, bdmc, hmc_transition, sigmoid_schedule, simulate
from pyrovae.annealing import AnnealingPath
from pyrovae.context import fast_context
from pyrovae.hmc import CapturedTransition
from pyrovae.cli.main import main
from pyrovae.errors import ContractError, PyrovaeError
from pyrovae.estimators import log_px as is_log_px
from pyrovae.evidence import log_weights
from pyrovae.guides import LinearGaussianGuide
from pyrovae.models import PPCA, HierarchicalLinearGaussian, VAEConfig, build_vae
from pyrovae.nn import register

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def oracle(kind: str, points: int = 5, seed: int = 100):
    """A linear-Gaussian model, a deliberately poor guide (mean shifted by 1, scale halved, blind
    to x), data drawn from the model's marginal, and the exact log p(x)."""
    torch.manual_seed(seed)
    model = PPCA(6, 2) if kind == "ppca" else HierarchicalLinearGaussian(6, 2, 2)
    guide = LinearGaussianGuide(6, model.sites)
    with torch.no_grad():
        guide.c.fill_(1.0)
        guide.L.mul_(0.5)
    x = model.marginal().sample((points,))
    return model, guide, x, model.log_px(x).detach()


def z_scores(estimate, exact) -> tuple[torch.Tensor, float]:
    """Per point (estimate − exact) / s.e., and the z-score of the sum over points."""
    diff = estimate.value - exact
    return diff / estimate.stderr, (diff.sum() / estimate.stderr.pow(2).sum().sqrt()).item()


# ---------------------------------------------------------------- pieces


def test_sigmoid_schedule():
    betas = sigmoid_schedule(100)
    assert betas.shape == (101,) and betas[0] == 0 and betas[-1] == 1
    assert (betas.diff() > 0).all()
    steps = betas.diff()
    assert steps[0] < steps[50] / 10 and steps[-1] < steps[50] / 10  # small steps at both ends
    assert sigmoid_schedule(1).tolist() == [0.0, 1.0]


def replace_everywhere(monkeypatch, original, replacement) -> None:
    """Put ``replacement`` in place of the function ``original`` in every pyrovae module that holds it
    under its name (the module defining it and those importing it), so that a deliberately broken
    variant reaches its callers wherever they live."""
    name = original.__name__
    holders = [m for m in list(sys.modules.values())
               if getattr(m, "__name__", "").startswith("pyrovae") and getattr(m, name, None) is original]
    assert holders, f"no pyrovae module holds {name}"
    for module in holders:
        monkeypatch.setattr(module, name, replacement)


# A Gaussian annealing path, coordinate by coordinate: f_0 = N(0, 1) and p ∝ N(m, s²), so that
# f_β ∝ f_0^(1−β) p^β is N(μ_β, v_β) with precision 1/v_β = (1 − β) + β/s² and μ_β = v_β β m/s².
PATH_M = torch.tensor([[2.0, -1.5, 0.5], [1.0, 3.0, -2.0]], dtype=torch.float64)  # (B, D): two points, three coordinates
PATH_S = torch.tensor([[0.5, 0.7, 1.5], [0.4, 1.0, 0.6]], dtype=torch.float64)


def gaussian_path(u: torch.Tensor) -> State:
    """The state at u (C, B, D) on that path: log f_0, log p − log f_0 and their gradients."""
    m, s = PATH_M.to(u), PATH_S.to(u)
    log_f0 = -0.5 * (u * u).sum(-1)
    log_p = (-0.5 * ((u - m) / s) ** 2).sum(-1)
    return State(u, log_f0, log_p - log_f0, -u, -(u - m) / s**2 + u)


def gaussian_target(beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of f_β, (B, D) each."""
    precision = (1 - beta) + beta / PATH_S**2
    return beta * PATH_M / PATH_S**2 / precision, 1 / precision


def potential_blind(u: torch.Tensor) -> State:
    """Broken: the right gradients but log-densities of 0, so the Metropolis test sees only the momenta."""
    s = gaussian_path(u)
    return s._replace(log_f0=torch.zeros_like(s.log_f0), log_ratio=torch.zeros_like(s.log_ratio))


TRANSITIONS = {  # name → (transition(state, density, beta, step_size, num_leapfrog), the problem it must show)
    "correct": (lambda *a: hmc_transition(*a), None),
    "ignores-beta-moves-under-p": (lambda s, d, beta, *a: hmc_transition(s, d, 1.0, *a), "not f_β"),
    "ignores-beta-moves-under-f0": (lambda s, d, beta, *a: hmc_transition(s, d, 0.0, *a), "not f_β"),
    "metropolis-blind-to-the-potential": (lambda s, d, *a: hmc_transition(s, potential_blind, *a), "not f_β"),
}


@pytest.mark.parametrize("variant", list(TRANSITIONS))
def test_hmc_leaves_each_intermediate_gaussian_invariant(float64, variant):
    """Start C chains from exact draws of f_β; after 10 HMC transitions at β (step size 0.6, 3
    leapfrog steps: some proposals are rejected), each coordinate's mean and variance over the
    independent chains still match f_β's within 4.5 standard errors, at β = 0, 0.3, 0.7 and 1.
    A transition that ignores β, or whose Metropolis test ignores the potential, is caught."""
    transition, expected = TRANSITIONS[variant]
    C = 4000
    problems = []
    for beta in (0.0, 0.3, 0.7, 1.0):
        torch.manual_seed(0)
        mean, var = gaussian_target(beta)
        state, accepts = gaussian_path(mean + var.sqrt() * torch.randn(C, *PATH_M.shape)), []
        for _ in range(10):
            state, accept = transition(state, gaussian_path, beta, torch.tensor(0.6), 3)
            accepts.append(accept.mean().item())
        if not 0.3 < sum(accepts) / len(accepts) < 0.99:
            problems.append(f"β = {beta}: acceptance {sum(accepts) / len(accepts):.2f}")
        u = state.u
        z_mean = (u.mean(0) - mean) / (var / C).sqrt()
        z_var = (u.var(0) - var) / (var * math.sqrt(2 / (C - 1)))
        if z_mean.abs().max() > 4.5 or z_var.abs().max() > 4.5:
            problems.append(f"β = {beta}: the chains are not f_β: mean z {z_mean.abs().max():.1f}, variance z {z_var.abs().max():.1f}")
    if expected is None:
        assert problems == []
    else:
        assert any(expected in p for p in problems), problems


PYRO_TRANSITIONS = {
    "correct": (None, None),
    "ignores-beta-moves-under-p": (lambda s, d, beta, *a: hmc_transition(s, d, 1.0, *a), "misses"),
    "ignores-beta-moves-under-f0": (lambda s, d, beta, *a: hmc_transition(s, d, 0.0, *a), "misses"),
}


@pytest.mark.parametrize("variant", list(PYRO_TRANSITIONS))
def test_transitions_of_a_pyro_model_keep_neals_identity_at_each_beta(float64, monkeypatch, variant):
    """The same through a Pyro model: PPCA started from its prior (f_0 = N(0, I), p(x, z) Gaussian in
    z), with a schedule that makes all its transitions at one β: 0, β, …, β, 1. Then
    log w = β r(z_0) + (1 − β) r(z_{T−1}), r = log p(x, z) − log f_0(z), and E[w] = p(x) holds only if
    every transition leaves f_β invariant (Neal 2001): with M = 1000 chains, log p̂(x) is within
    4 standard errors of the exact log p(x) at β = 0.3 and 0.7. A transition ignoring β misses by ~10."""
    replacement, expected = PYRO_TRANSITIONS[variant]
    if replacement is not None:
        replace_everywhere(monkeypatch, hmc_transition, replacement)
    torch.manual_seed(100)
    model = PPCA(6, 2)
    guide = LinearGaussianGuide(6, model.sites)
    x = model.marginal().sample((4,))
    exact = model.log_px(x).detach()
    problems = []
    for beta in (0.3, 0.7):
        T = 20
        schedule = torch.tensor([0.0] + [beta] * (T - 1) + [1.0])
        pyro.set_rng_seed(0)
        result = ais(model.model, guide, x, num_steps=T, num_chains=1000, num_leapfrog=3, step_size=0.3, start="prior",
                     schedule=schedule)
        z, total = z_scores(result.log_px, exact)
        if z.abs().max() > 4 or abs(total) > 4:
            problems.append(f"β = {beta}: log p̂(x) misses the exact value by {z.tolist()} s.e. (sum: {total:.1f})")
    if expected is None:
        assert problems == []
    else:
        assert any(expected in p for p in problems), problems


def test_one_step_is_importance_sampling(float64):
    """T = 1: no transitions, one step β 0 → 1: the weights are log p(x, z) − log q(z | x) on the
    guide's draws, the same draws as pyrovae.evidence gives under the same seed."""
    model, guide, x, _ = oracle("hierarchical")
    pyro.set_rng_seed(3)
    result = ais(model.model, guide, x, num_steps=1, num_chains=200)
    pyro.set_rng_seed(3)
    log_w = log_weights(model.model, guide, x, 200).log_w
    torch.testing.assert_close(result.log_w, log_w.double())
    expected = is_log_px(log_w.double())
    torch.testing.assert_close(result.log_px.value, expected.value)
    torch.testing.assert_close(result.log_px.stderr, expected.stderr)
    assert result.accept.isnan().all()


@pytest.mark.parametrize("kind", ["ppca", "hierarchical"])
def test_exact_guide_gives_exact_weights(float64, kind):
    """With q(z | x) = p(z | x), log p(x, z) − log q(z | x) = log p(x) for every z: every chain's
    log-weight is exact after HMC moves, forward and reverse. For the hierarchical model the guide's
    z2 depends on z1, so this also checks that the guide is scored at the chains' current z1."""
    model, guide, x, exact = oracle(kind)
    guide.set_exact_posterior(model)
    result = ais(model.model, guide, x, num_steps=6, num_chains=4, num_leapfrog=3, step_size=0.3)
    assert (result.accept > 0.5).all()  # the chains moved
    torch.testing.assert_close(result.log_w, exact.expand(4, -1), rtol=0, atol=1e-9)
    sandwich = bdmc(model.model, guide, x, num_steps=6, num_chains=4, num_leapfrog=3, step_size=0.3)
    exact_sim = model.log_px(sandwich.x).detach()
    torch.testing.assert_close(sandwich.lower.log_px.value, exact_sim, rtol=0, atol=1e-9)
    torch.testing.assert_close(sandwich.upper.log_px.value, exact_sim, rtol=0, atol=1e-9)


class ReadsValues(Messenger):
    """Python reads every sample site's value (``bool(...)``): data-dependent control flow, which
    ``make_fx`` cannot trace, so that capturing the density fails and AIS falls back to eager."""

    def _postprocess_message(self, msg) -> None:
        if msg["type"] == "sample":
            bool(torch.isfinite(msg["value"]).all())


class Counted:
    """A model that counts how often it runs."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, x):
        self.calls += 1
        return self.model(x)


@pytest.mark.parametrize("kind, variant", [("hierarchical", "correct"), ("vae", "correct"),
                                           ("hierarchical", "tracing-fails-falls-back-to-eager")])
def test_capture_replays_the_eager_density(float64, kind, variant):
    """The traced graph gives the same chains, number for number, as the Pyro programs run eagerly
    (a guide with a site that depends on another, and the VAE's networks and Bernoulli likelihood),
    and it is the graph that ran: with capture the model runs as often at T = 16 as at T = 8 (only to
    set up and trace), eagerly 2 × 8 more times. A model that cannot be traced falls back to eager
    evaluation, which the second check reports."""
    if kind == "vae":
        module = build_vae(VAEConfig(16, latent_dim=2, hidden=(8,))).double()
        model, guide = module.model, module.guide
        x = torch.bernoulli(torch.full((4, 16), 0.3))
    else:
        oracle_model, guide, x, _ = oracle(kind)
        model = oracle_model.model
    if variant != "correct":
        model = ReadsValues()(model)
    calls, results = {}, {}
    for capture in (True, False):
        for T in (8, 16):
            counted = Counted(model)
            pyro.set_rng_seed(4)
            results[capture, T] = ais(counted, guide, x, num_steps=T, num_chains=3, num_leapfrog=2, capture=capture)
            calls[capture, T] = counted.calls
    for T in (8, 16):
        torch.testing.assert_close(results[True, T].log_w, results[False, T].log_w)
        torch.testing.assert_close(results[True, T].accept, results[False, T].accept)
    assert calls[False, 16] - calls[False, 8] == 8 * 2  # eager: one model run per leapfrog step
    captured = calls[True, 16] == calls[True, 8] and calls[True, 8] < calls[False, 8]
    assert captured == (variant == "correct"), calls


def vae_and_points(n=4, seed=0):
    torch.manual_seed(seed)
    module = build_vae(VAEConfig(16, latent_dim=2, hidden=(8,))).double()
    return module, torch.bernoulli(torch.full((n, 16), 0.3))


@pytest.mark.parametrize("variant", ["correct", "graph-off-by-1e-3", "graph-draws-more"])
def test_the_captured_transition_is_the_eager_one_number_for_number(float64, monkeypatch, variant):
    """The whole HMC transition as one graph (momentum, leapfrog steps with the model's density and its
    gradients, accept test): from the same state and generator state, the same new state, acceptance
    and draws as hmc_transition on Pyro's programs, call after call; fresh noise on each replay. The
    first call's check is shown to fail on a graph whose outputs are off, or which draws once more."""
    module, x = vae_and_points()
    with fast_context():
        path = AnnealingPath(module.model, module.guide, x, 3, "guide", (), {})
        state = path(path.initial)
        eps = torch.full((4,), 0.2)
        captured = CapturedTransition(path, state, 0.5, eps, 3)
        if variant != "correct":
            graph = captured.graph

            def broken(*inputs):
                out = graph(*inputs)
                if variant == "graph-draws-more":
                    torch.rand(1)
                    return out
                return (out[0] + 1e-3, *out[1:])

            captured.graph = broken
        states = []
        for call in range(3):
            pyro.set_rng_seed(call)
            new, accept = captured(state, 0.5, eps)
            after = torch.get_rng_state()
            pyro.set_rng_seed(call)
            expected, expected_accept = hmc_transition(state, path, 0.5, eps, 3)
            assert torch.equal(after, torch.get_rng_state())
            for a, b in zip((*new, accept), (*expected, expected_accept)):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
            states.append(new.u)
    assert not torch.equal(states[1], states[2])  # fresh momenta
    assert (captured.failure is None) == (variant == "correct"), captured.failure


def test_a_captured_transition_is_kept_across_passes_and_calls(float64, monkeypatch):
    """One trace for every pass of one shape, in one call and the next (the path reads each pass's
    points from the graph's buffer, the parts computed once recomputed): the same log-weights as the
    eager transitions, number for number, on other points; a pass of another shape is traced anew."""
    traced = []
    real_trace = graphs.trace
    monkeypatch.setattr(graphs, "trace", lambda fn, *inputs, **k: traced.append(tuple(inputs[0].shape)) or real_trace(fn, *inputs, **k))
    ais_module.clear_cache()
    module, x = vae_and_points(n=10)
    options = {"num_steps": 4, "num_chains": 2, "num_leapfrog": 2, "batch_size": 4}
    results = {}
    for capture in (True, False):
        for rows in (slice(0, 8), slice(2, 10)):  # passes of 4, 4 points; a second call on other points
            pyro.set_rng_seed(7)
            results[capture, rows.start] = ais(module.model, module.guide, x[rows], capture=capture, **options)
        pyro.set_rng_seed(7)
        results[capture, "odd"] = ais(module.model, module.guide, x[:6], capture=capture, **options)  # passes of 4 and 2
    for key in (0, 2, "odd"):
        torch.testing.assert_close(results[True, key].log_w, results[False, key].log_w, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(results[True, key].accept, results[False, key].accept, rtol=1e-10, atol=1e-10)
    C = 2 + ais_module.TUNE_CHAINS
    # per shape, the density through Pyro and the transition over its graph; u is (chains, points, latent dims)
    assert traced == [(C, 4, 2), (C, 4, 2), (C, 2, 2), (C, 2, 2)]
    ais_module.clear_cache()


# ---------------------------------------------------------------- against the exact evidence


@pytest.mark.parametrize("kind,start", [("ppca", "guide"), ("hierarchical", "guide"), ("hierarchical", "prior")])
def test_ais_converges_to_exact_log_px(float64, kind, start):
    """With a poor guide, T = 1 (importance sampling) misses log p(x) by many standard errors; at
    T = 300 every point is within 4 standard errors of the exact value, and so is their sum."""
    model, guide, x, exact = oracle(kind)
    pyro.set_rng_seed(0)
    options = dict(num_chains=16, num_leapfrog=5, step_size=0.1, start=start)
    _, far = z_scores(ais(model.model, guide, x, num_steps=1, **options).log_px, exact)
    result = ais(model.model, guide, x, num_steps=300, **options)
    z, total = z_scores(result.log_px, exact)
    if start == "guide":
        assert far < -5
    assert z.abs().max() < 4, z
    assert abs(total) < 4, total
    assert (result.log_px.stderr < 0.5).all()
    assert ((result.accept > 0.5) & (result.accept < 0.85)).all(), result.accept  # adapted toward 0.65


def upper_is_lower(result):
    """Broken: an 'upper bound' that repeats the forward pass."""
    return dataclasses.replace(result, upper=result.lower)


def other_points_latents(simulate_):
    """Broken: the reverse chains start from the latents simulated for another point, not those of x."""
    def broken(model, x, *args):
        x_sim, latents = simulate_(model, x, *args)
        return x_sim, {name: value.roll(1, 0) for name, value in latents.items()}

    return broken


def frozen(transition):
    """Broken: transitions that never move the chains."""
    def broken(state, *args):
        return state, torch.zeros_like(state.log_f0)

    return broken


BDMC_VARIANTS = {  # name → (result ↦ result, {function: its replacement given it}, the problem it must show)
    "correct": (None, None, None),
    "upper-bound-repeats-the-forward-pass": (upper_is_lower, None, "upper bound is not clearly above"),
    "reverse-chains-start-from-another-points-latents": (None, (simulate, other_points_latents), "upper bound is not clearly above"),
    "transitions-do-not-move": (None, (hmc_transition, frozen), "misses the exact value"),
}


def bdmc_problems(kind: str, variant: str, monkeypatch, expected: str | None = None) -> list[str]:
    """BDMC on 6 points simulated from a linear-Gaussian model with a poor guide: at T = 2 the lower
    bound is far below the exact log p(x) and the upper bound far above (the sum's z-score beyond ±5);
    at T = 100 both are within 4 standard errors of it, at every point and summed. (Stops after
    T = 2 if the ``expected`` problem is already found.)"""
    transform, replacement, _ = BDMC_VARIANTS[variant]
    if replacement is not None:
        original, broken = replacement
        replace_everywhere(monkeypatch, original, broken(original))
    model, guide, x, _ = oracle(kind, points=6)
    problems = []
    for T in (2, 100):
        if expected is not None and any(expected in p for p in problems):
            break  # a broken variant is shown to fail: no need for the long run
        pyro.set_rng_seed(1)
        result = bdmc(model.model, guide, x, num_steps=T, num_chains=16, num_leapfrog=5, step_size=0.1)
        if transform is not None:
            result = transform(result)
        assert not torch.equal(result.x, x)  # simulated, not the template
        exact = model.log_px(result.x).detach()
        (lower, lower_total), (upper, upper_total) = (z_scores(b.log_px, exact) for b in (result.lower, result.upper))
        if T == 2:
            if not lower_total < -5:
                problems.append(f"T = 2: the lower bound is not clearly below log p(x): z = {lower_total:.1f}")
            if not upper_total > 5:
                problems.append(f"T = 2: the upper bound is not clearly above log p(x): z = {upper_total:.1f}")
            continue
        for name, z, total in (("lower", lower, lower_total), ("upper", upper, upper_total)):
            if not (z.abs().max() < 4 and abs(total) < 4):
                problems.append(f"T = 100: the {name} bound misses the exact value by {z.tolist()} s.e. (sum {total:.1f})")
    return problems


@pytest.mark.parametrize("kind", ["ppca", "hierarchical"])
@pytest.mark.parametrize("variant", list(BDMC_VARIANTS))
def test_bdmc_brackets_exact_log_px(float64, monkeypatch, kind, variant):
    """The bounds are clearly apart from the exact value on both sides when AIS is short, and meet it
    when AIS is long (see bdmc_problems); each broken variant is reported for what it breaks."""
    expected = BDMC_VARIANTS[variant][2]
    problems = bdmc_problems(kind, variant, monkeypatch, expected)
    if expected is None:
        assert problems == []
    else:
        assert any(expected in p for p in problems), problems


def test_per_point_results_depend_on_neither_the_passes_nor_the_first_row(float64):
    """Under a seed, the pass starting at row r draws from its own stream: the last four of six
    points evaluated on their own (``first_row=2``) give the chains of the whole run, number for
    number, and the wrong first row gives others. Points are independent whatever the pass size
    (each point has its own chains and step-size adaptation): with a fair guide (the exact posterior
    moved by 0.5, its scale shrunk by 0.7) passes of 1 and of 6 points agree within 4 combined
    standard errors at every point; the same comparison rejects T = 1 against T = 30."""
    model, guide, x, _ = oracle("ppca", points=6)
    guide.set_exact_posterior(model)
    with torch.no_grad():
        guide.c.add_(0.5)
        guide.L.mul_(0.7)
    options = {"num_steps": 30, "num_chains": 32, "num_leapfrog": 3, "step_size": 0.1}
    whole = ais(model.model, guide, x, seed=7, batch_size=2, **options)
    tail = ais(model.model, guide, x[2:], seed=7, first_row=2, batch_size=2, **options)
    for field in ("log_w", "accept", "step_size"):
        assert torch.equal(getattr(tail, field), getattr(whole, field)[..., 2:]), field
    assert torch.equal(ais(model.model, guide, x, seed=7, batch_size=2, **options).log_w, whole.log_w)
    wrong_row = ais(model.model, guide, x[2:], seed=7, first_row=0, batch_size=2, **options)
    assert not torch.isclose(wrong_row.log_w, whole.log_w[:, 2:]).any()

    def z_apart(a, b) -> torch.Tensor:
        return (a.log_px.value - b.log_px.value) / (a.log_px.stderr**2 + b.log_px.stderr**2).sqrt()

    ones = ais(model.model, guide, x, seed=8, batch_size=1, **options)
    sixes = ais(model.model, guide, x, seed=9, batch_size=6, **options)
    z = z_apart(ones, sixes)
    assert z.abs().max() < 4, z
    short = ais(model.model, guide, x, seed=9, batch_size=6, **{**options, "num_steps": 1})
    assert z_apart(short, sixes).abs().max() > 4  # the comparison can fail


# ---------------------------------------------------------------- other models run end to end


class StudentTPPCA(nn.Module):
    """z ~ StudentT(3)^D, x | z ~ N(W z + b, σ² I): a heavy-tailed prior with no closed-form evidence."""

    def __init__(self, data_dim: int, latent_dim: int):
        super().__init__()
        self.W = nn.Parameter(torch.randn(data_dim, latent_dim))
        self.b = nn.Parameter(torch.zeros(data_dim))

    def model(self, x):
        register(self)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.StudentT(3.0, x.new_zeros(self.W.shape[1]), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.W.T + self.b, 0.5).to_event(1), obs=x)


def test_student_t_prior_agrees_with_importance_sampling(float64):
    """AIS and importance sampling with K = 20 000 agree within 4 combined standard errors."""
    torch.manual_seed(0)
    model = StudentTPPCA(4, 2)
    guide = LinearGaussianGuide(4, {"z": 2}, diagonal=True)
    with torch.no_grad():
        guide.L.mul_(2.0)  # broad: a safe proposal for importance sampling
    x = torch.randn(4, 4)
    pyro.set_rng_seed(0)
    result = ais(model.model, guide, x, num_steps=100, num_chains=16, num_leapfrog=5, step_size=0.1)
    reference = is_log_px(log_weights(model.model, guide, x, 20_000).log_w.double())
    z = (result.log_px.value - reference.value) / (result.log_px.stderr**2 + reference.stderr**2).sqrt()
    assert z.abs().max() < 4, z
    assert result.accept.min() > 0.5


class GammaPoisson(nn.Module):
    """λ ~ Gamma(a, b)^P, x | λ ~ Poisson(λ): a positive latent (HMC runs on log λ), with exact
    evidence Σ_p log NegBinomial(x_p; a, b). Guide: a deliberately poor LogNormal."""

    a, b = 2.0, 0.5

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            lam = pyro.sample("lam", dist.Gamma(x.new_full((x.shape[1],), self.a), self.b).to_event(1))
            pyro.sample("x", dist.Poisson(lam).to_event(1), obs=x)

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("lam", dist.LogNormal(x.new_ones(x.shape[1]), 1.0).to_event(1))

    def log_px(self, x):
        a, b = self.a, self.b
        terms = torch.lgamma(x + a) - math.lgamma(a) - torch.lgamma(x + 1) + a * math.log(b / (1 + b)) - x * math.log(1 + b)
        return terms.sum(-1)


def test_positive_latent_through_its_bijection(float64):
    """A Gamma latent is annealed on log λ with the Jacobian: AIS meets the exact evidence."""
    gp = GammaPoisson()
    torch.manual_seed(0)
    x = torch.poisson(dist.Gamma(2.0, 0.5).sample((5, 3)))
    pyro.set_rng_seed(0)
    result = ais(gp.model, gp.guide, x, num_steps=200, num_chains=16, num_leapfrog=5, step_size=0.1)
    z, total = z_scores(result.log_px, gp.log_px(x))
    assert z.abs().max() < 4, z
    assert abs(total) < 4, total


def moment_z_scores(samples: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """z-scores of the sample mean (D,) and of every entry of the sample covariance (D, D) of n
    draws (n, D) against the expected ones; the covariance's standard errors from the draws' fourth moments."""
    n = len(samples)
    z_mean = (samples.mean(0) - mean) / (cov.diagonal() / n).sqrt()
    centred = samples - mean
    products = centred[:, :, None] * centred[:, None, :]  # (n, D, D)
    z_cov = (products.mean(0) - cov) / (products.var(0) / n).sqrt()
    return z_mean, z_cov


def simulation_problems(model: HierarchicalLinearGaussian, x_sim: torch.Tensor, latents: dict) -> list[str]:
    """What is wrong with (x, z1, z2) as draws of the hierarchical model's joint law, by z-tests
    (beyond 4.5): x's mean and covariance against the marginal N(b, H Σ Hᵀ + σ² I); the residuals
    x − W z2 − b and z2 − A z1 against N(0, σ² I) and N(0, s² I), uncorrelated with what they are
    conditioned on; z1 against N(0, I)."""
    problems = []
    marginal = model.marginal()
    z_mean, z_cov = moment_z_scores(x_sim, marginal.mean, marginal.covariance_matrix)
    if z_mean.abs().max() > 4.5:
        problems.append(f"the mean of x: z = {z_mean.abs().max():.1f}")
    if z_cov.abs().max() > 4.5:
        problems.append(f"the covariance of x: z = {z_cov.abs().max():.1f}")
    z1, z2 = latents["z1"], latents["z2"]
    layers = {"x given z2": (x_sim - z2 @ model.W.T - model.b, z2, model.noise_scale),
              "z2 given z1": (z2 - z1 @ model.A.T, z1, model.top_noise),
              "z1": (z1, torch.zeros_like(z1[:, :0]), 1.0)}
    for name, (residual, given, scale) in layers.items():
        d = residual.shape[1]
        joint = torch.cat([residual, given], 1)  # residual uncorrelated with the conditioning variables
        cov = torch.cov(joint.T, correction=0)
        expected = cov.clone()
        expected[:d, :] = expected[:, :d] = 0
        expected[:d, :d] = scale**2 * torch.eye(d)
        mean = torch.cat([torch.zeros(d), joint[:, d:].mean(0)])
        z_mean, z_cov = moment_z_scores(joint, mean, expected)
        if z_mean[:d].abs().max() > 4.5 or z_cov[:d].abs().max() > 4.5:
            problems.append(f"{name}: residual mean z {z_mean[:d].abs().max():.1f}, covariance z {z_cov[:d].abs().max():.1f}")
    return problems


def shuffled_coordinates(model, x_sim, latents):
    """Broken: each coordinate of x permuted on its own across points (each marginal right, not their covariance)."""
    g = torch.Generator().manual_seed(0)
    columns = [c[torch.randperm(len(c), generator=g)] for c in x_sim.T]
    return torch.stack(columns, 1), latents


def half_noise(model, x_sim, latents):
    """Broken: x's noise around W z2 + b halved."""
    mean = latents["z2"] @ model.W.T + model.b
    return mean + 0.5 * (x_sim - mean), latents


SIMULATE_VARIANTS = {  # name → (model, x, latents) ↦ broken (x, latents), and the problem each must show
    "correct": (None, None),
    "latents-of-other-points": (lambda m, x, z: (x, {k: v.roll(1, 0) for k, v in z.items()}), "x given z2"),
    "z2-from-another-z1": (lambda m, x, z: (x, {**z, "z1": z["z1"].roll(1, 0)}), "z2 given z1"),
    "x-with-half-its-noise": (half_noise, "x given z2"),
    "coordinates-shuffled": (shuffled_coordinates, "covariance of x"),
    "x-shifted": (lambda m, x, z: (x + 0.1, z), "mean of x"),
    "z1-too-wide": (lambda m, x, z: (x, {**z, "z1": 1.2 * z["z1"]}), "z1"),
}


@pytest.mark.parametrize("variant", list(SIMULATE_VARIANTS))
def test_simulate_draws_from_the_model(float64, variant):
    """BDMC's upper bound needs z to be an exact posterior draw for its x: simulated (x, z) must have
    the model's joint law, not only x's marginal mean. Each broken variant is reported for what it breaks."""
    model, _, x, _ = oracle("hierarchical", points=4000)
    x_sim, latents = simulate(model.model, x)
    assert set(latents) == {"z1", "z2"} and latents["z2"].shape == (4000, 2) and x_sim.shape == x.shape
    assert not torch.equal(x_sim, x)
    broken, expected = SIMULATE_VARIANTS[variant]
    with torch.no_grad():
        if broken is not None:
            x_sim, latents = broken(model, x_sim, latents)
        problems = simulation_problems(model, x_sim, latents)
    if expected is None:
        assert problems == []
    else:
        assert any(expected in p for p in problems), problems


# ---------------------------------------------------------------- errors


def test_settings_and_contract_errors(float64):
    model, guide, x, _ = oracle("ppca")
    with pytest.raises(PyrovaeError, match="AIS steps T must be at least 1"):
        ais(model.model, guide, x, num_steps=0)
    with pytest.raises(PyrovaeError, match="chains M must be at least 1"):
        ais(model.model, guide, x, num_chains=0)
    with pytest.raises(PyrovaeError, match="unknown AIS schedule 'cosine'"):
        ais(model.model, guide, x, schedule="cosine")
    with pytest.raises(PyrovaeError, match="start"):
        AISSettings(start="posterior").check()
    with pytest.raises(PyrovaeError, match="non-decreasing values from 0 to 1"):
        ais(model.model, guide, x, num_steps=2, schedule=torch.tensor([0.0, 0.7, 0.5]))

    def partial_guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("other", dist.Normal(x.new_zeros(2), 1.0).to_event(1))

    with pytest.raises(ContractError):
        ais(model.model, partial_guide, x, num_steps=2)


# ---------------------------------------------------------------- the command line and the benchmark


@pytest.mark.slow
def test_cli_ais_and_bdmc(tmp_path, capsys):
    run = tmp_path / "r"
    assert main(["train", "--out", str(run), "--epochs", "1", "--hidden", "16", "--latent-dim", "2", "--no-progress"]) == 0
    capsys.readouterr()
    common = ["--limit", "3", "--ais-steps", "20", "--ais-chains", "4", "-k", "50", "--no-compile", "--no-progress"]
    assert main(["evaluate", str(run), "--ais", *common, "--json", str(tmp_path / "e.json")]) == 0
    out = capsys.readouterr().out
    assert "log p(x), importance sampled (K=50)" in out  # the existing rows stay
    assert "AIS with HMC: T=20, M=4, L=10, start: guide" in out
    assert "log p(x), AIS lower bound" in out and "HMC acceptance mean" in out
    report = json.loads((tmp_path / "e.json").read_text())
    ais_summary = report["summary"]["ais"]
    assert (ais_summary["num_steps"], ais_summary["num_chains"], ais_summary["num_leapfrog"]) == (20, 4, 10)
    assert len(report["per_point"]["ais_log_px"]) == 3 and len(report["per_point"]["log_px"]) == 3
    assert all(math.isfinite(v) for v in report["per_point"]["ais_log_px"] + report["per_point"]["ais_accept"])

    assert main(["evaluate", str(run), "--bdmc", *common, "--json", str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    for row in ("BDMC on 3 points simulated from the model", "log p(x) lower bound, forward AIS",
                "log p(x) upper bound, reverse AIS", "gap upper − lower"):
        assert row in out
    bdmc_report = json.loads((tmp_path / "b.json").read_text())["bdmc"]
    assert len(bdmc_report["per_point"]["gap"]) == 3
    assert "ais" not in json.loads((tmp_path / "b.json").read_text())["summary"]

    assert main(["evaluate", str(run), "--ais", *common, "--ais-steps", "0"]) == 2
    assert "AIS steps T must be at least 1" in capsys.readouterr().err


@pytest.mark.slow
def test_benchmark_tiny(tmp_path):
    out = tmp_path / "ais_speed.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ais_speed.py"), "--tiny", "--threads", "1", "--out", str(out)],
                   check=True, cwd=ROOT, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    row = result["results"][0]
    assert row["points_per_s"]["pyrovae"] > 0 and row["points_per_s"]["pytorch"] > 0
    assert math.isfinite(row["log_px_mean"]["pyrovae"][0])
