"""Where data sets come from: known data sets by name, a user's NumPy files, held-out splits.

:func:`load_dataset` returns a :class:`Dataset` for a known name ("digits", "mnist",
"fashion-mnist") or for a user's ``.npz``/``.npy`` file, with class labels where the source has
them; :func:`with_validation` carves a validation split out of its training rows. Serving a data set
in minibatches, and binarizing it, is :mod:`pyrovae.data`'s business.

References:
    LeCun, Cortes & Burges, The MNIST database (the IDX file format).
    Xiao, Rasul & Vollgraf (2017), Fashion-MNIST.
"""

from __future__ import annotations

import gzip
import math
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pyrovae.errors import DataError

DATASETS = ("digits", "mnist", "fashion-mnist")  # or a path to a .npz/.npy file

_IDX_FILES = {  # role: file name, each also read as name.gz
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_TORCHVISION_FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}


@dataclass
class Dataset:
    """A data set as flattened float32 tensors (pictures with values in [0, 1]).

    train: (N, P); test: (M, P); image_shape: (C, H, W) with C*H*W = P for
    pictures, None for plain vectors; train_labels (N,) and test_labels (M,):
    long class labels, or None where the data set has none; valid (V, P) and
    valid_labels: rows carved out of the training set for validation
    (:func:`with_validation`), or None.
    """

    name: str
    train: torch.Tensor
    test: torch.Tensor
    image_shape: tuple[int, int, int] | None
    train_labels: torch.Tensor | None = None
    test_labels: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    valid_labels: torch.Tensor | None = None

    @property
    def dim(self) -> int:
        """P, the number of values per data point."""
        return self.train.shape[1]

    @property
    def num_classes(self) -> int | None:
        """C, one more than the largest label of any split; None without labels."""
        parts = [y for y in (self.train_labels, self.test_labels, self.valid_labels) if y is not None and len(y)]
        return int(max(y.max() for y in parts)) + 1 if parts else None


def load_dataset(
    name: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> Dataset:
    """Load a data set by name, or from a ``.npz``/``.npy`` path.

    "digits": scikit-learn's 1797 8x8 digits, split at random (``test_fraction``,
    deterministic for ``seed``). "mnist", "fashion-mnist": the four IDX files
    (gzip or not) in ``data_dir`` or ``data_dir/MNIST/raw`` (``FashionMNIST/raw``);
    ``data_dir`` defaults to $PYROVAE_DATA, else ~/.cache/pyrovae; with
    ``download`` torchvision fetches missing files there. A ``.npy`` file holds
    one array; a ``.npz`` file holds "train" and optionally "test" (or a single
    array), and optionally class labels: "y" for the rows of "train" (or of the single array),
    "y_test" for those of "test"; without a test array the rows (and labels) are split as for digits.
    """
    name = os.fspath(name)
    if name == "digits":
        return _load_digits(test_fraction, seed)
    if name in _TORCHVISION_FOLDERS:
        root = data_dir if data_dir is not None else os.environ.get("PYROVAE_DATA")
        root = Path(root).expanduser() if root else Path.home() / ".cache" / "pyrovae"
        return _load_idx_dataset(name, root, download)
    if name.lower().endswith((".npz", ".npy")):
        return _load_array_file(Path(name).expanduser(), test_fraction, seed)
    raise DataError(
        f"unknown data set {name!r}: use one of {', '.join(DATASETS)}, or a path to a .npz/.npy file"
    )


def with_validation(data: Dataset, fraction: float, seed: int) -> Dataset:
    """The data set with ``fraction`` of its training rows moved to ``valid`` (at random,
    deterministic for ``seed``, independent of the held-out split drawn with the same seed)."""
    if fraction == 0:
        return data
    n = data.train.shape[0]
    n_valid = round(n * fraction) if 0 < fraction < 1 else 0
    if not 1 <= n_valid < n:
        raise DataError(f"validation fraction {fraction} leaves no validation or no training points out of {n}: "
                        "choose a fraction in (0, 1), or 0")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(substream_seed(seed, key=2) % 2**63))
    valid, train = perm[:n_valid].sort().values, perm[n_valid:].sort().values
    labels = data.train_labels
    return Dataset(data.name, data.train[train], data.test, data.image_shape,
                   None if labels is None else labels[train], data.test_labels,
                   data.train[valid], None if labels is None else labels[valid])


def balanced_labelled(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Indices of ``n`` rows to keep the labels of, n/C from each of the C classes (the first n mod C
    classes one more), drawn at random within each class, deterministic for ``seed``: the
    semi-supervised protocol of Kingma et al. (2014), 100 MNIST labels = 10 per digit. (n,) long, sorted."""
    if labels is None:
        raise DataError("the data set has no labels: semi-supervised training needs a labelled data set")
    classes = labels.unique()
    C = len(classes)
    if not C <= n <= len(labels):
        raise DataError(f"{n} labelled points for {C} classes and {len(labels)} rows: choose between {C} and {len(labels)}")
    generator = torch.Generator().manual_seed(substream_seed(seed, key=5) % 2**63)
    chosen = []
    for i, c in enumerate(classes.tolist()):
        rows = (labels == c).nonzero().squeeze(1)
        k = n // C + (i < n % C)
        if k > len(rows):
            raise DataError(f"class {c} has {len(rows)} rows, fewer than the {k} labelled points asked of it")
        chosen.append(rows[torch.randperm(len(rows), generator=generator)[:k]])
    return torch.cat(chosen).sort().values


def substream_seed(seed: int, key: int = 1) -> int:
    """A seed for another random stream (one per ``key``), independent of the one seeded by ``seed``."""
    return int(np.random.SeedSequence(seed % 2**64, spawn_key=(key,)).generate_state(1, np.uint64)[0])



def _split(x, labels, test_fraction, seed):
    """Rows split at random, deterministic for the seed: (train, test, train_labels, test_labels)."""
    n = x.shape[0]
    n_test = round(n * test_fraction) if 0 < test_fraction < 1 else 0
    if not 1 <= n_test < n:
        raise DataError(
            f"test fraction {test_fraction} leaves no test or no training points out of {n}: "
            "choose a fraction in (0, 1), or give a separate test array"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    test, train = perm[:n_test].sort().values, perm[n_test:].sort().values
    if labels is None:
        return x[train], x[test], None, None
    return x[train], x[test], labels[train], labels[test]


def _load_digits(test_fraction, seed):
    from sklearn.datasets import load_digits

    digits = load_digits()  # 1797 images 8x8, values 0..16
    x = torch.from_numpy(digits.data.astype(np.float32) / 16)  # (1797, 64)
    y = torch.from_numpy(digits.target.astype(np.int64))
    train, test, train_labels, test_labels = _split(x, y, test_fraction, seed)
    return Dataset("digits", train, test, (1, 8, 8), train_labels, test_labels)


def _find_idx_files(root, folder):
    """The four IDX files in root or root/folder/raw, uncompressed ones preferred, or None."""
    for directory in (root, root / folder / "raw"):
        found = {}
        for role, file_name in _IDX_FILES.items():
            for path in (directory / file_name, directory / f"{file_name}.gz"):
                if path.is_file():
                    found[role] = path
                    break
        if len(found) == len(_IDX_FILES):
            return found
    return None


def _load_idx_dataset(name, root, download):
    folder = _TORCHVISION_FOLDERS[name]
    files = _find_idx_files(root, folder)
    if files is None and download:
        _download(name, root)
        files = _find_idx_files(root, folder)
    if files is None:
        wanted = ", ".join(f"{file_name}[.gz]" for file_name in _IDX_FILES.values())
        raise DataError(
            f"{name} not found: looked for {wanted} in {root} and in {root / folder / 'raw'}; "
            "pass --download to fetch it, or --data-dir to point at a folder that has these files"
        )
    split = {}
    for part in ("train", "test"):
        images = _read_idx(files[f"{part}_images"], magic=2051)  # (N, H, W) uint8
        labels = _read_idx(files[f"{part}_labels"], magic=2049)  # (N,) uint8
        if len(images) != len(labels):
            raise DataError(
                f"{files[f'{part}_images']} holds {len(images)} images but {files[f'{part}_labels']} "
                f"holds {len(labels)} labels: the files do not belong together; download them again"
            )
        split[part] = (images, labels)
    if split["train"][0].shape[1:] != split["test"][0].shape[1:]:
        raise DataError(
            f"{files['train_images']} holds images of {split['train'][0].shape[1:]} pixels but "
            f"{files['test_images']} of {split['test'][0].shape[1:]}: the files do not belong together"
        )
    (train, train_labels), (test, test_labels) = split["train"], split["test"]
    return Dataset(
        name,
        torch.from_numpy(train.reshape(len(train), -1).astype(np.float32) / 255),  # (60000, 784)
        torch.from_numpy(test.reshape(len(test), -1).astype(np.float32) / 255),  # (10000, 784)
        (1, *train.shape[1:]),
        torch.from_numpy(train_labels.astype(np.int64)),
        torch.from_numpy(test_labels.astype(np.int64)),
    )


def _read_idx(path, magic):
    """An IDX file of unsigned bytes (gzip or not) as an array: magic 2051 images (N, H, W), 2049 labels (N,)."""
    try:
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise DataError(f"cannot read {path}: {e}; delete it and download it again") from None
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        kind = "images" if magic == 2051 else "labels"
        raise DataError(f"{path} has magic number {found}, not {magic} (IDX {kind}): it is not the file its name says")
    ndim = magic & 0xFF  # the magic's last byte is the number of dimensions
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path} is truncated: {len(data)} bytes, its header alone needs {header}")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + math.prod(dims)
    if len(data) != expected:
        raise DataError(
            f"{path} should hold {expected} bytes for its {' x '.join(map(str, dims))} values, "
            f"found {len(data)}: the file is truncated or corrupt; delete it and download it again"
        )
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def _download(name, root):
    """Fetch the IDX files with torchvision into root/MNIST/raw (root/FashionMNIST/raw)."""
    from torchvision import datasets

    cls = datasets.MNIST if name == "mnist" else datasets.FashionMNIST
    try:
        cls(str(root), train=True, download=True)
    except (OSError, RuntimeError) as e:  # no network, or a checksum mismatch
        raise DataError(
            f"downloading {name} into {root} failed ({e}); put the four IDX files in "
            f"{root / _TORCHVISION_FOLDERS[name] / 'raw'} by hand, or pass --data-dir"
        ) from e


_NUMPY_MAGIC = (b"\x93NUMPY", b"PK\x03\x04", b"PK\x05\x06")  # .npy; .npz (a zip archive, or an empty one)


def _load_array_file(path, test_fraction, seed):
    if path.is_dir():
        raise DataError(f"{path} is a folder, not a .npy/.npz file: give the path of the file itself")
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        with open(path, "rb") as file:  # ours to close, also when numpy fails
            head = file.read(6)
            if not head:
                raise DataError(f"{path} is empty (0 bytes): it is not a NumPy .npy/.npz file")
            if not head.startswith(_NUMPY_MAGIC):  # else numpy takes it for a pickle, and says so
                raise DataError(
                    f"{path} is not a NumPy .npy/.npz file (it starts with {head!r}): "
                    "save arrays with numpy.save (.npy) or numpy.savez (.npz)"
                )
            file.seek(0)
            loaded = np.load(file, allow_pickle=False)
            if isinstance(loaded, np.ndarray):
                arrays = {"train": loaded}
            else:
                arrays = {key: loaded[key] for key in loaded.files}
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise DataError(f"cannot read {path} as a NumPy .npy/.npz file: {e}") from None
    if not arrays:
        raise DataError(f"{path} holds no arrays: save the training data in it as 'train' (numpy.savez(path, train=x))")
    labels, test_labels = arrays.pop("y", None), arrays.pop("y_test", None)
    if "train" in arrays:
        train, test = arrays["train"], arrays.get("test")
    elif len(arrays) == 1:
        (train,), test = arrays.values(), None
    else:
        raise DataError(
            f"{path} holds arrays {sorted(arrays)} but none named 'train': "
            "save the training data as 'train' (and the test data as 'test'), or store a single array"
        )
    train, image_shape = _checked_array(train, f"{path} ['train']")
    labels = _checked_labels(labels, len(train), f"{path} ['y']")
    if test is None:
        if test_labels is not None:
            raise DataError(f"{path} holds 'y_test' but no 'test' array: label the rows of 'train' with 'y'")
        train, test, labels, test_labels = _split(train, labels, test_fraction, seed)
    else:
        test, test_shape = _checked_array(test, f"{path} ['test']")
        if test_shape != image_shape or test.shape[1] != train.shape[1]:
            raise DataError(
                f"{path}: 'train' rows have {train.shape[1]} values {image_shape or ''} but 'test' rows "
                f"have {test.shape[1]} {test_shape or ''}: both need the same shape per data point"
            )
        test_labels = _checked_labels(test_labels, len(test), f"{path} ['y_test']")
        if (labels is None) != (test_labels is None):
            raise DataError(f"{path} labels only one of 'train' and 'test' ('y' and 'y_test'): label both or neither")
    return Dataset(path.stem, train, test, image_shape, labels, test_labels)


def _checked_labels(y, n: int, what: str) -> torch.Tensor | None:
    """A user's class labels as an (n,) long tensor of values 0, 1, …, or None."""
    if y is None:
        return None
    if y.ndim != 1 or len(y) != n:
        raise DataError(f"{what} has shape {y.shape}: expected one label per row, shape ({n},)")
    if y.dtype.kind not in "biu" and not (y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y))):
        raise DataError(f"{what} has dtype {y.dtype}: class labels must be whole numbers 0, 1, …")
    if len(y) and y.min() < 0:
        raise DataError(f"{what} has negative labels (e.g. {y[y < 0][0]}): class labels must be 0, 1, …")
    return torch.from_numpy(y.astype(np.int64))


def _checked_array(a, what):
    """A user's array as an (N, P) float32 tensor of finite values, and its (C, H, W) or None.

    The range is the likelihood's business: the model's observed site checks its support at start-up
    (pixels must be in [0, 1] for a Bernoulli or continuous Bernoulli, any real for a Gaussian)."""
    if a.size == 0:
        raise DataError(f"{what} is empty (shape {a.shape})")
    if a.dtype.kind not in "biuf":
        raise DataError(f"{what} has dtype {a.dtype}: expected numbers")
    shape = a.shape
    if a.ndim == 2:
        side = math.isqrt(shape[1])
        image_shape = (1, side, side) if side * side == shape[1] else None
    elif a.ndim == 3:
        image_shape = (1, *shape[1:])
    elif a.ndim == 4 and shape[1] in (1, 3):
        image_shape = shape[1:]
    else:
        hint = "; for channels-last images use a.transpose(0, 3, 1, 2)" if a.ndim == 4 and shape[3] in (1, 3) else ""
        raise DataError(f"{what} has shape {shape}: expected (N, P), (N, H, W) or (N, C, H, W) with C = 1 or 3{hint}")
    x = a.reshape(len(a), -1).astype(np.float32, order="C")  # (N, P), a copy
    n_bad = int((~np.isfinite(x)).sum())
    if n_bad:
        raise DataError(f"{what} has {n_bad} NaN or infinite values: the data must be finite")
    return torch.from_numpy(x), tuple(int(s) for s in image_shape) if image_shape else None
