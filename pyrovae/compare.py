"""Comparing models on the same data points: paired differences of per-point estimates.

Two models A and B evaluated on the same N points x_1 … x_N give per-point estimates a_n and b_n
(log p(x_n) importance sampled, or the ELBO), in nats. Their mean difference

    Δ = (1/N) Σ_n d_n,   d_n = a_n − b_n

has the **paired** standard error sd(d)/√N. Points differ far more from one another than the two
models differ on any one point (an easy digit is easy for both), and pairing removes that shared
variation; the **unpaired** standard error √(se_A² + se_B²), se = sd(a)/√N, of the difference of
the two means keeps it and is usually many times larger. The per-point Monte Carlo error of each
estimate is part of d_n and so is counted in sd(d).

Where the importance weights of a point have Pareto k̂ > 0.7 in either model, its log p(x)
estimate — and so the difference at that point — is not reliable (see :mod:`pyrovae.diagnostics`).

With the inference gaps of both runs (:mod:`pyrovae.gaps`), the approximation gap
log p(x) − ELBO[q*] and the amortization gap ELBO[q*] − ELBO[q] are compared the same way, point
by point, and :func:`reading` says in one sentence whether the better run's log p(x) comes with a
smaller gap, and which. Per point ELBO[q] = log p(x) − approximation − amortization (the gaps' own
estimates), so the difference of the ELBOs is exactly the difference of log p(x) minus the
differences of the two gaps: a run's lead in the ELBO is split into the model's part and each
gap's part.

A run's evaluation is cached in RUN/evaluations/ as JSON, keyed by the split, K, the ELBO's
particles, the number of points, the seed and the SHA-256 of the checkpoint, so that comparing a
new run with old ones evaluates only the new one, and more training invalidates the cache.

References:
    Burda, Grosse & Salakhutdinov (2016), *Importance Weighted Autoencoders* (log p(x) with K = 5000).
    Vehtari, Simpson, Gelman, Yao & Gabry (2024), *Pareto Smoothed Importance Sampling* (k̂).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from .diagnostics import KHAT_THRESHOLD
from .errors import PyrovaeError
from .estimators import Estimate
from .factory import sha256
from .run import write_text_atomic

CACHE_FOLDER = "evaluations"
CACHE_FORMAT = 1
GAP_NAMES = ("approximation", "amortization")
"""The two gaps compared, each a per-point estimate in nats (smaller is better)."""
SIGNIFICANT = 2.0
"""A difference counts in :func:`reading` when it is more than this many paired standard errors from 0."""


class PairedDifference(NamedTuple):
    """The mean over points of a − b with its paired and unpaired standard errors (nats), and the
    share of points where a > b (ties count one half)."""

    mean: float
    paired_se: float
    unpaired_se: float
    share_a_better: float


def paired_difference(a: Estimate, b: Estimate, smaller_is_better: bool = False) -> PairedDifference:
    """Δ = mean_n (a_n − b_n) for a, b of the same N points, each (N,):

    paired s.e.   = sd_n(a_n − b_n) / √N
    unpaired s.e. = √(sd(a)²/N + sd(b)²/N)  (as if A and B had been evaluated on independent points)
    share         = (1/N) Σ_n [a_n > b_n] + ½ [a_n = b_n]   ([a_n < b_n] with ``smaller_is_better``, for a gap)

    sd with the N − 1 divisor; both standard errors are nan for N = 1.
    """
    if a.value.shape != b.value.shape or a.value.dim() != 1:
        raise PyrovaeError(f"a paired difference needs estimates of the same points, got shapes "
                           f"{tuple(a.value.shape)} and {tuple(b.value.shape)}")
    n = a.value.numel()
    if n == 0:
        raise PyrovaeError("a paired difference needs at least one point")
    d = (a.value - b.value).double()
    sd = d.std().item() if n > 1 else math.nan
    better = d < 0 if smaller_is_better else d > 0
    share = (better.double().sum() + 0.5 * (d == 0).double().sum()).item() / n
    return PairedDifference(d.mean().item(), sd / math.sqrt(n), unpaired_se(a, b), share)


def unpaired_se(a: Estimate, b: Estimate) -> float:
    """√(se_A² + se_B²), se = sd over points / √N: the standard error of mean(a) − mean(b) when the
    two means are taken as independent."""
    return math.hypot(a.mean()[1], b.mean()[1])


def unreliable_points(khat_a: torch.Tensor, khat_b: torch.Tensor, threshold: float = KHAT_THRESHOLD) -> torch.Tensor:
    """[k̂_A,n > threshold or k̂_B,n > threshold], (N,) bool: points whose log p(x) difference is not
    reliable. A nan k̂ (too few samples to fit) counts as not flagged; see :func:`khat_computed`."""
    return (khat_a > threshold) | (khat_b > threshold)


def khat_computed(khat_a: torch.Tensor, khat_b: torch.Tensor) -> torch.Tensor:
    """[k̂ is known in both runs], (N,) bool (PSIS needs ≥ 25 importance samples per point)."""
    return ~(khat_a.isnan() | khat_b.isnan())


@dataclass
class PointEvaluation:
    """What a comparison needs from an evaluation of N points: log p(x) and the ELBO per point with
    their Monte Carlo standard errors, k̂ per point (nan where not computed), and, where they were
    computed, the inference gaps per point (``gaps``: {"approximation", "amortization"} →
    :class:`~pyrovae.estimators.Estimate`)."""

    num_samples: int  # K
    particles_elbo: int
    log_px: Estimate
    elbo: Estimate
    khat: torch.Tensor
    gaps: dict[str, Estimate] | None = field(default=None)

    @classmethod
    def from_evaluation(cls, evaluation, particles_elbo: int) -> "PointEvaluation":
        """From :class:`pyrovae.evaluate.Evaluation` (its gaps too, when it has them)."""
        g = evaluation.gaps
        gaps = None if g is None else {"approximation": g.approximation, "amortization": g.amortization}
        return cls(evaluation.num_samples, particles_elbo, evaluation.log_px, evaluation.elbo,
                   evaluation.khat.double().cpu(), gaps)

    @property
    def num_points(self) -> int:
        return self.log_px.value.numel()

    def to_dict(self) -> dict:
        d = {"num_samples": self.num_samples, "particles_elbo": self.particles_elbo,
             "log_px": self.log_px.value.tolist(), "log_px_stderr": self.log_px.stderr.tolist(),
             "elbo": self.elbo.value.tolist(), "elbo_stderr": self.elbo.stderr.tolist(),
             "khat": self.khat.tolist()}
        if self.gaps is not None:
            d["gaps"] = {name: {"value": e.value.tolist(), "stderr": e.stderr.tolist()} for name, e in self.gaps.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PointEvaluation":
        def t(key):
            return torch.tensor(d[key], dtype=torch.float64)

        gaps = None
        if d.get("gaps") is not None:
            gaps = {name: Estimate(torch.tensor(e["value"], dtype=torch.float64), torch.tensor(e["stderr"], dtype=torch.float64))
                    for name, e in d["gaps"].items()}
        return cls(int(d["num_samples"]), int(d["particles_elbo"]), Estimate(t("log_px"), t("log_px_stderr")),
                   Estimate(t("elbo"), t("elbo_stderr")), t("khat"), gaps)


@dataclass
class Comparison:
    """A − B on the same N points."""

    log_px: PairedDifference
    elbo: PairedDifference
    log_px_differences: torch.Tensor  # (N,)
    elbo_differences: torch.Tensor  # (N,)
    unreliable: torch.Tensor  # (N,) bool, k̂ > 0.7 in A or B
    khat_known: torch.Tensor  # (N,) bool, k̂ computed in both
    gaps: dict[str, PairedDifference] | None = None  # per gap name, A − B ("A better": A's gap smaller)
    gap_differences: dict[str, torch.Tensor] | None = None  # per gap name, (N,)

    @property
    def num_points(self) -> int:
        return self.log_px_differences.numel()

    def summary(self) -> dict:
        known = int(self.khat_known.sum())
        return {
            "num_points": self.num_points,
            "log_px": self.log_px._asdict(),
            "elbo": self.elbo._asdict(),
            "khat_threshold": KHAT_THRESHOLD,
            "khat_known_points": known,
            "unreliable_points": int(self.unreliable.sum()) if known else None,
            **({} if self.gaps is None else {"gaps": {name: d._asdict() for name, d in self.gaps.items()}}),
        }


def compare(a: PointEvaluation, b: PointEvaluation) -> Comparison:
    """A against B on the same points: paired differences of log p(x) and of the ELBO, and the
    points where either log p(x) estimate is unreliable.

    With d_n = a_n − b_n per point, Δ = (1/N) Σ_n d_n and its paired standard error sd(d)/√N
    (:func:`paired_difference`); the unpaired standard error is given beside it for contrast. A point
    is flagged when k̂ > 0.7 in A or B (:func:`unreliable_points`); an unflagged point is not
    thereby shown reliable (AIS is the check, ``pyrovae evaluate --ais``).

    Args:
        a: model A's evaluation of the N points (:meth:`PointEvaluation.from_evaluation`).
        b: model B's evaluation of the same N points, in the same order.

    Returns:
        :class:`Comparison`: the paired differences of log p(x) and of the ELBO (nats), the per-point
        differences (N,), and the flagged points (N,) bool.

    Raises:
        PyrovaeError: the two evaluations are not of the same number of points.
    """
    if a.num_points != b.num_points:
        raise PyrovaeError(f"the two evaluations are of {a.num_points} and {b.num_points} points: not the same points")
    gaps = differences = None
    if a.gaps is not None and b.gaps is not None:
        gaps = {name: paired_difference(a.gaps[name], b.gaps[name], smaller_is_better=True) for name in GAP_NAMES}
        differences = {name: a.gaps[name].value - b.gaps[name].value for name in GAP_NAMES}
    return Comparison(
        paired_difference(a.log_px, b.log_px),
        paired_difference(a.elbo, b.elbo),
        a.log_px.value - b.log_px.value,
        a.elbo.value - b.elbo.value,
        unreliable_points(a.khat, b.khat),
        khat_computed(a.khat, b.khat),
        gaps,
        differences,
    )


def significant(d: PairedDifference, z: float = SIGNIFICANT) -> bool:
    """|Δ| > z paired s.e. (False where the s.e. is unknown, N = 1)."""
    return not math.isnan(d.paired_se) and abs(d.mean) > z * d.paired_se


def reading(la: str, lb: str, c: Comparison, z: float = SIGNIFICANT) -> str:
    """One sentence on why A and B differ, from the paired differences of log p(x) and of the gaps:
    which run's log p(x) is better (by more than ``z`` paired s.e.) and whether its approximation or
    amortization gap is smaller too, e.g. "B's better log p(x) (by 0.42 ± 0.05 nats per point)
    comes with a smaller amortization gap (by 0.80 ± 0.06): its encoder comes closer to the best q
    of its family at each point". A smaller gap of the better run says its bound is tighter, and
    the model was trained on that tighter bound; no smaller gap says the model itself fits
    better. Without a difference in log p(x), it says which run has the smaller gap, gap by gap.
    """
    if c.gaps is None:
        raise PyrovaeError("the comparison has no inference gaps: evaluate both runs with `gaps`")
    lp = c.log_px
    winner = None if not significant(lp, z) else la if lp.mean > 0 else lb
    ref = winner or la
    other = lb if ref == la else la
    sign = 1.0 if ref == la else -1.0  # ref − other = sign × (A − B)
    why = {"amortization": "its encoder comes closer to the best q of its family at each point",
           "approximation": "its family of q comes closer to the posterior"}

    def amount(name: str) -> str:
        d = c.gaps[name]
        return f"{name} gap (by {abs(d.mean):.2f} ± {d.paired_se:.2f})"

    smaller = [n for n in GAP_NAMES if significant(c.gaps[n], z) and sign * c.gaps[n].mean < 0]
    larger = [n for n in GAP_NAMES if significant(c.gaps[n], z) and sign * c.gaps[n].mean > 0]

    def larger_by(names: list[str]) -> str:
        by = " and ".join(f"{abs(c.gaps[n].mean):.2f} ± {c.gaps[n].paired_se:.2f}" for n in names)
        return (f"its {names[0]} gap is larger by {by}" if len(names) == 1
                else f"its {' and '.join(names)} gaps are larger by {by}")

    larger_part = f"; {larger_by(larger)}" if larger else ""
    if winner is None:
        head = (f"{la} and {lb} do not differ in log p(x) by more than {z:g} paired s.e. "
                f"({lp.mean:+.2f} ± {lp.paired_se:.2f} nats per point)")
        if not smaller and not larger:
            return head + ", nor in either gap."
        return head + "; " + "; ".join(
            f"{ref if n in smaller else other}'s {n} gap is smaller by {abs(c.gaps[n].mean):.2f} ± {c.gaps[n].paired_se:.2f}"
            for n in GAP_NAMES if n in smaller or n in larger) + "."
    head = f"{winner}'s better log p(x) (by {abs(lp.mean):.2f} ± {lp.paired_se:.2f} nats per point)"
    if smaller:
        return (head + " comes with a smaller " + " and a smaller ".join(amount(n) for n in smaller) + ": "
                + " and ".join(why[n] for n in smaller) + larger_part + ".")
    if larger:
        return head + f" does not come from a tighter bound: {larger_by(larger)}; the model itself fits better, despite its looser bound."
    return (head + " does not come from a tighter bound: neither gap differs ("
            + ", ".join(f"{n} {sign * c.gaps[n].mean:+.2f} ± {c.gaps[n].paired_se:.2f}" for n in GAP_NAMES)
            + f" for {winner}); the model itself fits better.")


def heldout_differences(data_a: dict, data_b: dict, split: str = "test") -> list[str]:
    """What makes two runs' evaluation points of ``split`` differ, from their configs' ``data``
    sections: the data set, the held-out split (``heldout_sha256``), for the training and
    validation rows also the validation fraction and the seed that drew it, and the binarization
    of the evaluated points (none, or one draw seeded by the run's --seed). An empty list: the
    configs promise the same points (the caller checks the points themselves as well)."""
    differences = []
    ha, hb = data_a.get("heldout_sha256"), data_b.get("heldout_sha256")
    sa, sb = data_a.get("split_seed", 0), data_b.get("split_seed", 0)
    same_heldout = ha is not None and ha == hb
    if not same_heldout and (data_a.get("dataset"), data_a.get("data_dir")) != (data_b.get("dataset"), data_b.get("data_dir")):
        differences.append(f"data set ({_source(data_a)} vs {_source(data_b)})")
    if ha is not None and hb is not None and ha != hb:
        seeds = f", split from --seed {sa} vs {sb}" if sa != sb else ""
        differences.append(f"held-out split (heldout_sha256 {ha[:12]}… vs {hb[:12]}…{seeds})")
    if split != "test":
        fa, fb = data_a.get("validation_fraction", 0), data_b.get("validation_fraction", 0)
        if fa != fb:
            differences.append(f"validation fraction ({fa} vs {fb})")
        elif fa and sa != sb and same_heldout:
            differences.append(f"validation rows (drawn from --seed {sa} vs {sb})")
    ba, bb = _binarization(data_a), _binarization(data_b)
    if ba != bb:
        differences.append(f"binarization of the evaluated points ({_describe_binarization(ba)} vs "
                           f"{_describe_binarization(bb)})")
    return differences


def _source(data: dict) -> str:
    return data.get("dataset") + (f" in {data['data_dir']}" if data.get("data_dir") else "")


def _binarization(data: dict) -> int | None:
    """The run's --seed, which seeds the one binarizing draw of its evaluated points (as
    :meth:`pyrovae.run.Run.eval_split` makes it), or None when the points are not binarized."""
    return None if data.get("binarize", "none") == "none" else data.get("seed", 0)


def _describe_binarization(seed: int | None) -> str:
    return "not binarized" if seed is None else f"binarized with --seed {seed}"


# ---------------------------------------------------------------- the cache of evaluations


def cache_key(split: str, num_samples: int, particles_elbo: int, limit: int | None, seed: int,
              checkpoint: str | Path, gaps: dict | None = None) -> dict:
    """The settings an evaluation of a checkpoint file (RUN/checkpoint.pt or RUN/best.pt) is
    cached under; the file's SHA-256 invalidates it when the model changes. ``gaps``: the settings
    of the inference gaps (:class:`pyrovae.gaps.GapSettings` as a dict), when they are computed."""
    checkpoint = Path(checkpoint)
    key = {"split": split, "num_samples": num_samples, "particles_elbo": particles_elbo,
           "limit": limit, "seed": seed, "checkpoint": checkpoint.stem, "checkpoint_sha256": sha256(checkpoint)}
    if gaps is not None:
        key["gaps"] = dict(gaps)
    return key


def cache_path(run_path: str | Path, key: dict) -> Path:
    """RUN/evaluations/SPLIT-kK-eP-nN-seedS[-gG]-CHECKPOINT-SHA.json (N: the limit, or all; E: the
    ELBO's particles; G: the start of the SHA-256 of the gaps' settings, when computed; CHECKPOINT:
    checkpoint or best; SHA: the start of the file's SHA-256)."""
    n = "all" if key["limit"] is None else key["limit"]
    gaps = ""
    if key.get("gaps") is not None:
        gaps = "-g" + hashlib.sha256(json.dumps(key["gaps"], sort_keys=True).encode()).hexdigest()[:8]
    name = (f"{key['split']}-k{key['num_samples']}-e{key['particles_elbo']}-n{n}-seed{key['seed']}{gaps}-"
            f"{key['checkpoint']}-{key['checkpoint_sha256'][:16]}.json")
    return Path(run_path) / CACHE_FOLDER / name


def load_cached(run_path: str | Path, key: dict, points_sha256: str) -> PointEvaluation | None:
    """The cached evaluation under ``key`` of the points with that SHA-256, or None (absent, of
    other settings or points, or unreadable)."""
    path = cache_path(run_path, key)
    try:
        stored = json.loads(path.read_text())
        if stored.get("format") != CACHE_FORMAT or stored.get("key") != key or stored.get("points_sha256") != points_sha256:
            return None
        return PointEvaluation.from_dict(stored["evaluation"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def store_cached(run_path: str | Path, key: dict, points_sha256: str, evaluation: PointEvaluation) -> Path:
    """Write the evaluation under ``key`` and remove those of the same settings for other checkpoints."""
    path = cache_path(run_path, key)
    path.parent.mkdir(exist_ok=True)
    stale = path.name[: -len(key["checkpoint_sha256"][:16]) - len(".json")] + "*.json"
    for old in path.parent.glob(stale):
        if old != path:
            old.unlink(missing_ok=True)
    stored = {"format": CACHE_FORMAT, "key": key, "points_sha256": points_sha256, "evaluation": evaluation.to_dict()}
    write_text_atomic(path, json.dumps(stored) + "\n")
    return path


# ---------------------------------------------------------------- the picture


def save_comparison_plot(pairs: list[tuple[str, str, PointEvaluation, PointEvaluation, Comparison]], path: str | Path,
                         names: dict[str, str] | None = None) -> None:
    """One row per pair (label A, label B, A, B, A − B): the histogram of the per-point differences
    of log p(x), and the per-point log p(x) of A against B with the diagonal; points with k̂ > 0.7
    in either run are marked. ``names``: label → what it stands for (a run folder), in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(pairs), 2, figsize=(9, 3.6 * len(pairs)), squeeze=False)
    for (la, lb, a, b, c), (hist, scatter) in zip(pairs, axes):
        d = c.log_px_differences.numpy()
        hist.hist(d, bins=min(50, max(10, len(d) // 5)), color="tab:blue", alpha=0.8)
        hist.axvline(0.0, color="black", lw=0.8)
        hist.axvline(c.log_px.mean, color="tab:red", lw=1.2,
                     label=f"mean {c.log_px.mean:.3f} ± {c.log_px.paired_se:.3f} (paired s.e.)")
        hist.set_xlabel(f"log p_{la}(x) − log p_{lb}(x), nats per point")
        hist.set_ylabel("points")
        hist.legend(fontsize=8)
        xa, xb = a.log_px.value.numpy(), b.log_px.value.numpy()
        flagged = c.unreliable.numpy()
        scatter.scatter(xb[~flagged], xa[~flagged], s=6, alpha=0.6, color="tab:blue", label="k̂ ≤ 0.7 in both")
        if flagged.any():
            scatter.scatter(xb[flagged], xa[flagged], s=8, alpha=0.8, color="tab:orange", label="k̂ > 0.7 in either")
        low, high = float(min(xa.min(), xb.min())), float(max(xa.max(), xb.max()))
        scatter.plot([low, high], [low, high], color="black", lw=0.8)
        scatter.set_xlabel(f"log p_{lb}(x), nats")
        scatter.set_ylabel(f"log p_{la}(x), nats")
        scatter.set_title(f"{la} above the diagonal at {c.log_px.share_a_better:.0%} of points", fontsize=9)
        scatter.legend(fontsize=8)
    if names:
        fig.suptitle(", ".join(f"{label} = {name}" for label, name in names.items()), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
