"""Every script in examples/ runs."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.py"))


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(script):
    done = subprocess.run([sys.executable, str(script), "--epochs", "2"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "epoch 2" in done.stdout and "log p(x)" in done.stdout


def test_there_are_examples():
    assert EXAMPLES


MODEL_FILES = {
    "student_t_prior.py:student_t_vae": "KL(q‖p) at z, analytic: no closed form",
    "gaussian_likelihood.py:gaussian_vae": "KL(q‖p) at z, analytic ",
    "laplace_guide.py:laplace_vae": "KL(q‖p) at z, analytic ",  # torch has KL(Laplace ‖ Normal)
}


@pytest.mark.slow
@pytest.mark.parametrize("factory, kl_row", MODEL_FILES.items(), ids=list(MODEL_FILES))
def test_example_model_files_train_sample_and_evaluate(factory, kl_row, tmp_path, capsys):
    from pyrovae.cli.main import main

    model = f"{Path(__file__).resolve().parents[1] / 'examples' / 'models' / factory}"
    run = str(tmp_path / "run")
    assert main(["train", "--model", model, "--epochs", "2", "--out", run, "--no-progress"]) == 0
    assert main(["sample", run]) == 0
    capsys.readouterr()
    assert main(["evaluate", run, "-k", "50", "--limit", "10", "--particles-elbo", "10", "--no-progress"]) == 0
    assert kl_row in capsys.readouterr().out
