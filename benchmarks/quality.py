"""Quality, quick protocol: test log p(x) of a VAE on dynamically binarized MNIST after a fixed budget.

Model as in Burda et al. (2016): 784-200-200-50, tanh, Bernoulli likelihood, N(0, I) prior.
Training: Adam (lr 1e-3), batch 100, a fresh binarization of every batch, for --minutes of wall
clock (default 15, on the machine's CPU threads given by --threads). Evaluation: importance-sampled
log p(x) with K = 5000 per test point on the whole test set (binarized once, seed 1), with the
ELBO, IWAE bounds and PSIS k̂. --full runs the papers' long schedule instead (3^i epochs at
lr 1e-3·10^(-i/7), i = 0..7: 3280 epochs; for a GPU). Results are printed beside the published
numbers and written to JSON.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from common import machine, write_json
from pyrovae.data import Batches, load_dataset, static_binarized
from pyrovae.evaluate import evaluate
from pyrovae.models import VAEConfig, build_vae
from pyrovae.train import elbo_loss, fast_context, make_optimizer, train_step

ROOT = Path(__file__).resolve().parent
PUBLISHED = [  # test log p(x) in nats, dynamically binarized MNIST, k = 5000 (Burda et al. 2016, Table 1)
    ("VAE, k=1, 784-200-200-50 (Burda et al. 2016)", -86.76),
    ("IWAE, k=5 (Burda et al. 2016)", -85.54),
    ("IWAE, k=50 (Burda et al. 2016)", -84.78),
    ("VAE, two stochastic layers (Burda et al. 2016)", -85.33),
    ("VampPrior, MLP (Tomczak & Welling 2018)", -85.6),
]


def schedule(args):
    """(epochs, lr) stages: one stage bounded by time, or the papers' eight stages."""
    if args.full:
        return [(3**i, 1e-3 * 10 ** (-i / 7)) for i in range(8)]
    return [(None, 1e-3)]


def train(vae, batches, args) -> dict:
    loss_fn = elbo_loss(vae.model, vae.guide)
    optimizer = make_optimizer(vae.parameters(), 1e-3)
    deadline = time.perf_counter() + 60 * args.minutes
    start, epochs, steps, last = time.perf_counter(), 0, 0, float("nan")
    with fast_context():
        for stage_epochs, lr in schedule(args):
            for group in optimizer.param_groups:
                group["lr"] = lr
            done = 0
            while (stage_epochs is None or done < stage_epochs) and (args.full or time.perf_counter() < deadline):
                total = 0.0
                for _, x in batches:
                    total += train_step(loss_fn, optimizer, x)
                    steps += 1
                    if not args.full and time.perf_counter() >= deadline:
                        break
                epochs, done, last = epochs + 1, done + 1, -total / len(batches.x)
    return {"epochs": epochs, "steps": steps, "seconds": time.perf_counter() - start, "last_epoch_train_elbo": last}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(ROOT.parent.parent / "shared" / "data"), help="folder with the MNIST IDX files")
    p.add_argument("--minutes", type=float, default=15.0, help="training budget, wall clock")
    p.add_argument("--full", action="store_true", help="the papers' 3280-epoch schedule instead of a time budget")
    p.add_argument("-k", "--samples", type=int, default=5000, help="importance samples per test point")
    p.add_argument("--test-points", type=int, help="evaluate only the first N test points")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="digits, a few seconds, K = 50: checks that the script runs")
    p.add_argument("--out", default=str(ROOT / "results" / "quality.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.tiny:
        data, args.minutes, args.samples, args.test_points = load_dataset("digits"), 0.05, 50, 20
        config = VAEConfig(data.dim, latent_dim=8, hidden=(32, 32), activation="tanh")
    else:
        data = load_dataset("mnist", args.data_dir)
        config = VAEConfig(784, latent_dim=50, hidden=(200, 200), activation="tanh")
    device = torch.device(args.device)
    vae = build_vae(config).to(device)
    batches = Batches(data.train, 100, "dynamic", seed=args.seed, device=device)
    training = train(vae, batches, args)
    print(f"trained {training['epochs']} epochs ({training['steps']} steps) in {training['seconds']:.0f} s")

    x_test = static_binarized(data.test, args.seed + 1)[: args.test_points].to(device)
    start = time.perf_counter()
    result = evaluate(vae.model, vae.guide, x_test, num_samples=args.samples, iwae_ks=(1, 5, 50),
                      batch_size=1, compile=not args.tiny, progress=not args.tiny)
    seconds = time.perf_counter() - start
    summary = result.summary()
    log_px, se = summary["log_px"]
    print(result.table())
    print(f"\nevaluated {len(x_test)} test points in {seconds:.0f} s ({len(x_test) / seconds:.1f} points/s)")
    budget = "papers' schedule (3280 epochs)" if args.full else f"{args.minutes:g} min on {args.threads} CPU threads"
    print(f"\n{'test log p(x), nats (K = ' + str(args.samples) + ')':<52} {'value':>8}")
    print(f"{'pyrovae VAE, ' + budget:<52} {log_px:>8.2f} ± {se:.2f}")
    for name, value in PUBLISHED:
        print(f"{name:<52} {value:>8.2f}")
    write_json({
        "benchmark": "quality",
        "protocol": "dynamically binarized MNIST; 784-200-200-50 tanh VAE; Adam 1e-3, batch 100; test set binarized once; "
                    f"log p(x) by importance sampling with K = {args.samples}",
        "budget": budget, "machine": machine(), "settings": vars(args), "training": training,
        "evaluation_seconds": seconds, "summary": summary, "published": dict(PUBLISHED),
    }, args.out)


if __name__ == "__main__":
    main()
