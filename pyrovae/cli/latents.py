"""``pyrovae latents RUN``: which latent dimensions the model uses, and what they encode.

Prints the number of active units (dimensions u whose posterior mean varies over the points:
Cov_x(E_q[z_u | x]) > 0.01, Burda et al. 2016) and the KL per dimension where the guide and the
prior factorize over coordinates. Writes RUN/latents.png (the points' posterior means in 2-D,
the first two principal components when D > 2, coloured by label; and traversals: each of the
first active dimensions varied from -3 to 3 around z = 0, decoded) and RUN/latents_kl.png
(activity and KL per dimension).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from pyrovae import latents as lt
from pyrovae.errors import PyrovaeError

from .common import add_run_argument, at_least, open_run, writable_file


def add_parser(sub) -> None:
    p = sub.add_parser("latents", help="active units, KL per latent dimension, encodings and traversals",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_argument(p)
    p.add_argument("--split", default="test", help="train, valid or test (default: test)")
    p.add_argument("--limit", type=int, help="use only the first N points of the split")
    p.add_argument("--threshold", type=float, default=lt.ACTIVITY_THRESHOLD,
                   help=f"a dimension is active when Cov_x E_q[z_u|x] exceeds this (default: {lt.ACTIVITY_THRESHOLD})")
    p.add_argument("--particles", type=int, default=10,
                   help="draws of the other latent sites for the KL of a site with latent parents (default: 10)")
    p.add_argument("--traverse", type=int, default=8, metavar="R", help="traverse the first R active dimensions (default: 8)")
    p.add_argument("--steps", type=int, default=9, help="images per traversal, from -3 to 3 (default: 9)")
    p.add_argument("--out", type=Path, help="PNG of the encodings and traversals (default: RUN/latents.png); "
                   "activity and KL go beside it, NAME_kl.png")
    p.add_argument("--json", type=Path, help="write active units, activity and KL per dimension here")
    p.set_defaults(run=run)


def run(args) -> int:
    if args.limit is not None:
        at_least(args.limit, 2, "--limit")
    at_least(args.particles, 1, "--particles")
    at_least(args.traverse, 0, "--traverse")
    at_least(args.steps, 2, "--steps")
    writable_file(args.out, "--out")
    writable_file(args.json, "--json")
    run_, module, device = open_run(args)
    data = run_.dataset()
    x = run_.eval_split(data, args.split)[: args.limit].to(device)
    if len(x) < 2:
        raise PyrovaeError(f"the {args.split} split has {len(x)} point: active units need at least 2")
    labels = getattr(data, f"{args.split}_labels", None)
    labels = None if labels is None else labels[: args.limit].cpu()

    means = lt.latent_means(module.guide, x)  # {site: (N, D_s)}
    kl = lt.kl_per_dimension(module.model, module.guide, x, args.particles)
    sizes = {site: m.shape[1] for site, m in means.items()}
    names = lt.dimension_names(sizes)
    report, activities, active_dims = {}, [], []
    for site, m in means.items():
        activity, active = lt.active_units(m, args.threshold)
        activities.append(activity)
        active_dims += [(site, u) for u in active.nonzero().flatten().tolist()]
        report[site] = {"dim": sizes[site], "active_units": int(active.sum()), "activity": activity.tolist(),
                        "active": active.tolist(), "kl_per_dimension": None if kl.get(site) is None else kl[site].tolist()}
    activity = torch.cat(activities)
    kl_all = torch.cat([kl[site] if kl.get(site) is not None else torch.full((d,), float("nan"), dtype=torch.float64)
                        for site, d in sizes.items()])
    D, n_active = len(names), len(active_dims)

    print(f"{run_.path}: {args.split} split, {len(x)} points")
    print(f"active units: {n_active} of {D} (Cov_x E_q[z_u | x] > {args.threshold:g})")
    for site, r in report.items():
        kl_text = ("KL per dimension not available (q and p do not factorize over coordinates)"
                   if r["kl_per_dimension"] is None else f"KL {sum(r['kl_per_dimension']):.3f} nats in all")
        print(f"  {site}: {r['active_units']} of {r['dim']} active; {kl_text}")
    if active_dims:
        print(f"{'dimension':<12}  {'activity':>10}  {'KL, nats':>9}")
        for site, u in active_dims:
            i = names.index(f"{site}[{u}]")
            kl_text = "—" if torch.isnan(kl_all[i]) else f"{kl_all[i].item():.3f}"
            print(f"{names[i]:<12}  {activity[i].item():>10.4f}  {kl_text:>9}")

    out = args.out if args.out is not None else run_.path / "latents.png"
    kl_out = out.with_name(f"{out.stem}_kl{out.suffix or '.png'}")
    shown = active_dims[: args.traverse]
    values = torch.linspace(-3, 3, args.steps, dtype=torch.float64)
    note = ""
    traversal = None
    if data.image_shape is None:
        note = "the data are vectors, not images: no traversals drawn"
    elif not shown:
        note = "no active dimension to traverse" if args.traverse else ""
    else:
        traversal = lt.traverse(module.model, x[:1], shown, values).cpu()
    if note:
        print(f"note: {note}")
    lt.save_latents_plot(torch.cat(list(means.values()), 1), labels, out, traversal, data.image_shape,
                         [f"{s}[{u}]" for s, u in shown], values, names, note)
    lt.save_activity_plot(activity, kl_all, names, kl_out, args.threshold)
    print(f"wrote {out}")
    print(f"wrote {kl_out}")
    if args.json:
        output = {"run": str(run_.path), "split": args.split, "num_points": len(x), "threshold": args.threshold,
                  "latent_dim": D, "active_units": n_active, "dimensions": names,
                  "active": [f"{s}[{u}]" for s, u in active_dims], "sites": report,
                  "pictures": [str(out), str(kl_out)]}
        args.json.write_text(json.dumps(output, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0
