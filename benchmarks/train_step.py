"""Training step: pyrovae vs a hand-written PyTorch VAE vs naive Pyro, side by side in one run.

(a) torch:      hand-written reparameterized ELBO with analytic KL, one torch.optim.Adam;
(a') the same with torch's fused Adam, the optimizer pyrovae uses, to show the cost of Pyro itself;
(b) naive pyro: SVI(model, guide, pyro.optim.Adam, Trace_ELBO()) as in Pyro's VAE example;
(c) pyrovae:    the eager step (``--capture off``): Pyro's Trace_ELBO loss, one fused torch Adam;
(d) pyrovae captured: the step ``pyrovae train`` and ``pyrovae.train.fit`` take by default
    (``capture="auto"``): the same loss and optimizer, the step traced once per batch shape,
    checked against the eager step on its first batch and replayed (``pyrovae.capture.CapturedStep``
    with ``check=True``, the device's mode: the graph op by op on the CPU, a CUDA graph on CUDA);
``--capture-modes`` times other capture modes too (``pyrovae_captured_<mode>``, unchecked).

All train the same architecture on the same minibatches of binarized MNIST (or random binary data
with --synthetic). After a warm-up, the methods take turns in rounds, each a block of --steps steps,
in an order that rotates, so that the load of a shared machine falls on all alike; each time is the
median over all timed steps, and "vs fused" the median over rounds of each round's ratio to (a').
The first step of a captured method traces the graph (and compiles it, for inductor): it is reported apart.
Usage: python benchmarks/train_step.py [--tiny] [--device cpu|cuda] [--capture-modes graph,inductor] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import pyro
import torch
import torch.nn.functional as F
from pyro.infer import SVI, Trace_ELBO
from torch import nn

from common import machine, write_json
from pyrovae.capture import CapturedStep
from pyrovae.models import VAEConfig, build_vae
from pyrovae.params import trainable
from pyrovae.train import elbo_loss, fast_context, make_optimizer, train_step

ROOT = Path(__file__).resolve().parent


class TorchVAE(nn.Module):
    """The same networks as pyrovae's VAE, written by hand."""

    def __init__(self, vae):
        super().__init__()
        self.encoder = nn.Sequential(*[_plain(m) for m in vae.encoder.net])
        self.decoder = nn.Sequential(*[_plain(m) for m in vae.decoder])

    def loss(self, x):
        """−ELBO summed over the batch: BCE reconstruction + analytic KL(N(μ, σ²) ‖ N(0, I))."""
        loc, raw = self.encoder(x).chunk(2, -1)
        scale = F.softplus(raw) + 1e-4
        z = loc + scale * torch.randn_like(loc)
        recon = F.binary_cross_entropy_with_logits(self.decoder(z), x, reduction="sum")
        kl = 0.5 * (scale**2 + loc**2 - 1).sum() - scale.log().sum()
        return recon + kl


def _plain(module):
    if isinstance(module, nn.Linear):
        linear = nn.Linear(module.in_features, module.out_features)
        linear.load_state_dict(module.state_dict())
        return linear
    return type(module)()


def make_methods(config: VAEConfig, lr: float, device: str, sample: torch.Tensor, capture_modes: list[str]):
    torch.manual_seed(0)
    ours = build_vae(config).to(device)
    naive = build_vae(config).to(device)
    naive.load_state_dict(ours.state_dict())
    hand = TorchVAE(ours).to(device)
    hand_fused = TorchVAE(ours).to(device)

    def torch_step(module, optimizer):
        def step(x):
            optimizer.zero_grad(set_to_none=True)
            loss = module.loss(x)
            loss.backward()
            optimizer.step()
            return loss.item()

        return step

    svi = SVI(naive.model, naive.guide, pyro.optim.Adam({"lr": lr}), Trace_ELBO())
    opt_ours = make_optimizer(ours.parameters(), lr)
    loss_ours = elbo_loss(ours.model, ours.guide)

    def step_eager(x):
        with fast_context():
            return train_step(loss_ours, opt_ours, x)

    def step_captured(mode, check=False):
        model = build_vae(config).to(device)
        model.load_state_dict(ours.state_dict())
        params = trainable(model.model, model.guide, sample)  # what fit trains: the same set as SVI
        optimizer = make_optimizer(params.values(), lr)
        captured = CapturedStep(model.model, model.guide, params, mode=mode, check=check)

        def step(x):
            with fast_context():
                return captured.step(optimizer, x)

        return step

    methods = {
        "torch": torch_step(hand, torch.optim.Adam(hand.parameters(), lr=lr)),
        "torch_fused_adam": torch_step(hand_fused, torch.optim.Adam(hand_fused.parameters(), lr=lr, fused=True)),
        "naive_pyro": svi.step,
        "pyrovae": step_eager,
        "pyrovae_captured": step_captured(None, check=True),  # fit's default, capture="auto"
    }
    for mode in capture_modes:
        methods[f"pyrovae_captured_{mode}"] = step_captured(mode)
    return methods


def batches(args, batch_size: int):
    if args.synthetic:
        g = torch.Generator().manual_seed(0)
        data = torch.rand(20 * batch_size, 784, generator=g)
    else:
        from pyrovae.data import load_dataset

        data = load_dataset("mnist", args.data_dir).train
    g = torch.Generator().manual_seed(1)
    while True:
        idx = torch.randint(len(data), (batch_size,), generator=g)
        yield torch.bernoulli(data[idx], generator=g).to(args.device)


def bench(args, hidden, batch_size) -> dict:
    config = VAEConfig(784, latent_dim=50, hidden=hidden, activation="relu" if len(hidden) == 1 else "tanh")
    data = batches(args, batch_size)
    methods = make_methods(config, 1e-3, args.device, next(data)[:8], args.capture_modes)
    names = list(methods)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    def timed(step) -> float:
        x = next(data)
        sync()
        start = time.perf_counter()
        step(x)
        sync()
        return time.perf_counter() - start

    first = {name: timed(step) for name, step in methods.items()}  # the captured steps trace here
    for name, step in methods.items():
        for _ in range(args.warmup - 1):
            timed(step)
    times = {name: [] for name in names}
    per_round = []
    for round_ in range(args.rounds):  # each method a block of steps, in an order that rotates
        medians = {}
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:
            block = [timed(methods[name]) for _ in range(args.steps)]
            times[name] += block
            medians[name] = statistics.median(block)
        per_round.append(medians)
    ms = {name: 1000 * statistics.median(times[name]) for name in names}
    return {
        "net": f"784-{'-'.join(map(str, hidden))}-50",
        "batch_size": batch_size,
        "ms_per_step": ms,
        "ratio_to_torch": {name: ms[name] / ms["torch"] for name in ms},
        # the steadier comparison on a busy machine: per round, block median / (a')'s block median; median over rounds
        "round_ratio_to_fused": {name: statistics.median(r[name] / r["torch_fused_adam"] for r in per_round) for name in names},
        "steps_per_method": len(times["torch"]),
        "first_step_s": first,  # includes tracing (and compiling) for the captured steps
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(ROOT.parent.parent / "shared" / "data"), help="folder with the MNIST IDX files")
    p.add_argument("--synthetic", action="store_true", help="random data instead of MNIST")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=25)
    p.add_argument("--steps", type=int, default=20, help="timed steps per method per round")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--tiny", action="store_true", help="a few steps on synthetic data, to check that the script runs")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--capture-modes", default="", type=lambda s: [m for m in s.split(",") if m],
                   help="captured modes to time besides the device's default, comma-separated: graph, inductor, cuda-graph, eager")
    p.add_argument("--out", default=str(ROOT / "results" / "train_step.json"))
    args = p.parse_args(argv)
    if args.tiny:
        args.synthetic, args.rounds, args.steps, args.warmup = True, 1, 3, 1
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available here")
    torch.set_num_threads(args.threads)
    settings = [((400,), 128), ((400,), 256), ((200, 200), 128), ((200, 200), 256)]
    rows = []
    for hidden, b in settings[:1] if args.tiny else settings:
        rows.append(bench(args, hidden, b))
        print(f"measured {rows[-1]['net']} batch {b}: {rows[-1]['ms_per_step']}", flush=True)
    names = [n for n in rows[0]["ms_per_step"] if n not in ("torch", "torch_fused_adam")]
    print(f"ms per step on {args.device} (ratio to hand-written torch with default Adam); last columns: each Pyro method / torch "
          "with fused Adam, median over rounds of the per-round ratio")
    print(f"{'net':<16} {'batch':>5} {'torch':>7} {'torch fused':>17} " + " ".join(f"{n:>17}" for n in names) + " " + " ".join(f"{'vs fused':>9}" for n in names))
    for r in rows:
        ms, ratio = r["ms_per_step"], r["ratio_to_torch"]
        cells = " ".join(f"{ms[m]:>8.2f} ({ratio[m]:.2f}×)" for m in ("torch_fused_adam", *names))
        versus = " ".join(f"{r['round_ratio_to_fused'][m]:>8.2f}×" for m in names)
        print(f"{r['net']:<16} {r['batch_size']:>5} {ms['torch']:>7.2f} {cells} {versus}")
    write_json({"benchmark": "train_step", "device": args.device, "machine": machine(),
                "command": "python benchmarks/train_step.py " + " ".join(sys.argv[1:] if argv is None else argv),
                "settings": vars(args), "results": rows}, args.out)


if __name__ == "__main__":
    main()
