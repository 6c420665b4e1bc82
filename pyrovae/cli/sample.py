"""``pyrovae sample RUN``: draw z ~ p(z), decode, save a grid."""

from __future__ import annotations

from pathlib import Path

from pyrovae.pictures import save_samples

from .common import add_run_argument, at_least, open_images


def add_parser(sub) -> None:
    p = sub.add_parser("sample", help="draw from the prior through the decoder", description=__doc__)
    add_run_argument(p)
    p.add_argument("-n", "--num", type=int, default=64, help="number of samples (default: 64)")
    p.add_argument("--out", type=Path, help="PNG file to write (default: RUN/samples.png)")
    p.set_defaults(run=run)


def run(args) -> int:
    at_least(args.num, 1, "-n")
    _, module, device, data, path = open_images(args, "samples", "samples.png")
    save_samples(module, data.test[:1].to(device), data.image_shape, path, args.num)
    print(f"wrote {path}")
    return 0
