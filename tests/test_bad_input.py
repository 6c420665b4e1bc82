"""Bad input through the command line: every case exits with code 2 and one line on stderr that
names the file, shape or value at fault, with no traceback, and leaves every run folder as it was.

One small run folder is trained once for the module; a case that needs a damaged run works on a
copy. Before and after each case the intact run folder and the case's own folder are fingerprinted
(names, modes, bytes): a refused command must not write, move or delete anything.
"""

import hashlib
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
SMALL = ["--epochs", "1", "--hidden", "16", "--latent-dim", "2", "--no-progress"]
RUN, COPY = "<run>", "<copy>"  # placeholders: the intact run folder, the case's damaged copy of it


# ---------------------------------------------------------------- helpers


def exit_code(argv: list[str]) -> int:
    """``pyrovae ARGV`` in this process: its exit code (argparse's usage errors raise SystemExit)."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def fingerprint(root: Path) -> dict[str, tuple]:
    """Every entry under root (root included), by relative name: (mode, SHA-256 of a file's bytes).
    Python's bytecode caches are left out: importing a user's model file may write them."""
    entries = {}
    for path in [root, *sorted(root.rglob("*"))]:
        if "__pycache__" in path.relative_to(root).parts:
            continue
        st = path.lstat()
        digest = None
        if stat.S_ISREG(st.st_mode):
            try:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
            except PermissionError:  # a case's unreadable file: its mode and size stand for it
                digest = f"unreadable, {st.st_size} bytes"
        entries[str(path.relative_to(root))] = (st.st_mode, digest)
    return entries


def assert_one_line_usage_error(err: str, out: str, pattern: str) -> None:
    assert "Traceback" not in err and "Traceback" not in out, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert re.match(r"pyrovae( \w+)?: error: ", lines[0]), err
    assert re.search(pattern, lines[0]), err


def train(*args: str, out: str = "X") -> list[str]:
    """A new small run into ``out`` (the last of repeated options wins, so args may override SMALL)."""
    return ["train", "--out", out, *SMALL, "--batch-size", "4", *args]


def train_own(model: str, *args: str) -> list[str]:
    """A new run of a user's model: without the built-in VAE's options, which such a factory may not take."""
    return ["train", "--out", "X", "--model", model, "--epochs", "1", "--batch-size", "4", "--no-progress", *args]


def resume(run: str, *args: str) -> list[str]:
    return ["train", "--resume", "--out", run, "--no-progress", *args]


def evaluate(run: str, *args: str) -> list[str]:
    return ["evaluate", run, "-k", "10", "--limit", "4", "--particles-elbo", "4", "--no-compile", "--no-progress", *args]


# ---------------------------------------------------------------- what the cases set up


def rows(n: int = 16, shape=(8, 8), seed: int = 0) -> np.ndarray:
    """n binary 8x8 images as float32."""
    return np.random.default_rng(seed).integers(0, 2, (n, *shape)).astype(np.float32)


def npy(name: str, make: Callable[[], np.ndarray]):
    def setup(ws: Path) -> None:
        np.save(ws / name, make(), allow_pickle=True)

    return setup


def npz(name: str, **make: Callable[[], np.ndarray]):
    def setup(ws: Path) -> None:
        np.savez(ws / name, **{key: f() for key, f in make.items()})

    return setup


def with_value(value: float, at=(0, 0, 0)) -> Callable[[], np.ndarray]:
    def make() -> np.ndarray:
        a = rows()
        a[at] = value
        return a

    return make


def write(name: str, content: bytes | str):
    def setup(ws: Path) -> None:
        (ws / name).write_bytes(content.encode() if isinstance(content, str) else content)

    return setup


def truncated(name: str, make_file: Callable[[Path], None], keep: float = 0.5):
    """A valid file, then cut to ``keep`` of its bytes."""

    def setup(ws: Path) -> None:
        make_file(ws)
        data = (ws / name).read_bytes()
        (ws / name).write_bytes(data[: int(len(data) * keep)])

    return setup


def folder(name: str, *files: str):
    def setup(ws: Path) -> None:
        (ws / name).mkdir()
        for file in files:
            (ws / name / file).write_text("notes\n")

    return setup


def unreadable(name: str):
    def setup(ws: Path) -> None:
        np.save(ws / name, rows())
        os.chmod(ws / name, 0)

    return setup


def idx(magic: int, dims: tuple[int, ...], cut: int = 0) -> bytes:
    data = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims) + bytes(int(np.prod(dims)))
    return data[: len(data) - cut]


def mnist_files(images: bytes):
    """A folder "idx" with the four MNIST files, 16 + 4 images of 8x8, the training images replaced."""

    def setup(ws: Path) -> None:
        (ws / "idx").mkdir()
        (ws / "idx" / "train-images-idx3-ubyte").write_bytes(images)
        (ws / "idx" / "train-labels-idx1-ubyte").write_bytes(idx(2049, (16,)))
        (ws / "idx" / "t10k-images-idx3-ubyte").write_bytes(idx(2051, (4, 8, 8)))
        (ws / "idx" / "t10k-labels-idx1-ubyte").write_bytes(idx(2049, (4,)))

    return setup


def damaged_run(damage: Callable[[Path], None]):
    """A copy of the intact run (folder "copy"), then damaged."""

    def setup(ws: Path, run: Path) -> None:
        shutil.copytree(run, ws / "copy")
        damage(ws / "copy")

    setup.needs_run = True
    return setup


def overwrite(name: str, content: bytes | str):
    return lambda run: (run / name).write_bytes(content.encode() if isinstance(content, str) else content)


def cut(name: str, keep: float = 0.5):
    def damage(run: Path) -> None:
        data = (run / name).read_bytes()
        (run / name).write_bytes(data[: int(len(data) * keep)])

    return damage


def edit_config(change: Callable[[dict], None]):
    import json

    def damage(run: Path) -> None:
        config = json.loads((run / "config.json").read_text())
        change(config)
        (run / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    return damage


# ---------------------------------------------------------------- the cases


@dataclass
class Case:
    id: str
    argv: list[str]
    pattern: str  # a regular expression the one line must contain
    setup: Callable | None = None
    marks: tuple = ()


not_root = pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                          reason="running as root: permission bits do not stop reads")

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
    Case("npy-object", train("--dataset", "x.npy"), r"cannot read .*x\.npy as a NumPy \.npy/\.npz file: Object arrays cannot be loaded",
         npy("x.npy", lambda: np.array([[0.0, None]] * 16, dtype=object))),
    Case("npy-complex", train("--dataset", "x.npy"), r"x\.npy \['train'\] has dtype complex64: expected numbers",
         npy("x.npy", lambda: rows().astype(np.complex64))),
    Case("npz-train-test-widths", train("--dataset", "x.npz"), r"x\.npz: 'train' rows have 64 values .* but 'test' rows have 16",
         npz("x.npz", train=rows, test=lambda: rows(4, (4, 4)))),
    Case("npz-no-train", train("--dataset", "x.npz"), r"x\.npz holds arrays \['a', 'b'\] but none named 'train'",
         npz("x.npz", a=rows, b=rows)),
    Case("npz-test-strings", train("--dataset", "x.npz"), r"x\.npz \['test'\] has dtype <U1: expected numbers",
         npz("x.npz", train=rows, test=lambda: np.full((4, 64), "a"))),
    # values that are not finite, or outside the likelihood's support
    Case("npy-nan", train("--dataset", "x.npy"), r"x\.npy \['train'\] has 1 NaN or infinite values",
         npy("x.npy", with_value(np.nan))),
    Case("npy-inf", train("--dataset", "x.npy"), r"x\.npy \['train'\] has 1 NaN or infinite values",
         npy("x.npy", with_value(np.inf))),
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
         r"observed site 'x'\) has 1 values outside the support .*0\.0.*1\.0.* \(e\.g\. -0\.5\)",
         npy("x.npy", with_value(-0.5, at=(0, 0, 0)))),
    # empty, truncated or corrupt files
    Case("npy-empty", train("--dataset", "x.npy"), r"x\.npy \['train'\] is empty \(shape \(0, 64\)\)",
         npy("x.npy", lambda: np.zeros((0, 64), np.float32))),
    Case("npz-without-arrays", train("--dataset", "x.npz"), r"x\.npz holds no arrays: save the training data in it as 'train'", npz("x.npz")),
    Case("text-renamed-npy", train("--dataset", "x.npy"), r"x\.npy is not a NumPy \.npy/\.npz file \(it starts with b'0 1 0 '\): save arrays with numpy\.save",
         write("x.npy", "0 1 0 1\n1 0 1 0\n")),
    Case("npy-truncated", train("--dataset", "x.npy"), r"cannot read .*x\.npy as a NumPy \.npy/\.npz file: .*",
         truncated("x.npy", npy("x.npy", rows))),
    Case("npz-truncated", train("--dataset", "x.npz"), r"cannot read .*x\.npz as a NumPy \.npy/\.npz file: .*",
         truncated("x.npz", npz("x.npz", train=rows))),
    Case("npy-empty-file", train("--dataset", "x.npy"), r"x\.npy is empty \(0 bytes\): it is not a NumPy \.npy/\.npz file",
         write("x.npy", b"")),
    Case("folder-named-npy", train("--dataset", "x.npy"), r"x\.npy is a folder, not a \.npy/\.npz file: give the path of the file itself", folder("x.npy")),
    Case("npy-missing", train("--dataset", "x.npy"), r"data file not found: .*x\.npy"),
    Case("npy-unreadable", train("--dataset", "x.npy"), r"cannot read .*x\.npy as a NumPy \.npy/\.npz file: .*Permission denied",
         unreadable("x.npy"), marks=(not_root,)),
    Case("idx-wrong-magic", train("--dataset", "mnist", "--data-dir", "idx"),
         r"idx/train-images-idx3-ubyte has magic number 2049, not 2051 \(IDX images\)", mnist_files(idx(2049, (16, 8, 8)))),
    Case("idx-truncated", train("--dataset", "mnist", "--data-dir", "idx"),
         r"idx/train-images-idx3-ubyte should hold 1040 bytes for its 16 x 8 x 8 values, found 1000: the file is truncated",
         mnist_files(idx(2051, (16, 8, 8), cut=40))),
    Case("idx-header-only", train("--dataset", "mnist", "--data-dir", "idx"),
         r"idx/train-images-idx3-ubyte is truncated: 6 bytes, its header alone needs 16",
         mnist_files(idx(2051, (16, 8, 8))[:6])),
    Case("idx-bad-gzip", train("--dataset", "mnist", "--data-dir", "idx"),
         r"cannot read idx/train-images-idx3-ubyte\.gz: .*delete it and download it again",
         lambda ws: (mnist_files(b"")(ws), (ws / "idx" / "train-images-idx3-ubyte").rename(ws / "idx" / "train-images-idx3-ubyte.gz"),
                     (ws / "idx" / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b not really gzip"))),
    # unknown options and option values
    Case("unknown-flag", train("--frobnicate"), r"unrecognized arguments: --frobnicate"),
    Case("unknown-command", ["fly", "away"], r"invalid choice: 'fly'"),
    Case("binarize-maybe", train("--binarize", "maybe"), r"argument --binarize: invalid choice: 'maybe'"),
    Case("train-device-tpu", train("--device", "tpu"), r"unknown device 'tpu': use cpu, cuda, cuda:N or auto"),
    Case("evaluate-device-tpu", evaluate(RUN, "--device", "tpu"), r"unknown device 'tpu'"),
    Case("activation-gelu", train("--activation", "gelu"), r"unknown activation 'gelu'; known: relu, tanh, softplus, elu"),
    Case("likelihood-nope", train("--likelihood", "nope"), r"unknown likelihood 'nope'.*bernoulli"),
    Case("prior-nope", train("--prior", "nope"), r"unknown prior 'nope'.*normal"),
    Case("guide-nope", train("--guide", "nope"), r"unknown guide 'nope'.*diagonal"),
    Case("dataset-nope", train("--dataset", "nope"), r"unknown data set 'nope': use one of digits, mnist, fashion-mnist"),
    Case("evaluate-split-nope", evaluate(RUN, "--split", "nope"), r"unknown split 'nope': use train or test"),
    # sizes that are not positive, or too large
    Case("evaluate-k-0", evaluate(RUN, "-k", "0"), r"-k must be at least 1, got 0"),
    Case("evaluate-k-negative", evaluate(RUN, "-k", "-5"), r"-k must be at least 1, got -5"),
    Case("evaluate-batch-size-0", evaluate(RUN, "--batch-size", "0"), r"batch size must be at least 1, got 0"),
    Case("evaluate-chunk-size-0", evaluate(RUN, "--chunk-size", "0"), r"chunk.* at least 1, got 0"),
    Case("evaluate-limit-0", evaluate(RUN, "--limit", "0"), r"--limit must be at least 1, got 0"),
    Case("evaluate-particles-elbo-0", evaluate(RUN, "--particles-elbo", "0"), r"--particles-elbo must be at least 1, got 0"),
    Case("evaluate-iwae-k-0", evaluate(RUN, "--iwae-k", "0"), r"the IWAE bound needs 1 <= k <= K = 10 samples, got k = 0"),
    Case("train-batch-size-0", train("--batch-size", "0"), r"argument --batch-size: must be positive, got 0"),
    Case("train-epochs-negative", train("--epochs", "-3"), r"argument --epochs: must be positive, got -3"),
    Case("train-latent-dim-0", train("--latent-dim", "0"), r"argument --latent-dim: must be positive, got 0"),
    Case("train-lr-negative", train("--lr", "-1"), r"argument --lr: must be positive, got -1"),
    Case("train-lr-text", train("--lr", "fast"), r"argument --lr: 'fast' is not a float"),
    Case("train-particles-0", train("--particles", "0"), r"argument --particles: must be positive, got 0"),
    Case("train-hidden-0", train("--hidden", "16", "0"), r"argument --hidden: must be positive, got 0"),
    Case("batch-larger-than-data", train("--dataset", "x.npy", "--batch-size", "64"),
         r"batch size 64 is larger than the 13 training points: choose at most 13", npy("x.npy", rows)),
    Case("sample-n-0", ["sample", RUN, "-n", "0", "--out", "s.png"], r"at least 1, got 0"),
    Case("reconstruct-n-0", ["reconstruct", RUN, "-n", "0", "--out", "r.png"], r"at least 1, got 0"),
    Case("interpolate-steps-0", ["interpolate", RUN, "--steps", "0", "--out", "i.png"], r"at least 1, got 0"),
    # damaged run folders
    Case("evaluate-corrupt-config", evaluate(COPY), r"copy/config\.json is corrupt \(JSONDecodeError: .*\): it cannot be read as a run's config",
         damaged_run(overwrite("config.json", "{\"model\": {"))),
    Case("sample-corrupt-config", ["sample", COPY], r"copy/config\.json is corrupt", damaged_run(overwrite("config.json", "not json"))),
    Case("resume-corrupt-config", resume(COPY), r"copy/config\.json is corrupt", damaged_run(overwrite("config.json", "[1, 2]"))),
    Case("evaluate-config-without-fields", evaluate(COPY), r"copy/config\.json",
         damaged_run(overwrite("config.json", '{"model": {}, "data": {}, "train": {}}'))),
    Case("evaluate-config-other-latent-dim", evaluate(COPY), r"the checkpoint does not fit this model: size mismatch for encoder\.net\.2\.weight: .*torch\.Size\(\[4, 16\]\) from checkpoint, .*torch\.Size\(\[6, 16\]\)",
         damaged_run(edit_config(lambda c: c["model"]["args"].update(latent_dim=3)))),
    Case("evaluate-corrupt-checkpoint", evaluate(COPY), r"cannot read checkpoint copy/checkpoint\.pt: the file is corrupt or truncated",
         damaged_run(overwrite("checkpoint.pt", b"PK\x03\x04" + bytes(range(256)) * 4))),
    Case("evaluate-truncated-checkpoint", evaluate(COPY), r"cannot read checkpoint copy/checkpoint\.pt: the file is corrupt or truncated",
         damaged_run(cut("checkpoint.pt"))),
    Case("sample-truncated-checkpoint", ["sample", COPY], r"cannot read checkpoint copy/checkpoint\.pt: the file is corrupt or truncated",
         damaged_run(cut("checkpoint.pt"))),
    Case("sample-empty-checkpoint", ["sample", COPY], r"cannot read checkpoint copy/checkpoint\.pt: the file is corrupt or truncated \(the file is empty\)",
         damaged_run(overwrite("checkpoint.pt", b""))),
    Case("resume-truncated-checkpoint", resume(COPY, "--epochs", "2"), r"cannot read checkpoint copy/checkpoint\.pt: the file is corrupt or truncated",
         damaged_run(cut("checkpoint.pt"))),
    Case("resume-garbage-checkpoint", resume(COPY, "--epochs", "2"), r"cannot read checkpoint copy/checkpoint\.pt",
         damaged_run(overwrite("checkpoint.pt", "this is not a checkpoint\n"))),
    Case("resume-folder-checkpoint", resume(COPY, "--epochs", "2"), r"no checkpoint at copy/checkpoint\.pt",
         damaged_run(lambda run: ((run / "checkpoint.pt").unlink(), (run / "checkpoint.pt").mkdir()))),
    # user model files
    Case("model-syntax-error", train_own("mine.py:vae"), r"mine\.py, line 1: syntax error", write("mine.py", "def vae(data_dim\n")),
    Case("model-raises-on-import", train_own("mine.py:vae"), r"mine\.py raised ZeroDivisionError while loading: division by zero",
         write("mine.py", "x = 1 / 0\n")),
    Case("model-factory-raises", train_own(f"{MODELS / 'broken.py'}:factory_raises"),
         r"the model factory .*broken\.py:factory_raises raised ValueError: latent_dim must be even"),
    Case("model-breaks-contract", train_own(f"{MODELS / 'broken.py'}:guide_misses_a_latent"),
         r"latent site 'w' of the model is not sampled by the guide"),
    Case("model-file-missing", train("--model", "nowhere.py:vae"), r"model file not found: .*nowhere\.py"),
    Case("model-name-missing", train("--model", f"{MODELS / 'broken.py'}:not_there"), r"broken\.py has no 'not_there'"),
    Case("model-module-unknown", train("--model", "no_such_module:vae"), r"--model 'no_such_module:vae': cannot import no_such_module"),
    Case("model-without-name", train("--model", "pyrovae.models"), r"--model 'pyrovae\.models': give FILE\.py:NAME or package\.module:NAME"),
    Case("model-arg-without-equals", train("--model-arg", "latent_dim"), r"--model-arg 'latent_dim' is not KEY=VALUE"),
    Case("model-arg-and-option", train("--model-arg", "latent_dim=3"), r"--latent-dim and --model-arg latent_dim=\.\.\. both given"),
    Case("model-arg-unknown-key", train("--model-arg", "colour=3"), r"the model factory pyrovae\.models:vae raised TypeError: vae\(\) got an unexpected keyword argument 'colour'"),
    # run folders that are not what the command needs
    Case("out-is-a-file", train(out="notes.txt"), r"--out notes\.txt is a file, not a folder", write("notes.txt", "precious\n")),
    Case("out-exists", train(out=RUN), r"run folder .* already exists: pass --resume to continue it or --overwrite to replace it"),
    Case("resume-not-a-run", resume("notes"), r"notes is not a run folder \(no config\.json\)", folder("notes", "thesis.tex")),
    Case("resume-missing-folder", resume("nowhere"), r"nowhere is not a run folder \(no config\.json\)"),
    Case("resume-and-overwrite", resume(RUN, "--overwrite"), r"--resume and --overwrite contradict each other: give one"),
    Case("resume-changes-model", resume(RUN, "--latent-dim", "3"), r"--latent-dim cannot change on --resume"),
    Case("out-under-a-file", train(out="notes.txt/run"), r"notes\.txt", write("notes.txt", "precious\n")),
    Case("evaluate-json-missing-folder", evaluate(RUN, "--json", "missing/e.json"), r"missing/e\.json"),
    Case("sample-out-missing-folder", ["sample", RUN, "--out", "missing/s.png"], r"missing/s\.png"),
    Case("interpolate-pairs-0", ["interpolate", RUN, "--pairs", "0", "--out", "i.png"], r"at least 1, got 0"),
    Case("sample-n-negative", ["sample", RUN, "-n", "-4", "--out", "s.png"], r"at least 1, got -4"),
    Case("evaluate-ais-steps-0", evaluate(RUN, "--ais", "--ais-steps", "0"), r"at least 1, got 0"),
    Case("evaluate-ais-chains-0", evaluate(RUN, "--ais", "--ais-chains", "0"), r"at least 1, got 0"),
    Case("evaluate-ais-leapfrog-0", evaluate(RUN, "--ais", "--ais-leapfrog", "0"), r"at least 1, got 0"),
    Case("evaluate-ais-step-size-negative", evaluate(RUN, "--ais", "--ais-step-size", "-1"), r"-1"),
    Case("evaluate-ais-batch-size-0", evaluate(RUN, "--ais", "--ais-batch-size", "0"), r"at least 1, got 0"),
    Case("model-arg-latent-dim-0", train_own("pyrovae.models:vae", "--model-arg", "latent_dim=0"), r"latent_dim"),
    Case("model-arg-hidden-text", train_own("pyrovae.models:vae", "--model-arg", "hidden=wide"), r"hidden"),
    Case("resume-data-file-changed", resume(COPY, "--epochs", "2"), r"heldout|held-out",
         damaged_run(edit_config(lambda c: c["data"].update(seed=1, split_seed=1)))),
    Case("overwrite-not-a-run", train("--overwrite", out="notes"), r"refusing to overwrite notes: it is not empty and not a run folder",
         folder("notes", "thesis.tex")),
    Case("evaluate-not-a-run", evaluate("notes"), r"notes is not a run folder \(no config\.json\)", folder("notes", "thesis.tex")),
    Case("evaluate-missing-run", evaluate("nowhere"), r"nowhere is not a run folder \(no config\.json\)"),
]


# ---------------------------------------------------------------- fixtures and the test


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The intact run folder (trained once) and a pristine copy to restore it from."""
    base = tmp_path_factory.mktemp("bad-input")
    run = base / "run"
    code = main(["train", "--out", str(run), "--epochs", "1", "--hidden", "16", "--latent-dim", "2", "--no-progress"])
    assert code == 0
    shutil.copytree(run, base / "pristine")
    return run, base / "pristine", fingerprint(run)


@pytest.fixture
def intact(trained):
    """The intact run folder; restored after a case that changed it, so one failure stays one."""
    run, pristine, expected = trained
    assert fingerprint(run) == expected
    yield run
    if fingerprint(run) != expected:
        shutil.rmtree(run)
        shutil.copytree(pristine, run)


def test_cases_are_many_and_named_once():
    assert len(CASES) >= 30
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input_is_one_line_exit_2_and_touches_no_run(case, intact, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    if case.setup is not None:
        case.setup(tmp_path, intact) if getattr(case.setup, "needs_run", False) else case.setup(tmp_path)
    argv = [str(intact) if a == RUN else "copy" if a == COPY else a for a in case.argv]
    run_before, here_before = fingerprint(intact), fingerprint(tmp_path)
    capsys.readouterr()

    code = exit_code(argv)

    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert_one_line_usage_error(captured.err, captured.out, case.pattern)
    assert fingerprint(intact) == run_before, "the intact run folder changed"
    assert fingerprint(tmp_path) == here_before, "files were written, changed or removed"
