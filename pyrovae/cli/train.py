"""``pyrovae train``: fit a model by SVI (Pyro's Trace_ELBO, Adam) and leave a run folder.

The model is the built-in VAE (``--model pyrovae.models:vae``) or your own: ``--model FILE.py:NAME``
or ``--model package.module:NAME``, a factory called as ``NAME(data_dim=P, image_shape=..., **args)``
with ``--model-arg key=value`` (JSON values where they parse). Loading a model file runs its code.
``--latent-dim``, ``--hidden``, ``--activation``, ``--likelihood``, ``--prior`` and ``--guide`` are
model arguments too, and so are a component's own options: ``--prior-arg components=50`` (the
model argument ``prior_args``), ``--guide-arg``, ``--likelihood-arg`` (``pyrovae list`` shows them).
The folder holds config.json, metrics.jsonl (ELBO per data point in nats, per epoch), checkpoint.pt
(saved atomically before training and after every epoch; --resume continues from it) and pictures: samples, reconstructions, interpolations and the loss curve.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from pyrovae import distributed, factory
from pyrovae.data import BINARIZATIONS
from pyrovae.sources import DATASETS, load_dataset, with_validation
from pyrovae.errors import Interrupted, PyrovaeError
from pyrovae.objectives import OBJECTIVES
from pyrovae.run import MODEL_FILE, Run, heldout_sha256, resolve_device
from pyrovae.session import TrainingSession
from pyrovae.train import LR_SCHEDULES, TrainConfig

DEFAULTS = {"dataset": "digits", "model": factory.BUILTIN, "epochs": 100, "batch_size": 128, "lr": 1e-3,
            "particles": 1, "seed": 0, "device": "cpu", "objective": "elbo", "beta": 1.0, "warmup_epochs": 0,
            "skip_nonfinite": 0, "validation_fraction": 0.1, "lr_schedule": "none"}
MODEL_OPTIONS = ("latent_dim", "hidden", "activation", "likelihood", "prior", "guide", "network")  # model arguments
COMPONENT_OPTIONS = {"prior_arg": "prior_args", "guide_arg": "guide_args", "likelihood_arg": "likelihood_args"}  # flag → model argument
CAPTURE_MODES = ("auto", "graph", "inductor", "cuda-graph", "off")
CHANGEABLE_ON_RESUME = ("epochs", "lr", "device", "clip_grad", "skip_nonfinite", "checkpoint_every", "early_stopping", "capture")
LABELLED_MODEL = "pyrovae.models:m2"  # the model --labelled trains unless --model names another
FIXED_ON_RESUME = ("dataset", "data_dir", "download", "binarize", "labelled", "model", "model_arg", *MODEL_OPTIONS, *COMPONENT_OPTIONS,
                   "batch_size", "particles", "seed", "objective", "beta", "warmup_epochs",
                   "validation_fraction", "lr_schedule")


def positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse


def non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = non_negative(text)
    if value != int(value):
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text}")
    return int(value)


def fraction(text: str) -> float:
    value = non_negative(text)
    if not value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def every(text: str) -> tuple[str, float]:
    """``500`` → ("steps", 500); ``10min`` → ("minutes", 10)."""
    if text.endswith("min"):
        return "minutes", positive(float)(text[:-3])
    return "steps", positive(int)(text)


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model and write a run folder", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", help=f"{', '.join(DATASETS)}, or a .npz/.npy file of images or vectors (default: digits)")
    g.add_argument("--data-dir", type=Path, help="folder with the MNIST/Fashion-MNIST IDX files (default: ~/.cache/pyrovae or $PYROVAE_DATA)")
    g.add_argument("--download", action="store_true", default=None, help="download MNIST/Fashion-MNIST through torchvision if missing")
    g.add_argument("--validation-fraction", type=fraction, help="share of the training rows held out for validation: "
                   "its ELBO picks best.pt, early stopping and the plateau schedule; the test set decides nothing (default: 0.1)")
    g.add_argument("--binarize", choices=BINARIZATIONS, help="pixel binarization (default: dynamic where the observed site is binary, else none)")
    g.add_argument("--labelled", type=positive(int), metavar="N", help="semi-supervised: keep the labels of N training points, "
                   "N/C from each of the C classes, the others unlabelled (N at least the training rows: all labelled, as a conditional VAE "
                   "trains); the model is called model(x, y) on labelled batches "
                   f"(default model with it: {LABELLED_MODEL}, the M2 VAE)")
    g = p.add_argument_group("model")
    g.add_argument("--model", help=f"model factory, FILE.py:NAME or package.module:NAME (default: {factory.BUILTIN})")
    g.add_argument("--model-arg", action="append", metavar="KEY=VALUE", help="an argument of the factory (repeatable)")
    g.add_argument("--latent-dim", type=positive(int), help="latent dimension D (built-in VAE: 50)")
    g.add_argument("--hidden", type=positive(int), nargs="+", help="decoder hidden sizes, the encoder mirrors them (built-in VAE: 400)")
    g.add_argument("--activation", help="relu, tanh, softplus or elu (built-in VAE: elu)")
    g.add_argument("--likelihood", help="a registered likelihood, see pyrovae list (built-in VAE: bernoulli)")
    g.add_argument("--prior", help="a registered prior, see pyrovae list (built-in VAE: normal)")
    g.add_argument("--guide", help="a registered guide, see pyrovae list (built-in VAE: diagonal)")
    g.add_argument("--network", help="mlp, or conv for 28×28 images (built-in VAE: mlp)")
    for flag, what in (("prior", "the prior's"), ("guide", "the guide's"), ("likelihood", "the likelihood's")):
        g.add_argument(f"--{flag}-arg", action="append", metavar="KEY=VALUE",
                       help=f"an option of {what} constructor, e.g. --prior-arg components=50 (repeatable; pyrovae list shows them)")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=positive(int), help="last epoch to train to (default: 100; with --resume, the run's)")
    g.add_argument("--batch-size", type=positive(int), help="data points per step (default: 128)")
    g.add_argument("--lr", type=positive(float), help="Adam learning rate (default: 0.001)")
    g.add_argument("--particles", type=positive(int), help="draws of z per data point in each ELBO estimate (default: 1)")
    g.add_argument("--seed", type=int, help="seed of the held-out split, initialization, batch order and binarization (default: 0)")
    g.add_argument("--objective", choices=OBJECTIVES, help="elbo (Trace_ELBO), mean-field (analytic KL where it exists), "
                   "iwae (the IWAE bound with k = --particles), iwae-dreg (its doubly reparameterized gradient), or enum (elbo with the guide's "
                   "discrete sites summed out by TraceEnum_ELBO instead of drawn); elbo itself takes TraceEnum_ELBO where sites are "
                   "marked for enumeration and score-function terms where the guide draws a discrete site (default: elbo)")
    g.add_argument("--beta", type=non_negative, help="scale of the latent sites' log-densities, β-VAE (default: 1)")
    g.add_argument("--warmup-epochs", type=non_negative, help="KL warm-up: β rises linearly from 0 over these epochs (default: 0)")
    g.add_argument("--lr-schedule", choices=LR_SCHEDULES, help="none, cosine (to 0 at the last epoch) or plateau "
                   "(halve the rate after 5 epochs without a better validation ELBO) (default: none)")
    g.add_argument("--early-stopping", type=positive(int), metavar="PATIENCE",
                   help="stop after PATIENCE epochs without a better validation ELBO")
    g.add_argument("--capture", nargs="?", const="auto", choices=CAPTURE_MODES, metavar="MODE",
                   help="trace the training step once per batch shape and replay it (objectives elbo, mean-field and iwae); "
                        "MODE: auto (the default: the device's mode, graph on CPU and cuda-graph on CUDA, checked against the "
                        "eager step on the first batch of each shape, eager where they differ), graph, inductor (fastest per "
                        "step, 10-25 s to compile per batch shape), cuda-graph (unchecked: a model whose Python takes other "
                        "branches from step to step must not use them); off: eager")
    g.add_argument("--clip-grad", type=positive(float), help="clip the gradient's total norm to this value")
    g.add_argument("--skip-nonfinite", type=non_negative_int, help="skip up to N steps whose loss or gradient is not finite "
                   "(counted in metrics) before stopping (default: 0)")
    g.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: cpu)")
    g.add_argument("--nproc", type=positive(int), help="train in N processes on this machine (torchrun; gloo on CPU, nccl on GPUs); "
                   "--batch-size stays the global batch")
    g = p.add_argument_group("run folder")
    g.add_argument("--out", type=Path, help="run folder (default: runs/<dataset>)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    g.add_argument("--checkpoint-every", type=every, metavar="N|Mmin",
                   help="also checkpoint every N steps, or every M minutes (e.g. 500 or 10min), besides every epoch")
    g.add_argument("--overwrite", action="store_true", help="replace an existing run folder (once the new run has trained an epoch)")
    g.add_argument("--tensorboard", action="store_true", help="write TensorBoard curves to RUN/tensorboard "
                   "(needs pip install 'pyrovae[tensorboard]')")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def option(name: str) -> str:
    return "--" + name.replace("_", "-")


def given(args, name: str):
    value = getattr(args, name)
    return DEFAULTS.get(name) if value is None else value


def model_args_from(args) -> dict:
    extra = factory.parse_model_args(args.model_arg)
    for name in MODEL_OPTIONS:
        value = getattr(args, name)
        if value is not None:
            if name in extra:
                raise PyrovaeError(f"{option(name)} and --model-arg {name}=... both given: give one")
            extra[name] = list(value) if isinstance(value, (list, tuple)) else value
    for flag, name in COMPONENT_OPTIONS.items():
        items = getattr(args, flag, None)
        if items:
            if name in extra:
                raise PyrovaeError(f"{option(flag)} and --model-arg {name}=... both given: give one")
            extra[name] = factory.parse_model_args(items, option(flag))
    return extra


def absolute(path) -> str | None:
    return None if path is None else str(Path(path).expanduser().resolve())


def dataset_reference(name: str) -> str:
    """A data set's name, or its file's absolute path, so that the run can be read from anywhere."""
    return absolute(name) if name.lower().endswith((".npz", ".npy")) else name


def new_run(args, out: Path) -> tuple[Run, object]:
    """The config of a new run, its data and its model (not yet written anywhere)."""
    seed = given(args, "seed")
    dataset = dataset_reference(given(args, "dataset"))
    data = load_dataset(dataset, args.data_dir, download=bool(args.download), seed=seed)
    validation = given(args, "validation_fraction")
    data = with_validation(data, validation, seed)
    ref = given(args, "model") if args.model is not None or args.labelled is None else LABELLED_MODEL
    if factory.is_file_reference(ref):
        where, name = factory.split_reference(ref)
        ref = f"{absolute(where)}:{name}"
    build = factory.load(ref)
    model_args = {**factory.defaults(build), **model_args_from(args)}
    model = {"factory": ref, "args": model_args, "data_dim": data.dim,
             "image_shape": None if data.image_shape is None else list(data.image_shape), "file": None}
    if factory.is_file_reference(ref):
        source = factory.split_reference(ref)[0]
        model["file"] = {"original": source, "copy": MODEL_FILE, "sha256": factory.sha256(source)}
    train = TrainConfig(given(args, "epochs"), given(args, "batch_size"), given(args, "lr"), given(args, "particles"), seed,
                        given(args, "objective"), given(args, "beta"), given(args, "warmup_epochs"), args.clip_grad,
                        given(args, "skip_nonfinite"), given(args, "lr_schedule"), args.early_stopping, "auto" if args.capture is None else capture_setting(args))
    config = {
        "model": model,
        "data": {"dataset": dataset, "data_dir": absolute(args.data_dir), "download": bool(args.download),
                 "binarize": args.binarize, "seed": seed, "split_seed": seed, "test_fraction": 0.2,
                 "validation_fraction": validation, "labelled": args.labelled,
                 "heldout_sha256": heldout_sha256(data.test)},
        "train": train.to_dict(),
    }
    return Run(out, config), data


def apply_resume_options(args, run_: Run) -> None:
    """Refuse options that cannot change on resume; apply (and record) those that can."""
    fixed = [option(name) for name in FIXED_ON_RESUME if getattr(args, name, None) is not None]
    if fixed:
        raise PyrovaeError(f"{', '.join(fixed)} cannot change on --resume (the run keeps what it started with); "
                           f"only {', '.join(map(option, CHANGEABLE_ON_RESUME))} can: drop the others or start a new run")
    train = run_.config["train"]
    changed = []
    if args.epochs is not None and args.epochs != train["epochs"]:
        train["epochs"] = args.epochs
        changed.append(f"epochs {args.epochs}")
    for name in ("lr", "clip_grad", "skip_nonfinite", "early_stopping", "capture"):
        value = capture_setting(args) if name == "capture" else getattr(args, name)
        if value is not None and value != train.get(name):
            train[name] = value
            changed.append(f"{name.replace('_', ' ')} {value if isinstance(value, (str, bool)) else format(value, 'g')}")
    if changed:
        print(f"resuming with {', '.join(changed)} (recorded in {run_.path / 'config.json'})")


def run(args) -> int:
    if args.nproc is not None and args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return launch(args.argv, args.nproc)
    device = resolve_device(given(args, "device"))
    with distributed.process_group(device):
        return train(args, distributed.local_device(device))


def launch(argv: list[str], nproc: int) -> int:
    """Run this command in ``nproc`` processes with torchrun (on this machine), and wait."""
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "pyrovae", *rest]
    print(f"running {nproc} processes: {shlex.join(command[1:])}", flush=True)
    code = subprocess.run(command).returncode
    if code != 0:  # torchrun stopped the others; say so in one line after its long report
        print(f"pyrovae train: error: training in {nproc} processes failed (torchrun exit code {code}): "
              f"torchrun's report above names the process that failed first and why", file=sys.stderr)
    return code


def train(args, device: torch.device) -> int:
    """Parse, set up the run folder, train it in a :class:`~pyrovae.session.TrainingSession`, print."""
    out = args.out or default_out(given(args, "dataset"))
    for folder in (out, *out.parents):
        if folder.exists() and not folder.is_dir():
            where = "" if folder == out else f" ({folder} is a file)"
            raise PyrovaeError(f"--out {out} is a file, not a folder{where}: choose another --out")
    if args.resume and args.overwrite:
        raise PyrovaeError("--resume and --overwrite contradict each other: give one")
    if args.resume:
        run_ = Run.open(out)
        apply_resume_options(args, run_)
        data = run_.dataset()
        for note in run_.notes:
            print(note, file=sys.stderr)
    else:
        if out.exists() and any(out.iterdir()) and not args.overwrite:
            raise PyrovaeError(f"run folder {out} already exists: pass --resume to continue it or --overwrite to replace it")
        run_, data = new_run(args, out)
    session = TrainingSession(run_, data, device, resume=bool(args.resume), new_lr=args.lr is not None,
                              overwrite=bool(args.overwrite), checkpoint_every=args.checkpoint_every,
                              tensorboard=bool(args.tensorboard), progress=not args.no_progress)
    if session.main_process and any("TraceEnum" in e or "score-function" in e for e in session.estimators.values()):  # discrete sites
        print(f"objective {session.config.objective}: " + "; ".join(f"{e} on {what} batches" for what, e in session.estimators.items()))
    if session.resumed is not None and session.main_process:
        epoch, steps = session.resumed
        where = f" and {steps} steps" if steps else ""
        print(f"resuming {out} after epoch {epoch}{where} of {session.config.epochs}"
              + (f" in {session.size} processes" if session.size > 1 else ""))
    try:
        history = session.train()
    except Interrupted as e:
        raise Interrupted(f"{e.stopped}; resume with: pyrovae train --out {shlex.quote(str(e.run_path))} --resume",
                          e.code) from None
    if not session.main_process:
        return 0
    if data.image_shape is None:
        print(f"{session.run.path}: no pictures (the data are not images)")
    last = history[-1]
    seconds = sum(m["seconds"] for m in history)
    print(f"{session.run.path}: epoch {last['epoch']}, test ELBO {last['test_elbo']:.2f} nats per point ({seconds:.0f} s of training)")
    return 0


def capture_setting(args) -> str | bool | None:
    """--capture as the config records it: a mode, False for ``off``, None when not given."""
    return False if args.capture == "off" else args.capture


def default_out(dataset: str) -> Path:
    return Path("runs") / Path(dataset).stem
