"""Helpers shared by the benchmark scripts: machine description and JSON output."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

import pyro
import torch


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "date": datetime.date.today().isoformat(),
    }


def _relative(value, root: Path):
    """Absolute paths inside the checkout's parent folder written relative to ``root``, the
    checkout, so that a result names no folder of the machine that measured it."""
    if isinstance(value, dict):
        return {k: _relative(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [_relative(v, root) for v in value]
    if isinstance(value, str) and os.path.isabs(value) and Path(value).is_relative_to(root.parent):
        return os.path.relpath(value, root)
    return value


def write_json(result: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    result = _relative(result, Path(__file__).resolve().parents[1])
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
