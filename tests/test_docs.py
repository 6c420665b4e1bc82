"""The documentation builds with warnings as errors, and its tables are the benchmarks' results.

The code blocks of the pages are run by tests/test_readme.py.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def load_tables():
    spec = importlib.util.spec_from_file_location("benchmark_tables", ROOT / "benchmarks" / "tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_tables_are_what_the_results_give(capsys):
    """Rerunning a benchmark without `python benchmarks/tables.py` (or editing a table by hand) fails here."""
    status = load_tables().main(["--check"])
    assert status == 0, capsys.readouterr().err


def test_every_generated_table_says_machine_date_and_command():
    tables = load_tables()
    for path, text in tables.render().items():
        assert "do not edit" in text.splitlines()[0], path.name
        if "Every quality results file is in one of the tables above." in text:
            continue  # the catch-all table, with nothing to catch
        assert "Measured on" in text, path.name
        assert re.search(r"\d{4}-\d{2}-\d{2}|date not recorded", text), path.name
        assert re.search(r"`(OMP_NUM_THREADS=1 )?(python benchmarks/\S+\.py|pyrovae )", text), path.name


def test_every_generated_table_is_on_a_page():
    pages = "".join(p.read_text(encoding="utf-8") for p in DOCS.glob("*.md"))
    for path in (DOCS / "generated").glob("*.md"):
        assert f"generated/{path.name}" in pages, f"no page includes docs/generated/{path.name}"


def test_the_headline_is_the_best_recorded_quality():
    results = [json.loads(p.read_text()) for p in (ROOT / "benchmarks" / "results").glob("quality_15min*.json")]
    best = max(r["summary"]["log_px"][0] for d in results for r in d.get("results", []) if "log_px" in r.get("summary", {}))
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"{best:.2f}".replace("-", "−") in readme


def test_new_results_files_reach_the_tables(tmp_path, monkeypatch):
    """A benchmark rerun today may add files (a GPU run, a new quality run) and fields: each new file
    gets a table without a change to the script, and a method the script does not know a column."""
    tables = load_tables()
    results = tmp_path / "results"
    results.mkdir()
    for path in (ROOT / "benchmarks" / "results").glob("*.json"):
        (results / path.name).write_text(path.read_text())
    step = json.loads((results / "train_step.json").read_text())
    step["device"], step["machine"]["cuda"] = "cuda", "NVIDIA H100"
    step["command"] = "python benchmarks/train_step.py --device cuda --out benchmarks/results/train_step_cuda.json"
    for r in step["results"]:
        r["ms_per_step"]["pyrovae_captured_cuda-graph"] = 0.5
        r["round_ratio_to_fused"]["pyrovae_captured_cuda-graph"] = 1.2
    (results / "train_step_cuda.json").write_text(json.dumps(step))
    speed = json.loads((results / "evaluate_speed.json").read_text())
    del speed["khat"], speed["memory"]
    speed["flop_limit"] = {"points_per_s": 99.0}
    (results / "evaluate_speed_cuda.json").write_text(json.dumps(speed))
    quality = json.loads((results / "quality_15min_elu_iwae5.json").read_text())
    quality["results"][0]["summary"]["log_px"] = [-80.0, 0.2]
    quality["command"] = "python benchmarks/quality.py --configs iwae5 --epochs 10 --output-bias zero"
    quality["settings"].update(minutes=None, epochs=10, output_bias="zero")
    (results / "quality_15min_today.json").write_text(json.dumps(quality))
    screen = json.loads((results / "quality_15min_elu_iwae5.json").read_text())
    screen["benchmark"] = "quality"
    (results / "screen_named_otherwise.json").write_text(json.dumps(screen))  # found by its "benchmark"
    layers = json.loads((results / "quality_15min_elu_iwae5.json").read_text())
    layers["results"][0].update(config="two-layer-warmup", paper="a paper", active_units={"z1": 15, "z2": 100})
    layers["results"][0]["summary"]["kl"] = {"z1": {"value": [17.62, 0.1]}, "z2": {"value": [8.69, 0.2]}}
    layers["published"] = {"a paper": -85.33}
    (results / "quality_15min_elu_1t_two_layers.json").write_text(json.dumps(layers))
    monkeypatch.setattr(tables, "RESULTS", results)

    out = {path.name: text for path, text in tables.render().items()}
    components = out["quality_15min_elu_1t.md"]  # each site's KL and active units, and the paper's number, per row
    assert "| z1 17.6 (15), z2 8.7 (100) | −85.33: a paper |" in components
    assert "train_step_cuda.json" in out["train_step.md"] and "`--capture cuda-graph`" in out["train_step.md"]
    assert "NVIDIA H100" in out["train_step.md"] and "0.50 (1.20×)" in out["train_step.md"]
    assert f"`{step['command']}`" in out["train_step.md"]  # the command the file recorded, where it records one
    assert "evaluate_speed_cuda.json" in out["evaluate_speed.md"] and "| 99.0 |" in out["evaluate_speed.md"]
    other = out["quality_other.md"]
    assert "quality_15min_today.json" in other and "**−80.00 ± 0.20**" in other and f"`{quality['command']}`" in other
    assert "--epochs 10 --output-bias zero" in other and "screen_named_otherwise.json" in other
    headline = tables.headline()
    assert "−80.00 ± 0.20 nats" in headline and "after 10 epochs" in headline  # the best number, wherever its file is
    assert "Every quality results file" in tables.quality_other({p.name for p in results.glob("*.json")})[0]


def test_every_module_is_in_the_api_reference():
    """A module no page names is documented by the API index's {pyrovae-other-modules}."""
    sys.path.insert(0, str(DOCS / "_ext"))
    try:
        import pyrovae_docs
    finally:
        sys.path.remove(str(DOCS / "_ext"))
    modules = pyrovae_docs.all_modules()
    assert {"pyrovae.evaluate", "pyrovae.models.priors", "pyrovae.guides.gaussian", "pyrovae.cli.train"} <= set(modules)
    assert "{pyrovae-other-modules}" in (DOCS / "api" / "index.md").read_text(encoding="utf-8")


@pytest.mark.slow
def test_the_docs_build_with_warnings_as_errors(tmp_path):
    out = tmp_path / "html"
    done = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-E", "-q", "-b", "html", str(DOCS), str(out),
         "-d", str(tmp_path / "doctrees")],
        check=False, capture_output=True, text=True, timeout=900, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-5000:]
    tutorial = (out / "tutorial.html").read_text(encoding="utf-8")
    assert "Student-t" in tutorial and "main([" in tutorial  # the notebook, rendered as stored
    api = "".join(p.read_text(encoding="utf-8") for p in (out / "api").glob("*.html"))
    for name in ("pyrovae.train.fit", "pyrovae.train.TrainConfig", "pyrovae.evaluate.evaluate", "pyrovae.evaluate.Evaluation",
                 "pyrovae.evidence.log_weights", "pyrovae.estimators.log_px", "pyrovae.ais.ais", "pyrovae.ais.bdmc",
                 "pyrovae.compare.compare", "pyrovae.registry.Registry", "pyrovae.registry.Registry.register",
                 "pyrovae.run.Run.load_model", "pyrovae.train.TrainConfig.beta", "pyrovae.evaluate.Evaluation.khat",
                 "pyrovae.ais.AISSettings.num_steps"):
        assert f'id="{name}"' in api, f"{name} is not in the API reference"
    cli = (out / "cli.html").read_text(encoding="utf-8")
    assert "--checkpoint-every" in cli and "--ais-steps" in cli  # the parsers' own help
    performance = (out / "performance.html").read_text(encoding="utf-8")
    assert "benchmarks/results/train_step.json" in performance


def test_docstring_bars_are_escaped_outside_literal_blocks_only():
    """``|x|`` in prose would be a substitution; in a ``::`` block, or a block shown as written, it is text."""
    sys.path.insert(0, str(DOCS / "_ext"))
    try:
        import pyrovae_docs
    finally:
        sys.path.remove(str(DOCS / "_ext"))
    lines = ["The weights |w| are::", "", "    log p(x | z) − log q(z | x)", "", "and |x| again."]
    pyrovae_docs.guard_docstring(None, "function", "f", None, {}, lines)
    assert "    log p(x | z) − log q(z | x)" in lines
    assert "The weights \\|w\\| are::" in lines and "and \\|x\\| again." in lines
    unparsable = ["* a list item", "  with a bad | indent", " which docutils warns about"]
    pyrovae_docs.guard_docstring(None, "function", "g", None, {}, unparsable)
    assert unparsable[0] == "::" and not any("\\|" in line for line in unparsable), unparsable


def test_every_command_is_in_the_command_line_reference():
    """A new subcommand of ``pyrovae`` must get its ``{pyrovae-help}`` block on the CLI page."""
    import argparse

    from pyrovae.cli.main import parser

    commands = {name for action in parser()._actions if isinstance(action, argparse._SubParsersAction) for name in action.choices}
    assert {"train", "evaluate", "compare"} <= commands
    shown = set(re.findall(r"^```\{pyrovae-help\} (\S+)", (DOCS / "cli.md").read_text(encoding="utf-8"), re.MULTILINE))
    assert commands == shown, f"commands without a reference: {sorted(commands - shown)}; unknown: {sorted(shown - commands)}"


def test_every_built_in_component_is_on_the_components_page():
    """A prior, likelihood, guide or model registered today is listed on the page the reader checks."""
    from pyrovae.guides import GUIDES
    from pyrovae.models import LIKELIHOODS, MODELS, PRIORS

    page = (DOCS / "components.md").read_text(encoding="utf-8")
    for registry in (PRIORS, LIKELIHOODS, GUIDES, MODELS):
        missing = [name for name in registry.names() if f"`{name}`" not in page]
        assert not missing, f"docs/components.md does not name the {registry.kind}s {missing}"


def test_the_evaluation_table_does_not_call_a_small_khat_reliable():
    """The printed table, like the evaluating page, says what k̂ ≤ 0.7 does not show, and where to turn."""
    import torch

    from pyrovae.evaluate import evaluate
    from pyrovae.guides import LinearGaussianGuide
    from pyrovae.models import PPCA

    torch.manual_seed(0)
    model = PPCA(6, 2, noise_scale=0.3)
    x = model.marginal().sample((3,)).detach()
    table = evaluate(model.model, LinearGaussianGuide(6, {"z": 2}), x, num_samples=50, iwae_ks=(1,), particles_elbo=5).table()
    caveat = next(line for line in table.splitlines() if "k̂ ≤ 0.7" in line)
    assert "does not make it reliable" in caveat and "--ais" in caveat
    assert "k̂ ≤ 0.7" in (DOCS / "evaluating.md").read_text(encoding="utf-8")
