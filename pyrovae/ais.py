"""Annealed importance sampling (AIS) with HMC transitions, and bidirectional Monte Carlo (BDMC), per data point.

For each data point x, M chains start from z_0 ~ f_0 = q(z | x) (the guide; or the prior p(z))
and move along the geometric path of unnormalized densities

    f_β(z) = f_0(z)^(1−β) p(x, z)^β,     0 = β_0 < β_1 < … < β_T = 1

(sigmoidal in t by default, as Wu et al. 2017). Each chain carries the log-weight

    log w = Σ_{t=1..T} (β_t − β_{t−1}) [log p(x, z_{t−1}) − log f_0(z_{t−1})]

and between two increments takes one HMC transition that leaves f_{β_t} invariant (t = 1..T−1;
T = 1 is plain importance sampling from f_0). Then E[w] = p(x), and
log p̂(x) = log (1/M) Σ_m w_m is, by Jensen, a stochastic lower bound on log p(x) (Neal 2001).

HMC (:mod:`pyrovae.hmc`) runs on all latent sites at once, in unconstrained space, with the densities
of the path (:mod:`pyrovae.annealing`). Points are processed ``batch_size`` at a time, every point's
chains together.

The step size is adapted per data point toward an acceptance rate of 0.65, from past transitions
only: after each transition it is multiplied by 1.02 if the mean acceptance probability exceeded the
target, else divided by 1.02. Why the estimate stays a valid stochastic lower bound: Neal's identity
E[w] = p(x) needs each transition to leave its f_{β_t} invariant given whatever chose it. A step size
chosen from the past transitions of *other, independent* chains qualifies: given those chains, the
sequence of kernels is fixed before the chain it moves has started, and Neal's argument applies
unchanged. A step size chosen from the chain's *own* past acceptances does not quite: whether the
last proposal was accepted is correlated with the state it left, so the next kernel is a mixture of
invariant kernels whose mixing weights depend on the current state, which is not invariant in
general, and the weights are biased (slightly, for an adaptation this slow; Wu et al. 2017 adapt on
the estimating chains themselves). So the acceptance that drives the adaptation is measured on
``tune_chains`` (2) extra tuning chains per point, drawn independently from f_0 and moved by the same
transitions, whose weights are discarded. The M estimating chains share the adapted step size; given
the tuning chains their weights are independent with E[w_m] = p(x), log p̂(x) is a stochastic lower
bound (E log p̂(x) ≤ log p(x)), and the delta-method standard error across chains is the right one.

Speed: when a pass evaluates the density often enough (``capture="auto"``), the whole HMC
transition — momentum draw, leapfrog steps with the model's and guide's log-densities and their
gradients, accept test — is traced into one graph of tensor operations
(:class:`pyrovae.hmc.CapturedTransition`), checked against the eager transition on its first call
(same draws), and replayed for every transition of every pass of that shape, in this call and later
ones (the graph reads each pass's points from its own buffer).

BDMC (Grosse, Ghahramani & Adams 2015) brackets log p(x) on data simulated from the model, where an
exact posterior sample is known: (z, x) ~ p(z) p(x | z). Forward AIS gives the lower bound; reverse
AIS, started at the exact z and run from β = 1 to β = 0 with the forward pass's kernels (its step
sizes, which depend on x and on chains independent of z, not on z), has E[w_rev] = 1/p(x), so
−log (1/M) Σ_m w_rev,m is a stochastic upper bound. The gap between the two bounds the error of
either for data like these.

References:
    R. M. Neal (2001). Annealed importance sampling. Statistics and Computing 11:125–139.
    R. M. Neal (2011). MCMC using Hamiltonian dynamics. Handbook of MCMC, ch. 5.
    R. B. Grosse, Z. Ghahramani, R. P. Adams (2015). Sandwiching the marginal likelihood using
        bidirectional Monte Carlo. arXiv:1511.02543.
    Y. Wu, Y. Burda, R. Salakhutdinov, R. Grosse (2017). On the quantitative analysis of
        decoder-based generative models. ICLR.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from pyro import poutine
from tqdm.auto import tqdm

from . import contract, estimators, graphs
from .annealing import SCHEDULES, AnnealingPath, Start, captured_density, linear_schedule, sigmoid_schedule
from .context import fast_context
from .diagnostics import effective_sample_size
from .errors import ContractError, PyrovaeError
from .estimators import Estimate
from .hmc import CapturedTransition, State, hmc_transition
from .params import trainable
from .seeds import batch_seed
from .traces import sample_sites

log = logging.getLogger(__name__)

DEFAULT_STEPS = 500  # T
DEFAULT_CHAINS = 16  # M
DEFAULT_LEAPFROG = 10  # L
DEFAULT_STEP_SIZE = 0.05  # initial HMC step size, in unconstrained units
TARGET_ACCEPT = 0.65
ADAPT_FACTOR = 1.02
TUNE_CHAINS = 2
PASS_SIZE = 4096  # chains × points per pass when the batch size is not given
AIS_STREAM = (0, 1)  # the key of AIS's draws under a seed, apart from the importance sampling's (see batch_seed)
CAPTURE_MIN_EVALUATIONS = 500  # capture="auto" traces the transition when a pass evaluates the density at least this often


# ---------------------------------------------------------------- one pass: the chains of a batch of points


@dataclass
class _Pass:
    log_w: torch.Tensor  # (C, B) float64
    accept: torch.Tensor  # (C, B), mean acceptance probability over the transitions (nan if none)
    step_sizes: torch.Tensor  # (T−1, B), the step size of each transition


Move = Callable[[State, float, torch.Tensor], tuple[State, torch.Tensor]]  # (state, β, step size) → (state, acceptance)


def _anneal(
    move: Move, state: State, betas: torch.Tensor,
    step_size: torch.Tensor, tune: slice | None = None, step_sizes: torch.Tensor | None = None,
    target_accept: float = TARGET_ACCEPT, on_step: Callable[[], None] | None = None,
) -> _Pass:
    """Run the chains from ``state`` along ``betas`` (forward 0 → 1, or reverse 1 → 0), each
    transition made by ``move`` (:func:`pyrovae.hmc.hmc_transition` or its captured graph).

    The step size starts at ``step_size`` (B,) and, if ``tune`` is given, is adapted after each
    transition from the mean acceptance probability of the chains ``[tune]`` (see the module
    docstring); ``step_sizes`` (T−1, B) fixes it per transition instead.
    """
    u = state.u
    C, B = state.log_f0.shape
    log_w = torch.zeros(C, B, dtype=torch.float64, device=u.device)
    accept_sum = torch.zeros(C, B, dtype=torch.float64, device=u.device)
    used = []
    eps = step_size
    T = len(betas) - 1
    betas = betas.tolist()
    for t in range(1, T + 1):
        log_w += (betas[t] - betas[t - 1]) * state.log_ratio.double()
        if t == T:
            break
        if step_sizes is not None:
            eps = step_sizes[t - 1]
        used.append(eps)
        state, accept = move(state, betas[t], eps.to(u.dtype))
        accept_sum += accept
        if tune is not None:
            eps = torch.where(accept[tune].mean(0) > target_accept, eps * ADAPT_FACTOR, eps / ADAPT_FACTOR)
        if on_step is not None:
            on_step()
    steps = torch.stack(used) if used else torch.empty(0, B, dtype=step_size.dtype, device=u.device)
    return _Pass(log_w, accept_sum / (T - 1) if T > 1 else torch.full_like(accept_sum, math.nan), steps)


# ---------------------------------------------------------------- results


@dataclass
class AISResult:
    """Per-point AIS results for N points, each (N,) unless said; the settings that produced them.

    ``log_px`` is log (1/M) Σ_m w_m with the delta method's standard error across the M chains (as
    :func:`pyrovae.estimators.log_px`); for a reverse pass (``bound == "upper"``) it is
    −log (1/M) Σ_m w_rev,m. ``ess`` is the effective sample size of the M weights, ``accept`` the mean
    HMC acceptance probability of the estimating chains, ``step_size`` their mean step size,
    ``log_w`` the chains' log-weights (M, N).
    """

    log_px: Estimate
    ess: torch.Tensor
    accept: torch.Tensor
    step_size: torch.Tensor
    log_w: torch.Tensor
    num_steps: int
    num_chains: int
    num_leapfrog: int
    start: str
    bound: Literal["lower", "upper"] = "lower"

    def settings(self) -> str:
        return f"T={self.num_steps}, M={self.num_chains}, L={self.num_leapfrog}, start: {self.start}"

    def summary(self) -> dict:
        """Means over points, with standard errors across points; the mean Monte Carlo s.e. per point."""
        return {
            "num_points": int(self.log_px.value.numel()),
            "num_steps": self.num_steps, "num_chains": self.num_chains, "num_leapfrog": self.num_leapfrog,
            "start": self.start, "bound": self.bound,
            "log_px": self.log_px.mean(),
            "log_px_stderr_mean": torch.nanmean(self.log_px.stderr).item(),
            "ess_mean": self.ess.mean().item(),
            "accept_mean": torch.nanmean(self.accept).item(),
            "step_size_mean": torch.nanmean(self.step_size).item(),
        }

    def per_point(self) -> dict[str, list]:
        return {"log_px": self.log_px.value.tolist(), "log_px_stderr": self.log_px.stderr.tolist(),
                "ess": self.ess.tolist(), "accept": self.accept.tolist(), "step_size": self.step_size.tolist()}

    def table(self) -> str:
        """Readable rows: the mean over points with its standard error across points, and the diagnostics."""
        s = self.summary()
        name = "log p(x), AIS " + ("lower bound" if self.bound == "lower" else "upper bound (reverse)")
        return "\n".join([
            f"AIS with HMC: {self.settings()}; nats per data point, mean and s.e. across points",
            _row(name, *s["log_px"]),
            _row("  Monte Carlo s.e. per point, mean", s["log_px_stderr_mean"], math.nan),
            f"ESS mean {s['ess_mean']:.1f} of M={self.num_chains}; HMC acceptance mean {s['accept_mean']:.2f}, "
            f"step size mean {s['step_size_mean']:.3g}",
        ])


@dataclass
class BDMCResult:
    """Bidirectional Monte Carlo on N points simulated from the model: per-point lower bound (forward
    AIS), upper bound (reverse AIS from the exact latents), and their gap, with the data simulated."""

    lower: AISResult
    upper: AISResult
    x: torch.Tensor  # (N, P), the simulated data

    @property
    def gap(self) -> Estimate:
        """upper − lower per point, standard errors in quadrature (the two passes are independent given x)."""
        return estimators.difference(self.upper.log_px, self.lower.log_px)

    def summary(self) -> dict:
        return {"num_points": len(self.x), "lower": self.lower.summary(), "upper": self.upper.summary(),
                "gap": self.gap.mean(), "gap_stderr_mean": torch.nanmean(self.gap.stderr).item()}

    def per_point(self) -> dict[str, list]:
        return {"lower": self.lower.log_px.value.tolist(), "lower_stderr": self.lower.log_px.stderr.tolist(),
                "upper": self.upper.log_px.value.tolist(), "upper_stderr": self.upper.log_px.stderr.tolist(),
                "gap": self.gap.value.tolist(), "accept_forward": self.lower.accept.tolist(),
                "accept_reverse": self.upper.accept.tolist()}

    def table(self) -> str:
        s = self.summary()
        return "\n".join([
            f"BDMC on {s['num_points']} points simulated from the model, AIS with HMC: {self.lower.settings()}",
            _row("log p(x) lower bound, forward AIS", *s["lower"]["log_px"]),
            _row("log p(x) upper bound, reverse AIS", *s["upper"]["log_px"]),
            _row("gap upper − lower", *s["gap"]),
            f"HMC acceptance mean {s['lower']['accept_mean']:.2f} forward, {s['upper']['accept_mean']:.2f} reverse; "
            "s.e. across points (data variation). A gap near 0 says AIS is accurate on data like these.",
        ])


ROW_WIDTH = 40


def _row(name: str, value: float, stderr: float) -> str:
    """One row as in :meth:`pyrovae.evaluate.Evaluation.table`; a nan cell is left blank."""
    cells = ["" if math.isnan(v) else f"{v:.3f}" for v in (value, stderr)]
    return f"{name:<{ROW_WIDTH}}  {cells[0]:>10}  {cells[1]:>8}".rstrip()


def _result(log_w: torch.Tensor, accept, step_size, settings: dict, bound: str) -> AISResult:
    est = estimators.log_px(log_w)
    if bound == "upper":  # w_rev estimates 1/p(x): the bound is −log mean w_rev, with the same s.e.
        est = Estimate(-est.value, est.stderr)
    return AISResult(est, effective_sample_size(log_w), accept, step_size, log_w, **settings, bound=bound)


# ---------------------------------------------------------------- the estimators


@dataclass
class AISSettings:
    """How AIS runs: the schedule, HMC and its adaptation after Wu et al. (2017).

    Attributes:
        num_steps: T, intermediate distributions; T − 1 HMC transitions per chain (T = 1 is plain
            importance sampling from f_0).
        num_chains: M, estimating chains per point.
        num_leapfrog: L, leapfrog steps per HMC transition.
        step_size: the initial HMC step size, in unconstrained units.
        adapt: adapt the step size per point toward ``target_accept`` (×1.02 or ÷1.02 after each
            transition), from the tuning chains only.
        tune_chains: extra chains per point whose acceptance drives the adaptation; their weights are
            discarded.
        target_accept: the acceptance rate the adaptation aims at.
        schedule: β_0 … β_T: ``"sigmoid"`` (Wu et al. 2017), ``"linear"``, or T + 1 values from 0 to 1.
        start: f_0, ``"guide"`` (q(z | x)) or ``"prior"`` (p(z)).
        batch_size: points per pass (default: as many as fit ``PASS_SIZE`` chains).
        capture: replay the HMC transition as a traced graph (:class:`pyrovae.hmc.CapturedTransition`);
            ``"auto"`` does so where a pass evaluates it often enough to pay for the tracing.
    """

    num_steps: int = DEFAULT_STEPS  # T intermediate distributions; T − 1 HMC transitions per chain
    num_chains: int = DEFAULT_CHAINS  # M estimating chains per point
    num_leapfrog: int = DEFAULT_LEAPFROG  # L leapfrog steps per transition
    step_size: float = DEFAULT_STEP_SIZE  # initial HMC step size (unconstrained units)
    adapt: bool = True  # adapt the step size per point from the tuning chains
    tune_chains: int = TUNE_CHAINS  # extra chains per point whose acceptance drives the adaptation
    target_accept: float = TARGET_ACCEPT
    schedule: str | torch.Tensor = "sigmoid"  # "sigmoid", "linear", or T + 1 values from 0 to 1
    start: Start = "guide"  # f_0: the guide q(z | x) or the prior p(z)
    batch_size: int | None = None  # points per pass; default: as many as fit PASS_SIZE chains
    capture: bool | Literal["auto"] = "auto"  # replay the HMC transition as a traced graph (hmc.CapturedTransition); "auto": when
    # a pass evaluates the density at least CAPTURE_MIN_EVALUATIONS times, so that tracing (once per shape and process) pays

    def check(self) -> None:
        for name, value in (("steps T", self.num_steps), ("chains M", self.num_chains), ("leapfrog steps L", self.num_leapfrog)):
            if value < 1:
                raise PyrovaeError(f"the number of AIS {name} must be at least 1, got {value}")
        if not self.step_size > 0:
            raise PyrovaeError(f"the HMC step size must be positive, got {self.step_size}")
        if self.adapt and self.tune_chains < 1:
            raise PyrovaeError(f"step-size adaptation needs at least 1 tuning chain, got {self.tune_chains}")
        if self.start not in ("guide", "prior"):
            raise PyrovaeError(f"AIS starts from the guide or the prior, got {self.start!r}")
        if self.capture not in (True, False, "auto"):
            raise PyrovaeError(f"capture is True, False or 'auto', got {self.capture!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise PyrovaeError(f"the AIS batch size must be at least 1, got {self.batch_size}")
        self.betas()

    def betas(self) -> torch.Tensor:
        """β_0..β_T, (T+1,) float64."""
        if isinstance(self.schedule, str):
            if self.schedule not in SCHEDULES:
                raise PyrovaeError(f"unknown AIS schedule {self.schedule!r}; known: {', '.join(SCHEDULES)}")
            return SCHEDULES[self.schedule](self.num_steps)
        betas = torch.as_tensor(self.schedule, dtype=torch.float64).cpu()
        if betas.dim() != 1 or len(betas) != self.num_steps + 1 or betas[0] != 0 or betas[-1] != 1 or (betas.diff() < 0).any():
            raise PyrovaeError(f"an AIS schedule must be T + 1 = {self.num_steps + 1} non-decreasing values from 0 to 1")
        return betas

    def points_per_pass(self) -> int:
        """``batch_size``, or as many points as fit ``PASS_SIZE`` chains (tuning chains included)."""
        chains = self.num_chains + (self.tune_chains if self.adapting else 0)
        return max(1, PASS_SIZE // chains) if self.batch_size is None else self.batch_size

    @property
    def adapting(self) -> bool:
        return self.adapt and self.num_steps > 1

    @property
    def capturing(self) -> bool:
        evaluations = (self.num_steps - 1) * self.num_leapfrog
        return evaluations > 0 and (self.capture is True or (self.capture == "auto" and evaluations >= CAPTURE_MIN_EVALUATIONS))


def ais(model: Callable, guide: Callable, x: torch.Tensor, *args, progress: bool = False,
        seed: int | None = None, first_row: int = 0, **options) -> AISResult:
    """AIS estimate of log p(x) per data point, a stochastic lower bound: x (N, P) → (N,) values.

    ``options`` are the fields of :class:`AISSettings` (``num_steps``, ``num_chains``,
    ``num_leapfrog``, ``step_size``, ``adapt``, ``tune_chains``, ``target_accept``, ``schedule``,
    ``start``, ``batch_size``, ``capture``); ``args`` go to ``model(x, *args)`` and ``guide(x, *args)``,
    which keep the model/guide contract. With ``seed``, the pass starting at row r draws from a
    stream seeded by (seed, ``first_row`` + r), so that processes sharing the points in blocks of
    whole passes give the per-point results of one process.

    Per point, M chains from f_0 (the guide, or the prior) along f_β(z) = f_0(z)^(1−β) p(x, z)^β,
    0 = β_0 < … < β_T = 1, one HMC transition between increments; chain m carries
    log w_m = Σ_t (β_t − β_{t−1}) [log p(x, z_{t−1}) − log f_0(z_{t−1})], with E[w_m] = p(x), and
    log p̂(x) = log (1/M) Σ_m w_m ≤ log p(x) in expectation (the module docstring has the details).

    Args:
        model: a Pyro program ``model(x, *args)`` that keeps the model/guide contract; every
            latent site continuous (HMC moves them in unconstrained space).
        guide: its guide ``guide(x, *args)``, the start f_0 when ``start="guide"``.
        x: the data points, (N, P).
        progress: show a progress bar.
        seed: seeds each pass's draws (None: the global random state).
        first_row: this process's first row in the whole data set (with ``seed``).
        options: the fields of :class:`AISSettings`: T = ``num_steps`` intermediate distributions,
            M = ``num_chains`` chains per point, L = ``num_leapfrog`` leapfrog steps per transition,
            the initial ``step_size`` and its adaptation.

    Returns:
        :class:`AISResult`: ``log_px`` per point (N,) with its standard error across the M chains,
        the chains' ESS, acceptance and step size per point, their log-weights (M, N).

    Raises:
        PyrovaeError: settings out of range (:meth:`AISSettings.check`).
    """
    settings = AISSettings(**options)
    return _run(model, guide, x, args, settings, None, progress, seed, first_row)[0]


def bdmc(model: Callable, guide: Callable, x: torch.Tensor, *args, progress: bool = False, **options) -> BDMCResult:
    """Bidirectional Monte Carlo on len(x) points simulated from the model (x gives only the shape).

    Draws (z, x') ~ p(z) p(x | z) with :func:`simulate`, then per point forward AIS on x' (the lower
    bound, as :func:`ais`) and reverse AIS started at the exact z, from β = 1 to 0, with the forward
    pass's step size at each intermediate distribution (the upper bound). Options as :func:`ais`.

    Reverse AIS has E[w_rev] = 1/p(x), so −log (1/M) Σ_m w_rev,m is a stochastic upper bound:
    E[lower] ≤ log p(x) ≤ E[upper] at each simulated point, and the gap upper − lower bounds the
    error of either estimate on data like these (Grosse, Ghahramani & Adams 2015).

    Args:
        model: a Pyro program ``model(x, *args)`` that keeps the model/guide contract.
        guide: its guide, the start of the forward chains when ``start="guide"``.
        x: (N, P): only its shape and device are used; N points are simulated.
        progress: show a progress bar.
        options: the fields of :class:`AISSettings`, for both directions.

    Returns:
        :class:`BDMCResult`: the forward (``lower``) and reverse (``upper``) :class:`AISResult`, the
        simulated data ``x`` (N, P), and their ``gap`` per point.
    """
    settings = AISSettings(**options)
    settings.check()
    x_sim, latents = simulate(model, x, *args)
    lower, upper = _run(model, guide, x_sim, args, settings, latents, progress)
    return BDMCResult(lower, upper, x_sim)


def simulate(model: Callable, x: torch.Tensor, *args) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(x', z) ~ p(z) p(x | z) for len(x) points: the model run with its observation sampled
    (``poutine.uncondition``); x only gives the shape. Returns x' (N, P) and {latent site: (N, *event)}."""
    with torch.no_grad(), fast_context():
        trace = poutine.trace(poutine.uncondition(model)).get_trace(x, *args)
    observed = [name for name, site in sample_sites(trace) if site["infer"].get("was_observed")]
    if len(observed) != 1:
        raise ContractError(f"simulating data needs exactly one observed site in the model, found {observed}")
    latents = {name: site["value"] for name, site in sample_sites(trace) if name not in observed}
    x_sim = trace.nodes[observed[0]]["value"]
    if x_sim.shape != x.shape:
        raise ContractError(f"the observed site {observed[0]!r} simulates shape {tuple(x_sim.shape)}, the data have {tuple(x.shape)}")
    return x_sim.to(x.dtype), latents


CACHE_SIZE = 8  # captured transitions kept across passes and calls
_CAPTURES: OrderedDict[tuple, tuple[torch.Tensor, CapturedTransition | None]] = OrderedDict()  # key → (data buffer, transition)


def _pass(model, guide, x: torch.Tensor, chains: int, s: AISSettings, args, beta: float, step_size: torch.Tensor,
          start_at: Callable[[AnnealingPath], torch.Tensor] | None = None) -> tuple[AnnealingPath, State, Move]:
    """The annealing path of one pass over x with ``chains`` chains per point, the chains' first
    state (at ``start_at(path)``, default the path's initial draws) and the transition that moves them.

    Captured (``s.capturing``), the whole transition is one graph (:class:`pyrovae.hmc.CapturedTransition`),
    traced for the first pass of its shape and kept (the last :data:`CACHE_SIZE`), keyed by the model,
    the guide, the shapes and the parameters' identities: the path reads x from a buffer of the
    graph, into which a later pass of the same shape copies its points before the parts computed once
    are recomputed. The density is traced first, through Pyro's programs, and checked
    (:func:`pyrovae.annealing.captured_density`); the transition is traced over its graph, which is
    quick. Where the transition cannot be traced it runs eagerly on the traced density (on Pyro's
    programs where the density could not be traced either)."""
    key = None
    if s.capturing:
        with graphs.preserved_rng([x]):  # finding the parameters runs the guide: give its draws back
            leaves = trainable(model, guide, x[:1], *args)
        key = (model, guide, s.start, chains, s.num_leapfrog, tuple(x.shape), x.dtype, x.device, torch.get_default_dtype(),
               tuple(id(a) if isinstance(a, torch.Tensor) else a for a in args), tuple(id(p) for p in leaves.values()))
    hit = _CAPTURES.get(key) if key is not None else None
    if hit is not None:
        _CAPTURES.move_to_end(key)
        buffer, transition = hit
        buffer.copy_(x)
    else:
        buffer, transition = x.detach().clone(), None
    path = AnnealingPath(model, guide, buffer, chains, s.start, args, {})
    state = path(path.initial if start_at is None else start_at(path))
    step_size = step_size.to(state.u.dtype)
    if not s.capturing:
        return path, state, lambda st, b, eps: hmc_transition(st, path, b, eps, s.num_leapfrog)
    if hit is not None:
        if transition is not None:
            transition.refold()
            return path, state, transition
        return path, state, lambda st, b, eps: hmc_transition(st, path, b, eps, s.num_leapfrog)
    density = captured_density(path, state)  # traced through Pyro once and checked; the transition is traced over its graph
    try:
        transition = CapturedTransition(density, state, beta, step_size, s.num_leapfrog)
    except Exception as e:  # an operation make_fx cannot trace, data-dependent control flow
        log.warning("tracing the HMC transition failed (%s: %s); continuing without tracing it", type(e).__name__, e)

        def move(st, b, eps):
            return hmc_transition(st, density, b, eps, s.num_leapfrog)
    else:
        move = transition
    if key is not None:
        _CAPTURES[key] = (buffer, transition)
        while len(_CAPTURES) > CACHE_SIZE:
            _CAPTURES.popitem(last=False)
    return path, state, move


def _checked_out(move: Move) -> None:
    """Forget a captured transition whose check failed, so that later passes do not use it."""
    if isinstance(move, CapturedTransition) and move.failure is not None:
        for key, (_, transition) in list(_CAPTURES.items()):
            if transition is move:
                _CAPTURES[key] = (_CAPTURES[key][0], None)


def clear_cache() -> None:
    """Forget every kept transition graph (they hold references to models, guides and parameters)."""
    _CAPTURES.clear()


def _run(model, guide, x: torch.Tensor, args, s: AISSettings, latents: dict | None, progress: bool,
         seed: int | None = None, first_row: int = 0) -> tuple[AISResult, AISResult | None]:
    """Forward AIS on every point; with ``latents`` (exact posterior draws), reverse AIS too."""
    s.check()
    if len(x) == 0:
        raise PyrovaeError("no data points to estimate log p(x) for")
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):  # the check's draws leave the chains' alone
        discrete = contract.check(model, guide, x[:8], "the data for AIS")
    drawn = discrete.enumerated + discrete.sampled
    if drawn:  # HMC moves continuous latents; the model's enumerated sites are summed out of the path's densities
        raise ContractError(f"AIS and BDMC do not apply where the guide draws a discrete site ({', '.join(drawn)}): "
                            "enumerate it in the model instead (infer={'enumerate': 'parallel'}, the guide leaving it out), "
                            "or estimate log p(x) by evaluate's importance sampling")
    betas = s.betas()
    N, M = len(x), s.num_chains
    C = M + (s.tune_chains if s.adapting else 0)
    batch_size = s.points_per_pass()
    out: dict[str, list[torch.Tensor]] = {k: [] for k in ("log_w", "accept", "step", "log_w_rev", "accept_rev")}
    passes = 1 if latents is None else 2
    with fast_context(), tqdm(total=N * passes, disable=not progress, unit="point", dynamic_ncols=True) as bar:
        for begin in range(0, N, batch_size):
            rows = slice(begin, min(begin + batch_size, N))
            xb = x[rows]
            B = len(xb)
            if seed is not None:
                torch.manual_seed(batch_seed(seed, first_row + begin, *AIS_STREAM))
            on_step = (lambda: bar.update(B / (s.num_steps - 1))) if progress else None
            eps0 = torch.full((B,), float(s.step_size), dtype=torch.float64, device=x.device)
            first_beta = float(betas[1]) if s.num_steps > 1 else 1.0
            _, state, move = _pass(model, guide, xb, C, s, args, first_beta, eps0)
            forward = _anneal(move, state, betas, eps0, slice(M, C) if s.adapting else None,
                              target_accept=s.target_accept, on_step=on_step)
            _checked_out(move)
            out["log_w"].append(forward.log_w[:M].cpu())
            out["accept"].append(forward.accept[:M].mean(0).cpu())
            out["step"].append((forward.step_sizes.mean(0) if s.num_steps > 1 else eps0).cpu())
            if s.num_steps == 1:
                bar.update(B * passes)
            if latents is None:
                continue
            exact = {name: value[rows] for name, value in latents.items()}
            _, state, move = _pass(model, guide, xb, M, s, args, float(betas.flip(0)[1]) if s.num_steps > 1 else 0.0,
                                   eps0, lambda p, exact=exact: p.to_unconstrained(exact))
            reverse = _anneal(move, state, betas.flip(0), eps0, step_sizes=forward.step_sizes.flip(0), on_step=on_step)
            _checked_out(move)
            out["log_w_rev"].append(reverse.log_w.cpu())
            out["accept_rev"].append(reverse.accept.mean(0).cpu())
    info = dict(num_steps=s.num_steps, num_chains=M, num_leapfrog=s.num_leapfrog, start=s.start)
    step = torch.cat(out["step"])
    lower = _result(torch.cat(out["log_w"], 1), torch.cat(out["accept"]), step, info, "lower")
    if latents is None:
        return lower, None
    return lower, _result(torch.cat(out["log_w_rev"], 1), torch.cat(out["accept_rev"]), step, info, "upper")


__all__ = ["AISResult", "AISSettings", "BDMCResult", "SCHEDULES", "State", "ais", "bdmc", "hmc_transition",
           "linear_schedule", "sigmoid_schedule", "simulate"]
