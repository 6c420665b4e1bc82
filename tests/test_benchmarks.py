"""The benchmark scripts run in their tiny modes, so they never rot.

Their timings are not checked (they depend on the machine); what each report derives from its own
numbers is: ratios from the timings it reports, and the evidence estimates' identities.
"""

import importlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyrovae import params
from pyrovae.nn import ACTIVATIONS

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_tiny(script: str, out: Path) -> dict:
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), "--tiny", "--out", str(out)],
                          capture_output=True, text=True, cwd=BENCHMARKS, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def train_step_report(tmp_path_factory) -> dict:
    return run_tiny("train_step.py", tmp_path_factory.mktemp("train_step") / "train_step.json")


@pytest.fixture(scope="module")
def quality_report(tmp_path_factory) -> dict:
    return run_tiny("quality.py", tmp_path_factory.mktemp("quality") / "quality.json")


def finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def train_step_problems(report: dict) -> list[str]:
    """What is inconsistent in a train_step report: every method timed (finite, positive ms), each
    ratio present, finite and equal to the ratio of the two timings it reports, and the number of
    timed steps the settings ask for."""
    problems = []
    settings, (row,) = report["settings"], report["results"]  # --tiny measures one net
    ms, ratio = row["ms_per_step"], row["ratio_to_torch"]
    if set(ms) != {"torch", "torch_fused_adam", "naive_pyro", "pyrovae", "pyrovae_captured"} or not all(map(finite_positive, ms.values())):
        problems.append(f"ms_per_step {ms}")
    for name in ms:
        if not (finite_positive(ratio.get(name)) and ratio[name] == pytest.approx(ms[name] / ms["torch"], rel=1e-12)):
            problems.append(f"ratio_to_torch[{name!r}] {ratio.get(name)}, timings give {ms[name] / ms['torch']}")
    if row["steps_per_method"] != settings["rounds"] * settings["steps"]:
        problems.append(f"steps_per_method {row['steps_per_method']}")
    if (row["net"], row["batch_size"]) != ("784-400-50", 128):
        problems.append(f"net {row['net']}, batch {row['batch_size']}")
    return problems


def with_row(report: dict, **changes) -> dict:
    return {**report, "results": [{**report["results"][0], **changes}]}


TRAIN_STEP_BREAKS = {  # name → a mutation of a correct report, and the start of the problem it must raise
    "correct": (lambda r: r, None),
    "ratio-inverted": (lambda r: with_row(r, ratio_to_torch={n: r["results"][0]["ms_per_step"]["torch"] / ms
                                                              for n, ms in r["results"][0]["ms_per_step"].items()}), "ratio_to_torch"),
    "ratio-missing": (lambda r: with_row(r, ratio_to_torch={n: v for n, v in r["results"][0]["ratio_to_torch"].items()
                                                             if n != "pyrovae"}), "ratio_to_torch['pyrovae']"),
    "ratio-nan": (lambda r: with_row(r, ratio_to_torch={**r["results"][0]["ratio_to_torch"], "naive_pyro": math.nan}),
                  "ratio_to_torch['naive_pyro']"),
}


@pytest.mark.parametrize("variant", list(TRAIN_STEP_BREAKS))
def test_train_step_benchmark_runs(train_step_report, variant):
    mutate, expected = TRAIN_STEP_BREAKS[variant]
    problems = train_step_problems(mutate(train_step_report))
    if expected is None:
        assert problems == []
    else:
        assert any(p.startswith(expected) for p in problems), problems


def quality_problems(report: dict) -> list[str]:
    """What is inconsistent in a quality report (--tiny: digits, K = 50, 20 test points):

    the settings' K and points evaluated; L_K equal to the importance-sampled log p(x) (the same
    estimator on the same draws); the gap equal to log p(x) − ELBO and the ELBO to reconstruction −
    Monte Carlo KL (means of per-point identities, the latter to float32 round-off); bits per dimension −log p(x) / (64 log 2); finite,
    positive standard errors; training steps counted.
    """
    problems = []
    (row,), settings = report["results"], report["settings"]  # --tiny trains one configuration
    s = row["summary"]
    if (s["num_points"], s["num_samples"]) != (settings["test_points"], settings["samples"]) or s["num_points"] != 20:
        problems.append(f"points {s['num_points']}, K {s['num_samples']}")
    log_px, elbo = s["log_px"][0], s["elbo"][0]
    if s["iwae"].get(str(settings["samples"]), [None])[0] != pytest.approx(log_px, rel=1e-12):
        problems.append(f"L_K {s['iwae']} is not log p(x) {log_px}")
    if s["gap"][0] != pytest.approx(log_px - elbo, rel=1e-9):
        problems.append(f"gap {s['gap'][0]}, log p(x) − ELBO {log_px - elbo}")
    kl_mc = sum(site["monte_carlo"][0] for site in s["kl"].values())
    if elbo != pytest.approx(s["reconstruction"][0] - kl_mc, rel=1e-6):  # float32 log-densities, summed in two orders
        problems.append(f"ELBO {elbo}, reconstruction − KL {s['reconstruction'][0] - kl_mc}")
    if s["bits_per_dim"] != pytest.approx(-log_px / (64 * math.log(2)), rel=1e-12):
        problems.append(f"bits_per_dim {s['bits_per_dim']}")
    if not all(finite_positive(s[key][1]) for key in ("log_px", "elbo", "gap")):
        problems.append("standard errors")
    if not (row["training"]["steps"] > 0 and row["training"]["epochs"] >= 1):
        problems.append(f"training {row['training']}")
    return problems


def with_summary(report: dict, **changes) -> dict:
    (row,) = report["results"]
    return {**report, "results": [{**row, "summary": {**row["summary"], **changes}}]}


QUALITY_BREAKS = {  # name → a mutation of a correct report, and the start of the problem it must raise
    "correct": (lambda r: r, None),
    "bits-in-nats": (lambda r: with_summary(r, bits_per_dim=-r["results"][0]["summary"]["log_px"][0] / 64), "bits_per_dim"),
    "gap-reversed": (lambda r: with_summary(r, gap=[-r["results"][0]["summary"]["gap"][0], r["results"][0]["summary"]["gap"][1]]), "gap"),
    "log-px-is-the-elbo": (lambda r: with_summary(r, log_px=r["results"][0]["summary"]["elbo"]), "L_K"),
}


@pytest.mark.parametrize("variant", list(QUALITY_BREAKS))
def test_quality_benchmark_runs(quality_report, variant):
    mutate, expected = QUALITY_BREAKS[variant]
    problems = quality_problems(mutate(quality_report))
    if expected is None:
        assert problems == []
    else:
        assert any(p.startswith(expected) for p in problems), problems


def benchmark_module(name: str):
    """A module of the benchmarks folder (they import each other by plain name)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_quality_cosine_schedule_anneals_to_zero_over_the_budget():
    cosine = benchmark_module("quality").cosine
    assert cosine(2e-3, 0.0, 900.0) == 2e-3
    assert cosine(2e-3, 450.0, 900.0) == pytest.approx(1e-3, rel=1e-12)
    assert cosine(2e-3, 225.0, 900.0) == pytest.approx(1e-3 * (1 + math.sqrt(0.5)), rel=1e-12)
    assert cosine(2e-3, 900.0, 900.0) == pytest.approx(0.0, abs=1e-18)
    assert cosine(2e-3, 1000.0, 900.0) == pytest.approx(0.0, abs=1e-18)  # past the deadline: no negative rate


def test_results_name_paths_relative_to_the_checkout(tmp_path):
    _relative = benchmark_module("common")._relative
    checkout = tmp_path / "repo"
    settings = {"data_dir": str(tmp_path / "shared" / "data"), "out": [str(checkout / "benchmarks" / "r.json")],
                "elsewhere": "/usr/lib", "name": "vae", "k": 5000}
    assert _relative(settings, checkout) == {"data_dir": "../shared/data", "out": ["benchmarks/r.json"],
                                             "elsewhere": "/usr/lib", "name": "vae", "k": 5000}


@pytest.mark.parametrize("activation", ["tanh", "elu"])
def test_quality_activation_sets_every_configurations_networks(activation):
    """--activation builds the hand-written baseline and pyrovae's VAE with the same networks."""
    build = benchmark_module("quality").build
    for name in ("handwritten", "vae-mean-field", "iwae5"):
        model = build(name, 64, tiny=True, activation=activation)[0]
        kinds = {type(m) for m in model.modules() if type(m) in ACTIVATIONS.values()}
        assert kinds == {ACTIVATIONS[activation]}, (name, kinds)


@pytest.mark.parametrize("name, objective, k", [("vae-mean-field", "mean-field", 1), ("iwae5", "iwae", 5), ("vae", "elbo", 1)])
def test_quality_captures_each_configuration_with_its_objective_and_particles(name, objective, k):
    quality = benchmark_module("quality")
    model = quality.build(name, 64, tiny=True)[0]
    x = torch.bernoulli(torch.full((8, 64), 0.5))
    parameters = list(params.trainable(model.model, model.guide, x).values())
    step = quality.captured_step(name, model, parameters, "graph")
    assert (step.objective, step.num_particles, step.mode) == (objective, k, "graph")
    assert quality.captured_step(name, model, parameters, None) is None
    assert quality.captured_step("handwritten", model, parameters, "graph") is None
