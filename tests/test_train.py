"""Tests of pyrovae.train and pyrovae.checkpoint.

The fast path (``elbo_loss`` + ``train_step`` + one ``torch.optim.Adam``) against Pyro's own
``SVI``/``Trace_ELBO``; training on the digits data set; divergence; atomic checkpoints.
"""

import math
import os
import re
import subprocess
import sys

import pyro
import pytest

from pyrovae.errors import DataError
import torch
from pyro.infer import SVI, Trace_ELBO

import pyrovae.train as train_module
from pyrovae import checkpoint
from pyrovae.data import Batches, load_dataset, static_binarized
from pyrovae.errors import PyrovaeError
from pyrovae.evidence import log_weights
from pyrovae.guides import LinearGaussianGuide
from pyrovae.models import PPCA, HierarchicalLinearGaussian, VAEConfig, build_vae
from pyrovae.train import (
    TrainConfig,
    TrainingDiverged,
    elbo_loss,
    fast_context,
    fit,
    make_optimizer,
    mean_elbo,
    train_step,
)

P, D, HIDDEN = 12, 4, (32,)


# ---------------------------------------------------------------- helpers


def binary_data(n: int = 20, p: int = P, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((n, p), 0.5), generator=generator)


def twin_vaes(likelihood: str = "bernoulli", hidden=HIDDEN):
    """Two VAEs with equal initial parameters and their own names in the param store."""
    config = VAEConfig(P, D, hidden, likelihood=likelihood)
    pyro.set_rng_seed(123)
    a = build_vae(config)
    pyro.set_rng_seed(123)
    b = build_vae(config)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    return a, b


def snapshot(module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def assert_parameters_equal(module, expected: dict[str, torch.Tensor]) -> None:
    for name, p in module.named_parameters():
        assert torch.equal(p.detach(), expected[name]), name


def all_finite(module) -> bool:
    return all(torch.isfinite(p).all() for p in module.parameters())


# ---------------------------------------------------------------- the fast path is Pyro's SVI


@pytest.mark.parametrize("likelihood", ["bernoulli", "continuous-bernoulli"])
def test_fast_loss_and_gradients_equal_trace_elbo(float64, likelihood):
    ours, reference = twin_vaes(likelihood)
    x = binary_data()

    pyro.set_rng_seed(7)
    expected = Trace_ELBO().differentiable_loss(reference.model, reference.guide, x)
    expected.backward()
    pyro.set_rng_seed(7)
    with fast_context():
        loss = elbo_loss(ours.model, ours.guide)(x)
    loss.backward()

    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    for (name, p), q in zip(ours.named_parameters(), reference.parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_fast_loss_with_particles_is_pyros_vectorized_trace_elbo(float64):
    ours, reference = twin_vaes()
    x = binary_data()
    elbo = Trace_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=1)
    pyro.set_rng_seed(7)
    expected = elbo.differentiable_loss(reference.model, reference.guide, x)
    pyro.set_rng_seed(7)
    with fast_context():
        loss = elbo_loss(ours.model, ours.guide, num_particles=3)(x)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)


def test_fast_context_turns_validation_off_and_back_on():
    assert pyro.settings.get("validate_distributions_pyro")
    with fast_context():
        assert not pyro.settings.get("validate_distributions_pyro")
    assert pyro.settings.get("validate_distributions_pyro")


@pytest.mark.parametrize(
    "make", [lambda params, lr: torch.optim.Adam(params, lr=lr), make_optimizer], ids=["torch-adam", "make_optimizer"]
)
def test_five_steps_match_svi_with_pyro_adam(float64, make):
    lr, steps = 1e-2, 5
    ours, reference = twin_vaes()
    initial = snapshot(ours)
    x = binary_data()

    optimizer = make(ours.parameters(), lr)
    loss_fn = elbo_loss(ours.model, ours.guide)
    losses = []
    for step in range(steps):
        pyro.set_rng_seed(100 + step)
        with fast_context():
            losses.append(train_step(loss_fn, optimizer, x))

    svi = SVI(reference.model, reference.guide, pyro.optim.Adam({"lr": lr}), Trace_ELBO())
    expected_losses = []
    for step in range(steps):
        pyro.set_rng_seed(100 + step)
        expected_losses.append(svi.step(x))

    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected_losses), rtol=1e-10, atol=1e-10)
    for (name, p), q in zip(ours.named_parameters(), reference.parameters()):
        assert not torch.equal(p.detach(), initial[name]), name
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12, msg=name)


def test_make_optimizer_is_fused_adam():
    w = torch.nn.Parameter(torch.zeros(3))
    optimizer = make_optimizer([w], 0.25)
    assert isinstance(optimizer, torch.optim.Adam)
    assert optimizer.defaults["lr"] == 0.25 and optimizer.defaults["fused"]


def test_the_engine_loop_registers_once_and_optimizes_the_registered_tensors():
    """The parameters are found once, as SVI finds them (the param store then holds exactly the
    module's own tensors); the loop itself registers nothing more."""
    vae = build_vae(VAEConfig(P, D, HIDDEN))
    fit(vae, Batches(binary_data(), 10), TrainConfig(epochs=1, batch_size=10), test_x=binary_data(), progress=False)
    store = pyro.get_param_store()
    assert {id(p) for p in store._params.values()} == {id(p) for p in vae.parameters()}


@pytest.mark.parametrize("num_particles", [1, 4], ids=["1-particle", "4-particles"])
@pytest.mark.parametrize("model_class", [PPCA, HierarchicalLinearGaussian], ids=["ppca", "hierarchical"])
def test_mean_elbo_with_the_exact_posterior_is_log_px(float64, model_class, num_particles):
    """With q = p(z | x) every draw gives ELBO = log p(x) exactly; batches of 7 do not divide 20 points."""
    torch.manual_seed(0)
    model = model_class(6, 2) if model_class is PPCA else model_class(6, 2, 3)
    guide = LinearGaussianGuide(6, model.sites).set_exact_posterior(model)
    x = torch.randn(20, 6)
    with fast_context():
        value = mean_elbo(elbo_loss(model.model, guide, num_particles), x, batch_size=7)
    with torch.no_grad():
        expected = model.log_px(x).mean().item()
    assert value == pytest.approx(expected, rel=1e-10, abs=1e-10)


# ---------------------------------------------------------------- fit


def epoch_metric_problems(history, step_losses, test_checks) -> list[str]:
    """What is wrong with the per-epoch metrics of ``fit``, checked against independent records:

    - "train_elbo": not minus the sum of the epoch's step losses (each −ELBO summed over its batch)
      over the points the epoch saw, to round-off;
    - "test_elbo": more than 5 standard errors from a 200-draw ELBO of the same test points with the
      same parameters (the metric takes one draw per point: variance mean_n Var(log w_n) / M).

    ``step_losses``: per epoch, a list of (loss, batch size); ``test_checks``: per epoch, (ELBO, stderr).
    """
    problems = []
    for m, losses, (elbo, stderr) in zip(history, step_losses, test_checks):
        expected = -sum(loss for loss, _ in losses) / sum(size for _, size in losses)
        if not m["train_elbo"] == pytest.approx(expected, rel=1e-12):
            problems.append(f"epoch {m['epoch']} train_elbo {m['train_elbo']}, expected {expected}")
        if not abs(m["test_elbo"] - elbo) < 5 * stderr:
            problems.append(f"epoch {m['epoch']} test_elbo {m['test_elbo']}, expected {elbo} ± {stderr}")
    return problems


METRIC_BREAKS = {  # name → a mutation of an epoch's metrics, and the metric it must be caught on
    "correct": (lambda m: m, None),
    "train-elbo-per-batch": (lambda m: {**m, "train_elbo": m["train_elbo"] * 30 / 4}, "train_elbo"),  # over 4 batches, not 30 points
    "test-elbo-summed": (lambda m: {**m, "test_elbo": m["test_elbo"] * 10}, "test_elbo"),  # over the 10 points, not per point
}


@pytest.mark.parametrize("variant", list(METRIC_BREAKS))
def test_fit_calls_back_after_each_epoch_and_starts_where_told(monkeypatch, variant):
    """Epochs 3..5 of 5 run; each epoch's train_elbo is minus its summed step losses per point and its
    test_elbo agrees with an independent estimate; mis-normalized metrics are rejected."""
    vae = build_vae(VAEConfig(P, D, HIDDEN))
    x = binary_data(n=30)
    batches = Batches(x, 8)  # 4 batches, the last one of 6
    step_losses, test_checks, seen = [], [], []

    def recording_step(loss_fn, optimizer, xb, *args, **kwargs):
        value = train_step(loss_fn, optimizer, xb, *args, **kwargs)
        step_losses[-1].append((value, len(xb)))
        return value

    def on_epoch_end(metrics):
        seen.append(metrics)
        log_w = log_weights(vae.model, vae.guide, x[:10], 200).log_w  # (200, 10), the parameters test_elbo saw
        var = log_w.var(0).mean().item()
        test_checks.append((log_w.mean().item(), math.sqrt(var / 10 + var / (200 * 10))))
        step_losses.append([])

    monkeypatch.setattr(train_module, "train_step", recording_step)
    step_losses.append([])
    history = fit(vae, batches, TrainConfig(epochs=5, batch_size=8, lr=1e-2, capture=False), test_x=x[:10], start_epoch=2,  # records train_step
                  on_epoch_end=on_epoch_end, progress=False)
    assert [m["epoch"] for m in history] == [3, 4, 5]
    assert seen == history
    assert [len(losses) for losses in step_losses] == [4, 4, 4, 0]
    for m in history:
        assert {"epoch", "train_elbo", "test_elbo", "seconds"} <= set(m)  # and what else fit reports (the learning rate)
        assert m["seconds"] >= 0
    mutate, expected = METRIC_BREAKS[variant]
    problems = epoch_metric_problems([mutate(m) for m in history], step_losses, test_checks)
    if expected is None:
        assert problems == []
    else:
        assert len(problems) == 3 and all(expected in p for p in problems), problems
    without_test = fit(vae, batches, TrainConfig(epochs=1, batch_size=8), progress=False)
    assert {"epoch", "train_elbo", "seconds"} <= set(without_test[0]) and "test_elbo" not in without_test[0]


def test_fit_does_nothing_past_the_last_epoch():
    vae = build_vae(VAEConfig(P, D, HIDDEN))
    before = snapshot(vae)
    assert fit(vae, Batches(binary_data(), 5), TrainConfig(epochs=3), start_epoch=3, progress=False) == []
    assert_parameters_equal(vae, before)


def test_fit_on_digits_raises_the_test_elbo():
    """15 epochs on the 8x8 digits: the per-point test ELBO rises by far more than its standard error."""
    data = load_dataset("digits")
    test_x = static_binarized(data.test, 1)  # (359, 64)
    vae = build_vae(VAEConfig(data.dim, 8, (64,)))
    config = TrainConfig(epochs=15, batch_size=128, lr=3e-3)
    batches = Batches(data.train, config.batch_size, "dynamic", seed=0)

    def per_point_log_w():  # (20, M): 20 draws of z per test point
        return log_weights(vae.model, vae.guide, test_x, 20).log_w

    before = per_point_log_w().mean(0)
    history = fit(vae, batches, config, test_x, progress=False)
    log_w = per_point_log_w()
    after = log_w.mean(0)

    assert [m["epoch"] for m in history] == list(range(1, 16))
    difference = after - before  # paired: the same test points
    z = difference.mean() / (difference.std() / len(difference) ** 0.5)
    assert z > 10, f"ELBO {before.mean():.2f} → {after.mean():.2f} nats, z = {z:.1f}"
    assert history[-1]["train_elbo"] > history[0]["train_elbo"]
    # the last epoch's test ELBO (one draw per point, same parameters) agrees with the 20-draw mean:
    # each has variance mean_n Var_k(log w) / M, the 20-draw one 20 times less
    stderr = (log_w.var(0).mean() * (1 + 1 / 20) / len(after)).sqrt().item()
    assert abs(history[-1]["test_elbo"] - after.mean().item()) < 5 * stderr


# ---------------------------------------------------------------- divergence


@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
def test_train_step_stops_on_a_nonfinite_loss_without_touching_the_parameters(bad):
    vae = build_vae(VAEConfig(P, D, HIDDEN))
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-2)
    x = binary_data()
    loss_fn = elbo_loss(vae.model, vae.guide)
    with fast_context():
        train_step(loss_fn, optimizer, x)  # one good step: Adam has state now
    before = snapshot(vae)
    state_before = {k: v["step"].clone() for k, v in optimizer.state.items()}

    def bad_loss(x):
        return loss_fn(x) * bad

    with fast_context(), pytest.raises(TrainingDiverged, match=rf"the loss became {bad}.*`lr`"):
        train_step(bad_loss, optimizer, x)
    assert_parameters_equal(vae, before)
    assert {k: v["step"] for k, v in optimizer.state.items()} == state_before


@pytest.mark.filterwarnings("ignore:Encountered NaN:UserWarning")  # Pyro's Trace_ELBO warns before we raise
def test_fit_refuses_nan_data_before_training():
    vae = build_vae(VAEConfig(P, D, HIDDEN))
    x = binary_data()
    x[3, 5] = math.nan
    before = snapshot(vae)
    with pytest.raises(DataError, match=r"the training data \(observed site 'x'\) has 1 values outside the support \{0, 1\}.*\(e.g. nan\)"):
        fit(vae, Batches(x, 20, shuffle=False), TrainConfig(epochs=2, batch_size=20), progress=False)
    assert_parameters_equal(vae, before)


@pytest.mark.filterwarnings("ignore:Encountered NaN:UserWarning")
@pytest.mark.parametrize("hidden", [(32,), (32, 32)], ids=["1-layer", "2-layers"])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_an_absurd_learning_rate_trains_or_stops_but_never_leaves_nan_parameters(activation, hidden):
    vae = build_vae(VAEConfig(P, D, hidden, activation))
    config = TrainConfig(epochs=3, batch_size=16, lr=1e6)
    batches = Batches(binary_data(n=64), config.batch_size)
    try:
        history = fit(vae, batches, config, progress=False)
    except TrainingDiverged as e:
        assert re.search(r"^epoch \d+, step \d+: the (loss|gradient) became (nan|inf)", str(e)), e
    else:
        assert len(history) == 3
    assert all_finite(vae)


def test_a_finite_loss_with_an_infinite_gradient_stops_before_the_step():
    w = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.Adam([w], lr=1e-3)

    def loss_fn(x):  # finite value 0, gradient +inf (d sqrt(w) / dw at w = 0)
        return w.sqrt().sum()

    with pytest.raises(TrainingDiverged, match=r"the gradient became inf \(loss 0\); the parameters were not updated"):
        train_step(loss_fn, optimizer, torch.zeros(1))
    assert torch.equal(w.detach(), torch.zeros(3))
    assert optimizer.state == {}


@pytest.mark.filterwarnings("ignore:Encountered NaN:UserWarning")
@pytest.mark.parametrize("likelihood", ["bernoulli", "continuous-bernoulli"])
def test_a_huge_learning_rate_never_leaves_nan_parameters(likelihood):
    """lr 1e10 with tanh layers: Adam's second moment overflows on a finite loss (nan parameters before the fix)."""
    for seed in range(3):
        pyro.set_rng_seed(seed)
        vae = build_vae(VAEConfig(16, 4, (32, 32), "tanh", likelihood))
        optimizer = make_optimizer(vae.parameters(), 1e10)
        loss_fn = elbo_loss(vae.model, vae.guide)
        x = binary_data(n=64, p=16, seed=seed)
        with fast_context():
            for _ in range(30):
                before = snapshot(vae)
                try:
                    train_step(loss_fn, optimizer, x)
                except TrainingDiverged:
                    assert_parameters_equal(vae, before)
                    break
        assert all_finite(vae), f"seed {seed}"


def test_train_config_round_trips():
    config = TrainConfig(epochs=3, batch_size=64, lr=5e-4, num_particles=2, seed=9)
    assert TrainConfig(**config.to_dict()) == config


# ---------------------------------------------------------------- checkpoints


def test_save_atomic_writes_a_loadable_file_and_no_temporary(tmp_path):
    path = tmp_path / "checkpoint.pt"
    state = {"epoch": 3, "weights": torch.arange(6.0).reshape(2, 3), "rng": torch.get_rng_state()}
    checkpoint.save_atomic(state, path)
    loaded = checkpoint.load(path)
    assert loaded["epoch"] == 3
    assert torch.equal(loaded["weights"], state["weights"])
    assert torch.equal(loaded["rng"], state["rng"])
    assert os.listdir(tmp_path) == ["checkpoint.pt"]
    checkpoint.save_atomic({"epoch": 4}, path)  # replaces it
    assert checkpoint.load(path) == {"epoch": 4}
    assert os.listdir(tmp_path) == ["checkpoint.pt"]


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()], ids=["oserror", "interrupt"])
def test_a_failed_save_leaves_the_old_checkpoint(tmp_path, monkeypatch, error):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save_atomic({"epoch": 1}, path)

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise error

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(type(error)):
        checkpoint.save_atomic({"epoch": 2}, path)
    monkeypatch.undo()
    assert checkpoint.load(path) == {"epoch": 1}
    assert os.listdir(tmp_path) == ["checkpoint.pt"]


def test_load_of_a_missing_checkpoint_says_so(tmp_path):
    with pytest.raises(PyrovaeError, match="no checkpoint at .*train first"):
        checkpoint.load(tmp_path / "checkpoint.pt")


def test_load_of_a_corrupt_checkpoint_says_so(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"not a torch file")
    with pytest.raises(PyrovaeError, match="cannot read checkpoint"):
        checkpoint.load(path)


# torch.set_flush_denormal reports whether the CPU can flush (SSE3 on x86); False is torch's default
flushes_denormals = pytest.mark.skipif(not torch.set_flush_denormal(False),
                                       reason="torch cannot flush denormal floats on this CPU (x86 without SSE3)")


@flushes_denormals
def test_denormal_floats_are_flushed_to_zero_inside_the_engines_loops_only():
    """Inside ``fast_context`` (nested too, as an evaluation inside training) a float32 below the
    smallest normal number becomes 0, so Adam's moments of a weight that gets no gradient decay to
    exactly 0 instead of lingering as slow denormals; outside, torch's default is back."""
    from pyrovae.context import fast_context
    from pyrovae.step import make_optimizer

    tiny = torch.tensor([1e-40])
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = make_optimizer([weight], 1e-3)

    def step_without_gradient_on_the_second_entry(moment):
        weight.grad = torch.tensor([1.0, 0.0])
        optimizer.step()
        optimizer.state[weight]["exp_avg"][1] = moment  # a moment about to decay below the normal range
        weight.grad = torch.tensor([1.0, 0.0])
        optimizer.step()
        return optimizer.state[weight]["exp_avg"][1].item()

    outside = step_without_gradient_on_the_second_entry(1e-38)
    with fast_context():
        with fast_context():
            pass
        inner_left = (tiny * 1.0).item()
        inside = step_without_gradient_on_the_second_entry(1e-38)
    assert 0 < outside < 1.2e-38  # torch's default: a denormal moment
    assert inner_left == 0.0 and inside == 0.0
    assert (tiny * 1.0).item() > 0


DENORMALS_ACROSS_THREADS = """
import sys, torch
from pyrovae.context import fast_context, flush_denormals_in_every_thread
if sys.argv[1] == "process":
    flush_denormals_in_every_thread()
torch.set_num_threads(2)
x = torch.full((1 << 20,), 1e-39)  # denormal, split between the two threads
(x * 0.5).sum()  # torch starts its thread pool
with fast_context():
    y = x * 0.9 + x
print((y != 0).float().mean().item())
"""


@flushes_denormals
@pytest.mark.parametrize("when, kept", [("process", 0.0), ("loop", 0.5)])
def test_denormal_floats_are_flushed_in_torchs_threads_when_set_before_they_start(when, kept):
    """Set first thing (as the ``pyrovae`` command does), the flag reaches the thread torch starts
    later: no element of a denormal tensor is left. Set only around the loop, the second thread
    keeps its half: what the first case fixes."""
    out = subprocess.run([sys.executable, "-c", DENORMALS_ACROSS_THREADS, when], capture_output=True, text=True, check=True)
    assert float(out.stdout) == kept
