"""A run folder: everything one training run leaves behind, and how to pick it up again.

    RUN/config.json        model (factory and arguments), data (source, held-out split, binarization)
                           and training settings: enough to rebuild everything
    RUN/model.py           a copy of the user's model file, when the model came from one
    RUN/metrics.jsonl      one line per epoch: train_elbo, test_elbo (nats per point), seconds; the
                           line of epoch 0 is the untrained model (its train_elbo is null)
    RUN/checkpoint.pt      parameters (every one the ELBO trains), optimizer state, batch order and
                           random states, epoch (written atomically; an epoch-0 one before training)
    RUN/best.pt            the same, at the epoch with the best validation ELBO so far
    RUN/samples.png, reconstructions.png, interpolations.png, loss.png

The held-out split is made once, when the run starts (``data.split_seed``, ``data.test_fraction``),
and every command that reads the run uses that split; ``data.heldout_sha256`` lets them check that
the held-out data have not changed since.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import checkpoint, factory, params as parameters
from .data import Dataset, load_dataset, static_binarized, with_validation
from .errors import PyrovaeError

CONFIG, METRICS, CHECKPOINT, BEST, MODEL_FILE = "config.json", "metrics.jsonl", "checkpoint.pt", "best.pt", "model.py"
REQUIRED = {"model": (), "data": ("dataset", "binarize"), "train": ("epochs", "batch_size", "lr")}
LEGACY_SPLIT_NOTE = ("note: {path} was written before splits were recorded: it trained on the seed-0 split "
                     "whatever its seed, and is evaluated on that split")


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA where present), checked against this machine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise PyrovaeError(f"unknown device {name!r}: use cpu, cuda, cuda:N or auto") from None
    if device.type not in ("cpu", "cuda"):
        raise PyrovaeError(f"unsupported device {name!r}: use cpu, cuda, cuda:N or auto")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PyrovaeError(f"device {name!r} asked for, but CUDA is not available on this machine: use --device cpu")
    return device


def heldout_sha256(x: torch.Tensor) -> str:
    """A fingerprint of held-out data (N, P), to tell whether two runs are evaluated on the same points."""
    return hashlib.sha256(x.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file so that it is either the old or the new content, created as
    :func:`pyrovae.checkpoint.save_atomic` creates its files (0666 less the umask)."""
    fd, tmp = checkpoint.create_temporary(path)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@dataclass
class Run:
    path: Path
    config: dict  # {"model": {...}, "data": {...}, "train": {...}}
    notes: list[str] = field(default_factory=list)  # one-line remarks for the user (the CLI prints them)
    replaces: Path | None = None  # with --overwrite: the old folder, replaced once this run has a checkpoint
    _data: Dataset | None = field(default=None, repr=False)

    @classmethod
    def create(cls, path: str | Path, config: dict, overwrite: bool = False) -> "Run":
        """A new run folder. With ``overwrite``, an existing run folder is kept until :meth:`commit`
        (after the new run's first trained checkpoint); the new run is written beside it until then."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise PyrovaeError(f"`out` {path} is a file, not a folder: choose another `out`")
        if path.exists() and any(path.iterdir()):
            if not overwrite:
                raise PyrovaeError(f"run folder {path} already exists: pass `resume` to continue it or `overwrite` to replace it")
            if not (path / CONFIG).is_file():
                raise PyrovaeError(f"refusing to overwrite {path}: it is not empty and not a run folder (no {CONFIG})")
            staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.new-"))
            os.chmod(staging, 0o777 & ~_umask())
            run = cls(staging, config, replaces=path)
        else:
            path.mkdir(parents=True, exist_ok=True)
            run = cls(path, config)
        run.save_config()
        return run

    def commit(self) -> None:
        """Put this run in the place of the folder it replaces (no-op if it replaces none)."""
        if self.replaces is None:
            return
        old = Path(tempfile.mkdtemp(dir=self.replaces.parent, prefix=f".{self.replaces.name}.old-"))
        os.replace(self.replaces, old / "run")
        os.replace(self.path, self.replaces)
        shutil.rmtree(old)
        self.path, self.replaces = self.replaces, None

    def discard(self) -> None:
        """Remove a new run that never got to replace the old one (the old one stays)."""
        if self.replaces is not None:
            shutil.rmtree(self.path, ignore_errors=True)

    @classmethod
    def open(cls, path: str | Path) -> "Run":
        """The run folder at ``path``, as ``pyrovae train`` wrote it (its ``config.json`` read and
        checked); a :class:`~pyrovae.errors.PyrovaeError` names what is wrong with one that is not."""
        path = Path(path)
        if not (path / CONFIG).is_file():
            raise PyrovaeError(f"{path} is not a run folder (no {CONFIG}): give the folder that pyrovae train wrote")
        try:
            config = json.loads((path / CONFIG).read_text())
            missing = [f"{section}.{key}" for section, keys in REQUIRED.items() for key in keys if key not in config[section]]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise PyrovaeError(f"{path / CONFIG} is corrupt ({type(e).__name__}: {e}): it cannot be read as a run's config") from None
        if missing:
            raise PyrovaeError(f"{path / CONFIG} is corrupt (missing {', '.join(missing)}): it cannot be read as a run's config")
        return cls(path, config)

    def save_config(self) -> None:
        write_text_atomic(self.path / CONFIG, json.dumps(self.config, indent=2) + "\n")

    # metrics
    def copy_model_file(self, original: str | Path) -> None:
        """Keep a copy of the user's model file in the run folder (RUN/model.py)."""
        shutil.copyfile(original, self.path / MODEL_FILE)

    def append_metrics(self, metrics: dict) -> None:
        with open(self.path / METRICS, "a") as f:
            f.write(json.dumps(metrics) + "\n")

    def metrics(self) -> list[dict]:
        file = self.path / METRICS
        return [json.loads(line) for line in file.read_text().splitlines() if line.strip()] if file.exists() else []

    def truncate_metrics(self, epoch: int) -> None:
        """Drop metric lines after ``epoch`` (written after the last checkpoint of an interrupted run)."""
        kept = [m for m in self.metrics() if m["epoch"] <= epoch]
        write_text_atomic(self.path / METRICS, "".join(json.dumps(m) + "\n" for m in kept))

    # checkpoints
    def save_checkpoint(self, model, params: dict, optimizer: torch.optim.Optimizer, batches, epoch: int,
                        progress: dict | None = None, extra: dict | None = None, name: str = CHECKPOINT) -> None:
        """Everything a resumed run needs to continue as if never stopped: ``epoch`` epochs done, and
        with ``progress`` (:class:`pyrovae.train.Progress` as a dict) the steps done in the next one;
        ``extra``: more state (the learning-rate schedule, the validation monitor)."""
        state = {
            "format": CHECKPOINT_FORMAT,
            "epoch": epoch,
            "progress": progress,
            **parameters.state_dict(model, params),
            "optimizer": optimizer.state_dict(),
            "batches": batches.state_dict(),
            **random_states(),
            **(extra or {}),
            "config": self.config,
        }
        checkpoint.save_atomic(state, self.path / name)

    def load_checkpoint(self, name: str = CHECKPOINT) -> dict:
        """The checkpoint (``checkpoint.pt``, or ``best.pt``), every tensor on the CPU (loading copies
        them to the model's device)."""
        return checkpoint.load(self.path / name, map_location="cpu")

    # data
    @property
    def split_seed(self) -> int:
        return self.config["data"].get("split_seed", 0)

    def dataset(self) -> Dataset:
        """The run's data set, split as it was when the run started (loaded once)."""
        if self._data is None:
            self._data = self._load_dataset()
        return self._data

    def _load_dataset(self) -> Dataset:
        d = self.config["data"]
        if "split_seed" not in d:
            note = LEGACY_SPLIT_NOTE.format(path=self.path)
            if note not in self.notes:
                self.notes.append(note)
        data = load_dataset(d["dataset"], d.get("data_dir"), download=d.get("download", False),
                            test_fraction=d.get("test_fraction", 0.2), seed=self.split_seed)
        data = with_validation(data, d.get("validation_fraction", 0), self.split_seed)
        recorded = d.get("heldout_sha256")
        if recorded is not None and recorded != heldout_sha256(data.test):
            raise PyrovaeError(
                f"the held-out data of {d['dataset']} are not those {self.path} was trained beside (their "
                "SHA-256 differs from the one in its config.json): the data file or split has changed"
            )
        return data

    def eval_split(self, data: Dataset, split: str = "test") -> torch.Tensor:
        """The split as the model is evaluated on it: binarized once with the run's seed if it trained on binary data."""
        if split not in ("train", "test", "valid"):
            raise PyrovaeError(f"unknown split {split!r}: use train, valid or test")
        x = getattr(data, split)
        if x is None:
            raise PyrovaeError(f"{self.path} has no validation split: it was trained with --validation-fraction 0")
        d = self.config["data"]
        if d["binarize"] != "none":
            x = static_binarized(x, d.get("seed", 0) + {"train": 0, "test": 1, "valid": 2}[split])
        return x

    # model
    def factory_reference(self) -> str:
        """The factory to rebuild the model from: the recorded copy of a model file, if any."""
        m = self.config["model"]
        if "factory" not in m:  # written before model factories: the built-in VAE
            return factory.BUILTIN
        if m.get("file"):
            copy = self.path / m["file"]["copy"]
            if not copy.is_file() and not (self.path / CONFIG).is_file():  # a new run, not yet written
                return m["factory"]
            original = Path(m["file"]["original"])
            if original.is_file() and factory.sha256(original) != m["file"]["sha256"]:
                self.notes.append(f"note: {original} has changed since training; using the copy recorded in {copy}")
            return f"{copy}:{factory.split_reference(m['factory'])[1]}"
        return m["factory"]

    def model_args(self) -> dict:
        m = self.config["model"]
        if "factory" not in m:
            return {k: v for k, v in m.items() if k not in ("name", "data_dim")}
        return dict(m.get("args", {}))

    def build_model(self, data: Dataset, device: torch.device | str = "cpu"):
        """The untrained model, rebuilt from the recorded factory and arguments, on ``device``."""
        ref = self.factory_reference()
        m = self.config["model"]
        image_shape = m.get("image_shape", data.image_shape) if "factory" in m else data.image_shape
        obj = factory.build(factory.load(ref), ref, m.get("data_dim", data.dim), image_shape, self.model_args())
        return obj.to(device) if hasattr(obj, "to") else obj

    def load_model(self, device: torch.device | str = "cpu", which: str = "last"):
        """(data, trained model, its parameters): rebuilt, its parameters found as SVI finds them, and
        loaded from the checkpoint.

        The model is rebuilt from the factory and arguments recorded in the run folder, on ``device``;
        its parameters are found the way ``SVI`` finds them (:func:`pyrovae.params.trainable`, a trace
        of the param sites on a few points) and loaded from the checkpoint, which
        ``torch.load(weights_only=True)`` reads (:mod:`pyrovae.checkpoint`)::

            from pyrovae.run import Run
            run = Run.open("runs/digits")
            data, model, params = run.load_model()
            x = run.eval_split(data)[:10]            # (N, P), as evaluation sees the test split
            model.model(x); model.guide(x)           # the trained pair

        Args:
            device: where the model is put (``"cpu"``, ``"cuda"``, a ``torch.device``).
            which: ``"last"`` (the checkpoint training ended at) or ``"best"`` (the epoch with the
                best validation ELBO).

        Returns:
            ``(data, model, params)``: the run's data set split as it was in training
            (:class:`pyrovae.sources.Dataset`; its test split not yet binarized, see :meth:`eval_split`),
            the model (``model.model`` and ``model.guide``), and the trained parameters, name →
            unconstrained tensor.

        Raises:
            PyrovaeError: an unknown ``which``, or a checkpoint that is missing or does not fit the model.
        """
        data = self.dataset()
        model = self.build_model(data, device)
        example = self.eval_split(data)[:8].to(device)
        trained = parameters.trainable(model.model, model.guide, example)
        if which not in ("last", "best"):
            raise PyrovaeError(f"unknown checkpoint {which!r}: use last or best")
        state = self.load_checkpoint(CHECKPOINT if which == "last" else BEST)
        load_state(model, trained, state)
        return data, model, trained


def random_states() -> dict:
    """Every random generator's state, as tensors and ints (fit for ``torch.load(weights_only=True)``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy_rng": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "python_rng": {"version": version, "internal": list(internal), "gauss": gauss},
    }


def set_random_states(state: dict) -> None:
    """Restore :func:`random_states` (those saved; a CUDA state only where this machine has the GPUs)."""
    torch.set_rng_state(state["torch_rng"].cpu())
    cuda = state.get("cuda_rng") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
    if "numpy_rng" in state:
        n = state["numpy_rng"]
        np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "python_rng" in state:
        p = state["python_rng"]
        random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))


CHECKPOINT_FORMAT = 2


def load_state(model, trained: dict, state: dict) -> None:
    """Load a checkpoint's parameters into the model (format 2, or the earlier ``model`` state dict)."""
    if state.get("format", 1) > CHECKPOINT_FORMAT:
        raise PyrovaeError(f"the checkpoint has format {state['format']}, newer than this pyrovae reads "
                           f"({CHECKPOINT_FORMAT}): upgrade pyrovae")
    if "model" in state and "format" not in state:
        model.load_state_dict(state["model"])
    else:
        parameters.load_state_dict(model, trained, state)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask
