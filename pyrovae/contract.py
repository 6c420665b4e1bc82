"""The model/guide contract, checked once on a small batch before any training or evaluation.

The rules (see the README): ``model(x)`` has an observed site (``obs=``); the guide samples
every latent site of the model and no other; every site is inside ``pyro.plate("data", N)`` at
dim −1 with batch shape exactly (N,) (everything else ``.to_event``); latent variables are local to
each data point; the data lie in the support of the observed site's distribution.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.poutine.util import site_is_subsample

from .errors import ContractError, DataError
from .traces import DiscreteSites, discrete_sites, is_discrete


def _sample_sites(trace) -> dict[str, dict]:
    return {name: site for name, site in trace.nodes.items() if site["type"] == "sample" and not site_is_subsample(site)}


def _raised(program: str, e: Exception) -> ContractError:
    """The user's program failed: say where, in one line, with the fix for Pyro's plate shape error."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    hint = ""
    if "Shape mismatch inside plate" in first:
        hint = ("; a site's batch shape must be exactly (N,), the data plate: declare its other dimensions as "
                "event dimensions with .to_event()")
    return ContractError(f"the {program} raised {type(e).__name__}: {first}{hint}")


def traces(model: Callable, guide: Callable, x: torch.Tensor, *args, **kwargs):
    """(guide trace, model trace replayed on it) for ``x`` (and further arguments, a batch's labels);
    a program that raises becomes a ContractError."""
    try:
        guide_trace = poutine.trace(guide).get_trace(x, *args, **kwargs)
    except Exception as e:  # the user's code: say where it failed, keep no traceback
        raise _raised("guide", e) from e
    try:
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, *args, **kwargs)
    except Exception as e:
        raise _raised("model", e) from e
    return guide_trace, model_trace


def observed_support(model: Callable, guide: Callable, x: torch.Tensor):
    """The support of the model's observed site for data like x (argument validation off)."""
    with pyro.validation_enabled(False):
        _, model_trace = traces(model, guide, x)
    observed = [s for s in _sample_sites(model_trace).values() if s["is_observed"]]
    if not observed:
        raise ContractError("the model has no observed site: observe the data with pyro.sample('x', ..., obs=x)")
    return observed[0]["fn"].support


def _check_site(name: str, site: dict, program: str, n: int) -> None:
    frames = [f for f in site["cond_indep_stack"] if f.name == "data"]
    if not frames:
        if not site["is_observed"]:
            raise ContractError(
                f"latent site {name!r} of the {program} is outside pyro.plate('data', ...): global latent "
                "variables are not supported yet; make it local to each data point (inside the plate)"
            )
        raise ContractError(f"observed site {name!r} of the {program} is not inside pyro.plate('data', ...)")
    if frames[0].dim != -1:
        raise ContractError(
            f"site {name!r} of the {program} has the data plate at dim {frames[0].dim}, not -1: data points must "
            "be the rightmost batch dimension (declare other dimensions with .to_event())"
        )
    batch_shape = tuple(site["fn"].batch_shape)
    if batch_shape != (n,):
        raise ContractError(
            f"site {name!r} of the {program} has batch shape {batch_shape} for {n} data points, not ({n},): its "
            "log-probability has extra batch dimensions; declare them as event dimensions with .to_event()"
        )


def check(model: Callable, guide: Callable, x: torch.Tensor, what: str = "the data") -> DiscreteSites:
    """Raise ContractError (or DataError for data outside the likelihood's support) naming the rule
    broken and the site. x: a small batch (n, P) as training or evaluation will see it.

    Discrete latent sites: a model site the guide does not sample must be discrete and marked
    ``infer={"enumerate": "parallel"}`` (it is then summed out); a discrete site the guide samples is
    either marked for enumeration too (summed over by ``TraceEnum_ELBO``) or drawn (score-function
    gradient). Returns the discrete sites found (:class:`pyrovae.traces.DiscreteSites`); which
    objectives fit them is :func:`check_objective`'s business."""
    n = x.shape[0]
    with pyro.validation_enabled(False):
        guide_trace, model_trace = traces(model, guide, x)
    model_sites, guide_sites = _sample_sites(model_trace), _sample_sites(guide_trace)
    observed = {name: s for name, s in model_sites.items() if s["is_observed"]}
    if not observed:
        raise ContractError("the model has no observed site: observe the data with pyro.sample('x', ..., obs=x)")
    discrete = discrete_sites(model_trace, guide_trace)
    if discrete.sequential:
        raise ContractError(f"site {discrete.sequential[0]!r} is marked for sequential enumeration: only "
                            "infer={'enumerate': 'parallel'} is supported")
    for name in discrete.missing:
        site = model_sites[name]
        fix = ("mark it infer={'enumerate': 'parallel'} (or wrap the model in config_enumerate) to have it summed out, "
               "or sample it in the guide" if is_discrete(site) else "the guide must sample every continuous latent site")
        raise ContractError(f"latent site {name!r} of the model is not sampled by the guide: {fix}")
    for name in guide_sites:
        if name not in model_sites:
            raise ContractError(f"guide site {name!r} has no site of that name in the model: every guide site must be a latent site of the model")
        if model_sites[name]["is_observed"]:
            raise ContractError(f"guide site {name!r} is observed in the model: the guide samples latent sites only")
    for name, site in model_sites.items():
        _check_site(name, site, "model", n)
    for name, site in guide_sites.items():
        _check_site(name, site, "guide", n)
    for name, site in observed.items():
        check_support(site["fn"].support, site["value"], f"{what} (observed site {name!r})")
    return discrete


REPARAMETERIZED_ONLY = ("mean-field", "iwae", "iwae-dreg")
"""Objectives whose estimators need every latent site reparameterized and none summed out."""


def check_objective(objective: str, discrete: DiscreteSites) -> None:
    """ContractError, in one line naming the objective that fits, where ``objective`` cannot train a
    model with these discrete sites: the IWAE and mean-field objectives need every latent site
    reparameterized and drawn by the guide; ``elbo`` fits all (``TraceEnum_ELBO`` where sites are
    enumerated, score-function terms where the guide draws a discrete site)."""
    if objective not in REPARAMETERIZED_ONLY or not discrete.any:
        return
    if discrete.summed or discrete.enumerated:
        sites = discrete.summed + discrete.enumerated
        raise ContractError(f"`objective` {objective} cannot sum out the enumerated discrete site {sites[0]!r}: "
                            "use `objective` elbo (TraceEnum_ELBO)")
    raise ContractError(f"`objective` {objective} needs reparameterized guide sites, but the guide samples the discrete "
                        f"site {discrete.sampled[0]!r}: use `objective` elbo (score-function gradient), or mark the site "
                        "infer={'enumerate': 'parallel'} to have it summed out")


def elementwise(support):
    """The constraint on each value: ``independent(boolean, 1)`` → ``boolean``."""
    while hasattr(support, "base_constraint"):
        support = support.base_constraint
    return support


def is_binary(support) -> bool:
    """Whether the observed values must be 0 or 1 (a Bernoulli likelihood)."""
    return elementwise(support) is constraints.boolean


def check_support(support, x: torch.Tensor, what: str) -> None:
    """Raise DataError unless every value of x lies in ``support``, saying what to do."""
    base = elementwise(support)  # count values, not rows
    inside = base.check(x)
    if bool(inside.all()):
        return
    bad = x[~inside] if inside.shape == x.shape else x[~inside.reshape(inside.shape + (1,) * (x.ndim - inside.ndim)).expand(x.shape)]
    hint = ""
    if base is constraints.boolean:
        hint = (": the Bernoulli likelihood needs binary data: binarize (--binarize static or dynamic; "
                "pyrovae.data.static_binarized in Python), or use --likelihood continuous-bernoulli")
    name = "{0, 1}" if base is constraints.boolean else str(base)
    raise DataError(f"{what} has {bad.numel()} values outside the support {name} of its distribution "
                    f"(e.g. {bad.flatten()[0].item():g}){hint}")
