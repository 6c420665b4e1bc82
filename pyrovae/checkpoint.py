"""Atomic checkpoints: a file is either the old one or the complete new one, never half written."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from .errors import PyrovaeError


def save_atomic(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename it over ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: str | os.PathLike, map_location=None) -> dict:
    path = Path(path)
    if not path.is_file():
        raise PyrovaeError(f"no checkpoint at {path}: train first (pyrovae train) or point at a run folder that has one")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a corrupt or foreign file
        raise PyrovaeError(f"cannot read checkpoint {path}: {e}") from None
