"""Minibatches of a data set held in memory, binarized as a Bernoulli likelihood needs.

:class:`Batches` serves an (N, P) float tensor in shuffled minibatches; "static" binarization draws
x_bin ~ Bernoulli(x) once, "dynamic" draws afresh every time a batch is served.
:class:`LabelledBatches` serves a data set of which some rows carry class labels, for a model
written as ``model(x, y=None)``: unlabelled batches as tensors, labelled ones as :class:`Labelled`
pairs. Where data sets come from (files, downloads, held-out splits) is :mod:`pyrovae.sources`.

References:
    Burda, Grosse & Salakhutdinov (2016), Importance Weighted Autoencoders
    (the dynamically binarized MNIST protocol).
    Kingma, Rezende, Mohamed & Welling (2014), Semi-Supervised Learning with Deep Generative
    Models (labelled and unlabelled minibatches).
"""

from __future__ import annotations

import hashlib

import torch

from pyrovae.errors import DataError
from pyrovae.sources import Dataset, load_dataset, substream_seed, with_validation  # noqa: F401  (Dataset, load_dataset, with_validation: importable from here too)

BINARIZATIONS = ("none", "static", "dynamic")


def binarize(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One Bernoulli draw per value, x_bin ~ Bernoulli(x); same shape, dtype and device as x.

    x: values in [0, 1]; generator, if given, lives on x's device.
    """
    return torch.bernoulli(x, generator=generator)


def static_binarized(x: torch.Tensor, seed: int) -> torch.Tensor:
    """x binarized once with a CPU generator seeded by ``seed``: the same draw on every device.

    x: (N, P) in [0, 1]; returns (N, P) of 0s and 1s on x's device.
    """
    generator = torch.Generator().manual_seed(seed)
    return binarize(x.detach().cpu(), generator).to(x.device)


def check_binary(x: torch.Tensor, what: str = "data") -> None:
    """Raise DataError unless every value of x is 0 or 1."""
    bad = (x != 0) & (x != 1)
    n_bad = int(bad.sum())
    if n_bad:
        example = x[bad][0].item()
        raise DataError(
            f"{what} has {n_bad} values that are neither 0 nor 1 (e.g. {example:g}): "
            "the Bernoulli likelihood needs binary data: use --binarize static or dynamic, "
            "or --likelihood continuous-bernoulli"
        )


def check_binarizable(x: torch.Tensor, binarization: str) -> None:
    """Raise DataError if x is to be binarized but has values outside [0, 1]."""
    if binarization != "none" and not ((x >= 0) & (x <= 1)).all():
        raise DataError(
            f"{binarization} binarization needs values in [0, 1], got min {x.min().item():g}, "
            f"max {x.max().item():g}: rescale the data (e.g. divide 0..255 pixels by 255)"
        )


class Batches:
    """Minibatches served from a tensor held in memory (no DataLoader).

    ``for idx, xb in batches`` runs one epoch: idx (B,) long row indices into x
    and xb (B, P) = x[idx], both on ``device``; the last batch is smaller
    unless ``drop_last``. Binarization: "none" serves x as is; "static" serves
    ``static_binarized(x, seed)``, drawn once here; "dynamic" serves a fresh
    Bernoulli draw of each batch every time it is served. With ``shuffle``,
    each epoch takes a new permutation from a generator seeded by ``seed``;
    ``state_dict``/``load_state_dict`` save and restore the random state and
    the position in the epoch, so a resumed run sees the same batches.
    """

    def __init__(
        self,
        x: torch.Tensor,
        batch_size: int,
        binarization: str = "none",
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        device: str | torch.device | None = None,
    ):
        if binarization not in BINARIZATIONS:
            raise DataError(f"unknown binarization {binarization!r}: choose one of {', '.join(BINARIZATIONS)}")
        if not isinstance(x, torch.Tensor) or x.ndim != 2 or not x.is_floating_point():
            what = f"shape {tuple(x.shape)}, dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise DataError(f"data to batch must be a float tensor of shape (N, P), got {what}")
        n = x.shape[0]
        if x.numel() == 0:
            raise DataError(f"no data to batch: x has shape {tuple(x.shape)}")
        if batch_size > n:
            raise DataError(f"batch size {batch_size} is larger than the {n} training points: choose at most {n}")
        if batch_size < 1:
            raise DataError(f"batch size {batch_size} is not positive: choose between 1 and the {n} training points")
        check_binarizable(x, binarization)
        if binarization == "static":
            x = static_binarized(x, seed)
        device = x.device if device is None else torch.device(device)
        self.x = x.to(device)  # (N, P), moved once: batches are gathered on the device
        self.batch_size = batch_size
        self.binarization = binarization
        self.shuffle = shuffle
        self.drop_last = drop_last
        self._seed = seed
        self._order_rng = torch.Generator().manual_seed(seed)
        self._draw_rng = None
        if binarization == "dynamic":  # its own stream, independent of the shuffling
            self._draw_rng = torch.Generator(device=device).manual_seed(substream_seed(seed))
        self._order = None  # (N,) this epoch's row order, on device
        self._next = 0  # index of the next batch in this epoch
        self._resume = False  # True after load_state_dict saved mid-epoch

    def __len__(self) -> int:
        """Batches per epoch."""
        n, b = self.x.shape[0], self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def __iter__(self):
        n, b = self.x.shape[0], self.batch_size
        if not self._resume:
            order = torch.randperm(n, generator=self._order_rng) if self.shuffle else torch.arange(n)
            self._order, self._next = order.to(self.x.device), 0
        self._resume = False
        order = self._order
        for i in range(self._next, len(self)):
            idx = order[i * b : (i + 1) * b]  # (B,)
            xb = self.x[idx]  # (B, P)
            if self._draw_rng is not None:
                xb = binarize(xb, self._draw_rng)
            self._next = i + 1
            yield idx, xb

    def peek(self, n: int = 8) -> torch.Tensor:
        """The first n rows as a batch would serve them (binarized, if so, by a generator of its own),
        without touching the epoch's order or the random streams: for checks before training."""
        x = self.x[:n]
        if self._draw_rng is not None:
            x = binarize(x.cpu(), torch.Generator().manual_seed(substream_seed(self._seed, key=3))).to(x.device)
        return x

    def state_dict(self) -> dict:
        """Random states and position in the epoch, as tensors and ints (fit for ``torch.save``)."""
        mid_epoch = self._order is not None and self._next < len(self)
        return {
            "n": self.x.shape[0],
            "batch_size": self.batch_size,
            "order_rng": self._order_rng.get_state(),
            "draw_rng": None if self._draw_rng is None else self._draw_rng.get_state(),
            "order": self._order.cpu() if mid_epoch else None,
            "next": self._next if mid_epoch else 0,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``: the next epoch (or the rest of a saved one) is served as it would have been."""
        if (state["n"], state["batch_size"]) != (self.x.shape[0], self.batch_size):
            raise DataError(
                f"batch state saved for {state['n']} points in batches of {state['batch_size']} cannot resume "
                f"{self.x.shape[0]} points in batches of {self.batch_size}: use the same data and batch size"
            )
        # a generator's state is a CPU byte tensor, whatever device the checkpoint was loaded onto
        self._order_rng.set_state(state["order_rng"].cpu())
        if self._draw_rng is not None and state["draw_rng"] is not None:
            draw_state = state["draw_rng"].cpu()
            if draw_state.numel() == self._draw_rng.get_state().numel():
                self._draw_rng.set_state(draw_state)
            else:  # saved by a generator of another device type (CPU ↔ CUDA): continue on a stream derived from it
                seed = int.from_bytes(hashlib.sha256(draw_state.numpy().tobytes()).digest()[:8], "little")
                self._draw_rng.manual_seed(seed)
        self._resume = state["order"] is not None
        self._order = None if state["order"] is None else state["order"].to(self.x.device)
        self._next = state["next"]




class Labelled:
    """A minibatch whose rows carry class labels: x (B, P) and y (B,) long.

    The training loss calls ``model(x, y)`` and ``guide(x, y)`` on it (:class:`pyrovae.objectives.Loss`),
    where an unlabelled batch, a plain tensor, gives ``model(x)`` and ``guide(x)``. Unhashable, so
    that nothing keys a cache on it by identity.
    """

    __slots__ = ("x", "y")
    __hash__ = None

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        if y.shape != x.shape[:1]:
            raise DataError(f"labels of shape {tuple(y.shape)} for {x.shape[0]} rows: give one label per row")
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __repr__(self) -> str:
        return f"Labelled(x={tuple(self.x.shape)}, y={tuple(self.y.shape)})"


class LabelledBatches:
    """Minibatches of a data set of which the rows ``labelled`` carry labels, the others not.

    Each epoch serves the unlabelled rows once in shuffled batches of ``batch_size``, ``(idx, x)``,
    each followed by a batch of ``labelled_batch_size`` (default: ``min(batch_size, L)``) labelled
    rows, ``(idx, Labelled(x, y))``, drawn in turn from the L labelled rows, reshuffled each time they
    have all been served: labelled and unlabelled batches alternate, as in Kingma et al. (2014), however
    few the labels. With every row labelled, every batch is labelled (a conditional model trained on
    labels alone). ``idx`` are row indices into ``x``; binarization, shuffling, devices and
    ``state_dict``/``load_state_dict`` are as :class:`Batches`' (the two streams have seeds of their own).
    """

    def __init__(
        self,
        x: torch.Tensor,
        labels: torch.Tensor,
        labelled: torch.Tensor,
        batch_size: int,
        binarization: str = "none",
        shuffle: bool = True,
        seed: int = 0,
        device: str | torch.device | None = None,
        labelled_batch_size: int | None = None,
    ):
        n = x.shape[0]
        if labels is None or labels.shape != (n,):
            raise DataError(f"labels must have one entry per row, shape ({n},), got "
                            f"{None if labels is None else tuple(labels.shape)}")
        labelled = torch.as_tensor(labelled, dtype=torch.long).unique()
        if labelled.numel() == 0:
            raise DataError("no labelled rows: give at least one, or train without labels")
        if labelled.min() < 0 or labelled.max() >= n:
            raise DataError(f"labelled row indices must lie in [0, {n}), got {labelled.min().item()}..{labelled.max().item()}")
        mask = torch.zeros(n, dtype=torch.bool)
        mask[labelled] = True
        unlabelled = (~mask).nonzero().squeeze(1)
        L = labelled.numel()
        labelled_batch_size = min(batch_size, L) if labelled_batch_size is None else labelled_batch_size
        self.rows = {"labelled": labelled, "unlabelled": unlabelled}
        self.labelled = Batches(x[labelled], labelled_batch_size, binarization, shuffle, substream_seed(seed, key=4) % 2**63,
                                device=device)
        self.unlabelled = None
        if unlabelled.numel():
            self.unlabelled = Batches(x[unlabelled], min(batch_size, unlabelled.numel()), binarization, shuffle, seed, device=device)
        self.labels = labels[labelled].to(self.labelled.x.device)  # (L,)
        self._labelled_batches = None  # the labelled stream's current epoch, resumed across epochs of this one
        self._owed = False  # an unlabelled batch was served and its labelled batch not yet

    def __len__(self) -> int:
        """Steps per epoch."""
        return len(self.labelled) if self.unlabelled is None else 2 * len(self.unlabelled)

    def _next_labelled(self):
        for _ in range(2):  # a finished stream starts its next epoch once
            if self._labelled_batches is None:
                self._labelled_batches = iter(self.labelled)
            try:
                idx, xb = next(self._labelled_batches)
            except StopIteration:
                self._labelled_batches = None
                continue
            return self.rows["labelled"].to(idx.device)[idx], Labelled(xb, self.labels[idx])
        raise AssertionError("the labelled rows served no batch")

    def __iter__(self):
        if self.unlabelled is None:
            for _ in range(len(self.labelled)):
                yield self._next_labelled()
            return
        if self._owed:
            self._owed = False
            yield self._next_labelled()
        rows = self.rows["unlabelled"]
        for idx, xb in self.unlabelled:
            self._owed = True
            yield rows.to(idx.device)[idx], xb
            self._owed = False
            yield self._next_labelled()

    def peek(self, n: int = 8) -> torch.Tensor:
        """The first n unlabelled rows as a batch would serve them (the labelled ones where all are)."""
        return (self.labelled if self.unlabelled is None else self.unlabelled).peek(n)

    def state_dict(self) -> dict:
        return {"labelled": self.labelled.state_dict(), "owed": self._owed,
                "unlabelled": None if self.unlabelled is None else self.unlabelled.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.labelled.load_state_dict(state["labelled"])
        if self.unlabelled is not None:
            self.unlabelled.load_state_dict(state["unlabelled"])
        self._labelled_batches = None
        self._owed = state["owed"]
