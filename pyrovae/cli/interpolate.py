"""``pyrovae interpolate RUN``: decode straight lines between the posterior means of pairs of images."""

from __future__ import annotations

from pathlib import Path

from pyrovae.pictures import save_interpolations

from .common import add_run_argument, at_least, open_images


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
    run_, module, device, data, path = open_images(args, "interpolations", "interpolations.png")
    save_interpolations(module, run_.eval_split(data).to(device), data.image_shape, path, args.pairs, args.steps)
    print(f"wrote {path}")
    return 0
