"""Tests of the ``pyrovae`` command: run folders, resuming, pictures, and one-line errors for bad input."""

import importlib.metadata
import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import pyrovae
from pyrovae import session
from pyrovae.cli.main import main, run
from pyrovae.models import VAEConfig
from pyrovae.train import TrainConfig

SMALL = ["--hidden", "32", "--latent-dim", "4", "--no-progress"]
RUN_FILES = {"config.json", "metrics.jsonl", "checkpoint.pt", "best.pt", "samples.png", "reconstructions.png", "interpolations.png", "loss.png"}


# ---------------------------------------------------------------- helpers


def train(*args: str) -> int:
    return main(["train", *map(str, args), *SMALL])


def grid_size(n: int, nrow: int, height: int, width: int, padding: int = 1) -> tuple[int, int]:
    """(width, height) in pixels of torchvision's grid of n images, nrow per row."""
    cols, rows = min(nrow, n), math.ceil(n / nrow)
    return cols * (width + padding) + padding, rows * (height + padding) + padding


def image_size(path) -> tuple[int, int]:
    with Image.open(path) as image:
        image.load()  # reads every pixel: a truncated file fails here
        return image.size


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def load_checkpoint(run) -> dict:
    return torch.load(run / "checkpoint.pt", weights_only=True)


def assert_one_line_error(captured, command: str, pattern: str) -> None:
    err = captured.err
    assert "Traceback" not in err and "Traceback" not in captured.out
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"pyrovae {command}: error: "), err
    assert re.search(pattern, lines[0]), err


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A digits run folder trained for one epoch (absolute path, shared by the picture tests)."""
    run = tmp_path_factory.mktemp("cli") / "run"
    assert train("--epochs", "1", "--batch-size", "256", "--out", run) == 0
    return run


@pytest.fixture
def arrays(tmp_path, monkeypatch):
    """Work in tmp_path, with small .npy files and an empty folder in it."""
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    np.save("tiny.npy", rng.integers(0, 2, (10, 16)).astype(np.float32))  # 8 train + 2 test rows of 4x4
    np.save("big.npy", np.full((20, 16), 2.0, np.float32))
    np.save("grey.npy", rng.uniform(0.05, 0.95, (20, 16)).astype(np.float32))
    (tmp_path / "empty").mkdir()
    return tmp_path


# ---------------------------------------------------------------- train


def test_train_writes_a_complete_run_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert train("--epochs", "3", "--out", "run") == 0
    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} == RUN_FILES

    config = json.loads((run / "config.json").read_text())
    assert config["model"]["factory"] == "pyrovae.models:vae" and config["model"]["data_dim"] == 64
    assert config["model"]["args"] == {"latent_dim": 4, "hidden": [32], "activation": "elu", "likelihood": "bernoulli",
                                       "prior": "normal", "guide": "diagonal", "network": "mlp",
                                       "prior_args": None, "guide_args": None, "likelihood_args": None}
    assert config["train"] == TrainConfig(epochs=3).to_dict()
    assert config["data"]["dataset"] == "digits" and config["data"]["binarize"] == "dynamic"

    history = metrics(run)
    assert [m["epoch"] for m in history] == [0, 1, 2, 3]
    assert history[0]["train_elbo"] is None and history[0]["seconds"] == 0.0
    for m in history:
        assert {"epoch", "train_elbo", "test_elbo", "seconds"} <= set(m)
        assert math.isfinite(m["test_elbo"]) and m["test_elbo"] < 0
    for m in history[1:]:
        assert math.isfinite(m["train_elbo"]) and m["seconds"] >= 0
    assert history[-1]["test_elbo"] > history[0]["test_elbo"]

    assert load_checkpoint(run)["epoch"] == 3
    assert image_size(run / "samples.png") == grid_size(64, 8, 8, 8)
    assert image_size(run / "reconstructions.png") == grid_size(64, 8, 8, 8)  # 32 originals + 32 reconstructions
    assert image_size(run / "interpolations.png") == grid_size(8 * 10, 10, 8, 8)  # 8 pairs, 10 steps
    image_size(run / "loss.png")
    assert "run: epoch 3, test ELBO" in capsys.readouterr().out


def test_a_npy_file_trains_into_runs_by_default(arrays):
    assert train("--dataset", "tiny.npy", "--batch-size", "4", "--epochs", "1") == 0
    run = arrays / "runs" / "tiny"
    assert {p.name for p in run.iterdir()} == RUN_FILES
    assert image_size(run / "samples.png") == grid_size(64, 8, 4, 4)  # 16 values per row: 4x4 images


def test_grey_data_train_with_the_continuous_bernoulli(arrays):
    assert train("--dataset", "grey.npy", "--likelihood", "continuous-bernoulli", "--batch-size", "4", "--epochs", "1", "--out", "run") == 0
    config = json.loads((arrays / "run" / "config.json").read_text())
    assert config["data"]["binarize"] == "none"
    assert config["model"]["args"]["likelihood"] == "continuous-bernoulli"
    assert [m["epoch"] for m in metrics(arrays / "run")] == [0, 1]


def test_an_existing_run_needs_resume_or_overwrite(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    assert train("--epochs", "1", "--batch-size", "512", "--out", "run") == 0
    saved = (run / "checkpoint.pt").read_bytes()
    capsys.readouterr()

    assert train("--epochs", "1", "--batch-size", "512", "--out", "run") == 2
    assert_one_line_error(capsys.readouterr(), "train", r"run folder run already exists: pass --resume .* or --overwrite")
    assert (run / "checkpoint.pt").read_bytes() == saved  # untouched

    (run / "stray.txt").write_text("left over")
    assert train("--epochs", "2", "--batch-size", "512", "--out", "run", "--overwrite") == 0
    assert {p.name for p in run.iterdir()} == RUN_FILES  # the old folder is gone, not merged
    assert [m["epoch"] for m in metrics(run)] == [0, 1, 2]


def test_resumed_training_is_identical_to_uninterrupted_training(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    straight, resumed = tmp_path / "A", tmp_path / "B"
    assert train("--epochs", "4", "--out", "A") == 0
    assert train("--epochs", "2", "--out", "B") == 0
    with open(resumed / "metrics.jsonl", "a") as f:  # an epoch that ran after the last checkpoint, then died
        f.write(json.dumps({"epoch": 3, "train_elbo": -1.0, "test_elbo": -1.0, "seconds": 1.0}) + "\n")
    capsys.readouterr()
    assert main(["train", "--resume", "--epochs", "4", "--out", "B", "--no-progress"]) == 0
    assert "resuming B after epoch 2 of 4" in capsys.readouterr().out

    history = metrics(resumed)
    assert [m["epoch"] for m in history] == [0, 1, 2, 3, 4]
    assert json.loads((resumed / "config.json").read_text())["train"]["epochs"] == 4
    drop_seconds = [{k: v for k, v in m.items() if k != "seconds"} for m in history]
    assert drop_seconds == [{k: v for k, v in m.items() if k != "seconds"} for m in metrics(straight)]

    a, b = load_checkpoint(straight), load_checkpoint(resumed)
    assert a["epoch"] == b["epoch"] == 4
    assert a["module"].keys() == b["module"].keys()
    for name in a["module"]:
        assert torch.equal(a["module"][name], b["module"][name]), name
    assert torch.equal(a["torch_rng"], b["torch_rng"])
    assert torch.equal(a["batches"]["order_rng"], b["batches"]["order_rng"])
    assert torch.equal(a["batches"]["draw_rng"], b["batches"]["draw_rng"])
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key


def test_an_interrupted_run_exits_130(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)

    def interrupted_fit(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(session, "fit", interrupted_fit)
    assert train("--epochs", "1", "--out", "run") == 130
    assert capsys.readouterr().err.strip() == "pyrovae train: interrupted"


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def broken_fit(*args, **kwargs):
        raise RuntimeError("a bug in the engine")

    monkeypatch.setattr(session, "fit", broken_fit)
    with pytest.raises(RuntimeError, match="a bug in the engine"):
        train("--epochs", "1", "--out", "run")


# ---------------------------------------------------------------- bad input


no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here: the test is about a machine without it")


@pytest.mark.parametrize(
    "args, pattern",
    [
        pytest.param(["--dataset", "nope"], r"unknown data set 'nope': use one of digits, mnist", id="unknown-dataset"),
        pytest.param(["--dataset", "missing.npy"], r"data file not found: /.*/missing\.npy", id="missing-file"),
        pytest.param(["--device", "tpu"], r"unknown device 'tpu': use cpu, cuda, cuda:N or auto", id="device-tpu"),
        pytest.param(["--device", "cuda"], r"CUDA is not available .*--device cpu", id="device-cuda", marks=no_cuda),
        pytest.param(["--dataset", "tiny.npy", "--batch-size", "64"], r"batch size 64 is larger than the 7 training points", id="batch-too-large"),
        pytest.param(["--dataset", "big.npy"], r"dynamic binarization needs values in \[0, 1\], got min 2, max 2: rescale", id="values-above-1"),
        pytest.param(["--dataset", "grey.npy", "--binarize", "none"], r"observed site 'x'\) has \d+ values outside the support \{0, 1\}.*--binarize static or dynamic.*continuous-bernoulli", id="grey-bernoulli"),
        pytest.param(["--dataset", "mnist", "--data-dir", "empty"], r"mnist not found: looked for train-images-idx3-ubyte.*--data-dir", id="mnist-missing"),
        pytest.param(["--resume"], r"X is not a run folder \(no config\.json\)", id="resume-nothing"),
    ],
)
def test_bad_training_input_is_one_line_and_exit_2(arrays, capsys, args, pattern):
    assert train(*args, "--epochs", "1", "--out", "X") == 2
    assert_one_line_error(capsys.readouterr(), "train", pattern)
    assert not (arrays / "X").exists()  # no half-made run folder


def test_an_overflowing_gradient_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    """lr 1e16: after one step the parameters are ~1e16; the next loss (~1e35) is finite, its gradient is not."""
    monkeypatch.chdir(tmp_path)
    args = ["--lr", "1e16", "--hidden", "32", "32", "--activation", "tanh", "--epochs", "2", "--batch-size", "64"]
    assert main(["train", *args, "--latent-dim", "4", "--out", "run", "--no-progress"]) == 2
    assert_one_line_error(capsys.readouterr(), "train", r"epoch 1, step 1: the gradient became inf .*Try a smaller --lr")


def test_a_nan_loss_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    """lr 1e30: after one step the parameters are ~1e30 and the next loss is nan."""
    monkeypatch.chdir(tmp_path)
    assert train("--lr", "1e30", "--epochs", "1", "--batch-size", "256", "--out", "run") == 2
    assert_one_line_error(capsys.readouterr(), "train", r"epoch 1, step \d+: the loss became nan.*Try a smaller --lr")


@pytest.mark.parametrize("command", ["sample", "reconstruct", "interpolate"])
def test_a_folder_without_config_is_not_a_run(tmp_path, capsys, command):
    assert main([command, str(tmp_path)]) == 2
    assert_one_line_error(capsys.readouterr(), command, r"is not a run folder \(no config\.json\): give the folder that pyrovae train wrote")


@pytest.mark.parametrize("command", ["sample", "reconstruct", "interpolate"])
def test_a_run_without_checkpoint_says_train_first(tmp_path, capsys, command):
    config = {
        "model": VAEConfig(64, 4, (32,)).to_dict(),
        "data": {"dataset": "digits", "data_dir": None, "download": False, "binarize": "dynamic", "seed": 0},
        "train": TrainConfig().to_dict(),
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main([command, str(tmp_path)]) == 2
    assert_one_line_error(capsys.readouterr(), command, r"no checkpoint at .*checkpoint\.pt: train first")


def test_a_bad_device_for_sample_is_one_line(trained_run, capsys):
    assert main(["sample", str(trained_run), "--device", "tpu"]) == 2
    assert_one_line_error(capsys.readouterr(), "sample", r"unknown device 'tpu'")


def test_a_run_interrupted_in_its_first_epoch_resumes_from_its_start(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)

    def interrupted_fit(*args, **kwargs):  # dies in epoch 1, before the first epoch's checkpoint
        raise KeyboardInterrupt

    monkeypatch.setattr(session, "fit", interrupted_fit)
    assert train("--epochs", "1", "--out", "run") == 130
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    assert load_checkpoint(tmp_path / "run")["epoch"] == 0
    capsys.readouterr()
    assert main(["train", "--resume", "--out", "run", "--no-progress"]) == 0
    assert "resuming run after epoch 0 of 1" in capsys.readouterr().out
    assert [m["epoch"] for m in metrics(tmp_path / "run")] == [0, 1]


def test_resume_without_a_checkpoint_says_train_first(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert train("--epochs", "1", "--out", "run") == 0
    (tmp_path / "run" / "checkpoint.pt").unlink()
    capsys.readouterr()
    assert main(["train", "--resume", "--out", "run", "--no-progress"]) == 2
    assert_one_line_error(capsys.readouterr(), "train", r"no checkpoint at run/checkpoint\.pt")


# ---------------------------------------------------------------- pictures


@pytest.mark.parametrize(
    "command, options, default_name, size",
    [
        pytest.param("sample", [], "samples.png", grid_size(64, 8, 8, 8), id="sample"),
        pytest.param("sample", ["-n", "16"], None, grid_size(16, 8, 8, 8), id="sample-16"),
        pytest.param("reconstruct", [], "reconstructions.png", grid_size(64, 8, 8, 8), id="reconstruct"),
        pytest.param("reconstruct", ["-n", "8", "--split", "train"], None, grid_size(16, 8, 8, 8), id="reconstruct-8-train"),
        pytest.param("interpolate", [], "interpolations.png", grid_size(80, 10, 8, 8), id="interpolate"),
        pytest.param("interpolate", ["--pairs", "3", "--steps", "5"], None, grid_size(15, 5, 8, 8), id="interpolate-3x5"),
    ],
)
def test_picture_commands_write_pngs(trained_run, tmp_path, capsys, command, options, default_name, size):
    if default_name is None:
        path = tmp_path / f"{command}.png"
        options = [*options, "--out", str(path)]
    else:
        path = trained_run / default_name
        path.unlink()
    assert main([command, str(trained_run), *options]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {path}"
    assert image_size(path) == size
    with Image.open(path) as image:
        assert image.mode == "RGB"


def test_sample_is_reproducible_for_a_seed(trained_run, tmp_path):
    def pixels(seed, name):
        path = tmp_path / name
        assert main(["sample", str(trained_run), "--seed", str(seed), "--out", str(path)]) == 0
        with Image.open(path) as image:
            return np.asarray(image)

    first, again, other = pixels(3, "a.png"), pixels(3, "b.png"), pixels(4, "c.png")
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


# ---------------------------------------------------------------- help, version, entry point


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["sample", "--help"], ["reconstruct", "--help"], ["interpolate", "--help"]],
                         ids=["pyrovae", "train", "sample", "reconstruct", "interpolate"])
def test_help_exits_0(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: pyrovae")
    if argv[0] == "train":
        assert "--resume" in out and "--overwrite" in out


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert "required: COMMAND" in capsys.readouterr().err


def test_the_module_runs_as_a_command():
    result = subprocess.run([sys.executable, "-m", "pyrovae.cli.main", "--version"], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"pyrovae {pyrovae.__version__}"


def test_the_console_script_is_installed():
    (entry,) = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "pyrovae"]
    assert entry.value == "pyrovae.cli.main:run"
    assert entry.load() is run


# ---------------------------------------------------------------- MNIST


@pytest.mark.slow
def test_train_one_epoch_on_mnist(mnist_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["--dataset", "mnist", "--data-dir", mnist_dir, "--epochs", "1", "--hidden", "64", "--latent-dim", "8", "--batch-size", "256"]
    assert main(["train", *map(str, args), "--out", "run", "--no-progress"]) == 0
    history = metrics(tmp_path / "run")
    assert [m["epoch"] for m in history] == [0, 1]
    assert math.isfinite(history[1]["train_elbo"])
    # the output bias starts at the pixels' logit means: the marginal fit, ≈ −206 nats plus a small KL (784 fair coins: −543)
    assert -230 < history[0]["test_elbo"] < -200
    assert history[1]["test_elbo"] > history[0]["test_elbo"] + 30
    assert image_size(tmp_path / "run" / "samples.png") == grid_size(64, 8, 28, 28)


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "thesis.tex").write_text("precious")
    code = main(["train", "--epochs", "1", "--hidden", "8", "--latent-dim", "2", "--out", "notes", "--overwrite", "--no-progress"])
    assert code == 2
    assert "not a run folder" in capsys.readouterr().err
    assert (tmp_path / "notes" / "thesis.tex").read_text() == "precious"
