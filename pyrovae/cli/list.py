"""``pyrovae list``: the built-in priors, likelihoods, guides, networks and models, one line each."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("list", help="list the built-in components", description=__doc__)
    p.set_defaults(run=run)


def run(args) -> int:
    from pyrovae.guides import GUIDES
    from pyrovae.models import LIKELIHOODS, MODELS, PRIORS

    for title, registry in (("priors (--prior)", PRIORS), ("likelihoods (--likelihood)", LIKELIHOODS),
                            ("guides (--guide)", GUIDES), ("models (--model pyrovae.models:NAME)", MODELS)):
        print(title)
        entries = registry.describe()
        width = max(len(name) for name, _ in entries)
        for name, sentence in entries:
            print(f"  {name:<{width}}  {sentence}")
    print("networks (--network)")
    for name, sentence in NETWORKS:
        print(f"  {name:<4}  {sentence}")
    return 0


NETWORKS = [("mlp", "multilayer perceptrons, the decoder's hidden sizes from --hidden, the encoder mirroring them"),
            ("conv", "a convolutional encoder and decoder for 28 × 28 single-channel images")]
