"""A run folder: everything one training run leaves behind, and how to pick it up again.

    RUN/config.json        model, data and training settings (enough to rebuild everything)
    RUN/metrics.jsonl      one line per epoch: train_elbo, test_elbo (nats per point), seconds
    RUN/checkpoint.pt      parameters, optimizer state, batch order state, epoch (written atomically)
    RUN/samples.png, reconstructions.png, interpolations.png, loss.png
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import checkpoint
from .data import Dataset, check_binary, load_dataset, static_binarized
from .errors import PyrovaeError

CONFIG, METRICS, CHECKPOINT = "config.json", "metrics.jsonl", "checkpoint.pt"


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N``, checked against what this machine has."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise PyrovaeError(f"unknown device {name!r}: use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise PyrovaeError(f"unsupported device {name!r}: use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PyrovaeError(f"device {name!r} asked for, but CUDA is not available on this machine: use --device cpu")
    return device


@dataclass
class Run:
    path: Path
    config: dict  # {"model": {...}, "data": {...}, "train": {...}}

    @classmethod
    def create(cls, path: str | Path, config: dict, overwrite: bool = False) -> "Run":
        path = Path(path)
        if path.exists() and any(path.iterdir()):
            if not overwrite:
                raise PyrovaeError(f"run folder {path} already exists: pass --resume to continue it or --overwrite to replace it")
            if not (path / CONFIG).is_file():
                raise PyrovaeError(f"refusing to overwrite {path}: it is not empty and not a run folder (no {CONFIG})")
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        run = cls(path, config)
        run.save_config()
        return run

    @classmethod
    def open(cls, path: str | Path) -> "Run":
        path = Path(path)
        if not (path / CONFIG).is_file():
            raise PyrovaeError(f"{path} is not a run folder (no {CONFIG}): give the folder that pyrovae train wrote")
        return cls(path, json.loads((path / CONFIG).read_text()))

    def save_config(self) -> None:
        (self.path / CONFIG).write_text(json.dumps(self.config, indent=2) + "\n")

    # metrics
    def append_metrics(self, metrics: dict) -> None:
        with open(self.path / METRICS, "a") as f:
            f.write(json.dumps(metrics) + "\n")

    def metrics(self) -> list[dict]:
        file = self.path / METRICS
        return [json.loads(line) for line in file.read_text().splitlines() if line.strip()] if file.exists() else []

    # checkpoints
    def save_checkpoint(self, module: nn.Module, optimizer: torch.optim.Optimizer, batches, epoch: int) -> None:
        state = {
            "epoch": epoch,
            "model": module.state_dict(),
            "optimizer": optimizer.state_dict(),
            "batches": batches.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "config": self.config,
        }
        checkpoint.save_atomic(state, self.path / CHECKPOINT)

    def load_checkpoint(self, device: torch.device | str = "cpu") -> dict:
        return checkpoint.load(self.path / CHECKPOINT, map_location=device)

    def truncate_metrics(self, epoch: int) -> None:
        """Drop metric lines after ``epoch`` (written after the last checkpoint of an interrupted run)."""
        kept = [m for m in self.metrics() if m["epoch"] <= epoch]
        (self.path / METRICS).write_text("".join(json.dumps(m) + "\n" for m in kept))

    # data and model
    def dataset(self) -> Dataset:
        d = self.config["data"]
        return load_dataset(d["dataset"], d.get("data_dir"), download=d.get("download", False), seed=d.get("seed", 0))

    def eval_split(self, data: Dataset, split: str = "test") -> torch.Tensor:
        """The split as the model is evaluated on it: binarized once with the run's seed if it trained on binary data."""
        if split not in ("train", "test"):
            raise PyrovaeError(f"unknown split {split!r}: use train or test")
        x = getattr(data, split)
        d = self.config["data"]
        if d["binarize"] != "none":
            x = static_binarized(x, d.get("seed", 0) + (1 if split == "test" else 0))
        return x

    def build_model(self, device: torch.device | str = "cpu", load: bool = True) -> nn.Module:
        from pyrovae.models import build_model  # the CLI's side of the registry; the engine stays generic

        module = build_model(self.config["model"])
        if load:
            module.load_state_dict(self.load_checkpoint(device)["model"])
        return module.to(device)


def check_likelihood_data(module: nn.Module, x: torch.Tensor, binarize: str) -> None:
    """A likelihood that needs binary data (``binary_data = True``) gets binary data."""
    likelihood = getattr(module, "likelihood", None)
    if getattr(likelihood, "binary_data", False) and binarize == "none":
        check_binary(x, "training data")
