"""Tests of pyrovae.sources and pyrovae.data: loading data sets, binarizing them and serving minibatches."""

import gzip
import io
import math
import re
import struct
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import pyrovae.data as data_module
import pyrovae.sources as sources_module
from pyrovae.data import BINARIZATIONS, Batches, binarize, check_binary, static_binarized
from pyrovae.sources import DATASETS, Dataset, load_dataset
from pyrovae.errors import DataError

IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


# ---------------------------------------------------------------- helpers


def idx_bytes(array):
    """The IDX encoding of a uint8 array: magic 2051 for images (N, H, W), 2049 for labels (N,)."""
    magic = 0x0800 + array.ndim
    return struct.pack(f">{1 + array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def write_idx(path, array, gz):
    """Write array as an IDX file at path (path.gz if gz); return the path written."""
    data = idx_bytes(array)
    if gz:
        path, data = path.with_name(path.name + ".gz"), gzip.compress(data)
    path.write_bytes(data)
    return path


@pytest.fixture
def small_idx():
    """Arrays of a tiny MNIST-like data set: 5 train and 3 test images of 4x4 pixels with labels."""
    rng = np.random.default_rng(0)
    return {
        "train_images": rng.integers(0, 256, (5, 4, 4), dtype=np.uint8),
        "train_labels": np.array([0, 1, 2, 3, 9], np.uint8),
        "test_images": rng.integers(0, 256, (3, 4, 4), dtype=np.uint8),
        "test_labels": np.array([4, 5, 6], np.uint8),
    }


def write_small_idx(directory, arrays, gz=(True, False, False, True)):
    """Write the four IDX files into directory, each gzipped or not as gz says; return their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    return {
        role: write_idx(directory / IDX_NAMES[role], arrays[role], g) for role, g in zip(IDX_NAMES, gz)
    }


def assert_matches_small_idx(data, arrays):
    assert data.train.dtype == torch.float32 and data.test.dtype == torch.float32
    assert data.train.shape == (5, 16) and data.test.shape == (3, 16)
    assert data.image_shape == (1, 4, 4) and data.dim == 16
    torch.testing.assert_close(data.train, torch.from_numpy(arrays["train_images"].reshape(5, 16) / 255).float())
    torch.testing.assert_close(data.test, torch.from_numpy(arrays["test_images"].reshape(3, 16) / 255).float())
    assert data.train_labels.dtype == torch.long
    assert data.train_labels.tolist() == arrays["train_labels"].tolist()
    assert data.test_labels.tolist() == arrays["test_labels"].tolist()


# ---------------------------------------------------------------- digits


def test_digits_shapes_values_and_split():
    data = load_dataset("digits")
    assert isinstance(data, Dataset) and data.name == "digits"
    assert data.image_shape == (1, 8, 8) and data.dim == 64
    assert data.test.shape == (round(1797 * 0.2), 64)
    assert data.train.shape[0] + data.test.shape[0] == 1797
    assert data.train.dtype == torch.float32
    assert 0 <= data.train.min() and data.train.max() == 1
    assert data.train_labels.shape == (data.train.shape[0],) and data.test_labels.shape == (data.test.shape[0],)
    # The split is a partition of the 1797 images: pixel sums and label counts add up.
    from sklearn.datasets import load_digits

    digits = load_digits()
    total = torch.cat([data.train, data.test]).double().sum()
    assert total.item() == pytest.approx(digits.data.sum() / 16, rel=1e-12)
    labels = torch.cat([data.train_labels, data.test_labels])
    assert labels.bincount().tolist() == np.bincount(digits.target).tolist()


def test_digits_split_is_reproducible_by_seed():
    a, b = load_dataset("digits", seed=1), load_dataset("digits", seed=1)
    c = load_dataset("digits", seed=2)
    assert torch.equal(a.train, b.train) and torch.equal(a.test, b.test)
    assert not torch.equal(a.test, c.test)
    assert load_dataset("digits", test_fraction=0.5).test.shape[0] == round(1797 * 0.5)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1e-5])
def test_test_fraction_without_points_is_rejected(fraction):
    with pytest.raises(DataError, match="test fraction"):
        load_dataset("digits", test_fraction=fraction)


# ---------------------------------------------------------------- MNIST, the real files


@pytest.fixture(scope="module")
def mnist(mnist_dir):
    return load_dataset("mnist", data_dir=mnist_dir)


def test_mnist_shapes_and_labels(mnist):
    assert mnist.name == "mnist" and mnist.image_shape == (1, 28, 28) and mnist.dim == 784
    assert mnist.train.shape == (60000, 784) and mnist.test.shape == (10000, 784)
    assert mnist.train.dtype == torch.float32
    assert mnist.train_labels.dtype == torch.long
    assert mnist.train_labels.bincount().tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert mnist.test_labels.bincount().tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_mnist_pixel_statistics(mnist):
    train = mnist.train.double()
    assert train.min() == 0 and train.max() == 1
    assert round(train.mean().item(), 4) == 0.1307
    assert round(train.std().item(), 4) == 0.3081


# ---------------------------------------------------------------- IDX files


def test_idx_gzip_and_uncompressed_files_in_data_dir(tmp_path, small_idx):
    write_small_idx(tmp_path, small_idx, gz=(True, False, False, True))
    assert_matches_small_idx(load_dataset("mnist", data_dir=tmp_path), small_idx)


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_idx_torchvision_layout(tmp_path, small_idx, gz):
    write_small_idx(tmp_path / "FashionMNIST" / "raw", small_idx, gz=(gz,) * 4)
    data = load_dataset("fashion-mnist", data_dir=str(tmp_path))
    assert data.name == "fashion-mnist"
    assert_matches_small_idx(data, small_idx)
    with pytest.raises(DataError, match="MNIST"):  # MNIST lives in MNIST/raw, not FashionMNIST/raw
        load_dataset("mnist", data_dir=tmp_path)


def test_idx_data_dir_defaults_to_environment(tmp_path, small_idx, monkeypatch):
    write_small_idx(tmp_path / "MNIST" / "raw", small_idx)
    monkeypatch.setenv("PYROVAE_DATA", str(tmp_path))
    assert_matches_small_idx(load_dataset("mnist"), small_idx)


def test_idx_missing_files_say_where_and_what_to_do(tmp_path, small_idx):
    paths = write_small_idx(tmp_path, small_idx)
    paths["test_labels"].unlink()
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\[\.gz\].*--download.*--data-dir") as info:
        load_dataset("mnist", data_dir=tmp_path)
    assert str(tmp_path / "MNIST" / "raw") in str(info.value)


def fake_torchvision(monkeypatch, dataset_class):
    """Put a stand-in for torchvision (datasets.MNIST and .FashionMNIST) in sys.modules: no network."""
    torchvision = types.ModuleType("torchvision")
    torchvision.datasets = types.SimpleNamespace(MNIST=dataset_class, FashionMNIST=dataset_class)
    monkeypatch.setitem(sys.modules, "torchvision", torchvision)


def test_idx_download_goes_through_torchvision(tmp_path, small_idx, monkeypatch):
    """download=True asks torchvision for the files, then reads the raw folder it fills."""
    calls = []

    class FakeMNIST:
        def __init__(self, root, train=True, download=False):
            calls.append((root, download))
            write_small_idx(Path(root) / "MNIST" / "raw", small_idx, gz=(False,) * 4)

    fake_torchvision(monkeypatch, FakeMNIST)
    with pytest.raises(DataError, match="--download"):
        load_dataset("mnist", data_dir=tmp_path)
    assert calls == []
    assert_matches_small_idx(load_dataset("mnist", data_dir=tmp_path, download=True), small_idx)
    assert calls == [(str(tmp_path), True)]
    load_dataset("mnist", data_dir=tmp_path, download=True)  # found now: no second download
    assert len(calls) == 1


def test_idx_failed_download_is_a_data_error(tmp_path, monkeypatch):
    class OfflineMNIST:
        def __init__(self, root, train=True, download=False):
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    fake_torchvision(monkeypatch, OfflineMNIST)
    with pytest.raises(DataError, match="downloading fashion-mnist .* failed .*FashionMNIST"):
        load_dataset("fashion-mnist", data_dir=tmp_path, download=True)


TRUNCATION_MESSAGES = {  # what a file cut short by 7 bytes is reported as, after its name
    "raw": "should hold 96 bytes for its 5 x 4 x 4 values, found 89: the file is truncated or corrupt",
    "gz": ": Compressed file ended before the end-of-stream marker was reached; delete it and download it again",
}


def assert_truncation_reported(directory, path, gz):
    with pytest.raises(DataError, match=re.escape(path.name) + ".*" + re.escape(TRUNCATION_MESSAGES["gz" if gz else "raw"])):
        load_dataset("mnist", data_dir=directory)


def vague_read_idx(path, magic):
    """A broken reader: it names the file but not what is wrong with it."""
    raise DataError(f"cannot read {path}")


@pytest.mark.parametrize("variant", ["correct", "vague-message"])
@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_idx_truncated_file_names_the_file(tmp_path, small_idx, monkeypatch, gz, variant):
    """The message names the file and says why it cannot be read; one that only names it is rejected."""
    paths = write_small_idx(tmp_path, small_idx, gz=(gz,) * 4)
    path = paths["train_images"]
    path.write_bytes(path.read_bytes()[:-7])
    if variant == "correct":
        assert_truncation_reported(tmp_path, path, gz)
        return
    monkeypatch.setattr(sources_module, "_read_idx", vague_read_idx)
    with pytest.raises(AssertionError, match="Regex pattern did not match"):
        assert_truncation_reported(tmp_path, path, gz)


def test_idx_extra_bytes_are_rejected(tmp_path, small_idx):
    path = write_small_idx(tmp_path, small_idx, gz=(False,) * 4)["test_labels"]
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte should hold 11 bytes .* found 12"):
        load_dataset("mnist", data_dir=tmp_path)


def test_idx_wrong_magic_number(tmp_path, small_idx):
    write_small_idx(tmp_path, {**small_idx, "train_images": small_idx["train_labels"]})
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz has magic number 2049, not 2051"):
        load_dataset("mnist", data_dir=tmp_path)


def test_idx_labels_and_images_must_agree(tmp_path, small_idx):
    write_small_idx(tmp_path, {**small_idx, "test_labels": small_idx["test_labels"][:2]})
    with pytest.raises(DataError, match="3 images .* 2 labels"):
        load_dataset("mnist", data_dir=tmp_path)


# ---------------------------------------------------------------- user arrays


@pytest.mark.parametrize(
    "shape, image_shape",
    [
        ((10, 12), None),
        ((10, 16), (1, 4, 4)),
        ((10, 5, 6), (1, 5, 6)),
        ((10, 1, 4, 4), (1, 4, 4)),
        ((10, 3, 4, 5), (3, 4, 5)),
    ],
    ids=["vectors", "square-vectors", "NHW", "N1HW", "N3HW"],
)
def test_npy_shapes_accepted_and_split(tmp_path, shape, image_shape):
    a = np.random.default_rng(0).random(shape)
    np.save(tmp_path / "mine.npy", a)
    data = load_dataset(tmp_path / "mine.npy", test_fraction=0.2, seed=3)
    dim = math.prod(shape[1:])
    assert data.name == "mine" and data.image_shape == image_shape and data.dim == dim
    assert data.train.shape == (8, dim) and data.test.shape == (2, dim) and data.train.dtype == torch.float32
    assert data.train_labels is None and data.test_labels is None
    # The split is a partition of the rows, flattened in C order (as torch's view does).
    rows = torch.cat([data.train, data.test])
    expected = torch.from_numpy(a).float().reshape(10, dim)
    assert torch.equal(rows[rows[:, 0].argsort()], expected[expected[:, 0].argsort()])
    again = load_dataset(str(tmp_path / "mine.npy"), test_fraction=0.2, seed=3)
    assert torch.equal(again.test, data.test)


def test_npz_train_and_test(tmp_path):
    rng = np.random.default_rng(1)
    train, test = rng.random((6, 2, 3)), rng.random((4, 2, 3)).astype(np.float32)
    np.savez(tmp_path / "mine.npz", train=train, test=test)
    data = load_dataset(str(tmp_path / "mine.npz"))
    assert data.image_shape == (1, 2, 3)
    torch.testing.assert_close(data.train, torch.from_numpy(train.reshape(6, 6)).float())
    torch.testing.assert_close(data.test, torch.from_numpy(test.reshape(4, 6)))


def test_npz_single_array_of_any_name_is_split(tmp_path):
    np.savez(tmp_path / "one.npz", pixels=np.zeros((10, 3), np.uint8))
    data = load_dataset(str(tmp_path / "one.npz"))
    assert data.train.shape == (8, 3) and data.test.shape == (2, 3)


def test_npz_several_arrays_without_train(tmp_path):
    np.savez(tmp_path / "two.npz", a=np.zeros((4, 3)), b=np.zeros((4, 3)))
    with pytest.raises(DataError, match=r"\['a', 'b'\].*'train'"):
        load_dataset(str(tmp_path / "two.npz"))


def test_npz_train_and_test_shapes_must_agree(tmp_path):
    np.savez(tmp_path / "bad.npz", train=np.zeros((4, 3)), test=np.zeros((4, 5)))
    with pytest.raises(DataError, match="same shape"):
        load_dataset(str(tmp_path / "bad.npz"))


@pytest.mark.parametrize(
    "shape, match",
    [((7,), r"\(7,\)"), ((2, 1, 3, 4, 4), r"\(2, 1, 3, 4, 4\)"), ((2, 2, 4, 4), r"\(2, 2, 4, 4\)")],
    ids=["1-D", "5-D", "2-channels"],
)
def test_npy_bad_shapes_are_named(tmp_path, shape, match):
    np.save(tmp_path / "bad.npy", np.zeros(shape))
    with pytest.raises(DataError, match=match):
        load_dataset(str(tmp_path / "bad.npy"))


def test_npy_channels_last_gets_a_hint(tmp_path):
    np.save(tmp_path / "hwc.npy", np.zeros((2, 4, 4, 3)))
    with pytest.raises(DataError, match=r"transpose\(0, 3, 1, 2\)"):
        load_dataset(str(tmp_path / "hwc.npy"))


@pytest.mark.parametrize(
    "bad_value, match",
    [(np.nan, "1 NaN or infinite"), (np.inf, "1 NaN or infinite")],
    ids=["nan", "inf"],
)
def test_npy_values_that_are_not_finite_are_rejected(tmp_path, bad_value, match):
    a = np.full((3, 4), 0.5)
    a[0, 0] = 0
    a[1, 2] = bad_value
    np.save(tmp_path / "bad.npy", a)
    with pytest.raises(DataError, match=match):
        load_dataset(str(tmp_path / "bad.npy"))


@pytest.mark.parametrize("bad_value", [255.0, -0.5], ids=["255", "negative"])
def test_real_values_load_and_the_likelihood_decides_whether_they_fit(tmp_path, bad_value):
    """Values outside [0, 1] are data for a Gaussian likelihood and out of the support of a
    continuous Bernoulli one: the loader keeps them, the start-up contract check refuses them."""
    from pyrovae import contract
    from pyrovae.errors import DataError
    from pyrovae.models import vae

    a = np.full((3, 4), 0.5)
    a[1, 2] = bad_value
    np.save(tmp_path / "real.npy", a)
    x = load_dataset(str(tmp_path / "real.npy"), test_fraction=0.34).train
    assert bad_value in x
    gaussian = vae(4, latent_dim=1, hidden=(4,), likelihood="gaussian")
    contract.check(gaussian.model, gaussian.guide, x)
    grey = vae(4, latent_dim=1, hidden=(4,), likelihood="continuous-bernoulli")
    with pytest.raises(DataError, match=rf"1 values outside the support .*\(e.g. {bad_value:g}\)"):
        contract.check(grey.model, grey.guide, x)


def test_npy_empty_is_rejected(tmp_path):
    np.save(tmp_path / "empty.npy", np.zeros((0, 5)))
    with pytest.raises(DataError, match="empty"):
        load_dataset(str(tmp_path / "empty.npy"))


@pytest.mark.parametrize("file_name", ["cut.npz", "cut.npy"])
def test_unreadable_array_file(tmp_path, file_name):
    path = tmp_path / file_name
    (np.savez_compressed if file_name.endswith("z") else np.save)(path, np.zeros((100, 10)))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DataError, match=f"cannot read .*{file_name}"):
        load_dataset(str(path))


def test_missing_array_file(tmp_path):
    with pytest.raises(DataError, match="not found: .*nope.npz"):
        load_dataset(str(tmp_path / "nope.npz"))


def test_unknown_name_lists_known_ones():
    with pytest.raises(DataError, match="unknown data set 'cifar10': use one of digits, mnist, fashion-mnist"):
        load_dataset("cifar10")
    assert DATASETS == ("digits", "mnist", "fashion-mnist")


# ---------------------------------------------------------------- binarization


@pytest.fixture
def grey():
    """200 points of 30 grey values in [0, 1], some exactly 0 or 1."""
    x = torch.rand(200, 30, generator=torch.Generator().manual_seed(0))
    x[:, 0], x[:, 1] = 0.0, 1.0
    return x


def served(batches):
    """One epoch of batches put back in row order: (N, P)."""
    out = torch.empty_like(batches.x)
    for idx, xb in batches:
        out[idx] = xb
    return out


def test_binarize_keeps_dtype_device_and_is_reproducible(grey):
    x = grey.double()
    a = binarize(x, torch.Generator().manual_seed(5))
    b = binarize(x, torch.Generator().manual_seed(5))
    assert a.dtype == torch.float64 and a.device == x.device and a.shape == x.shape
    assert torch.equal(a, b)
    check_binary(a)
    assert (a[:, 0] == 0).all() and (a[:, 1] == 1).all()


def test_static_is_reproducible_by_seed(grey):
    a, b = Batches(grey, 32, "static", seed=3), Batches(grey, 32, "static", seed=3)
    first = served(a)
    check_binary(first)
    assert torch.equal(first, served(b))
    assert torch.equal(first, served(a))  # the same draw in every epoch
    assert torch.equal(first, static_binarized(grey, 3))
    assert not torch.equal(first, served(Batches(grey, 32, "static", seed=4)))


def with_row_labels(x: torch.Tensor) -> torch.Tensor:
    """x with its row index appended in binary, as columns of exact 0s and 1s that binarizing keeps."""
    bits = max(1, (x.shape[0] - 1).bit_length())
    labels = (torch.arange(x.shape[0])[:, None] >> torch.arange(bits)) & 1  # (N, bits), least significant first
    return torch.cat([x, labels.to(x.dtype)], 1)


def dynamic_problems(batches: Batches, p: torch.Tensor, passes: int) -> list[str]:
    """What is wrong with ``passes`` epochs of dynamically binarized batches of ``with_row_labels(p)``:

    - "pairing": some served row does not carry the label of the index served with it;
    - "frequencies": a pixel's frequency of ones over the passes, f, is off its probability p by
      5 or more binomial standard errors sqrt(p (1 − p) / passes) (pixels with passes·p(1 − p) ≥ 5,
      where the binomial is near normal), or the mean of the squared z-scores is off its expected 1
      by 4 standard errors (Var z² = 2 + (1 − 6 p q) / (passes p q) for a binomial), or a pixel with
      p = 0 or 1 is not always p;
    - "afresh": two passes served the same draw.
    """
    problems = set()
    width = p.shape[1]
    weights = 2 ** torch.arange(batches.x.shape[1] - width)
    ones = torch.zeros_like(p)
    draws = []
    for _ in range(passes):
        out = torch.full_like(batches.x, math.nan)
        for idx, xb in batches:
            labels = (xb[:, width:].long() * weights).sum(1)
            if not torch.equal(labels, idx):
                problems.add("pairing")
            out[idx] = xb
        draws.append(out[:, :width])
        ones += out[:, :width]
    if any(torch.equal(a, b) for a, b in zip(draws, draws[1:])):
        problems.add("afresh")
    f, pq = ones / passes, p * (1 - p)
    degenerate = pq == 0
    if not torch.equal(f[degenerate], p[degenerate]):
        problems.add("frequencies")
    normal = passes * pq >= 5
    z = (f - p)[normal] / (pq[normal] / passes).sqrt()
    var_z2 = 2 + (1 - 6 * pq[normal]) / (passes * pq[normal])
    if z.abs().max() >= 5 or abs((z**2).mean() - 1) >= 4 * var_z2.sum().sqrt() / z.numel():
        problems.add("frequencies")
    return sorted(problems)


DYNAMIC_VARIANTS = {  # name → a replacement for binarize inside Batches, and problems it must raise (among others)
    "correct": (None, []),
    "one-minus-p": (lambda x, generator: torch.bernoulli(1 - x, generator=generator), ["frequencies"]),
    "one-half": (lambda x, generator: torch.bernoulli(torch.full_like(x, 0.5), generator=generator), ["frequencies"]),
    "permuted-rows": (lambda x, generator: torch.bernoulli(x.roll(1, 0), generator=generator), ["frequencies", "pairing"]),
}


@pytest.mark.parametrize("variant", list(DYNAMIC_VARIANTS))
def test_dynamic_draws_afresh_each_pass_with_the_right_mean(grey, monkeypatch, variant):
    """Served through Batches (shuffled, 200 rows in batches of 32), 100 passes of a dynamic
    binarization give each pixel a frequency of ones that matches its grey level, the rows carry the
    indices served with them, and no two passes repeat. Broken binarizations are each rejected."""
    replacement, expected = DYNAMIC_VARIANTS[variant]
    if replacement is not None:
        monkeypatch.setattr(data_module, "binarize", replacement)
    batches = Batches(with_row_labels(grey.double()), 32, "dynamic", seed=1)
    first = served(batches)
    check_binary(first)
    problems = dynamic_problems(batches, grey.double(), passes=100)
    assert set(expected) <= set(problems) if expected else problems == [], problems


def test_none_serves_x_exactly(grey):
    for idx, xb in Batches(grey, 64, "none", seed=2):
        assert torch.equal(xb, grey[idx])


def test_binarization_needs_values_in_unit_interval(grey):
    with pytest.raises(DataError, match="dynamic binarization needs values in \\[0, 1\\].*max 255"):
        Batches(grey * 255, 10, "dynamic")
    Batches(grey * 255, 10, "none")  # continuous likelihoods may take any values


def test_unknown_binarization_lists_the_choices(grey):
    with pytest.raises(DataError, match="'half': choose one of none, static, dynamic"):
        Batches(grey, 10, "half")
    assert BINARIZATIONS == ("none", "static", "dynamic")


def test_check_binary_message():
    check_binary(torch.tensor([[0.0, 1.0]]))
    message = "the Bernoulli likelihood needs binary data: use --binarize static or dynamic, or --likelihood continuous-bernoulli"
    with pytest.raises(DataError, match=r"test set has 1 values .*e\.g\. 0\.5.*" + re.escape(message)):
        check_binary(torch.tensor([[0.0, 0.5, 1.0]]), what="test set")


# ---------------------------------------------------------------- Batches


@pytest.mark.parametrize("batch_size, drop_last, n_batches", [(50, False, 4), (64, False, 4), (64, True, 3), (200, True, 1)])
def test_every_index_once_per_epoch(grey, batch_size, drop_last, n_batches):
    batches = Batches(grey, batch_size, drop_last=drop_last, seed=1)
    assert len(batches) == n_batches
    for _ in range(2):
        idx = [i for i, _ in batches]
        assert len(idx) == n_batches and all(i.dtype == torch.long for i in idx)
        assert all(len(i) == batch_size for i in idx[:-1])
        seen = torch.cat(idx)
        if drop_last:
            assert len(seen) == n_batches * batch_size and len(seen.unique()) == len(seen)
        else:
            assert torch.equal(seen.sort().values, torch.arange(200))


def test_same_seed_same_order_new_order_each_epoch(grey):
    a, b = Batches(grey, 50, seed=7), Batches(grey, 50, seed=7)
    epochs_a = [torch.cat([i for i, _ in a]) for _ in range(2)]
    epochs_b = [torch.cat([i for i, _ in b]) for _ in range(2)]
    assert all(torch.equal(u, v) for u, v in zip(epochs_a, epochs_b))
    assert not torch.equal(epochs_a[0], epochs_a[1])
    assert not torch.equal(epochs_a[0], torch.cat([i for i, _ in Batches(grey, 50, seed=8)]))
    assert torch.equal(torch.cat([i for i, _ in Batches(grey, 50, shuffle=False)]), torch.arange(200))


def checkpoint(state):
    """state through torch.save / torch.load(weights_only=True), as a training checkpoint takes it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("binarization", ["none", "dynamic"])
def test_state_dict_resumes_at_epoch_end(grey, binarization):
    a = Batches(grey, 64, binarization, seed=4)
    list(a)
    state = checkpoint(a.state_dict())
    expected = list(a)
    b = Batches(grey, 64, binarization, seed=99)
    b.load_state_dict(state)
    resumed = list(b)
    assert len(resumed) == len(expected) == 4
    for (i, x), (j, y) in zip(resumed, expected):
        assert torch.equal(i, j) and torch.equal(x, y)


def test_state_dict_resumes_mid_epoch(grey):
    a = Batches(grey, 30, "dynamic", seed=5)
    stream = iter(a)
    for _ in range(3):
        next(stream)
    state = checkpoint(a.state_dict())
    expected = list(stream) + list(a)  # the rest of this epoch, then the next one
    b = Batches(grey, 30, "dynamic", seed=5)
    b.load_state_dict(state)
    resumed = list(b) + list(b)
    assert len(resumed) == len(expected) == (7 - 3) + 7
    for (i, x), (j, y) in zip(resumed, expected):
        assert torch.equal(i, j) and torch.equal(x, y)


def test_state_dict_of_other_data_is_rejected(grey):
    state = Batches(grey, 30).state_dict()
    with pytest.raises(DataError, match="200 points in batches of 30 .* 200 points in batches of 40"):
        Batches(grey, 40).load_state_dict(state)


def test_batch_size_out_of_range(grey):
    with pytest.raises(DataError, match="batch size 500 is larger than the 200 training points"):
        Batches(grey, 500)
    with pytest.raises(DataError, match="batch size 0 is not positive"):
        Batches(grey, 0)


def test_bad_data_to_batch():
    with pytest.raises(DataError, match=r"no data to batch: x has shape \(0, 5\)"):
        Batches(torch.zeros(0, 5), 1)
    with pytest.raises(DataError, match=r"shape \(5,\)"):
        Batches(torch.zeros(5), 1)


def test_batches_live_on_the_device(grey):
    batches = Batches(grey.double(), 64, device="cpu")
    idx, xb = next(iter(batches))
    assert batches.x.device == torch.device("cpu") and idx.device == xb.device == batches.x.device
    assert xb.dtype == torch.float64 and xb.shape == (64, 30)
