"""The README's Python runs as written, and the files it quotes are quoted verbatim."""

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)


@pytest.mark.parametrize("path", ["examples/svi_vae.py", "examples/models/student_t_prior.py"])
def test_the_readme_quotes_the_file_verbatim(path):
    assert (ROOT / path).read_text() in BLOCKS


@pytest.mark.slow
def test_every_python_block_of_the_readme_runs_in_order(monkeypatch, capsys):
    """One namespace, blocks in order, as a reader pastes them; --epochs 2 for the SVI script."""
    assert len(BLOCKS) >= 3
    monkeypatch.setattr(sys, "argv", ["svi_vae.py", "--epochs", "2"])
    namespace = {"__name__": "readme"}
    for block in BLOCKS:
        exec(compile(block, "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert "epoch 2: train ELBO" in out and "log p(x), importance sampled (K=1000)" in out
    log_px, stderr = namespace["result"].log_px.mean()
    assert -80 < log_px < 0 and 0 < stderr < 5
