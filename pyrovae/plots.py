"""Pictures: image grids (torchvision) and the loss curve (matplotlib)."""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.utils import save_image


def save_grid(images: torch.Tensor, image_shape: tuple[int, int, int] | None, path: str | Path, nrow: int = 8) -> None:
    """Save rows of flattened images (n, P) as one PNG grid; plain vectors are drawn as 1-pixel-high strips."""
    shape = image_shape or (1, 1, images.shape[-1])
    save_image(images.detach().float().cpu().reshape(-1, *shape), str(path), nrow=nrow, padding=1, pad_value=0.5)


def save_loss_curve(history: list[dict], path: str | Path) -> None:
    """ELBO per data point against epoch, train and test."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key, label in (("train_elbo", "train"), ("test_elbo", "test")):
        points = [(m["epoch"], m[key]) for m in history if m.get(key) is not None]
        if points:
            ax.plot(*zip(*points), marker=".", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("ELBO per data point (nats)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
