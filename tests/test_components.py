"""The components earn their keep: the VampPrior, the two-layer model and the IAF guide.

What made each fail, proved by a broken variant that the same check catches:

- the plateau where the decoder ignores z: with its output bias at 0 a Bernoulli decoder's first
  steps saturate tanh units to draw the mean image; the VampPrior, whose KL is 0 for *any* encoder
  that ignores its input, then collapses for good. ``initialize`` (the output bias at the data's
  logit mean) keeps it off; the digits show both;
- the VampPrior's gradient reaches the pseudo-inputs and the shared encoder through the prior;
- the two-layer model's top layer is wired (q(z1|z2) reads the sampled z2, p(z2|z1) reads z1, and
  both get gradient), and a short training keeps both sites active; a model whose p(z2|z1) ignores
  z1 collapses its top layer and fails the same check;
- the IAF guide starts at its diagonal base (each step the identity), unlike the gated steps of the
  paper's eq. 14 with the +2 bias, which start as a contraction with a random shift.

And the components' own options reach them from the command line, are recorded, listed and
checked; and the quality benchmark builds every configuration with the networks it names.
"""

import copy
import importlib
import json
import math
import sys
from pathlib import Path

import pyro
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine

from pyrovae import factory
from pyrovae.cli.main import main
from pyrovae.data import Batches, load_dataset
from pyrovae.guides import IAFEncoder
from pyrovae.models import TwoLayerVAE, VampPrior, vae
from pyrovae.nn import ACTIVATIONS
from pyrovae.objectives import elbo_loss
from pyrovae.run import Run
from pyrovae.train import COLLAPSE_KL, TrainConfig, fit

pytestmark = pytest.mark.usefixtures("one_thread")

P, D, N = 64, 4, 5
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TopLayerIgnored = factory.load(f"{Path(__file__).parent / 'models' / 'wrong.py'}:TopLayerIgnored")


def normal_log_density(value, loc, scale) -> torch.Tensor:
    """Σ over the last dim of log N(value; loc, scale²), written out."""
    return (-0.5 * ((value - loc) / scale) ** 2 - torch.log(scale) - 0.5 * math.log(2 * math.pi)).sum(-1)


def output_layer(decoder: torch.nn.Module) -> torch.nn.Linear:
    return [m for m in decoder.modules() if isinstance(m, torch.nn.Linear)][-1]


@pytest.fixture(scope="module")
def digits():
    """(train, test) of the 8 × 8 digits, grey levels (train: binarized afresh each batch)."""
    data = load_dataset("digits", seed=0)
    return data.train, torch.bernoulli(data.test, generator=torch.Generator().manual_seed(1))


def train(module, digits, epochs: int, lr: float = 3e-3, warmup_epochs: float = 0) -> dict:
    """``fit`` on the digits, batches of 100 binarized afresh; the last epoch's metrics (KL per site, active units)."""
    train_x, test_x = digits
    torch.manual_seed(0)
    batches = Batches(train_x, 100, "dynamic", seed=0)
    return fit(module, batches, TrainConfig(epochs=epochs, lr=lr, warmup_epochs=warmup_epochs), test_x, progress=False)[-1]


# ---------------------------------------------------------------- the plateau and the output bias


class NotInitialized:
    """Broken: ``initialize`` does nothing (the output bias stays at PyTorch's default)."""

    def initialize(self, x):
        pass


class VAENotInitialized(NotInitialized, type(vae(P))):
    pass


class TwoLayerNotInitialized(NotInitialized, TwoLayerVAE):
    pass


def build_vae(broken: bool):
    module = vae(P, latent_dim=D, hidden=(16,))
    if broken:
        module.__class__ = VAENotInitialized
    return module


def build_two_layer(broken: bool):
    return (TwoLayerNotInitialized if broken else TwoLayerVAE)(P, top_dim=2, bottom_dim=3, hidden=(16,), top_hidden=(8,))


@pytest.mark.parametrize("build", [build_vae, build_two_layer], ids=["vae", "two-layer"])
@pytest.mark.parametrize("broken", [False, True], ids=["initialized", "broken-not-initialized"])
def test_initialize_puts_the_output_bias_at_each_pixels_logit_mean(digits, build, broken):
    """After ``initialize(x)`` the decoder's output bias is logit(mean of each pixel over x), the
    mean clipped to [0.001, 0.999]: what a decoder ignoring z fits, so the first steps' gradient at
    the output has no part common to every image."""
    x = digits[0]
    module = build(broken)
    module.initialize(x)
    mean = x.mean(0).clamp(1e-3, 1 - 1e-3)
    expected = torch.log(mean) - torch.log1p(-mean)
    assert torch.allclose(output_layer(module.decoder).bias, expected, atol=1e-5) != broken


VAMP_RUNS = {  # name → (activation, initialized, collapses)
    "elu-initialized": ("elu", True, False),
    "tanh-initialized": ("tanh", True, False),
    "broken-tanh-output-bias-at-zero": ("tanh", False, True),
}


@pytest.mark.parametrize("name", list(VAMP_RUNS))
def test_the_vampprior_does_not_collapse_after_a_short_training(digits, name):
    """After 15 epochs on the digits the VampPrior's KL is well above the collapse threshold, some
    units are active and the pseudo-inputs have moved. With tanh units and the output bias at 0 (the
    broken variant: no ``initialize``) the same training sits on the mean image's plateau: KL ≈ 0."""
    activation, initialized, collapses = VAMP_RUNS[name]
    torch.manual_seed(0)
    module = vae(P, latent_dim=8, hidden=(64, 64), activation=activation, prior="vamp", prior_args={"components": 50})
    if initialized:
        module.initialize(digits[0])
    before = module.prior.pseudo_inputs().detach().clone()
    last = train(module, digits, epochs=15)
    moved = (module.prior.pseudo_inputs().detach() - before).abs().max().item()
    healthy = last["kl"]["z"] > 50 * COLLAPSE_KL and last["active_units"]["z"] >= 1 and moved > 0.01
    assert healthy != collapses, last


class PseudoInputsDetached(VampPrior):
    """Broken: the prior's components from detached pseudo-inputs."""

    def components(self):
        loc, scale = self.encoder.loc_scale(self.pseudo_inputs().detach())
        return pyro.distributions.Normal(loc, scale).to_event(1)


class EncoderDetached(VampPrior):
    """Broken: the prior's components from a frozen copy of the encoder."""

    def components(self):
        frozen = copy.deepcopy(self.encoder).requires_grad_(False)
        loc, scale = frozen.loc_scale(self.pseudo_inputs())
        return pyro.distributions.Normal(loc, scale).to_event(1)


@pytest.mark.parametrize("prior_class, right", [(VampPrior, True), (PseudoInputsDetached, False), (EncoderDetached, False)],
                         ids=["vamp", "broken-pseudo-inputs-detached", "broken-encoder-detached"])
def test_the_vampprior_gradient_reaches_the_pseudo_inputs_and_the_encoder(float64, prior_class, right):
    """∂ log p(z) / ∂(pseudo-inputs, encoder) equals the gradient of the mixture written out,
    log p(z) = logsumexp_k log N(z; μ(u_k), diag σ(u_k)²) − log K with u = hardtanh(W) to [0, 1]."""
    module = vae(P, latent_dim=D, hidden=(16,), prior="vamp", prior_args={"components": 6})
    prior = module.prior
    prior.__class__ = prior_class
    weight = prior.pseudo_inputs.weight
    with torch.no_grad():
        weight.copy_(torch.rand(weight.shape, generator=torch.Generator().manual_seed(1)) * 1.4 - 0.2)  # some clipped
    z = torch.randn(3, N, D, generator=torch.Generator().manual_seed(2))
    wrt = [weight, *module.encoder.parameters()]
    got = torch.autograd.grad(prior.distribution().log_prob(z).sum(), wrt, allow_unused=True)
    loc, scale = module.encoder.loc_scale(weight.clamp(0, 1))  # (K, D)
    by_hand = torch.logsumexp(normal_log_density(z[..., None, :], loc, scale), -1) - math.log(6)
    expected = torch.autograd.grad(by_hand.sum(), wrt)
    same = all(g is not None and torch.allclose(g, e, rtol=1e-8, atol=1e-10) for g, e in zip(got, expected))
    assert same == right
    clipped = (weight < 0) | (weight > 1)
    assert clipped.any() and (expected[0][clipped] == 0).all() and (expected[0][~clipped] != 0).all()  # the paper's hard-tanh


# ---------------------------------------------------------------- the two-layer model


class TopReadsTheMean(TwoLayerVAE):
    """Broken: q(z1 | ·) reads the mean of q(z2 | x), not the z2 drawn."""

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            q_z2 = self.q_z2(x)
            pyro.sample("z2", q_z2)
            pyro.sample("z1", self.q_z1(q_z2.mean))


def random_weights(module) -> None:
    """Away from the initialization, each layer its own draw."""
    with torch.no_grad():
        for i, layer in enumerate(m for m in module.modules() if isinstance(m, torch.nn.Linear)):
            layer.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(i))


@pytest.mark.parametrize("model_class, right", [(TwoLayerVAE, True), (TopReadsTheMean, False)],
                         ids=["two-layer", "broken-top-reads-the-mean"])
@torch.no_grad()
def test_the_two_layer_guide_density_by_hand(float64, model_class, right):
    """log q(z2, z1 | x) = log N(z2; μ(x), σ(x)²) + log N(z1; μ(z2), σ(z2)²) at the z2 the guide drew,
    σ = softplus(raw) + 1e-4, each written out; z2 is drawn first (the guide is bottom-up)."""
    module = model_class(P, top_dim=2, bottom_dim=3, hidden=(16,), top_hidden=(8,))
    random_weights(module)
    x = torch.bernoulli(torch.full((N, P), 0.3), generator=torch.Generator().manual_seed(0))
    trace = poutine.trace(module.guide).get_trace(x)
    assert [name for name in trace.nodes if name in ("z1", "z2")] == ["z2", "z1"]
    trace.compute_log_prob()
    z2, z1 = trace.nodes["z2"]["value"], trace.nodes["z1"]["value"]
    loc2, raw2 = module.q_z2.net(x).chunk(2, -1)
    loc1, raw1 = module.q_z1.net(z2).chunk(2, -1)
    expected = normal_log_density(z2, loc2, F.softplus(raw2) + 1e-4) + normal_log_density(z1, loc1, F.softplus(raw1) + 1e-4)
    got = trace.nodes["z2"]["log_prob"] + trace.nodes["z1"]["log_prob"]
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-10) == right


@pytest.mark.parametrize("model_class, right", [(TwoLayerVAE, True), (TopLayerIgnored, False)],
                         ids=["two-layer", "broken-top-layer-ignored"])
def test_the_top_layer_gets_gradient_from_the_elbo(model_class, right):
    """The ELBO's gradient reaches both networks of the top layer: q(z1|z2), and the first layer of
    p(z2|z1), which reads z1. Where p(z2|z1) ignores z1 the latter gets none."""
    torch.manual_seed(0)
    module = model_class(P, top_dim=2, bottom_dim=3, hidden=(16,), top_hidden=(8,))
    x = torch.bernoulli(torch.full((N, P), 0.3), generator=torch.Generator().manual_seed(0))
    elbo_loss(module.model, module.guide, 4)(x).backward()
    reads_z1 = module.p_z2.net[0].weight.grad
    assert module.q_z1.net[0].weight.grad.abs().sum() > 0
    assert (reads_z1 is not None and reads_z1.abs().sum() > 0) == right


TWO_LAYER = {"top_dim": 8, "bottom_dim": 16, "hidden": (64,), "top_hidden": (32,)}


@pytest.mark.parametrize("model_class, collapses", [(TwoLayerVAE, False), (TopLayerIgnored, True)],
                         ids=["two-layer", "broken-top-layer-ignored"])
def test_both_stochastic_layers_are_used_after_a_short_training(digits, model_class, collapses):
    """After 20 epochs on the digits (ELU, output bias initialized) both sites carry information:
    KL(q ‖ p) well above the collapse threshold at z1 and z2, and active units at each. A model whose
    p(z2|z1) ignores z1 trains its top layer onto the prior: the same check fails."""
    torch.manual_seed(0)
    module = model_class(P, **TWO_LAYER)
    module.initialize(digits[0])
    last = train(module, digits, epochs=20)
    healthy = all(last["kl"][site] > 10 * COLLAPSE_KL and last["active_units"][site] >= 1 for site in ("z1", "z2"))
    assert healthy != collapses, last


def test_kl_warm_up_keeps_more_of_the_top_layer(digits):
    """The recipe for two layers: with the latent terms scaled by β < 1 over the first 5 of 20 epochs,
    z2 carries more while the top layer settles, and the top layer ends with clearly more
    information (KL at z1) and the model with a better test ELBO than under the full KL throughout."""
    results = {}
    for warmup in (0, 5):
        torch.manual_seed(0)
        module = TwoLayerVAE(P, **TWO_LAYER)
        module.initialize(digits[0])
        results[warmup] = train(module, digits, epochs=20, warmup_epochs=warmup)
    assert results[5]["kl"]["z1"] > 1.3 * results[0]["kl"]["z1"], results
    assert results[5]["test_elbo"] > results[0]["test_elbo"], results


# ---------------------------------------------------------------- the IAF guide


def gated_with_random_output(guide: IAFEncoder) -> IAFEncoder:
    """Broken (the former guide): the paper's gated steps (eq. 14, s = sigmoid(a + 2)) with the
    MADE's output layer at PyTorch's random initialization."""
    gated = IAFEncoder(P, D, (16,), num_transforms=2, gated=True)
    gated.net.load_state_dict(guide.net.state_dict())
    torch.manual_seed(3)
    for flow in gated.flows:
        flow.nn.layers[-1].reset_parameters()
    return gated


@pytest.mark.parametrize("variant, right", [("identity", True), ("broken-gated-random-output", False)])
@torch.no_grad()
def test_the_iaf_guide_starts_at_its_diagonal_base(float64, variant, right):
    """At initialization every step is the identity: a draw of q(z|x) is the base's draw
    μ(x) + σ(x) ε, and log q(z|x) is the base's log-density there. The gated steps of eq. 14 with
    the +2 bias start as a contraction with a shift by an untrained network's output instead."""
    torch.manual_seed(0)
    guide = IAFEncoder(P, D, (16,), num_transforms=2)
    if variant != "identity":
        guide = gated_with_random_output(guide)
    x = torch.bernoulli(torch.full((N, P), 0.3), generator=torch.Generator().manual_seed(0))
    q = guide.distribution(x)
    torch.manual_seed(1)
    z = q.rsample()
    torch.manual_seed(1)
    z0 = q.base_dist.rsample()
    same = torch.allclose(z, z0, atol=1e-12) and torch.allclose(q.log_prob(z), q.base_dist.log_prob(z0), atol=1e-10)
    assert same == right


@torch.no_grad()
def test_the_gated_iaf_steps_start_as_the_documented_contraction(float64):
    """``gated=True``: m = 0 and s = sigmoid(2) at initialization, so z_T = sigmoid(2)^T z_0 and
    log q(z_T) = log N(z_0) − T D log sigmoid(2)."""
    torch.manual_seed(0)
    guide = IAFEncoder(P, D, (16,), num_transforms=3, gated=True)
    q = guide.distribution(torch.rand(N, P))
    torch.manual_seed(1)
    z = q.rsample()
    torch.manual_seed(1)
    z0 = q.base_dist.rsample()
    s = torch.sigmoid(torch.tensor(2.0, dtype=torch.float64))
    torch.testing.assert_close(z, s**3 * z0)
    torch.testing.assert_close(q.log_prob(z), q.base_dist.log_prob(z0) - 3 * D * torch.log(s))


class ContextIgnored(IAFEncoder):
    """Broken: every step conditioned on a context of zeros, not on h(x)."""

    def base(self, x):
        loc, scale, context = super().base(x)
        return loc, scale, torch.zeros_like(context)


@pytest.mark.parametrize("guide_class, right", [(IAFEncoder, True), (ContextIgnored, False)], ids=["iaf", "broken-context-ignored"])
def test_every_iaf_step_reads_the_context(guide_class, right):
    """h(x), the encoder's extra outputs, reaches each step's MADE: once the steps are away from the
    identity, log q(z|x) at a fixed z has a gradient in the encoder's context outputs."""
    torch.manual_seed(0)
    guide = guide_class(P, D, (16,), num_transforms=2)
    random_weights(guide.flows)
    x = torch.rand(N, P)
    for t in range(len(guide.flows)):
        flows = guide.flows
        guide.flows = torch.nn.ModuleList([flows[t]])  # one step at a time
        z = torch.randn(N, D, generator=torch.Generator().manual_seed(t))
        guide.distribution(x).log_prob(z).sum().backward()
        guide.flows = flows
        context_rows = guide.net[-1].weight.grad[2 * D:]
        assert (context_rows.abs().sum() > 0) == right, t
        guide.zero_grad()


# ---------------------------------------------------------------- options from the command line


def run_cli(argv, capsys) -> tuple[int, str, str]:
    code = main([*map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


SMALL = ["--epochs", "1", "--hidden", "16", "--latent-dim", "4", "--no-progress"]


def test_a_priors_option_reaches_it_from_the_command_line_and_is_recorded(tmp_path, capsys):
    """``--prior vamp --prior-arg components=50``: config.json records it and the trained model has 50 pseudo-inputs."""
    code, _, err = run_cli(["train", "--prior", "vamp", "--prior-arg", "components=50", "--out", tmp_path / "run", *SMALL], capsys)
    assert code == 0, err
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"]["args"]["prior"] == "vamp" and config["model"]["args"]["prior_args"] == {"components": 50}
    _, model, _ = Run.open(tmp_path / "run").load_model()
    assert isinstance(model.prior, VampPrior) and model.prior.pseudo_inputs().shape == (50, 64)


def test_a_guides_options_reach_it(tmp_path, capsys):
    code, _, err = run_cli(["train", "--guide", "iaf", "--guide-arg", "gated=true", "--guide-arg", "num_transforms=3",
                            "--out", tmp_path / "run", *SMALL], capsys)
    assert code == 0, err
    _, model, _ = Run.open(tmp_path / "run").load_model()
    assert model.encoder.gated is True and len(model.encoder.flows) == 3


@pytest.mark.parametrize("argv, message", [
    (["--prior", "vamp", "--prior-arg", "component=50"],
     r"unknown argument 'component' for prior 'vamp'; its arguments: components, pseudo_inputs, pseudo_init$"),
    (["--prior-arg", "components=50"], r"unknown argument 'components' for prior 'normal'; its arguments: none$"),
    (["--guide", "iaf", "--guide-arg", "steps=3"], r"unknown argument 'steps' for guide 'iaf'; its arguments: num_transforms, "),
    (["--likelihood", "gaussian", "--likelihood-arg", "sigma=0.1"], r"unknown argument 'sigma' for likelihood 'gaussian'; its arguments: scale$"),
    (["--prior-arg", "components"], r"--prior-arg 'components' is not KEY=VALUE"),
    (["--model", "pyrovae.models:two_layer", "--prior-arg", "components=5"],
     r"pyrovae.models:two_layer takes no prior_args \(--prior-arg\): its prior is not chosen by name; its arguments: top_dim, "),
], ids=["misspelt", "prior-without-options", "guide", "likelihood", "not-key-value", "factory-without-components"])
def test_an_unknown_component_option_is_refused_in_one_line(tmp_path, capsys, argv, message):
    from test_cli import assert_one_line_error

    code = main(["train", *map(str, argv), "--out", str(tmp_path / "run"), "--epochs", "1", "--no-progress"])
    assert code == 2
    assert_one_line_error(capsys.readouterr(), "train", message)
    assert not (tmp_path / "run").exists()


def test_list_shows_every_components_options_and_defaults(capsys):
    code, out, _ = run_cli(["list"], capsys)
    assert code == 0
    for line in ('--prior-arg: components=500, pseudo_inputs="hardtanh", pseudo_init="blank"',
                 "--guide-arg: num_transforms=2, context_dim=null, flow_hidden=null, gated=false",
                 "--likelihood-arg: scale=1.0",
                 '--model-arg: top_dim=50, bottom_dim=100, hidden=[200, 200], top_hidden=[100, 100], activation="elu"'):
        assert line in out, out


# ---------------------------------------------------------------- the quality benchmark


def quality():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module("quality")
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.mark.parametrize("activation", ["tanh", "elu"])
def test_the_quality_benchmark_builds_every_configuration_with_the_activation_it_names(activation):
    """--activation reaches every configuration, the two-layer ones included (it once built the
    two-layer model with its own default whatever the flag said)."""
    module = quality()
    for name in module.CONFIGS:
        model = module.build(name, 64, tiny=True, activation=activation)[0]
        kinds = {type(m) for m in model.modules() if type(m) in ACTIVATIONS.values()}
        assert kinds == {ACTIVATIONS[activation]}, (name, kinds)


def test_the_quality_benchmark_initializes_the_output_bias_of_every_configuration(digits):
    module = quality()
    x = digits[0]
    mean = x.mean(0).clamp(1e-3, 1 - 1e-3)
    expected = torch.log(mean) - torch.log1p(-mean)
    for name in module.CONFIGS:
        model = module.build(name, 64, tiny=True)[0]
        module.initialize(model, x)
        assert torch.allclose(output_layer(model.decoder).bias, expected, atol=1e-5), name


def test_the_quality_benchmark_trains_equal_epochs(tmp_path):
    out = tmp_path / "q.json"
    quality().main(["--tiny", "--epochs", "2", "--configs", "two-layer", "--out", str(out)])
    report = json.loads(out.read_text())
    (row,) = report["results"]
    assert row["training"]["epochs"] == 2 and row["training"]["steps"] == 2 * math.ceil(len(load_dataset("digits").train) / 100)
    assert report["budget"] == "2 epochs" and report["command"].startswith("python benchmarks/quality.py --tiny --epochs 2")
    assert set(row["active_units"]) == {"z1", "z2"} and "date" in report["machine"] and len(report["load_average"]["before"]) == 3
