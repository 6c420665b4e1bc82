"""Shared fixtures: a clean Pyro state for every test, and the MNIST files beside the checkout."""

import os
from pathlib import Path

import pyro
import pytest
import torch


@pytest.fixture(autouse=True)
def clean_pyro():
    """Each test starts with an empty param store, validation on, seeded RNGs and float32."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    with pyro.validation_enabled(True):
        yield
    torch.set_default_dtype(torch.float32)


@pytest.fixture
def one_thread():
    """One torch thread, for tests of tiny tensors: a second thread costs more than it gives, and
    far more on a busy machine (mark a module with ``pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def float64():
    """Run the test in float64: for checks that are about the math, not about speed."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The folder with MNIST/raw/*: ``../shared/data`` beside the checkout, or $PYROVAE_TEST_DATA.

    Outside CI (env var CI unset) a missing folder skips the test; in CI it fails it.
    """
    root = Path(os.environ.get("PYROVAE_TEST_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
    if not any(any(d.glob("train-images-idx3-ubyte*")) for d in (root, root / "MNIST" / "raw")):
        message = f"MNIST not found at {root}; set PYROVAE_TEST_DATA to the folder holding MNIST/raw"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(reason=message)
    return root
