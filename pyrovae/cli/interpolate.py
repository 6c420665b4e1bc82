"""``pyrovae interpolate RUN``: decode straight lines between the posterior means of pairs of images."""

from __future__ import annotations

from pathlib import Path

import torch

from pyrovae.generate import interpolate
from pyrovae.plots import save_grid

from .common import add_run_argument, at_least, open_run, output_path, require_images


def add_parser(sub) -> None:
    p = sub.add_parser("interpolate", help="interpolate between held-out images in latent space", description=__doc__)
    add_run_argument(p)
    p.add_argument("--pairs", type=int, default=8, help="number of image pairs, one row each (default: 8)")
    p.add_argument("--steps", type=int, default=10, help="images per row, ends included (default: 10)")
    p.add_argument("--out", type=Path, help="PNG file to write (default: RUN/interpolations.png)")
    p.set_defaults(run=run)


def run(args) -> int:
    at_least(args.pairs, 1, "--pairs")
    at_least(args.steps, 2, "--steps")
    run_, module, device = open_run(args)
    data = run_.dataset()
    require_images(data, "interpolations")
    path = output_path(args, run_, "interpolations.png")
    save_interpolations(module, run_.eval_split(data).to(device), data.image_shape, path, args.pairs, args.steps)
    print(f"wrote {path}")
    return 0


def save_interpolations(module, x, image_shape, path, pairs: int = 8, steps: int = 10) -> None:
    pairs = min(pairs, len(x) // 2)
    rows = [interpolate(module.model, module.guide, x[2 * i], x[2 * i + 1], steps) for i in range(pairs)]
    save_grid(torch.cat(rows), image_shape, path, nrow=steps)
