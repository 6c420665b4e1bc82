"""``pyrovae evaluate RUN``: ELBO, KL, IWAE bounds and importance-sampled log p(x) per data point, with diagnostics.

Prints means over the points with standard errors across points; --json writes the summary and
the per-point values; --netcdf writes the per-point log-weights and diagnostics as arviz InferenceData.
--ais adds log p(x) by annealed importance sampling with HMC on the same points; --bdmc brackets
log p(x) between AIS's lower and upper bounds on points simulated from the model.
--gaps splits the gap log p(x) − ELBO into the approximation gap (the guide's family) and the
amortization gap (the encoder) by fitting q* to each point, draws them per point sorted
(--gaps-plot), and splits the KL term into the mutual information I_q(x; z) and KL(q(z) ‖ p(z))
(ELBO surgery; --surgery alone for that part). With --ais too, the approximation gap is also
given with AIS's log p(x).
Under ``torchrun -m pyrovae evaluate`` the points are shared among the processes, a block of whole
passes each, and the results gathered on rank 0: identical to one process with the same --seed
(the draws of each pass are seeded by the seed, the pass's first row and the chunk of particles).
With --shard-particles the processes evaluate every point together instead, each drawing every
W-th chunk of its K importance samples (for huge K): identical to one process with the same --seed
and --chunk-size. AIS shares the points the same way; BDMC runs on rank 0.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch

from pyrovae import ais as ais_, distributed, gaps as gaps_, latents
from pyrovae.errors import PyrovaeError
from pyrovae.evaluate import DEFAULT_IWAE_KS, cat, classifier_accuracy, compile_pays, default_batch_size, evaluate, to_inference_data
from pyrovae.plots import save_gaps_plot
from pyrovae.run import resolve_device

from pyrovae.seeds import batch_seed

from .common import add_run_argument, at_least, open_run, writable_file

BDMC_STREAM, LATENT_STREAM = (0, 2), (0, 3)  # keys of their draws under --seed (see batch_seed)
SHARD_CHUNK = 500  # importance samples per chunk under --shard-particles when --chunk-size is not given


def add_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="estimate the evidence on a data split", description=__doc__,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_run_argument(p)
    p.add_argument("--split", default="test", help="train or test")
    p.add_argument("-k", "--samples", type=int, default=5000, help="importance samples per point for log p(x)")
    p.add_argument("--iwae-k", type=int, nargs="+", default=list(DEFAULT_IWAE_KS), help="k of the IWAE bounds L_k (those ≤ -k)")
    p.add_argument("--particles-elbo", type=int, default=100, help="draws per point for the ELBO, reconstruction and KL terms")
    p.add_argument("--limit", type=int, help="evaluate only the first N points of the split")
    p.add_argument("--batch-size", type=int, help="points per pass (default: about 5000 draws per pass on CPU, 500 000 on a GPU)")
    p.add_argument("--chunk-size", type=int, help="particles per pass (default: all at once)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default="auto",
                   help="compile the sites' log-densities with torch.compile (default: where it pays, on CPU for N × K ≥ 10⁷; eager if unavailable)")
    p.add_argument("--capture", action=argparse.BooleanOptionalAction, default=True,
                   help="trace the importance-sampling pass once per chunk shape and replay it, checked against the eager pass "
                        "on its first chunk (through torch.compile where --compile says so); --no-capture: Pyro's traces on every chunk")
    p.add_argument("--json", type=Path, help="write the summary and per-point values here")
    p.add_argument("--netcdf", type=Path, help="write per-point log-weights and diagnostics as arviz InferenceData; "
                   "it holds K × N float64 log-weights in memory (≈ 400 MB for 10 000 points at K = 5000)")
    p.add_argument("--shard-particles", action="store_true",
                   help=f"under torchrun: share each point's chunks of K importance samples among the processes, not the points "
                        f"(--chunk-size default {SHARD_CHUNK})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("annealed importance sampling (Neal 2001; Wu et al. 2017) and BDMC (Grosse et al. 2015)")
    g.add_argument("--ais", action="store_true", help="also estimate log p(x) by AIS with HMC transitions (a stochastic lower bound)")
    g.add_argument("--ais-steps", type=int, default=ais_.DEFAULT_STEPS, metavar="T", help="intermediate distributions (sigmoidal schedule)")
    g.add_argument("--ais-chains", type=int, default=ais_.DEFAULT_CHAINS, metavar="M", help="AIS chains per point")
    g.add_argument("--ais-leapfrog", type=int, default=ais_.DEFAULT_LEAPFROG, metavar="L", help="leapfrog steps per HMC transition")
    g.add_argument("--ais-step-size", type=float, default=ais_.DEFAULT_STEP_SIZE, metavar="EPS", help="initial HMC step size, adapted per point toward acceptance 0.65")
    g.add_argument("--ais-start", choices=("guide", "prior"), default="guide", help="the chains start from the guide q(z|x) or the prior p(z)")
    g.add_argument("--ais-batch-size", type=int, metavar="N", help="points per AIS pass (default: as many as fit 4096 chains)")
    g.add_argument("--bdmc", action="store_true",
                   help="bidirectional Monte Carlo: lower and upper bounds on log p(x) for --limit N points simulated from the model")
    g = p.add_argument_group("why the bound is loose: the inference gaps (Cremer, Li & Duvenaud 2018) and ELBO surgery (Hoffman & Johnson 2016)")
    g.add_argument("--gaps", action="store_true",
                   help="fit q* of the guide's family to each point and split the gap into the approximation gap log p(x) − ELBO[q*] "
                        "and the amortization gap ELBO[q*] − ELBO[q]; also ELBO surgery")
    g.add_argument("--surgery", action="store_true",
                   help="ELBO surgery: E KL(q(z|x) ‖ p(z)) = I_q(x; z) + KL(q(z) ‖ p(z)) per latent site, q(z) the points' aggregate posterior")
    add_gap_arguments(g)
    g.add_argument("--gaps-plot", type=Path, help="PNG of the per-point gaps, sorted (default with --gaps: RUN/gaps.png)")
    p.set_defaults(run=run)


def add_gap_arguments(g) -> None:
    """The options of q*'s fit, shared with ``pyrovae compare --gaps``."""
    d = gaps_.GapSettings()
    g.add_argument("--gap-steps", type=int, default=d.steps, metavar="S", help=f"Adam steps per point for q* (default: {d.steps})")
    g.add_argument("--gap-lr", type=float, default=d.lr, metavar="LR",
                   help=f"Adam's learning rate for q*, falling linearly to 0 over the second half of the steps (default: {d.lr})")
    g.add_argument("--gap-particles", type=int, default=d.num_particles, metavar="M", help=f"draws per point per step (default: {d.num_particles})")
    g.add_argument("--gap-samples", type=int, default=d.num_samples, metavar="K",
                   help=f"importance samples per point for log p(x) with q* as the proposal (default: {d.num_samples})")
    g.add_argument("--gap-batch-size", type=int, default=d.batch_size, metavar="B", help=f"points fitted together (default: {d.batch_size})")


GAP_FLAGS = {"steps": "--gap-steps", "lr": "--gap-lr", "num_particles": "--gap-particles",
             "num_samples": "--gap-samples", "batch_size": "--gap-batch-size"}  # GapSettings' fields → options


def gap_settings(args) -> gaps_.GapSettings:
    """The fit's settings from the options, checked by the engine; a bad field is named by its
    option (the fields shared with evaluate keep their backquotes, which the command line maps)."""
    settings = gaps_.GapSettings(steps=args.gap_steps, lr=args.gap_lr, num_particles=args.gap_particles,
                                 particles_elbo=args.particles_elbo, num_samples=args.gap_samples,
                                 batch_size=args.gap_batch_size, chunk_size=getattr(args, "chunk_size", None))
    try:
        settings.check()
    except PyrovaeError as e:
        raise PyrovaeError(re.sub(r"`(\w+)`", lambda m: GAP_FLAGS.get(m.group(1), m.group(0)), str(e))) from None
    return settings


def run(args) -> int:
    if args.limit is not None and args.limit < 1:
        raise PyrovaeError(f"--limit must be at least 1, got {args.limit}")
    if args.samples < 1:
        raise PyrovaeError(f"the number of importance samples -k must be at least 1, got {args.samples}")
    at_least(args.particles_elbo, 1, "--particles-elbo")
    if args.batch_size is not None and args.batch_size < 1:
        raise PyrovaeError(f"the batch size must be at least 1, got {args.batch_size}")
    if args.chunk_size is not None and args.chunk_size < 1:
        raise PyrovaeError(f"the chunk size must be at least 1, got {args.chunk_size}")
    writable_file(args.json, "--json")
    writable_file(args.netcdf, "--netcdf")
    writable_file(args.gaps_plot, "--gaps-plot")
    args.gap_settings = gap_settings(args) if args.gaps else None
    options = dict(num_steps=args.ais_steps, num_chains=args.ais_chains, num_leapfrog=args.ais_leapfrog,
                   step_size=args.ais_step_size, start=args.ais_start, batch_size=args.ais_batch_size)
    if args.ais or args.bdmc:
        ais_.AISSettings(**options).check()  # before the importance sampling, not after it
    device = distributed.local_device(resolve_device(args.device))
    args.device = str(device)
    with distributed.process_group(device):
        return _run(args, options)


def block(num_points: int, per_pass: int) -> slice:
    """This process's rows: a block of whole passes of ``per_pass`` points (all rows for one process)."""
    rank, size = distributed.world()
    per_process = -(-num_points // per_pass // size) * per_pass
    return slice(min(rank * per_process, num_points), min((rank + 1) * per_process, num_points))


def gathered(part):
    """Each process's part of a result joined on rank 0 (None on the others); one process: as is."""
    if distributed.world()[1] == 1:
        return part
    parts = distributed.gather(part)
    return None if parts is None else cat([p for p in parts if p is not None])


def _run(args, options: dict) -> int:
    rank, size = distributed.world()
    run_, module, device = open_run(args)
    x = run_.eval_split(run_.dataset(), args.split)[: args.limit].to(device)
    if args.gap_settings is not None:  # refused before the evaluation, not after it
        gaps_.check_supported(module.model, module.guide, x)
    elif args.surgery:
        gaps_.check_continuous(module.model, module.guide, x, "`surgery`")
    start = time.perf_counter()
    batch = default_batch_size(args.samples, device, args.capture) if args.batch_size is None else args.batch_size
    if args.compile == "auto":  # decided for all the points, not for each process's share
        args.compile = compile_pays(len(x), args.samples, device)
    shard_particles = args.shard_particles and size > 1
    chunk = SHARD_CHUNK if args.shard_particles and args.chunk_size is None else args.chunk_size
    rows = slice(0, len(x)) if shard_particles else block(len(x), batch)
    result = None
    if rows.stop > rows.start:
        result = evaluate(module.model, module.guide, x[rows], args.samples, args.iwae_k, args.particles_elbo,
                          batch, chunk, args.compile, capture=args.capture, keep_log_weights=args.netcdf is not None,
                          progress=not args.no_progress and rank == 0, seed=args.seed, first_row=rows.start,
                          particle_shard=(rank, size) if shard_particles else (0, 1))
    result = result if shard_particles else gathered(result)
    seconds = time.perf_counter() - start
    gap_result, gap_seconds = None, 0.0
    if args.gap_settings is not None:
        start = time.perf_counter()
        rows = block(len(x), args.gap_settings.batch_size)
        part = gaps_.inference_gaps(module.model, module.guide, x[rows], args.gap_settings, progress=not args.no_progress and rank == 0,
                                    seed=args.seed, first_row=rows.start) if rows.stop > rows.start else None
        gap_result = gathered(part)
        gap_seconds = time.perf_counter() - start
    ais_result = bdmc_result = None
    if args.ais:
        start = time.perf_counter()
        rows = block(len(x), ais_.AISSettings(**options).points_per_pass())
        part = ais_.ais(module.model, module.guide, x[rows], progress=not args.no_progress and rank == 0,
                        seed=args.seed, first_row=rows.start, **options) if rows.stop > rows.start else None
        ais_result = gathered(part)
        ais_seconds = time.perf_counter() - start
    if rank != 0:
        return 0
    processes = f", {size} processes" if size > 1 else ""
    surgery_seconds = 0.0
    if args.gaps or args.surgery:  # over all the points: their aggregate posterior
        start = time.perf_counter()
        torch.manual_seed(batch_seed(args.seed, 0, *gaps_.SURGERY_STREAM))
        result.surgery = gaps_.surgery(module.model, module.guide, x, progress=not args.no_progress)
        surgery_seconds = time.perf_counter() - start
    result.gaps = gap_result
    print(f"{run_.path}: {args.split} split, {len(x)} points, {seconds:.1f} s ({len(x) / seconds:.1f} points/s{processes})")
    if gap_result is not None:
        print(f"inference gaps: {gap_seconds:.1f} s ({len(x) / gap_seconds:.2f} points/s{processes})")
    if result.surgery is not None:
        print(f"ELBO surgery: {surgery_seconds:.1f} s")
    print(result.table())
    torch.manual_seed(batch_seed(args.seed, 0, *LATENT_STREAM))  # a guide without a closed-form mean is sampled
    means = torch.cat([m.reshape(len(x), -1) for m in latents.latent_means(module.guide, x).values()], 1)
    activity, active = latents.active_units(means)
    information = ""
    if result.surgery is not None and result.surgery.sites:
        information = "; mutual information " + ", ".join(
            f"I_q(x; {site}) = {s.mutual_information.mean()[0]:.2f} ± {s.mutual_information.mean()[1]:.2f} nats"
            for site, s in result.surgery.sites.items()) + f" (≤ log N = {result.surgery.max_mutual_information:.2f})"
    print(f"active units: {int(active.sum())} of {active.numel()} latent dimensions (Cov_x E_q[z_u | x] > {latents.ACTIVITY_THRESHOLD})"
          + information)
    labels = getattr(run_.dataset(), f"{args.split}_labels")
    accuracy = {} if labels is None else classifier_accuracy(module.guide, x, labels[: args.limit].to(device))
    for site, (a, se) in accuracy.items():
        print(f"classifier q({site} | x): accuracy {100 * a:.2f} % ± {100 * se:.2f}, test error {100 * (1 - a):.2f} % "
              f"on {len(x)} points")
    ais_approximation = None
    if ais_result is not None:
        print(f"\nAIS on the same {len(x)} points, {ais_seconds:.1f} s ({len(x) / ais_seconds:.2f} points/s{processes})")
        print(ais_result.table())
        if gap_result is not None:  # AIS's log p(x) in place of the importance-sampled one
            ais_approximation = gaps_.approximation_gap(ais_result.log_px, gap_result.elbo_optimal)
            (m, se), (m0, se0) = ais_approximation.mean(), gap_result.approximation.mean()
            print(f"approximation gap with AIS's log p(x), log p_AIS(x) − ELBO[q*]: {m:.3f} ± {se:.3f} (with q* as the "
                  f"proposal: {m0:.3f} ± {se0:.3f}); both estimates of log p(x) are low on average, AIS usually less so")
    if args.bdmc:
        start = time.perf_counter()
        torch.manual_seed(batch_seed(args.seed, 0, *BDMC_STREAM))
        bdmc_result = ais_.bdmc(module.model, module.guide, x, progress=not args.no_progress, **options)
        bdmc_seconds = time.perf_counter() - start
        print(f"\nBDMC, {bdmc_seconds:.1f} s")
        print(bdmc_result.table())
    if args.json:
        summary = {"run": str(run_.path), "split": args.split, "seconds": seconds, **result.summary(),
                   "active_units": int(active.sum()), "activity": activity.tolist()}
        if accuracy:
            summary["classifier_accuracy"] = {site: {"value": a, "stderr": se} for site, (a, se) in accuracy.items()}
        if gap_result is not None:
            summary["gaps"]["seconds"] = gap_seconds
        if result.surgery is not None:
            summary["surgery"]["seconds"] = surgery_seconds
        per_point = result.per_point()
        if ais_result is not None:
            summary["ais"] = {"seconds": ais_seconds, **ais_result.summary()}
            per_point.update({f"ais_{name}": values for name, values in ais_result.per_point().items()})
        if ais_approximation is not None:
            summary["gaps"]["approximation_ais"] = ais_approximation.mean()
            per_point["approximation_gap_ais"] = ais_approximation.value.tolist()
        output = {"summary": summary, "per_point": per_point}
        if bdmc_result is not None:
            output["bdmc"] = {"summary": {"seconds": bdmc_seconds, **bdmc_result.summary()}, "per_point": bdmc_result.per_point()}
        args.json.write_text(json.dumps(output, indent=1) + "\n")
        print(f"wrote {args.json}")
    if args.netcdf:
        to_inference_data(result).to_netcdf(str(args.netcdf))
        print(f"wrote {args.netcdf}")
    if gap_result is not None:
        plot = args.gaps_plot if args.gaps_plot is not None else run_.path / "gaps.png"
        save_gaps_plot(gap_result, plot, gap=result.gap, surgery=result.surgery, title=f"{run_.path.name}, {args.split} split")
        print(f"wrote {plot}")
    return 0
