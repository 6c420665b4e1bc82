"""Pictures: image grids (torchvision), the loss curve and the per-point inference gaps (matplotlib)."""

from __future__ import annotations

import math
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


def gap_order(approximation: torch.Tensor, amortization: torch.Tensor) -> torch.Tensor:
    """The points' order in the gaps picture, (N,) indices: by the total gap approximation +
    amortization, smallest first (ties in their original order)."""
    return (approximation + amortization).argsort(stable=True)


def save_gaps_plot(gaps, path: str | Path, gap=None, surgery=None, title: str = "") -> None:
    """:func:`gaps_figure` saved as a PNG."""
    import matplotlib.pyplot as plt

    fig = gaps_figure(gaps, gap, surgery, title)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def gaps_figure(gaps, gap=None, surgery=None, title: str = ""):
    """The inference gaps of N points (a :class:`pyrovae.gaps.Gaps`), one bar per point in
    :func:`gap_order`: the approximation gap log p(x) − ELBO[q*] from 0, the amortization gap
    ELBO[q*] − ELBO[q] stacked on it (drawn downward where its estimate is negative), so that a
    bar's top is the point's total gap. ``gap``: the evaluation's own estimate of the total (an
    :class:`~pyrovae.estimators.Estimate`), drawn as dots. ``surgery`` (a
    :class:`pyrovae.gaps.Surgery`): in a second panel, per latent site, the KL term split into
    I_q(x; z) and KL(q(z) ‖ p(z)). Returns the matplotlib figure (Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites = surgery.summary()["sites"] if surgery is not None else {}
    fig, axes = plt.subplots(1, 2 if sites else 1, figsize=(12 if sites else 8, 4), squeeze=False,
                             gridspec_kw={"width_ratios": [3, 1]} if sites else None)
    ax = axes[0, 0]
    approximation, amortization = gaps.approximation.value.double(), gaps.amortization.value.double()
    order = gap_order(approximation, amortization)
    positions = range(len(order))
    width = 1.0 if len(order) > 60 else 0.8
    a, m = approximation[order].numpy(), amortization[order].numpy()
    ax.bar(positions, a, width=width, color="tab:blue", label=f"approximation gap (mean {a.mean():.2f})")
    ax.bar(positions, m, width=width, bottom=a, color="tab:orange", label=f"amortization gap (mean {m.mean():.2f})")
    if gap is not None:
        ax.plot(positions, gap.value.double()[order].numpy(), ".", color="black", ms=3,
                label="gap log p(x) − ELBO, evaluated with q as proposal")
    ax.axhline(0.0, color="black", lw=0.6)
    ax.set_xlabel("data points, sorted by their total gap")
    ax.set_ylabel("nats")
    ax.set_title(title or "why the bound is loose, per point", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    if sites:
        ax = axes[0, 1]
        names = list(sites)
        information = [s["mutual_information"][0] for s in sites.values()]
        marginal = [math.nan if s["marginal_kl"] is None else s["marginal_kl"][0] for s in sites.values()]
        ax.bar(names, information, color="tab:green", label="I_q(x; z)")
        ax.bar(names, [0.0 if math.isnan(v) else v for v in marginal], bottom=information, color="tab:gray",
               label="KL(q(z) ‖ p(z))")
        ax.axhline(surgery.max_mutual_information, color="black", ls="--", lw=0.8, label="log N")
        ax.set_ylabel("nats per point")
        ax.set_title("KL term, ELBO surgery", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
