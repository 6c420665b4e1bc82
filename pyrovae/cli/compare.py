"""``pyrovae compare RUN_A RUN_B [RUN_C ...]``: which model fits the held-out data better, and by how much.

Every run is evaluated on the same points (log p(x) importance sampled with K samples, the ELBO,
k̂ per point), or its evaluation is read from RUN/evaluations/ when one with the same settings
and checkpoint is there. For each pair A, B it prints the mean per-point difference of log p(x) and
of the ELBO with its paired standard error (sd of the per-point differences / √N) beside the
unpaired one (√(se_A² + se_B²)), the share of points where A is better, and the points whose
log p(x) estimate is unreliable (k̂ > 0.7) in either run. Runs evaluated on different points
(another data set, held-out split or binarization) are refused.
With --gaps, each run's inference gaps are computed as by ``pyrovae evaluate --gaps`` (the same
options and seeds), their paired differences printed, and one sentence says whether the better
run's log p(x) comes with a smaller amortization or approximation gap.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import string
import sys
import time
from argparse import Namespace
from pathlib import Path

from pyrovae import compare as cmp
from pyrovae.diagnostics import KHAT_THRESHOLD, MIN_PSIS_SAMPLES
from pyrovae.errors import PyrovaeError
from pyrovae.evaluate import evaluate
from pyrovae.run import BEST, CHECKPOINT, Run, heldout_sha256, resolve_device

from .common import at_least, open_run, writable_file
from .evaluate import add_gap_arguments, gap_settings


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="compare runs on the same held-out points, with paired standard errors",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", metavar="RUN", type=Path, nargs="+", help="two or more run folders written by pyrovae train")
    p.add_argument("-k", "--samples", type=int, default=5000, help="importance samples per point for log p(x) (default: 5000)")
    p.add_argument("--particles-elbo", type=int, default=100, help="draws per point for the ELBO (default: 100)")
    p.add_argument("--limit", type=int, help="compare on the first N points of the split only")
    p.add_argument("--split", default="test", help="train, valid or test (default: test)")
    p.add_argument("--checkpoint", choices=("last", "best"), default="last",
                   help="each run's last checkpoint, or best.pt: its epoch with the best validation ELBO (default: last)")
    p.add_argument("--seed", type=int, default=0, help="random seed of each evaluation (default: 0)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default="auto",
                   help="compile the sites' log-densities with torch.compile (default: where it pays, on CPU for N × K ≥ 10⁷; eager if unavailable)")
    p.add_argument("--json", type=Path, help="write the comparison and the per-point differences here")
    p.add_argument("--plot", type=Path, help="PNG of the per-point differences (default: RUN_A/compare.png)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("why the bounds differ: the inference gaps (Cremer, Li & Duvenaud 2018)")
    g.add_argument("--gaps", action="store_true",
                   help="also fit q* to each point in each run and compare the approximation and amortization gaps")
    add_gap_arguments(g)
    p.set_defaults(run=run)


def run(args) -> int:
    if len(args.run_dirs) < 2:
        raise PyrovaeError(f"give at least two run folders to compare, got {len(args.run_dirs)}")
    if len(args.run_dirs) > len(string.ascii_uppercase):
        raise PyrovaeError(f"at most {len(string.ascii_uppercase)} runs at a time, got {len(args.run_dirs)}")
    at_least(args.samples, 1, "-k")
    at_least(args.particles_elbo, 1, "--particles-elbo")
    if args.limit is not None:
        at_least(args.limit, 1, "--limit")
    writable_file(args.json, "--json")
    writable_file(args.plot, "--plot")
    args.gap_settings = gap_settings(args) if args.gaps else None
    resolve_device(args.device)

    runs = [Run.open(path) for path in args.run_dirs]
    labels = string.ascii_uppercase[: len(runs)]
    for label, run_ in zip(labels[1:], runs[1:]):
        differences = cmp.heldout_differences(runs[0].config["data"], run_.config["data"], args.split)
        if differences:
            raise PyrovaeError(f"A ({runs[0].path}) and {label} ({run_.path}) are not evaluated on the same "
                               f"{args.split} points: {'; '.join(differences)}")
    points = [heldout_sha256(run_.eval_split(run_.dataset(), args.split)[: args.limit]) for run_ in runs]
    for label, run_, sha in zip(labels[1:], runs[1:], points[1:]):
        if sha != points[0]:
            raise PyrovaeError(f"A ({runs[0].path}) and {label} ({run_.path}) are not evaluated on the same "
                               f"{args.split} points: the points themselves differ (their SHA-256)")
    checkpoint = CHECKPOINT if args.checkpoint == "last" else BEST
    for run_ in runs:
        if not (run_.path / checkpoint).is_file():
            raise PyrovaeError(f"{run_.path} has no {checkpoint}: it cannot be evaluated"
                               + (" (best.pt is written by runs with a validation split)" if checkpoint == BEST else ""))

    evaluations = []
    for label, run_, sha in zip(labels, runs, points):
        evaluation, where = _evaluation(args, run_, run_.path / checkpoint, sha)
        evaluations.append(evaluation)
        lp, el = evaluation.log_px.mean(), evaluation.elbo.mean()
        gaps = "" if evaluation.gaps is None else "".join(
            f", {name} gap {evaluation.gaps[name].mean()[0]:.3f} ± {evaluation.gaps[name].mean()[1]:.3f}"
            for name in cmp.GAP_NAMES)
        print(f"{label}  {run_.path}: {args.split} split, {evaluation.num_points} points; "
              f"log p(x) {lp[0]:.3f} ± {lp[1]:.3f}, ELBO {el[0]:.3f} ± {el[1]:.3f}{gaps} ({where})")

    pairs = []
    for (i, a), (j, b) in itertools.combinations(enumerate(evaluations), 2):
        comparison = cmp.compare(a, b)
        pairs.append((labels[i], labels[j], a, b, comparison))
        print()
        print(table(labels[i], labels[j], comparison, a.num_samples))
        if comparison.gaps is not None:
            print(cmp.reading(labels[i], labels[j], comparison))

    print(f"\npaired s.e.: sd of the {evaluations[0].num_points} per-point differences / √N; unpaired s.e.: "
          "√(se_A² + se_B²) of the two means, as if the runs had been evaluated on different points")
    plot = args.plot if args.plot is not None else runs[0].path / "compare.png"
    cmp.save_comparison_plot(pairs, plot, {label: run_.path.name for label, run_ in zip(labels, runs)})
    print(f"\nwrote {plot}")
    if args.json:
        output = {
            "settings": {"split": args.split, "num_samples": args.samples, "particles_elbo": args.particles_elbo,
                         "limit": args.limit, "seed": args.seed, "checkpoint": args.checkpoint,
                         "points_sha256": points[0],
                         "gaps": None if args.gap_settings is None else dataclasses.asdict(args.gap_settings)},
            "runs": [{"label": label, "run": str(run_.path), "log_px": e.log_px.mean(), "elbo": e.elbo.mean(),
                      **({} if e.gaps is None else {f"{name}_gap": g.mean() for name, g in e.gaps.items()}),
                      "per_point": {"log_px": e.log_px.value.tolist(), "log_px_stderr": e.log_px.stderr.tolist(),
                                    "elbo": e.elbo.value.tolist(), "khat": e.khat.tolist(),
                                    **({} if e.gaps is None else {f"{name}_gap": g.value.tolist() for name, g in e.gaps.items()})}}
                     for label, run_, e in zip(labels, runs, evaluations)],
            "pairs": [{"a": la, "b": lb, **c.summary(),
                       **({} if c.gaps is None else {"reading": cmp.reading(la, lb, c)}),
                       "per_point": {"log_px_difference": c.log_px_differences.tolist(),
                                     "elbo_difference": c.elbo_differences.tolist(),
                                     "unreliable": c.unreliable.tolist(),
                                     **({} if c.gaps is None else {f"{name}_gap_difference": d.tolist()
                                                                   for name, d in c.gap_differences.items()})}}
                      for la, lb, _, _, c in pairs],
        }
        args.json.write_text(json.dumps(output, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


def _evaluation(args, run_: Run, checkpoint: Path, points_sha256: str) -> tuple[cmp.PointEvaluation, str]:
    """The run's evaluation from its cache, or evaluated now (and cached); with where it came from."""
    key = cmp.cache_key(args.split, args.samples, args.particles_elbo, args.limit, args.seed, checkpoint,
                        None if args.gap_settings is None else dataclasses.asdict(args.gap_settings))
    cached = cmp.load_cached(run_.path, key, points_sha256)
    if cached is not None:
        return cached, f"from {cmp.cache_path(run_.path, key)}"
    opened, module, device = open_run(Namespace(run_dir=run_.path, device=args.device, seed=args.seed,
                                                       checkpoint=args.checkpoint))
    x = opened.eval_split(opened.dataset(), args.split)[: args.limit].to(device)
    start = time.perf_counter()
    result = evaluate(module.model, module.guide, x, args.samples, (), args.particles_elbo,
                      compile=args.compile, progress=not args.no_progress, seed=args.seed,
                      gaps=args.gap_settings or False, surgery=False)
    seconds = time.perf_counter() - start
    evaluation = cmp.PointEvaluation.from_evaluation(result, args.particles_elbo)
    try:
        path = cmp.store_cached(run_.path, key, points_sha256, evaluation)
    except OSError as e:
        print(f"note: could not cache the evaluation of {run_.path} ({e.strerror or e})", file=sys.stderr)
        return evaluation, f"evaluated in {seconds:.1f} s"
    return evaluation, f"evaluated in {seconds:.1f} s, cached in {path}"


def table(la: str, lb: str, c: cmp.Comparison, num_samples: int) -> str:
    """The rows of one pair: differences A − B with paired and unpaired standard errors."""
    rows = [(f"log p(x), importance sampled (K={num_samples})", c.log_px), ("ELBO", c.elbo)]
    if c.gaps is not None:
        rows += [("approximation gap log p(x) − ELBO[q*]", c.gaps["approximation"]),
                 ("amortization gap ELBO[q*] − ELBO[q]", c.gaps["amortization"])]
    width = max(len(r[0]) for r in rows)
    lines = [f"{la} − {lb}, mean per point, nats".ljust(width) +
             f"  {'difference':>10}  {'paired s.e.':>11}  {'unpaired s.e.':>13}  {la + ' better':>9}"]
    for name, d in rows:
        lines.append(f"{name:<{width}}  {d.mean:>10.3f}  {_number(d.paired_se, 11)}  {_number(d.unpaired_se, 13)}"
                     f"  {d.share_a_better:>9.1%}")
    if c.gaps is not None:
        lines.append(f"for a gap, {la} better: {la}'s gap smaller at that point")
    known, n = int(c.khat_known.sum()), c.num_points
    if known == 0:
        lines.append(f"k̂ not computed: it needs at least {MIN_PSIS_SAMPLES} importance samples per point, got K={num_samples}")
    else:
        bad = int(c.unreliable.sum())
        lines.append(f"k̂ > {KHAT_THRESHOLD} in {la} or {lb} at {bad} of {n} points ({bad / n:.1%}): "
                     "the log p(x) differences at those points are unreliable")
    return "\n".join(lines)


def _number(value: float, width: int) -> str:
    return f"{'—':>{width}}" if math.isnan(value) else f"{value:>{width}.3f}"
