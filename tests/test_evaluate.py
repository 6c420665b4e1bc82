"""Evaluation of a trained VAE, the evaluate command, and its errors."""

import contextlib
import io
import json
import math
import re
from argparse import Namespace

import arviz
import pytest
import torch

from pyrovae import estimators, gaps, kl
from pyrovae.cli.common import open_run
from pyrovae.cli.common import in_flags
from pyrovae.cli.main import main
from pyrovae.data import Batches, load_dataset, static_binarized
from pyrovae.errors import PyrovaeError
from pyrovae.estimators import Estimate
from pyrovae.evaluate import evaluate, to_inference_data
from pyrovae.models import VAEConfig, build_vae
from pyrovae.train import TrainConfig, fit


@pytest.fixture(scope="module")
def trained_digits_vae():
    torch.manual_seed(0)
    data = load_dataset("digits")
    vae = build_vae(VAEConfig(data.dim, latent_dim=8, hidden=(64,)))
    fit(vae, Batches(data.train, 64, "dynamic", seed=0), TrainConfig(epochs=20, batch_size=64), progress=False)
    return vae, static_binarized(data.test, 1)[:40]


K, IWAE_KS = 1000, (1, 4, 16)  # rises L_1 → L_4 → L_16 → L_K of ≈ 45, 13 and 5 combined standard errors here


def mean_and_stderr(estimate) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean over the points of a per-point estimate and its Monte Carlo standard error."""
    n = estimate.value.numel()
    return estimate.value.mean(), (estimate.stderr**2).sum().sqrt() / n


def evaluation_problems(result) -> list[str]:
    """The properties of a trained VAE's evaluation that fail, by name; [] when all hold.

    - log p(x) ≥ ELBO: at every point within 3 Monte Carlo standard errors, and on average by
      more than 3 standard errors of the mean gap;
    - the IWAE bounds rise with k: each rise of the mean, L_k → L_k' (L_K is the importance-sampled
      log p(x), whose standard error is the delta method's), exceeds 3 combined standard errors;
    - the analytic KL agrees with its Monte Carlo estimate: the mean of the per-point z-scores lies
      within 3 of its own standard errors of 0, and the z-scores spread as z-scores do (sd < 1.5).
    """
    problems = []
    z = (result.log_px.value - result.elbo.value) / (result.log_px.stderr**2 + result.elbo.stderr**2).sqrt()
    gap, gap_stderr = mean_and_stderr(result.gap)
    if not (z > -3).all() or gap <= 3 * gap_stderr:
        problems.append("log p(x) below the ELBO")
    ks = sorted(result.iwae)
    bounds = [result.log_px if k == result.num_samples else result.iwae[k] for k in ks]  # L_K has one group
    for (k, lo), (k_next, hi) in zip(zip(ks, bounds), zip(ks[1:], bounds[1:])):
        (lo_mean, lo_stderr), (hi_mean, hi_stderr) = mean_and_stderr(lo), mean_and_stderr(hi)
        if hi_mean - lo_mean <= 3 * (lo_stderr**2 + hi_stderr**2).sqrt():
            problems.append(f"L_{k_next} does not rise above L_{k}")
    kl_z = result.kl["z"].z_score
    if kl_z.mean().abs() >= 3 * kl_z.std() / len(kl_z) ** 0.5 or kl_z.std() >= 1.5:
        problems.append("analytic KL disagrees with Monte Carlo")
    return problems


def harmonic_mean(log_px):
    """A broken log p(x): the harmonic mean of the weights, which lies below their geometric mean (the ELBO)."""
    def broken(log_w):
        return Estimate(math.log(log_w.shape[0]) - torch.logsumexp(-log_w, 0), log_px(log_w).stderr)

    return broken


BROKEN = {  # name → (module, attribute, replacement given the original, the problem it must raise)
    "iwae-ignores-k": (estimators, "iwae_bound", lambda iwae_bound: lambda log_w, k: iwae_bound(log_w, 1), "does not rise"),
    "harmonic-mean-log-px": (estimators, "log_px", harmonic_mean, "below the ELBO"),
    "reversed-kl": (kl, "closed_form", lambda closed_form: lambda q, p: closed_form(p, q), "analytic KL"),
}


@pytest.mark.parametrize("variant", ["correct", *BROKEN])
def test_trained_vae_importance_sampling_beats_elbo_and_iwae_rises(trained_digits_vae, monkeypatch, variant):
    """The correct estimators pass every check; each deliberately broken one fails the check it breaks."""
    vae, x = trained_digits_vae
    if variant != "correct":
        module, name, replace, _ = BROKEN[variant]
        monkeypatch.setattr(module, name, replace(getattr(module, name)))
    torch.manual_seed(1)
    result = evaluate(vae.model, vae.guide, x, num_samples=K, iwae_ks=IWAE_KS, batch_size=8)
    problems = evaluation_problems(result)
    if variant != "correct":
        assert any(BROKEN[variant][3] in p for p in problems), problems
        return
    assert problems == []
    summary = result.summary()
    assert summary["num_points"] == 40 and summary["num_samples"] == K
    assert summary["kl"]["z"]["method"] == "analytic"
    assert summary["kl"]["z"]["z_score_mean"] == pytest.approx(result.kl["z"].z_score.mean().item())
    assert set(summary["iwae"]) == {"1", "4", "16", str(K)}


def test_evaluate_batching_does_not_change_the_estimates(trained_digits_vae):
    """Points are independent: one batch of 8 and 8 batches of 1 estimate the same numbers."""
    vae, x = trained_digits_vae
    a = evaluate(vae.model, vae.guide, x[:8], num_samples=2000, batch_size=8)
    b = evaluate(vae.model, vae.guide, x[:8], num_samples=2000, batch_size=1, chunk_size=300)
    z = (a.log_px.value - b.log_px.value) / (a.log_px.stderr**2 + b.log_px.stderr**2).sqrt()
    assert z.abs().max() < 3.5


def test_seeded_chunks_of_importance_samples_are_the_same_whatever_the_pass_shape(trained_digits_vae):
    """Under a seed, the log-weights of chunk c depend on the seed, the row and c only."""
    vae, x = trained_digits_vae
    a = evaluate(vae.model, vae.guide, x[:6], num_samples=60, chunk_size=20, batch_size=3, seed=4, keep_log_weights=True)
    b = evaluate(vae.model, vae.guide, x[3:6], num_samples=60, chunk_size=20, batch_size=3, seed=4, first_row=3, keep_log_weights=True)
    assert torch.equal(a.log_w[:, 3:], b.log_w)
    c = evaluate(vae.model, vae.guide, x[:6], num_samples=60, chunk_size=30, batch_size=3, seed=4, keep_log_weights=True)
    assert torch.equal(a.elbo.value, c.elbo.value) and not torch.equal(a.log_w, c.log_w)


def test_inference_data_export(trained_digits_vae, tmp_path):
    vae, x = trained_digits_vae
    result = evaluate(vae.model, vae.guide, x[:5], num_samples=100, keep_log_weights=True)
    idata = to_inference_data(result)
    idata.to_netcdf(str(tmp_path / "e.nc"))
    back = arviz.from_netcdf(str(tmp_path / "e.nc"))
    assert back.log_likelihood["log_w"].shape == (1, 100, 5)
    assert back.observed_data["khat"].shape == (5,)


@pytest.mark.parametrize("kwargs, message", [
    ({"num_samples": 0}, "`num_samples` must be at least 1"),
    ({"particles_elbo": 0}, "`particles_elbo` must be at least 1"),
    ({"batch_size": 0}, "`batch_size` must be at least 1"),
    ({"chunk_size": 0}, "`chunk_size` must be at least 1"),
    ({"particle_shard": (0, 2)}, "needs a `seed`"),
], ids=["k=0", "elbo-particles=0", "batch=0", "chunk=0", "sharded-unseeded"])
def test_evaluate_rejects_bad_arguments(trained_digits_vae, kwargs, message):
    vae, x = trained_digits_vae
    with pytest.raises(ValueError, match=message):
        evaluate(vae.model, vae.guide, x, **kwargs)


@pytest.mark.parametrize("kwargs, option", [
    ({"num_samples": 0}, "-k must be at least 1"),
    ({"particles_elbo": 0}, "--particles-elbo must be at least 1"),
    ({"batch_size": 0}, "--batch-size must be at least 1"),
    ({"chunk_size": 0}, "--chunk-size must be at least 1"),
], ids=["k", "particles-elbo", "batch", "chunk"])
def test_evaluate_errors_name_parameters_that_the_command_line_maps_to_its_options(trained_digits_vae, kwargs, option):
    """The engine names its parameter (`particles_elbo`), never an option; the command line's words come from in_flags."""
    vae, x = trained_digits_vae
    with pytest.raises(PyrovaeError) as e:
        evaluate(vae.model, vae.guide, x, **kwargs)
    assert "--" not in str(e.value) and in_flags(str(e.value)).startswith(option)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs") / "digits"
    assert main(["train", "--epochs", "2", "--hidden", "32", "--latent-dim", "4", "--out", str(folder), "--no-progress"]) == 0
    return folder


def test_evaluate_command_prints_table_and_writes_json_and_netcdf(run_dir, tmp_path, capsys):
    out, nc = tmp_path / "e.json", tmp_path / "e.nc"
    code = main(["evaluate", str(run_dir), "-k", "200", "--limit", "10", "--no-compile", "--json", str(out), "--netcdf", str(nc), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    for line in ("ELBO", "KL(q‖p) at z, analytic", "IWAE bound L_50", "log p(x), importance sampled (K=200)", "PSIS k̂"):
        assert line in printed
    report = json.loads(out.read_text())
    assert report["summary"]["num_points"] == 10 and len(report["per_point"]["log_px"]) == 10
    assert set(report["summary"]["iwae"]) == {"1", "5", "50", "200"}
    assert arviz.from_netcdf(str(nc)).log_likelihood["log_w"].shape == (1, 200, 10)


@pytest.mark.parametrize("args, message", [
    (["--split", "validation"], "unknown split 'validation'"),
    (["-k", "0"], "must be at least 1"),
    (["--limit", "0"], "--limit must be at least 1"),
    (["--gaps", "--gap-lr", "0"], "--gap-lr must be positive, got 0.0"),
    (["--gaps", "--gap-steps", "0"], "--gap-steps must be at least 1, got 0"),
], ids=["split", "k", "limit", "gap-lr", "gap-steps"])
def test_evaluate_command_bad_options(run_dir, capsys, args, message):
    assert main(["evaluate", str(run_dir), "--no-progress", "--no-compile", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_evaluate_command_needs_a_checkpoint(run_dir, tmp_path, capsys):
    folder = tmp_path / "no-checkpoint"
    folder.mkdir()
    (folder / "config.json").write_text((run_dir / "config.json").read_text())
    assert main(["evaluate", str(folder), "--no-progress"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "missing"), "--no-progress"]) == 2
    assert "not a run folder" in capsys.readouterr().err


# ---------------------------------------------------------------- evaluate --gaps

GAP_OPTIONS = ["-k", "200", "--limit", "24", "--particles-elbo", "50", "--gap-steps", "150", "--gap-samples", "200",
               "--gap-batch-size", "10", "--no-compile", "--no-progress"]
GAP_SETTINGS = gaps.GapSettings(steps=150, num_samples=200, particles_elbo=50, batch_size=10)
TABLE_ROW = r"^  {} gap .*?\s(-?\d+\.\d{{3}})\s+(\d+\.\d{{3}})$"  # a gap's row of the table: mean, s.e.


@pytest.fixture(scope="module")
def gaps_command(run_dir, tmp_path_factory):
    """``pyrovae evaluate --gaps --ais`` on 24 digits (printed output, JSON) and the same evaluation from Python."""
    folder = tmp_path_factory.mktemp("gaps")
    out, png = folder / "e.json", folder / "gaps.png"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["evaluate", str(run_dir), *GAP_OPTIONS, "--gaps", "--json", str(out), "--gaps-plot", str(png),
                     "--ais", "--ais-steps", "10", "--ais-chains", "2", "--ais-leapfrog", "2"]) == 0
    run, module, _ = open_run(Namespace(run_dir=run_dir, device="cpu", seed=0, checkpoint="last"))
    x = run.eval_split(run.dataset(), "test")[:24]
    python = {seed: evaluate(module.model, module.guide, x, 200, particles_elbo=50, seed=seed, gaps=GAP_SETTINGS)
              for seed in (0, 1)}
    return printed.getvalue(), json.loads(out.read_text()), png, python


def gaps_problems(printed: str, report: dict, python) -> list[str]:
    """What ``evaluate --gaps`` must show, against its own per-point values and the Python evaluation."""
    s = report["summary"]
    p = {name: torch.tensor(values, dtype=torch.float64) for name, values in report["per_point"].items()}
    approximation, amortization = p["approximation_gap"], p["amortization_gap"]
    problems = []
    if not torch.allclose(approximation + amortization, p["gap_log_px"] - p["gap_elbo"], rtol=0, atol=1e-9):
        problems.append("the gaps do not add up to log p(x) − ELBO[q] per point")
    for name, values in (("approximation", approximation), ("amortization", amortization)):
        mean, se = s["gaps"][name]
        if mean != pytest.approx(values.mean().item(), abs=1e-12) or se != pytest.approx(values.std().item() / math.sqrt(24)):
            problems.append(f"the summary's {name} gap is not the mean of the per-point ones")
        row = re.search(TABLE_ROW.format(name), printed, re.M)
        if row is None or (float(row[1]), float(row[2])) != pytest.approx((mean, se), abs=5e-4):
            problems.append(f"the table's {name} gap is not the summary's")
    for name, attribute in (("approximation_gap", "approximation"), ("amortization_gap", "amortization")):
        if not torch.allclose(p[name], getattr(python.gaps, attribute).value, rtol=1e-10, atol=1e-12):
            problems.append(f"the command's {name} differs from evaluate(..., gaps=...)")
    information = s["surgery"]["sites"]["z"]["mutual_information"]
    if not torch.allclose(p["mutual_information_z"], python.surgery.sites["z"].mutual_information.value,
                          rtol=1e-10, atol=1e-12):
        problems.append("the command's mutual information differs from evaluate(..., gaps=...)")
    ais = p["ais_log_px"] - p["elbo_optimal"]
    if not torch.allclose(p["approximation_gap_ais"], ais, rtol=0, atol=1e-9) \
            or s["gaps"]["approximation_ais"][0] != pytest.approx(ais.mean().item(), abs=1e-12):
        problems.append("the approximation gap with AIS is not log p_AIS(x) − ELBO[q*]")
    beside = re.search(r"^active units: (\d+) of 4 latent dimensions .*I_q\(x; z\) = (\d+\.\d\d) ± (\d+\.\d\d) nats", printed, re.M)
    if beside is None or (float(beside[2]), float(beside[3])) != pytest.approx(tuple(information), abs=5e-3) \
            or int(beside[1]) != report["summary"]["active_units"]:
        problems.append("the mutual information beside the active units is not the summary's")
    return problems


@pytest.mark.slow  # the fixture evaluates 24 points three times with q* fitted (≈ 30 s on two busy cores)
@pytest.mark.parametrize("variant", ["correct", "broken-swapped-gaps", "broken-other-seed", "broken-ais-against-elbo"])
def test_evaluate_gaps_command_reports_the_numbers_of_evaluate_in_python(gaps_command, variant):
    """The table, the JSON and the Python API agree point by point; the two gaps add up to the
    gaps' total per point, and that total agrees with the evaluation's own gap within 4 s.e."""
    printed, report, png, python = gaps_command
    report = json.loads(json.dumps(report))
    if variant == "broken-swapped-gaps":
        p = report["per_point"]
        p["approximation_gap"], p["amortization_gap"] = p["amortization_gap"], p["approximation_gap"]
    if variant == "broken-ais-against-elbo":  # AIS's log p(x) minus ELBO[q]: the total gap, not the approximation gap
        p = report["per_point"]
        p["approximation_gap_ais"] = [a - e for a, e in zip(p["ais_log_px"], p["gap_elbo"])]
    problems = gaps_problems(printed, report, python[1 if variant == "broken-other-seed" else 0])
    if variant == "correct":
        assert problems == []
        mean, se = report["summary"]["gaps"]["sum_minus_gap"]
        assert abs(mean) < 4 * se
        assert report["summary"]["gaps"]["families"] == {"z": "Normal"}
        assert report["summary"]["surgery"]["sites"]["z"]["active_units"] == report["summary"]["active_units"]
        assert png.stat().st_size > 1000
        assert re.search(r"^approximation gap with AIS's log p\(x\), log p_AIS\(x\) − ELBO\[q\*\]: -?\d+\.\d{3} ± \d+\.\d{3} ",
                         printed, re.M)
    else:
        assert any("differs from evaluate" in p or "mean of the per-point" in p or "with AIS" in p for p in problems), problems
