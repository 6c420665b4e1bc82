"""The pictures of a trained model: prior samples, reconstructions, interpolations, as image grids."""

from __future__ import annotations

from pathlib import Path

import torch

from .generate import interpolate, reconstruct, sample_prior
from .plots import save_grid


def save_samples(module, like: torch.Tensor, image_shape, path: str | Path, n: int = 64) -> None:
    """n draws z ~ p(z), decoded (the mean of p(x | z)), as one grid; ``like`` (·, P) gives P, dtype and device."""
    save_grid(sample_prior(module.model, like[:1], n), image_shape, path)


def save_reconstructions(module, x: torch.Tensor, image_shape, path: str | Path, nrow: int = 8) -> None:
    """Rows of originals, each followed by a row of their reconstructions through the posterior mean."""
    recon = reconstruct(module.model, module.guide, x)
    rows = [t for i in range(0, len(x), nrow) for t in (x[i : i + nrow], recon[i : i + nrow])]
    save_grid(torch.cat(rows), image_shape, path, nrow=nrow)


def save_interpolations(module, x: torch.Tensor, image_shape, path: str | Path, pairs: int = 8, steps: int = 10) -> None:
    """One row per pair (x[2i], x[2i+1]): the decoded straight line between their posterior means."""
    pairs = min(pairs, len(x) // 2)
    rows = [interpolate(module.model, module.guide, x[2 * i], x[2 * i + 1], steps) for i in range(pairs)]
    save_grid(torch.cat(rows), image_shape, path, nrow=steps)


def save_run_pictures(module, x: torch.Tensor, image_shape, folder: Path) -> None:
    """samples.png, reconstructions.png and interpolations.png of held-out images ``x`` in ``folder``."""
    save_samples(module, x, image_shape, folder / "samples.png")
    save_reconstructions(module, x[:32], image_shape, folder / "reconstructions.png")
    save_interpolations(module, x, image_shape, folder / "interpolations.png")
