"""``pyrovae train``: fit a VAE by SVI (Pyro's Trace_ELBO, Adam) and leave a run folder.

The folder holds config.json, metrics.jsonl (ELBO per data point in nats, per epoch), checkpoint.pt
(saved atomically after every epoch; --resume continues from it) and pictures: samples, reconstructions,
interpolations and the loss curve.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from pyrovae.data import BINARIZATIONS, DATASETS, Batches, load_dataset
from pyrovae.models import LIKELIHOODS, PRIORS, VAEConfig, build_model
from pyrovae.nn import ACTIVATIONS
from pyrovae.plots import save_grid, save_loss_curve
from pyrovae.generate import sample_prior
from pyrovae.run import Run, check_likelihood_data, resolve_device
from pyrovae.train import TrainConfig, elbo_loss, fast_context, fit, make_optimizer, mean_elbo

from .interpolate import save_interpolations
from .reconstruct import save_reconstructions


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train", help="train a VAE and write a run folder", description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="digits", help=f"{', '.join(DATASETS)}, or a .npz/.npy file of images or vectors in [0, 1]")
    g.add_argument("--data-dir", type=Path, help="folder with the MNIST/Fashion-MNIST IDX files (default: ~/.cache/pyrovae or $PYROVAE_DATA)")
    g.add_argument("--download", action="store_true", help="download MNIST/Fashion-MNIST through torchvision if missing")
    g.add_argument("--binarize", choices=BINARIZATIONS, help="pixel binarization (default: dynamic for a Bernoulli likelihood, else none)")
    g = p.add_argument_group("model")
    g.add_argument("--latent-dim", type=int, default=50, help="latent dimension D")
    g.add_argument("--hidden", type=int, nargs="+", default=[400], help="decoder hidden sizes (the encoder mirrors them)")
    g.add_argument("--activation", default="relu", choices=sorted(ACTIVATIONS))
    g.add_argument("--likelihood", default="bernoulli", choices=LIKELIHOODS.names())
    g.add_argument("--prior", default="normal", choices=PRIORS.names())
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=None, help="last epoch to train to (default: 100; with --resume, the run's)")
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    g.add_argument("--particles", type=int, default=1, help="draws of z per data point in each ELBO estimate")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    g = p.add_argument_group("run folder")
    g.add_argument("--out", type=Path, help="run folder (default: runs/<dataset>)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    g.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def config_from_args(args, data_dim: int) -> dict:
    likelihood = LIKELIHOODS[args.likelihood]
    binarize = args.binarize or ("dynamic" if likelihood.binary_data else "none")
    model = VAEConfig(data_dim, args.latent_dim, tuple(args.hidden), args.activation, args.likelihood, args.prior)
    train = TrainConfig(args.epochs or 100, args.batch_size, args.lr, args.particles, args.seed)
    data_dir = None if args.data_dir is None else str(args.data_dir)
    return {
        "model": model.to_dict(),
        "data": {"dataset": args.dataset, "data_dir": data_dir, "download": args.download, "binarize": binarize, "seed": args.seed},
        "train": train.to_dict(),
    }


def default_out(dataset: str) -> Path:
    return Path("runs") / Path(dataset).stem


def run(args) -> int:
    device = resolve_device(args.device)
    out = args.out or default_out(args.dataset)
    if args.resume:
        run_ = Run.open(out)
        if args.epochs is not None:
            run_.config["train"]["epochs"] = args.epochs
        data = run_.dataset()
    else:
        data = load_dataset(args.dataset, args.data_dir, download=args.download)
        run_ = Run(out, config_from_args(args, data.dim))
    config = TrainConfig(**run_.config["train"])
    binarize = run_.config["data"]["binarize"]

    torch.manual_seed(config.seed)
    module = build_model(run_.config["model"]).to(device)
    check_likelihood_data(module, data.train, binarize)
    batches = Batches(data.train, config.batch_size, binarize, seed=config.seed, device=device)
    test_x = run_.eval_split(data).to(device)
    optimizer = make_optimizer(module.parameters(), config.lr)

    start_epoch = 0
    if args.resume:
        state = run_.load_checkpoint(device)
        module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        batches.load_state_dict(state["batches"])
        torch.set_rng_state(state["torch_rng"])
        start_epoch = state["epoch"]
        run_.truncate_metrics(start_epoch)
        run_.save_config()
        print(f"resuming {out} after epoch {start_epoch} of {config.epochs}")
    else:
        run_ = Run.create(out, run_.config, overwrite=args.overwrite)
        with fast_context():
            run_.append_metrics({"epoch": 0, "train_elbo": None, "test_elbo": mean_elbo(elbo_loss(module.model, module.guide), test_x), "seconds": 0.0})

    def on_epoch_end(metrics: dict) -> None:
        run_.append_metrics(metrics)
        run_.save_checkpoint(module, optimizer, batches, metrics["epoch"])

    fit(module, batches, config, test_x, optimizer, start_epoch, on_epoch_end, progress=not args.no_progress)

    module.eval()
    save_grid(sample_prior(module.model, test_x[:1], 64), data.image_shape, run_.path / "samples.png")
    save_reconstructions(module, test_x[:32], data.image_shape, run_.path / "reconstructions.png")
    save_interpolations(module, test_x, data.image_shape, run_.path / "interpolations.png")
    history = run_.metrics()
    save_loss_curve(history, run_.path / "loss.png")
    last = history[-1]
    seconds = sum(m["seconds"] for m in history)
    print(f"{out}: epoch {last['epoch']}, test ELBO {last['test_elbo']:.2f} nats per point ({seconds:.0f} s of training)")
    return 0
