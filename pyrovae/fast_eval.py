"""The evaluation pass traced once per shape and replayed: per-point log-weights without Pyro's Python.

    log w_k(x_n) = log p(x_n, z_k) − log q(z_k | x_n),   z_k ~ q(· | x_n),   shape (K, N)

as :func:`pyrovae.evidence.site_log_probs` computes it — the guide under the particle plate, the
model replayed on its draws, every site's unscaled log-density from its own Pyro distribution — run
once under ``make_fx`` (:func:`pyrovae.graphs.trace`) for each signature (K, the shape, dtype and
device of x) and replayed (:func:`pyrovae.graphs.replay`). The replay calls the same ATen
operations without Pyro's tracing, handlers and distribution objects.

The graph's inputs are x and the parameters' unconstrained leaves (:func:`pyrovae.params.trainable`),
so a graph stays right when the parameters change in place or are replaced by tensors of the same
shape; graphs are kept across calls (the last :data:`CACHE_SIZE` signatures), keyed by the model,
the guide and the identities of those leaves.

Modes: ``"graph"`` replays op by op; ``"inductor"`` compiles the graph with ``torch.compile``
(seconds per signature, cached on disk by inductor) and fuses the costly part, the observed site's
log-density over K × N × P values, into the decoder's last operations. Both draw the guide's noise
as the eager pass does (inductor with ``fallback_random``: torch's generator, in the eager order),
so the same seed gives the same draws.

Each new graph is checked before use: it is replayed once and the eager pass run on the same draws;
where the log-weights differ beyond float tolerance (a model whose Python takes another branch
than the one traced), or the two drew different amounts of noise, the signature is evaluated
eagerly from then on, after one logged line. That first call returns the eager result. Memory is
that of one chunk: callers pass K a chunk of particles at a time.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Callable

import torch

from . import graphs
from .context import fast_context
from .errors import PyrovaeError
from .evidence import site_log_probs
from .params import trainable

log = logging.getLogger(__name__)

MODES = ("graph", "inductor")
CACHE_SIZE = 16  # graphs kept across calls, by signature
_CACHE: OrderedDict[tuple, Callable | None] = OrderedDict()  # signature → replay, or None: eager (the check failed)


def eager_log_weights(model: Callable, guide: Callable, x: torch.Tensor, num_particles: int) -> torch.Tensor:
    """log w (K, N) from Pyro's traces: :func:`pyrovae.evidence.site_log_probs`'s ``log_w``."""
    with torch.no_grad(), fast_context():
        return site_log_probs(model, guide, x, num_particles, analytic_kl=False).log_w


def tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of the check: float32 log-weights are sums of hundreds of terms, which
    fused kernels add in another order."""
    return 1e-4 if dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-10


def disagreement(captured: torch.Tensor, eager: torch.Tensor) -> str | None:
    """Where the log-weights differ beyond :func:`tolerance` (relative to max(1, |eager|)), or None."""
    if captured.shape != eager.shape:
        return f"shape {tuple(captured.shape)} instead of {tuple(eager.shape)}"
    if not torch.equal(captured.isnan(), eager.isnan()) or not torch.equal(captured.isinf(), eager.isinf()):
        return "non-finite values at other places"
    finite = eager.isfinite()
    gap = ((captured - eager).abs() / eager.abs().clamp(min=1))[finite]
    if gap.numel() and gap.max() > tolerance(eager.dtype):
        return f"log-weights differ by up to {gap.max().item():.3g} (relative)"
    if not torch.equal(captured[~finite], eager[~finite]):
        return "infinite values of other signs"
    return None


class CapturedLogWeights:
    """log w (K, N) for (model, guide), each signature traced once, checked, and replayed in ``mode``.

    ``weights(x, K)`` draws K particles per point of x, as :func:`eager_log_weights` does, from the
    same stream. The parameters are looked up once, on the first call."""

    def __init__(self, model: Callable, guide: Callable, mode: str = "graph"):
        if mode not in MODES:
            raise PyrovaeError(f"unknown capture mode {mode!r} for the evaluation pass; known: {', '.join(MODES)}")
        self.model, self.guide, self.mode = model, guide, mode
        self._leaves: list[torch.Tensor] | None = None
        self.failures: dict[tuple, str] = {}  # signature → why it runs eagerly

    def leaves(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self._leaves is None:
            with graphs.preserved_rng([x]), torch.no_grad(), fast_context():  # the lookup runs the guide: give its draws back
                self._leaves = list(trainable(self.model, self.guide, x[:1]).values())
        return self._leaves

    def signature(self, x: torch.Tensor, num_particles: int) -> tuple:
        leaves = self.leaves(x)
        return (self.model, self.guide, self.mode, num_particles, tuple(x.shape), x.dtype, x.device,
                torch.get_default_dtype(), tuple(id(p) for p in leaves))

    def __call__(self, x: torch.Tensor, num_particles: int) -> torch.Tensor:
        key = self.signature(x, num_particles)
        if key in _CACHE:
            _CACHE.move_to_end(key)
            replay = _CACHE[key]
            if replay is None:
                return eager_log_weights(self.model, self.guide, x, num_particles)
            with torch.no_grad():
                return replay(x)
        replay, result = self._capture(key, x, num_particles)
        _CACHE[key] = replay
        while len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
        return result

    def _capture(self, key: tuple, x: torch.Tensor, num_particles: int) -> tuple[Callable | None, torch.Tensor]:
        """(the replay, or None where it cannot be used; the eager result at x)."""
        leaves = self.leaves(x)

        def log_w(x, *leaves):
            return site_log_probs(self.model, self.guide, x, num_particles, analytic_kl=False).log_w

        try:
            with torch.no_grad(), fast_context():
                graph = graphs.trace(log_w, x, *leaves)
            replay = graphs.replay(graph, self.mode, [x], leaves, what="evaluation pass", eager_noise=True)
            with graphs.preserved_rng([x]), torch.no_grad():
                captured = replay(x).clone()
                drawn = graphs.rng_states([x])
        except Exception as e:  # data-dependent control flow, an operation make_fx cannot trace, ...
            message = str(e).strip()
            return self._give_up(key, f"{type(e).__name__}: {message.splitlines()[0] if message else ''}"), \
                eager_log_weights(self.model, self.guide, x, num_particles)
        eager = eager_log_weights(self.model, self.guide, x, num_particles)
        reason = disagreement(captured, eager)
        if reason is None and not graphs.same_rng_states(drawn, graphs.rng_states([x])):
            reason = "the traced pass drew a different amount of noise than the eager one"
        return (replay if reason is None else self._give_up(key, reason)), eager

    def _give_up(self, key: tuple, reason: str) -> None:
        self.failures[key] = reason
        log.warning("the evaluation pass could not be captured for %d particles on %s points and runs eagerly instead: %s",
                    key[3], key[4][0] if key[4] else 1, reason)


def clear_cache() -> None:
    """Forget every kept graph (they hold references to models, guides and parameters)."""
    _CACHE.clear()


__all__ = ["CACHE_SIZE", "MODES", "CapturedLogWeights", "clear_cache", "disagreement", "eager_log_weights", "tolerance"]
