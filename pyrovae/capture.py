"""A training step traced once per batch shape and replayed: Pyro's ``Trace_ELBO`` without Pyro's Python on every step.

For a fixed batch shape, nothing that Pyro's Python decides changes from step to step: the same
sites, plates, distributions and shapes. :class:`CapturedStep` runs the step once under
``make_fx`` (``torch.fx.experimental.proxy_tensor``, real tensors): the guide traced and the model
replayed on it by ``Trace_ELBO``'s own trace code, the loss assembled from those traces, its
gradient taken with ``torch.autograd.grad``. That records every tensor operation of the forward and
backward pass in one graph, which later batches of the same shape replay.

The loss is ``Trace_ELBO``'s surrogate for reparameterized guides, −(1/K) Σ_k [Σ_model log p − Σ_guide log q],
with each site's ``log_prob_sum`` (scaled as Pyro scales it: plates, subsampling) and β on the latent
sites as :class:`pyrovae.objectives.scale_latents` puts it. Its value and gradients are those of
``Trace_ELBO(num_particles=K, vectorize_particles=K > 1, max_plate_nesting=1).differentiable_loss``.

With ``objective="iwae"`` the loss is the IWAE bound's, −Σ_n [logsumexp_i log w_i(x_n) − log k] on
k = ``num_particles`` draws per point, computed by :class:`pyrovae.objectives.Loss` from the
engine's per-site log-weights (:func:`pyrovae.evidence.site_log_probs`); the captured step equals
the eager ``--objective iwae`` step on the same draws. (``iwae-dreg`` is not captured: it runs eagerly.)

The graph's inputs are the batch (and any further tensor arguments of the model and guide), β as a
0-d tensor, and the live parameter tensors themselves, the unconstrained leaves of
:func:`pyrovae.params.trainable`. Nothing is swapped for copies: ``make_fx`` tracks its input
tensors by identity, so every read of a leaf — through an ``nn.Module``, a ``PyroModule``'s
``PyroParam``, a ``pyro.module`` registration or a bare ``pyro.param`` in the param store — becomes
a read of that input, and each replay sees the values the optimizer wrote in place.

Noise: the guide's draws ε are random operations inside the graph (``aten.normal_`` on a fresh
tensor), not constants, so each replay draws fresh noise from torch's generator — on the CPU the
same stream in the same order as the eager step, so a fixed seed reproduces eager training to
round-off. The random state is saved before tracing and restored after it: tracing draws nothing.

A graph bakes in everything that is not an input: Python numbers, the branches the Python took,
tensors that are neither arguments nor parameters (buffers and constants are referenced, so
in-place changes to them are seen; a tensor attribute replaced by a new one is not). Hence one
capture per input signature (shapes, dtypes, devices, non-tensor arguments by value): the smaller
last batch of an epoch gets its own. A model whose Python branches on tensor values cannot be traced
(``make_fx`` refuses to read a value from a traced tensor). The step then runs eagerly (the same
objective, as :func:`pyrovae.step.train_step` runs it), after one logged warning. A model whose Python changes
between calls for other reasons (a counter, a random branch in Python) must not be captured.

Modes (``mode=``; ``benchmarks/train_step.py`` measures each against a hand-written PyTorch step,
and benchmarks/README.md has the numbers):

``"graph"``
    The graph replayed op by op as a ``torch.fx.GraphModule``, without autograd (the backward is in
    the graph); tracing costs well under a second per shape for MLPs. The default on the CPU, with
    the eager step's own noise.
``"inductor"``
    The same graph compiled by inductor: fused kernels, the fastest per step, but
    compiling takes seconds per shape (less from inductor's cache on disk), which pays only over
    long runs. Its noise is its own random stream, not the eager one. Where compiling fails (no C++ compiler), the graph is replayed
    uncompiled after a warning.
``"cuda-graph"``
    The graph captured in a CUDA graph (``torch.cuda.CUDAGraph``) over static input buffers: each
    step copies the batch in and replays one graph, whose random operations draw fresh values on
    every replay. The default on CUDA. Its outputs are static buffers, overwritten by the next call.
    The optimizer step is not captured: the non-finite check must come first, and torch's fused
    Adam is one kernel launch; ``capturable=True`` is allowed, not needed. Not tested on this
    project's CPU-only machines.
``"eager"``
    No capture: the objective (:class:`pyrovae.objectives.Loss`) and autograd on every step.

Checked capture (``check=True``, what ``capture="auto"`` in :class:`pyrovae.train.TrainConfig`
asks for): at each new input signature the fresh graph is replayed once and the eager step is run
on the same draws (torch's generator reset to the same state between the two); the step goes on
captured only if the loss and every gradient agree within float tolerance (1000 ulp of the
largest value) and both drew the same amount of noise. Otherwise it runs eagerly from then on,
after one logged line that says which value differed. A model whose Python reads tensor values is
caught by ``make_fx`` when it is traced; one whose Python takes other branches at another batch
shape, by the check at that shape. The checked step's own update uses the eager result, so
nothing that is optimized depends on the check's outcome. The check compares draws from the same
stream, so it needs a mode that replays the eager noise: ``"graph"`` (and ``"cuda-graph"``, whose
replays draw from the CUDA generator's philox stream at the eager offsets).
"""

from __future__ import annotations

import logging
from typing import Callable, NamedTuple

import torch
from pyro import poutine

from . import graphs
from .context import fast_context
from .errors import PyrovaeError
from .objectives import loss as objective_loss
from .step import check_loss, grad_norm, train_step, update
from .traces import sample_sites

log = logging.getLogger(__name__)

MODES = ("graph", "inductor", "cuda-graph", "eager")
CAPTURED_OBJECTIVES = ("elbo", "mean-field", "iwae")  # what CapturedStep computes; "iwae-dreg" runs eagerly


def default_mode(device: torch.device | str) -> str:
    """The mode measured fastest on ``device`` over a run: ``"cuda-graph"`` on CUDA, ``"graph"`` elsewhere."""
    return "cuda-graph" if torch.device(device).type == "cuda" else "graph"


class StepResult(NamedTuple):
    loss: torch.Tensor  # −ELBO summed over the batch (0-d; β-weighted when β ≠ 1)
    grads: list[torch.Tensor | None]  # one per parameter, in the order given; None where the loss does not use it
    norm: torch.Tensor  # the gradients' total 2-norm (pyrovae.step.grad_norm)


class CapturedStep:
    """The gradient step of Pyro's ``Trace_ELBO`` on (model, guide), traced once per input signature
    and replayed; see the module docstring.

    ``params`` is name → unconstrained leaf tensor, as :func:`pyrovae.params.trainable` returns it
    (the parameters ``SVI`` would train; the optimizer holds the same tensors). ``beta`` scales the
    latent sites' log-densities and may be changed between calls (KL warm-up) without a new capture.

    ``step(optimizer, x)`` is :func:`pyrovae.step.train_step` with the captured graph: the same
    loss, gradients, non-finite check and clipping. Calling it, ``captured(x)``, returns
    ``(loss, grads, norm)`` without touching ``.grad`` or the optimizer.

    ``check``: compare each new capture with the eager step on its first batch and run eagerly,
    after one logged line, where they differ (see the module docstring).
    """

    def __init__(self, model: Callable, guide: Callable, params: dict[str, torch.Tensor], num_particles: int = 1,
                 beta: float = 1.0, mode: str | None = None, objective: str = "elbo", check: bool = False):
        if objective not in CAPTURED_OBJECTIVES:
            raise PyrovaeError(f"a captured step computes the objectives {', '.join(CAPTURED_OBJECTIVES)}, not {objective!r}")
        if num_particles < 1:
            raise PyrovaeError(f"the number of particles must be at least 1, got {num_particles}")
        self.model, self.guide = model, guide
        self.params = dict(params)
        self._leaves = list(self.params.values())
        device = self._leaves[0].device if self._leaves else torch.device("cpu")
        self.mode = mode or default_mode(device)
        if self.mode not in MODES:
            raise PyrovaeError(f"unknown capture mode {self.mode!r}; known: {', '.join(MODES)}")
        if self.mode == "cuda-graph" and not torch.cuda.is_available():
            raise PyrovaeError("capture mode 'cuda-graph' needs CUDA, which is not available here: use mode='graph'")
        if check and self.mode == "inductor":
            raise PyrovaeError("a checked capture compares the graph with the eager step on the same draws, which "
                               "mode 'inductor' does not make (its noise is its own stream): use mode='graph'")
        self.check = check
        self.num_particles = num_particles
        self.beta = beta
        self.objective = objective
        self._eager_loss = objective_loss(objective, model, guide, num_particles, beta)
        self.captures: dict[tuple, Callable] = {}  # input signature → the replayed step
        self.graphs: dict[tuple, torch.fx.GraphModule] = {}  # input signature → the traced graph
        self.failure: str | None = None  # why capture failed (the step then runs eagerly)
        self._beta_tensor: tuple[float, torch.Tensor | None] = (beta, None)

    @property
    def eager(self) -> bool:
        return self.mode == "eager" or self.failure is not None

    # the loss, from Pyro's traces

    def surrogate(self, args: tuple, beta: torch.Tensor | float) -> torch.Tensor:
        """The objective's loss at ``model(*args)``/``guide(*args)`` with β = ``beta``: the eager
        objective's own function (:class:`pyrovae.objectives.Loss`), which is what the graph records."""
        return self._eager_loss(*args, beta=beta)

    def _grad_step(self, x: torch.Tensor, args: tuple, beta: torch.Tensor | float, leaves) -> tuple:
        """(loss and norm as one float64 pair, loss, norm, grads): the function the graph records."""
        loss = self.surrogate((x, *args), beta)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        # the layout loss.backward() would give .grad: the parameter's own strides
        grads = [g if g is None or g.stride() == p.stride() else torch.empty_like(p).copy_(g) for g, p in zip(grads, leaves)]
        present = [g for g in grads if g is not None]
        norm = grad_norm(present) if present else torch.zeros((), dtype=loss.dtype, device=loss.device)
        check = torch.stack([loss.detach().to(torch.float64), norm.to(torch.float64)])
        return check, loss.detach(), norm, grads

    # signatures and captures

    def _split(self, x, args) -> tuple[tuple, list[torch.Tensor], list]:
        """(signature, tensor inputs, arguments with tensors replaced by their input positions)."""
        key, tensors, template = [self.mode, torch.get_default_dtype()], [], []
        for a in (x, *args):
            if isinstance(a, torch.Tensor):
                key.append((tuple(a.shape), a.dtype, a.device))
                template.append(_Input(len(tensors)))
                tensors.append(a)
            else:
                key.append(("value", a))
                template.append(a)
        key = tuple(key)
        hash(key)  # a TypeError here: an argument that cannot key a capture
        return key, tensors, template

    def _beta(self, like: torch.Tensor) -> torch.Tensor:
        """β as a 0-d tensor of the parameters' dtype and device, refilled only when it changes."""
        beta = float(self.beta)
        if not beta >= 0:
            raise PyrovaeError(f"beta must be at least 0, got {beta}")
        ref = self._leaves[0] if self._leaves else like
        value, tensor = self._beta_tensor
        if tensor is None or tensor.dtype != ref.dtype or tensor.device != ref.device:
            tensor = torch.tensor(beta, dtype=ref.dtype, device=ref.device)
        elif value != beta:
            tensor.fill_(beta)
        self._beta_tensor = beta, tensor
        return tensor

    def _capture(self, key: tuple, template: list, tensors: list[torch.Tensor], beta: torch.Tensor) -> Callable:
        n = len(tensors)

        def traced(*inputs):
            data, beta, leaves = inputs[:n], inputs[n], inputs[n + 1:]
            x, *args = [data[a.index] if isinstance(a, _Input) else a for a in template]
            return self._grad_step(x, tuple(args), beta, leaves)

        with graphs.preserved_rng([*tensors, *self._leaves]):  # the check runs the guide: give its draws back
            self._check_reparameterized(template, tensors)
            if self.check:  # what the objective sets up on its first call is done before the comparison
                x, *args = [tensors[a.index] if isinstance(a, _Input) else a for a in template]
                with torch.no_grad(), fast_context():
                    self._eager_loss(x, *args, beta=beta)
        with fast_context(), torch.enable_grad():
            graph = graphs.trace(traced, *tensors, beta, *self._leaves)
        if self.mode == "graph":  # replayed op by op: what depends on no input (the prior's constants) computed once
            graph = graphs.fold_constants(graph)
        replay = graphs.replay(graph, self.mode, [*tensors, beta], self._leaves, what="captured step")
        self.graphs[key] = graph
        return replay

    def _check_reparameterized(self, template: list, tensors: list[torch.Tensor]) -> None:
        """ValueError naming a guide site without reparameterized sampling: its gradient has a
        score-function term, which the eager step computes and the captured one does not."""
        x, *args = [tensors[a.index] if isinstance(a, _Input) else a for a in template]
        with torch.no_grad(), fast_context():
            guide_trace = poutine.trace(self.guide).get_trace(x, *args)
        for name, site in sample_sites(guide_trace):
            if not site["fn"].has_rsample:
                raise ValueError(f"guide site {name!r} is not reparameterized (its gradient has a score-function term)")

    def __call__(self, x: torch.Tensor, *args) -> StepResult:
        """Loss, gradients and their norm at ``x``, from the capture for its signature (traced on
        first sight of it), or eagerly where capture failed. ``.grad`` is left alone."""
        return self._run(x, args)[1]

    def _run(self, x: torch.Tensor, args: tuple) -> tuple[torch.Tensor | None, StepResult]:
        """(loss and norm as one float64 pair from the graph, or None when eager; the result)."""
        if not self.eager:
            try:
                key, tensors, template = self._split(x, args)
            except TypeError as e:
                self._give_up(f"an argument cannot key a capture ({e})")
            else:
                beta = self._beta(x)
                replay = self.captures.get(key)
                if replay is None:
                    try:
                        replay = self.captures[key] = self._capture(key, template, tensors, beta)
                    except Exception as e:  # data-dependent control flow, an operation make_fx cannot trace, ...
                        message = str(e).strip()
                        self._give_up(f"{type(e).__name__}: {message.splitlines()[0] if message else ''}")
                    else:
                        if self.check:
                            return None, self._checked(replay, tensors, beta, x, args)
                if replay is not None:
                    with torch.no_grad():
                        check, loss, norm, grads = replay(*tensors, beta)
                    return check, StepResult(loss, list(grads), norm)
        return None, self._eager(x, args)

    def _eager(self, x: torch.Tensor, args: tuple) -> StepResult:
        self._eager_loss.beta = self.beta
        loss = self._eager_loss(x, *args)
        grads = list(torch.autograd.grad(loss, self._leaves, allow_unused=True))
        present = [g for g in grads if g is not None]
        norm = grad_norm(present)
        return StepResult(loss.detach(), grads, norm)

    def _checked(self, replay: Callable, tensors: list[torch.Tensor], beta: torch.Tensor, x: torch.Tensor,
                 args: tuple) -> StepResult:
        """The eager step's result at ``x``, after comparing it with the new capture's replay on the
        same draws; where they differ, capture is given up (with the reason logged)."""
        devices = [*tensors, *self._leaves]
        with graphs.preserved_rng(devices):
            with torch.no_grad():
                _, loss, norm, grads = replay(*tensors, beta)
            captured = StepResult(loss.clone(), [None if g is None else g.clone() for g in grads], norm.clone())
            drawn = graphs.rng_states(devices)
        eager = self._eager(x, args)
        reason = disagreement(captured, eager, list(self.params))
        if reason is None and not graphs.same_rng_states(drawn, graphs.rng_states(devices)):
            reason = "the captured step drew a different amount of noise than the eager step"
        if reason is not None:
            self._give_up(f"on a batch of shape {tuple(x.shape)}, {reason}")
        return eager

    def _give_up(self, reason: str) -> None:
        self.failure = reason
        self.captures.clear()
        self.graphs.clear()
        log.warning("the training step could not be captured and runs eagerly instead: %s", reason)

    def step(self, optimizer: torch.optim.Optimizer, x: torch.Tensor, *args, clip_grad: float | None = None,
             norms: list | None = None, sync: Callable[[torch.Tensor], float] | None = None) -> float:
        """One optimizer step on the loss at ``x``; returns the loss. :func:`pyrovae.step.train_step`
        with the captured graph, the same arguments and checks: raises
        :class:`~pyrovae.step.TrainingDiverged` before stepping if the loss or the gradient norm is
        not finite (one host sync reads both), appends the norm to ``norms``, clips the gradient's
        total norm to ``clip_grad``; ``sync(loss)`` sums the loss and the ``.grad``s over processes."""
        if self.eager:
            self._eager_loss.beta = self.beta
            return train_step(self._eager_loss, optimizer, x, *args, clip_grad=clip_grad, norms=norms, sync=sync)
        optimizer.zero_grad(set_to_none=True)
        check, (loss, grads, norm) = self._run(x, args)
        for p, g in zip(self._leaves, grads):
            p.grad = g
        if sync is not None:  # several processes: every one reaches the collective, and all decide on the sums
            return update(optimizer, check_loss(sync(loss)), clip_grad, norms)
        if check is None:  # capture failed just now: the result is eager
            check = torch.stack([loss.to(torch.float64), norm.to(torch.float64)])
        value, norm_value = check.tolist()
        return update(optimizer, check_loss(value), clip_grad, norms, norm, norm_value)


def disagreement(captured: StepResult, eager: StepResult, names: list[str]) -> str | None:
    """What differs between two step results beyond float tolerance (1000 ulp of the largest value
    of each tensor), or None where they agree."""
    def close(a: torch.Tensor, b: torch.Tensor) -> bool:
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if not (torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf()) and torch.equal(a[a.isinf()], b[b.isinf()])):
            return False  # nan, inf and −inf at the same places
        finite = a.isfinite()
        if not finite.any():
            return True
        scale = b[finite].abs().max()
        return bool(((a[finite] - b[finite]).abs().max() <= 1000 * torch.finfo(b.dtype).eps * scale).item())

    if not close(captured.loss, eager.loss):
        return f"the captured loss {captured.loss.item():.9g} differs from the eager loss {eager.loss.item():.9g}"
    for name, a, b in zip(names, captured.grads, eager.grads):
        if (a is None) != (b is None):
            return f"the gradient of parameter {name!r} is {'missing' if a is None else 'present'} in the captured step only"
        if a is not None and not close(a, b):
            return f"the gradient of parameter {name!r} differs (largest difference {(a - b).abs().max().item():.3g})"
    return None


class _Input(NamedTuple):
    index: int  # position among the tensor inputs
