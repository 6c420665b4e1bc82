"""Options and steps shared by several commands."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from pyrovae.run import Run, resolve_device


def add_run_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN", type=Path, help="a run folder written by pyrovae train")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")


def open_run(args) -> tuple[Run, torch.nn.Module, torch.device]:
    """The run, its trained model in eval mode, and the device."""
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    run = Run.open(args.run_dir)
    module = run.build_model(device).eval()
    return run, module, device


def output_path(args, run: Run, default: str) -> Path:
    return args.out if args.out is not None else run.path / default
