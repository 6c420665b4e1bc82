"""``pyrovae list``: the built-in priors, likelihoods, guides, networks and models, one line each,
with each component's options (``--prior-arg``, ``--guide-arg``, ``--likelihood-arg``) and each
model factory's arguments (``--model-arg``), with their defaults."""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser("list", help="list the built-in components", description=__doc__)
    p.set_defaults(run=run)


def run(args) -> int:
    from pyrovae import factory, models
    from pyrovae.guides import GUIDES
    from pyrovae.models import LIKELIHOODS, MODELS, PRIORS

    for title, registry, flag in (("priors (--prior)", PRIORS, "--prior-arg"), ("likelihoods (--likelihood)", LIKELIHOODS, "--likelihood-arg"),
                                  ("guides (--guide)", GUIDES, "--guide-arg"), ("models (--model pyrovae.models:NAME)", MODELS, None)):
        print(title)
        entries = registry.describe()
        width = max(len(name) for name, _ in entries)
        for name, sentence in entries:
            print(f"  {name:<{width}}  {sentence}")
            options = registry.options(name) if flag else factory.defaults(getattr(models, name))
            if options:
                listed = ", ".join(f"{key}={json.dumps(value)}" for key, value in options.items())
                print(f"  {'':<{width}}  {flag or '--model-arg'}: {listed}")
    print("networks (--network)")
    for name, sentence in NETWORKS:
        print(f"  {name:<4}  {sentence}")
    return 0


NETWORKS = [("mlp", "multilayer perceptrons, the decoder's hidden sizes from --hidden, the encoder mirroring them"),
            ("conv", "a convolutional encoder and decoder for 28 × 28 single-channel images")]
