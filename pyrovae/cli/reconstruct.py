"""``pyrovae reconstruct RUN``: images beside their reconstructions through the posterior mean."""

from __future__ import annotations

from pathlib import Path

from pyrovae.pictures import save_reconstructions

from .common import add_run_argument, at_least, open_images


def add_parser(sub) -> None:
    p = sub.add_parser("reconstruct", help="reconstruct held-out images", description=__doc__)
    add_run_argument(p)
    p.add_argument("-n", "--num", type=int, default=32, help="number of images (default: 32)")
    p.add_argument("--split", default="test", choices=("train", "test"), help="which split (default: test)")
    p.add_argument("--out", type=Path, help="PNG file to write (default: RUN/reconstructions.png)")
    p.set_defaults(run=run)


def run(args) -> int:
    at_least(args.num, 1, "-n")
    run_, module, device, data, path = open_images(args, "reconstructions", "reconstructions.png")
    x = run_.eval_split(data, args.split)[: args.num].to(device)
    save_reconstructions(module, x, data.image_shape, path)
    print(f"wrote {path}")
    return 0
