"""``pyrovae sample RUN``: draw z ~ p(z), decode, save a grid."""

from __future__ import annotations

from pathlib import Path

from pyrovae.generate import sample_prior
from pyrovae.plots import save_grid

from .common import add_run_argument, at_least, open_run, output_path, require_images


def add_parser(sub) -> None:
    p = sub.add_parser("sample", help="draw from the prior through the decoder", description=__doc__)
    add_run_argument(p)
    p.add_argument("-n", "--num", type=int, default=64, help="number of samples (default: 64)")
    p.add_argument("--out", type=Path, help="PNG file to write (default: RUN/samples.png)")
    p.set_defaults(run=run)


def run(args) -> int:
    at_least(args.num, 1, "-n")
    run_, module, device = open_run(args)
    data = run_.dataset()
    require_images(data, "samples")
    path = output_path(args, run_, "samples.png")
    save_grid(sample_prior(module.model, data.test[:1].to(device), args.num), data.image_shape, path)
    print(f"wrote {path}")
    return 0
