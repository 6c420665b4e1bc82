"""``pyrovae evaluate RUN``: ELBO, KL, IWAE bounds and importance-sampled log p(x) per data point, with diagnostics.

Prints means over the points with standard errors across points; --json writes the summary and
the per-point values; --netcdf writes the per-point log-weights and diagnostics as arviz InferenceData.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from pyrovae.errors import PyrovaeError
from pyrovae.evaluate import DEFAULT_IWAE_KS, evaluate, to_inference_data

from .common import add_run_argument, open_run


def add_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="estimate the evidence on a data split", description=__doc__,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_run_argument(p)
    p.add_argument("--split", default="test", help="train or test")
    p.add_argument("-k", "--samples", type=int, default=5000, help="importance samples per point for log p(x)")
    p.add_argument("--iwae-k", type=int, nargs="+", default=list(DEFAULT_IWAE_KS), help="k of the IWAE bounds L_k (those ≤ -k)")
    p.add_argument("--particles-elbo", type=int, default=100, help="draws per point for the ELBO, reconstruction and KL terms")
    p.add_argument("--limit", type=int, help="evaluate only the first N points of the split")
    p.add_argument("--batch-size", type=int, help="points per pass (default: max(1, 5000 // k))")
    p.add_argument("--chunk-size", type=int, help="particles per pass (default: all at once)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="compile the sites' log-densities with torch.compile (eager if unavailable)")
    p.add_argument("--json", type=Path, help="write the summary and per-point values here")
    p.add_argument("--netcdf", type=Path, help="write per-point log-weights and diagnostics as arviz InferenceData")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args) -> int:
    if args.limit is not None and args.limit < 1:
        raise PyrovaeError(f"--limit must be at least 1, got {args.limit}")
    run_, module, device = open_run(args)
    x = run_.eval_split(run_.dataset(), args.split)[: args.limit].to(device)
    start = time.perf_counter()
    result = evaluate(module.model, module.guide, x, args.samples, args.iwae_k, args.particles_elbo,
                      args.batch_size, args.chunk_size, args.compile, keep_log_weights=args.netcdf is not None,
                      progress=not args.no_progress)
    seconds = time.perf_counter() - start
    print(f"{run_.path}: {args.split} split, {len(x)} points, {seconds:.1f} s ({len(x) / seconds:.1f} points/s)")
    print(result.table())
    if args.json:
        summary = {"run": str(run_.path), "split": args.split, "seconds": seconds, **result.summary()}
        args.json.write_text(json.dumps({"summary": summary, "per_point": result.per_point()}, indent=1) + "\n")
        print(f"wrote {args.json}")
    if args.netcdf:
        to_inference_data(result).to_netcdf(str(args.netcdf))
        print(f"wrote {args.netcdf}")
    return 0
