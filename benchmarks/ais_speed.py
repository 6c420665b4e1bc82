"""Speed of AIS with HMC: pyrovae against a hand-written PyTorch AIS for the Bernoulli MLP VAE.

Both estimate log p(x) per held-out point with the same algorithm and settings — M chains per
point (plus the same tuning chains for the step size), the sigmoidal schedule of T steps, HMC with
L leapfrog steps, step size adapted per point toward acceptance 0.65 — on the same trained weights
and the same points:

    (a) pyrovae      pyrovae.ais.ais(model, guide, x, ...): log-densities from the model's and guide's
                     Pyro distributions (replayed under a particle plate), traced once per pass into
                     a graph of tensor operations (``capture``)
    (a') pyrovae, eager   the same with capture=False: Pyro's tracing on every gradient evaluation
    (b) pytorch      hand-written: one tensor z (C, B, D); log q and its gradient by formula (the
                     encoder runs once per pass), log p(x, z) = log N(z; 0, I) − BCE-with-logits of
                     the decoder, its gradient by torch.autograd.grad

Each method runs on all points in one pass, in turn, ``--repeats`` times, after an untimed warm-up
call on the same points (pyrovae traces its transition once per shape and keeps it across calls;
the warm-up's seconds are reported apart, ``warmup_seconds``); reported: points/s
(median), the ratio (a)/(b) of the medians and the median of the per-repeat ratios (steadier on a
busy machine), and each method's mean log p(x) with its standard error across points. With the same
seed the three draw the same random numbers in the same order, so their estimates agree to rounding.
JSON goes to results/ais_speed.json.

    python benchmarks/ais_speed.py                       # digits, 20 points, T=100, M=8, L=5
    python benchmarks/ais_speed.py --steps 500 --chains 16 --leapfrog 10 --out benchmarks/results/ais_speed_T500.json
    python benchmarks/ais_speed.py --tiny --out /tmp/ais_tiny.json   # seconds, for the tests
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import pyro
import torch
import torch.nn.functional as F

from common import machine, write_json
from pyrovae import ais as pyrovae_ais
from pyrovae.data import Batches, load_dataset, static_binarized
from pyrovae.estimators import Estimate, log_px
from pyrovae.models import VAEConfig, build_vae
from pyrovae.train import TrainConfig, fit

HERE = Path(__file__).resolve().parent
LOG_2PI = math.log(2 * math.pi)


def hand_written_ais(encoder, decoder, x, num_steps, num_chains, num_leapfrog, step_size, tune_chains=pyrovae_ais.TUNE_CHAINS,
                     target=pyrovae_ais.TARGET_ACCEPT, factor=pyrovae_ais.ADAPT_FACTOR) -> Estimate:
    """AIS from q(z|x) to p(x, z) for a VAE with N(0, I) prior, diagonal-Gaussian encoder (``loc_scale``)
    and Bernoulli decoder logits; all points at once, x (B, P) → log p̂(x) (B,) ± s.e."""
    B = x.shape[0]
    C = num_chains + tune_chains
    betas = pyrovae_ais.sigmoid_schedule(num_steps).tolist()
    with torch.no_grad():
        loc, scale = encoder.loc_scale(x)  # (B, D)
    D = loc.shape[-1]
    xs = x.expand(C, B, x.shape[-1])

    def density(z):
        """log q, log p(x, z) − log q, and their gradients in z."""
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            log_joint = -0.5 * (z * z).sum(-1) - 0.5 * D * LOG_2PI \
                - F.binary_cross_entropy_with_logits(decoder(z), xs, reduction="none").sum(-1)
            grad_joint, = torch.autograd.grad(log_joint.sum(), z)
        z = z.detach()
        eps = (z - loc) / scale
        log_q = (-0.5 * eps * eps - scale.log()).sum(-1) - 0.5 * D * LOG_2PI
        grad_q = -eps / scale
        return z, log_q, log_joint.detach() - log_q, grad_q, grad_joint - grad_q

    z = loc + scale * torch.randn(C, B, D)
    z, lq, lr, gq, gr = density(z)
    log_w = torch.zeros(C, B, dtype=torch.float64)
    step = torch.full((B, 1), step_size)
    for t in range(1, num_steps + 1):
        log_w += (betas[t] - betas[t - 1]) * lr.double()
        if t == num_steps:
            break
        beta = betas[t]
        v0 = torch.randn_like(z)
        z1, v = z, v0 + 0.5 * step * (gq + beta * gr)
        for i in range(num_leapfrog):
            z1, lq1, lr1, gq1, gr1 = density(z1 + step * v)
            v = v + (step if i < num_leapfrog - 1 else 0.5 * step) * (gq1 + beta * gr1)
        h0 = -(lq + beta * lr) + 0.5 * (v0 * v0).sum(-1)
        h1 = -(lq1 + beta * lr1) + 0.5 * (v * v).sum(-1)
        log_accept = (h0 - h1).clamp(max=0).nan_to_num(nan=-math.inf)
        accept = torch.rand_like(log_accept).log() < log_accept
        a = accept[..., None]
        z, gq, gr = torch.where(a, z1, z), torch.where(a, gq1, gq), torch.where(a, gr1, gr)
        lq, lr = torch.where(accept, lq1, lq), torch.where(accept, lr1, lr)
        tuned = log_accept[num_chains:].exp().mean(0)[:, None]
        step = torch.where(tuned > target, step * factor, step / factor)
    return log_px(log_w[:num_chains])


def trained_vae(args):
    data = load_dataset(args.dataset, args.data_dir)
    torch.manual_seed(args.seed)
    config = VAEConfig(data.dim, latent_dim=args.latent_dim, hidden=tuple(args.hidden))
    vae = build_vae(config)
    batches = Batches(data.train, 128, "dynamic", seed=args.seed)
    history = fit(vae, batches, TrainConfig(epochs=args.train_epochs, batch_size=128, seed=args.seed), progress=False)
    x = static_binarized(data.test, args.seed + 1)[: args.points]
    return vae.eval(), x, {"dataset": args.dataset, "model": config.to_dict(), "train_epochs": args.train_epochs,
                           "train_elbo_last_epoch": history[-1]["train_elbo"], "points": len(x)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="digits", help="digits (no download) or mnist")
    p.add_argument("--data-dir", default=str(HERE.parent.parent / "shared" / "data"), help="folder with the MNIST files")
    p.add_argument("--hidden", type=int, nargs="+", default=[200], help="decoder hidden sizes; the encoder mirrors them")
    p.add_argument("--latent-dim", type=int, default=10)
    p.add_argument("--train-epochs", type=int, default=30)
    p.add_argument("--points", type=int, default=20, help="the first N held-out points")
    p.add_argument("--steps", type=int, default=100, help="T")
    p.add_argument("--chains", type=int, default=8, help="M")
    p.add_argument("--leapfrog", type=int, default=5, help="L")
    p.add_argument("--step-size", type=float, default=pyrovae_ais.DEFAULT_STEP_SIZE, help="initial HMC step size")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-eager", action="store_true", help="skip (a'), pyrovae with capture=False")
    p.add_argument("--tiny", action="store_true", help="3 points, T=10, M=4, L=2, 1 epoch: checks that the script runs")
    p.add_argument("--out", default=str(HERE / "results" / "ais_speed.json"))
    args = p.parse_args(argv)
    if args.tiny:
        args.points, args.steps, args.chains, args.leapfrog, args.train_epochs, args.repeats = 3, 10, 4, 2, 1, 1
        args.hidden, args.latent_dim = [16], 2
    torch.set_num_threads(args.threads)
    vae, x, description = trained_vae(args)
    settings = dict(num_steps=args.steps, num_chains=args.chains, num_leapfrog=args.leapfrog, step_size=args.step_size)
    methods = {
        "pyrovae": lambda xb: pyrovae_ais.ais(vae.model, vae.guide, xb, capture=True, **settings).log_px,
        "pyrovae_eager": lambda xb: pyrovae_ais.ais(vae.model, vae.guide, xb, capture=False, **settings).log_px,
        "pytorch": lambda xb: hand_written_ais(vae.encoder, vae.decoder, xb, args.steps, args.chains, args.leapfrog, args.step_size),
    }
    if args.no_eager:
        del methods["pyrovae_eager"]
    warmup = {}
    for name, method in methods.items():  # warm-up on the timed shape: pyrovae's trace of its transition, allocator, caches
        pyro.set_rng_seed(args.seed)
        start = time.perf_counter()
        method(x)
        warmup[name] = time.perf_counter() - start
    seconds = {name: [] for name in methods}
    estimates = {}
    for repeat in range(args.repeats):
        for name, method in methods.items():
            pyro.set_rng_seed(args.seed + repeat)
            start = time.perf_counter()
            estimates[name] = method(x)
            seconds[name].append(time.perf_counter() - start)
            print(f"repeat {repeat}: {name} {seconds[name][-1]:.2f} s", flush=True)
    rate = {name: len(x) / statistics.median(s) for name, s in seconds.items()}
    means = {name: estimates[name].mean() for name in methods}
    row = {**description, "num_steps": args.steps, "num_chains": args.chains, "num_leapfrog": args.leapfrog,
           "tune_chains": pyrovae_ais.TUNE_CHAINS, "seconds": seconds, "warmup_seconds": warmup, "points_per_s": rate,
           "ratio_pyrovae_to_pytorch": rate["pyrovae"] / rate["pytorch"],
           "ratio_paired_median": statistics.median(h / p for h, p in zip(seconds["pytorch"], seconds["pyrovae"])),
           "log_px_mean": means, "log_px_stderr_mean": {name: estimates[name].stderr.mean().item() for name in methods}}
    print(f"{description['dataset']} {'-'.join(map(str, [x.shape[1], *args.hidden, args.latent_dim]))}, {len(x)} points, "
          f"T={args.steps}, M={args.chains} (+{pyrovae_ais.TUNE_CHAINS} tuning), L={args.leapfrog}, {args.threads} threads")
    print(f"{'method':<16} {'points/s':>9} {'× pytorch':>9}  log p(x) mean ± s.e.")
    for name in methods:
        print(f"{name:<16} {rate[name]:>9.2f} {rate[name] / rate['pytorch']:>8.2f}×  {means[name][0]:.3f} ± {means[name][1]:.3f}")
    print(f"pyrovae / pytorch, median of the per-repeat ratios: {row['ratio_paired_median']:.2f}×")
    settings = {k: v for k, v in vars(args).items() if k not in ("data_dir", "out")}  # no machine paths in the results
    write_json({"benchmark": "ais_speed", "machine": machine(), "command": "python benchmarks/ais_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
                "settings": settings, "results": [row]}, args.out)


if __name__ == "__main__":
    main()
