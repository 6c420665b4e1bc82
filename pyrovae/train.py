"""Training by stochastic variational inference with Pyro's ``Trace_ELBO``.

The loss is Pyro's reparameterized ELBO estimator, −ELBO = −E_q[log p(x, z) − log q(z | x)],
summed over the minibatch as ``SVI(model, guide, optim, Trace_ELBO()).step(x)`` returns it (or
another objective of :mod:`pyrovae.objectives`). Each step differentiates that surrogate, built from
Pyro's own traces, and steps one ``torch.optim.Adam`` (:mod:`pyrovae.step`) over exactly the
parameters ``SVI`` would train (found as ``SVI`` finds them, :mod:`pyrovae.params`):
the same loss and gradients as ``SVI`` with ``pyro.optim.Adam`` (which keeps one optimizer per
parameter), with the state saved and resumed as torch state dicts.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from . import contract, params as parameters
from .capture import CAPTURED_OBJECTIVES, CapturedStep
from .context import fast_context
from .errors import PyrovaeError
from .latents import active_units, kl_per_site, latent_means
from .objectives import elbo_loss, loss as objective_loss, warmup_scale
from .step import TrainingDiverged, make_optimizer, train_step

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """How :func:`fit` trains: the settings of ``pyrovae train``, recorded in a run's ``config.json``.

    Attributes:
        epochs: the last epoch to train (a resumed run trains epochs ``start_epoch + 1 … epochs``).
        batch_size: data points per step.
        lr: the learning rate of Adam over every parameter ``SVI`` would train.
        num_particles: draws of z per data point in each step's estimate (the k of the IWAE objectives).
        seed: seeds the parameters' initialization, the batches' order, the binarization and the draws.
        objective: ``"elbo"`` (Pyro's ``Trace_ELBO``), ``"mean-field"`` (closed-form KL where it is
            the site's term), ``"iwae"`` (the bound L_k, k = ``num_particles``) or ``"iwae-dreg"``
            (the same bound, doubly reparameterized gradient): :mod:`pyrovae.objectives`.
        beta: β, the scale of the latent sites' log-densities log p(z) and log q(z|x): for the ELBO,
            E_q[log p(x|z)] − β KL(q(z|x) ‖ p(z)) (β-VAE); 1 is the plain objective.
        warmup_epochs: β rises linearly from 0 to ``beta`` over these epochs (KL warm-up; 0: none).
        clip_grad: clip the gradient's total norm to this value (None: no clipping).
        skip_nonfinite: steps with a non-finite loss or gradient skipped, over the whole run, before
            training stops with an error (0: stop at the first).
        lr_schedule: ``"none"``, ``"cosine"`` (to 0 at the last epoch) or ``"plateau"`` (the rate
            halved after 5 epochs without a better validation ELBO).
        early_stopping: stop after this many epochs without a better validation ELBO (None: never).
        capture: trace the step once per batch shape and replay it (:mod:`pyrovae.capture`, for the
            objectives of ``CAPTURED_OBJECTIVES``): ``"auto"`` checks each capture against the eager
            step on its first batch; True takes the device's default mode unchecked; a mode of
            ``pyrovae.capture.MODES`` (``"graph"``, ``"inductor"``, ``"cuda-graph"``, ``"eager"``);
            False trains eagerly.
    """

    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3  # Adam learning rate
    num_particles: int = 1  # draws of z per data point in each estimate (k of the IWAE objectives)
    seed: int = 0
    objective: str = "elbo"  # elbo, mean-field, iwae or iwae-dreg (pyrovae.objectives)
    beta: float = 1.0  # scale of the latent sites' log-densities (β-VAE); 1 is the plain objective
    warmup_epochs: float = 0  # β rises linearly from 0 over these epochs (KL warm-up)
    clip_grad: float | None = None  # clip the gradient's total norm to this (None: no clipping)
    skip_nonfinite: int = 0  # steps with a non-finite loss or gradient skipped before training stops
    lr_schedule: str = "none"  # none, cosine (to 0 at the last epoch) or plateau (halve after 5 epochs without progress)
    early_stopping: int | None = None  # stop after this many epochs without a better validation ELBO
    capture: bool | str = "auto"  # trace the step once per batch shape and replay it (pyrovae.capture; CAPTURED_OBJECTIVES):
    # "auto" checks each capture against the eager step on its first batch, True takes the device's default mode unchecked,
    # or a mode of pyrovae.capture.MODES; False: eager

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Progress:
    """Where training stands: ``epoch`` in progress (1-based), ``step`` steps done in it, and the
    sums its metrics are made of; saved in mid-epoch checkpoints so a resumed epoch ends as an
    uninterrupted one would."""

    epoch: int = 1
    step: int = 0
    total: float = 0.0  # −loss summed over the epoch's steps
    count: int = 0  # data points seen in the epoch
    seconds: float = 0.0
    skipped: int = 0  # non-finite steps skipped in the whole run
    grad_norm_sum: float = 0.0  # gradient norms summed over the epoch's finite steps
    grad_steps: int = 0  # the epoch's finite steps

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Monitor:
    """The best validation ELBO so far, for ``best.pt`` and early stopping (saved in checkpoints)."""

    best: float = -math.inf
    best_epoch: int = 0
    epochs_without_progress: int = 0

    def update(self, epoch: int, value: float) -> bool:
        """Record an epoch's validation ELBO; True if it is the best so far."""
        if value > self.best:
            self.best, self.best_epoch, self.epochs_without_progress = value, epoch, 0
            return True
        self.epochs_without_progress += 1
        return False

    def to_dict(self) -> dict:
        return asdict(self)


LR_SCHEDULES = ("none", "cosine", "plateau")
COLLAPSE_KL, COLLAPSE_EPOCHS = 0.01, 5  # a latent site whose KL stays below this (nats per point) for this many epochs is reported


def latent_use(module: nn.Module, x: torch.Tensor) -> dict:
    """What each latent site carries on held-out x: ``kl`` {site: KL(q ‖ p) nats per point}
    (:func:`pyrovae.latents.kl_per_site`), ``active_units`` {site: number of active dimensions} and
    ``latent_dims`` {site: dimensions} (:func:`pyrovae.latents.active_units`, Burda et al. 2016;
    these two need at least 2 points)."""
    use = {"kl": kl_per_site(module.model, module.guide, x)}
    if len(x) >= 2:  # activity is a variance over points
        means = latent_means(module.guide, x)
        use["active_units"] = {site: int(active_units(m)[1].sum()) for site, m in means.items()}
        use["latent_dims"] = {site: m.shape[1] for site, m in means.items()}
    return use


@dataclass
class CollapseWatch:
    """Posterior collapse, said once per site: a latent site whose KL(q ‖ p) stays below ``threshold``
    nats per point for ``epochs`` epochs in a row carries (almost) no information about x."""

    threshold: float = COLLAPSE_KL
    epochs: int = COLLAPSE_EPOCHS
    low: dict = field(default_factory=dict)  # site → epochs in a row below the threshold
    reported: set = field(default_factory=set)

    def update(self, epoch: int, kl: dict[str, float]) -> list[str]:
        """Record an epoch's KL per site; log and return the sites found inactive now."""
        found = []
        for site, value in kl.items():
            self.low[site] = self.low.get(site, 0) + 1 if value < self.threshold else 0
            if self.low[site] >= self.epochs and site not in self.reported:
                self.reported.add(site)
                found.append(site)
                log.warning("latent site %r is inactive (KL %.4g nats per point for %d epochs, to epoch %d): posterior collapse",
                            site, value, self.low[site], epoch)
        return found


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig):
    """The learning-rate schedule, stepped once per epoch (None for a constant rate)."""
    if config.lr_schedule == "none":
        return None
    if config.lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    if config.lr_schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=5)
    raise PyrovaeError(f"unknown learning-rate schedule {config.lr_schedule!r}; known: {', '.join(LR_SCHEDULES)}")


@torch.no_grad()
def mean_elbo(loss_fn: Callable, x: torch.Tensor, batch_size: int = 1000) -> float:
    """ELBO per data point over ``x`` (one draw of z per point), in nats."""
    total = sum(loss_fn(x[i : i + batch_size]).item() for i in range(0, len(x), batch_size))
    return -total / len(x)


def first_batch(batches, n: int = 8) -> torch.Tensor:
    """A few rows as training will see them, without advancing ``batches``."""
    if hasattr(batches, "peek"):
        return batches.peek(n)
    return next(iter(batches))[1][:n]


def fit(
    module: nn.Module,
    batches: Iterable,
    config: TrainConfig,
    test_x: torch.Tensor | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    start_epoch: int = 0,
    on_epoch_end: Callable[[dict], None] | None = None,
    progress: bool = True,
    on_step_end: Callable[[Progress], None] | None = None,
    resume_from: Progress | None = None,
    valid_x: torch.Tensor | None = None,
    scheduler=None,
    monitor: Monitor | None = None,
    sync: Callable[[torch.Tensor], float] | None = None,
) -> list[dict]:
    """Train ``module.model`` / ``module.guide`` for epochs ``start_epoch + 1 … config.epochs``.

    ``batches`` yields ``(idx, x)`` each epoch. Without an ``optimizer``, the contract is checked
    on a first batch and Adam is made over every parameter ``SVI`` would train
    (:func:`pyrovae.params.trainable`): ``pyro.module`` registrations, ``PyroModule`` parameters,
    ``PyroParam``s and bare ``pyro.param`` sites, constrained ones through their unconstrained values.

    The loss is ``config.objective`` (:func:`pyrovae.objectives.loss`; Pyro's ``Trace_ELBO`` by
    default) with β = ``config.beta`` × the warm-up scale: for the ELBO, the batch's
    −Σ_n (1/k) Σ_i [log p(x_n | z_i) + β (log p(z_i) − log q(z_i | x_n))], z_i ~ q(z | x_n),
    k = ``config.num_particles``. Returns one metrics dict per epoch:
    ``train_elbo`` (−loss per point, averaged over the epoch's steps: the training objective, nats),
    ``test_elbo`` (the plain ELBO per point, when ``test_x`` is given), ``seconds`` and ``skipped``.
    ``on_step_end(progress)`` runs after every step (the CLI checkpoints and stops there);
    ``on_epoch_end(metrics)`` after each epoch; ``resume_from`` continues an epoch saved mid-way.

    With ``valid_x`` each epoch also reports ``valid_elbo``, which alone decides: ``best`` (the best
    so far, in ``monitor``), the plateau schedule and early stopping (``config.early_stopping``
    epochs without a better one). The test set, ``test_x``, is reported and never decides anything.
    ``scheduler`` (:func:`make_scheduler`) is stepped after each epoch. ``sync`` (several
    processes; see :func:`train_step`) makes the step's loss and gradients the sums over processes;
    ``batches`` then yields each global batch's indices with this process's rows.
    The held-out ELBOs use the same draws of z in every epoch (and every process).

    Args:
        module: holds the pair, ``module.model(x)`` and ``module.guide(x)``, Pyro programs that keep
            the model/guide contract (the built-in :class:`pyrovae.models.VAE`, or any object with
            the two methods).
        batches: re-iterated every epoch; yields ``(idx, x)``, the batch's row indices (B,) and its
            data (B, P), e.g. :class:`pyrovae.data.Batches`.
        config: the settings, :class:`TrainConfig`.
        test_x: held-out points (N, P) whose ELBO is reported each epoch.
        optimizer: a ``torch.optim`` optimizer over the parameters (default: Adam at ``config.lr``).
        start_epoch: the epochs already trained (a resumed run).
        on_epoch_end: called with each epoch's metrics.
        progress: show a progress bar.
        on_step_end: called with the :class:`Progress` after every step.
        resume_from: the :class:`Progress` of an epoch interrupted mid-way.
        valid_x: validation points (N, P) whose ELBO decides the best epoch, the plateau schedule
            and early stopping.
        scheduler: a learning-rate schedule stepped after each epoch (:func:`make_scheduler`).
        monitor: the best validation ELBO so far (:class:`Monitor`), kept across a resume.
        sync: with several processes, sums a tensor over them.

    Returns:
        One dict per epoch trained: ``epoch``, ``train_elbo``, ``seconds``, ``lr``, and where they
        apply ``test_elbo``, ``valid_elbo``, ``best``, ``skipped``, ``grad_norm``, the latent sites'
        ``kl`` and active units, ``stopped_early``. ELBOs in nats per data point.
    """
    if optimizer is None:
        sample = first_batch(batches)
        contract.check(module.model, module.guide, sample, "the training data")
        optimizer = make_optimizer(parameters.trainable(module.model, module.guide, sample).values(), config.lr)
    loss_fn = objective_loss(config.objective, module.model, module.guide, config.num_particles, config.beta)
    discrete = loss_fn.discrete(first_batch(batches))  # refuses an objective that cannot train the discrete sites; logs the estimator
    captured = None
    if config.capture and discrete.any:
        log.warning("capture: not for a model with discrete latent sites (%s); training eagerly",
                    ", ".join(discrete.summed + discrete.enumerated + discrete.sampled))
    elif config.capture and config.objective in CAPTURED_OBJECTIVES:
        trained = {str(i): p for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
        mode = None if config.capture in (True, "auto") else config.capture
        captured = CapturedStep(module.model, module.guide, trained, config.num_particles, config.beta, mode, config.objective,
                                check=config.capture == "auto")
    elif config.capture:
        log.info("the %s objective is not captured: the training step runs eagerly", config.objective)
    test_loss = elbo_loss(module.model, module.guide, config.num_particles)
    collapse = CollapseWatch()
    history = []
    state = resume_from or Progress(epoch=start_epoch + 1)
    norms: list[float] = []
    steps = (config.epochs - start_epoch) * len(batches) - state.step
    with fast_context(), tqdm(total=max(steps, 0), disable=not progress, unit="step", dynamic_ncols=True) as bar:
        for epoch in range(start_epoch + 1, config.epochs + 1):
            if state.epoch != epoch:
                state = Progress(epoch=epoch, skipped=state.skipped)
            start = time.perf_counter() - state.seconds
            for step, (idx, x) in enumerate(batches, start=state.step):
                loss_fn.beta = config.beta * warmup_scale(epoch, step, len(batches), config.warmup_epochs)
                try:
                    if captured is None:
                        value = train_step(loss_fn, optimizer, x, clip_grad=config.clip_grad, norms=norms, sync=sync)
                    else:
                        captured.beta = loss_fn.beta
                        value = captured.step(optimizer, x, clip_grad=config.clip_grad, norms=norms, sync=sync)
                    state.total -= value
                    state.count += len(idx)
                    state.grad_norm_sum += norms.pop()
                    state.grad_steps += 1
                except TrainingDiverged as e:
                    if state.skipped >= config.skip_nonfinite:
                        raise TrainingDiverged(f"epoch {epoch}, step {step}: {e}") from None
                    state.skipped += 1
                    optimizer.zero_grad(set_to_none=True)
                    log.warning("epoch %d, step %d: %s (skipped, %d so far)", epoch, step, e, state.skipped)
                state.step = step + 1
                state.seconds = time.perf_counter() - start
                bar.update()
                if on_step_end is not None:
                    on_step_end(state)
            metrics = {"epoch": epoch, "train_elbo": state.total / state.count if state.count else math.nan,
                       "seconds": time.perf_counter() - start}
            if config.skip_nonfinite:
                metrics["skipped"] = state.skipped
            held_out = test_x if test_x is not None else valid_x
            cuda = held_out is not None and held_out.device.type == "cuda"
            with torch.random.fork_rng(devices=[held_out.device] if cuda else []):
                torch.manual_seed(config.seed)
                if test_x is not None:
                    metrics["test_elbo"] = mean_elbo(test_loss, test_x)
                if valid_x is not None:
                    metrics["valid_elbo"] = mean_elbo(test_loss, valid_x)
                if held_out is not None:
                    metrics.update(latent_use(module, valid_x if valid_x is not None else test_x))
                    if "latent_dims" in metrics:  # continuous sites: a discrete one (a label) may rightly stay near its prior
                        collapse.update(epoch, {s: metrics["kl"][s] for s in metrics["latent_dims"]})
            watched = metrics.get("valid_elbo", metrics["train_elbo"])
            if monitor is not None:
                metrics["best"] = monitor.update(epoch, watched)
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(watched)
            elif scheduler is not None:
                scheduler.step()
            metrics["lr"] = optimizer.param_groups[0]["lr"]
            if state.grad_steps:
                metrics["grad_norm"] = state.grad_norm_sum / state.grad_steps  # mean over the epoch's steps
            stop = (config.early_stopping is not None and monitor is not None
                    and monitor.epochs_without_progress >= config.early_stopping)
            if stop:
                metrics["stopped_early"] = True
            bar.set_postfix(elbo=f"{metrics.get('test_elbo', metrics['train_elbo']):.2f}")
            log.info("epoch %d: %s", epoch, metrics)
            history.append(metrics)
            state = Progress(epoch=epoch + 1, skipped=state.skipped)
            if on_epoch_end is not None:
                on_epoch_end(metrics)
            if stop:
                log.info("no better validation ELBO for %d epochs: stopping after epoch %d (best: epoch %d)",
                         config.early_stopping, epoch, monitor.best_epoch)
                break
    return history
