"""Quality, quick protocol: test log p(x) of a VAE on dynamically binarized MNIST after a fixed budget.

Model as in Burda et al. (2016): 784-200-200-50, tanh (--activation elu: the best at this budget),
Bernoulli likelihood, N(0, I) prior; the components' configurations (VampPrior, IAF guide, two
stochastic layers 784-(200-200)-100-(100-100)-50) change one part each. Every network, the
hand-written one's included, starts with the decoder's output bias at the logit of each pixel's
training mean, as in Burda et al.'s code (``--output-bias zero``: PyTorch's default instead).
Training: Adam (lr 1e-3 unless --lr; --lr-schedule cosine anneals it to 0 over the budget), batch 100
unless --batch-size, a fresh binarization of every batch, for --minutes of wall clock (default 15,
on the machine's CPU threads given by --threads), or for --epochs epochs (equal epochs for every
configuration, whatever the time). Evaluation: importance-sampled
log p(x) with K = 5000 per test point on the whole test set (binarized once, seed 1), with the
ELBO, IWAE bounds and PSIS k̂. --full runs the papers' long schedule instead (3^i epochs at
lr 1e-3·10^(-i/7), i = 0..7: 3280 epochs; batch 20 in Burda et al.'s code, --batch-size 20; for a GPU). Results are printed beside the published
numbers and written to JSON, with the command, the machine and its load average.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from common import machine, write_json
from pyrovae import params
from pyrovae.cli.train import CAPTURE_MODES
from pyrovae.context import flush_denormals_in_every_thread
from pyrovae.data import Batches, load_dataset, static_binarized
from pyrovae.evaluate import evaluate
from pyrovae.models import LIKELIHOODS, two_layer, vae
from pyrovae.models.networks import initialize_output_bias
from pyrovae.nn import ACTIVATIONS
from pyrovae.objectives import loss as objective_loss, warmup_scale
from pyrovae.train import CAPTURED_OBJECTIVES, fast_context, latent_use, make_optimizer, train_step

# name: (model factory arguments, objective, particles, warm-up epochs); "handwritten" is plain PyTorch
CONFIGS = {
    "vae": ({}, "elbo", 1, 0),
    "vae-captured": ({}, "elbo", 1, 0),  # the same, with the step captured (pyrovae train --capture)
    "vae-warmup": ({}, "elbo", 1, 10),
    "vae-mean-field": ({}, "mean-field", 1, 0),  # TraceMeanField_ELBO: the analytic KL, as the hand-written VAE
    "vae-mean-field-warmup": ({}, "mean-field", 1, 10),
    "iwae5": ({}, "iwae", 5, 0),
    "iwae5-dreg": ({}, "iwae-dreg", 5, 0),
    "vamp": ({"prior": "vamp"}, "elbo", 1, 0),
    "vamp-warmup": ({"prior": "vamp"}, "elbo", 1, 10),  # the paper's recipe: KL warm-up (there over 100 epochs)
    "vamp-iwae5": ({"prior": "vamp"}, "iwae", 5, 0),
    "iaf": ({"guide": "iaf"}, "elbo", 1, 0),  # steps that start at the identity (Kingma et al.'s code)
    "iaf-gated": ({"guide": "iaf", "guide_args": {"gated": True}}, "elbo", 1, 0),  # the paper's eq. 14 steps
    "two-layer": ({"two_layer": True}, "elbo", 1, 0),
    "two-layer-warmup": ({"two_layer": True}, "elbo", 1, 10),  # KL warm-up, as Sønderby et al. (2016) for deep VAEs
    "two-layer-iwae5": ({"two_layer": True}, "iwae", 5, 0),
    "handwritten": None,
}

ROOT = Path(__file__).resolve().parent
PUBLISHED = [  # test log p(x) in nats, k = 5000, as each paper reports it: Burda et al.'s on dynamically
    # binarized MNIST, Tomczak & Welling's (AISTATS version, with reference code jmtomczak/vae_vampprior) on the
    # statically binarized set (one fixed binarization, which a model can overfit): not comparable nat for nat
    ("VAE, k=1, 784-200-200-50 tanh, 3280 epochs (Burda et al. 2016, Table 1)", -86.76),
    ("IWAE, k=5 (Burda et al. 2016)", -85.54),
    ("IWAE, k=50 (Burda et al. 2016)", -84.78),
    ("VAE, two stochastic layers 784-(200-200)-100-(100-100)-50 (Burda et al. 2016)", -85.33),
    ("IWAE k=5, two stochastic layers (Burda et al. 2016)", -83.89),
    ("VAE, N(0, I) prior, gated MLP 300-300, z 40, statically binarized MNIST (Tomczak & Welling 2018, Table 1)", -88.56),
    ("VampPrior, K = 500, the same gated networks, 100 epochs of warm-up, statically binarized MNIST (Tomczak & Welling 2018, Table 1)", -85.57),
]
PAPERS = {  # configuration → the published row it is to be read beside (protocols differ: see PUBLISHED)
    "handwritten": "VAE, k=1, 784-200-200-50 tanh, 3280 epochs (Burda et al. 2016, Table 1)",
    "vae": "VAE, k=1, 784-200-200-50 tanh, 3280 epochs (Burda et al. 2016, Table 1)",
    "vae-mean-field": "VAE, k=1, 784-200-200-50 tanh, 3280 epochs (Burda et al. 2016, Table 1)",
    "iwae5": "IWAE, k=5 (Burda et al. 2016)",
    "two-layer": "VAE, two stochastic layers 784-(200-200)-100-(100-100)-50 (Burda et al. 2016)",
    "two-layer-warmup": "VAE, two stochastic layers 784-(200-200)-100-(100-100)-50 (Burda et al. 2016)",
    "two-layer-iwae5": "IWAE k=5, two stochastic layers (Burda et al. 2016)",
    "vamp": "VampPrior, K = 500, the same gated networks, 100 epochs of warm-up, statically binarized MNIST (Tomczak & Welling 2018, Table 1)",
    "vamp-warmup": "VampPrior, K = 500, the same gated networks, 100 epochs of warm-up, statically binarized MNIST (Tomczak & Welling 2018, Table 1)",
    "vamp-iwae5": "VampPrior, K = 500, the same gated networks, 100 epochs of warm-up, statically binarized MNIST (Tomczak & Welling 2018, Table 1)",
}
# Kingma et al. (2016) report IAF against the diagonal guide with convolutional ResNet VAEs only: no MLP number.


def schedule(args):
    """(epochs, lr) stages: one stage bounded by time (or of ``--epochs`` epochs), or the papers' eight stages."""
    if args.full:
        return [(3**i, args.lr * 10 ** (-i / 7)) for i in range(8)]
    return [(args.epochs, args.lr)]


def cosine(lr: float, elapsed: float, budget: float) -> float:
    """lr · ½(1 + cos(π t / T)): the rate annealed to 0 over the time budget T."""
    return 0.5 * lr * (1 + math.cos(math.pi * min(elapsed / budget, 1.0)))


class HandWritten(nn.Module):
    """The same VAE in plain PyTorch: analytic KL, Bernoulli log-likelihood from the logits."""

    def __init__(self, sizes: list[int], latent: int, activation: str = "tanh"):
        super().__init__()
        def mlp(dims):
            layers = [m for a, b in zip(dims[:-1], dims[1:]) for m in (nn.Linear(a, b), ACTIVATIONS[activation]())]
            return nn.Sequential(*layers[:-1])
        self.encoder = mlp([sizes[0], *sizes[1:], 2 * latent])
        self.decoder = mlp([latent, *sizes[1:][::-1], sizes[0]])

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """−ELBO summed over the batch, one draw of z per point."""
        loc, raw = self.encoder(x).chunk(2, -1)
        scale = F.softplus(raw) + 1e-4
        z = loc + scale * torch.randn_like(loc)
        log_px = -F.binary_cross_entropy_with_logits(self.decoder(z), x, reduction="sum")
        kl = (0.5 * (loc**2 + scale**2 - 1) - scale.log()).sum()
        return kl - log_px


def build(name: str, dim: int, tiny: bool, activation: str = "tanh"):
    """(model or HandWritten, loss function, parameters) for a configuration, every network with ``activation``."""
    hidden, latent = ((32, 32), 8) if tiny else ((200, 200), 50)
    if name == "handwritten":
        net = HandWritten([dim, *hidden], latent, activation)
        return net, net.loss, list(net.parameters())
    model_args, objective, particles, _ = CONFIGS[name]
    if model_args.get("two_layer"):
        sizes = {"top_dim": 4, "bottom_dim": 8, "hidden": (32, 32), "top_hidden": (16, 16)} if tiny else {}
        model = two_layer(dim, activation=activation, **sizes)
    else:
        model = vae(dim, latent_dim=latent, hidden=hidden, activation=activation, **model_args)
    return model, objective_loss(objective, model.model, model.guide, particles), None


@torch.no_grad()
def initialize(model, x: torch.Tensor) -> None:
    """The decoder's output bias at the logit of each pixel's mean over x (N, P), as Burda et al.'s
    code starts theirs: pyrovae's models through their ``initialize`` (the VampPrior's own
    initialization included), the hand-written one through the same Bernoulli's ``output_bias``."""
    if isinstance(model, HandWritten):
        initialize_output_bias(model.decoder, LIKELIHOODS.build("bernoulli", data_dim=x.shape[-1]), x)
    else:
        model.initialize(x)


def captured_step(name: str, model, parameters: list, capture: str | None):
    """The configuration's step captured in mode ``capture`` (None: not captured; "auto": the
    device's default), with its objective and number of particles; None where it runs eagerly."""
    objective = "elbo" if name == "handwritten" else CONFIGS[name][1]
    if not (name == "vae-captured" or (capture and name != "handwritten" and objective in CAPTURED_OBJECTIVES)):
        return None
    from pyrovae.capture import CapturedStep

    mode = None if capture in (None, "auto") else capture
    return CapturedStep(model.model, model.guide, {str(i): p for i, p in enumerate(parameters)},
                        num_particles=CONFIGS[name][2], objective=objective, mode=mode)


def train(name: str, model, loss_fn, parameters, batches, args) -> dict:
    """Adam on batches of --batch-size for the time budget, or for --epochs epochs, or the papers'
    schedule with --full; with ``--lr-schedule cosine`` the rate is annealed to 0 over the budget
    (the time, or the steps of --epochs), step by step."""
    warmup = 0 if name == "handwritten" else CONFIGS[name][3]
    if warmup and args.warmup is not None:
        warmup = args.warmup
    if parameters is None:
        parameters = list(params.trainable(model.model, model.guide, batches.peek(8)).values())
    optimizer = make_optimizer(parameters, args.lr)
    captured = captured_step(name, model, parameters, args.capture)
    if captured is not None:
        print(f"{name}: step captured ({captured.mode})")
    timed = not (args.full or args.epochs)
    budget = 60 * args.minutes
    total_steps = (args.epochs or 0) * len(batches)
    anneal = args.lr_schedule == "cosine" and not args.full
    start, epochs, steps, last = time.perf_counter(), 0, 0, float("nan")
    deadline = start + budget
    with fast_context():
        for stage_epochs, lr in schedule(args):
            for group in optimizer.param_groups:
                group["lr"] = lr
            done = 0
            while (stage_epochs is None or done < stage_epochs) and (not timed or time.perf_counter() < deadline):
                total, seen = 0.0, 0
                for step, (_, x) in enumerate(batches):
                    if warmup:
                        loss_fn.beta = warmup_scale(epochs + 1, step, len(batches), warmup)
                        if captured is not None:
                            captured.beta = loss_fn.beta
                    if anneal:
                        for group in optimizer.param_groups:
                            group["lr"] = (cosine(lr, time.perf_counter() - start, budget) if timed
                                           else cosine(lr, steps, total_steps))
                    total += train_step(loss_fn, optimizer, x) if captured is None else captured.step(optimizer, x)
                    steps, seen = steps + 1, seen + len(x)
                    if timed and time.perf_counter() >= deadline:
                        break
                epochs, done, last = epochs + 1, done + 1, -total / seen  # the training objective per point seen
    return {"epochs": epochs, "steps": steps, "seconds": time.perf_counter() - start, "last_epoch_train_objective": last,
            "last_lr": optimizer.param_groups[0]["lr"]}


class _AsPyro:
    """A hand-written VAE seen through the model/guide contract, so that the same evaluation scores it."""

    def __init__(self, net: HandWritten):
        self.net = net

    def model(self, x):
        import pyro
        import pyro.distributions as dist

        latent = self.net.decoder[0].in_features
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(latent), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.net.decoder(z)).to_event(1), obs=x)

    def guide(self, x):
        import pyro
        import pyro.distributions as dist

        with pyro.plate("data", x.shape[0]):
            loc, raw = self.net.encoder(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, F.softplus(raw) + 1e-4).to_event(1))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(ROOT.parent.parent / "shared" / "data"), help="folder with the MNIST IDX files")
    p.add_argument("--configs", nargs="+", default=["vae"], choices=list(CONFIGS),
                   help="configurations trained one after the other, each for the same budget")
    p.add_argument("--minutes", type=float, default=15.0, help="training budget per configuration, wall clock")
    p.add_argument("--epochs", type=int, help="train every configuration for this many epochs instead of --minutes (equal epochs)")
    p.add_argument("--full", action="store_true", help="the papers' 3280-epoch schedule instead of a time budget")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate (the first stage's with --full)")
    p.add_argument("--lr-schedule", choices=("none", "cosine"), default="none",
                   help="cosine: the rate annealed to 0 over the time budget (pyrovae train --lr-schedule cosine "
                        "anneals over --epochs)")
    p.add_argument("-k", "--samples", type=int, default=5000, help="importance samples per test point")
    p.add_argument("--test-points", type=int, help="evaluate only the first N test points")
    p.add_argument("--capture", nargs="?", const="auto", choices=[m for m in CAPTURE_MODES if m != "off"],
                   help="capture the step of every configuration trained with the ELBO, its mean-field form or the IWAE bound, "
                        "in this mode (pyrovae train --capture MODE; auto: graph on the CPU)")
    p.add_argument("--activation", choices=list(ACTIVATIONS), default="tanh",
                   help="the networks' activation, for every configuration (the hand-written one included)")
    p.add_argument("--warmup", type=float, help="KL warm-up epochs of the configurations that warm up (default: each one's, 10)")
    p.add_argument("--output-bias", choices=("data", "zero"), default="data",
                   help="the decoder's output bias at the start: the logit of each pixel's training mean (as Burda et al.), "
                        "or PyTorch's default")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="digits, a few seconds, K = 50: checks that the script runs")
    p.add_argument("--out", default=str(ROOT / "results" / "quality.json"))
    args = p.parse_args(argv)
    command = shlex.join(["python", "benchmarks/quality.py", *(sys.argv[1:] if argv is None else argv)])
    torch.set_num_threads(args.threads)
    if args.tiny:
        data, args.minutes, args.samples, args.test_points = load_dataset("digits"), 0.05, 50, 20
    else:
        data = load_dataset("mnist", args.data_dir)
    device = torch.device(args.device)
    x_test = static_binarized(data.test, args.seed + 1)[: args.test_points].to(device)
    budget = ("papers' schedule (3280 epochs)" if args.full else f"{args.epochs} epochs" if args.epochs
              else f"{args.minutes:g} min on {args.threads} CPU threads")
    load_before = os.getloadavg()
    rows = []
    for name in args.configs:
        torch.manual_seed(args.seed)
        model, loss_fn, parameters = build(name, data.dim, args.tiny, args.activation)
        model = model.to(device)
        if args.output_bias == "data":
            initialize(model, data.train.to(device))
        batches = Batches(data.train, args.batch_size, "dynamic", seed=args.seed, device=device)
        training = train(name, model, loss_fn, parameters, batches, args)
        print(f"{name}: trained {training['epochs']} epochs ({training['steps']} steps) in {training['seconds']:.0f} s")
        scored = _AsPyro(model) if name == "handwritten" else model
        start = time.perf_counter()
        result = evaluate(scored.model, scored.guide, x_test, num_samples=args.samples, iwae_ks=(1, 5, 50),
                          compile="auto" if not args.tiny else False, progress=not args.tiny, seed=args.seed)
        seconds = time.perf_counter() - start
        print(result.table())
        with fast_context():
            use = latent_use(scored, x_test[:1000])
        rows.append({"config": name, "paper": PAPERS.get(name), "training": training, "evaluation_seconds": seconds,
                     "summary": result.summary(), "active_units": use.get("active_units"), "latent_dims": use.get("latent_dims")})

    print(f"\n{'test log p(x), nats (K = ' + str(args.samples) + '), ' + budget:<44} {'log p(x)':>16} {'ELBO':>8} {'epochs':>6} "
          f"{'k̂>0.7':>7}  KL per site (active units)")
    for row in rows:
        s = row["summary"]
        sites = ", ".join(f"{site} {kl['value'][0]:.2f} ({(row['active_units'] or {}).get(site, '?')})" for site, kl in s["kl"].items())
        print(f"{row['config']:<44} {s['log_px'][0]:>8.2f} ± {s['log_px'][1]:.2f} {s['elbo'][0]:>8.2f} "
              f"{row['training']['epochs']:>6} {s['khat']['share_above_0.7']:>7.1%}  {sites}")
    for name, value in PUBLISHED:
        print(f"{name:<88} {value:>8.2f}")
    write_json({
        "benchmark": "quality",
        "command": command,
        "protocol": f"dynamically binarized MNIST; 784-200-200-50 {args.activation} networks (two layers: "
                    f"784-(200-200)-100-(100-100)-50); decoder output bias {'at the logit of the training mean' if args.output_bias == 'data' else 'PyTorch default'}; "
                    f"Adam {args.lr:g}{', cosine-annealed to 0 over the budget' if args.lr_schedule == 'cosine' else ''}, "
                    f"batch {args.batch_size}; test set binarized once; "
                    f"log p(x) by importance sampling with K = {args.samples}; active units on the first 1000 test points",
        "budget": budget, "machine": machine(), "load_average": {"before": load_before, "after": os.getloadavg()},
        "settings": vars(args), "results": rows, "published": dict(PUBLISHED),
    }, args.out)


if __name__ == "__main__":
    flush_denormals_in_every_thread()  # as the pyrovae command: long runs age Adam's moments into denormals
    main()
