"""Nothing is lost: exact resume after a hard kill, clean stops on SIGINT/SIGTERM, checkpoints on a
schedule, failed writes, non-finite steps skipped or stopped at, gradient clipping, devices."""

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pyrovae import checkpoint
from pyrovae.cli.main import main
from pyrovae.data import Batches
from pyrovae.errors import PyrovaeError
from pyrovae.run import Run, random_states, set_random_states
from pyrovae.train import train_step
from test_cli import assert_one_line_error

SMALL = ["--hidden", "16", "--latent-dim", "2", "--no-progress"]
MODELS = Path(__file__).parent / "models"


def pyrovae(*argv, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "pyrovae.cli.main", *map(str, argv)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


TRAIN = ["train", "--epochs", "6", "--batch-size", "16", "--checkpoint-every", "7", *SMALL]


@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_to_the_same_parameters(tmp_path):
    """SIGKILL at a random moment after the first epoch; the resumed run ends torch.equal to an
    uninterrupted one with the same seed (parameters, optimizer state, random states)."""
    straight = pyrovae(*TRAIN, "--out", tmp_path / "A")
    killed = pyrovae(*TRAIN, "--out", tmp_path / "B")
    while lines(tmp_path / "B" / "metrics.jsonl") < 2:  # epoch 0 and epoch 1 written
        assert killed.poll() is None, killed.communicate()[1]
        time.sleep(0.01)
    time.sleep(random.Random(0).uniform(0.0, 0.3))
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    out, err = straight.communicate()
    assert straight.returncode == 0, err
    state = torch.load(tmp_path / "B" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] < 6, "the run finished before it was killed"
    resumed = pyrovae("train", "--resume", "--out", tmp_path / "B", "--no-progress")
    out, err = resumed.communicate()
    assert resumed.returncode == 0, err
    a = torch.load(tmp_path / "A" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "B" / "checkpoint.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 6
    for name in a["module"]:
        assert torch.equal(a["module"][name], b["module"][name]), name
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(a["torch_rng"], b["torch_rng"])
    ma = [{k: v for k, v in m.items() if k != "seconds"} for m in map(json.loads, (tmp_path / "A" / "metrics.jsonl").read_text().splitlines())]
    mb = [{k: v for k, v in m.items() if k != "seconds"} for m in map(json.loads, (tmp_path / "B" / "metrics.jsonl").read_text().splitlines())]
    assert ma == mb


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_a_signal_finishes_the_step_writes_a_checkpoint_and_says_how_to_resume(signum, code, tmp_path):
    run = tmp_path / "run"
    job = pyrovae("train", "--epochs", "50", "--batch-size", "16", "--out", run, *SMALL)
    while lines(run / "metrics.jsonl") < 2:
        assert job.poll() is None, job.communicate()[1]
        time.sleep(0.01)
    job.send_signal(signum)
    out, err = job.communicate()
    assert job.returncode == code, err
    assert "Traceback" not in err
    assert f"{signal.Signals(signum).name}: stopped after epoch" in err
    assert f"resume with: pyrovae train --out {run} --resume" in err
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    done = state["epoch"] + (state["progress"]["step"] if state["progress"] else 0) / 90
    assert 1 <= done < 50
    resumed = pyrovae("train", "--resume", "--epochs", str(state["epoch"] + 1), "--out", run, "--no-progress")
    out, err = resumed.communicate()
    assert resumed.returncode == 0, err


def test_checkpoints_every_n_steps_besides_every_epoch(tmp_path, monkeypatch):
    saved = []
    original = Run.save_checkpoint

    def recording(self, model, params, optimizer, batches, epoch, progress=None, extra=None, name="checkpoint.pt"):
        if name == "checkpoint.pt":
            saved.append((epoch, None if progress is None else progress["step"]))
        return original(self, model, params, optimizer, batches, epoch, progress, extra, name)

    monkeypatch.setattr(Run, "save_checkpoint", recording)
    assert main(["train", "--epochs", "2", "--batch-size", "100", "--checkpoint-every", "5", "--out", str(tmp_path / "r"), *SMALL]) == 0
    # 1294 training digits (1438 less 10 % for validation) in batches of 100: 13 steps per epoch; epoch 0 before training
    assert saved == [(0, None), (0, 5), (0, 10), (1, None), (1, 5), (1, 10), (2, None)]


def test_a_failed_checkpoint_write_stops_training_and_keeps_the_last_good_one(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--out", str(run), *SMALL]) == 0
    good = sha(run / "checkpoint.pt")
    calls = []

    def full_disk(obj, path):
        calls.append(path)
        raise checkpoint.CheckpointWriteError(f"cannot write checkpoint {path}: No space left on device (ENOSPC)", 28)

    monkeypatch.setattr(checkpoint, "save_atomic", full_disk)
    capsys.readouterr()
    assert main(["train", "--resume", "--epochs", "3", "--out", str(run), "--no-progress"]) == 2
    assert_one_line_error(capsys.readouterr(), "train", r"cannot write checkpoint .*checkpoint.pt: No space left on device")
    assert len(calls) == 1 and sha(run / "checkpoint.pt") == good


def test_a_non_finite_step_stops_training_naming_the_step_and_the_last_good_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    # --capture off: Flaky's Python counts its calls, which a captured step does not repeat
    assert main(["train", "--model", f"{MODELS / 'styles.py'}:flaky", "--epochs", "2", "--capture", "off", "--out", str(run), "--no-progress"]) == 2
    assert_one_line_error(capsys.readouterr(), "train",
                          r"epoch 1, step 3: the loss became nan.*last good checkpoint, .*checkpoint.pt \(epoch 0\), is intact")
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 0


def test_skip_nonfinite_skips_and_counts_such_steps(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--model", f"{MODELS / 'styles.py'}:flaky", "--model-arg", "every=3", "--epochs", "2", "--capture", "off",
            "--out", str(run), "--no-progress"]  # eager: Flaky's Python counts its calls
    assert main([*argv, "--skip-nonfinite", "100"]) == 0
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # 11 steps per epoch (1294 training digits, batch 128); the model's every third training call is nan
    assert [m.get("skipped") for m in history[1:]] == [3, 7]
    assert all(np.isfinite(m["train_elbo"]) for m in history[1:])


def test_clip_grad_clips_the_total_norm_before_the_step():
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    optimizer = torch.optim.SGD([w], lr=1.0)
    train_step(lambda x: (w * x).sum(), optimizer, torch.tensor([3.0, 4.0]), clip_grad=1.0)  # gradient (3, 4), norm 5
    torch.testing.assert_close(w.detach(), torch.tensor([3.0 - 0.6, 4.0 - 0.8]))
    w2 = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    train_step(lambda x: (w2 * x).sum(), torch.optim.SGD([w2], lr=1.0), torch.tensor([3.0, 4.0]))
    torch.testing.assert_close(w2.detach(), torch.tensor([0.0, 0.0]))  # unclipped: the broken variant differs


def test_random_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    checkpoint.save_atomic(random_states(), tmp_path / "c.pt")
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    set_random_states(checkpoint.load(tmp_path / "c.pt"))
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert [random.random() for _ in range(3)] == expected[2]


def test_batch_state_from_another_device_type_loads():
    """A dynamic-binarization stream saved by a CUDA generator (16-byte state) resumes on the CPU,
    and generator states loaded onto any device are moved back to the CPU."""
    x = torch.rand(20, 4)
    saved = Batches(x, 5, "dynamic", seed=0).state_dict()
    saved["draw_rng"] = torch.arange(16, dtype=torch.uint8)  # the size of a CUDA generator's state
    batches = Batches(x, 5, "dynamic", seed=0)
    batches.load_state_dict(saved)
    first = [xb for _, xb in batches]
    again = Batches(x, 5, "dynamic", seed=0)
    again.load_state_dict(saved)
    assert all(torch.equal(a, b) for a, b in zip(first, (xb for _, xb in again)))  # deterministic


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("first, second", [("cuda", "cuda"), ("cpu", "cuda"), ("cuda", "cpu")])
def test_resume_across_devices(first, second, tmp_path):
    run = str(tmp_path / "run")
    assert main(["train", "--epochs", "1", "--device", first, "--out", run, *SMALL]) == 0
    assert main(["train", "--resume", "--epochs", "2", "--device", second, "--out", run, "--no-progress"]) == 0
    assert main(["evaluate", run, "--device", second, "-k", "20", "--no-compile", "--no-progress"]) == 0
