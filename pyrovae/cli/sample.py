"""``pyrovae sample RUN``: draw z ~ p(z), decode, save a grid."""

from __future__ import annotations

from pathlib import Path

from pyrovae.errors import PyrovaeError
from pyrovae.generate import sample_per_class
from pyrovae.pictures import save_samples
from pyrovae.plots import save_grid

from .common import add_run_argument, at_least, open_images


def add_parser(sub) -> None:
    p = sub.add_parser("sample", help="draw from the prior through the decoder", description=__doc__)
    add_run_argument(p)
    p.add_argument("-n", "--num", type=int, help="number of samples (default: 64; with --per-class, 10 per class)")
    p.add_argument("--out", type=Path, help="PNG file to write (default: RUN/samples.png)")
    p.add_argument("--per-class", action="store_true", help="a model of labelled data, model(x, y): one row of -n "
                   "samples for each class")
    p.set_defaults(run=run)


def run(args) -> int:
    if args.num is not None:
        at_least(args.num, 1, "-n")
    _, module, device, data, path = open_images(args, "samples", "samples.png")
    if args.per_class:
        if data.num_classes is None:
            raise PyrovaeError("--per-class needs a data set with labels")
        n = 10 if args.num is None else args.num
        save_grid(sample_per_class(module.model, data.test[:1].to(device), n, data.num_classes), data.image_shape, path, nrow=n)
    else:
        save_samples(module, data.test[:1].to(device), data.image_shape, path, 64 if args.num is None else args.num)
    print(f"wrote {path}")
    return 0
