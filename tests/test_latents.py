"""Tests of the latent diagnostics: active units, KL per dimension, encodings, traversals, ``pyrovae latents``."""

import json
import math
import re

import pytest
import torch
from PIL import Image

from pyrovae import estimators, latents
from pyrovae.cli.main import main
from pyrovae.errors import PyrovaeError
from pyrovae.evidence import log_weights
from pyrovae.guides import LinearGaussianGuide
from pyrovae.models import PPCA, HierarchicalLinearGaussian, VAEConfig, build_vae

P = 7


# ---------------------------------------------------------------- helpers


def random_guide(model, diagonal: bool, seed: int = 0) -> LinearGaussianGuide:
    """A linear-Gaussian guide with random F, c and covariance: not the posterior."""
    torch.manual_seed(seed)
    D = sum(model.sites.values())
    guide = LinearGaussianGuide(P, model.sites, diagonal=diagonal)
    L = torch.randn(D, D).tril() * 0.3 + torch.eye(D) * 0.8
    return guide.set_posterior(torch.randn(D, P) * 0.5, torch.randn(D), L @ L.T)


def data(n: int = 50, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, P, generator=torch.Generator().manual_seed(seed)).to(torch.get_default_dtype())


def png_ok(path) -> tuple[int, int]:
    with Image.open(path) as image:
        image.load()
        return image.size


# ---------------------------------------------------------------- active units


def test_active_units_on_means_of_known_variance(float64):
    """Columns ±s around an offset: the unbiased variance over N points is s² N / (N − 1) exactly."""
    N = 1000
    sds = torch.tensor([1.0, 0.2, 0.05, 0.0, 0.11, 0.0999])  # variances 1, 0.04, 0.0025, 0, 0.0121, 0.00998
    signs = torch.tensor([1.0, -1.0]).repeat(N // 2)[:, None]  # (N, 1), mean 0
    means = signs * sds + torch.arange(6.0)  # offsets do not count
    activity, active = latents.active_units(means)
    torch.testing.assert_close(activity, sds**2 * N / (N - 1), rtol=1e-12, atol=1e-15)
    assert active.tolist() == [True, True, False, False, True, False]
    assert latents.active_units(means, threshold=0.05)[1].tolist() == [True, False, False, False, False, False]


@pytest.mark.parametrize("means, match", [(torch.zeros(5), "shape"), (torch.zeros(1, 3), "at least 2 points")],
                         ids=["one-dimensional", "one-point"])
def test_active_units_refuses_what_has_no_variance(means, match):
    with pytest.raises(PyrovaeError, match=match):
        latents.active_units(means)


def test_latent_means_of_a_linear_guide_are_its_means_flattened_per_site(float64):
    """For the linear guide E_q[u | x] = F x + c; site z2's mean given z1 at its mean is its own block."""
    model = HierarchicalLinearGaussian(P, 2, 3)
    guide = random_guide(model, diagonal=False)
    x = data()
    means = latents.latent_means(guide.forward, x, batch_size=7)
    expected = (x @ guide.F.T + guide.c).detach()
    assert list(means) == ["z1", "z2"]
    torch.testing.assert_close(means["z1"], expected[:, :2])
    torch.testing.assert_close(means["z2"], expected[:, 2:])


# ---------------------------------------------------------------- KL per dimension


def analytic_kl_mean(model, guide, x, site: str, particles: int = 1) -> float:
    terms = log_weights(model, guide, x, particles)
    return estimators.kl(terms)[site].analytic.value.mean().item()


def test_kl_per_dimension_of_a_diagonal_guide_is_the_closed_form(float64):
    """KL(N(μ_u, σ_u²) ‖ N(0, 1)) = −log σ_u + (σ_u² + μ_u²)/2 − 1/2, averaged over points; summed over
    u it is the site's analytic KL of pyrovae.estimators."""
    model = PPCA(P, 4)
    guide = random_guide(model, diagonal=True)
    x = data()
    kl = latents.kl_per_dimension(model.model, guide.forward, x, num_particles=3, batch_size=16)
    mu, sigma = (x @ guide.F.T + guide.c).detach(), guide.L.diagonal().abs().detach()
    expected = (-sigma.log() + (sigma**2 + mu**2) / 2 - 0.5).mean(0)
    torch.testing.assert_close(kl["z"], expected, rtol=1e-12, atol=1e-12)
    assert kl["z"].sum().item() == pytest.approx(analytic_kl_mean(model.model, guide.forward, x, "z"), rel=1e-12)


def test_kl_per_dimension_of_the_vae_sums_to_its_analytic_kl(float64):
    vae = build_vae(VAEConfig(P, 5, (16,)))
    x = (data() > 0).double()
    kl = latents.kl_per_dimension(vae.model, vae.guide, x)
    assert kl["z"].shape == (5,) and (kl["z"] >= 0).all()
    assert kl["z"].sum().item() == pytest.approx(analytic_kl_mean(vae.model, vae.guide, x, "z"), rel=1e-10)


def test_kl_per_dimension_of_a_site_with_a_latent_parent_averages_over_its_draws(float64):
    """z1 has no latent parent: exact. z2's prior N(A z1, s² I) depends on the draw of z1, so both
    ways average the closed form over draws: they agree within their Monte Carlo errors."""
    model = HierarchicalLinearGaussian(P, 2, 3)
    guide = random_guide(model, diagonal=True)
    x = data(30)
    torch.manual_seed(0)
    kl = latents.kl_per_dimension(model.model, guide.forward, x, num_particles=4000)
    assert kl["z1"].sum().item() == pytest.approx(analytic_kl_mean(model.model, guide.forward, x, "z1"), rel=1e-12)
    terms = log_weights(model.model, guide.forward, x, 4000)
    reference = estimators.kl(terms)["z2"].analytic
    se = math.sqrt((reference.stderr**2).sum().item()) / len(x)
    z = (kl["z2"].sum().item() - reference.value.mean().item()) / (se * math.sqrt(2))
    assert abs(z) < 4, z


def test_kl_per_dimension_is_not_available_where_q_does_not_factorize(float64):
    model = PPCA(P, 3)
    guide = random_guide(model, diagonal=False)  # a full covariance: MultivariateNormal
    assert latents.kl_per_dimension(model.model, guide.forward, data()) == {"z": None}
    mixture = build_vae(VAEConfig(P, 3, (16,), prior="mixture"))
    assert latents.kl_per_dimension(mixture.model, mixture.guide, (data() > 0).double()) == {"z": None}


# ---------------------------------------------------------------- principal components and traversals


def test_principal_components_recover_the_axes_of_largest_variance(float64):
    torch.manual_seed(0)
    rotation, _ = torch.linalg.qr(torch.randn(4, 4))
    scores = torch.randn(2000, 4) * torch.tensor([3.0, 1.0, 0.3, 0.1])
    z = scores @ rotation.T + 5.0
    projected, share = latents.principal_components(z)
    assert projected.shape == (2000, 2)
    for k in range(2):
        assert abs(torch.corrcoef(torch.stack([projected[:, k], scores[:, k]]))[0, 1]) > 0.999
    variances = scores.var(0)
    torch.testing.assert_close(share, variances[:2] / variances.sum(), rtol=0.02, atol=0)


def test_traversal_of_ppca_decodes_the_line_along_each_axis(float64):
    model = PPCA(P, 3)
    values = torch.linspace(-3, 3, 5)
    rows = latents.traverse(model.model, data(1), [("z", 2), ("z", 0)], values)
    assert rows.shape == (2, 5, P)
    W, b = model.W.detach(), model.b.detach()
    torch.testing.assert_close(rows[0], b + values[:, None] * W[:, 2])
    torch.testing.assert_close(rows[1], b + values[:, None] * W[:, 0])


def test_traversal_of_a_top_site_sets_the_lower_one_to_its_prior_mean(float64):
    """z1 = v e_u, z2 at its prior mean A z1: x̄ = W A z1 + b. Traversing z2: z1 = 0, z2 = v e_u."""
    model = HierarchicalLinearGaussian(P, 2, 3)
    values = torch.linspace(-3, 3, 4)
    W, A, b = model.W.detach(), model.A.detach(), model.b.detach()
    top, bottom = latents.traverse(model.model, data(1), [("z1", 1), ("z2", 2)], values)
    torch.testing.assert_close(top, b + values[:, None] * (W @ A)[:, 1])
    torch.testing.assert_close(bottom, b + values[:, None] * W[:, 2])
    with pytest.raises(PyrovaeError, match="no latent site 'w'"):
        latents.traverse(model.model, data(1), [("w", 0)], values)


@pytest.mark.parametrize("D, labels, image", [(1, None, False), (2, True, True), (5, True, False), (5, None, True)],
                         ids=["D=1", "D=2-labels-images", "D=5-labels", "D=5-images"])
def test_pictures_are_written_for_any_dimension(tmp_path, D, labels, image):
    torch.manual_seed(0)
    means = torch.randn(60, D)
    traversal = torch.rand(min(D, 3), 7, 16) if image else None
    latents.save_latents_plot(means, torch.arange(60) % 10 if labels else None, tmp_path / "latents.png", traversal,
                              (1, 4, 4) if image else None, [f"z[{u}]" for u in range(min(D, 3))],
                              torch.linspace(-3, 3, 7), latents.dimension_names({"z": D}))
    kl = torch.rand(D)
    kl[0] = math.nan
    latents.save_activity_plot(means.var(0), kl, latents.dimension_names({"z": D}), tmp_path / "kl.png")
    latents.save_activity_plot(means.var(0), None, latents.dimension_names({"z": D}), tmp_path / "none.png")
    for name in ("latents.png", "kl.png", "none.png"):
        assert min(png_ok(tmp_path / name)) > 100


# ---------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("latents") / "run"
    assert main(["train", "--out", str(run), "--epochs", "1", "--hidden", "16", "--latent-dim", "3", "--no-progress"]) == 0
    return run


def test_latents_command_writes_pictures_and_counts_active_units(run, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main(["latents", str(run), "--limit", "100", "--threshold", "1e-6", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    activity = torch.tensor(report["sites"]["z"]["activity"])
    assert report["latent_dim"] == 3 and report["num_points"] == 100
    assert report["active_units"] == int((activity > 1e-6).sum()) > 0
    assert re.search(rf"^active units: {report['active_units']} of 3 ", printed, re.M)
    assert len(report["sites"]["z"]["kl_per_dimension"]) == 3
    assert re.search(r"^  z: \d of 3 active; KL \d+\.\d{3} nats in all$", printed, re.M)
    for name in ("latents.png", "latents_kl.png"):
        assert min(png_ok(run / name)) > 100
    wide = png_ok(run / "latents.png")[0]

    # none active: no traversal, a narrower picture; another --out puts both pictures beside it
    assert main(["latents", str(run), "--limit", "100", "--threshold", "1e6", "--out", str(tmp_path / "mine.png")]) == 0
    assert "active units: 0 of 3" in capsys.readouterr().out
    assert png_ok(tmp_path / "mine.png")[0] < wide and min(png_ok(tmp_path / "mine_kl.png")) > 100


@pytest.mark.parametrize("args, pattern", [
    (["--limit", "1"], "--limit must be at least 2"),
    (["--split", "everything"], "unknown split"),
    (["--out", "{tmp}/no/such/folder/x.png"], "--out .* does not exist"),
], ids=["limit", "split", "out-folder"])
def test_latents_command_refuses_bad_options_in_one_line(run, tmp_path, capsys, args, pattern):
    assert main(["latents", str(run), *(a.format(tmp=tmp_path) for a in args)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pyrovae latents: error: ") and re.search(pattern, err[0]), err
