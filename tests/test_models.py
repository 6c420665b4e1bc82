"""Tests of pyrovae.models and pyrovae.guides.

The model/guide contract (site shapes, the data plate, extra particle dimensions), parameters under
a user's own ``SVI`` script, the registries, and the linear-Gaussian oracles checked against
independent closed forms (Bishop, *PRML*, §2.3.3 and §12.2).
"""

import copy
import json

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.poutine.util import site_is_subsample

from pyrovae.errors import PyrovaeError
from pyrovae.evidence import log_weights
from pyrovae.guides import DiagonalGaussianEncoder, LinearGaussianGuide
from pyrovae.models import (
    LIKELIHOODS,
    PRIORS,
    VAE,
    HierarchicalLinearGaussian,
    PPCA,
    StandardNormal,
    VAEConfig,
    build_model,
    build_vae,
)
from pyrovae.nn import mlp, skip_registration
from pyrovae.registry import Registry

N, P, D = 5, 12, 4  # data points, pixels, latent dimension
HIDDEN = (32,)
LIKELIHOOD_NAMES = ["bernoulli", "continuous-bernoulli"]


# ---------------------------------------------------------------- helpers


def data_for(likelihood: str, n: int = N, p: int = P, seed: int = 0) -> torch.Tensor:
    """Binary pixels for the Bernoulli likelihood, grey levels in (0, 1) for the continuous Bernoulli."""
    generator = torch.Generator().manual_seed(seed)
    grey = torch.rand(n, p, generator=generator)
    return torch.bernoulli(grey, generator=generator) if likelihood == "bernoulli" else grey


def small_vae(likelihood: str = "bernoulli", **kwargs) -> VAE:
    return build_vae(VAEConfig(P, D, HIDDEN, likelihood=likelihood, **kwargs))


def sample_sites(trace) -> dict:
    return {name: site for name, site in trace.nodes.items() if site["type"] == "sample" and not site_is_subsample(site)}


def model_and_guide(kind: str):
    """(model, guide, x, latent dims by site) for each kind of model the contract covers."""
    if kind in LIKELIHOOD_NAMES:
        vae = small_vae(kind)
        return vae.model, vae.guide, data_for(kind), {"z": D}
    if kind == "ppca":
        model = PPCA(P, D)
    else:
        model = HierarchicalLinearGaussian(P, 2, 3)
    guide = LinearGaussianGuide(P, model.sites)
    return model.model, guide, torch.randn(N, P), model.sites


def snapshot(module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def unchanged(module, before: dict[str, torch.Tensor]) -> list[str]:
    """Names of the parameters equal to their values in ``before``."""
    return [name for name, p in module.named_parameters() if torch.equal(p.detach(), before[name])]


def svi_steps(vae: VAE, x: torch.Tensor, steps: int = 3) -> SVI:
    """The script a user writes: SVI with Pyro's Adam and Trace_ELBO."""
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    for _ in range(steps):
        svi.step(x)
    return svi


def assert_mean_cov_within_stderr(samples: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor, z_max: float = 5.0):
    """samples (n, N, D) of N independent Gaussians N(mean[i], cov): z-score every mean and covariance entry.

    The standard error of a sample mean component is sqrt(cov_jj / n); of a sample covariance
    entry, sqrt((cov_jk² + cov_jj cov_kk) / n) (Gaussian fourth moments).
    """
    n = samples.shape[0]
    z_mean = (samples.mean(0) - mean) / (cov.diagonal() / n).sqrt()
    assert z_mean.abs().max() < z_max, z_mean
    centred = samples - mean  # the true mean: no degrees of freedom lost
    sample_cov = torch.einsum("sni,snj->nij", centred, centred) / n  # (N, D, D)
    stderr = ((cov**2 + cov.diagonal()[:, None] * cov.diagonal()[None, :]) / n).sqrt()
    z_cov = (sample_cov - cov) / stderr
    assert z_cov.abs().max() < z_max, z_cov


# ---------------------------------------------------------------- the model/guide contract


CONTRACT_KINDS = ["bernoulli", "continuous-bernoulli", "ppca", "hierarchical"]


@pytest.mark.parametrize("kind", CONTRACT_KINDS, ids=[f"vae-{k}" for k in LIKELIHOOD_NAMES] + ["ppca", "hierarchical"])
def test_sites_have_the_contract_shapes(kind):
    model, guide, x, latents = model_and_guide(kind)
    guide_trace = poutine.trace(guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x)
    model_sites, guide_sites = sample_sites(model_trace), sample_sites(guide_trace)

    assert set(guide_sites) == set(latents)  # the guide samples every latent site, and only those
    assert set(model_sites) == {*latents, "x"}
    for name, dim in latents.items():
        for site in (model_sites[name], guide_sites[name]):
            assert not site["is_observed"]
            assert site["fn"].batch_shape == (N,)
            assert site["fn"].event_shape == (dim,)
            assert site["value"].shape == (N, dim)
    observed = model_sites["x"]
    assert observed["is_observed"]
    assert torch.equal(observed["value"], x)
    assert observed["fn"].batch_shape == (N,)
    assert observed["fn"].event_shape == (P,)
    for site in [*model_sites.values(), *guide_sites.values()]:
        frames = [(f.name, f.dim, f.size) for f in site["cond_indep_stack"]]
        assert frames == [("data", -1, N)], site["name"]


@pytest.mark.parametrize("kind", CONTRACT_KINDS, ids=[f"vae-{k}" for k in LIKELIHOOD_NAMES] + ["ppca", "hierarchical"])
def test_an_outer_particle_plate_vectorizes_model_and_guide(kind):
    K = 3
    model, guide, x, latents = model_and_guide(kind)
    with pyro.plate("particles", K, dim=-2):
        guide_trace = poutine.trace(guide).get_trace(x)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x)
        prior_trace = poutine.trace(model).get_trace(x)  # the model alone: z from the prior
    for name, dim in latents.items():
        assert guide_trace.nodes[name]["value"].shape == (K, N, dim)
        assert prior_trace.nodes[name]["value"].shape == (K, N, dim)
        site = model_trace.nodes[name]
        assert site["fn"].log_prob(site["value"]).shape == (K, N)
    for trace in (model_trace, prior_trace):
        site = trace.nodes["x"]
        assert site["fn"].log_prob(x).shape == (K, N)
    # the particles are different draws
    first = next(iter(latents))
    z = guide_trace.nodes[first]["value"]
    assert not torch.equal(z[0], z[1])


def test_networks_accept_extra_leading_dimensions():
    net = mlp([3, 8, 5], "tanh")
    z = torch.randn(2, 7, 3)
    out = net(z)
    assert out.shape == (2, 7, 5)
    torch.testing.assert_close(out[1, 4], net(z[1, 4]))


@pytest.mark.parametrize("likelihood", LIKELIHOOD_NAMES)
def test_encoder_scale_is_positive_and_finite_at_initialization(likelihood):
    vae = small_vae(likelihood)
    generator = torch.Generator().manual_seed(1)
    x = torch.cat([data_for(likelihood, n=50), torch.zeros(1, P), torch.ones(1, P), 100 * torch.rand(5, P, generator=generator)])
    loc, scale = vae.encoder.loc_scale(x)
    assert loc.shape == scale.shape == (len(x), D)
    assert torch.isfinite(loc).all()
    assert torch.isfinite(scale).all() and (scale > 0).all()
    guide_site = poutine.trace(vae.guide).get_trace(x).nodes["z"]
    torch.testing.assert_close(guide_site["fn"].base_dist.scale, scale)


def test_encoder_scale_never_reaches_zero():
    encoder = DiagonalGaussianEncoder(P, D, HIDDEN)
    with torch.no_grad():  # drive the raw scale to -1e4: softplus would underflow to 0
        last = encoder.net[-1]
        last.weight.zero_()
        last.bias.fill_(-1e4)
    _, scale = encoder.loc_scale(torch.rand(3, P))
    assert (scale > 0).all()


def test_prior_follows_the_module_dtype():
    vae = small_vae().double()
    x = data_for("bernoulli").double()
    trace = poutine.trace(vae.model).get_trace(x)
    assert trace.nodes["z"]["value"].dtype == torch.float64
    assert trace.nodes["x"]["fn"].base_dist.logits.dtype == torch.float64


# ---------------------------------------------------------------- configs


def test_vae_config_round_trips_through_json():
    config = VAEConfig(P, D, (32, 16), "tanh", "continuous-bernoulli", "normal")
    d = json.loads(json.dumps(config.to_dict()))
    assert d["name"] == "vae"
    assert d["hidden"] == [32, 16]
    assert VAEConfig.from_dict(d) == config
    # and the registry of models rebuilds the same architecture from it
    built, direct = build_model(d), build_vae(config)
    assert isinstance(built, VAE)
    assert {n: p.shape for n, p in built.named_parameters()} == {n: p.shape for n, p in direct.named_parameters()}
    assert isinstance(built.likelihood, LIKELIHOODS["continuous-bernoulli"])


def test_vae_config_from_dict_fills_defaults():
    assert VAEConfig.from_dict({"name": "vae", "data_dim": 64}) == VAEConfig(64)


def test_encoder_mirrors_the_decoder():
    vae = build_vae(VAEConfig(P, D, (32, 16)))
    decoder_sizes = [m.out_features for m in vae.decoder if isinstance(m, torch.nn.Linear)]
    encoder_sizes = [m.out_features for m in vae.encoder.net if isinstance(m, torch.nn.Linear)]
    assert decoder_sizes == [32, 16, P]
    assert encoder_sizes == [16, 32, 2 * D]


# ---------------------------------------------------------------- parameters under SVI


@pytest.mark.parametrize("likelihood", LIKELIHOOD_NAMES)
def test_a_users_svi_script_trains_every_parameter(likelihood):
    vae = small_vae(likelihood)
    before = snapshot(vae)
    svi_steps(vae, data_for(likelihood, n=20))
    assert unchanged(vae, before) == []
    assert len(pyro.get_param_store()) == len(before)


@pytest.mark.parametrize("model_class", [PPCA, HierarchicalLinearGaussian], ids=["ppca", "hierarchical"])
def test_svi_trains_every_parameter_of_a_linear_gaussian_model_and_guide(model_class):
    model = model_class(P, D) if model_class is PPCA else model_class(P, 2, 3)
    guide = LinearGaussianGuide(P, model.sites)
    before_model, before_guide = snapshot(model), snapshot(guide)
    svi = SVI(model.model, guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    for _ in range(3):
        svi.step(torch.randn(N, P))
    assert unchanged(model, before_model) == []
    assert unchanged(guide, before_guide) == []


def test_two_vaes_in_one_process_do_not_share_parameters():
    x = data_for("bernoulli", n=20)
    pyro.set_rng_seed(0)
    a = small_vae()
    pyro.set_rng_seed(0)
    b = small_vae()  # the same initial values: only the param store could mix them up
    before_a, before_b = snapshot(a), snapshot(b)
    svi_steps(a, x)  # no pyro.clear_param_store() in between, as in a user's script
    assert len(unchanged(b, before_b)) == len(before_b), "training a moved nothing of b"
    svi_b = svi_steps(b, x, steps=2)
    assert unchanged(a, before_a) == []
    assert unchanged(b, before_b) == []
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert not torch.equal(pa, pb), name
    assert len(pyro.get_param_store()) == len(before_a) + len(before_b)
    # and training b further leaves a where it was
    after_a = snapshot(a)
    svi_b.step(x)
    assert len(unchanged(a, after_a)) == len(after_a)


def test_a_deep_copy_trains_its_own_parameters_under_svi():
    """A copy (e.g. to keep the best model) is a second model: it gets its own names in the param store."""
    x = data_for("bernoulli", n=20)
    original = small_vae()
    svi_steps(original, x, steps=1)  # the original's parameters are in the param store
    copied = copy.deepcopy(original)
    before_original, before_copy = snapshot(original), snapshot(copied)
    svi_steps(copied, x)
    assert unchanged(copied, before_copy) == []
    assert len(unchanged(original, before_original)) == len(before_original)
    assert len(pyro.get_param_store()) == 2 * len(before_copy)


@pytest.mark.parametrize("kind", ["vae", "ppca", "linear-guide"])
def test_programs_register_their_parameters_under_unique_names(kind):
    """The model registers the decoder, the guide the encoder; a second instance gets other names."""
    store = pyro.get_param_store()
    x = data_for("bernoulli")
    if kind == "vae":
        first, second = small_vae(), small_vae()
        programs = [(lambda m: m.model, lambda m: m.decoder), (lambda m: m.guide, lambda m: m.encoder)]
    elif kind == "ppca":
        first, second = PPCA(P, D), PPCA(P, D)
        programs = [(lambda m: m.model, lambda m: m)]
    else:
        first, second = LinearGaussianGuide(P, {"z": D}), LinearGaussianGuide(P, {"z": D})
        programs = [(lambda m: m, lambda m: m)]
    registered = 0
    for program, part in programs:
        poutine.trace(program(first)).get_trace(x)
        params = set(part(first).parameters())
        registered += len(params)
        assert len(store) == registered
        assert {id(p) for p in store.values()} >= {id(p) for p in params}  # the module's own tensors
    names = set(store.keys())
    for program, _ in programs:
        poutine.trace(program(second)).get_trace(x)
    assert len(store) == 2 * registered
    assert names < set(store.keys())


def test_skip_registration_keeps_the_param_store_empty():
    vae = small_vae()
    x = data_for("bernoulli")
    with skip_registration():
        poutine.trace(poutine.replay(vae.model, trace=poutine.trace(vae.guide).get_trace(x))).get_trace(x)
    assert len(pyro.get_param_store()) == 0
    poutine.trace(vae.guide).get_trace(x)  # and registration is back on afterwards
    assert len(pyro.get_param_store()) == len(list(vae.encoder.parameters()))


# ---------------------------------------------------------------- registries


@pytest.mark.parametrize("field, registry", [("prior", PRIORS), ("likelihood", LIKELIHOODS)], ids=["prior", "likelihood"])
def test_an_unknown_name_lists_the_known_ones(field, registry):
    known = ", ".join(registry.names())
    assert "normal" in known or "bernoulli" in known
    with pytest.raises(PyrovaeError, match=rf"unknown {field} 'nope'; known: {known}$"):
        build_vae(VAEConfig(P, D, HIDDEN, **{field: "nope"}))


@pytest.mark.parametrize("registry", [PRIORS, LIKELIHOODS], ids=["priors", "likelihoods"])
def test_registering_a_name_twice_is_an_error(registry):
    name = registry.names()[0]
    entry = registry[name]
    with pytest.raises(PyrovaeError, match=rf"a {registry.kind} named '{name}' is already registered"):
        registry.register(name)(lambda *args: None)
    assert registry[name] is entry  # the first entry stays


def test_registry_basics():
    things = Registry("thing")
    things.register("b")(int)
    things.register("a")(float)
    assert things.names() == ["a", "b"]
    assert "a" in things and "c" not in things
    assert things["b"] is int
    with pytest.raises(PyrovaeError, match="unknown thing 'c'; known: a, b"):
        things["c"]


def test_a_registered_prior_is_used_by_build_vae(monkeypatch):
    monkeypatch.setattr(PRIORS, "_entries", dict(PRIORS._entries))  # restored after the test

    class WideNormal(StandardNormal):
        def forward(self):
            return pyro.sample(self.site, dist.Normal(self.loc, 3.0).to_event(1))

    PRIORS.register("wide")(WideNormal)
    vae = small_vae(prior="wide")
    site = poutine.trace(vae.model).get_trace(data_for("bernoulli")).nodes["z"]
    assert torch.all(site["fn"].base_dist.scale == 3.0)


def test_mlp_rejects_an_unknown_activation():
    with pytest.raises(ValueError, match="unknown activation 'gelu'; known: relu, tanh, softplus, elu"):
        mlp([3, 4, 5], "gelu")
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        build_vae(VAEConfig(P, D, HIDDEN, activation="gelu"))


# ---------------------------------------------------------------- linear-Gaussian oracles


def ppca_and_data(P=5, D=2, n=4, seed=0):
    torch.manual_seed(seed)
    model = PPCA(P, D, noise_scale=0.6)
    return model, model.b.detach() + torch.randn(n, P) * 2


def hierarchical_and_data(P=5, D1=2, D2=3, n=4, seed=0):
    torch.manual_seed(seed)
    model = HierarchicalLinearGaussian(P, D1, D2, noise_scale=0.6, top_noise=0.7)
    return model, model.b.detach() + torch.randn(n, P) * 2


def log_joint(model, x: torch.Tensor, latents: dict[str, torch.Tensor]) -> torch.Tensor:
    """log p(x, z) per data point from the model's own trace: x (N, P) → (N,)."""
    trace = poutine.trace(poutine.condition(model.model, data=latents)).get_trace(x)
    return sum(site["fn"].log_prob(site["value"]) for site in sample_sites(trace).values())


def split_sites(u: torch.Tensor, sites: dict[str, int]) -> dict[str, torch.Tensor]:
    return dict(zip(sites, u.split(list(sites.values()), -1)))


@torch.no_grad()
def test_ppca_log_px_is_the_gaussian_marginal(float64):
    model, x = ppca_and_data()
    W, b, s = model.W, model.b, model.noise_scale
    cov = W @ W.T + s**2 * torch.eye(len(b))
    expected = torch.distributions.MultivariateNormal(b, covariance_matrix=cov).log_prob(x)
    torch.testing.assert_close(model.log_px(x), expected, rtol=1e-12, atol=1e-12)


@torch.no_grad()
def test_hierarchical_log_px_is_the_gaussian_marginal(float64):
    model, x = hierarchical_and_data()
    A, W, b = model.A, model.W, model.b
    cov_z2 = A @ A.T + model.top_noise**2 * torch.eye(A.shape[0])  # z2 = A z1 + s ε
    cov = W @ cov_z2 @ W.T + model.noise_scale**2 * torch.eye(len(b))
    expected = torch.distributions.MultivariateNormal(b, covariance_matrix=cov).log_prob(x)
    torch.testing.assert_close(model.log_px(x), expected, rtol=1e-12, atol=1e-12)


@torch.no_grad()
def test_ppca_posterior_is_bishop_12_42(float64):
    model, x = ppca_and_data()
    W, b, s2 = model.W, model.b, model.noise_scale**2
    M = W.T @ W + s2 * torch.eye(W.shape[1])
    expected_mean = torch.linalg.solve(M, W.T @ (x - b).T).T  # M⁻¹ Wᵀ (x − b), one row per point
    expected_cov = s2 * torch.linalg.inv(M)
    mean, cov = model.posterior(x)
    torch.testing.assert_close(mean, expected_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cov, expected_cov, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("make", [ppca_and_data, hierarchical_and_data], ids=["ppca", "hierarchical"])
@torch.no_grad()
def test_bayes_rule_holds_for_log_px_and_posterior(float64, make):
    """log p(x) = log p(x, u) − log p(u | x) at every u: ties log_px and posterior to the model's own trace."""
    model, x = make()
    mean, cov = model.posterior(x)
    posterior = torch.distributions.MultivariateNormal(mean, covariance_matrix=cov)
    for seed in range(3):
        u = torch.randn(mean.shape, generator=torch.Generator().manual_seed(seed)) * 1.5
        log_px = log_joint(model, x, split_sites(u, model.sites)) - posterior.log_prob(u)
        torch.testing.assert_close(log_px, model.log_px(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("make", [ppca_and_data, hierarchical_and_data], ids=["ppca", "hierarchical"])
@torch.no_grad()
def test_exact_guide_mean_is_the_posterior_mean(float64, make):
    model, x = make()
    guide = LinearGaussianGuide(x.shape[1], model.sites).set_exact_posterior(model)
    mean, cov = model.posterior(x)
    torch.testing.assert_close(x @ guide.F.T + guide.c, mean, rtol=1e-12, atol=1e-12)
    L = guide.L.tril()
    torch.testing.assert_close(L @ L.T, cov, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("make", [ppca_and_data, hierarchical_and_data], ids=["ppca", "hierarchical"])
@torch.no_grad()
def test_exact_guide_samples_have_the_posterior_mean_and_covariance(float64, make):
    model, x = make()
    guide = LinearGaussianGuide(x.shape[1], model.sites).set_exact_posterior(model)
    n = 20_000
    pyro.set_rng_seed(1)
    with pyro.plate("particles", n, dim=-2):
        trace = poutine.trace(guide).get_trace(x)
    u = torch.cat([trace.nodes[name]["value"] for name in model.sites], -1)  # (n, N, D_u), sites stacked
    mean, cov = model.posterior(x)
    assert_mean_cov_within_stderr(u, mean, cov)


@pytest.mark.parametrize("make", [ppca_and_data, hierarchical_and_data], ids=["ppca", "hierarchical"])
def test_exact_guide_gives_log_weights_equal_to_log_px(float64, make):
    """With q = p(u | x), log p(x, u) − log q(u | x) = log p(x) for every draw: zero variance."""
    model, x = make()
    guide = LinearGaussianGuide(x.shape[1], model.sites).set_exact_posterior(model)
    log_w = log_weights(model.model, guide, x, 50).log_w  # (K, N)
    with torch.no_grad():
        expected = model.log_px(x)
    torch.testing.assert_close(log_w, expected.expand_as(log_w), rtol=1e-10, atol=1e-10)


def test_diagonal_guide_samples_each_site_mean_field(float64):
    model, x = hierarchical_and_data()
    guide = LinearGaussianGuide(x.shape[1], model.sites, diagonal=True).set_exact_posterior(model)
    trace = poutine.trace(guide).get_trace(x)
    L = guide.L.detach().tril()
    start = 0
    for name, d in model.sites.items():
        fn = trace.nodes[name]["fn"]
        assert fn.event_shape == (d,) and fn.batch_shape == (x.shape[0],)
        torch.testing.assert_close(fn.base_dist.scale, L.diagonal()[start : start + d].abs().expand(x.shape[0], d))
        start += d
