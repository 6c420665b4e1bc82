"""Posterior collapse is reported, not silent; and the closed-form KL is used only where it is a site's KL term.

A model whose likelihood ignores z trains its guide onto the prior: its KL goes to 0 and ``fit``
says so in one line. A healthy VAE on the digits is not reported. On the two-layer model with its
bottom-up guide, p(z2 | z1) depends on z1, which the guide draws from z2: the closed form
KL(q(z2|x) ‖ p(z2|z1)) at fixed z1 is not the expectation of that site's term, so neither the
evaluation nor the mean-field objective may use it there.
"""

import logging
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from pyrovae import kl, nn as pnn
from pyrovae.data import Batches, load_dataset
from pyrovae.evaluate import evaluate
from pyrovae.evidence import log_weights
from pyrovae.models import VAEConfig, build_vae, two_layer
from pyrovae.objectives import loss
from pyrovae.traces import particle_traces
from pyrovae.train import COLLAPSE_EPOCHS, CollapseWatch, TrainConfig, fit

pytestmark = pytest.mark.usefixtures("one_thread")


class IgnoresZ(nn.Module):
    """z ~ N(0, I); x ~ Bernoulli(logits = b): the likelihood does not read z, so KL(q ‖ p) → 0 is optimal."""

    def __init__(self, p: int, d: int = 4):
        super().__init__()
        self.d = d
        self.bias = nn.Parameter(torch.zeros(p))
        self.encoder = nn.Linear(p, 2 * d)

    def model(self, x):
        pnn.register(self)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], self.d), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.bias.expand(x.shape)).to_event(1), obs=x)

    def guide(self, x):
        pnn.register(self)
        loc, raw = self.encoder(x).chunk(2, -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw) + 1e-3).to_event(1))


@pytest.fixture(scope="module")
def digits():
    data = load_dataset("digits", seed=0)
    g = torch.Generator().manual_seed(0)
    return torch.bernoulli(data.train, generator=g), torch.bernoulli(data.test, generator=g)


def train(module, digits, epochs: int, caplog, lr: float = 1e-2, objective: str = "elbo"):
    train_x, test_x = digits
    batches = Batches(train_x, 64, "none", seed=0)
    with caplog.at_level(logging.WARNING, logger="pyrovae.train"):
        history = fit(module, batches, TrainConfig(epochs=epochs, lr=lr, objective=objective), test_x, progress=False)
    lines = [r.getMessage() for r in caplog.records if "posterior collapse" in r.getMessage()]
    return history, lines


def test_a_model_that_ignores_z_is_reported_as_collapsed(digits, caplog):
    torch.manual_seed(0)
    # the closed-form KL's exact gradient takes the guide to the prior; a sampled KL's noise keeps it ~0.1 nats away
    history, lines = train(IgnoresZ(digits[0].shape[1]), digits, COLLAPSE_EPOCHS + 5, caplog, 3e-2, "mean-field")
    assert history[-1]["kl"]["z"] < 0.01 and history[-1]["active_units"] == {"z": 0}
    assert len(lines) == 1 and lines[0].startswith("latent site 'z' is inactive (KL ")  # said once, not every epoch


def test_a_healthy_vae_is_not_reported_and_records_kl_and_active_units(digits, caplog):
    torch.manual_seed(0)
    vae = build_vae(VAEConfig(data_dim=digits[0].shape[1], latent_dim=4, hidden=(32,)))
    history, lines = train(vae, digits, COLLAPSE_EPOCHS + 1, caplog)
    assert lines == []
    last = history[-1]
    assert last["kl"]["z"] > 1.0 and last["active_units"]["z"] >= 1 and last["latent_dims"] == {"z": 4}


@pytest.mark.parametrize("values, epochs, expected", [
    ([0.001] * 5, 5, ["z"]),
    ([0.001] * 4 + [0.5], 5, []),  # recovered before the fifth epoch
    ([0.001, 0.5] * 4, 2, []),  # never two epochs in a row
])
def test_collapse_needs_epochs_in_a_row_below_the_threshold(values, epochs, expected):
    watch = CollapseWatch(epochs=epochs)
    found = [site for epoch, v in enumerate(values, 1) for site in watch.update(epoch, {"z": v})]
    assert found == expected


def small_two_layer():
    return two_layer(data_dim=16, top_dim=2, bottom_dim=3, hidden=[8], top_hidden=[8])


def test_the_closed_form_kl_is_not_applied_where_the_prior_depends_on_a_latent_drawn_later(float64):
    """Bottom-up guide: q(z2|x) q(z1|z2) against p(z1) p(z2|z1). At z2 the closed form is not the term."""
    torch.manual_seed(0)
    model = small_two_layer().double()
    x = torch.bernoulli(torch.full((64, 16), 0.3, dtype=torch.float64))
    terms = log_weights(model.model, model.guide, x, 2000)
    assert terms.kl_method["z1"] == "analytic"
    assert terms.kl_method["z2"].startswith("not applicable") and terms.kl_analytic["z2"] is None
    # where it is applied, it is the expectation of the site's term: the analytic and Monte Carlo agree
    mc = (terms.log_q["z1"] - terms.log_prior["z1"])
    diff = terms.kl_analytic["z1"].mean(0) - mc.mean(0)
    z = diff / (mc.std(0) / math.sqrt(mc.shape[0]))
    assert z.abs().max() < 4.5


def test_the_closed_form_at_z2_would_be_a_different_number(float64):
    """Why the rule exists: on the same draws, E[KL(q(z2|x) ‖ p(z2|z1))] differs from the term's mean by many s.e."""
    torch.manual_seed(0)
    model = small_two_layer().double()
    with torch.no_grad():  # make p(z2 | z1) depend strongly on z1
        for p in model.parameters():
            p.mul_(3.0)
    x = torch.bernoulli(torch.full((64, 16), 0.3, dtype=torch.float64))
    guide_trace, model_trace = particle_traces(model.model, model.guide, x, 4000)
    closed = kl.closed_form(guide_trace.nodes["z2"]["fn"], model_trace.nodes["z2"]["fn"])  # (K, N)
    term = guide_trace.nodes["z2"]["fn"].log_prob(guide_trace.nodes["z2"]["value"]) - model_trace.nodes["z2"]["fn"].log_prob(model_trace.nodes["z2"]["value"])
    diff = (closed - term).mean(0)
    stderr = (closed - term).std(0) / math.sqrt(closed.shape[0])
    assert (diff / stderr).abs().max() > 10
    assert kl.drawn_after("z2", model_trace, guide_trace) == ["z1"]


def test_mean_field_keeps_the_monte_carlo_term_where_the_closed_form_does_not_apply(float64, caplog):
    """On the two-layer model, mean-field = the Monte Carlo term at z2 and the closed form at z1, on the same draws."""
    model = small_two_layer().double()
    x = torch.bernoulli(torch.full((8, 16), 0.3, dtype=torch.float64))
    with caplog.at_level(logging.WARNING, logger="pyrovae.objectives"):
        pyro.set_rng_seed(3)
        value = loss("mean-field", model.model, model.guide)(x)
    assert any("'z2'" in r.getMessage() and "Monte Carlo" in r.getMessage() for r in caplog.records)
    pyro.set_rng_seed(3)  # the same draws as the objective's one particle
    terms = log_weights(model.model, model.guide, x, 1)
    # independent reference on the same draws: E log p(x|z) + (log p − log q) at z2 − KL closed form at z1
    expected = (terms.log_likelihood["x"] + terms.log_prior["z2"] - terms.log_q["z2"] - terms.kl_analytic["z1"]).sum()
    torch.testing.assert_close(-value.detach(), expected, rtol=1e-10, atol=1e-10)


def test_the_evaluation_says_why_the_closed_form_is_not_shown():
    """``evaluate``'s table and summary: z1 analytic, z2 "not applicable" with the reason, not "no closed form"."""
    torch.manual_seed(0)
    model = small_two_layer()
    x = torch.bernoulli(torch.full((6, 16), 0.3))
    result = evaluate(model.model, model.guide, x, num_samples=20, iwae_ks=(5,), particles_elbo=10, progress=False)
    kl_summary = result.summary()["kl"]
    assert kl_summary["z1"]["analytic"] is not None and kl_summary["z1"]["why_not_analytic"] is None
    assert kl_summary["z2"]["analytic"] is None
    assert kl_summary["z2"]["why_not_analytic"] == "not applicable: p(z2 | ·) may depend on z1, which the guide draws after z2"
    table = result.table()
    assert "KL(q‖p) at z2, analytic: not applicable" in table and "no closed form" not in table
    assert "KL at z2, analytic not applicable: p(z2 | ·) may depend on z1, which the guide draws after z2" in table
