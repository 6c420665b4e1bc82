"""benchmarks/evaluate_speed.py runs (its --tiny mode), its methods agree, and its report derives its
numbers from its own measurements, so the benchmark never rots (its speeds are not checked)."""

import contextlib
import importlib.util
import io
import json
import math
import statistics
from pathlib import Path

import pytest
import torch

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "evaluate_speed.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("evaluate_speed", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory) -> tuple[dict, str]:
    """The --tiny run's JSON report and what it printed."""
    out = tmp_path_factory.mktemp("evaluate_speed") / "evaluate_speed.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert load_benchmark().main(["--tiny", "--out", str(out)]) == 0
    return json.loads(out.read_text()), printed.getvalue()


def mean(values) -> float:
    return sum(values) / len(values)


def report_problems(report: dict) -> list[str]:
    """What the report gets wrong about its own measurements (--tiny: 4 points, pythae skipped):

    per method, the points per second are the points over the median of the repeats' seconds; the
    mean log p(x) and its difference from (b) are the means of the per-point values; the largest
    |z| against (b) is recomputed from the per-point values and standard errors, and is below 4
    (the methods estimate the same log p(x)); the share of k̂ above 0.7 is that of the per-point k̂.
    """
    problems = []
    methods, N = report["methods"], report["settings"]["points"]
    if set(methods) != {"pyrovae", "pytorch", "pyro"} or "pythae" not in report["notes"] or N != 4:
        problems.append(f"methods {sorted(methods)}, points {N}")
        return problems
    ref, ref_se = methods["pytorch"]["per_point_log_px"], methods["pytorch"]["per_point_stderr"]
    for name, m in methods.items():
        values = m["per_point_log_px"]
        if len(values) != N or not all(map(math.isfinite, values)):
            problems.append(f"{name}: per-point log p(x) {values}")
            continue
        if not (m["points_per_s"] > 0 and m["points_per_s"] == pytest.approx(N / statistics.median(m["seconds"]), rel=1e-12)):
            problems.append(f"{name}: points_per_s {m['points_per_s']}, seconds {m['seconds']}")
        if m["log_px_mean"] != pytest.approx(mean(values), rel=1e-12):
            problems.append(f"{name}: log_px_mean {m['log_px_mean']}, per-point mean {mean(values)}")
        if m["mean_diff_vs_pytorch"] != pytest.approx(mean([v - r for v, r in zip(values, ref)]), rel=1e-9, abs=1e-12):
            problems.append(f"{name}: mean_diff_vs_pytorch {m['mean_diff_vs_pytorch']}")
        if name != "pytorch":
            z = max(abs(v - r) / math.sqrt(s**2 + rs**2) for v, r, s, rs in zip(values, ref, m["per_point_stderr"], ref_se))
            if not (m["max_abs_z_vs_pytorch"] == pytest.approx(z, rel=1e-9) and z < 4):
                problems.append(f"{name}: max_abs_z_vs_pytorch {m['max_abs_z_vs_pytorch']}, recomputed {z}")
    khat = report["khat"]["per_point_khat"]
    if len(khat) != N or report["khat"]["share_khat_above_0.7"] != pytest.approx(mean([k > 0.7 for k in khat])):
        problems.append(f"khat {report['khat']}")
    return problems


def with_method(report: dict, name: str, **changes) -> dict:
    return {**report, "methods": {**report["methods"], name: {**report["methods"][name], **changes}}}


REPORT_BREAKS = {  # name → a mutation of a correct report, and the start of the problem it must raise
    "correct": (lambda r: r, None),
    "seconds-per-point": (lambda r: with_method(r, "pyro", points_per_s=statistics.median(r["methods"]["pyro"]["seconds"]) / 4),
                          "pyro: points_per_s"),
    "mean-of-another-method": (lambda r: with_method(r, "pyrovae", log_px_mean=r["methods"]["pytorch"]["log_px_mean"] - 1),
                               "pyrovae: log_px_mean"),
    "z-without-the-reference-error": (lambda r: with_method(r, "pyro", max_abs_z_vs_pytorch=max(
        abs(v - p) / s for v, p, s in zip(r["methods"]["pyro"]["per_point_log_px"], r["methods"]["pytorch"]["per_point_log_px"],
                                          r["methods"]["pyro"]["per_point_stderr"]))), "pyro: max_abs_z"),
}


@pytest.mark.parametrize("variant", list(REPORT_BREAKS))
def test_evaluate_speed_tiny_runs_and_methods_agree(tiny_report, variant):
    report, printed = tiny_report
    assert "(a) pyrovae evaluate" in printed
    assert report["device"] == "cpu" and "on cpu" in printed
    assert report["machine"]["torch_threads"] == report["settings"]["threads"]
    mutate, expected = REPORT_BREAKS[variant]
    problems = report_problems(mutate(report))
    if expected is None:
        assert problems == []
    else:
        assert any(p.startswith(expected) for p in problems), problems


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error given where CUDA is missing; this machine has CUDA")
def test_evaluate_speed_device_cuda_without_cuda_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exited:
        load_benchmark().parse_args(["--tiny", "--device", "cuda"])
    assert exited.value.code == 2 and "--device cuda: CUDA is not available here" in capsys.readouterr().err
