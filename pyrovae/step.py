"""The optimizer step shared by the eager and the captured training paths.

Given a loss whose gradients are in ``.grad``: the divergence checks (a nan or infinite loss or
gradient stops the step before the parameters change), the gradient's norm, clipping, and the update.

Adam's update as tensor operations, for a captured step that takes it inside its graph
(:class:`pyrovae.capture.CapturedStep`): :func:`adam_in_graph` says whether an optimizer's step can
be taken there, :func:`adam_update` takes it.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import torch

from .errors import PyrovaeError


class TrainingDiverged(PyrovaeError):
    """The loss became nan or infinite; the parameters were left as they were before that step."""


def make_optimizer(params, lr: float) -> torch.optim.Adam:
    """Adam, with torch's fused kernel (one pass over all parameters per step)."""
    return torch.optim.Adam(params, lr=lr, fused=True)


def train_step(loss_fn: Callable, optimizer: torch.optim.Optimizer, x: torch.Tensor, *args, clip_grad: float | None = None,
               norms: list | None = None, sync: Callable[[torch.Tensor], float] | None = None) -> float:
    """One optimizer step on the loss at x; returns the loss.

    Raises :class:`TrainingDiverged` before stepping if the loss or a gradient is nan or infinite,
    so the parameters are never corrupted. With ``clip_grad``, the gradient's total norm is clipped
    to it before the step; ``norms``, if given, gets the gradient's norm (before clipping) appended.
    ``sync(loss) -> total loss`` sums the loss and the gradients over processes
    (:func:`pyrovae.distributed.sum_over_processes`) between the backward pass and the checks.
    """
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(x, *args)
    if sync is None:
        value = check_loss(loss.item())
        loss.backward()
    else:  # several processes: every one reaches the collective, and all decide on the sums
        loss.backward()
        value = check_loss(sync(loss))
    return update(optimizer, value, clip_grad, norms)


def check_loss(value: float) -> float:
    """``value``, or :class:`TrainingDiverged` if it is nan or infinite."""
    if not math.isfinite(value):
        raise TrainingDiverged(f"the loss became {value}; the parameters were not updated by that step. Try a smaller `lr`")
    return value


def check_norm(norm_value: float, value: float) -> float:
    """The gradient's norm ``norm_value``, or :class:`TrainingDiverged` if it is nan or infinite (``value``: the loss)."""
    if not math.isfinite(norm_value):
        raise TrainingDiverged(f"the gradient became {norm_value} (loss {value:g}); the parameters were not updated by that step. Try a smaller `lr`")
    return norm_value


def grad_norm(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """The gradients' total 2-norm, ‖g‖ = √(Σ_i ⟨g_i, g_i⟩) over the tensors g_i (0-d, the first
    one's dtype): ``torch.nn.utils.get_total_norm`` up to round-off, with one dot product per
    tensor, which on the CPU takes about a third of its time (0.06 against 0.16 ms for the 0.7 M
    gradients of the benchmark's VAE on 2 threads)."""
    if not grads:
        return torch.zeros(())
    dtype = grads[0].dtype
    return torch.stack([torch.dot(g.reshape(-1), g.reshape(-1)).to(dtype) for g in grads]).sum().sqrt()


def update(optimizer: torch.optim.Optimizer, value: float, clip_grad: float | None = None, norms: list | None = None,
           norm: torch.Tensor | None = None, norm_value: float | None = None) -> float:
    """The optimizer step once the gradients are in ``.grad`` and the loss ``value`` is checked:
    :class:`TrainingDiverged` if their total norm (``norm``, computed from them when None; read as
    ``norm_value`` when given) is not finite, else the norm appended to ``norms``, the gradients
    clipped to ``clip_grad``, the step taken; returns ``value``."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if norm is None:
        norm = grad_norm([p.grad for p in params])
    norm_value = check_norm(norm.item() if norm_value is None else norm_value, value)
    if norms is not None:
        norms.append(norm_value)
    if clip_grad is not None:
        torch.nn.utils.clip_grads_with_norm_(params, clip_grad, norm)
    optimizer.step()
    return value


def clip_coefficient(norm: torch.Tensor, clip_grad: float) -> torch.Tensor:
    """The factor ``torch.nn.utils.clip_grads_with_norm_`` scales gradients of total norm ``norm``
    by: min(1, clip_grad / (norm + 10⁻⁶))."""
    return torch.clamp(clip_grad / (norm + 1e-6), max=1.0)


class InGraphAdam(NamedTuple):
    """What a captured step needs to take an Adam step in its graph (:func:`adam_in_graph`)."""

    key: tuple  # what the graph fixes: per parameter taken, its group's index, β₁, β₂, ε, weight decay and maximize
    lrs: list[float]  # per parameter group, its learning rate (an input of the graph: schedules change it)
    taken: list[int]  # the positions, among the parameters given, of those the optimizer holds with a state
    state: list[torch.Tensor]  # their exp_avg, then their exp_avg_sq, then their step tensors
    stateless: tuple[int, ...]  # the positions of those it holds without one: never stepped (no gradient yet)


def adam_in_graph(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> InGraphAdam | None:
    """How a captured step can take ``optimizer``'s step on ``params`` inside its graph, or None
    where it cannot, and ``optimizer.step()`` must take it.

    It can for exactly ``torch.optim.Adam`` with ``fused=True`` (what :func:`make_optimizer`
    makes), without AMSGrad, ``capturable``, ``differentiable``, decoupled weight decay or step
    hooks, whose parameters among ``params`` share one dtype and device: then the same update is
    computed from the same state tensors (:func:`adam_update`). A parameter's state is made by the
    first ``optimizer.step()`` in which it has a gradient; one still without it is listed in
    ``stateless``, and a step that gives it a gradient must be ``optimizer.step()``'s."""
    from torch.optim import optimizer as optim_module

    if type(optimizer) is not torch.optim.Adam or optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks \
            or optim_module._global_optimizer_pre_hooks or optim_module._global_optimizer_post_hooks:
        return None
    group_of = {}
    for index, group in enumerate(optimizer.param_groups):
        if not group.get("fused") or group["amsgrad"] or group["capturable"] or group["differentiable"] \
                or group.get("decoupled_weight_decay", False):
            return None
        for p in group["params"]:
            group_of[p] = index
    key, taken, stateless, moments, squares, steps = [], [], [], [], [], []
    for i, p in enumerate(params):
        index = group_of.get(p)
        if index is None:
            continue
        state = optimizer.state.get(p)
        if not state or "step" not in state:
            stateless.append(i)
            continue
        group = optimizer.param_groups[index]
        beta1, beta2 = group["betas"]
        key.append((index, float(beta1), float(beta2), float(group["eps"]), float(group["weight_decay"]), bool(group["maximize"])))
        taken.append(i)
        moments.append(state["exp_avg"])
        squares.append(state["exp_avg_sq"])
        steps.append(state["step"])
    if not taken or len({(params[i].dtype, params[i].device) for i in taken}) != 1:
        return None
    return InGraphAdam(tuple(key), [float(group["lr"]) for group in optimizer.param_groups], taken, [*moments, *squares, *steps],
                       tuple(stateless))


def adam_update(key: tuple, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], lrs: Sequence[torch.Tensor],
                state: Sequence[torch.Tensor], ok: torch.Tensor, fused: bool = True) -> None:
    """Adam's step on ``params`` in place, and on its ``state`` (exp_avgs, exp_avg_sqs, steps, as
    :class:`InGraphAdam` lists them), where the 0-d boolean ``ok`` is true; nothing changes where it
    is false. ``key`` is :class:`InGraphAdam`'s; ``lrs`` the groups' learning rates as 0-d float64 tensors.

    Per parameter θ with gradient g: t ← t + 1, m ← β₁ m + (1 − β₁) g, v ← β₂ v + (1 − β₂) g²,
    θ ← θ − lr / (1 − β₁ᵗ) · m / (√v / √(1 − β₂ᵗ) + ε) (first g ← −g with ``maximize``, g ← g + λθ with
    weight decay λ). ``fused``: with torch's own kernel, the one ``Adam(fused=True).step()`` calls,
    on the parameters of each group together, skipped where ``ok`` is false as torch's AMP skips it
    (the values of ``step()``, bit for bit); else written out in tensor operations, and the old
    values kept where ``ok`` is false, for inductor to fuse."""
    n = len(params)
    moments, squares, steps = state[:n], state[n:2 * n], state[2 * n:]
    if fused:
        skipped = (~ok).to(torch.float32)
        together: dict[tuple, list[int]] = {}  # the parameters of one group, in one call
        for i, settings in enumerate(key):
            together.setdefault(settings, []).append(i)
        for (group, beta1, beta2, eps, weight_decay, maximize), members in together.items():
            ps, gs, ms, vs, ts = ([tensors[i] for i in members] for tensors in (params, grads, moments, squares, steps))
            torch._foreach_add_(ts, 1)
            torch._fused_adam_(ps, gs, ms, vs, [], ts, lr=lrs[group], beta1=beta1, beta2=beta2, weight_decay=weight_decay,
                               eps=eps, amsgrad=False, maximize=maximize, found_inf=skipped)
            torch._foreach_sub_(ts, [skipped] * len(ts))
        return
    for (group, beta1, beta2, eps, weight_decay, maximize), p, g, m, v, t in zip(key, params, grads, moments, squares, steps):
        g = -g if maximize else g
        if weight_decay:
            g = g + weight_decay * p
        step = t + 1
        m_new = m.lerp(g, 1 - beta1)
        v_new = v * beta2 + (1 - beta2) * g * g
        bias1 = 1 - torch.pow(beta1, step.to(torch.float64))  # in float64, as torch's kernel: 1 − β₂ᵗ cancels
        bias2 = 1 - torch.pow(beta2, step.to(torch.float64))
        p_new = p - (lrs[group] / bias1) * m_new / (v_new.sqrt() / bias2.sqrt() + eps)
        m.copy_(torch.where(ok, m_new, m))
        v.copy_(torch.where(ok, v_new, v))
        p.copy_(torch.where(ok, p_new, p))
        t.copy_(torch.where(ok, step, t))
