"""Factories whose models or guides break the model/guide contract, one rule each."""

import pyro
import pyro.distributions as dist
import torch


class Pair:
    def __init__(self, model, guide):
        self.model, self.guide = model, guide


def normal(x, d=2):
    return dist.Normal(x.new_zeros(x.shape[0], d), 1.0).to_event(1)


def observe(x):
    pyro.sample("x", dist.Bernoulli(probs=x.new_full(x.shape, 0.5)).to_event(1), obs=x)


def ok_guide(x):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", normal(x))


def plate_at_dim_2(data_dim, image_shape=None):
    def model(x):
        with pyro.plate("data", x.shape[0], dim=-2):  # data points at dim -2, not -1
            pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 1, 2), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(probs=x.new_full(x.shape, 0.5)[:, None]).to_event(1), obs=x[:, None])

    def guide(x):
        with pyro.plate("data", x.shape[0], dim=-2):
            pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], 1, 2), 1.0).to_event(1))

    return Pair(model, guide)


def missing_to_event(data_dim, image_shape=None):
    def model(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", normal(x))
            pyro.sample("x", dist.Bernoulli(probs=x.new_full(x.shape, 0.5)), obs=x)  # batch (N, P)

    return Pair(model, ok_guide)


def guide_misses_a_latent(data_dim, image_shape=None):
    def model(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", normal(x))
            pyro.sample("w", normal(x))
            observe(x)

    return Pair(model, ok_guide)


def no_observed_site(data_dim, image_shape=None):
    def model(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", normal(x))

    return Pair(model, ok_guide)


def guide_site_not_in_model(data_dim, image_shape=None):
    def model(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", normal(x))
            observe(x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", normal(x))
            pyro.sample("extra", normal(x))

    return Pair(model, guide)


def global_latent(data_dim, image_shape=None):
    def model(x):
        pyro.sample("scale", dist.LogNormal(x.new_zeros(()), 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", normal(x))
            observe(x)

    def guide(x):
        pyro.sample("scale", dist.LogNormal(x.new_zeros(()), 1.0))
        ok_guide(x)

    return Pair(model, guide)


def factory_raises(data_dim, image_shape=None):
    raise ValueError("latent_dim must be even")


def no_model(data_dim, image_shape=None):
    return torch.nn.Linear(2, 2)
