"""The captured training step (pyrovae.capture) against Pyro's eager ``Trace_ELBO`` and ``train_step``.

Same seed, same noise: the captured graph draws the guide's ε inside it from torch's generator in
the eager step's order, so loss, gradients and trained parameters agree to float64 round-off.
"""

import copy
import logging
import math
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints
from torch import nn

from pyrovae import capture, factory, params as parameters
from pyrovae.capture import CapturedStep
from pyrovae.context import fast_context
from pyrovae.data import Batches
from pyrovae.errors import PyrovaeError
from pyrovae.models import vae
from pyrovae.objectives import loss as objective_loss
from pyrovae.train import TrainConfig, TrainingDiverged, fit, make_optimizer, train_step

TOL = dict(rtol=1e-10, atol=1e-10)
STYLES = Path(__file__).parent / "models" / "styles.py"
EXAMPLES = Path(__file__).parent.parent / "examples" / "models"


def style(name):
    return lambda: factory.load(f"{STYLES}:{name}")(64)


Alternating = factory.load(f"{STYLES}:Alternating")  # a model whose Python branch changes on every call


MODELS = {
    "vae": lambda: vae(64, latent_dim=4, hidden=(32,)),
    "bare-constrained-param": style("bare_param"),  # pyro.param("obs_scale", constraint=positive)
    "two-latent-sites": style("hierarchical"),
    "pyro-module": style("pyro_module"),  # PyroModule networks and a positive PyroParam
}


def data(n=16, p=64, seed=0):
    return torch.bernoulli(torch.rand(n, p, generator=torch.Generator().manual_seed(seed)))


def setup(name, x):
    model = MODELS[name]()
    return model, parameters.trainable(model.model, model.guide, x)


def eager_grads(model, params, x, num_particles=1, beta=1.0, objective="elbo"):
    """Pyro's own loss, Trace_ELBO.differentiable_loss (TraceMeanField_ELBO's for "mean-field"; under
    scale_latents for β ≠ 1), and its gradients."""
    with fast_context():
        loss = objective_loss(objective, model.model, model.guide, num_particles, beta)(x)
    return loss, torch.autograd.grad(loss, list(params.values()), allow_unused=True)


def assert_grads_close(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert (a is None) == (e is None)
        if e is not None:
            torch.testing.assert_close(a, e, **TOL)


def assert_matches_eager(step, model, params, x, num_particles, beta, objective):
    """Two calls of the captured step (the second replays the first's capture) against the eager
    objective on the same draws: loss and gradients to round-off. Returns the last loss."""
    for seed in (1, 2):
        pyro.set_rng_seed(seed)
        loss, grads, _ = step(x)
        pyro.set_rng_seed(seed)
        expected_loss, expected_grads = eager_grads(model, params, x, num_particles, beta, objective)
        torch.testing.assert_close(loss, expected_loss.detach(), **TOL)
        assert_grads_close(grads, expected_grads)
    return loss


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("num_particles, beta", [(1, 1.0), (3, 0.5)], ids=["K1", "K3-beta0.5"])
def test_loss_and_gradients_match_trace_elbo(float64, name, num_particles, beta):
    x = data()
    model, params = setup(name, x)
    step = CapturedStep(model.model, model.guide, params, num_particles=num_particles, beta=beta)
    for seed in (1, 2):  # the second call replays the capture made by the first
        pyro.set_rng_seed(seed)
        loss, grads, norm = step(x)
        pyro.set_rng_seed(seed)
        expected_loss, expected_grads = eager_grads(model, params, x, num_particles, beta)
        torch.testing.assert_close(loss, expected_loss.detach(), **TOL)
        assert_grads_close(grads, expected_grads)
        torch.testing.assert_close(norm, torch.nn.utils.get_total_norm([g for g in expected_grads if g is not None]), **TOL)
    assert step.failure is None and len(step.captures) == 1


@pytest.mark.parametrize("name", ["vae", "two-latent-sites", "student-t-prior"])
@pytest.mark.parametrize("num_particles, beta", [(1, 1.0), (3, 0.5)], ids=["K1", "K3-beta0.5"])
def test_mean_field_loss_and_gradients_match_trace_mean_field_elbo(float64, name, num_particles, beta):
    """Analytic KL where kl_divergence has one (the Gaussian prior), Monte Carlo where not (Student-t)."""
    x = data()
    model = vae(64, latent_dim=4, hidden=(32,)) if name != "two-latent-sites" else MODELS[name]()
    if name == "student-t-prior":
        model = factory.load(f"{EXAMPLES}/student_t_prior.py:student_t_vae")(64, latent_dim=4, hidden=(32,))
    params = parameters.trainable(model.model, model.guide, x)
    step = CapturedStep(model.model, model.guide, params, num_particles=num_particles, beta=beta, objective="mean-field")
    loss = assert_matches_eager(step, model, params, x, num_particles, beta, "mean-field")
    assert step.failure is None
    # the check can fail: on the same draws the plain ELBO differs where a closed form exists, and only there
    pyro.set_rng_seed(2)
    plain, _ = eager_grads(model, params, x, num_particles, beta, "elbo")
    assert torch.allclose(plain, loss) == (name == "student-t-prior")


@pytest.mark.parametrize("name", ["vae", "two-latent-sites", "pyro-module"])
@pytest.mark.parametrize("num_particles, beta", [(1, 1.0), (5, 1.0), (5, 0.5)], ids=["k1", "k5", "k5-beta0.5"])
def test_iwae_loss_and_gradients_match_the_eager_iwae_objective(float64, name, num_particles, beta):
    """−Σ_n L_k(x_n) and its gradients, captured, equal pyrovae.objectives' eager IWAE loss on the same draws."""
    x = data()
    model, params = setup(name, x)
    step = CapturedStep(model.model, model.guide, params, num_particles=num_particles, beta=beta, objective="iwae")
    loss = assert_matches_eager(step, model, params, x, num_particles, beta, "iwae")
    assert step.failure is None and len(step.captures) == 1
    # the check can fail: at k > 1 the bound is above the ELBO on the same draws
    pyro.set_rng_seed(2)
    elbo, _ = eager_grads(model, params, x, num_particles, beta, "elbo")
    assert (loss < elbo - 1e-6) == (num_particles > 1)


def test_captured_iwae_follows_beta_without_a_new_capture(float64):
    x = data()
    model, params = setup("vae", x)
    step = CapturedStep(model.model, model.guide, params, num_particles=4, objective="iwae")
    for beta in (0.0, 0.3, 1.0):
        step.beta = beta
        pyro.set_rng_seed(3)
        loss, _, _ = step(x)
        pyro.set_rng_seed(3)
        expected, _ = eager_grads(model, params, x, 4, beta, "iwae")
        torch.testing.assert_close(loss, expected.detach(), **TOL)
    assert len(step.captures) == 1


def test_noise_is_drawn_in_the_graph(float64):
    x = data()
    model, params = setup("vae", x)
    step = CapturedStep(model.model, model.guide, params)
    first, second = step(x).loss, step(x).loss
    assert first != second  # fresh ε on each replay
    (graph,) = step.graphs.values()
    ops = {str(node.target) for node in graph.graph.nodes if node.op == "call_function"}
    assert any(op.startswith(("aten.normal", "aten.randn")) for op in ops), ops
    latent = (16, 4)  # no constant of ε's shape baked into the graph
    assert not any(tuple(b.shape) == latent for _, b in graph.named_buffers())
    assert not any(tuple(v.shape) == latent for k, v in vars(graph).items() if isinstance(v, torch.Tensor))


def two_processes(params):
    """A stand-in for pyrovae.distributed's ``sync``: two processes with the same batch, summed."""
    def sync(loss):
        for p in params.values():
            if p.grad is not None:
                p.grad = 2 * p.grad
        return 2 * loss.item()

    return sync


@pytest.mark.parametrize("objective, k", [("elbo", 1), ("iwae", 3)])
@pytest.mark.parametrize("clip_grad, synced", [(None, False), (1.0, False), (1.0, True)], ids=["plain", "clipped", "clipped-synced"])
def test_training_matches_eager_train_step(float64, clip_grad, synced, objective, k):
    """Five steps of fused Adam from the same start with the same noise: the same losses, gradient
    norms and parameters, the positive ``obs_scale`` trained through its unconstrained leaf. The two
    runs are made one after the other: this model's parameter names are fixed, so they share Pyro's
    param store."""
    batches = [data(seed=s) for s in range(4)] + [data(n=10, seed=4)]  # the last, smaller batch
    runs = []
    model = MODELS["bare-constrained-param"]()
    start = copy.deepcopy(model)
    for captured in (False, True):
        pyro.clear_param_store()
        model = start if captured else model
        params = parameters.trainable(model.model, model.guide, batches[0])
        opt = make_optimizer(params.values(), 1e-2)
        step = CapturedStep(model.model, model.guide, params, k, mode=None if captured else "eager", objective=objective)
        losses, norms = [], []
        options = dict(clip_grad=clip_grad, norms=norms, sync=two_processes(params) if synced else None)
        for x in batches:
            pyro.set_rng_seed(7)
            with fast_context():
                losses.append(step.step(opt, x, **options) if captured
                              else train_step(objective_loss(objective, model.model, model.guide, k), opt, x, **options))
        assert len(step.captures) == (2 if captured else 0) and step.failure is None
        runs.append((losses, norms, {name: p.detach().clone() for name, p in params.items()}))
    (eager_losses, eager_norms, eager_params), (losses, norms, params) = runs
    assert losses == pytest.approx(eager_losses, rel=1e-10)
    assert norms == pytest.approx(eager_norms, rel=1e-10)
    assert params.keys() == eager_params.keys() and "obs_scale" in params
    for name, p in params.items():
        torch.testing.assert_close(p, eager_params[name], **TOL, msg=name)
    assert params["obs_scale"] != 0  # moved from its start, log 1 = 0


def test_each_batch_shape_gets_its_own_capture(float64):
    model, params = setup("vae", data())
    step = CapturedStep(model.model, model.guide, params)
    for n in (16, 10, 16, 10):
        x = data(n=n)
        pyro.set_rng_seed(n)
        loss = step(x).loss
        pyro.set_rng_seed(n)
        torch.testing.assert_close(loss, eager_grads(model, params, x)[0].detach(), **TOL)
    assert len(step.captures) == 2
    assert sorted(key[2][0] for key in step.captures) == [(10, 64), (16, 64)]


class DataDependent(Alternating):
    """Branches in Python on a value of the data: ``make_fx`` cannot trace that."""

    def flipped(self, x, z) -> bool:
        return not x.sum() > 0


def test_data_dependent_control_flow_falls_back_to_eager(float64, caplog):
    x = data()
    model = DataDependent()
    params = parameters.trainable(model.model, model.guide, x)
    step = CapturedStep(model.model, model.guide, params)
    opt = make_optimizer(params.values(), 1e-3)
    with caplog.at_level(logging.WARNING, logger="pyrovae.capture"):
        pyro.set_rng_seed(3)
        loss, grads, _ = step(x)
        pyro.set_rng_seed(3)
        expected_loss, expected_grads = eager_grads(model, params, x)
        torch.testing.assert_close(loss, expected_loss.detach(), **TOL)
        assert_grads_close(grads, expected_grads)
        assert math.isfinite(step.step(opt, x))  # eager from now on, without another warning
    warnings = [r for r in caplog.records if r.name == "pyrovae.capture"]
    assert len(warnings) == 1 and "runs eagerly" in warnings[0].getMessage() and "data-dependent" in warnings[0].getMessage()
    assert step.eager and not step.captures


def test_score_function_guide_site_falls_back_to_eager(float64, caplog):
    """A Bernoulli latent: Trace_ELBO's score-function term is not captured; the eager step has it."""
    x = torch.randn(8)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Bernoulli(0.5 * torch.ones(x.shape[0])))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        p = pyro.param("p", torch.full((x.shape[0],), 0.3), constraint=constraints.unit_interval)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Bernoulli(p))

    params = parameters.trainable(model, guide, x)
    step = CapturedStep(model, guide, params)
    with caplog.at_level(logging.WARNING, logger="pyrovae.capture"):
        pyro.set_rng_seed(5)
        loss, grads, _ = step(x)
    assert step.eager and "not reparameterized" in step.failure
    assert len([r for r in caplog.records if r.name == "pyrovae.capture"]) == 1
    pyro.set_rng_seed(5)
    with fast_context():
        expected = pyro.infer.Trace_ELBO(max_plate_nesting=1).differentiable_loss(model, guide, x)
    torch.testing.assert_close(loss, expected.detach(), **TOL)
    assert_grads_close(grads, torch.autograd.grad(expected, list(params.values())))


# the checked capture (capture="auto", the default of fit and `pyrovae train`)


def test_a_checked_capture_that_agrees_goes_on_captured_and_draws_as_the_eager_step(float64):
    x = data()
    model, params = setup("vae", x)
    step = CapturedStep(model.model, model.guide, params, check=True)
    pyro.set_rng_seed(1)
    loss, grads, _ = step(x)  # traced, replayed, compared; the eager result returned
    after_check = torch.get_rng_state()
    pyro.set_rng_seed(1)
    expected_loss, expected_grads = eager_grads(model, params, x)
    assert torch.equal(after_check, torch.get_rng_state())  # one step's draws, not two
    torch.testing.assert_close(loss, expected_loss.detach(), **TOL)
    assert_grads_close(grads, expected_grads)
    assert step.failure is None and len(step.captures) == 1
    assert_matches_eager(step, model, params, x, 1, 1.0, "elbo")  # replayed from now on
    assert len(step.captures) == 1


def test_a_checked_capture_that_differs_runs_eagerly_after_one_line(float64, caplog):
    x = data()
    model = Alternating()
    params = parameters.trainable(model.model, model.guide, x)
    step = CapturedStep(model.model, model.guide, params, check=True)
    with caplog.at_level(logging.WARNING, logger="pyrovae.capture"):
        step(x)
        eager = CapturedStep(model.model, model.guide, params, mode="eager")
        eager(x)
        for calls in (4, 5):  # eager from now on: the branch of the call's own count
            pyro.set_rng_seed(calls)
            model.calls = calls
            loss, _, _ = step(x)
            pyro.set_rng_seed(calls)
            model.calls = calls
            torch.testing.assert_close(loss, eager(x).loss, **TOL)
    lines = [r.getMessage() for r in caplog.records if r.name == "pyrovae.capture"]
    assert len(lines) == 1 and "runs eagerly" in lines[0] and "differs from the eager loss" in lines[0], lines
    assert step.eager and not step.captures
    # unchecked, the same model trains on the traced branch only
    unchecked = CapturedStep(model.model, model.guide, params)
    unchecked(x)
    assert unchecked.failure is None


@pytest.mark.parametrize("broken, message", [
    ("gradient", "the gradient of parameter"),
    ("loss", "differs from the eager loss"),
    ("noise", "different amount of noise"),
])
def test_the_check_catches_a_broken_graph(float64, monkeypatch, broken, message):
    """The check is shown to fail: a replay whose one gradient is off by 1e-6 relative, whose loss
    is, or which draws one number more than the eager step."""
    real_replay = capture.graphs.replay

    def broken_replay(*a, **k):
        run = real_replay(*a, **k)

        def replay(*inputs):
            check, loss, norm, grads = run(*inputs)
            if broken == "noise":
                torch.rand(1)
            if broken == "loss":
                loss = loss * (1 + 1e-6)
            if broken == "gradient":
                grads = list(grads)
                i = max(range(len(grads)), key=lambda j: grads[j].abs().max())  # one that is not 0
                grads[i] = grads[i] * (1 + 1e-6)
            return check, loss, norm, grads

        return replay

    monkeypatch.setattr(capture.graphs, "replay", broken_replay)
    x = data()
    model, params = setup("vae", x)
    step = CapturedStep(model.model, model.guide, params, check=True)
    pyro.set_rng_seed(1)
    step(x)
    assert step.eager and message in step.failure, step.failure
    unchecked = CapturedStep(model.model, model.guide, params)  # the same broken graph goes unnoticed unchecked
    unchecked(x)
    assert unchecked.failure is None


def test_each_new_batch_shape_is_checked(float64, monkeypatch):
    x = data()
    model, params = setup("vae", x)
    step = CapturedStep(model.model, model.guide, params, check=True)
    checked = []
    real = step._checked
    monkeypatch.setattr(step, "_checked", lambda replay, tensors, *a: checked.append(tuple(tensors[0].shape)) or real(replay, tensors, *a))
    for n in (16, 10, 16, 10, 7):
        step(data(n=n))
    assert checked == [(16, 64), (10, 64), (7, 64)] and step.failure is None and len(step.captures) == 3


def test_checked_capture_refuses_inductor():
    x = data()
    model, params = setup("vae", x)
    with pytest.raises(PyrovaeError, match="inductor"):
        CapturedStep(model.model, model.guide, params, mode="inductor", check=True)


def test_fit_captures_by_default_and_trains_as_the_eager_step(float64, caplog):
    """TrainConfig's default ``capture="auto"``: checked capture, the same parameters as eager training."""
    assert TrainConfig().capture == "auto"
    x = data(n=40)
    trained = []
    for setting in ("auto", False):
        pyro.clear_param_store()
        torch.manual_seed(0)
        model = vae(64, latent_dim=4, hidden=(32,))
        with caplog.at_level(logging.WARNING, logger="pyrovae.capture"):
            fit(model, Batches(x, 16, seed=0), TrainConfig(epochs=2, batch_size=16, capture=setting), progress=False)
        trained.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    assert not [r for r in caplog.records if r.name == "pyrovae.capture"]
    for name, value in trained[0].items():
        torch.testing.assert_close(value, trained[1][name], **TOL, msg=name)


class Poisoned(nn.Module):
    """A tiny VAE with one extra parameter c = 0 entering the loss as ``0 · sqrt(|c|)`` (finite loss,
    nan gradient) or as ``c · nan`` (nan loss), picked by ``poison`` (None: neither)."""

    def __init__(self, poison, p=64, d=2):
        super().__init__()
        self.poison, self.d = poison, d
        self.decoder, self.encoder = nn.Linear(d, p), nn.Linear(p, 2 * d)
        self.c = nn.Parameter(torch.zeros(()))

    def model(self, x):
        pyro.module("poisoned", self)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(self.d), 1.0).to_event(1))
            extra = {None: 0, "gradient": 0 * self.c.abs().sqrt(), "loss": self.c * math.nan}[self.poison]
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z) + extra).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("poisoned", self)
        with pyro.plate("data", x.shape[0]):
            loc, raw = self.encoder(x).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw) + 1e-3).to_event(1))


@pytest.mark.parametrize("poison, message", [("loss", "the loss became nan"), ("gradient", "the gradient became nan")])
def test_non_finite_step_raises_before_updating(float64, poison, message):
    x = data()
    model = Poisoned(None)
    params = parameters.trainable(model.model, model.guide, x)
    model.poison = poison
    opt = make_optimizer(params.values(), 1e-2)
    step = CapturedStep(model.model, model.guide, params)
    before = {name: p.detach().clone() for name, p in params.items()}
    with pytest.raises(TrainingDiverged, match=message):
        step.step(opt, x)
    assert step.failure is None and len(step.captures) == 1  # captured: the check is the graph's
    for name, p in params.items():
        assert torch.equal(p, before[name]), name
    assert not opt.state  # no optimizer step was taken


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device; this machine has none")
def test_cuda_graph_step_matches_graph_replay(float64):
    """The CUDA graph against the same traced graph replayed op by op, from the same CUDA random
    state; fresh noise on each replay; one step with fused, capturable Adam."""
    x = data().cuda()
    model = MODELS["vae"]().cuda()
    params = parameters.trainable(model.model, model.guide, x)
    graph_step = CapturedStep(model.model, model.guide, params, mode="graph")
    cuda_step = CapturedStep(model.model, model.guide, params)
    assert cuda_step.mode == "cuda-graph"
    state = torch.cuda.get_rng_state()
    loss, grads, norm = (t.clone() if isinstance(t, torch.Tensor) else [g.clone() for g in t] for t in cuda_step(x))
    torch.cuda.set_rng_state(state)
    expected_loss, expected_grads, expected_norm = graph_step(x)
    torch.testing.assert_close(loss, expected_loss, **TOL)
    assert_grads_close(grads, expected_grads)
    assert cuda_step(x).loss != loss  # fresh noise
    opt = torch.optim.Adam(params.values(), lr=1e-3, fused=True, capturable=True)
    before = [p.detach().clone() for p in params.values()]
    assert math.isfinite(cuda_step.step(opt, x))
    assert all(not torch.equal(p, b) for p, b in zip(params.values(), before))
    assert cuda_step.failure is None and len(cuda_step.captures) == 1


@pytest.mark.slow
def test_inductor_mode_matches_eager(float64):
    """torch.compile (inductor) of the same graph; its random draws made with torch's generator
    (``fallback_random``) so that the noise is the eager step's."""
    from torch._inductor import config

    x = data()
    model, params = setup("vae", x)
    step = CapturedStep(model.model, model.guide, params, mode="inductor")
    with config.patch(fallback_random=True):
        pyro.set_rng_seed(1)
        loss, grads, _ = step(x)
    pyro.set_rng_seed(1)
    expected_loss, expected_grads = eager_grads(model, params, x)
    torch.testing.assert_close(loss, expected_loss.detach(), **TOL)
    assert_grads_close(grads, expected_grads)


def test_grad_norm_is_the_total_norm(float64):
    """√(Σ ⟨g, g⟩), one dot product per tensor, against torch's total norm, over tensors of several shapes and strides."""
    from pyrovae.step import grad_norm

    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(7, 5, generator=g), torch.randn(5, generator=g), torch.randn(4, 6, generator=g).t(), torch.randn((), generator=g)]
    torch.testing.assert_close(grad_norm(grads), torch.nn.utils.get_total_norm(grads), rtol=1e-14, atol=0)
    assert grad_norm([]) == 0
