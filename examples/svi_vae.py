"""A VAE on the 8×8 digits, trained with Pyro's SVI and Trace_ELBO, then evaluated.

    python examples/svi_vae.py --epochs 50
"""

import argparse

import pyro
from pyro.infer import SVI, Trace_ELBO

from pyrovae.data import Batches, load_dataset, static_binarized
from pyrovae.evaluate import evaluate
from pyrovae.models import VAEConfig, build_vae

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=50)
args = parser.parse_args()

pyro.set_rng_seed(0)
data = load_dataset("digits")
vae = build_vae(VAEConfig(data.dim, latent_dim=16, hidden=(256,)))
svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
batches = Batches(data.train, 128, "dynamic", seed=0)

for epoch in range(args.epochs):
    loss = sum(svi.step(x) for _, x in batches)
    print(f"epoch {epoch + 1}: train ELBO {-loss / len(data.train):.2f} nats per digit")

x_test = static_binarized(data.test, seed=1)  # the held-out digits, binarized once
print(evaluate(vae.model, vae.guide, x_test, num_samples=1000).table())
