"""``pyrovae reconstruct RUN``: images beside their reconstructions through the posterior mean."""

from __future__ import annotations

from pathlib import Path

import torch

from pyrovae.generate import reconstruct
from pyrovae.plots import save_grid

from .common import add_run_argument, at_least, open_run, output_path, require_images


def add_parser(sub) -> None:
    p = sub.add_parser("reconstruct", help="reconstruct held-out images", description=__doc__)
    add_run_argument(p)
    p.add_argument("-n", "--num", type=int, default=32, help="number of images (default: 32)")
    p.add_argument("--split", default="test", choices=("train", "test"), help="which split (default: test)")
    p.add_argument("--out", type=Path, help="PNG file to write (default: RUN/reconstructions.png)")
    p.set_defaults(run=run)


def run(args) -> int:
    at_least(args.num, 1, "-n")
    run_, module, device = open_run(args)
    data = run_.dataset()
    require_images(data, "reconstructions")
    x = run_.eval_split(data, args.split)[: args.num].to(device)
    path = output_path(args, run_, "reconstructions.png")
    save_reconstructions(module, x, data.image_shape, path)
    print(f"wrote {path}")
    return 0


def save_reconstructions(module, x, image_shape, path, nrow: int = 8) -> None:
    """Rows of originals, each followed by a row of their reconstructions."""
    recon = reconstruct(module.model, module.guide, x)
    rows = [t for i in range(0, len(x), nrow) for t in (x[i : i + nrow], recon[i : i + nrow])]
    save_grid(torch.cat(rows), image_shape, path, nrow=nrow)
