"""Bad input through the command line: each case exits with code 2 and one line on stderr naming
the file, shape or value at fault, without a traceback, and leaves every run folder as it was.

One small run folder is trained once for the module; a case that needs a damaged run damages a
copy. Before and after each case, the intact run folder and the case's own folder are
fingerprinted (names, modes, bytes): a refused command writes, moves and deletes nothing.
Cases the commands do not answer well yet are kept in the table as strict xfails.
"""

import hashlib
import json
import os
import re
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from pyrovae.cli.main import main

MODELS = Path(__file__).parent / "models"
BROKEN = MODELS / "broken.py"
SMALL = ["--epochs", "1", "--hidden", "16", "--latent-dim", "2", "--no-progress"]
RUN, COPY = "<run>", "<copy>"  # in a case's argv: the intact run folder; the case's damaged copy ("copy")

Setup = Callable[[Path, Path], None]  # (the case's folder, the intact run folder)


# ---------------------------------------------------------------- command lines


def train(*args: str, out: str = "X") -> list[str]:
    """A new small run into ``out``; later options win, so ``args`` may override SMALL."""
    return ["train", "--out", out, *SMALL, "--batch-size", "4", *args]


def train_own(model: str, *args: str) -> list[str]:
    """A new run of a user's model, without the built-in VAE's options (a user's factory may not take them)."""
    return ["train", "--out", "X", "--model", model, "--epochs", "1", "--batch-size", "4", "--no-progress", *args]


def resume(run: str, *args: str) -> list[str]:
    return ["train", "--resume", "--out", run, "--no-progress", *args]


def evaluate(run: str, *args: str) -> list[str]:
    return ["evaluate", run, "-k", "10", "--limit", "4", "--particles-elbo", "4", "--no-compile", "--no-progress", *args]


# ---------------------------------------------------------------- what a case finds in its folder


def rows(n: int = 16, shape: tuple[int, ...] = (8, 8)) -> np.ndarray:
    """n binary images as float32, (n, *shape)."""
    return np.random.default_rng(0).integers(0, 2, (n, *shape)).astype(np.float32)


def with_value(value: float) -> Callable[[], np.ndarray]:
    """rows() with its first value replaced."""

    def make() -> np.ndarray:
        a = rows()
        a[0, 0, 0] = value
        return a

    return make


def npy(name: str, make: Callable[[], np.ndarray]) -> Setup:
    return lambda ws, run: np.save(ws / name, make(), allow_pickle=True)


def npz(name: str, **make: Callable[[], np.ndarray]) -> Setup:
    return lambda ws, run: np.savez(ws / name, **{key: f() for key, f in make.items()})


def write(name: str, content: bytes | str) -> Setup:
    return lambda ws, run: _write(ws / name, content)


def cut(name: str, setup: Setup, keep: float = 0.5) -> Setup:
    """What ``setup`` makes, then the file ``name`` cut to ``keep`` of its bytes."""

    def make(ws: Path, run: Path) -> None:
        setup(ws, run)
        data = (ws / name).read_bytes()
        (ws / name).write_bytes(data[: int(len(data) * keep)])

    return make


def folder(name: str, *files: str) -> Setup:
    def make(ws: Path, run: Path) -> None:
        (ws / name).mkdir()
        for file in files:
            (ws / name / file).write_text("notes\n")

    return make


def unreadable(name: str) -> Setup:
    def make(ws: Path, run: Path) -> None:
        np.save(ws / name, rows())
        os.chmod(ws / name, 0)

    return make


def idx(magic: int, dims: tuple[int, ...]) -> bytes:
    """An IDX file of zero bytes: magic number, dimensions, values."""
    return magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims) + bytes(int(np.prod(dims)))


def mnist_files(images: bytes, name: str = "train-images-idx3-ubyte") -> Setup:
    """A folder "idx" with MNIST's four files (16 + 4 images of 8x8), the training images being ``images``."""

    def make(ws: Path, run: Path) -> None:
        (ws / "idx").mkdir()
        (ws / "idx" / name).write_bytes(images)
        (ws / "idx" / "train-labels-idx1-ubyte").write_bytes(idx(2049, (16,)))
        (ws / "idx" / "t10k-images-idx3-ubyte").write_bytes(idx(2051, (4, 8, 8)))
        (ws / "idx" / "t10k-labels-idx1-ubyte").write_bytes(idx(2049, (4,)))

    return make


def damaged_run(*damages: Callable[[Path], None]) -> Setup:
    """A copy of the intact run in the folder "copy", then each damage done to it."""

    def make(ws: Path, run: Path) -> None:
        shutil.copytree(run, ws / "copy")
        for damage in damages:
            damage(ws / "copy")

    return make


def replace(name: str, content: bytes | str) -> Callable[[Path], None]:
    return lambda run: _write(run / name, content)


def truncate(name: str, keep: float = 0.5) -> Callable[[Path], None]:
    def damage(run: Path) -> None:
        data = (run / name).read_bytes()
        (run / name).write_bytes(data[: int(len(data) * keep)])

    return damage


def edit_config(change: Callable[[dict, Path], None]) -> Callable[[Path], None]:
    """config.json changed by ``change(config, run)``, written back as valid JSON."""

    def damage(run: Path) -> None:
        config = json.loads((run / "config.json").read_text())
        change(config, run)
        (run / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    return damage


def _write(path: Path, content: bytes | str) -> None:
    path.write_bytes(content.encode() if isinstance(content, str) else content)


# ---------------------------------------------------------------- the cases


@dataclass
class Case:
    id: str
    argv: list[str]
    pattern: str  # a regular expression the one line must contain
    setup: Setup | None = None
    marks: tuple = ()


def bug(reason: str) -> tuple:
    """A case the command does not answer in one line with exit code 2 yet."""
    return (pytest.mark.xfail(strict=True, reason=reason),)


as_root = pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="as root, permission bits do not stop reads")
MNIST = ("--dataset", "mnist", "--data-dir", "idx")
IMAGES = r"idx/train-images-idx3-ubyte"

CASES = [
    # arrays of the wrong shape or dtype
    Case("npy-1d", train("--dataset", "x.npy"), r"x\.npy \['train'\] has shape \(16,\): expected \(N, P\), \(N, H, W\) or \(N, C, H, W\)",
         npy("x.npy", lambda: np.zeros(16, np.float32))),
    Case("npy-5d", train("--dataset", "x.npy"), r"x\.npy \['train'\] has shape \(16, 1, 2, 4, 8\): expected",
         npy("x.npy", lambda: rows().reshape(16, 1, 2, 4, 8))),
    Case("npy-channels-last", train("--dataset", "x.npy"), r"x\.npy \['train'\] has shape \(16, 8, 8, 3\).*a\.transpose\(0, 3, 1, 2\)",
         npy("x.npy", lambda: np.zeros((16, 8, 8, 3), np.float32))),
    Case("npy-strings", train("--dataset", "x.npy"), r"x\.npy \['train'\] has dtype <U1: expected numbers",
         npy("x.npy", lambda: np.full((16, 64), "a"))),
    Case("npy-objects", train("--dataset", "x.npy"), r"cannot read /.*/x\.npy as a NumPy \.npy/\.npz file: Object arrays cannot be loaded",
         npy("x.npy", lambda: np.array([[0.0, None]] * 16, dtype=object))),
    Case("npy-complex", train("--dataset", "x.npy"), r"x\.npy \['train'\] has dtype complex64: expected numbers",
         npy("x.npy", lambda: rows().astype(np.complex64))),
    Case("npz-test-strings", train("--dataset", "x.npz"), r"x\.npz \['test'\] has dtype <U1: expected numbers",
         npz("x.npz", train=rows, test=lambda: np.full((4, 64), "a"))),
    Case("npz-train-test-widths", train("--dataset", "x.npz"), r"x\.npz: 'train' rows have 64 values .* but 'test' rows have 16",
         npz("x.npz", train=rows, test=lambda: rows(4, (4, 4)))),
    Case("npz-no-train", train("--dataset", "x.npz"), r"x\.npz holds arrays \['a', 'b'\] but none named 'train'",
         npz("x.npz", a=rows, b=rows)),
    # values that are not finite, or outside the likelihood's support
    Case("npy-nan", train("--dataset", "x.npy"), r"x\.npy \['train'\] has 1 NaN or infinite values", npy("x.npy", with_value(np.nan))),
    Case("npy-inf", train("--dataset", "x.npy"), r"x\.npy \['train'\] has 1 NaN or infinite values", npy("x.npy", with_value(np.inf))),
    Case("npz-test-nan", train("--dataset", "x.npz"), r"x\.npz \['test'\] has 1 NaN or infinite values",
         npz("x.npz", train=rows, test=lambda: with_value(np.nan)()[:4])),
    Case("grey-bernoulli-no-binarize", train("--dataset", "x.npy", "--binarize", "none"),
         r"observed site 'x'\) has \d+ values outside the support \{0, 1\} .*\(e\.g\. 0\.5\).*--binarize static or dynamic",
         npy("x.npy", lambda: np.full((16, 64), 0.5, np.float32))),
    Case("value-2-static", train("--dataset", "x.npy", "--binarize", "static"),
         r"static binarization needs values in \[0, 1\], got min 0, max 2: rescale", npy("x.npy", with_value(2.0))),
    Case("value-2-dynamic", train("--dataset", "x.npy"),
         r"dynamic binarization needs values in \[0, 1\], got min 0, max 2: rescale", npy("x.npy", with_value(2.0))),
    Case("negative-continuous-bernoulli", train("--dataset", "x.npy", "--likelihood", "continuous-bernoulli"),
         r"observed site 'x'\) has 1 values outside the support .*0\.0.*1\.0.* \(e\.g\. -0\.5\)", npy("x.npy", with_value(-0.5))),
    # empty, truncated or corrupt files, and a folder where a file should be
    Case("npy-empty-array", train("--dataset", "x.npy"), r"x\.npy \['train'\] is empty \(shape \(0, 64\)\)",
         npy("x.npy", lambda: np.zeros((0, 64), np.float32))),
    Case("npy-empty-file", train("--dataset", "x.npy"), r"x\.npy is empty \(0 bytes\): it is not a NumPy \.npy/\.npz file",
         write("x.npy", b"")),
    Case("npz-without-arrays", train("--dataset", "x.npz"), r"x\.npz holds no arrays: save the training data in it as 'train'", npz("x.npz")),
    Case("text-renamed-npy", train("--dataset", "x.npy"),
         r"x\.npy is not a NumPy \.npy/\.npz file \(it starts with b'0 1 0 '\): save arrays with numpy\.save",
         write("x.npy", "0 1 0 1\n1 0 1 0\n")),
    Case("npy-truncated", train("--dataset", "x.npy"), r"cannot read /.*/x\.npy as a NumPy \.npy/\.npz file: Failed to read all data",
         cut("x.npy", npy("x.npy", rows))),
    Case("npz-truncated", train("--dataset", "x.npz"), r"cannot read /.*/x\.npz as a NumPy \.npy/\.npz file: File is not a zip file",
         cut("x.npz", npz("x.npz", train=rows))),
    Case("folder-named-npy", train("--dataset", "x.npy"), r"x\.npy is a folder, not a \.npy/\.npz file: give the path of the file itself",
         folder("x.npy")),
    Case("npy-missing", train("--dataset", "x.npy"), r"data file not found: /.*/x\.npy"),
    Case("npy-unreadable", train("--dataset", "x.npy"), r"cannot read /.*/x\.npy as a NumPy \.npy/\.npz file: .*Permission denied",
         unreadable("x.npy"), marks=(as_root,)),
    Case("idx-wrong-magic", train(*MNIST), rf"{IMAGES} has magic number 2049, not 2051 \(IDX images\)",
         mnist_files(idx(2049, (16, 8, 8)))),
    Case("idx-truncated", train(*MNIST), rf"{IMAGES} should hold 1040 bytes for its 16 x 8 x 8 values, found 1000: the file is truncated",
         mnist_files(idx(2051, (16, 8, 8))[:1000])),
    Case("idx-header-only", train(*MNIST), rf"{IMAGES} is truncated: 6 bytes, its header alone needs 16",
         mnist_files(idx(2051, (16, 8, 8))[:6])),
    Case("idx-bad-gzip", train(*MNIST), rf"cannot read {IMAGES}\.gz: .*delete it and download it again",
         mnist_files(b"\x1f\x8b not gzip", name="train-images-idx3-ubyte.gz")),
    Case("run-data-file-corrupt", evaluate(COPY), r"/x\.npy is not a NumPy \.npy/\.npz file",
         damaged_run(edit_config(lambda c, run: c["data"].update(dataset=str(run.parent / "x.npy"))),
                     lambda run: (run.parent / "x.npy").write_text("1,2,3\n"))),
    # unknown options and option values
    Case("unknown-flag", train("--frobnicate"), r"unrecognized arguments: --frobnicate"),
    Case("unknown-command", ["fly", "away"], r"argument COMMAND: invalid choice: 'fly'"),
    Case("binarize-maybe", train("--binarize", "maybe"), r"argument --binarize: invalid choice: 'maybe'"),
    Case("train-device-tpu", train("--device", "tpu"), r"unknown device 'tpu': use cpu, cuda, cuda:N or auto"),
    Case("evaluate-device-tpu", evaluate(RUN, "--device", "tpu"), r"unknown device 'tpu': use cpu, cuda, cuda:N or auto"),
    Case("activation-gelu", train("--activation", "gelu"), r"unknown activation 'gelu'; known: relu, tanh, softplus, elu"),
    Case("likelihood-nope", train("--likelihood", "nope"), r"unknown likelihood 'nope'; known: bernoulli, continuous-bernoulli"),
    Case("prior-nope", train("--prior", "nope"), r"unknown prior 'nope'; known: .*normal"),
    Case("guide-nope", train("--guide", "nope"), r"unknown guide 'nope'; known: diagonal"),
    Case("network-nope", train("--network", "nope"), r"unknown network 'nope'; known: mlp"),
    # a component's options: unknown names, and values the component refuses
    Case("prior-arg-unknown", train("--prior", "vamp", "--prior-arg", "component=5"),
         r"unknown argument 'component' for prior 'vamp'; its arguments: components, pseudo_inputs, pseudo_init$"),
    Case("prior-arg-not-key-value", train("--prior", "vamp", "--prior-arg", "components"), r"--prior-arg 'components' is not KEY=VALUE"),
    Case("vamp-components-0", train("--prior", "vamp", "--prior-arg", "components=0"),
         r"the VampPrior's number of components must be a positive whole number, got 0"),
    Case("vamp-pseudo-inputs-soft", train("--prior", "vamp", "--prior-arg", "pseudo_inputs=soft"),
         r"the VampPrior's pseudo_inputs must be one of hardtanh, free; got 'soft'"),
    Case("vamp-with-iaf", train("--prior", "vamp", "--guide", "iaf"), r"the VampPrior needs a guide whose q\(z\|x\) has a density"),
    Case("mixture-components-fraction", train("--prior", "mixture", "--prior-arg", "components=2.5"),
         r"the mixture's number of components must be a positive whole number, got 2.5"),
    Case("iaf-transforms-negative", train("--guide", "iaf", "--guide-arg", "num_transforms=-1"),
         r"the IAF guide's number of transforms must be a positive whole number, got -1"),
    Case("iaf-gated-maybe", train("--guide", "iaf", "--guide-arg", "gated=maybe"), r"the IAF guide's gated must be true or false, got 'maybe'"),
    Case("gaussian-scale-negative", train("--likelihood", "gaussian", "--likelihood-arg", "scale=-1"),
         r"the Gaussian likelihood's scale must be a positive number, got -1"),
    Case("objective-nope", train("--objective", "nope"), r"argument --objective: invalid choice: 'nope'"),
    Case("dataset-nope", train("--dataset", "nope"), r"unknown data set 'nope': use one of digits, mnist, fashion-mnist"),
    Case("evaluate-split-nope", evaluate(RUN, "--split", "nope"), r"unknown split 'nope': use train, valid or test"),
    # counts and sizes that are not positive, or too large
    Case("evaluate-k-0", evaluate(RUN, "-k", "0"), r"importance samples -k must be at least 1, got 0"),
    Case("evaluate-k-negative", evaluate(RUN, "-k", "-5"), r"importance samples -k must be at least 1, got -5"),
    Case("evaluate-batch-size-0", evaluate(RUN, "--batch-size", "0"), r"the batch size must be at least 1, got 0"),
    Case("evaluate-chunk-size-0", evaluate(RUN, "--chunk-size", "0"), r"the chunk size must be at least 1, got 0"),
    Case("evaluate-limit-0", evaluate(RUN, "--limit", "0"), r"--limit must be at least 1, got 0"),
    Case("evaluate-particles-elbo-0", evaluate(RUN, "--particles-elbo", "0"), r"--particles-elbo must be at least 1, got 0"),
    Case("evaluate-iwae-k-0", evaluate(RUN, "--iwae-k", "0"), r"the IWAE bound needs 1 <= k <= K = 10 samples, got k = 0"),
    Case("evaluate-ais-steps-0", evaluate(RUN, "--ais", "--ais-steps", "0"), r"AIS steps T must be at least 1, got 0"),
    Case("evaluate-ais-chains-0", evaluate(RUN, "--ais", "--ais-chains", "0"), r"AIS chains M must be at least 1, got 0"),
    Case("evaluate-ais-leapfrog-0", evaluate(RUN, "--ais", "--ais-leapfrog", "0"), r"leapfrog steps L must be at least 1, got 0"),
    Case("evaluate-ais-step-size-negative", evaluate(RUN, "--ais", "--ais-step-size", "-1"), r"HMC step size must be positive, got -1"),
    Case("evaluate-ais-batch-size-0", evaluate(RUN, "--ais", "--ais-batch-size", "0"), r"AIS batch size must be at least 1, got 0"),
    Case("train-batch-size-0", train("--batch-size", "0"), r"argument --batch-size: must be positive, got 0"),
    Case("train-epochs-negative", train("--epochs", "-3"), r"argument --epochs: must be positive, got -3"),
    Case("train-latent-dim-0", train("--latent-dim", "0"), r"argument --latent-dim: must be positive, got 0"),
    Case("train-hidden-0", train("--hidden", "16", "0"), r"argument --hidden: must be positive, got 0"),
    Case("train-lr-negative", train("--lr", "-1"), r"argument --lr: must be positive, got -1"),
    Case("train-lr-text", train("--lr", "fast"), r"argument --lr: 'fast' is not a float"),
    Case("train-particles-0", train("--particles", "0"), r"argument --particles: must be positive, got 0"),
    Case("train-beta-negative", train("--beta", "-1"), r"argument --beta: must be at least 0, got -1"),
    Case("batch-larger-than-data", train("--dataset", "x.npy", "--batch-size", "64"),
         r"batch size 64 is larger than the 12 training points: choose at most 12", npy("x.npy", rows)),
    Case("sample-n-0", ["sample", RUN, "-n", "0", "--out", "s.png"], r"-n must be at least 1, got 0"),
    Case("sample-n-negative", ["sample", RUN, "-n", "-4", "--out", "s.png"], r"-n must be at least 1, got -4"),
    Case("reconstruct-n-0", ["reconstruct", RUN, "-n", "0", "--out", "r.png"], r"-n must be at least 1, got 0"),
    Case("reconstruct-n-negative", ["reconstruct", RUN, "-n", "-1", "--out", "r.png"], r"-n must be at least 1, got -1"),
    Case("interpolate-steps-0", ["interpolate", RUN, "--steps", "0", "--out", "i.png"], r"--steps must be at least \d, got 0"),
    Case("interpolate-pairs-0", ["interpolate", RUN, "--pairs", "0", "--out", "i.png"], r"--pairs must be at least 1, got 0"),
    # damaged run folders
    Case("evaluate-corrupt-config", evaluate(COPY),
         r"copy/config\.json is corrupt \(JSONDecodeError: .*\): it cannot be read as a run's config",
         damaged_run(replace("config.json", '{"model": {'))),
    Case("sample-corrupt-config", ["sample", COPY], r"copy/config\.json is corrupt \(JSONDecodeError",
         damaged_run(replace("config.json", "not json"))),
    Case("resume-corrupt-config", resume(COPY), r"copy/config\.json is corrupt \(TypeError", damaged_run(replace("config.json", "[1, 2]"))),
    Case("evaluate-config-without-fields", evaluate(COPY), r"copy/config\.json.*dataset",
         damaged_run(replace("config.json", '{"model": {}, "data": {}, "train": {}}'))),
    Case("config-other-latent-dim", evaluate(COPY),
         r"the checkpoint does not fit this model: size mismatch for encoder\.net\.2\.weight: .*\[4, 16\]\) from checkpoint, .*\[6, 16\]\)",
         damaged_run(edit_config(lambda c, run: c["model"]["args"].update(latent_dim=3)))),
    Case("resume-heldout-changed", resume(COPY, "--epochs", "2"),
         r"the held-out data of digits are not those copy was trained beside \(their SHA-256 differs",
         damaged_run(edit_config(lambda c, run: c["data"].update(seed=1, split_seed=1)))),
    Case("evaluate-corrupt-checkpoint", evaluate(COPY), r"cannot read checkpoint copy/checkpoint\.pt: the file is corrupt or truncated",
         damaged_run(replace("checkpoint.pt", b"PK\x03\x04" + bytes(range(256)) * 4))),
    Case("evaluate-truncated-checkpoint", evaluate(COPY), r"cannot read checkpoint copy/checkpoint\.pt: the file is corrupt or truncated",
         damaged_run(truncate("checkpoint.pt"))),
    Case("sample-truncated-checkpoint", ["sample", COPY], r"cannot read checkpoint copy/checkpoint\.pt: the file is corrupt or truncated",
         damaged_run(truncate("checkpoint.pt"))),
    Case("sample-empty-checkpoint", ["sample", COPY],
         r"cannot read checkpoint copy/checkpoint\.pt: the file is corrupt or truncated \(the file is empty\)",
         damaged_run(replace("checkpoint.pt", b""))),
    Case("resume-truncated-checkpoint", resume(COPY, "--epochs", "2"),
         r"cannot read checkpoint copy/checkpoint\.pt: the file is corrupt or truncated", damaged_run(truncate("checkpoint.pt"))),
    Case("resume-text-checkpoint", resume(COPY, "--epochs", "2"),
         r"cannot read checkpoint copy/checkpoint\.pt: the file is corrupt or truncated",
         damaged_run(replace("checkpoint.pt", "this is not a checkpoint\n"))),
    Case("resume-folder-checkpoint", resume(COPY, "--epochs", "2"), r"no checkpoint at copy/checkpoint\.pt",
         damaged_run(lambda run: (run / "checkpoint.pt").unlink(), lambda run: (run / "checkpoint.pt").mkdir())),
    # users' model files and model arguments
    Case("model-syntax-error", train_own("mine.py:vae"), r"/mine\.py, line 1: syntax error", write("mine.py", "def vae(data_dim\n")),
    Case("model-raises-on-import", train_own("mine.py:vae"), r"/mine\.py raised ZeroDivisionError while loading: division by zero",
         write("mine.py", "x = 1 / 0\n")),
    Case("model-factory-raises", train_own(f"{BROKEN}:factory_raises"),
         r"the model factory /.*broken\.py:factory_raises raised ValueError: latent_dim must be even"),
    Case("model-breaks-contract", train_own(f"{BROKEN}:guide_misses_a_latent"),
         r"latent site 'w' of the model is not sampled by the guide"),
    Case("model-file-missing", train_own("nowhere.py:vae"), r"model file not found: /.*/nowhere\.py"),
    Case("model-name-missing", train_own(f"{BROKEN}:not_there"), r"broken\.py has no 'not_there'; it defines: .*factory_raises"),
    Case("model-module-unknown", train_own("no_such_module:vae"),
         r"--model 'no_such_module:vae': cannot import no_such_module: No module named 'no_such_module'"),
    Case("model-without-name", train_own("pyrovae.models"), r"--model 'pyrovae\.models': give FILE\.py:NAME or package\.module:NAME"),
    Case("model-arg-without-equals", train("--model-arg", "latent_dim"), r"--model-arg 'latent_dim' is not KEY=VALUE"),
    Case("model-arg-and-option", train("--model-arg", "latent_dim=3"), r"--latent-dim and --model-arg latent_dim=\.\.\. both given"),
    Case("model-arg-unknown-key", train("--model-arg", "colour=3"),
         r"the model factory pyrovae\.models:vae has no argument 'colour'; its arguments: latent_dim, "),
    Case("model-arg-latent-dim-0", train_own("pyrovae.models:vae", "--model-arg", "latent_dim=0"), r"latent_dim.*0"),
    Case("model-arg-hidden-text", train_own("pyrovae.models:vae", "--model-arg", "hidden=wide"), r"hidden.*wide"),
    # folders that are not what the command needs
    Case("out-is-a-file", train(out="notes.txt"), r"--out notes\.txt is a file, not a folder", write("notes.txt", "precious\n")),
    Case("out-under-a-file", train(out="notes.txt/run"), r"notes\.txt", write("notes.txt", "precious\n")),
    Case("out-exists", train(out=RUN), r"run folder /.* already exists: pass --resume to continue it or --overwrite to replace it"),
    Case("overwrite-not-a-run", train("--overwrite", out="notes"),
         r"refusing to overwrite notes: it is not empty and not a run folder \(no config\.json\)", folder("notes", "thesis.tex")),
    Case("resume-not-a-run", resume("notes"), r"notes is not a run folder \(no config\.json\)", folder("notes", "thesis.tex")),
    Case("resume-missing-folder", resume("nowhere"), r"nowhere is not a run folder \(no config\.json\)"),
    Case("resume-and-overwrite", resume(RUN, "--overwrite"), r"--resume and --overwrite contradict each other: give one"),
    Case("resume-changes-model", resume(RUN, "--latent-dim", "3"), r"--latent-dim cannot change on --resume"),
    Case("evaluate-not-a-run", evaluate("notes"), r"notes is not a run folder \(no config\.json\)", folder("notes", "thesis.tex")),
    Case("evaluate-missing-run", evaluate("nowhere"), r"nowhere is not a run folder \(no config\.json\)"),
    Case("evaluate-json-missing-folder", evaluate(RUN, "--json", "missing/e.json"), r"missing/e\.json"),
    Case("sample-out-missing-folder", ["sample", RUN, "--out", "missing/s.png"], r"missing/s\.png"),
]


# ---------------------------------------------------------------- checks


def exit_code(argv: list[str]) -> int:
    """``pyrovae ARGV`` in this process: its exit code (argparse's usage errors raise SystemExit)."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def fingerprint(root: Path) -> dict[str, tuple]:
    """Every entry under root, root included, by relative name: (mode, SHA-256 of a file's bytes).
    Bytecode caches are left out: importing a user's model file may write them."""
    entries = {}
    for path in [root, *sorted(root.rglob("*"))]:
        name = path.relative_to(root)
        if "__pycache__" in name.parts:
            continue
        st = path.lstat()
        digest = None
        if stat.S_ISREG(st.st_mode):
            try:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
            except PermissionError:  # a case's unreadable file: its mode and size stand for it
                digest = f"unreadable, {st.st_size} bytes"
        entries[str(name)] = (st.st_mode, digest)
    return entries


def assert_one_line_error(err: str, out: str, pattern: str) -> None:
    assert "Traceback" not in err and "Traceback" not in out, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert re.match(r"pyrovae( \w+)?: error: ", lines[0]), err  # argparse's own mistakes may name just "pyrovae"
    assert re.search(pattern, lines[0]), err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The intact run folder (trained once), a pristine copy of it, and its fingerprint."""
    base = tmp_path_factory.mktemp("bad-input")
    run = base / "run"
    assert main(["train", "--out", str(run), *SMALL]) == 0
    shutil.copytree(run, base / "pristine")
    return run, base / "pristine", fingerprint(run)


@pytest.fixture
def intact(trained):
    """The intact run folder; put back after a case that changed it, so that one failure stays one."""
    run, pristine, expected = trained
    yield run
    if fingerprint(run) != expected:
        shutil.rmtree(run)
        shutil.copytree(pristine, run)


def test_the_table_is_large_and_its_ids_unique():
    assert len(CASES) >= 30
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", [pytest.param(case, id=case.id, marks=case.marks) for case in CASES])
def test_bad_input_is_one_line_exit_2_and_touches_no_run(case, intact, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    if case.setup is not None:
        case.setup(tmp_path, intact)
    argv = [str(intact) if a == RUN else "copy" if a == COPY else a for a in case.argv]
    run_before, here_before = fingerprint(intact), fingerprint(tmp_path)
    capsys.readouterr()

    code = exit_code(argv)

    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert_one_line_error(captured.err, captured.out, case.pattern)
    assert fingerprint(intact) == run_before, "the intact run folder changed"
    assert fingerprint(tmp_path) == here_before, "files were written, changed or removed"
