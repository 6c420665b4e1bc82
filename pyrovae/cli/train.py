"""``pyrovae train``: fit a model by SVI (Pyro's Trace_ELBO, Adam) and leave a run folder.

The model is the built-in VAE (``--model pyrovae.models:vae``) or your own: ``--model FILE.py:NAME``
or ``--model package.module:NAME``, a factory called as ``NAME(data_dim=P, image_shape=..., **args)``
with ``--model-arg key=value`` (JSON values where they parse). Loading a model file runs its code.
``--latent-dim``, ``--hidden``, ``--activation``, ``--likelihood``, ``--prior`` and ``--guide`` are
model arguments too. The folder holds config.json, metrics.jsonl (ELBO per data point in nats, per
epoch), checkpoint.pt (saved atomically before training and after every epoch; --resume continues
from it) and pictures: samples, reconstructions, interpolations and the loss curve.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

from pyrovae import contract, factory, params as parameters
from pyrovae.data import BINARIZATIONS, DATASETS, Batches, check_binarizable, load_dataset, static_binarized
from pyrovae.errors import PyrovaeError
from pyrovae.generate import sample_prior
from pyrovae.plots import save_grid, save_loss_curve
from pyrovae.run import MODEL_FILE, Run, heldout_sha256, load_state, resolve_device
from pyrovae.train import TrainConfig, elbo_loss, fast_context, fit, make_optimizer, mean_elbo

from .interpolate import save_interpolations
from .reconstruct import save_reconstructions

DEFAULTS = {"dataset": "digits", "model": factory.BUILTIN, "epochs": 100, "batch_size": 128, "lr": 1e-3,
            "particles": 1, "seed": 0, "device": "cpu"}
MODEL_OPTIONS = ("latent_dim", "hidden", "activation", "likelihood", "prior", "guide")  # model arguments
CHANGEABLE_ON_RESUME = ("epochs", "lr", "device")
FIXED_ON_RESUME = ("dataset", "data_dir", "download", "binarize", "model", "model_arg", *MODEL_OPTIONS,
                   "batch_size", "particles", "seed")


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


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a model and write a run folder", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", help=f"{', '.join(DATASETS)}, or a .npz/.npy file of images or vectors (default: digits)")
    g.add_argument("--data-dir", type=Path, help="folder with the MNIST/Fashion-MNIST IDX files (default: ~/.cache/pyrovae or $PYROVAE_DATA)")
    g.add_argument("--download", action="store_true", default=None, help="download MNIST/Fashion-MNIST through torchvision if missing")
    g.add_argument("--binarize", choices=BINARIZATIONS, help="pixel binarization (default: dynamic where the observed site is binary, else none)")
    g = p.add_argument_group("model")
    g.add_argument("--model", help=f"model factory, FILE.py:NAME or package.module:NAME (default: {factory.BUILTIN})")
    g.add_argument("--model-arg", action="append", metavar="KEY=VALUE", help="an argument of the factory (repeatable)")
    g.add_argument("--latent-dim", type=positive(int), help="latent dimension D (built-in VAE: 50)")
    g.add_argument("--hidden", type=positive(int), nargs="+", help="decoder hidden sizes, the encoder mirrors them (built-in VAE: 400)")
    g.add_argument("--activation", help="relu, tanh, softplus or elu (built-in VAE: relu)")
    g.add_argument("--likelihood", help="a registered likelihood, see pyrovae list (built-in VAE: bernoulli)")
    g.add_argument("--prior", help="a registered prior, see pyrovae list (built-in VAE: normal)")
    g.add_argument("--guide", help="a registered guide, see pyrovae list (built-in VAE: diagonal)")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=positive(int), help="last epoch to train to (default: 100; with --resume, the run's)")
    g.add_argument("--batch-size", type=positive(int), help="data points per step (default: 128)")
    g.add_argument("--lr", type=positive(float), help="Adam learning rate (default: 0.001)")
    g.add_argument("--particles", type=positive(int), help="draws of z per data point in each ELBO estimate (default: 1)")
    g.add_argument("--seed", type=int, help="seed of the held-out split, initialization, batch order and binarization (default: 0)")
    g.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: cpu)")
    g = p.add_argument_group("run folder")
    g.add_argument("--out", type=Path, help="run folder (default: runs/<dataset>)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    g.add_argument("--overwrite", action="store_true", help="replace an existing run folder (once the new run has trained an epoch)")
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
    ref = given(args, "model")
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
    train = TrainConfig(given(args, "epochs"), given(args, "batch_size"), given(args, "lr"), given(args, "particles"), seed)
    config = {
        "model": model,
        "data": {"dataset": dataset, "data_dir": absolute(args.data_dir), "download": bool(args.download),
                 "binarize": args.binarize, "seed": seed, "split_seed": seed, "test_fraction": 0.2,
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
    if args.lr is not None and args.lr != train["lr"]:
        train["lr"] = args.lr
        changed.append(f"lr {args.lr:g}")
    if changed:
        print(f"resuming with {', '.join(changed)} (recorded in {run_.path / 'config.json'})")


def run(args) -> int:
    device = resolve_device(given(args, "device"))
    out = args.out or default_out(given(args, "dataset"))
    if out.exists() and not out.is_dir():
        raise PyrovaeError(f"--out {out} is a file, not a folder: choose another --out")
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
    config = TrainConfig(**run_.config["train"])

    torch.manual_seed(config.seed)
    parameters.clear()
    model = run_.build_model(data, device)
    d = run_.config["data"]
    if d["binarize"] is None:  # decided by the observed site: binary data are binarized afresh each pass
        support = contract.observed_support(model.model, model.guide, data.train[:8].to(device))
        d["binarize"] = "dynamic" if _is_boolean(support) else "none"
    check_binarizable(data.train, d["binarize"])
    sample = data.train[:8] if d["binarize"] == "none" else static_binarized(data.train[:8], config.seed)
    contract.check(model.model, model.guide, sample.to(device), "the training data")
    batches = Batches(data.train, config.batch_size, d["binarize"], seed=config.seed, device=device)
    test_x = run_.eval_split(data).to(device)
    trained = parameters.trainable(model.model, model.guide, batches.peek(8))
    optimizer = make_optimizer(trained.values(), config.lr)

    start_epoch = 0
    if args.resume:
        state = run_.load_checkpoint()
        if state["epoch"] > config.epochs:
            raise PyrovaeError(f"{out} has trained {state['epoch']} epochs already: give --epochs above {state['epoch']}")
        load_state(model, trained, state)
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:
            group["lr"] = config.lr
        batches.load_state_dict(state["batches"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch = state["epoch"]
        run_.truncate_metrics(start_epoch)
        run_.save_config()
        print(f"resuming {out} after epoch {start_epoch} of {config.epochs}")
    else:
        run_ = Run.create(out, run_.config, overwrite=args.overwrite)
        if run_.config["model"]["file"]:
            shutil.copyfile(run_.config["model"]["file"]["original"], run_.path / MODEL_FILE)
        with fast_context():
            test_elbo = mean_elbo(elbo_loss(model.model, model.guide), test_x)
        run_.append_metrics({"epoch": 0, "train_elbo": None, "test_elbo": test_elbo, "seconds": 0.0})
        run_.save_checkpoint(model, trained, optimizer, batches, 0)

    def on_epoch_end(metrics: dict) -> None:
        run_.append_metrics(metrics)
        run_.save_checkpoint(model, trained, optimizer, batches, metrics["epoch"])
        run_.commit()

    try:
        fit(model, batches, config, test_x, optimizer, start_epoch, on_epoch_end, progress=not args.no_progress)
    except BaseException:
        run_.discard()
        raise

    if hasattr(model, "eval"):
        model.eval()
    if data.image_shape is None:
        print(f"{run_.path}: no pictures (the data are not images)")
    else:
        save_grid(sample_prior(model.model, test_x[:1], 64), data.image_shape, run_.path / "samples.png")
        save_reconstructions(model, test_x[:32], data.image_shape, run_.path / "reconstructions.png")
        save_interpolations(model, test_x, data.image_shape, run_.path / "interpolations.png")
    history = run_.metrics()
    save_loss_curve(history, run_.path / "loss.png")
    last = history[-1]
    seconds = sum(m["seconds"] for m in history)
    print(f"{run_.path}: epoch {last['epoch']}, test ELBO {last['test_elbo']:.2f} nats per point ({seconds:.0f} s of training)")
    return 0


def _is_boolean(support) -> bool:
    while hasattr(support, "base_constraint"):
        support = support.base_constraint
    return support is torch.distributions.constraints.boolean


def default_out(dataset: str) -> Path:
    return Path("runs") / Path(dataset).stem
