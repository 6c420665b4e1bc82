"""A normal (non-editable) install carries ``models/`` and ``guides/`` as ``pyrovae.models`` and ``pyrovae.guides``."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_models_and_guides_under_pyrovae(tmp_path):
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", str(ROOT), "-w", str(tmp_path / "wheel")], check=True)
    wheel = next((tmp_path / "wheel").glob("pyrovae-*.whl"))
    target = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True)
    assert not (target / "models").exists() and not (target / "guides").exists()  # nothing generic at the top level
    code = "import pyrovae.models as m, pyrovae.guides as g; print(m.__file__); print(g.__file__); m.build_vae(m.VAEConfig(4))"
    env = {**os.environ, "PYTHONPATH": str(target)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, check=True)
    for line in done.stdout.split():
        assert Path(line).is_relative_to(target), line  # imported from the installed wheel, not the checkout
