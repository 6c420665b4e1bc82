"""Tests of pyrovae.generate (prior samples, reconstructions, interpolations) and pyrovae.plots.save_grid."""

import math

import numpy as np
import pyro
import pyro.distributions as dist
from pyro import poutine
import pytest
import torch
from PIL import Image

from pyrovae.generate import interpolate, reconstruct, sample_prior
from pyrovae.guides import LinearGaussianGuide
from pyrovae.models import PPCA, HierarchicalLinearGaussian, VAEConfig, build_vae
from pyrovae.plots import save_grid, save_loss_curve

N, P, D = 6, 12, 4
LIKELIHOODS = {  # name → the mean of the observed site given the decoder's logits
    "bernoulli": torch.sigmoid,
    "continuous-bernoulli": lambda logits: dist.ContinuousBernoulli(logits=logits).mean,
}


# ---------------------------------------------------------------- helpers


def data(n: int = N, p: int = P, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((n, p), 0.4), generator=generator)


def small_vae(likelihood: str = "bernoulli"):
    return build_vae(VAEConfig(P, D, (32,), likelihood=likelihood))


def hierarchical_with_guide(P=7, D1=2, D2=3):
    """A hierarchical linear-Gaussian model and a guide with random F, c and a full covariance."""
    torch.manual_seed(0)
    model = HierarchicalLinearGaussian(P, D1, D2)
    guide = LinearGaussianGuide(P, model.sites)
    L = torch.randn(D1 + D2, D1 + D2).tril() * 0.5 + torch.eye(D1 + D2)
    guide.set_posterior(torch.randn(D1 + D2, P), torch.randn(D1 + D2), L @ L.T)
    return model, guide


def guide_means(guide, x):
    """E_q[u] = F x + c over the stacked latents, from the guide's parameters: (N, D_u)."""
    return (x @ guide.F.T + guide.c).detach()


def png_size(path) -> tuple[int, int]:
    with Image.open(path) as image:
        image.load()
        return image.size


# ---------------------------------------------------------------- the VAE


@pytest.mark.parametrize("likelihood", list(LIKELIHOODS))
def test_sample_prior_gives_means_in_the_unit_interval(likelihood):
    vae = small_vae(likelihood)
    like = data()
    samples = sample_prior(vae.model, like, 50)
    assert samples.shape == (50, P)
    assert samples.dtype == like.dtype
    assert not samples.requires_grad
    assert ((samples >= 0) & (samples <= 1)).all()
    assert not torch.equal(samples[0], samples[1])  # each row its own z


def test_sample_prior_decodes_prior_draws():
    vae = small_vae()
    traces = []

    def recorded_model(x):  # the VAE's model, keeping the trace of what it drew
        traces.append(poutine.trace(vae.model).get_trace(x))

    samples = sample_prior(recorded_model, data(), 20)
    (trace,) = traces
    z = trace.nodes["z"]["value"]
    assert z.shape == (20, D)
    with torch.no_grad():
        torch.testing.assert_close(samples, torch.sigmoid(vae.decoder(z)))


@pytest.mark.parametrize("likelihood", list(LIKELIHOODS))
def test_reconstruct_decodes_the_encoder_mean(likelihood):
    vae = small_vae(likelihood)
    x = data()
    recon = reconstruct(vae.model, vae.guide, x)
    assert recon.shape == x.shape
    assert ((recon >= 0) & (recon <= 1)).all()
    with torch.no_grad():
        loc, _ = vae.encoder.loc_scale(x)
        expected = LIKELIHOODS[likelihood](vae.decoder(loc))
    torch.testing.assert_close(recon, expected)


def test_reconstruct_is_deterministic():
    vae = small_vae()
    x = data()
    first = reconstruct(vae.model, vae.guide, x)
    pyro.set_rng_seed(99)
    assert torch.equal(reconstruct(vae.model, vae.guide, x), first)


@pytest.mark.parametrize("likelihood", list(LIKELIHOODS))
def test_interpolate_runs_between_the_reconstructions_of_its_ends(likelihood):
    vae = small_vae(likelihood)
    x = data()
    steps = 7
    line = interpolate(vae.model, vae.guide, x[0], x[1], steps)
    assert line.shape == (steps, P)
    assert ((line >= 0) & (line <= 1)).all()
    ends = reconstruct(vae.model, vae.guide, x[:2])
    torch.testing.assert_close(line[0], ends[0])
    torch.testing.assert_close(line[-1], ends[1])
    with torch.no_grad():  # the middle decodes the midpoint of the two posterior means
        loc, _ = vae.encoder.loc_scale(x[:2])
        torch.testing.assert_close(line[steps // 2], LIKELIHOODS[likelihood](vae.decoder(loc.mean(0))))


# ---------------------------------------------------------------- linear-Gaussian models, two latent sites


def test_reconstruct_of_the_hierarchical_model_is_w_times_the_guide_mean_of_z2(float64):
    model, guide = hierarchical_with_guide()
    x = torch.randn(N, 7)
    D1 = model.sites["z1"]
    z2_mean = guide_means(guide, x)[:, D1:]  # E_q[z2]: the z2 block of F x + c
    expected = z2_mean @ model.W.detach().T + model.b.detach()
    torch.testing.assert_close(reconstruct(model.model, guide, x), expected)


def test_interpolate_of_the_hierarchical_model_is_linear_between_its_ends(float64):
    model, guide = hierarchical_with_guide()
    x = torch.randn(2, 7)
    steps = 5
    line = interpolate(model.model, guide, x[0], x[1], steps)
    ends = reconstruct(model.model, guide, x)
    t = torch.linspace(0, 1, steps)[:, None]
    torch.testing.assert_close(line, (1 - t) * ends[0] + t * ends[1])  # a linear decoder keeps lines straight


def moments_problems(samples: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor, z_max: float = 5.0) -> list[str]:
    """Which of the sample mean and covariance of Gaussian draws (n, P) disagree with ``mean`` (P,) and
    ``cov`` (P, P) by more than ``z_max`` standard errors, entry by entry; [] when both agree.

    Standard errors: sqrt(cov_jj / n) for a mean component; sqrt((cov_jk² + cov_jj cov_kk) / n)
    for a covariance entry taken about the true mean (Gaussian fourth moments).
    """
    n = samples.shape[0]
    problems = []
    z_mean = (samples.mean(0) - mean) / (cov.diagonal() / n).sqrt()
    if z_mean.abs().max() >= z_max:
        problems.append(f"mean: max |z| {z_mean.abs().max():.1f}")
    centred = samples - mean
    sample_cov = centred.T @ centred / n  # (P, P)
    stderr = ((cov**2 + cov.diagonal()[:, None] * cov.diagonal()[None, :]) / n).sqrt()
    z_cov = (sample_cov - cov) / stderr
    if z_cov.abs().max() >= z_max:
        problems.append(f"covariance: max |z| {z_cov.abs().max():.1f}")
    return problems


def decoding_zero(model):
    """A broken hierarchical model: it draws z1 and z2 from the prior but decodes z2 = 0."""
    def program(x):
        with pyro.plate("data", x.shape[0]):
            z1 = pyro.sample("z1", dist.Normal(x.new_zeros(model.sites["z1"]), 1.0).to_event(1))
            z2 = pyro.sample("z2", dist.Normal(z1 @ model.A.T, model.top_noise).to_event(1))
            pyro.sample("x", dist.Normal(0 * z2 @ model.W.T + model.b, model.noise_scale).to_event(1), obs=x)

    return program


def ignoring_the_top_layer(model):
    """A broken hierarchical model: z2 ~ N(0, s² I), its dependence on z1 dropped."""
    def program(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z1", dist.Normal(x.new_zeros(model.sites["z1"]), 1.0).to_event(1))
            z2 = pyro.sample("z2", dist.Normal(x.new_zeros(model.sites["z2"]), model.top_noise).to_event(1))
            pyro.sample("x", dist.Normal(z2 @ model.W.T + model.b, model.noise_scale).to_event(1), obs=x)

    return program


@pytest.mark.parametrize("variant", ["correct", "decoding-z=0", "ignoring-the-top-layer"])
def test_sample_prior_of_the_hierarchical_model_has_the_marginal_moments(float64, variant):
    """E[x | z2] = W z2 + b with z2 ~ N(0, A Aᵀ + s² I): mean b, covariance W (A Aᵀ + s² I) Wᵀ.

    The mean is b whatever the latent draws are; only the covariance tells a model that decodes
    z = 0, or draws z2 without z1, from the right one.
    """
    model, _ = hierarchical_with_guide()
    program = {"correct": model.model, "decoding-z=0": decoding_zero(model),
               "ignoring-the-top-layer": ignoring_the_top_layer(model)}[variant]
    n = 4000
    samples = sample_prior(program, torch.zeros(1, 7), n)
    assert samples.shape == (n, 7)
    with torch.no_grad():
        W, A, b = model.W, model.A, model.b
        cov = W @ (A @ A.T + model.top_noise**2 * torch.eye(A.shape[0])) @ W.T  # Cov(W z2)
        problems = moments_problems(samples, b, cov)
    if variant == "correct":
        assert problems == []
    else:
        assert len(problems) == 1 and problems[0].startswith("covariance"), problems  # the mean alone passes


def test_ppca_reconstruct_with_the_exact_posterior(float64):
    torch.manual_seed(0)
    model = PPCA(7, 2)
    guide = LinearGaussianGuide(7, model.sites).set_exact_posterior(model)
    x = torch.randn(N, 7)
    with torch.no_grad():
        mean, _ = model.posterior(x)
        expected = mean @ model.W.T + model.b
    torch.testing.assert_close(reconstruct(model.model, guide, x), expected)


# ---------------------------------------------------------------- pictures


@pytest.mark.parametrize(
    "n, image_shape, nrow, size",
    [
        pytest.param(10, (1, 8, 8), 8, (8 * 9 + 1, 2 * 9 + 1), id="8x8-two-rows"),
        pytest.param(64, (1, 8, 8), 8, (73, 73), id="8x8-full"),
        pytest.param(6, (3, 4, 4), 3, (3 * 5 + 1, 2 * 5 + 1), id="rgb-4x4"),
        pytest.param(5, None, 8, (5 * 13 + 1, 1 * 2 + 1), id="vectors"),
        pytest.param(20, None, 8, (8 * 13 + 1, 3 * 2 + 1), id="vectors-three-rows"),
    ],
)
def test_save_grid_writes_a_png_of_the_grid_size(tmp_path, n, image_shape, nrow, size):
    P_ = math.prod(image_shape) if image_shape else 12
    images = torch.rand(n, P_, requires_grad=True, dtype=torch.float64)  # detached, cast, moved by save_grid
    path = tmp_path / "grid.png"
    save_grid(images, image_shape, path, nrow=nrow)
    assert png_size(path) == size


def test_save_grid_puts_the_pixels_where_they_belong(tmp_path):
    images = torch.zeros(2, 64)
    images[1] = 1.0
    path = tmp_path / "grid.png"
    save_grid(images, (1, 8, 8), path)
    with Image.open(path) as image:
        pixels = torch.from_numpy(np.array(image.convert("L")))  # (height, width)
    assert pixels.shape == (10, 19)  # 1 + 8 + 1 high, 1 + 2 * 9 wide
    assert (pixels[1:9, 1:9] == 0).all()
    assert (pixels[1:9, 10:18] == 255).all()
    assert (pixels[0] == 128).all()  # the padding is grey (pad_value 0.5)


def test_save_loss_curve_writes_a_png(tmp_path):
    history = [{"epoch": 0, "train_elbo": None, "test_elbo": -40.0}, {"epoch": 1, "train_elbo": -38.0, "test_elbo": -37.0}]
    save_loss_curve(history, tmp_path / "loss.png")
    assert png_size(tmp_path / "loss.png") == (500, 350)
