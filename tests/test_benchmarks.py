"""The benchmark scripts run in their tiny modes, so they never rot (their numbers are not checked here)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_tiny(script: str, out: Path) -> dict:
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), "--tiny", "--out", str(out)],
                          capture_output=True, text=True, cwd=BENCHMARKS, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(out.read_text())


def test_train_step_benchmark_runs(tmp_path):
    result = run_tiny("train_step.py", tmp_path / "train_step.json")
    row = result["results"][0]
    assert set(row["ms_per_step"]) == {"torch", "torch_fused_adam", "naive_pyro", "pyrovae"}
    assert all(ms > 0 for ms in row["ms_per_step"].values())
    assert row["ratio_to_torch"]["torch"] == pytest.approx(1.0)


def test_quality_benchmark_runs(tmp_path):
    result = run_tiny("quality.py", tmp_path / "quality.json")
    assert result["training"]["steps"] > 0
    log_px, stderr = result["summary"]["log_px"]
    assert log_px < 0 and stderr > 0
    assert result["summary"]["num_points"] == 20
