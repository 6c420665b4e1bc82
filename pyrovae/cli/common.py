"""Options and steps shared by several commands."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

from pyrovae import params as parameters
from pyrovae.data import Dataset
from pyrovae.errors import PyrovaeError
from pyrovae.run import Run, resolve_device


FLAGS = {"num_particles": "--particles", "num_samples": "-k"}  # engine parameters whose option is not --name-with-dashes


def in_flags(message: str) -> str:
    """An engine message in the command line's words: each `parameter` becomes its option."""
    return re.sub(r"`(\w+)`", lambda m: FLAGS.get(m.group(1), "--" + m.group(1).replace("_", "-")), message)


def open_images(args, what: str, default_name: str):
    """(run, model, device, data, output path) for a command that draws ``what`` of an image data set."""
    run, module, device = open_run(args)
    data = run.dataset()
    require_images(data, what)
    return run, module, device, data, output_path(args, run, default_name)


def add_run_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN", type=Path, help="a run folder written by pyrovae train")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--checkpoint", choices=("last", "best"), default="last",
                   help="the last checkpoint, or best.pt: the epoch with the best validation ELBO (default: %(default)s)")


def open_run(args) -> tuple[Run, object, torch.device]:
    """The run, its trained model in eval mode, and the device; ``run.dataset()`` is the data split
    as in training."""
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    run = Run.open(args.run_dir)
    parameters.clear()
    _, model, _ = run.load_model(device, args.checkpoint)
    for note in run.notes:
        print(note, file=sys.stderr)
    if hasattr(model, "eval"):
        model.eval()
    return run, model, device


def require_images(data: Dataset, what: str) -> None:
    if data.image_shape is None:
        raise PyrovaeError(f"cannot draw {what}: the data set's points are vectors, not images")


def at_least(value: int, minimum: int, option: str) -> None:
    if value < minimum:
        raise PyrovaeError(f"{option} must be at least {minimum}, got {value}")


def writable_file(path: Path | None, option: str) -> None:
    """Refuse, before any work, an output file whose folder does not exist."""
    if path is not None and not Path(path).parent.is_dir():
        raise PyrovaeError(f"{option} {path}: the folder {Path(path).parent} does not exist")


def output_path(args, run: Run, default: str) -> Path:
    writable_file(args.out, "--out")
    return args.out if args.out is not None else run.path / default
