"""A run folder keeps one held-out split for every command, and the traps around run folders:
resume options, --overwrite, relative paths, file modes, bad numbers."""

import hashlib
import json
import os
import stat

import numpy as np
import pytest
import torch

from pyrovae.cli import evaluate as evaluate_command
from pyrovae import pictures, session
from pyrovae.cli.main import main
from pyrovae.errors import PyrovaeError
from pyrovae.data import load_dataset
from test_cli import assert_one_line_error

SMALL = ["--hidden", "16", "--latent-dim", "2", "--no-progress"]


def rows(x: torch.Tensor) -> set[bytes]:
    return {r.numpy().tobytes() for r in x.detach().cpu().float()}


class Recorder:
    """Wraps a function of the CLI, recording the data tensors it is given."""

    def __init__(self, monkeypatch, module, name: str, arg: int | tuple[int, ...]):
        self.seen: list[torch.Tensor] = []
        original = getattr(module, name)
        positions = arg if isinstance(arg, tuple) else (arg,)

        def wrapped(*args, **kwargs):
            for i in positions:
                x = args[i]
                self.seen.append(x if x.ndim == 2 else x[None])
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapped)

    def rows(self) -> set[bytes]:
        return set().union(*(rows(x) for x in self.seen))


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 3])
def test_every_command_holds_out_the_points_training_never_saw(seed, tmp_path, monkeypatch, capsys):
    """Train (and resume) with --seed, record the rows batches are drawn from, and check that the rows
    evaluate, reconstruct and interpolate use as held-out are disjoint from them."""
    monkeypatch.chdir(tmp_path)
    grey = ["--likelihood", "continuous-bernoulli"]  # no binarization: rows compare as they are
    batches = Recorder(monkeypatch, session, "Batches", 0)
    assert main(["train", "--seed", str(seed), "--epochs", "1", "--out", "run", *grey, *SMALL]) == 0
    assert main(["train", "--resume", "--epochs", "2", "--out", "run", "--no-progress"]) == 0
    trained = [rows(x) for x in batches.seen]
    assert len(trained) == 2 and trained[0] == trained[1]  # the resumed run trains on the same rows

    held_out = {
        "evaluate": Recorder(monkeypatch, evaluate_command, "evaluate", 2),
        "reconstruct": Recorder(monkeypatch, pictures, "reconstruct", 2),
        "interpolate": Recorder(monkeypatch, pictures, "interpolate", (2, 3)),
    }
    assert main(["evaluate", "run", "-k", "10", "--particles-elbo", "2", "--no-compile", "--no-progress"]) == 0
    assert main(["reconstruct", "run"]) == 0
    assert main(["interpolate", "run"]) == 0
    digits = load_dataset("digits", seed=seed)
    for command, recorder in held_out.items():
        assert recorder.seen, command
        assert recorder.rows().isdisjoint(trained[0]), command
        assert recorder.rows() <= rows(digits.test), command
    assert len(held_out["evaluate"].rows()) == len(digits.test) == 359
    assert trained[0] < rows(digits.train)  # less the validation rows
    # the check can fail: the seed-0 split, which every command used before splits were recorded, overlaps
    assert not rows(load_dataset("digits", seed=0).test).isdisjoint(trained[0])


def test_a_run_written_before_splits_were_recorded_is_evaluated_on_the_seed_0_split(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--seed", "3", "--epochs", "1", "--out", "run", "--likelihood", "continuous-bernoulli", *SMALL]) == 0
    config_file = tmp_path / "run" / "config.json"
    config = json.loads(config_file.read_text())
    for key in ("split_seed", "test_fraction", "heldout_sha256"):
        del config["data"][key]
    config_file.write_text(json.dumps(config))
    seen = Recorder(monkeypatch, evaluate_command, "evaluate", 2)
    capsys.readouterr()
    assert main(["evaluate", "run", "-k", "10", "--particles-elbo", "2", "--no-compile", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert err.count("was written before splits were recorded: it trained on the seed-0 split") == 1
    assert seen.rows() == rows(load_dataset("digits", seed=0).test)


def test_changed_held_out_data_are_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    x = np.random.default_rng(0).random((40, 16)).astype(np.float32)
    np.savez(tmp_path / "mine.npz", train=x[:30], test=x[30:])
    assert main(["train", "--dataset", "mine.npz", "--likelihood", "continuous-bernoulli", "--batch-size", "10",
                 "--epochs", "1", "--out", "run", *SMALL]) == 0
    np.savez(tmp_path / "mine.npz", train=x[:30], test=x[29:])
    capsys.readouterr()
    assert main(["sample", "run"]) == 2
    assert_one_line_error(capsys.readouterr(), "sample", r"held-out data of .*mine.npz are not those run was trained beside")


def test_relative_paths_are_recorded_absolute_and_the_run_reads_from_anywhere(tmp_path, monkeypatch, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    x = np.random.default_rng(0).random((40, 4, 4)).astype(np.float32)
    np.save("mine.npy", x)
    assert main(["train", "--dataset", "mine.npy", "--likelihood", "continuous-bernoulli", "--batch-size", "8",
                 "--epochs", "1", "--out", "run", *SMALL]) == 0
    config = json.loads((tmp_path / "a" / "run" / "config.json").read_text())
    assert config["data"]["dataset"] == str(tmp_path / "a" / "mine.npy")
    monkeypatch.chdir(tmp_path / "b")
    assert main(["sample", str(tmp_path / "a" / "run")]) == 0


def test_every_file_of_a_run_folder_has_the_same_mode(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--epochs", "1", "--out", "run", *SMALL]) == 0
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "run").iterdir()}
    umask = os.umask(0)
    os.umask(umask)
    assert set(modes.values()) == {0o666 & ~umask}, modes


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--latent-dim", "0"], r"argument --latent-dim: must be positive, got 0"),
        (["--epochs", "-3"], r"argument --epochs: must be positive, got -3"),
        (["--lr", "0"], r"argument --lr: must be positive, got 0"),
        (["--batch-size", "x"], r"argument --batch-size: 'x' is not a int"),
    ],
    ids=["latent-dim-0", "epochs-negative", "lr-0", "batch-size-text"],
)
def test_non_positive_numbers_are_refused_in_one_line(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--out", str(tmp_path / "run"), *argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("pyrovae train: error: ")
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "run").exists()


def test_out_naming_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    assert main(["train", "--out", str(tmp_path / "file"), *SMALL]) == 2
    assert_one_line_error(capsys.readouterr(), "train", r"--out .*file is a file, not a folder")
    assert (tmp_path / "file").read_text() == "mine"


def folder_hash(path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def test_resume_applies_what_can_change_and_refuses_the_rest(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--epochs", "2", "--out", "run", *SMALL]) == 0
    before = folder_hash(tmp_path / "run")
    for argv, message in [
        (["--batch-size", "64"], r"--batch-size cannot change on --resume"),
        (["--likelihood", "continuous-bernoulli", "--seed", "4"], r"--likelihood, --seed cannot change on --resume"),
        (["--epochs", "1"], r"run has trained 2 epochs already: give --epochs above 2"),
    ]:
        capsys.readouterr()
        assert main(["train", "--resume", "--out", "run", "--no-progress", *argv]) == 2
        assert_one_line_error(capsys.readouterr(), "train", message)
        assert folder_hash(tmp_path / "run") == before

    capsys.readouterr()
    assert main(["train", "--resume", "--out", "run", "--no-progress", "--epochs", "3", "--lr", "0.0005"]) == 0
    out = capsys.readouterr().out
    assert "resuming with epochs 3, lr 0.0005" in out
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["train"]["lr"] == 0.0005 and config["train"]["epochs"] == 3
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert {g["lr"] for g in state["optimizer"]["param_groups"]} == {0.0005}


def test_overwrite_keeps_the_old_run_until_the_new_one_has_a_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--epochs", "1", "--out", "run", *SMALL]) == 0
    (tmp_path / "run" / "notes.txt").write_text("my notes")
    before = folder_hash(tmp_path / "run")

    def diverges(*args, **kwargs):
        raise PyrovaeError("the loss became nan")

    monkeypatch.setattr(session, "fit", diverges)
    assert main(["train", "--epochs", "1", "--out", "run", "--overwrite", *SMALL]) == 2
    assert folder_hash(tmp_path / "run") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing left beside it
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--epochs", "1", "--out", "run", "--overwrite", *SMALL]) == 0
    assert not (tmp_path / "run" / "notes.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_evaluate_refuses_grey_levels_under_a_bernoulli_likelihood():
    from pyrovae.evaluate import evaluate
    from pyrovae.errors import DataError
    from pyrovae.models import vae

    model = vae(64, latent_dim=2, hidden=(16,))
    grey = load_dataset("digits").test[:10]
    with pytest.raises(DataError, match=r"observed site 'x'\) has \d+ values outside the support \{0, 1\}.*binarize"):
        evaluate(model.model, model.guide, grey, num_samples=10, particles_elbo=2)


def test_validation_rows_are_carved_from_training_and_decide_best_and_early_stopping(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    batches = Recorder(monkeypatch, session, "Batches", 0)
    argv = ["train", "--likelihood", "continuous-bernoulli", "--validation-fraction", "0.25", "--early-stopping", "1",
            "--lr", "0.2", "--epochs", "30", "--out", "run", *SMALL]
    assert main(argv) == 0
    digits = load_dataset("digits", seed=0)
    trained = batches.rows()
    assert len(trained) == round(0.75 * len(digits.train)) and trained < rows(digits.train)
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][1:]
    assert all("valid_elbo" in m for m in history)
    assert history[-1].get("stopped_early") and len(history) < 30  # a large rate stops improving soon
    best = max(history, key=lambda m: m["valid_elbo"])
    assert [m["epoch"] for m in history if m["best"]][-1] == best["epoch"]
    assert not history[-1]["best"]  # stopped one epoch after the last improvement
    state = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert state["epoch"] == best["epoch"] and state["monitor"]["best"] == best["valid_elbo"]
    capsys.readouterr()
    assert main(["evaluate", "run", "--checkpoint", "best", "--split", "valid", "-k", "5", "--particles-elbo", "2",
                 "--no-compile", "--no-progress"]) == 0
    assert f"valid split, {len(digits.train) - len(trained)} points" in capsys.readouterr().out


def test_the_cosine_schedule_is_resumed_where_it_stopped(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = ["--lr-schedule", "cosine", "--lr", "0.01", *SMALL]
    assert main(["train", "--epochs", "4", "--out", "A", *common]) == 0
    fit = session.fit

    def stopped_after_epoch_2(*args, **kwargs):
        def on_epoch_end(metrics):
            args[6](metrics)
            if metrics["epoch"] == 2:
                raise KeyboardInterrupt

        return fit(*args[:6], on_epoch_end, **kwargs)

    monkeypatch.setattr(session, "fit", stopped_after_epoch_2)
    assert main(["train", "--epochs", "4", "--out", "B", *common]) == 130
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--resume", "--out", "B", "--no-progress"]) == 0
    lrs = {run: [json.loads(line).get("lr") for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()][1:]
           for run in "AB"}
    expected = [0.01 * (1 + np.cos(np.pi * e / 4)) / 2 for e in range(1, 5)]  # the rate for the next epoch
    np.testing.assert_allclose(lrs["A"], expected, atol=1e-12)
    assert lrs["A"] == lrs["B"]


def test_tensorboard_curves_are_written_and_read_back(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)
    assert main(["train", "--epochs", "2", "--tensorboard", "--out", "run", *SMALL]) == 0
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"elbo/train", "elbo/valid", "elbo/test", "train/lr", "train/grad_norm", "terms/reconstruction", "terms/kl_z"} <= scalars
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][1:]
    logged = [e.value for e in events.Scalars("elbo/valid")]
    np.testing.assert_allclose(logged, [m["valid_elbo"] for m in history], rtol=1e-6)
    assert [e.step for e in events.Scalars("train/grad_norm")] == [1, 2]
    assert {"samples", "reconstructions"} <= set(events.Tags()["images"])


@pytest.mark.parametrize("objective", [["elbo"], ["mean-field"], ["iwae", "--particles", "3"]], ids=["elbo", "mean-field", "iwae"])
def test_a_captured_training_step_trains_as_the_eager_one(tmp_path, monkeypatch, objective):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--epochs", "2", "--objective", *objective, "--out", "eager", *SMALL]) == 0
    assert main(["train", "--epochs", "2", "--objective", *objective, "--capture", "--out", "captured", *SMALL]) == 0
    a, b = (torch.load(tmp_path / run / "checkpoint.pt", weights_only=True) for run in ("eager", "captured"))
    for name in a["module"]:
        torch.testing.assert_close(a["module"][name], b["module"][name], rtol=1e-5, atol=1e-6)
    assert json.loads((tmp_path / "captured" / "config.json").read_text())["train"]["capture"] == "auto"


def test_the_capture_mode_is_recorded_and_can_change_on_resume(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--epochs", "1", "--out", "run", *SMALL]) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["capture"] == "auto"  # the default
    assert main(["train", "--resume", "--epochs", "2", "--capture", "graph", "--out", "run", *SMALL[-1:]]) == 0
    assert "resuming with epochs 2, capture graph" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["capture"] == "graph"
    assert main(["train", "--resume", "--epochs", "3", "--capture", "off", "--out", "run", *SMALL[-1:]]) == 0
    assert "capture False" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["capture"] is False


def test_a_checkpoint_of_a_newer_format_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--epochs", "1", "--out", "run", *SMALL]) == 0
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    torch.save({**state, "format": 99}, tmp_path / "run" / "checkpoint.pt")
    capsys.readouterr()
    assert main(["sample", "run"]) == 2
    assert_one_line_error(capsys.readouterr(), "sample", r"the checkpoint has format 99, newer than this pyrovae reads \(2\)")


@pytest.mark.parametrize("command", ["sample", "reconstruct", "interpolate"])
def test_vectors_are_not_pictured_and_the_commands_say_so(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    np.save("vectors.npy", np.random.default_rng(0).random((40, 5)).astype(np.float32))
    assert main(["train", "--dataset", "vectors.npy", "--likelihood", "gaussian", "--batch-size", "8",
                 "--epochs", "1", "--out", "run", *SMALL]) == 0
    assert "no pictures (the data are not images)" in capsys.readouterr().out
    assert main([command, "run"]) == 2
    assert_one_line_error(capsys.readouterr(), command, r"cannot draw \w+: the data set's points are vectors, not images")
