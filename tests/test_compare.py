"""Tests of model comparison: paired differences against exact oracles, the cache, and ``pyrovae compare``.

The oracles are probabilistic PCA models, whose log p(x) is a closed form (``.log_px``): with the
exact posterior as guide every importance weight equals p(x), so the per-point difference of two
models is exact; with a guide that is not the posterior, the estimate of the mean difference
differs from the exact one by Monte Carlo error only, measured by the estimates' own standard errors.
"""

import contextlib
import dataclasses
import io
import json
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image

from torch.distributions import MultivariateNormal, kl_divergence

from pyrovae import compare as cmp
from pyrovae import gaps
from pyrovae.cli import compare as compare_command
from pyrovae.cli.main import main
from pyrovae.estimators import Estimate
from pyrovae.evaluate import evaluate
from pyrovae.guides import LinearGaussianGuide
from pyrovae.models import PPCA

P, D = 6, 2
SMALL = ["--epochs", "1", "--hidden", "16", "--no-progress"]
FAST = ["-k", "30", "--limit", "40", "--no-compile", "--no-progress"]


# ---------------------------------------------------------------- helpers


def ppca_pair(inflate: float = 1.0, shift: float = 0.0):
    """Two PPCA models, B a perturbed copy of A, each with the exact-posterior guide, its covariance
    multiplied by ``inflate`` and its mean moved by ``shift`` (1 and 0: the exact posterior)."""
    torch.manual_seed(1)
    model_a = PPCA(P, D)
    model_b = PPCA(P, D)
    model_b.load_state_dict(model_a.state_dict())
    with torch.no_grad():
        model_b.W.add_(0.2 * torch.randn(P, D))
    guides = []
    for model in (model_a, model_b):
        guide = LinearGaussianGuide(P, model.sites).set_exact_posterior(model)
        with torch.no_grad():
            guide.L.mul_(math.sqrt(inflate))
            guide.c.add_(shift)
        guides.append(guide)
    return (model_a, guides[0]), (model_b, guides[1])


def point_evaluations(pairs, x, num_samples):
    torch.manual_seed(0)
    return [cmp.PointEvaluation.from_evaluation(evaluate(m.model, g.forward, x, num_samples, (), 10, batch_size=len(x)), 10)
            for m, g in pairs]


def estimate(values) -> Estimate:
    v = torch.tensor(values, dtype=torch.float64)
    return Estimate(v, torch.zeros_like(v))


# ---------------------------------------------------------------- the math


def test_paired_difference_of_known_numbers(float64):
    a, b = [1.0, 2.0, 3.0, 4.0], [0.0, 2.0, 1.0, 5.0]
    result = cmp.paired_difference(estimate(a), estimate(b))
    d = np.subtract(a, b)
    assert result.mean == pytest.approx(d.mean())
    assert result.paired_se == pytest.approx(d.std(ddof=1) / 2)
    assert result.unpaired_se == pytest.approx(math.hypot(np.std(a, ddof=1) / 2, np.std(b, ddof=1) / 2))
    assert result.share_a_better == pytest.approx((1 + 0.5 + 1 + 0) / 4)  # the tie counts one half
    mean, paired_se, unpaired_se, share = result  # unpacks as a tuple
    assert (mean, paired_se, unpaired_se, share) == tuple(result)


def test_paired_difference_refuses_estimates_of_other_points():
    with pytest.raises(ValueError, match="same points"):
        cmp.paired_difference(estimate([1.0, 2.0]), estimate([1.0, 2.0, 3.0]))


def test_exact_guides_give_the_exact_per_point_differences(float64):
    """With the exact posterior as guide, log p(x) and the ELBO are exact at every point, so the
    comparison is the closed form's: mean, both standard errors and the share, to round-off."""
    (ma, ga), (mb, gb) = pairs = ppca_pair()
    torch.manual_seed(0)
    x = ma.marginal().sample((200,))
    a, b = point_evaluations(pairs, x, num_samples=30)
    exact_a, exact_b = ma.log_px(x).detach(), mb.log_px(x).detach()
    d = exact_a - exact_b
    result = cmp.compare(a, b)
    for name, diff in (("log p(x)", result.log_px), ("ELBO", result.elbo)):
        assert diff.mean == pytest.approx(d.mean().item(), abs=1e-9), name
        assert diff.paired_se == pytest.approx(d.std().item() / math.sqrt(len(x)), rel=1e-8), name
        assert diff.unpaired_se == pytest.approx(
            math.hypot(exact_a.std().item(), exact_b.std().item()) / math.sqrt(len(x)), rel=1e-8), name
        assert diff.share_a_better == pytest.approx((d > 0).double().mean().item()), name
    torch.testing.assert_close(result.log_px_differences, d, atol=1e-9, rtol=0)
    assert result.log_px.paired_se < result.log_px.unpaired_se / 2  # close models: pairing removes most variation
    assert result.khat_known.all() and not result.unreliable.any()  # k̂ = -inf: a perfect proposal


def test_inexact_guides_estimate_the_exact_difference_within_their_standard_errors(float64):
    """d̂_n = d_n + e_n with Monte Carlo errors e_n of variance v_n ≈ se_A,n² + se_B,n²: the mean of
    d̂ is within a few √(mean v / N) of the exact mean difference (and so well within a few paired
    standard errors), and N · paired s.e.² ≈ sd(d)² + mean v."""
    (ma, _), (mb, _) = pairs = ppca_pair(inflate=2.0, shift=0.3)
    torch.manual_seed(0)
    N = 400
    x = ma.marginal().sample((N,))
    a, b = point_evaluations(pairs, x, num_samples=200)
    d = (ma.log_px(x) - mb.log_px(x)).detach()
    v = a.log_px.stderr**2 + b.log_px.stderr**2
    result = cmp.paired_difference(a.log_px, b.log_px)
    assert (a.khat < 0.5).all() and (b.khat < 0.5).all()  # the delta-method standard errors hold
    z = (result.mean - d.mean().item()) / math.sqrt(v.mean().item() / N)
    assert abs(z) < 4, z
    assert abs(result.mean - d.mean().item()) < 3 * result.paired_se
    excess = N * result.paired_se**2 - d.var().item() - v.mean().item()
    tolerance = 2 * d.std().item() * math.sqrt(v.mean().item() / N) + math.sqrt(2 * (v**2).mean().item() / N)
    assert abs(excess) < 4 * tolerance, (excess, tolerance)
    assert result.paired_se == pytest.approx(d.std().item() / math.sqrt(N), rel=0.05)
    assert result.paired_se < result.unpaired_se / 2


# ---------------------------------------------------------------- the gaps compared

def gaps_swapped(from_evaluation):
    def swapped(evaluation, particles_elbo):
        e = from_evaluation(evaluation, particles_elbo)
        e.gaps = {"approximation": e.gaps["amortization"], "amortization": e.gaps["approximation"]}
        return e

    return swapped


GAP_BROKEN = {  # name → (object, its attribute, replacement given the original)
    "broken-reversed": (cmp, "paired_difference", lambda f: lambda a, b, **kw: f(b, a, **kw)),
    "broken-share-of-larger": (cmp, "paired_difference", lambda f: lambda a, b, **kw: f(a, b)),
    "broken-gaps-swapped": (cmp.PointEvaluation, "from_evaluation", gaps_swapped),
}


def exact_and_shifted_guides():
    """One PPCA model; A's guide is its exact posterior, B's the same full-covariance Gaussian with
    its mean moved by 0.4 in each coordinate: both families hold the posterior (approximation
    gaps 0), A's amortization gap is 0 and B's is KL(q_B ‖ p(z|x)), the same at every point."""
    (model, exact), _ = ppca_pair()
    shifted = LinearGaussianGuide(P, model.sites).set_exact_posterior(model)
    with torch.no_grad():
        shifted.c.add_(0.4)
    return model, exact, shifted


@pytest.fixture(scope="module")
def exact_and_shifted_evaluations():
    """Both guides evaluated with their gaps on 40 points of the model, in float64 on one thread,
    and KL(q_B ‖ p(z|x)) per point in closed form."""
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    try:
        model, exact, shifted = exact_and_shifted_guides()
        torch.manual_seed(0)
        x = model.marginal().sample((40,)).detach()
        settings = gaps.GapSettings(steps=400, lr=0.05, num_samples=500, batch_size=len(x))
        evaluations = [evaluate(model.model, g.forward, x, 500, (), 50, batch_size=len(x), seed=0, gaps=settings, surgery=False)
                       for g in (exact, shifted)]
        mean, cov = (t.detach() for t in model.posterior(x))
        L = shifted.L.detach().tril()
        kl = kl_divergence(MultivariateNormal(x @ shifted.F.detach().T + shifted.c.detach(), L @ L.T),
                           MultivariateNormal(mean, cov))
    finally:
        torch.set_num_threads(threads)
        torch.set_default_dtype(dtype)
    return evaluations, kl


@pytest.mark.parametrize("variant", ["correct", *GAP_BROKEN])
def test_gap_differences_are_the_closed_form_kl_between_an_exact_and_a_shifted_encoder(
        monkeypatch, exact_and_shifted_evaluations, variant):
    """A − B: approximation gaps 0 − 0, amortization gaps 0 − KL(q_B ‖ p(z|x)), within the per-point
    Monte Carlo standard errors (√Σ se_n² / N); A's amortization gap is the smaller at every point."""
    if variant != "correct":
        target, name, replace = GAP_BROKEN[variant]
        monkeypatch.setattr(target, name, replace(getattr(target, name)))
    evaluations, kl = exact_and_shifted_evaluations
    a, b = (cmp.PointEvaluation.from_evaluation(e, 50) for e in evaluations)
    assert kl.mean() > 0.5  # the oracle's premise: B's encoder misses by a clear margin
    result = cmp.compare(a, b)
    problems = []
    for name, target in (("approximation", torch.zeros_like(kl)), ("amortization", -kl)):
        se = (a.gaps[name].stderr ** 2 + b.gaps[name].stderr ** 2).sum().sqrt().item() / len(kl)
        if abs(result.gaps[name].mean - target.mean().item()) > 4 * se + 1e-6:
            problems.append(f"the {name} gap difference is not the closed form")
        if not torch.allclose(result.gap_differences[name], a.gaps[name].value - b.gaps[name].value, rtol=0, atol=0):
            problems.append(f"the per-point {name} differences are not A − B")
    if result.gaps["amortization"].share_a_better != 1.0:
        problems.append("A's amortization gap is not counted the smaller at every point")
    if variant == "correct":
        assert problems == []
        assert result.summary()["gaps"]["amortization"]["mean"] == result.gaps["amortization"].mean
    else:
        assert problems, variant


def paired(mean: float, se: float) -> cmp.PairedDifference:
    return cmp.PairedDifference(mean, se, math.nan, 0.5)


def comparison(log_px, approximation, amortization) -> cmp.Comparison:
    """A − B made up: each argument (mean, paired s.e.)."""
    zeros = torch.zeros(3)
    return cmp.Comparison(paired(*log_px), paired(*log_px), zeros, zeros, zeros.bool(), ~zeros.bool(),
                          {"approximation": paired(*approximation), "amortization": paired(*amortization)})


READINGS = {  # (log p(x), approximation, amortization), A − B → the sentence
    "b-better-amortization": (((-0.42, 0.05), (0.01, 0.02), (0.80, 0.06)),
                              "B's better log p(x) (by 0.42 ± 0.05 nats per point) comes with a smaller amortization gap "
                              "(by 0.80 ± 0.06): its encoder comes closer to the best q of its family at each point."),
    "b-better-both": (((-1.0, 0.1), (0.3, 0.05), (0.5, 0.1)),
                      "B's better log p(x) (by 1.00 ± 0.10 nats per point) comes with a smaller approximation gap "
                      "(by 0.30 ± 0.05) and a smaller amortization gap (by 0.50 ± 0.10): its family of q comes closer "
                      "to the posterior and its encoder comes closer to the best q of its family at each point."),
    "a-better-model": (((0.5, 0.1), (0.0, 0.05), (0.05, 0.05)),
                       "A's better log p(x) (by 0.50 ± 0.10 nats per point) does not come from a tighter bound: neither "
                       "gap differs (approximation +0.00 ± 0.05, amortization +0.05 ± 0.05 for A); the model itself "
                       "fits better."),
    "a-better-looser": (((0.99, 0.08), (0.156, 0.006), (0.311, 0.013)),
                        "A's better log p(x) (by 0.99 ± 0.08 nats per point) does not come from a tighter bound: its "
                        "approximation and amortization gaps are larger by 0.16 ± 0.01 and 0.31 ± 0.01; the model itself "
                        "fits better, despite its looser bound."),
    "b-better-amortization-looser-family": (((-0.42, 0.05), (-0.2, 0.05), (0.80, 0.06)),
                                            "B's better log p(x) (by 0.42 ± 0.05 nats per point) comes with a smaller "
                                            "amortization gap (by 0.80 ± 0.06): its encoder comes closer to the best q of "
                                            "its family at each point; its approximation gap is larger by 0.20 ± 0.05."),
    "same-a-tighter": (((0.05, 0.1), (-0.3, 0.05), (0.0, 0.1)),
                       "A and B do not differ in log p(x) by more than 2 paired s.e. (+0.05 ± 0.10 nats per point); "
                       "A's approximation gap is smaller by 0.30 ± 0.05."),
    "same-b-tighter": (((0.05, 0.1), (0.0, 0.05), (0.4, 0.1)),
                       "A and B do not differ in log p(x) by more than 2 paired s.e. (+0.05 ± 0.10 nats per point); "
                       "B's amortization gap is smaller by 0.40 ± 0.10."),
    "same-each-smaller-once": (((0.05, 0.1), (-0.3, 0.05), (0.4, 0.1)),
                               "A and B do not differ in log p(x) by more than 2 paired s.e. (+0.05 ± 0.10 nats per point); "
                               "A's approximation gap is smaller by 0.30 ± 0.05; B's amortization gap is smaller by 0.40 ± 0.10."),
    "same-no-gap": (((0.05, 0.1), (0.01, 0.05), (-0.1, 0.1)),
                    "A and B do not differ in log p(x) by more than 2 paired s.e. (+0.05 ± 0.10 nats per point), nor in "
                    "either gap."),
}


@pytest.mark.parametrize("variant", ["correct", "broken-always-significant", "broken-never-significant"])
def test_reading_says_which_gap_goes_with_the_better_log_px(monkeypatch, variant):
    if variant != "correct":
        monkeypatch.setattr(cmp, "significant", lambda d, z=2.0: variant == "broken-always-significant")
    wrong = [case for case, (numbers, sentence) in READINGS.items() if cmp.reading("A", "B", comparison(*numbers)) != sentence]
    if variant == "correct":
        assert wrong == []
    else:
        assert wrong, variant
    no_gaps = cmp.Comparison(paired(0, 1), paired(0, 1), torch.zeros(1), torch.zeros(1), torch.zeros(1).bool(),
                             torch.ones(1).bool())
    with pytest.raises(ValueError, match="no inference gaps"):
        cmp.reading("A", "B", no_gaps)


def test_cache_keeps_the_gaps_under_their_own_settings(tmp_path, float64):
    model, exact, shifted = exact_and_shifted_guides()
    torch.manual_seed(0)
    x = model.marginal().sample((5,)).detach()
    settings = gaps.GapSettings(steps=10, num_samples=20)
    evaluation = cmp.PointEvaluation.from_evaluation(
        evaluate(model.model, shifted.forward, x, 20, (), 5, seed=0, gaps=settings, surgery=False), 5)
    (tmp_path / "checkpoint.pt").write_bytes(b"weights")
    plain = cmp.cache_key("test", 20, 5, None, 0, tmp_path / "checkpoint.pt")
    with_gaps = cmp.cache_key("test", 20, 5, None, 0, tmp_path / "checkpoint.pt", gaps=dataclasses.asdict(settings))
    other = cmp.cache_key("test", 20, 5, None, 0, tmp_path / "checkpoint.pt",
                          gaps=dataclasses.asdict(dataclasses.replace(settings, steps=11)))
    assert len({cmp.cache_path(tmp_path, k) for k in (plain, with_gaps, other)}) == 3
    cmp.store_cached(tmp_path, with_gaps, "points", evaluation)
    back = cmp.load_cached(tmp_path, with_gaps, "points")
    for name in cmp.GAP_NAMES:
        torch.testing.assert_close(back.gaps[name].value, evaluation.gaps[name].value, rtol=0, atol=0)
        torch.testing.assert_close(back.gaps[name].stderr, evaluation.gaps[name].stderr, rtol=0, atol=0)
    assert cmp.load_cached(tmp_path, plain, "points") is None and cmp.load_cached(tmp_path, other, "points") is None
    cmp.store_cached(tmp_path, plain, "points", evaluation)  # the plain entry does not remove the gaps' entry
    assert cmp.load_cached(tmp_path, with_gaps, "points") is not None


def test_unreliable_points_are_those_above_the_threshold_in_either_run():
    ka = torch.tensor([0.1, 0.8, 0.2, float("nan"), -math.inf, 0.71])
    kb = torch.tensor([0.9, 0.1, 0.3, 0.2, 0.1, float("nan")])
    assert cmp.unreliable_points(ka, kb).tolist() == [True, True, False, False, False, True]
    assert cmp.khat_computed(ka, kb).tolist() == [True, True, True, False, True, False]


# ---------------------------------------------------------------- same points?


def data_config(**changes) -> dict:
    d = {"dataset": "digits", "data_dir": None, "binarize": "dynamic", "seed": 0, "split_seed": 0,
         "test_fraction": 0.2, "heldout_sha256": "a" * 64}
    return {**d, **changes}


@pytest.mark.parametrize("b, split, expected", [
    (data_config(), "test", []),
    (data_config(binarize="static"), "test", []),  # trained otherwise, evaluated on the same draw
    (data_config(data_dir="/elsewhere"), "test", []),  # the same held-out rows
    (data_config(heldout_sha256="b" * 64, split_seed=1, seed=1), "test",
     ["held-out split", "--seed 0 vs 1", "binarization of the evaluated points"]),
    (data_config(heldout_sha256="b" * 64), "test", ["held-out split"]),
    (data_config(seed=3), "test", ["binarized with --seed 0 vs binarized with --seed 3"]),
    (data_config(binarize="none"), "test", ["binarized with --seed 0 vs not binarized"]),
    (data_config(dataset="mnist", heldout_sha256="b" * 64), "test", ["data set (digits vs mnist)", "held-out split"]),
    (data_config(validation_fraction=0.1), "train", ["validation fraction (0 vs 0.1)"]),
    (data_config(validation_fraction=0.1), "test", []),
], ids=["same", "static-vs-dynamic", "other-folder", "other-seed", "other-rows", "binarization-seed",
        "not-binarized", "other-dataset", "validation-fraction", "validation-fraction-test"])
def test_heldout_differences_name_what_differs(b, split, expected):
    differences = cmp.heldout_differences(data_config(), b, split)
    assert bool(differences) == bool(expected), differences
    text = "; ".join(differences)
    for part in expected:
        assert part in text, text


def test_legacy_configs_without_a_fingerprint_differ_by_data_set():
    a, b = data_config(heldout_sha256=None), data_config(dataset="mnist", heldout_sha256=None)
    assert cmp.heldout_differences(a, a) == []
    assert "data set" in cmp.heldout_differences(a, b)[0]


# ---------------------------------------------------------------- the cache


def test_cache_round_trip_and_invalidation(tmp_path, float64):
    checkpoint = tmp_path / "checkpoint.pt"
    checkpoint.write_bytes(b"parameters, version 1")
    key = cmp.cache_key("test", 30, 10, 40, 0, checkpoint)
    value = torch.randn(5)
    evaluation = cmp.PointEvaluation(30, 10, Estimate(value, value.abs()), Estimate(value - 1, value.abs() / 2),
                                     torch.tensor([0.1, -math.inf, math.nan, 0.9, 1.2]))
    path = cmp.store_cached(tmp_path, key, "points", evaluation)
    assert path.parent == tmp_path / "evaluations" and path.is_file()
    loaded = cmp.load_cached(tmp_path, key, "points")
    assert loaded is not None and loaded.num_samples == 30 and loaded.particles_elbo == 10
    for got, want in ((loaded.log_px.value, value), (loaded.elbo.stderr, value.abs() / 2)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(loaded.khat, evaluation.khat, rtol=0, atol=0, equal_nan=True)
    assert cmp.load_cached(tmp_path, key, "other points") is None
    assert cmp.load_cached(tmp_path, {**key, "num_samples": 31}, "points") is None
    checkpoint.write_bytes(b"parameters, version 2")  # trained further
    new_key = cmp.cache_key("test", 30, 10, 40, 0, checkpoint)
    assert new_key != key and cmp.load_cached(tmp_path, new_key, "points") is None
    new_path = cmp.store_cached(tmp_path, new_key, "points", evaluation)
    assert not path.exists() and new_path.is_file()  # the stale one is removed
    new_path.write_text("{not json")
    assert cmp.load_cached(tmp_path, new_key, "points") is None


# ---------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Digits runs trained one epoch: A, B and C on the seed-0 split (latent dims 2, 3, 2), D on seed 1."""
    root = tmp_path_factory.mktemp("compare")
    options = {"a": ["--latent-dim", "2"], "b": ["--latent-dim", "3"], "c": ["--latent-dim", "2", "--lr", "3e-3"],
               "d": ["--latent-dim", "2", "--seed", "1"]}
    for name, extra in options.items():
        assert main(["train", "--out", str(root / name), *SMALL, *extra]) == 0
    return {name: root / name for name in options}


@pytest.fixture
def count_evaluations(monkeypatch):
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[2].shape[0])
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(compare_command, "evaluate", counting)
    return calls


ROW = re.compile(r"^(log p\(x\), importance sampled \(K=30\)|ELBO)\s+(-?\d+\.\d{3})\s+(\d+\.\d{3})\s+(\d+\.\d{3})\s+(\d+\.\d)%$", re.M)


def test_compare_prints_pairs_writes_json_and_png_and_reuses_its_cache(runs, tmp_path, capsys, count_evaluations):
    out_json, out_png = tmp_path / "cmp.json", tmp_path / "cmp.png"
    args = ["compare", str(runs["a"]), str(runs["b"]), str(runs["c"]), *FAST]
    assert main([*args, "--json", str(out_json), "--plot", str(out_png)]) == 0
    assert count_evaluations == [40, 40, 40]
    out = capsys.readouterr().out
    for pair in ("A − B", "A − C", "B − C"):
        assert f"{pair}, mean per point, nats" in out
    rows = ROW.findall(out)
    assert [r[0].split(",")[0] for r in rows] == ["log p(x)", "ELBO"] * 3
    assert len(re.findall(r"^k̂ > 0\.7 in [AB] or [BC] at \d+ of 40 points", out, re.M)) == 3

    result = json.loads(out_json.read_text())
    assert [(p["a"], p["b"]) for p in result["pairs"]] == [("A", "B"), ("A", "C"), ("B", "C")]
    assert [r["run"] for r in result["runs"]] == [str(runs[n]) for n in "abc"]
    per_run = {r["label"]: np.array(r["per_point"]["log_px"]) for r in result["runs"]}
    for pair, (name, mean, paired, unpaired, share) in zip(result["pairs"], rows[::2]):
        d = np.array(pair["per_point"]["log_px_difference"])
        assert len(d) == 40 and pair["num_points"] == 40
        np.testing.assert_allclose(d, per_run[pair["a"]] - per_run[pair["b"]], rtol=0, atol=1e-12)
        assert pair["log_px"]["mean"] == pytest.approx(d.mean())
        assert pair["log_px"]["paired_se"] == pytest.approx(d.std(ddof=1) / math.sqrt(40))
        assert pair["log_px"]["share_a_better"] == pytest.approx(np.mean(d > 0) + 0.5 * np.mean(d == 0))
        assert (float(mean), float(paired), float(unpaired)) == pytest.approx(
            (pair["log_px"]["mean"], pair["log_px"]["paired_se"], pair["log_px"]["unpaired_se"]), abs=5e-4)
        assert pair["unreliable_points"] == sum(pair["per_point"]["unreliable"])
        assert len(pair["per_point"]["elbo_difference"]) == 40
    with Image.open(out_png) as image:
        image.load()
        assert image.size[0] > 100 and image.size[1] > 3 * 100
    for name in "abc":
        assert len(list((runs[name] / "evaluations").glob("*.json"))) == 1

    # the second time every evaluation comes from the cache, with the same numbers
    assert main(args) == 0
    again = capsys.readouterr().out
    assert count_evaluations == [40, 40, 40]
    assert ROW.findall(again) == rows
    assert again.count("(from ") == 3 and (runs["a"] / "compare.png").is_file()

    # more training changes the checkpoint: that run alone is evaluated again, its stale cache removed
    assert main(["train", "--out", str(runs["c"]), "--resume", "--epochs", "2", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(args) == 0
    assert count_evaluations == [40, 40, 40, 40]
    assert len(list((runs["c"] / "evaluations").glob("*.json"))) == 1
    # other settings are other evaluations
    assert main(["compare", str(runs["a"]), str(runs["b"]), "-k", "31", *FAST[2:]]) == 0
    assert count_evaluations == [40, 40, 40, 40, 40, 40]


def test_compare_evaluates_each_run_as_pyrovae_evaluate_does(runs, tmp_path, capsys):
    """The same seed, K, particles and points give the same per-point numbers as ``pyrovae evaluate``."""
    out = tmp_path / "cmp.json"
    assert main(["compare", str(runs["a"]), str(runs["b"]), *FAST, "--json", str(out)]) == 0
    assert main(["evaluate", str(runs["b"]), *FAST, "--json", str(tmp_path / "eval.json")]) == 0
    compared = json.loads(out.read_text())["runs"][1]["per_point"]
    evaluated = json.loads((tmp_path / "eval.json").read_text())["per_point"]
    np.testing.assert_allclose(compared["log_px"], evaluated["log_px"], rtol=1e-12)
    np.testing.assert_allclose(compared["elbo"], evaluated["elbo"], rtol=1e-12)


def assert_one_line_error(err: str, pattern: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyrovae compare: error: "), err
    assert re.search(pattern, lines[0]), err


def test_compare_refuses_runs_evaluated_on_other_points(runs, capsys, count_evaluations):
    assert main(["compare", str(runs["a"]), str(runs["d"]), *FAST]) == 2
    err = capsys.readouterr().err
    assert_one_line_error(err, r"not evaluated on the same test points: held-out split .*--seed 0 vs 1.*"
                               r"binarization of the evaluated points \(binarized with --seed 0 vs binarized with --seed 1\)")
    assert count_evaluations == []  # refused before any work


@pytest.mark.parametrize("args, pattern", [
    (["{a}"], "at least two run folders"),
    (["{a}", "{b}", "--limit", "0"], "--limit must be at least 1"),
    (["{a}", "{b}", "-k", "0"], "-k must be at least 1"),
    (["{a}", "{b}", "--split", "everything"], "unknown split"),
    (["{a}", "{b}", "--json", "{a}/no/such/folder/x.json"], "--json .* does not exist"),
    (["{a}", "{b}", "--gaps", "--gap-particles", "0"], "--gap-particles must be at least 1, got 0"),
], ids=["one-run", "limit", "samples", "split", "json-folder", "gap-particles"])
def test_compare_refuses_bad_options_in_one_line(runs, capsys, count_evaluations, args, pattern):
    argv = ["compare", *(a.format(a=runs["a"], b=runs["b"]) for a in args), "--no-progress", "--no-compile"]
    assert main(argv) == 2
    assert_one_line_error(capsys.readouterr().err, pattern)
    assert count_evaluations == []


# ---------------------------------------------------------------- compare --gaps

GAP_FAST = ["--gaps", "--gap-steps", "60", "--gap-samples", "30"]
GAP_ROW = r"^{} gap .*?\s(-?\d+\.\d{{3}})\s+(\d+\.\d{{3}})\s+(\d+\.\d{{3}})\s+(\d+\.\d)%$"  # difference, s.e.s, share


@pytest.fixture(scope="module")
def compared_gaps(runs, tmp_path_factory):
    """``compare A B --gaps`` (printed output, JSON) and ``evaluate --gaps`` of B and of C with the same options."""
    folder = tmp_path_factory.mktemp("compare-gaps")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            assert main(["compare", str(runs["a"]), str(runs["b"]), *FAST, *GAP_FAST, "--json", str(folder / "compare.json")]) == 0
        evaluated = {}
        for name in "bc":
            with contextlib.redirect_stdout(io.StringIO()):
                assert main(["evaluate", str(runs[name]), *FAST, *GAP_FAST, "--json", str(folder / f"{name}.json"),
                             "--gaps-plot", str(folder / f"{name}.png")]) == 0
            evaluated[name] = json.loads((folder / f"{name}.json").read_text())["per_point"]
    finally:
        torch.set_num_threads(threads)
    return printed.getvalue(), json.loads((folder / "compare.json").read_text()), evaluated


def from_json(run: dict) -> cmp.PointEvaluation:
    """A run's per-point values as the comparison read them (standard errors left out: zeros)."""
    def e(key):
        return estimate(run["per_point"][key])

    return cmp.PointEvaluation(30, 100, e("log_px"), e("elbo"), torch.tensor(run["per_point"]["khat"], dtype=torch.float64),
                               {name: e(f"{name}_gap") for name in cmp.GAP_NAMES})


def compare_gaps_problems(printed: str, result: dict, evaluated_b: dict) -> list[str]:
    pair, (a, b) = result["pairs"][0], result["runs"]
    problems = []
    for name in cmp.GAP_NAMES:
        d = np.subtract(a["per_point"][f"{name}_gap"], b["per_point"][f"{name}_gap"])
        summary = pair["gaps"][name]
        if not np.allclose(pair["per_point"][f"{name}_gap_difference"], d, rtol=0, atol=1e-12) \
                or summary["mean"] != pytest.approx(d.mean(), abs=1e-12) \
                or summary["paired_se"] != pytest.approx(d.std(ddof=1) / math.sqrt(40)) \
                or summary["share_a_better"] != pytest.approx(np.mean(d < 0) + 0.5 * np.mean(d == 0)):
            problems.append(f"the {name} gap's paired difference is not that of the runs' per-point gaps")
        row = re.search(GAP_ROW.format(name), printed, re.M)
        if row is None or tuple(map(float, row.groups()[:3])) != pytest.approx(
                (summary["mean"], summary["paired_se"], summary["unpaired_se"]), abs=5e-4):
            problems.append(f"the printed {name} gap row is not the JSON's")
        if not np.allclose(b["per_point"][f"{name}_gap"], evaluated_b[f"{name}_gap"], rtol=1e-12, atol=1e-12):
            problems.append(f"B's {name} gaps differ from pyrovae evaluate --gaps")
    sentence = cmp.reading("A", "B", cmp.compare(from_json(a), from_json(b)))
    if pair["reading"] != sentence or f"\n{sentence}\n" not in printed:
        problems.append("the reading is not the sentence of the per-point numbers")
    return problems


@pytest.mark.slow  # four digits runs trained, then 40 points evaluated four times with q* fitted
@pytest.mark.parametrize("variant", ["correct", "broken-swapped-gaps", "broken-other-run"])
def test_compare_gaps_command_differences_match_each_run_evaluated_alone(compared_gaps, runs, capsys, variant):
    printed, result, evaluated = compared_gaps
    result = json.loads(json.dumps(result))
    if variant == "broken-swapped-gaps":
        p = result["runs"][1]["per_point"]
        p["approximation_gap"], p["amortization_gap"] = p["amortization_gap"], p["approximation_gap"]
    problems = compare_gaps_problems(printed, result, evaluated["c" if variant == "broken-other-run" else "b"])
    if variant != "correct":
        assert problems, variant
        return
    assert problems == []
    assert re.search(r"^for a gap, A better: A's gap smaller at that point$", printed, re.M)
    assert result["settings"]["gaps"]["steps"] == 60
    # the second time both evaluations, gaps included, come from the cache; without --gaps they are other evaluations
    args = ["compare", str(runs["a"]), str(runs["b"]), *FAST]
    assert main([*args, *GAP_FAST]) == 0
    again = capsys.readouterr().out
    assert again.count("(from ") == 2 and "-g" in again and result["pairs"][0]["reading"] in again
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert "amortization gap" not in plain and "-g" not in plain  # the plain evaluations, not the gaps' cache
