"""Evaluation of a trained (model, guide) pair on a data set: every estimator, per data point.

For each point, one set of draws z ~ q(z | x) gives the ELBO (split into reconstruction and
per-site KL), and an independent set of K draws gives the log-weights from which come the IWAE
bounds L_k, the importance-sampled log p(x), the gap log p(x) − ELBO and the reliability of the
weights (ESS, PSIS k̂). Points are processed a batch
at a time and particles a chunk at a time, so memory is bounded by chunk × batch activations plus
the K × batch log-weights that PSIS needs.

With ``gaps``, the gap is split into the approximation and amortization gaps by fitting q* to each
point, and with ``surgery`` the KL term is split into the mutual information I_q(x; z) and
KL(q(z) ‖ p(z)) (:mod:`pyrovae.gaps`, where the formulas and what each number says are).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from . import contract, diagnostics, distributed, estimators
from . import gaps as gaps_
from .errors import PyrovaeError
from .estimators import Estimate, KLEstimate
from .evidence import log_weights
from .fast_eval import CapturedLogWeights
from .traces import class_probabilities
from .seeds import batch_seed
from .context import fast_context

DEFAULT_IWAE_KS = (1, 5, 50, 5000)
PASS_SIZE = {"cpu": 5000, "cuda": 500_000}  # draws per pass when the batch size is not given, by device


CAPTURED_POINTS_PER_PASS = 10  # on CPU with the captured pass: points per pass, their draws in chunks (default_chunk_size)


def default_batch_size(num_samples: int, device, captured: bool = False) -> int:
    """Points per pass: about ``PASS_SIZE[device type]`` draws, so that a pass is large enough to
    keep the device busy (a GPU is bound by kernel launches, so it takes many points per pass) and
    small enough that memory stays flat. With the captured pass on CPU (``captured``), at least
    ``CAPTURED_POINTS_PER_PASS`` points, their K draws in chunks (:func:`default_chunk_size`), which
    shares the costs paid once per pass (the ELBO pass, PSIS k̂) among them. The sizes were chosen
    by ``benchmarks/evaluate_speed.py`` (``benchmarks/results/``)."""
    points = max(1, PASS_SIZE.get(torch.device(device).type, PASS_SIZE["cpu"]) // num_samples)
    return max(points, CAPTURED_POINTS_PER_PASS) if captured and torch.device(device).type == "cpu" else points


def default_chunk_size(num_samples: int, batch_size: int, device) -> int | None:
    """Particles per pass for ``batch_size`` points: all K (None) where the pass holds at most
    ``PASS_SIZE`` draws, else ``PASS_SIZE`` / batch_size, so that memory stays that of one pass."""
    per_pass = PASS_SIZE.get(torch.device(device).type, PASS_SIZE["cpu"])
    return None if batch_size * num_samples <= per_pass else max(1, per_pass // batch_size)


@dataclass
class Evaluation:
    """Per-point results for N points (each field (N,)) and the settings that produced them.

    Every value is in nats per data point, with its Monte Carlo standard error per point
    (:class:`pyrovae.estimators.Estimate`, ``value`` and ``stderr`` both (N,)). :meth:`summary` gives
    the means over points with their standard errors across points, :meth:`table` the printed table,
    :meth:`per_point` lists for JSON.

    Attributes:
        num_samples: K, the importance samples per point behind ``log_px``, ``iwae``, ``ess``, ``khat``.
        elbo: ELBO(x) = E_q[log p(x, z) − log q(z|x)], from ``particles_elbo`` draws.
        reconstruction: E_q[log p(x|z)], the observed sites' term of the ELBO, same draws.
        kl: per latent site, KL(q ‖ p) by Monte Carlo and in closed form where one exists
            (:class:`pyrovae.estimators.KLEstimate`).
        iwae: k → the IWAE bound L_k(x) = E[log (1/k) Σ_{i≤k} w_i] from the K draws.
        log_px: log p̂(x) = logsumexp_k log w_k − log K, importance sampled with the guide as proposal;
            biased low for finite K.
        gap: log p̂(x) − ELBO(x) ≈ KL(q(z|x) ‖ p(z|x)).
        ess: effective sample size (Σ_k w_k)² / Σ_k w_k² of the K weights, in [1, K].
        khat: PSIS Pareto k̂ of the K weights (:mod:`pyrovae.diagnostics`): above 0.7 the point's
            ``log_px`` is unreliable; at or below 0.7 it is not thereby shown reliable.
        note: a remark the table prints last (empty by default).
        log_w: the log-weights (K, N), kept when ``evaluate(..., keep_log_weights=True)``.
        data_dim: P, for bits per dimension −log p̂(x) / (P log 2).
        gaps: the approximation and amortization gaps, when asked for (:mod:`pyrovae.gaps`).
        surgery: the ELBO surgery of these points, when asked for (:mod:`pyrovae.gaps`).
    """

    num_samples: int  # K, importance samples per point
    elbo: Estimate
    reconstruction: Estimate
    kl: dict[str, KLEstimate]
    iwae: dict[int, Estimate]
    log_px: Estimate
    gap: Estimate
    ess: torch.Tensor
    khat: torch.Tensor
    note: str = ""
    log_w: torch.Tensor | None = None  # (K, N) when kept
    data_dim: int | None = None  # P, for bits per dimension
    gaps: gaps_.Gaps | None = None  # the approximation and amortization gaps, when asked for
    surgery: gaps_.Surgery | None = None  # ELBO surgery of these points, when asked for

    def gaps_consistency(self) -> Estimate:
        """(approximation + amortization) − gap per point: the gaps' sum (log p(x) with q* as the
        proposal, ELBO[q] drawn anew) minus this evaluation's gap (log p(x) with q, its own ELBO
        draws); independent estimates of KL(q ‖ p(z|x)), so 0 within the standard errors unless an
        importance-sampling estimate is off (see the two k̂)."""
        if self.gaps is None:
            raise PyrovaeError("the gaps were not computed: evaluate with gaps=True")
        return estimators.difference(self.gaps.total, self.gap)

    def summary(self) -> dict:
        """Means over points with their standard errors across points (nats), and the k̂ summary."""
        s = {
            "num_points": int(self.elbo.value.numel()),
            "num_samples": self.num_samples,
            "elbo": self.elbo.mean(),
            "reconstruction": self.reconstruction.mean(),
            "kl": {site: {"method": k.method, "value": k.best.mean(), "monte_carlo": k.monte_carlo.mean(),
                          "analytic": None if k.analytic is None else k.analytic.mean(),
                          "why_not_analytic": k.why_not_analytic,
                          "z_score_mean": None if k.z_score is None else torch.nanmean(k.z_score).item()}
                   for site, k in self.kl.items()},
            "iwae": {str(k): e.mean() for k, e in self.iwae.items()},
            "log_px": self.log_px.mean(),
            "gap": self.gap.mean(),
            "ess": {"mean": self.ess.mean().item(), "min": self.ess.min().item()},
            "khat": diagnostics.khat_summary(self.khat),
            "note": self.note,
        }
        if self.data_dim:
            s["bits_per_dim"] = -s["log_px"][0] / (self.data_dim * math.log(2))
        if self.gaps is not None:
            s["gaps"] = {**self.gaps.summary(), "sum_minus_gap": self.gaps_consistency().mean()}
        if self.surgery is not None:
            s["surgery"] = self.surgery.summary()
        return s

    def per_point(self) -> dict[str, list]:
        out = {"elbo": self.elbo.value, "elbo_stderr": self.elbo.stderr, "reconstruction": self.reconstruction.value,
               "log_px": self.log_px.value, "log_px_stderr": self.log_px.stderr, "gap": self.gap.value,
               "ess": self.ess, "khat": self.khat}
        for site, k in self.kl.items():
            out[f"kl_{site}"] = k.best.value
        for k, e in self.iwae.items():
            out[f"iwae_{k}"] = e.value
        lists = {name: v.tolist() for name, v in out.items()}
        if self.gaps is not None:
            lists.update(self.gaps.per_point())
        if self.surgery is not None:
            lists.update(self.surgery.per_point())
        return lists

    def table(self) -> str:
        """A readable table of the summary."""
        s = self.summary()
        rows = [("ELBO", *s["elbo"]), ("  reconstruction E_q log p(x|z)", *s["reconstruction"])]
        not_applicable = []  # (site, why): the closed form exists but is not that site's KL term
        for site, k in s["kl"].items():
            rows.append((f"  KL(q‖p) at {site}, Monte Carlo", *k["monte_carlo"]))
            why = k.get("why_not_analytic") or "no closed form"
            if k["analytic"] is None:
                short, _, detail = why.partition(": ")
                rows.append((f"  KL(q‖p) at {site}, analytic: {short}", math.nan, math.nan))
                if detail:
                    not_applicable.append((site, detail))
            else:
                rows.append((f"  KL(q‖p) at {site}, analytic", *k["analytic"]))
        for k, v in s["iwae"].items():
            rows.append((f"IWAE bound L_{k}", *v))
        rows.append((f"log p(x), importance sampled (K={self.num_samples})", *s["log_px"]))
        rows.append(("gap log p(x) − ELBO ≈ KL(q‖posterior)", *s["gap"]))
        if self.gaps is not None:
            rows += self.gaps.rows()
            rows.append(("  approximation + amortization − gap", *s["gaps"]["sum_minus_gap"]))
        if self.surgery is not None:
            rows += self.surgery.rows()
        width = max(len(r[0]) for r in rows)
        lines = [f"{'per data point, nats':<{width}}  {'mean':>10}  {'± s.e.':>8}"]
        lines += [f"{name:<{width}}  {v:>10.3f}  {e:>8.3f}" if not math.isnan(v) else f"{name:<{width}}  {'—':>10}"
                  for name, v, e in rows]
        lines += [f"KL at {site}, analytic not applicable: {detail}; the Monte Carlo row is that site's term"
                  for site, detail in not_applicable]
        kh = s["khat"]
        lines.append(f"ESS mean {s['ess']['mean']:.1f}, min {s['ess']['min']:.1f} of K={self.num_samples}")
        lines.append(f"PSIS k̂ mean {kh['mean']:.2f}, max {kh['max']:.2f}; share of points with k̂ > 0.7: "
                     f"{kh['share_above_0.7']:.1%}")
        lines.append("  k̂ > 0.7: that point's log p(x) estimate is unreliable; k̂ ≤ 0.7 does not make it reliable (the "
                     "draws may miss part of the posterior): where the evidence matters, run AIS, evaluate --ais")
        if "bits_per_dim" in s:
            lines.append(f"bits per dimension {s['bits_per_dim']:.4f}")
        if self.gaps is not None:
            lines += self.gaps.notes()
            lines.append("approximation + amortization − gap: independent estimates, 0 within a few s.e. when both "
                         "importance-sampling estimates of log p(x) hold")
        if self.surgery is not None:
            lines += self.surgery.notes()
        lines.append(f"{s['num_points']} points; s.e. across points (data variation).")
        if self.note:
            lines.append(self.note)
        return "\n".join(lines)


COMPILE_MIN_DRAWS = 10_000_000  # N × K from which compiling pays on CPU (≈ 2000 points at K = 5000)


def compile_pays(num_points: int, num_samples: int, device) -> bool:
    """Whether ``torch.compile`` is worth its start-up cost: a compile costs seconds per shape and
    saves a share of each replay, so it pays on CPU once N × K reaches ``COMPILE_MIN_DRAWS``; on
    CUDA the eager kernels are already fused enough that compiling does not pay. The threshold was
    measured with ``benchmarks/evaluate_speed.py`` (``benchmarks/results/``)."""
    return torch.device(device).type == "cpu" and num_points * num_samples >= COMPILE_MIN_DRAWS


def importance_log_weights(
    model: Callable, guide: Callable, x: torch.Tensor, num_samples: int, chunk_size: int | None = None,
    compiled: bool = False, seed: int | None = None, row: int = 0, shard: tuple[int, int] = (0, 1),
    on_chunk: Callable[[int], None] | None = None, captured: CapturedLogWeights | None = None,
) -> torch.Tensor:
    """log w (K, B) in float64 for the B points of x, K = ``num_samples``, ``chunk_size`` particles
    at a time; with ``captured``, each chunk from that traced pass (:mod:`pyrovae.fast_eval`: the
    same draws, each signature checked against the eager pass), else from Pyro's traces. With ``seed``, chunk c is drawn from a stream seeded by (seed, ``row``, c). With
    ``shard`` = (rank, W) under torch.distributed, this process draws the chunks c ≡ rank (mod W)
    and the chunks of all processes are gathered, in order: the same K × B log-weights as one
    process with the same seed and chunk size."""
    chunk_size = num_samples if chunk_size is None else chunk_size
    if chunk_size < 1:
        raise PyrovaeError(f"`chunk_size` must be at least 1, got {chunk_size}")
    rank, size = shard
    if size > 1 and seed is None:
        raise PyrovaeError("sharing the chunks of particles among processes needs a `seed`: unseeded, the processes would draw the same samples")
    starts = range(0, num_samples, chunk_size)
    mine = {}
    for c, start in enumerate(starts):
        if c % size != rank:
            continue
        if seed is not None:
            torch.manual_seed(batch_seed(seed, row, 1 + c))
        k = min(chunk_size, num_samples - start)
        if captured is not None:
            mine[c] = captured(x, k).double()
        else:
            mine[c] = log_weights(model, guide, x, k, analytic_kl=False, compiled=compiled).log_w.double()
        if on_chunk is not None:  # this chunk and the others' of the same round
            on_chunk(min(start + size * chunk_size, num_samples) - start)
    if size > 1:
        for part in distributed.all_gather({c: w.cpu() for c, w in mine.items()}):
            mine.update({c: w.to(x.device) for c, w in part.items()})
    return torch.cat([mine[c] for c in range(len(starts))])


def cat(parts: list[Evaluation]) -> Evaluation:
    """Evaluations of consecutive blocks of points joined into one (log-weights along the points)."""
    def join(values):
        first = values[0]
        if first is None:
            return None
        if isinstance(first, torch.Tensor):
            return torch.cat(values, 1 if first.dim() == 2 else 0)
        if isinstance(first, dict):
            return {k: join([v[k] for v in values]) for k in first}
        if dataclasses.is_dataclass(first):
            return type(first)(**{f.name: join([getattr(v, f.name) for v in values]) for f in dataclasses.fields(first)})
        return first

    return join(parts)


def evaluate(
    model: Callable,
    guide: Callable,
    x: torch.Tensor,
    num_samples: int = 5000,
    iwae_ks: Sequence[int] = DEFAULT_IWAE_KS,
    particles_elbo: int = 100,
    batch_size: int | None = None,
    chunk_size: int | None = None,
    compile: bool | str = False,
    capture: bool = True,
    keep_log_weights: bool = False,
    progress: bool = False,
    seed: int | None = None,
    first_row: int = 0,
    particle_shard: tuple[int, int] = (0, 1),
    gaps: bool | gaps_.GapSettings = False,
    surgery: bool | None = None,
) -> Evaluation:
    """Evaluate on x (N, P), ``batch_size`` points at a time, in two independent passes per batch:

    1. ``particles_elbo`` draws per point: the ELBO, its reconstruction term and the KL(q ‖ p) per
       latent site, analytic and Monte Carlo;
    2. K = ``num_samples`` draws per point, ``chunk_size`` at a time: log p(x), the IWAE bounds
       L_k for k in ``iwae_ks`` (and K), the gap log p(x) − ELBO, ESS and PSIS k̂.

    ``batch_size`` defaults to :func:`default_batch_size`: a pass of about 5000 draws on CPU (eagerly,
    for K = 5000, one point with all its draws was faster than batches of points in chunks; with the
    captured pass, 10 points in chunks of :func:`default_chunk_size` draws) and 500 000 on a GPU;
    ESS and PSIS k̂ are computed for the whole pass at once.
    ``compile`` computes every site's log-density with ``torch.compile``; ``"auto"`` does so only
    where it pays for itself (:func:`compile_pays`): compiling costs about half a minute on two CPU
    cores and then runs the log-densities about 2.5× as fast, and on a GPU it was slower.
    ``capture``: the importance-sampling pass (K draws per point) traced once per chunk shape and
    replayed (:class:`pyrovae.fast_eval.CapturedLogWeights`), through ``torch.compile`` where
    ``compile`` says so; each shape is checked against the eager pass on its first chunk, with the
    same draws, and evaluated eagerly where they differ. The estimates are those of the eager pass.

    The contract, and the data against the observed site's support, are checked first on a few
    points: grey levels under a Bernoulli likelihood are refused, not scored.

    With ``seed``, the draws for the batch starting at row r come from streams seeded by
    (seed, ``first_row`` + r) and, for the importance samples, the chunk's index: the per-point
    results then do not depend on how the rows are shared among processes, as long as each
    process's ``first_row`` is a multiple of ``batch_size``, nor on how the chunks are:
    ``particle_shard`` = (rank, W) makes the W processes of a torch.distributed group evaluate the
    same points together, each drawing every W-th chunk (see :func:`importance_log_weights`).

    ``gaps``: also fit q* to each point and split the gap into the approximation and amortization
    gaps (:func:`pyrovae.gaps.inference_gaps`; True: its default settings with ``particles_elbo``,
    or a :class:`~pyrovae.gaps.GapSettings`), seeded by (seed, ``first_row`` + r) per batch as well.
    ``surgery`` (default: as ``gaps``): ELBO surgery of these points (:func:`pyrovae.gaps.surgery`),
    the aggregate posterior being theirs.

    Args:
        model: a Pyro program ``model(x)`` that keeps the model/guide contract.
        guide: a Pyro program ``guide(x)`` that samples every latent site of the model.
        x: the data points, (N, P), on the device the model is.
        num_samples: K, importance samples per point for log p(x), the IWAE bounds, ESS and k̂.
        iwae_ks: the k of the IWAE bounds L_k reported (each at most K; K is always reported).
        particles_elbo: draws per point for the ELBO, reconstruction and KL.
        batch_size: points per pass (default :func:`default_batch_size`).
        chunk_size: draws per pass within a point's K (default: all K at once).
        compile: True, False or ``"auto"`` (see above).
        capture: trace and replay the importance-sampling pass (see above); False: Pyro's traces on
            every chunk.
        keep_log_weights: keep the (K, N) log-weights in the result (``log_w``).
        progress: show a progress bar.
        seed: seeds the draws per batch and chunk (None: the global random state).
        first_row: this process's first row in the whole data set (with ``seed``).
        particle_shard: (rank, W) to share each point's chunks among W processes.
        gaps: also compute the approximation and amortization gaps.
        surgery: also compute the ELBO surgery.

    Returns:
        :class:`Evaluation`: per-point values (N,) with their Monte Carlo standard errors.

    Raises:
        PyrovaeError: a bad argument, a pair that breaks the contract, or data outside the observed
            site's support.
    """
    if num_samples < 1:
        raise PyrovaeError(f"`num_samples` must be at least 1, got {num_samples}")
    if particles_elbo < 1:
        raise PyrovaeError(f"`particles_elbo` must be at least 1, got {particles_elbo}")
    gap_settings = gaps_.GapSettings(particles_elbo=particles_elbo) if gaps is True else (gaps or None)
    if gap_settings is not None:
        gap_settings.check()
    surgery = bool(gaps) if surgery is None else surgery
    batch_size = default_batch_size(num_samples, x.device, capture) if batch_size is None else batch_size
    if batch_size < 1:
        raise PyrovaeError(f"`batch_size` must be at least 1, got {batch_size}")
    if chunk_size is not None and chunk_size < 1:
        raise PyrovaeError(f"`chunk_size` must be at least 1, got {chunk_size}")
    if len(x) == 0:
        raise PyrovaeError("no data points to evaluate")
    contract.check(model, guide, x[:8], "the data to evaluate")
    if gap_settings is not None:  # refused before the evaluation's passes, not after them
        gaps_.check_supported(model, guide, x)
    elif surgery:
        gaps_.check_continuous(model, guide, x, "`surgery`")
    if compile == "auto":
        compile = compile_pays(len(x), num_samples, x.device)
    captured = CapturedLogWeights(model, guide, "inductor" if compile else "graph") if capture else None
    if capture and chunk_size is None:
        chunk_size = default_chunk_size(num_samples, batch_size, x.device)
    ks = sorted({k for k in iwae_ks if k <= num_samples} | {num_samples})
    N = len(x)
    # Results are written into tensors of length N allocated once: keeping thousands of small
    # per-batch tensors alive between the large activations fragments the heap (RSS grew ~1 MB/point).
    out: dict[str, torch.Tensor] = {}
    log_ws = []
    note = ""

    def put(key: str, rows: slice, value: torch.Tensor | None) -> None:
        if value is not None:
            out.setdefault(key, torch.full((N,), math.nan, dtype=torch.float64))[rows] = value.detach().cpu()

    def put_estimate(key: str, rows: slice, estimate: Estimate | None) -> None:
        if estimate is not None:
            put(key, rows, estimate.value)
            put(key + "_stderr", rows, estimate.stderr)

    why_not_analytic: dict[str, str] = {}
    with fast_context(), tqdm(total=N, disable=not progress, unit="point", dynamic_ncols=True) as bar:
        for start in range(0, N, batch_size):
            rows = slice(start, min(start + batch_size, N))
            xb = x[rows]
            if seed is not None:
                torch.manual_seed(batch_seed(seed, first_row + start))
            terms = log_weights(model, guide, xb, particles_elbo, chunk_size, compiled=compile)
            elbo = estimators.elbo(terms.log_w.double())
            put_estimate("elbo", rows, elbo)
            put_estimate("reconstruction", rows, estimators.reconstruction(terms))
            for site, kl in estimators.kl(terms).items():
                if kl.why_not_analytic is not None:
                    why_not_analytic[site] = kl.why_not_analytic
                put_estimate(f"kl_mc/{site}", rows, kl.monte_carlo)
                put_estimate(f"kl_analytic/{site}", rows, kl.analytic)
                put(f"kl_z/{site}", rows, kl.z_score)
            log_w = importance_log_weights(model, guide, xb, num_samples, chunk_size, compile, seed, first_row + start,
                                           particle_shard, on_chunk=lambda k: bar.update(len(xb) * k / num_samples),
                                           captured=captured)  # (K, B)
            for k in ks:
                put_estimate(f"iwae/{k}", rows, estimators.iwae_bound(log_w, k))
            log_px = estimators.log_px(log_w)
            put_estimate("log_px", rows, log_px)
            put_estimate("gap", rows, estimators.difference(log_px, elbo))
            rel = diagnostics.reliability(log_w)
            note = rel.note
            put("ess", rows, rel.ess)
            put("khat", rows, rel.khat)
            if keep_log_weights:
                log_ws.append(log_w.cpu())

    def estimate(key: str) -> Estimate:
        return Estimate(out[key], out[key + "_stderr"])

    gap_result = surgery_result = None
    if gap_settings is not None:
        gap_result = gaps_.inference_gaps(model, guide, x, gap_settings, progress=progress, seed=seed, first_row=first_row)
    if surgery:
        if seed is not None:
            torch.manual_seed(batch_seed(seed, first_row, *gaps_.SURGERY_STREAM))
        surgery_result = gaps_.surgery(model, guide, x, progress=progress)

    sites = [key.split("/", 1)[1] for key in out if key.startswith("kl_mc/") and not key.endswith("_stderr")]
    kl = {
        site: KLEstimate(estimate(f"kl_mc/{site}"), estimate(f"kl_analytic/{site}"), out[f"kl_z/{site}"])
        if f"kl_analytic/{site}" in out else KLEstimate(estimate(f"kl_mc/{site}"), None, None, why_not_analytic.get(site))
        for site in sites
    }
    return Evaluation(
        num_samples=num_samples,
        elbo=estimate("elbo"),
        reconstruction=estimate("reconstruction"),
        kl=kl,
        iwae={k: estimate(f"iwae/{k}") for k in ks},
        log_px=estimate("log_px"),
        gap=estimate("gap"),
        ess=out["ess"],
        khat=out["khat"],
        note=note,
        log_w=torch.cat(log_ws, 1) if keep_log_weights else None,
        data_dim=x.shape[-1],
        gaps=gap_result,
        surgery=surgery_result,
    )


@torch.no_grad()
def classifier_accuracy(guide: Callable, x: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> dict[str, tuple[float, float]]:
    """{site: (accuracy, standard error)} of argmax_c q(c | x) against ``labels`` (N,), at each
    discrete guide site with class probabilities that depend on x (the M2 classifier's q(y | x); a
    uniform q, as the conditional VAE's, is no classifier and is left out)."""
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(x), batch_size):
        for site, probs in class_probabilities(guide, x[start:start + batch_size]).items():
            parts.setdefault(site, []).append(probs)
    out = {}
    for site, chunks in parts.items():
        probs = torch.cat(chunks)  # (N, C)
        if len(probs) > 1 and bool((probs == probs[:1]).all()):
            continue
        out[site] = estimators.accuracy(probs.argmax(-1).cpu(), labels.cpu())
    return out


def to_inference_data(evaluation: Evaluation):
    """Per-point log-weights and diagnostics as an arviz ``InferenceData``: group ``log_likelihood``
    holds log w with dims (chain=1, draw=K, point=N); ``observed_data`` holds log p(x), the ELBO,
    ESS and k̂ per point."""
    with warnings.catch_warnings():  # arviz 0.23 warns at import
        warnings.simplefilter("ignore")
        import arviz as az
    if evaluation.log_w is None:
        raise PyrovaeError("log-weights were not kept: evaluate with keep_log_weights=True")
    log_w = evaluation.log_w.numpy()[None]  # (1, K, N)
    return az.from_dict(
        log_likelihood={"log_w": log_w},
        observed_data={"log_px": evaluation.log_px.value.numpy(), "ess": evaluation.ess.numpy(),
                       "khat": evaluation.khat.numpy(), "elbo": evaluation.elbo.value.numpy()},
        dims={"log_w": ["point"], "log_px": ["point"], "ess": ["point"], "khat": ["point"], "elbo": ["point"]},
    )
