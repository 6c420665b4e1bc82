"""Why is the bound loose? The inference gap split into its parts, and what the latent code carries.

**The gaps** (Cremer, Li & Duvenaud 2018). For a held-out point x, let q(z|x) be the encoder's
distribution and q*(z|x) the best member of the guide's own family for this x alone, found by
maximizing ELBO(x) directly over the distribution's parameters. Then::

    log p(x) − ELBO[q]  =  [log p(x) − ELBO[q*]]  +  [ELBO[q*] − ELBO[q]]
         total gap          approximation gap          amortization gap
    = KL(q ‖ p(z|x))    =   KL(q* ‖ p(z|x))       +  KL(q ‖ p(z|x)) − KL(q* ‖ p(z|x))

- The *approximation gap* is the family's limit: no encoder can do better with this family. When it
  dominates, change the family (full covariance, a flow, more latent layers) or the model.
- The *amortization gap* is the encoder's shortfall: the family holds a better q for this x, the
  encoder does not output it. When it dominates, give the encoder capacity, train longer (or
  without early stopping on the ELBO alone), or refine q per point at test time
  (semi-amortized inference, Kim et al. 2018; Marino et al. 2018).

q* is fitted per point by Adam with a fixed number of steps, from the encoder's output. The steps
use the "sticking the landing" gradient (Roeder, Wu & Duvenaud 2017): log q is evaluated with
its parameters held fixed, so the gradient vanishes when q* reaches the posterior. The learning
rate is constant for the first half of the steps and falls linearly to 0 over the second, so the
last iterate does not jitter around the optimum. The per-point problems are independent, and
Adam's update is elementwise: a batch of points optimized together is exactly the points
optimized one by one. The reported convergence check is the rise of the per-step ELBO estimate
over the last tenth of the steps against the tenth before (0 within its s.e. when converged); an
unconverged q* makes the approximation gap too large and the amortization gap too small.

log p(x) for the approximation gap is importance-sampled with q* as the proposal (usually closer
to the posterior than q, so the estimate is better than the encoder's), independently of the
ELBO draws; evaluate's total gap, importance-sampled with q, is an independent estimate of the
sum: the two agree within their standard errors when both importance-sampling estimates hold.

Supported families, at every latent guide site: ``Normal`` (under any ``.to_event``), free loc and
log-scale per coordinate; ``MultivariateNormal``, free loc and a lower-triangular factor (log of
its diagonal free). Not supported: a flow (a ``TransformedDistribution``, such as the IAF guide:
its per-point parameters are the base and the context fed to shared transforms, not a
distribution's parameters), other distributions, and guides whose site depends on another latent
sample (such as a bottom-up hierarchical guide q(z1 | z2) q(z2 | x): the family then includes the
conditioning networks, which are shared across points).

**ELBO surgery** (Hoffman & Johnson 2016). Over the N held-out points, with the aggregate
posterior q(z) = (1/N) Σ_n q(z | x_n), at each latent site::

    (1/N) Σ_n KL(q(z|x_n) ‖ p(z))  =  I_q(x; z)  +  KL(q(z) ‖ p(z))
    I_q(x; z) = (1/N) Σ_n E_{q(z|x_n)}[log q(z|x_n) − log q(z)]      (the code's information about x)
    KL(q(z) ‖ p(z)) = (1/N) Σ_n E_{q(z|x_n)}[log q(z) − log p(z)]    (the prior's mismatch)

log q(z) is the log-mean over the N points of q(z | x_m), exact for the empirical aggregate
posterior. As an estimate of the population's (x drawn from the data distribution), I_q is biased
low and bounded by log N (the own point's term alone gives q(z) ≥ q(z|x_n)/N), and KL(q(z) ‖ p(z))
biased high by as much; evaluate more points when I_q is near log N. A small I_q with a KL term that
is not small says the KL is spent on matching the prior, not on carrying information: a richer
prior (a mixture, the VampPrior) or a smaller KL weight helps; a small I_q with a small KL term is
posterior collapse (a weaker decoder, KL warm-up, fewer latent dimensions). A large KL(q(z) ‖ p(z))
says the prior leaves mass where the codes are not: samples from the prior look unlike the data.

References:
    Cremer, Li & Duvenaud (2018), *Inference Suboptimality in Variational Autoencoders*.
    Hoffman & Johnson (2016), *ELBO surgery: yet another way to carve up the variational evidence lower bound*.
    Roeder, Wu & Duvenaud (2017), *Sticking the Landing*.
    Kim, Wiseman, Miller, Sontag & Rush (2018), *Semi-Amortized Variational Autoencoders*.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import pyro
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch.distributions import Distribution, Independent, MultivariateNormal, Normal
from tqdm.auto import tqdm

from . import contract, diagnostics, estimators, evidence, latents
from .context import fast_context
from .errors import PyrovaeError
from .estimators import Estimate
from .seeds import batch_seed
from .traces import latent_values, particle_traces, sample_sites, unscaled_log_prob

GAPS_STREAM, SURGERY_STREAM = (0, 4), (0, 5)  # keys of their draws under a seed (see pyrovae.seeds.batch_seed)
CONVERGENCE_WINDOW = 0.1  # the share of the steps in each window of the convergence check
RISE_TOLERANCE = 0.01  # nats: a rise below this is not counted as "still rising"
SATURATION = 0.05  # nats: I_q closer than this to its bound log N is reported as at its bound


# ---------------------------------------------------------------- the families


def _unwrap(fn: Distribution) -> tuple[Distribution, int]:
    """The distribution under any ``Independent`` wrappers, and how many event dims they add."""
    dims = 0
    while isinstance(fn, Independent):
        dims += fn.reinterpreted_batch_ndims
        fn = fn.base_dist
    return fn, dims


def _normal_parameters(fn: Normal) -> dict[str, torch.Tensor]:
    return {"loc": fn.loc, "log_scale": fn.scale.log()}


def _normal(params: dict[str, torch.Tensor]) -> Distribution:
    return pyro.distributions.Normal(params["loc"], params["log_scale"].exp())


def _mvn_parameters(fn: MultivariateNormal) -> dict[str, torch.Tensor]:
    L = fn.scale_tril
    return {"loc": fn.loc, "tril": L.tril(-1) + torch.diag_embed(L.diagonal(dim1=-2, dim2=-1).log())}


def _mvn(params: dict[str, torch.Tensor]) -> Distribution:
    raw = params["tril"]
    L = raw.tril(-1) + torch.diag_embed(raw.diagonal(dim1=-2, dim2=-1).exp())
    return pyro.distributions.MultivariateNormal(params["loc"], scale_tril=L)


FAMILIES: dict[type, tuple[str, Callable, Callable]] = {
    # distribution type → (name, its free parameters (unconstrained), the distribution from them)
    Normal: ("Normal", _normal_parameters, _normal),
    MultivariateNormal: ("MultivariateNormal", _mvn_parameters, _mvn),
}
"""The families q* is fitted in: a new family is a new entry, matched by ``isinstance``."""


def _family(name: str, fn: Distribution) -> tuple[str, Callable, Callable]:
    base, _ = _unwrap(fn)
    for kind, family in FAMILIES.items():
        if isinstance(base, kind):
            return family
    known = ", ".join(f[0] for f in FAMILIES.values())
    raise PyrovaeError(
        f"the inference gaps are not supported for this guide: its site {name!r} is a {type(base).__name__}, not a "
        f"plain parameterized family ({known}, under any .to_event); a flow's per-point parameters feed shared transforms, "
        "so its per-point optimum q* is not defined here"
    )


@dataclass
class FreeSite:
    """One latent site's distribution with free per-point parameters: ``params`` are unconstrained
    leaf tensors with the data points first (batch (B,) of the site)."""

    family: str
    params: dict[str, torch.Tensor]
    event_dims: int  # the Independent wrappers of the guide's distribution
    build: Callable[[dict[str, torch.Tensor]], Distribution]

    @classmethod
    def like(cls, name: str, fn: Distribution) -> "FreeSite":
        """Initialized at the guide's distribution ``fn`` (a copy of its parameters, not a view)."""
        family, parameters, build = _family(name, fn)
        base, dims = _unwrap(fn)
        params = {k: v.detach().clone(memory_format=torch.contiguous_format).requires_grad_()
                  for k, v in parameters(base).items()}
        return cls(family, params, dims, build)

    def distribution(self, detach: bool = False) -> Distribution:
        params = {k: v.detach() for k, v in self.params.items()} if detach else self.params
        fn = self.build(params)
        return fn.to_event(self.event_dims) if self.event_dims else fn


class FreeParameters(Messenger):
    """At each latent site of a guide, the site's distribution replaced by the same family with free
    per-point parameters (:class:`FreeSite`), the same for every call.

    The first run records the guide's own distributions as the initial values; later runs must
    meet the same sites. ``detach``: the parameters enter as constants (for estimates after the fit).
    Use it as ``FreeParameters()(guide)`` inside the particle plate, outside the guide's data
    plate, as :func:`pyrovae.traces.particle_traces` places the guide.
    """

    def __init__(self, sites: dict[str, FreeSite] | None = None, detach: bool = False):
        super().__init__()
        self.sites: dict[str, FreeSite] = {} if sites is None else sites
        self.initializing = sites is None
        self.detach = detach

    def _pyro_sample(self, msg) -> None:
        if msg["is_observed"] or site_is_subsample(msg):
            return
        name = msg["name"]
        if name not in self.sites:
            if not self.initializing:
                raise PyrovaeError(f"the guide sampled site {name!r}, which it did not sample when q* was initialized")
            self.sites[name] = FreeSite.like(name, msg["fn"])
        msg["fn"] = self.sites[name].distribution(self.detach)

    def parameters(self) -> list[torch.Tensor]:
        return [p for site in self.sites.values() for p in site.params.values()]

    def frozen(self) -> "FreeParameters":
        """The same parameters as constants."""
        return FreeParameters(self.sites, detach=True)

    def stl_log_q(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """Σ_s log q*_s(z_s) at the draws ``values`` ({site: (K, B, *event)}), the parameters held
        fixed: (K, B)."""
        return sum(self.sites[name].distribution(detach=True).log_prob(z) for name, z in values.items())


# ---------------------------------------------------------------- which sites depend on which


class _LatentParents(Messenger):
    """Record, at each latent site, the earlier latent sites its log-density depends on: each drawn
    value becomes a fresh leaf tensor, and the site's log-density at its own (detached) value is
    differentiated with respect to the earlier leaves."""

    def __init__(self):
        super().__init__()
        self.leaves: dict[str, torch.Tensor] = {}
        self.parents: dict[str, list[str]] = {}

    def _pyro_post_sample(self, msg) -> None:
        if msg["is_observed"] or site_is_subsample(msg):
            return
        name = msg["name"]
        found = []
        log_p = msg["fn"].log_prob(msg["value"].detach())
        if self.leaves and log_p.requires_grad:
            earlier = list(self.leaves.items())
            grads = torch.autograd.grad(log_p.sum(), [v for _, v in earlier], allow_unused=True, retain_graph=True)
            found = [n for (n, _), g in zip(earlier, grads) if g is not None]
        self.parents[name] = found
        leaf = msg["value"].detach().requires_grad_()
        msg["value"] = leaf
        self.leaves[name] = leaf


def latent_parents(program: Callable, x: torch.Tensor) -> dict[str, list[str]]:
    """For each latent site of ``program(x)`` (a model or a guide), in order, the latent sites drawn
    before it that its distribution depends on (through autograd, on the first two points)."""
    probe = _LatentParents()
    with torch.enable_grad(), fast_context(), poutine.block():
        probe(program)(x[:2])
    return probe.parents


def _dependent_site(parents: dict[str, list[str]]) -> tuple[str, list[str]] | None:
    for name, found in parents.items():
        if found:
            return name, found
    return None


# ---------------------------------------------------------------- the fit


@dataclass(frozen=True)
class GapSettings:
    """How q* is fitted and the gaps estimated."""

    steps: int = 300  # Adam steps per point
    lr: float = 0.02  # Adam's learning rate for the first half of the steps, then linearly down to 0
    num_particles: int = 8  # draws per point per step
    particles_elbo: int = 100  # draws per point for ELBO[q] and ELBO[q*]
    num_samples: int = 1000  # importance samples per point for log p(x), q* the proposal
    batch_size: int = 100  # points optimized together (memory: Adam's state and the draws of one batch)
    chunk_size: int | None = None  # importance samples per pass (default: all at once)

    def check(self) -> None:
        """Raise PyrovaeError naming the first bad field in backquotes (`steps`)."""
        for name in ("steps", "num_particles", "particles_elbo", "num_samples", "batch_size"):
            if getattr(self, name) < 1:
                raise PyrovaeError(f"`{name}` must be at least 1, got {getattr(self, name)}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise PyrovaeError(f"`chunk_size` must be at least 1, got {self.chunk_size}")
        if not self.lr > 0:
            raise PyrovaeError(f"`lr` must be positive, got {self.lr}")

    def to_dict(self) -> dict:
        return {"steps": self.steps, "lr": self.lr, "num_particles": self.num_particles,
                "particles_elbo": self.particles_elbo, "num_samples": self.num_samples}


def lr_factor(step: int, steps: int) -> float:
    """The learning rate's multiplier before step ``step`` (0-based) of ``steps``: 1 for the first
    half, then falling linearly toward 0 (2/steps at the last step)."""
    return min(1.0, 2.0 * (1.0 - step / steps))


def stl_elbo(model: Callable, guide: Callable, free: FreeParameters, x: torch.Tensor, num_particles: int) -> torch.Tensor:
    """ELBO(x_n) ≈ (1/K) Σ_k [log p(x_n, z_k) − log q*(z_k | x_n)], z_k ~ q*(·|x_n), (B,), with log q*
    evaluated at fixed parameters: the same value as the plain estimate, and the "sticking the
    landing" gradient (Roeder et al. 2017), whose variance vanishes where q* is the posterior."""
    guide_trace, model_trace = particle_traces(model, free(guide), x, num_particles)
    shape = torch.Size([num_particles, len(x)])
    log_joint = sum(unscaled_log_prob(name, site, shape) for name, site in sample_sites(model_trace))  # (K, B)
    return (log_joint - free.stl_log_q(latent_values(guide_trace))).mean(0)


def fit_optimal(model: Callable, guide: Callable, x: torch.Tensor, settings: GapSettings,
                on_step: Callable[[], None] | None = None) -> tuple[FreeParameters, torch.Tensor]:
    """q*(z | x_n) for each of the B points of x: Adam on −Σ_n ELBO(x_n) over the free parameters,
    from the guide's own distributions, ``settings.steps`` steps of ``settings.num_particles`` draws.

    Returns the fitted parameters and the per-step ELBO estimates, (steps, B) float64 (the
    convergence check reads them). The guide's and the model's own parameters are not changed.
    """
    free = FreeParameters()
    with torch.no_grad():
        poutine.trace(free(guide)).get_trace(x)
    params = free.parameters()
    optimizer = torch.optim.Adam(params, lr=settings.lr)
    history = torch.empty(settings.steps, len(x), dtype=torch.float64)
    for step in range(settings.steps):
        for group in optimizer.param_groups:
            group["lr"] = settings.lr * lr_factor(step, settings.steps)
        elbo = stl_elbo(model, guide, free, x, settings.num_particles)
        for p, g in zip(params, torch.autograd.grad(-elbo.sum(), params)):
            p.grad = g
        optimizer.step()
        history[step] = elbo.detach().double().cpu()
        if on_step is not None:
            on_step()
    return free, history


def _rise(late: torch.Tensor, early: torch.Tensor) -> Estimate:
    """mean(late) − mean(early) over windows of W steps each, (W, B) → (B,), with the standard error
    √(v_late/W + v_early/W), v the variance of one step's estimate in each window, taken from
    successive differences (v ≈ mean (h_{t+1} − h_t)² / 2, which a slow trend barely moves)."""
    def v(window):
        return window.diff(dim=0).pow(2).mean(0) / 2

    W = late.shape[0]
    return Estimate(late.mean(0) - early.mean(0), ((v(late) + v(early)) / W).sqrt())


def convergence(history: torch.Tensor) -> tuple[Estimate, Estimate]:
    """Two rises of the per-step ELBO estimates, per point, history (steps, B) → (B,) each: over the
    last tenth of the steps (mean of the last W estimates minus the mean of the W before, W =
    ⌈steps/10⌉), and over the annealed second half (the last W minus the W before the midpoint).

    With the learning rate annealed, the first is small even where q* is far from its optimum; the
    second is not: a q* that reached its optimum in the first half gains only the jitter of Adam's
    constant-rate phase in the second. Both are 0 within their s.e. for a converged fit; nan with
    fewer than 4 steps.
    """
    steps, B = history.shape
    W = min(max(1, math.ceil(CONVERGENCE_WINDOW * steps)), steps // 2)
    if W < 2:
        nan = torch.full((B,), math.nan, dtype=torch.float64)
        return Estimate(nan, nan.clone()), Estimate(nan.clone(), nan.clone())
    mid = steps // 2
    return _rise(history[-W:], history[-2 * W:-W]), _rise(history[-W:], history[max(0, mid - W):max(W, mid)])


def approximation_gap(log_px: Estimate, elbo_optimal: Estimate) -> Estimate:
    """log p(x) − ELBO[q*] ≈ KL(q* ‖ p(z|x)) ≥ 0: the family's limit (independent draws, s.e. in quadrature)."""
    return estimators.difference(log_px, elbo_optimal)


def amortization_gap(elbo_optimal: Estimate, elbo: Estimate) -> Estimate:
    """ELBO[q*] − ELBO[q] = KL(q ‖ p(z|x)) − KL(q* ‖ p(z|x)) ≥ 0 for a fitted q*: the encoder's shortfall."""
    return estimators.difference(elbo_optimal, elbo)


def check_continuous(model: Callable, guide: Callable, x: torch.Tensor, what: str = "`gaps`") -> None:
    """PyrovaeError, in one line naming ``what``, for a model with discrete latent sites (summed out,
    enumerated or drawn): q* and the aggregate posterior are densities of continuous latents."""
    discrete = contract.check(model, guide, x[:2])
    if discrete.any:
        sites = ", ".join(discrete.summed + discrete.enumerated + discrete.sampled)
        raise PyrovaeError(f"{what} does not apply to a model with discrete latent sites ({sites}): evaluate without it")


def check_supported(model: Callable, guide: Callable, x: torch.Tensor) -> dict[str, str]:
    """The family of each latent site of the guide, {site: family}; PyrovaeError, in one line, for a
    model with discrete latent sites (:func:`check_continuous`), a site outside :data:`FAMILIES` or
    one whose distribution depends on another latent sample."""
    check_continuous(model, guide, x)
    dependent = _dependent_site(latent_parents(guide, x))
    if dependent is not None:
        name, found = dependent
        raise PyrovaeError(
            f"the inference gaps are not supported for this guide: its site {name!r} depends on the latent sample(s) "
            f"{', '.join(map(repr, found))}, so the family of q(z|x) includes the shared conditioning network and its "
            "per-point optimum q* is not defined here"
        )
    with torch.no_grad(), fast_context(), poutine.block():
        fns = latent_distributions(guide, x[:2])
    return {name: _family(name, fn)[0] for name, fn in fns.items()}


@dataclass
class Gaps:
    """Per-point gaps of N points, each (N,), in nats, and the settings that produced them.

    ``log_px`` is importance-sampled with q* as the proposal (``khat``: its PSIS k̂); ``elbo`` is
    ELBO[q], the encoder's; ``elbo_optimal`` ELBO[q*]; ``rise`` the convergence check of
    :func:`convergence`. Standard errors are Monte Carlo ones, per point.
    """

    log_px: Estimate
    elbo: Estimate
    elbo_optimal: Estimate
    approximation: Estimate
    amortization: Estimate
    khat: torch.Tensor
    rise: Estimate
    rise_annealed: Estimate
    settings: dict
    families: dict[str, str] = field(default_factory=dict)

    @property
    def total(self) -> Estimate:
        """log p(x) − ELBO[q] = approximation + amortization, from the gaps' own estimates."""
        return estimators.difference(self.log_px, self.elbo)

    @property
    def num_points(self) -> int:
        return self.approximation.value.numel()

    def still_rising(self) -> torch.Tensor:
        """(N,) bool: the ELBO rose over the annealed second half of the steps by more than 3 s.e.
        and more than ``RISE_TOLERANCE`` nats: q* had not settled when the learning rate began to
        fall, so more steps would likely raise ELBO[q*]."""
        rise = self.rise_annealed
        return (rise.value > RISE_TOLERANCE) & ~(rise.value <= 3 * rise.stderr)

    def summary(self) -> dict:
        """Means over points with their standard errors across points (data variation), and the check."""
        rising = self.still_rising()
        return {
            "num_points": self.num_points,
            **self.settings,
            "families": self.families,
            "log_px": self.log_px.mean(),
            "elbo": self.elbo.mean(),
            "elbo_optimal": self.elbo_optimal.mean(),
            "approximation": self.approximation.mean(),
            "amortization": self.amortization.mean(),
            "total": self.total.mean(),
            "khat": diagnostics.khat_summary(self.khat),
            "convergence": {"rise_last_tenth_mean": torch.nanmean(self.rise.value).item(), "rise_last_tenth_max": _nanmax(self.rise.value),
                            "rise_second_half_mean": torch.nanmean(self.rise_annealed.value).item(),
                            "rise_second_half_max": _nanmax(self.rise_annealed.value),
                            "share_still_rising": rising.double().mean().item()},
        }

    def per_point(self) -> dict[str, list]:
        out = {"gap_log_px": self.log_px, "gap_elbo": self.elbo, "elbo_optimal": self.elbo_optimal,
               "approximation_gap": self.approximation, "amortization_gap": self.amortization,
               "elbo_optimal_rise_last_tenth": self.rise, "elbo_optimal_rise_second_half": self.rise_annealed}
        lists = {}
        for name, e in out.items():
            lists[name] = e.value.tolist()
            lists[name + "_stderr"] = e.stderr.tolist()
        lists["gap_khat"] = self.khat.tolist()
        return lists

    def rows(self) -> list[tuple[str, float, float]]:
        """(name, mean, s.e. across points) for a table."""
        s = self.summary()
        return [
            ("  approximation gap log p(x) − ELBO[q*]", *s["approximation"]),
            ("  amortization gap ELBO[q*] − ELBO[q]", *s["amortization"]),
            ("  ELBO[q*], q fitted to each point", *s["elbo_optimal"]),
            ("  log p(x), q* as proposal", *s["log_px"]),
        ]

    def notes(self) -> list[str]:
        s = self.summary()
        c, kh = s["convergence"], s["khat"]
        families = ", ".join(f"{site}: {family}" for site, family in self.families.items())
        return [
            f"q* per point ({families}): {s['steps']} Adam steps of {s['num_particles']} draws, lr {s['lr']:g} "
            f"(falling to 0 over the second half); log p(x) with q* from K={s['num_samples']}, k̂ > 0.7 at "
            f"{kh['share_above_0.7']:.1%} of points",
            f"q* convergence: the per-step ELBO rose by {c['rise_last_tenth_mean']:.4f} on average (max "
            f"{c['rise_last_tenth_max']:.4f}) over the last tenth of the steps, {c['rise_second_half_mean']:.4f} (max "
            f"{c['rise_second_half_max']:.4f}) over the annealed second half; more than 3 s.e. and {RISE_TOLERANCE} nats "
            f"over the second half at {c['share_still_rising']:.1%} of points" + ("" if c["share_still_rising"] < 0.05 else
            ": q* is not converged there, so the approximation gap is overstated and the amortization gap "
            "understated; use more steps"),
        ]


def inference_gaps(model: Callable, guide: Callable, x: torch.Tensor, settings: GapSettings | None = None,
                   progress: bool = False, seed: int | None = None, first_row: int = 0) -> Gaps:
    """The approximation and amortization gaps of each point of x (N, P) (see the module docstring).

    Per batch of ``settings.batch_size`` points: q* fitted (:func:`fit_optimal`); then from fresh,
    independent draws ELBO[q] and ELBO[q*] (``particles_elbo`` each) and log p(x) with q* as the
    proposal (``num_samples``). Memory is that of one batch whatever N is. With ``seed``, the batch
    starting at row r draws from a stream seeded by (seed, ``first_row`` + r).

    Raises PyrovaeError for a guide outside the supported families or whose sites depend on other
    latent samples.
    """
    settings = GapSettings() if settings is None else settings
    settings.check()
    if len(x) == 0:
        raise PyrovaeError("no data points for the inference gaps")
    check_supported(model, guide, x)
    N = len(x)
    out: dict[str, torch.Tensor] = {}
    families: dict[str, str] = {}

    def put(key: str, rows: slice, e: Estimate) -> None:
        for suffix, t in (("", e.value), ("_stderr", e.stderr)):
            out.setdefault(key + suffix, torch.full((N,), math.nan, dtype=torch.float64))[rows] = t.detach().double().cpu()

    with fast_context(), tqdm(total=N, disable=not progress, unit="point", dynamic_ncols=True, desc="q* per point") as bar:
        for start in range(0, N, settings.batch_size):
            rows = slice(start, min(start + settings.batch_size, N))
            xb = x[rows]
            if seed is not None:
                torch.manual_seed(batch_seed(seed, first_row + start, *GAPS_STREAM))
            free, history = fit_optimal(model, guide, xb, settings,
                                        on_step=lambda n=len(xb): bar.update(n / settings.steps))
            families.update({name: site.family for name, site in free.sites.items()})
            fixed = free.frozen()
            elbo = estimators.elbo(evidence.log_weights(model, guide, xb, settings.particles_elbo, analytic_kl=False).log_w.double())
            optimal = fixed(guide)
            elbo_optimal = estimators.elbo(
                evidence.log_weights(model, optimal, xb, settings.particles_elbo, analytic_kl=False).log_w.double())
            log_w = evidence.log_weights(model, optimal, xb, settings.num_samples, settings.chunk_size, analytic_kl=False).log_w.double()
            log_px = estimators.log_px(log_w)
            put("log_px", rows, log_px)
            put("elbo", rows, elbo)
            put("elbo_optimal", rows, elbo_optimal)
            put("approximation", rows, approximation_gap(log_px, elbo_optimal))
            put("amortization", rows, amortization_gap(elbo_optimal, elbo))
            rise, rise_annealed = convergence(history)
            put("rise", rows, rise)
            put("rise_annealed", rows, rise_annealed)
            out.setdefault("khat", torch.full((N,), math.nan, dtype=torch.float64))[rows] = diagnostics.psis_khat(log_w).cpu()

    def estimate(key: str) -> Estimate:
        return Estimate(out[key], out[key + "_stderr"])

    return Gaps(log_px=estimate("log_px"), elbo=estimate("elbo"), elbo_optimal=estimate("elbo_optimal"),
                approximation=estimate("approximation"), amortization=estimate("amortization"), khat=out["khat"],
                rise=estimate("rise"), rise_annealed=estimate("rise_annealed"), settings=settings.to_dict(),
                families=families)


# ---------------------------------------------------------------- ELBO surgery


def latent_distributions(guide: Callable, x: torch.Tensor) -> dict[str, Distribution]:
    """{site: q(z_s | x, ·)} of one run of ``guide(x)``, each of batch (B,) as the data plate gives it."""
    trace = poutine.trace(guide).get_trace(x)
    return {name: site["fn"] for name, site in sample_sites(trace) if not site["is_observed"]}


def aggregate_log_density(z: torch.Tensor, components: list[Distribution], num_points: int,
                          max_elements: int = 1 << 22) -> torch.Tensor:
    """log q(z) = log (1/N) Σ_m q(z | x_m), the aggregate posterior of the N points whose
    distributions (each of batch (B_c,), in blocks) are ``components``: z (..., *event) → (...),
    a running logsumexp over blocks of at most about ``max_elements`` terms at a time."""
    event_shape = components[0].event_shape
    batch = z.shape[: z.dim() - len(event_shape)]
    flat = z.reshape(-1, 1, *event_shape)  # (Z, 1, *event)
    total = torch.full((flat.shape[0],), -math.inf, dtype=torch.float64, device=z.device)
    per_value = max(1, math.prod(event_shape))
    for fn in components:
        rows = max(1, max_elements // (per_value * fn.batch_shape[0]))
        for start in range(0, flat.shape[0], rows):
            part = fn.log_prob(flat[start:start + rows]).double()  # (rows, B_c)
            total[start:start + rows] = torch.logaddexp(total[start:start + rows], torch.logsumexp(part, -1))
    return (total - math.log(num_points)).reshape(batch)


@dataclass
class SiteSurgery:
    """ELBO surgery at one latent site, per point (N,): ``kl`` = E_q[log q(z|x_n) − log p(z)] (the
    site's KL term), ``mutual_information`` = E_q[log q(z|x_n) − log q(z)] (its mean is I_q(x; z)),
    ``marginal_kl`` = E_q[log q(z) − log p(z)] (its mean is KL(q(z) ‖ p(z))); Monte Carlo standard
    errors per point. kl = mutual_information + marginal_kl draw by draw. ``marginal_kl`` and ``kl``
    are None where p(z) at the site depends on other latents (``note`` says so)."""

    mutual_information: Estimate
    kl: Estimate | None
    marginal_kl: Estimate | None
    dims: int
    active_units: int | None = None
    note: str = ""


@dataclass
class Surgery:
    """ELBO surgery of N points at each latent site it applies to; ``skipped``: site → why not."""

    sites: dict[str, SiteSurgery]
    skipped: dict[str, str]
    num_points: int
    num_particles: int

    @property
    def max_mutual_information(self) -> float:
        """log N: the empirical aggregate posterior bounds I_q by it."""
        return math.log(self.num_points)

    def summary(self) -> dict:
        """Means over points with their standard errors across points (data variation)."""
        return {
            "num_points": self.num_points,
            "num_particles": self.num_particles,
            "max_mutual_information": self.max_mutual_information,
            "sites": {site: {"mutual_information": s.mutual_information.mean(),
                             "kl": None if s.kl is None else s.kl.mean(),
                             "marginal_kl": None if s.marginal_kl is None else s.marginal_kl.mean(),
                             "dims": s.dims, "active_units": s.active_units, "note": s.note}
                      for site, s in self.sites.items()},
            "skipped": self.skipped,
        }

    def per_point(self) -> dict[str, list]:
        out = {}
        for site, s in self.sites.items():
            for name, e in (("mutual_information", s.mutual_information), ("kl", s.kl), ("marginal_kl", s.marginal_kl)):
                if e is not None:
                    out[f"{name}_{site}"] = e.value.tolist()
        return out

    def rows(self) -> list[tuple[str, float, float]]:
        rows = []
        for site, s in self.summary()["sites"].items():
            if s["kl"] is not None:
                rows.append((f"  E_x KL(q(z|x) ‖ p(z)) at {site}", *s["kl"]))
            rows.append((f"    I_q(x; {site}), mutual information", *s["mutual_information"]))
            if s["marginal_kl"] is not None:
                rows.append((f"    KL(q({site}) ‖ p({site})), aggregate posterior", *s["marginal_kl"]))
        return rows

    def notes(self) -> list[str]:
        notes = [f"ELBO surgery (Hoffman & Johnson 2016) over the {self.num_points} points, q(z) their aggregate posterior: "
                 f"I_q ≤ log N = {self.max_mutual_information:.2f}, biased low as an estimate of the population's"]
        notes += [f"  {site}: {s.note}" for site, s in self.sites.items() if s.note]
        notes += [f"  {site}: I_q(x; {site}) is at its bound log N: the code tells these {self.num_points} points apart, "
                  f"it carries at least {self.max_mutual_information:.2f} nats and KL(q({site}) ‖ p({site})) is overstated "
                  "by the rest; more points raise the bound (the cost grows as N²)"
                  for site in self.saturated()]
        notes += [f"  {site}: no ELBO surgery, {why}" for site, why in self.skipped.items()]
        return notes

    def saturated(self) -> list[str]:
        """The sites whose I_q is within ``SATURATION`` nats of log N: the estimate is at its ceiling,
        and the code's information about x may be far above it."""
        return [site for site, s in self.sites.items()
                if s.mutual_information.value.mean().item() > self.max_mutual_information - SATURATION]


def surgery(model: Callable, guide: Callable, x: torch.Tensor, num_particles: int = 10, batch_size: int = 256,
            progress: bool = False) -> Surgery:
    """ELBO surgery of the N points of x (N, P) at each latent site (see the module docstring).

    q(z | x_n) of every point is kept (N × the site's parameters) to form the aggregate posterior;
    each point's ``num_particles`` draws are scored under all N of them, in blocks: time O(N² ·
    num_particles · D). A guide site whose distribution depends on other latent samples is skipped
    (its q(z_s | x) is not the site's distribution); where the prior at the site depends on other
    latents, p(z_s) has no density here and only I_q is reported.
    """
    if num_particles < 1:
        raise PyrovaeError(f"`num_particles` must be at least 1, got {num_particles}")
    if batch_size < 1:
        raise PyrovaeError(f"`batch_size` must be at least 1, got {batch_size}")
    N = len(x)
    if N < 2:
        raise PyrovaeError(f"ELBO surgery needs at least 2 points (an aggregate posterior), got {N}")
    check_continuous(model, guide, x, "`surgery`")
    guide_parents, model_parents = latent_parents(guide, x), latent_parents(model, x)
    skipped = {name: f"its guide distribution depends on the latent sample(s) {', '.join(map(repr, found))}"
               for name, found in guide_parents.items() if found}
    components: dict[str, list[Distribution]] = {}
    with fast_context(), torch.no_grad():
        for start in range(0, N, batch_size):
            for name, fn in latent_distributions(guide, x[start:start + batch_size]).items():
                if name not in skipped:
                    components.setdefault(name, []).append(fn)
        parts: dict[str, dict[str, list[torch.Tensor]]] = {name: {"q": [], "agg": [], "p": []} for name in components}
        with tqdm(total=N, disable=not progress, unit="point", dynamic_ncols=True, desc="ELBO surgery") as bar:
            for start in range(0, N, batch_size):
                xb = x[start:start + batch_size]
                shape = torch.Size([num_particles, len(xb)])
                guide_trace, model_trace = particle_traces(model, guide, xb, num_particles)
                for name, fns in components.items():
                    q_site, p_site = guide_trace.nodes[name], model_trace.nodes[name]
                    parts[name]["q"].append(unscaled_log_prob(name, q_site, shape).double().cpu())  # (M, B)
                    parts[name]["p"].append(unscaled_log_prob(name, p_site, shape).double().cpu())
                    parts[name]["agg"].append(aggregate_log_density(q_site["value"], fns, N).cpu())
                bar.update(len(xb))
    sites = {}
    for name, p in parts.items():
        log_q, log_agg, log_p = (torch.cat(p[k], 1) for k in ("q", "agg", "p"))  # (M, N)
        prior_free = not model_parents.get(name)
        means = _means(components[name])
        active = None if means is None or N < 2 else int(latents.active_units(means)[1].sum())
        sites[name] = SiteSurgery(
            mutual_information=estimators.elbo(log_q - log_agg),
            kl=estimators.elbo(log_q - log_p) if prior_free else None,
            marginal_kl=estimators.elbo(log_agg - log_p) if prior_free else None,
            dims=math.prod(components[name][0].event_shape),
            active_units=active,
            note="" if prior_free else (f"the prior depends on {', '.join(map(repr, model_parents[name]))}: "
                                        "p(z) at the site has no density here, I_q only"),
        )
    return Surgery(sites, skipped, N, num_particles)


def _means(components: list[Distribution]) -> torch.Tensor | None:
    try:
        return torch.cat([fn.mean.reshape(fn.batch_shape[0], -1) for fn in components]).double().cpu()
    except NotImplementedError:
        return None


def _nanmax(t: torch.Tensor) -> float:
    ok = ~t.isnan()
    return t[ok].max().item() if ok.any() else math.nan
