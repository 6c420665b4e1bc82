"""KL(q ‖ p) in closed form at a latent site, where it exists and where it is the site's KL term.

At a latent site s the ELBO's term is E_q[log q(z_s | ·) − log p(z_s | ·)]. It equals the expectation
of the closed form KL(q(z_s | pa_q) ‖ p(z_s | pa_p)) over the guide's draws of the conditioning
variables only if those are drawn *before* z_s: then, with them fixed, the inner expectation over
z_s is exactly that KL. If the model's p(z_s | ·) may depend on a latent t that the guide draws
*after* s (typically from s, as a bottom-up guide draws z1 ~ q(z1 | z2) for a model p(z1) p(z2 | z1)),
t moves with z_s, the inner expectation is not a KL at a fixed t, and the closed form is a different
number — not an estimate of the term. Such a site is "not applicable": Monte Carlo only.

The rule used, from the traces alone: a latent t that runs before s in the model (so that p(z_s | ·)
may read it) but after s in the guide makes the closed form inapplicable at s. It is conservative:
a site that does not actually read t is reported as Monte Carlo only, which is never wrong.

Closed forms are ``torch.distributions.kl_divergence``'s registry (Normal ‖ Normal, Normal ‖ Laplace,
MultivariateNormal ‖ MultivariateNormal, Categorical ‖ Categorical, …, and pairs registered by
:mod:`pyrovae.guides`); for mixtures, flows or a Student-t prior there is none.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from pyro.poutine.util import site_is_subsample
from torch.distributions import kl_divergence

ANALYTIC = "analytic"
NO_CLOSED_FORM = "no closed form"


def closed_form(q_fn, p_fn) -> torch.Tensor | None:
    """KL(q ‖ p) from ``torch.distributions.kl_divergence``, batch-shaped; None where no closed form is registered."""
    try:
        return kl_divergence(q_fn, p_fn)
    except NotImplementedError:
        return None


def _latent_order(trace) -> list[str]:
    return [name for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)]


def drawn_after(name: str, model_trace, guide_trace) -> list[str]:
    """Latent sites that run before ``name`` in the model (so that p(z_name | ·) may depend on them)
    but that the guide draws after ``name``."""
    model_order, guide_order = _latent_order(model_trace), _latent_order(guide_trace)
    if name not in guide_order:
        return []
    before_in_model = model_order[:model_order.index(name)] if name in model_order else []
    after_in_guide = set(guide_order[guide_order.index(name) + 1:])
    return [t for t in before_in_model if t in after_in_guide]


class SiteKL(NamedTuple):
    value: torch.Tensor | None  # KL(q_s ‖ p_s) with the site's batch shape; None where not available
    method: str  # "analytic", "no closed form", or "not applicable: ..." (why the closed form is not the term)


def site_kl(name: str, model_trace, guide_trace) -> SiteKL:
    """The closed-form KL at latent site ``name`` of two traces, or why there is none (see the module docstring)."""
    after = drawn_after(name, model_trace, guide_trace)
    if after:
        return SiteKL(None, f"not applicable: p({name} | ·) may depend on {', '.join(after)}, "
                            f"which the guide draws after {name}")
    value = closed_form(guide_trace.nodes[name]["fn"], model_trace.nodes[name]["fn"])
    return SiteKL(value, ANALYTIC if value is not None else NO_CLOSED_FORM)


__all__ = ["ANALYTIC", "NO_CLOSED_FORM", "SiteKL", "closed_form", "drawn_after", "site_kl"]
