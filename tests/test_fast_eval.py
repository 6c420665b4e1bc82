"""The captured evaluation pass (pyrovae.fast_eval) against the eager log-weights of pyrovae.evidence.

Same seed, same draws: the graph draws the guide's ε inside it from torch's generator in the eager
order, so the log-weights agree value for value (float64 round-off), and evaluate's estimates with
and without capture agree.
"""

import logging
from pathlib import Path

import pyro
import pytest
import torch

from pyrovae import factory, fast_eval, graphs
from pyrovae.evaluate import evaluate
from pyrovae.fast_eval import CapturedLogWeights, eager_log_weights
from pyrovae.models import vae

TOL = {"rtol": 1e-10, "atol": 1e-10}
STYLES = Path(__file__).parent / "models" / "styles.py"


def style(name):
    return lambda: factory.load(f"{STYLES}:{name}")(64)


Alternating = factory.load(f"{STYLES}:Alternating")  # a model whose Python branch changes on every call


MODELS = {
    "vae": lambda: vae(64, latent_dim=4, hidden=(32,)),
    "bare-constrained-param": style("bare_param"),
    "two-latent-sites": style("hierarchical"),
    "pyro-module": style("pyro_module"),
}


def data(n=5, p=64, seed=0):
    return torch.bernoulli(torch.rand(n, p, generator=torch.Generator().manual_seed(seed)))


@pytest.fixture(autouse=True)
def fresh_cache():
    fast_eval.clear_cache()
    yield
    fast_eval.clear_cache()


@pytest.mark.parametrize("name", list(MODELS))
def test_captured_log_weights_equal_the_eager_ones_on_the_same_draws(float64, name):
    x = data()
    model = MODELS[name]()
    captured = CapturedLogWeights(model.model, model.guide)
    for seed in (1, 2, 3):  # the first call traces and checks, the others replay
        pyro.set_rng_seed(seed)
        log_w = captured(x, 7)
        after = torch.get_rng_state()
        pyro.set_rng_seed(seed)
        expected = eager_log_weights(model.model, model.guide, x, 7)
        assert torch.equal(after, torch.get_rng_state())  # the same draws, no more
        assert log_w.shape == (7, 5)
        torch.testing.assert_close(log_w, expected, **TOL)
    assert not captured.failures and len(fast_eval._CACHE) == 1


def test_evaluate_with_and_without_capture_gives_the_same_estimates(float64):
    x = data(n=6)
    model = MODELS["vae"]()
    results = [evaluate(model.model, model.guide, x, num_samples=50, iwae_ks=(1, 5), particles_elbo=3, batch_size=4,
                        chunk_size=20, capture=capture, seed=0) for capture in (True, False)]
    captured, eager = results
    for a, b in [(captured.log_px, eager.log_px), (captured.iwae[5], eager.iwae[5]), (captured.elbo, eager.elbo)]:
        torch.testing.assert_close(a.value, b.value, **TOL)
        torch.testing.assert_close(a.stderr, b.stderr, **TOL)
    torch.testing.assert_close(captured.khat, eager.khat, **TOL, equal_nan=True)
    # memory flat in K: graphs of a chunk, never of K; the batches of 4 and 2 points, chunks of 20 and 10
    shapes = sorted((key[3], key[4]) for key in fast_eval._CACHE)
    assert shapes == [(10, (2, 64)), (10, (4, 64)), (20, (2, 64)), (20, (4, 64))]


def test_each_signature_is_traced_once_and_parameters_are_inputs(float64, monkeypatch):
    traced = []
    real_trace = graphs.trace
    monkeypatch.setattr(graphs, "trace", lambda *a, **k: traced.append(a[1].shape) or real_trace(*a, **k))
    x = data()
    model = MODELS["vae"]()
    for _ in range(3):
        CapturedLogWeights(model.model, model.guide)(x, 7)  # a new object each time, as evaluate makes one per call
    assert traced == [x.shape]
    with torch.no_grad():  # a change in place, as an optimizer makes it, is seen by the graph
        next(model.parameters()).mul_(1.5)
    pyro.set_rng_seed(4)
    log_w = CapturedLogWeights(model.model, model.guide)(x, 7)
    pyro.set_rng_seed(4)
    torch.testing.assert_close(log_w, eager_log_weights(model.model, model.guide, x, 7), **TOL)
    assert traced == [x.shape]


def test_a_pass_that_differs_from_the_eager_one_runs_eagerly_after_one_line(float64, caplog):
    x = data()
    model = Alternating()
    captured = CapturedLogWeights(model.model, model.guide)
    with caplog.at_level(logging.WARNING, logger="pyrovae.fast_eval"):
        captured(x, 7)
        for calls in (4, 5):
            pyro.set_rng_seed(calls)
            model.calls = calls
            log_w = captured(x, 7)
            pyro.set_rng_seed(calls)
            model.calls = calls
            torch.testing.assert_close(log_w, eager_log_weights(model.model, model.guide, x, 7), **TOL)
    lines = [r.getMessage() for r in caplog.records if r.name == "pyrovae.fast_eval"]
    assert len(lines) == 1 and "runs eagerly" in lines[0] and "differ" in lines[0], lines
    assert list(fast_eval._CACHE.values()) == [None]


@pytest.mark.parametrize("broken, message", [("values", "log-weights differ"), ("noise", "different amount of noise")])
def test_the_check_catches_a_broken_graph(float64, monkeypatch, broken, message):
    """The check is shown to fail: a replay whose log-weights are off by 1e-6 relative, or which
    draws one number more than the eager pass."""
    real_replay = graphs.replay

    def broken_replay(*a, **k):
        run = real_replay(*a, **k)

        def replay(*inputs):
            log_w = run(*inputs)
            if broken == "noise":
                torch.rand(1)
                return log_w
            return log_w * (1 + 1e-6)

        return replay

    monkeypatch.setattr(graphs, "replay", broken_replay)
    x = data()
    model = MODELS["vae"]()
    captured = CapturedLogWeights(model.model, model.guide)
    captured(x, 7)
    (reason,) = captured.failures.values()
    assert message in reason


def test_untraceable_models_are_evaluated_eagerly(float64, caplog):
    """A model whose Python reads a tensor's value: make_fx refuses, and the eager pass is used."""

    class DataDependent(Alternating):
        def flipped(self, x, z) -> bool:
            return not z.sum() > 0

    x = data()
    model = DataDependent()
    captured = CapturedLogWeights(model.model, model.guide)
    with caplog.at_level(logging.WARNING, logger="pyrovae.fast_eval"):
        pyro.set_rng_seed(1)
        log_w = captured(x, 7)
    pyro.set_rng_seed(1)
    torch.testing.assert_close(log_w, eager_log_weights(model.model, model.guide, x, 7), **TOL)
    assert len(captured.failures) == 1 and "runs eagerly" in caplog.records[-1].getMessage()


@pytest.mark.slow
def test_inductor_mode_gives_the_eager_draws_to_float_tolerance():
    """torch.compile of the same graph, its random draws made with torch's generator: the eager
    pass's log-weights to float32 round-off (fused sums add in another order)."""
    x = data()
    model = MODELS["vae"]()
    captured = CapturedLogWeights(model.model, model.guide, "inductor")
    for seed in (1, 2):
        pyro.set_rng_seed(seed)
        log_w = captured(x, 300)
        pyro.set_rng_seed(seed)
        expected = eager_log_weights(model.model, model.guide, x, 300)
        assert fast_eval.disagreement(log_w, expected) is None
        torch.testing.assert_close(log_w, expected, rtol=1e-5, atol=1e-4)
    assert not captured.failures


def test_unfuse_bias_writes_each_linear_layer_as_a_product_plus_its_bias():
    """The graph inductor compiles on the CPU: every ``addmm(b, A, B)`` of a traced MLP becomes
    ``mm(A, B) + b``, with the same values (float64) and its constants still shared with the
    original graph (an in-place change to a buffer is seen by both)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()
    scale = torch.ones(2, dtype=torch.float64)  # a constant of the graph, not an input

    def f(x, *params):
        w1, b1, w2, b2 = params
        return torch.nn.functional.linear(torch.tanh(torch.nn.functional.linear(x, w1, b1)), w2, b2) * scale

    x, params = torch.randn(5, 3, dtype=torch.float64), [p.detach() for p in net.parameters()]
    graph = graphs.trace(f, x, *params)
    unfused = graphs.unfuse_bias(graph)

    def count(g, op):
        return sum(n.target is op for n in g.graph.nodes)

    aten = torch.ops.aten
    assert count(graph, aten.addmm.default) == 2 and count(graph, aten.mm.default) == 0
    assert count(unfused, aten.addmm.default) == 0 and count(unfused, aten.mm.default) == 2
    torch.testing.assert_close(unfused(x, *params), graph(x, *params), rtol=1e-12, atol=1e-12)
    scale.fill_(3.0)
    torch.testing.assert_close(unfused(x, *params), f(x, *params), rtol=1e-12, atol=1e-12)
