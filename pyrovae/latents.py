"""What the latent space is used for: active units, KL per latent dimension, encodings, traversals.

A VAE often leaves latent dimensions unused: q(z_u | x) ≈ p(z_u) whatever x, so the encoder's mean
of z_u does not move with x and the KL of that coordinate is ≈ 0 ("posterior collapse"). Two
measures per dimension u, over data points x_1 … x_N:

- activity A_u = Cov_x(E_q[z_u | x]), the variance over points of the posterior mean; u is
  *active* when A_u > 0.01 (Burda, Grosse & Salakhutdinov 2016, §5.2);
- KL_u = (1/N) Σ_n KL(q(z_u | x_n) ‖ p(z_u)), which sums over u to the site's KL term of the ELBO
  where q and p factorize over coordinates (diagonal Normal guide, Normal prior).

Every latent site's event dimensions are flattened, so "dimension u" of a site with event shape
(C, H, W) is its u-th coordinate in row-major order. Only the model/guide contract is used.

References:
    Burda, Grosse & Salakhutdinov (2016), *Importance Weighted Autoencoders*, §5.2 (active units).
    Higgins et al. (2017), *β-VAE* (latent traversals).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch
from pyro import poutine
from torch.distributions import Independent, Normal

from .errors import PyrovaeError
from .evidence import log_weights
from .kl import closed_form, drawn_after
from .traces import guide_means, means, particle_traces, sample_sites

ACTIVITY_THRESHOLD = 0.01
"""A_u above this: dimension u is active (Burda et al. 2016)."""


@torch.no_grad()
def latent_means(guide: Callable, x: torch.Tensor, batch_size: int = 1024) -> dict[str, torch.Tensor]:
    """E_q[z_s | x] at each latent site s, event dims flattened: x (N, P) → {site: (N, D_s)} float64.

    The mean of q at each site, later sites given the means of earlier ones (as reconstructions
    use them); a draw where q has no closed-form mean (a flow). Discrete sites (a class label) have
    no dimensions to be active or to traverse and are left out.
    """
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(x), batch_size):
        xb = x[start:start + batch_size]
        for site, z in guide_means(guide, xb, continuous_only=True).items():
            parts.setdefault(site, []).append(z.reshape(len(xb), -1).double().cpu())
    return {site: torch.cat(zs) for site, zs in parts.items()}


@torch.no_grad()
def kl_per_site(model: Callable, guide: Callable, x: torch.Tensor, batch_size: int = 1024) -> dict[str, float]:
    """KL_s = (1/N) Σ_n KL(q(z_s | x_n) ‖ p(z_s | ·)) per latent site s, nats per data point.

    The closed form where it is the site's KL term (:func:`pyrovae.kl.site_kl`), else the one-draw
    Monte Carlo estimate log q(z_s | ·) − log p(z_s | ·) at z ~ q; each is averaged over the N
    points of x (N, P). A site whose KL stays ≈ 0 is unused by the model: posterior collapse.
    """
    if len(x) == 0:
        raise PyrovaeError("no data points")
    totals: dict[str, float] = {}
    for start in range(0, len(x), batch_size):
        terms = log_weights(model, guide, x[start:start + batch_size], 1)
        for site in terms.latent_sites:
            kl = terms.kl_analytic.get(site)
            if kl is None:
                kl = terms.log_q[site] - terms.log_prior[site]
            totals[site] = totals.get(site, 0.0) + kl.double().sum().item()
    return {site: total / len(x) for site, total in totals.items()}


def active_units(means: torch.Tensor, threshold: float = ACTIVITY_THRESHOLD) -> tuple[torch.Tensor, torch.Tensor]:
    """A_u = Cov_x(E_q[z_u | x]) = 1/(N−1) Σ_n (μ_nu − μ̄_u)², and A_u > threshold (Burda et al. 2016).

    means: (N, D) posterior means of N points → activity (D,) float64, active (D,) bool.
    """
    if means.dim() != 2:
        raise PyrovaeError(f"posterior means must have shape (points, dimensions), got {tuple(means.shape)}")
    if means.shape[0] < 2:
        raise PyrovaeError(f"the activity of a latent dimension is a variance over points: it needs at least 2 points, got {means.shape[0]}")
    activity = means.double().var(0)
    return activity, activity > threshold


def _coordinatewise_normal(fn) -> Normal | None:
    """The Normal under any number of ``Independent`` wrappers, or None."""
    while isinstance(fn, Independent):
        fn = fn.base_dist
    return fn if isinstance(fn, Normal) else None


@torch.no_grad()
def kl_per_dimension(model: Callable, guide: Callable, x: torch.Tensor, num_particles: int = 10,
                     batch_size: int = 1024) -> dict[str, torch.Tensor | None]:
    """KL_u = (1/N) Σ_n KL(q(z_u | x_n) ‖ p(z_u | parents)) per coordinate u of each latent site, nats.

    x (N, P) → {site: (D_s,) float64, or None}. Analytic (``torch.distributions.kl_divergence`` of
    two univariate Normals) where the guide's and the prior's distributions at the site are both
    ``Normal``s made ``Independent`` over the same event shape; None where they are not (a
    full-covariance guide, a mixture, Student-t or flow prior: the KL does not split by coordinate,
    or has no closed form), and where the closed form is not the site's KL term (its prior may depend
    on a latent the guide draws after it, :func:`pyrovae.kl.drawn_after`). For a site whose prior
    depends on latents drawn before it, the KL is averaged over ``num_particles`` draws of those
    from the guide; without such parents it is exact.
    The coordinates of a site sum to the site's analytic KL of :func:`pyrovae.estimators.kl`.
    """
    if num_particles < 1:
        raise PyrovaeError(f"the number of particles must be at least 1, got {num_particles}")
    if len(x) == 0:
        raise PyrovaeError("no data points")
    totals: dict[str, torch.Tensor | None] = {}
    for start in range(0, len(x), batch_size):
        xb = x[start:start + batch_size]
        guide_trace, model_trace = particle_traces(model, guide, xb, num_particles)
        for name, site in sample_sites(model_trace):
            if site["is_observed"] or (name in totals and totals[name] is None):
                continue
            q_fn, p_fn = guide_trace.nodes[name]["fn"], site["fn"]
            q, p = _coordinatewise_normal(q_fn), _coordinatewise_normal(p_fn)
            if q is None or p is None or q_fn.event_shape != p_fn.event_shape or drawn_after(name, model_trace, guide_trace):
                totals[name] = None
                continue
            kl = closed_form(q, p).expand(num_particles, len(xb), *q_fn.event_shape)  # (K, B, *event)
            part = kl.reshape(num_particles * len(xb), -1).double().sum(0).cpu()  # (D,)
            totals[name] = part if name not in totals else totals[name] + part
    return {name: None if total is None else total / (num_particles * len(x)) for name, total in totals.items()}


def principal_components(z: torch.Tensor, k: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of the centred rows of z (N, D) on their first k principal axes (N, k), and the share
    of the variance each axis explains (k,). Each axis is signed so that its largest loading is positive."""
    z = z.double()
    centred = z - z.mean(0)
    _, s, vt = torch.linalg.svd(centred, full_matrices=False)
    axes = vt[:k]  # (k, D)
    signs = torch.sign(axes.gather(1, axes.abs().argmax(1, keepdim=True)))
    axes = axes * signs
    variance = s**2
    return centred @ axes.T, variance[:k] / variance.sum().clamp(min=torch.finfo(z.dtype).tiny)


def _latent_order(model: Callable, placeholder: torch.Tensor) -> list[tuple[str, torch.Size]]:
    """The model's latent sites in sampling order, with their event shapes."""
    trace = poutine.trace(model).get_trace(placeholder)
    return [(name, site["fn"].event_shape) for name, site in sample_sites(trace) if not site["is_observed"]]


def _decoded_mean(model: Callable, placeholder: torch.Tensor, latents: dict[str, torch.Tensor]) -> torch.Tensor:
    """The mean of the observed site with the given latent values; the other latent sites at
    their prior means given those."""
    trace = poutine.trace(means()(poutine.condition(model, data=latents))).get_trace(placeholder)
    observed = [site for _, site in sample_sites(trace) if site["is_observed"] and site["name"] not in latents]
    return observed[0]["fn"].mean.expand(placeholder.shape)


@torch.no_grad()
def traverse(model: Callable, like: torch.Tensor, dims: list[tuple[str, int]], values: torch.Tensor) -> torch.Tensor:
    """Decode a line along each latent coordinate: (len(dims), S, P) for S ``values``.

    For (site, u) in ``dims``: z_u at each value, the other coordinates of the site at 0, every
    latent site sampled before it at 0, and those after it at their prior means given these
    (for one N(0, I) latent site: the line through z = 0 along axis u). The picture is the mean of
    the observed site. ``like`` (·, P) gives P, dtype and device.
    """
    S = len(values)
    placeholder = like.new_zeros(S, like.shape[-1])
    order = _latent_order(model, placeholder)
    values = values.to(like)
    rows = []
    for target, u in dims:
        latents = {}
        for name, shape in order:
            z = placeholder.new_zeros(S, math.prod(shape))
            if name == target:
                z[:, u] = values
            latents[name] = z.reshape(S, *shape)
            if name == target:
                break
        else:
            raise PyrovaeError(f"the model has no latent site {target!r}")
        rows.append(_decoded_mean(model, placeholder, latents))
    return torch.stack(rows) if rows else placeholder.new_zeros(0, S, like.shape[-1])


def dimension_names(sizes: dict[str, int]) -> list[str]:
    """``site[u]`` for every coordinate of every site, in order."""
    return [f"{site}[{u}]" for site, d in sizes.items() for u in range(d)]


# ---------------------------------------------------------------- pictures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_latents_plot(means: torch.Tensor, labels: torch.Tensor | None, path: str | Path,
                      traversal: torch.Tensor | None = None, image_shape: tuple[int, int, int] | None = None,
                      traversal_names: list[str] | None = None, values: torch.Tensor | None = None,
                      axis_names: list[str] | None = None, note: str = "") -> None:
    """The encodings of N points (N, D) in 2-D — the coordinates themselves for D ≤ 2, the first two
    principal components for D > 2 — coloured by label where given; beside them, when given, the
    traversal (R, S, P) as a grid of images, one row per latent coordinate."""
    plt = _pyplot()
    images = traversal is not None and image_shape is not None and traversal.shape[0] > 0
    fig, axes = plt.subplots(1, 2 if images else 1, figsize=(11 if images else 5.5, 5), squeeze=False)
    ax = axes[0, 0]
    D = means.shape[1]
    if D > 2:
        xy, share = principal_components(means)
        xlabel, ylabel = (f"principal component {i + 1} ({share[i]:.0%} of the variance)" for i in range(2))
        title = f"posterior means, first two principal components of D = {D}"
    else:
        names = axis_names or [f"z[{u}]" for u in range(D)]
        xy = means.double() if D == 2 else torch.cat([means.double(), torch.zeros_like(means.double())], 1)
        xlabel, ylabel = names[0], (names[1] if D == 2 else "")
        title = "posterior means"
    if labels is not None:
        points = ax.scatter(xy[:, 0], xy[:, 1], c=labels.numpy(), cmap="tab10", s=6, alpha=0.8)
        classes = sorted(set(labels.tolist()))
        if len(classes) <= 20:
            handles = [plt.Line2D([], [], marker="o", ls="", color=points.cmap(points.norm(c)), label=str(c)) for c in classes]
            ax.legend(handles=handles, title="label", fontsize=7, title_fontsize=8, loc="best", markerscale=0.8)
    else:
        ax.scatter(xy[:, 0], xy[:, 1], s=6, alpha=0.6)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.set_title(title, fontsize=10)
    if images:
        from torchvision.utils import make_grid

        R, S, _ = traversal.shape
        C, H, W = image_shape
        grid = make_grid(traversal.detach().float().cpu().reshape(R * S, C, H, W), nrow=S, padding=1, pad_value=0.5)
        ax = axes[0, 1]
        ax.imshow(grid.permute(1, 2, 0).numpy() if C == 3 else grid[0].numpy(), cmap=None if C == 3 else "gray",
                  vmin=0, vmax=1)
        ax.set_yticks([1 + (H + 1) * r + H / 2 for r in range(R)], traversal_names or [str(r) for r in range(R)], fontsize=8)
        if values is not None:
            ax.set_xticks([1 + (W + 1) * s + W / 2 for s in range(S)], [f"{v:g}" for v in values.tolist()], fontsize=7)
        ax.set_title("traversals of active dimensions (others at 0)", fontsize=10)
    if note:
        fig.text(0.01, 0.01, note, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_activity_plot(activity: torch.Tensor, kl: torch.Tensor | None, names: list[str], path: str | Path,
                       threshold: float = ACTIVITY_THRESHOLD) -> None:
    """Bars per latent coordinate: the activity A_u (log scale, the threshold dashed) and the KL_u
    in nats (D,), nan at the coordinates of a site where it is not available."""
    plt = _pyplot()
    D = len(names)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6.0, 0.25 * D + 2), 6), sharex=True)
    positions = range(D)
    active = (activity > threshold).tolist()
    colors = ["tab:blue" if a else "tab:gray" for a in active]
    top.bar(positions, activity.clamp(min=1e-12).tolist(), color=colors)
    top.set_yscale("log")
    top.axhline(threshold, color="black", ls="--", lw=0.8, label=f"threshold {threshold:g}")
    top.set_ylabel("activity Cov_x E_q[z_u | x]", fontsize=9)
    top.set_title(f"active units: {sum(active)} of {D}", fontsize=10)
    top.legend(fontsize=8)
    if kl is not None and not kl.isnan().all():
        bottom.bar(positions, kl.tolist(), color=colors)  # nan (not available at a site): no bar
    else:
        bottom.text(0.5, 0.5, "KL per dimension not available: q and p do not factorize over coordinates",
                    ha="center", va="center", transform=bottom.transAxes, fontsize=9)
    bottom.set_ylabel("KL(q(z_u|x) ‖ p(z_u)), nats", fontsize=9)
    bottom.set_xticks(list(positions), names, rotation=90, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
