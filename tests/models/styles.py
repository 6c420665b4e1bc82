"""The ways a Pyro user writes a VAE, each a factory ``NAME(data_dim, image_shape=None, ...)``.

Used by the tests to train, resume, picture and evaluate each through the command line.
"""

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions import constraints
from pyro.nn import PyroModule, PyroParam
from torch import nn


def net(n_in, n_out, hidden=16):
    return nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, n_out))


class Tutorial(nn.Module):
    """Pyro's tutorial style: ``pyro.module`` under fixed names, Bernoulli pixels."""

    def __init__(self, data_dim, latent_dim=2):
        super().__init__()
        self.latent_dim = latent_dim
        self.decoder, self.encoder = net(latent_dim, data_dim), net(data_dim, 2 * latent_dim)

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.latent_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            loc, raw = self.encoder(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, F.softplus(raw) + 1e-3).to_event(1))


def tutorial(data_dim, image_shape=None, latent_dim=2):
    return Tutorial(data_dim, latent_dim)


class PyroStyle(PyroModule):
    """``PyroModule`` networks and a constrained ``PyroParam`` (the likelihood's temperature)."""

    def __init__(self, data_dim, latent_dim=2):
        super().__init__()
        self.latent_dim = latent_dim
        self.decoder = PyroModule[nn.Sequential](PyroModule[nn.Linear](latent_dim, 16), PyroModule[nn.Tanh](), PyroModule[nn.Linear](16, data_dim))
        self.encoder = PyroModule[nn.Sequential](PyroModule[nn.Linear](data_dim, 16), PyroModule[nn.Tanh](), PyroModule[nn.Linear](16, 2 * latent_dim))
        self.temperature = PyroParam(torch.tensor(1.0), constraint=constraints.positive)

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.latent_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z) / self.temperature).to_event(1), obs=x)

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            loc, raw = self.encoder(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, F.softplus(raw) + 1e-3).to_event(1))


def pyro_module(data_dim, image_shape=None, latent_dim=2):
    return PyroStyle(data_dim, latent_dim)


class BareParam(Tutorial):
    """Tutorial style, plus a bare ``pyro.param``: a learned positive scale of a Gaussian likelihood."""

    def model(self, x):
        pyro.module("decoder", self.decoder)
        scale = pyro.param("obs_scale", lambda: torch.ones((), device=x.device), constraint=constraints.positive)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.latent_dim), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.decoder(z), scale).to_event(1), obs=x)


def bare_param(data_dim, image_shape=None, latent_dim=2):
    return BareParam(data_dim, latent_dim)


class Hierarchical(nn.Module):
    """Two latent sites: z1 ~ N(0, I), z2 | z1 ~ N(f(z1), I), x | z2 ~ Bernoulli(g(z2)).

    With ``reversed_guide`` the guide samples z2 first, then z1 given z2 (the model's order reversed).
    """

    def __init__(self, data_dim, top=2, bottom=3, reversed_guide=False):
        super().__init__()
        self.top, self.bottom, self.reversed_guide = top, bottom, reversed_guide
        self.f, self.g = net(top, bottom), net(bottom, data_dim)
        self.q2 = net(data_dim, 2 * bottom)
        self.q1 = net(bottom if reversed_guide else data_dim, 2 * top)
        self.q2_given_1 = net(data_dim + top, 2 * bottom)

    def model(self, x):
        pyro.module("hierarchical", self)
        with pyro.plate("data", x.shape[0]):
            z1 = pyro.sample("z1", dist.Normal(x.new_zeros(self.top), 1.0).to_event(1))
            z2 = pyro.sample("z2", dist.Normal(self.f(z1), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.g(z2)).to_event(1), obs=x)

    @staticmethod
    def normal(params):
        loc, raw = params.chunk(2, -1)
        return dist.Normal(loc, F.softplus(raw) + 1e-3).to_event(1)

    def guide(self, x):
        pyro.module("hierarchical", self)
        with pyro.plate("data", x.shape[0]):
            if self.reversed_guide:
                z2 = pyro.sample("z2", self.normal(self.q2(x)))
                pyro.sample("z1", self.normal(self.q1(z2)))
            else:
                z1 = pyro.sample("z1", self.normal(self.q1(x)))
                xb = x.expand(z1.shape[:-1] + x.shape[-1:])
                pyro.sample("z2", self.normal(self.q2_given_1(torch.cat([xb, z1], -1))))


def hierarchical(data_dim, image_shape=None):
    return Hierarchical(data_dim)


def reversed_guide(data_dim, image_shape=None):
    return Hierarchical(data_dim, reversed_guide=True)


class PlainChild(PyroStyle):
    """A ``PyroModule`` with a plain ``nn.Linear`` child: ``SVI`` leaves that child untrained, and so must we."""

    def __init__(self, data_dim, latent_dim=2):
        super().__init__(data_dim, latent_dim)
        self.plain = nn.Linear(data_dim, data_dim)

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.latent_dim), 1.0).to_event(1))
            logits = self.decoder(z) / self.temperature + self.plain(x.new_zeros(x.shape[-1]))
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)


def plain_child(data_dim, image_shape=None, latent_dim=2):
    return PlainChild(data_dim, latent_dim)


class Flaky(Tutorial):
    """Tutorial style whose likelihood turns nan on every ``every``-th training step (a call with
    gradients on a batch of more than 8 points)."""

    def __init__(self, data_dim, latent_dim=2, every=4):
        super().__init__(data_dim, latent_dim)
        self.every, self.calls = every, 0

    def model(self, x):
        training = x.shape[0] > 8 and torch.is_grad_enabled()
        self.calls += training
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.latent_dim), 1.0).to_event(1))
            logits = self.decoder(z)
            if training and self.calls % self.every == 0:
                logits = logits * float("nan")
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)


def flaky(data_dim, image_shape=None, every=4):
    return Flaky(data_dim, every=every)


class Alternating(nn.Module):
    """A model whose Python takes one of two branches, the sign of the decoder's logits, as
    :meth:`flipped` says: here a counter that changes on every call, which ``make_fx`` cannot see (the
    graph bakes in the branch of the call it traced). A subclass that branches on a tensor's value
    instead is one ``make_fx`` refuses to trace."""

    def __init__(self, p=64, d=2):
        super().__init__()
        self.d, self.calls = d, 0
        self.decoder, self.encoder = nn.Linear(d, p), nn.Linear(p, 2 * d)

    def flipped(self, x, z) -> bool:
        self.calls += 1
        return self.calls % 2 == 0

    def model(self, x):
        pyro.module("alt_decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.d), 1.0).to_event(1))
            logits = -self.decoder(z) if self.flipped(x, z) else self.decoder(z)
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("alt_encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            loc, raw = self.encoder(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw) + 1e-3).to_event(1))
