"""benchmarks/evaluate_speed.py runs (its --tiny mode) and its methods agree, so the benchmark never rots."""

import importlib.util
import json
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "evaluate_speed.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("evaluate_speed", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_evaluate_speed_tiny_runs_and_methods_agree(tmp_path, capsys):
    out = tmp_path / "evaluate_speed.json"
    assert load_benchmark().main(["--tiny", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    methods = report["methods"]
    assert set(methods) == {"pyrovae", "pytorch", "pyro"}  # --tiny skips pythae
    assert "pythae" in report["notes"]
    for name, m in methods.items():
        assert m["points_per_s"] > 0, name
        assert len(m["per_point_log_px"]) == report["settings"]["points"] == 4
        assert m["log_px_mean"] < 0, name
    for name in ("pyrovae", "pyro"):  # per point, in combined Monte Carlo standard errors
        assert methods[name]["max_abs_z_vs_pytorch"] < 4, (name, methods[name])
    assert len(report["khat"]["per_point_khat"]) == 4
    assert report["machine"]["torch_threads"] == report["settings"]["threads"]
    assert "(a) pyrovae evaluate" in capsys.readouterr().out
