"""Annealed importance sampling and BDMC, checked against the linear-Gaussian oracles' exact log p(x).

Every tolerance is a number of the estimator's own standard errors (the delta method's, across
chains); seeds are fixed, so each test is deterministic.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from pyrovae import ais as ais_module
from pyrovae.ais import AISSettings, State, ais, bdmc, hmc_transition, sigmoid_schedule, simulate
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


def _standard_normal(u: torch.Tensor) -> State:
    """log f_0 = log N(u; 0, I) up to a constant, log-ratio 0: every intermediate target is N(0, I)."""
    zero = torch.zeros_like(u[..., 0])
    return State(u, -0.5 * (u * u).sum(-1), zero, -u, torch.zeros_like(u))


def _normal_path(chains: int):
    """The same target through a Pyro model and guide: x carries no information about z (W = 0),
    so the exact posterior, which the guide is set to, is the prior N(0, I) at every β."""
    model = PPCA(3, 3)
    with torch.no_grad():
        model.W.zero_()
    guide = LinearGaussianGuide(3, model.sites).set_exact_posterior(model)
    x = torch.randn(2, 3)
    return ais_module._Path(model.model, guide, x, chains, "guide", (), {})


@pytest.mark.parametrize("through", ["potential", "pyro-model"])
def test_hmc_leaves_standard_normal_invariant(float64, through):
    """Start from exact N(0, I) draws; after HMC transitions with a fixed step size (large enough
    that a third of the proposals are rejected), each coordinate's mean and variance over the
    independent chains still match N(0, 1) within 4.5 standard errors."""
    C = 4000
    if through == "potential":
        density, u = _standard_normal, torch.randn(C, 2, 3)
    else:
        density = _normal_path(C)
        u = density.initial
    state, accepts = density(u), []
    for _ in range(10):
        state, accept = hmc_transition(state, density, beta=0.5, step_size=torch.tensor(1.3), num_leapfrog=3)
        accepts.append(accept.mean().item())
    assert 0.3 < sum(accepts) / len(accepts) < 0.9
    u = state.u.reshape(C, -1)  # (C, 6) independent coordinates
    mean_z = u.mean(0) * math.sqrt(C)
    var_z = (u.var(0) - 1) / math.sqrt(2 / C)
    assert mean_z.abs().max() < 4.5, mean_z
    assert var_z.abs().max() < 4.5, var_z


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


@pytest.mark.parametrize("kind", ["hierarchical", "vae"])
def test_capture_replays_the_eager_density(float64, kind):
    """The traced graph gives the same chains, number for number, as the Pyro programs run eagerly
    (a guide with a site that depends on another, and the VAE's networks and Bernoulli likelihood)."""
    if kind == "vae":
        model = guide = build_vae(VAEConfig(16, latent_dim=2, hidden=(8,))).double()
        model, guide = model.model, guide.guide
        x = torch.bernoulli(torch.full((4, 16), 0.3))
    else:
        model, guide, x, _ = oracle(kind)
        model = model.model
    results = []
    for capture in (True, False):
        pyro.set_rng_seed(4)
        results.append(ais(model, guide, x, num_steps=8, num_chains=3, num_leapfrog=2, capture=capture))
    torch.testing.assert_close(results[0].log_w, results[1].log_w)
    torch.testing.assert_close(results[0].accept, results[1].accept)


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


def test_bdmc_brackets_exact_log_px(float64):
    """On data simulated from the model, the forward (lower) and reverse (upper) bounds bracket the
    exact log p(x) within 4 standard errors each, and their gap is small and positive on the whole."""
    model, guide, x, _ = oracle("ppca", points=6)
    pyro.set_rng_seed(1)
    result = bdmc(model.model, guide, x, num_steps=100, num_chains=16, num_leapfrog=5, step_size=0.1)
    exact = model.log_px(result.x).detach()
    lower_z, _ = z_scores(result.lower.log_px, exact)
    upper_z, _ = z_scores(result.upper.log_px, exact)
    assert (lower_z < 4).all(), lower_z
    assert (upper_z > -4).all(), upper_z
    gap_z, total = z_scores(result.gap, torch.zeros(len(x), dtype=torch.float64))
    assert total > -4 and result.gap.value.mean() < 1.0
    assert not torch.equal(result.x, x)  # simulated, not the template


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


def test_simulate_draws_from_the_model(float64):
    model, _, x, _ = oracle("hierarchical", points=4000)
    x_sim, latents = simulate(model.model, x)
    assert set(latents) == {"z1", "z2"} and latents["z2"].shape == (4000, 2)
    marginal = model.marginal()
    z = (x_sim.mean(0) - marginal.mean) / (marginal.variance / 4000).sqrt()
    assert z.abs().max() < 4.5


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
