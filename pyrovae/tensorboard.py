"""Training curves for TensorBoard (``pip install pyrovae[tensorboard]``, ``pyrovae train --tensorboard``).

Per epoch: the ELBO on train, validation and test data; KL(q ‖ p) and the active units per latent
site (``fit``'s metrics, where posterior collapse shows as a curve at 0); the ELBO's terms on the validation (or test)
points — reconstruction E_q log p(x|z) and KL(q ‖ p) per latent site, Monte Carlo over a few
draws; the mean gradient norm; the learning rate; and the sample and reconstruction grids.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.utils import make_grid

from . import estimators
from .context import fast_context
from .errors import PyrovaeError
from .evidence import log_weights
from .generate import reconstruct, sample_prior

TERMS_POINTS, TERMS_DRAWS = 256, 10  # points and draws per point for the ELBO's terms each epoch


class Curves:
    """A ``torch.utils.tensorboard.SummaryWriter`` in ``folder``, fed once per epoch."""

    def __init__(self, folder: str | Path, image_shape: tuple[int, int, int] | None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise PyrovaeError("--tensorboard needs the tensorboard package: pip install 'pyrovae[tensorboard]'") from None
        self.writer = SummaryWriter(str(folder))
        self.image_shape = image_shape

    def epoch(self, metrics: dict, model, x: torch.Tensor) -> None:
        """Write an epoch's metrics (``fit``'s dict) and the terms and pictures on held-out x (N, P)."""
        step = metrics["epoch"]
        for key in ("train_elbo", "valid_elbo", "test_elbo"):
            if metrics.get(key) is not None:
                self.writer.add_scalar(f"elbo/{key.split('_')[0]}", metrics[key], step)
        for key in ("lr", "grad_norm", "skipped"):
            if metrics.get(key) is not None:
                self.writer.add_scalar(f"train/{key}", metrics[key], step)
        for site, value in metrics.get("kl", {}).items():  # posterior collapse shows as a curve at 0
            self.writer.add_scalar(f"kl/{site}", value, step)
        for site, value in metrics.get("active_units", {}).items():
            self.writer.add_scalar(f"active_units/{site}", value, step)
        points = x[:TERMS_POINTS]
        with torch.no_grad(), fast_context():
            terms = log_weights(model.model, model.guide, points, TERMS_DRAWS)
            self.writer.add_scalar("terms/reconstruction", estimators.reconstruction(terms).value.mean().item(), step)
            for site, kl in estimators.kl(terms).items():
                self.writer.add_scalar(f"terms/kl_{site}", kl.best.value.mean().item(), step)
            if self.image_shape is not None:
                shape = (-1, *self.image_shape)
                samples = sample_prior(model.model, points[:1], 64).float().cpu().reshape(shape)
                recon = reconstruct(model.model, model.guide, points[:32]).float().cpu().reshape(shape)
                pairs = torch.stack([points[:32].float().cpu().reshape(shape), recon], 1).flatten(0, 1)
                self.writer.add_image("samples", make_grid(samples, nrow=8, pad_value=0.5), step)
                self.writer.add_image("reconstructions", make_grid(pairs, nrow=8, pad_value=0.5), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
