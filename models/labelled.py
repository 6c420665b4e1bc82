"""Models of labelled data: the conditional VAE and the semi-supervised M2 VAE (Kingma et al., 2014).

Generative model, for a batch x (N, P) with labels y (N,) in {0, …, C−1} or None::

    y_n ~ Categorical(1/C, …, 1/C)           site y: batch (N,); observed where the batch is labelled
    z_n ~ N(0, I)                            site z: batch (N,), event (D,)
    x_n ~ Bernoulli(decoder_θ(z_n, y_n))     site x: batch (N,), event (P,)

Guide::

    q(y_n | x_n) = Categorical(classifier_φ(x_n))   sampled only where y is None, marked for enumeration
    q(z_n | x_n, y_n) = N(μ_φ(x_n, y_n), diag σ_φ(x_n, y_n)²)

Where the batch has no labels, training sums over y exactly (``TraceEnum_ELBO``: the guide's site
``y`` carries ``infer={"enumerate": "parallel"}``); evaluation draws y from q(y | x), its log q in
the importance weight, so that log p(x) = log Σ_y ∫ p(x, y, z) dz is estimated with y summed out in
expectation. On labelled batches M2 adds α · log q(y_n | x_n) to the objective (the model's factor
``classifier``, Kingma et al. 2014, eq. 9), so that the classifier learns from the labels as well as
through the unlabelled bound; α is ``classifier_weight``, per labelled point. Kingma et al. weight
the mean over the labelled points by 0.1 · N, i.e. each of the 100 labelled MNIST points by
0.1 · 60 000 / 100 = 60; Pyro's example takes 46; the default here is 50. The factor is an observed
site of the model, so that log-densities read on a labelled batch include it: evaluate log p(x) on
unlabelled data (y = None), as :mod:`pyrovae.evaluate` does.

The conditional VAE is the same program with q(y | x) uniform and no classifier term: p(x | z, y)
and q(z | x, y), trained on labelled batches (on unlabelled ones its y is summed out under a uniform
q, which still bounds log p(x)).

Every network accepts extra leading dimensions: under enumeration y has shape (C, 1, …) and z
(C, K, N, D); the two are broadcast before they are joined.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

from pyrovae.errors import PyrovaeError
from pyrovae.nn import mlp, register


def _joined(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[a, b] along the last dim, their leading dims broadcast: (…, A) and (…, B) → (…, A + B)."""
    shape = torch.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    return torch.cat([a.expand(*shape, a.shape[-1]), b.expand(*shape, b.shape[-1])], -1)


class LabelledVAE(nn.Module):
    """The M2 model (``classifier=True``) or the conditional VAE (``classifier=False``); see the module docstring.

    ``model(x, y=None)`` and ``guide(x, y=None)``; :meth:`classify` gives q(y | x)'s most likely class.
    """

    def __init__(self, data_dim: int, num_classes: int = 10, latent_dim: int = 50, hidden: Sequence[int] = (500,),
                 activation: str = "softplus", classifier: bool = True, classifier_weight: float = 50.0):
        super().__init__()
        if num_classes < 2:
            raise PyrovaeError(f"`num_classes` must be at least 2, got {num_classes}")
        if classifier_weight < 0:
            raise PyrovaeError(f"`classifier_weight` must be at least 0, got {classifier_weight}")
        self.data_dim, self.num_classes, self.latent_dim = data_dim, num_classes, latent_dim
        self.classifier_weight = float(classifier_weight) if classifier else 0.0
        hidden = list(hidden)
        self.decoder = mlp([latent_dim + num_classes, *hidden, data_dim], activation)
        self.encoder_z = mlp([data_dim + num_classes, *hidden, 2 * latent_dim], activation)
        self.encoder_y = mlp([data_dim, *hidden, num_classes], activation) if classifier else None
        self.register_buffer("_zero", torch.zeros(()))

    def _one_hot(self, y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """(…,) class indices → (…, C) one-hot in ``like``'s dtype; a comparison, not ``F.one_hot``,
        whose check of the values reads them on the host (a traced evaluation pass cannot)."""
        classes = torch.arange(self.num_classes, device=y.device)
        return (y.long()[..., None] == classes).to(like.dtype)

    def class_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of q(y | x), (…, C): the classifier's (M2), or zeros (the conditional VAE's uniform q)."""
        if self.encoder_y is None:
            return x.new_zeros(*x.shape[:-1], self.num_classes)
        return self.encoder_y(x)

    def model(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        N, C, labelled = x.shape[0], self.num_classes, y is not None
        register(self.decoder)
        if labelled and self.encoder_y is not None:
            register(self.encoder_y)
        with pyro.plate("data", N):
            prior = (self._zero.to(x.dtype) - torch.log(torch.tensor(float(C), dtype=x.dtype, device=x.device))).expand(N, C)
            y = pyro.sample("y", dist.Categorical(logits=prior), obs=y)  # before z, as in the guide: KL(q(y|x) ‖ p(y)) in closed form
            zero = self._zero.to(x.dtype).expand(N, self.latent_dim)
            z = pyro.sample("z", dist.Normal(zero, 1.0 + zero).to_event(1))
            logits = self.decoder(_joined(z, self._one_hot(y, x)))
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)
            if labelled and self.classifier_weight:  # α log q(y | x): the classifier learns from the labels
                log_q = dist.Categorical(logits=self.class_logits(x)).log_prob(y)
                pyro.factor("classifier", self.classifier_weight * log_q)

    def guide(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        register(self.encoder_z)
        if self.encoder_y is not None:
            register(self.encoder_y)
        with pyro.plate("data", x.shape[0]):
            if y is None:
                y = pyro.sample("y", dist.Categorical(logits=self.class_logits(x)), infer={"enumerate": "parallel"})
            out = self.encoder_z(_joined(x, self._one_hot(y, x)))
            loc, raw = out[..., :self.latent_dim], out[..., self.latent_dim:]
            pyro.sample("z", dist.Normal(loc, F.softplus(raw) + 1e-4).to_event(1))

    @torch.no_grad()
    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """argmax_y q(y | x) for each row: (N, P) → (N,) long."""
        return self.class_logits(x).argmax(-1)


def m2(data_dim: int, image_shape=None, num_classes: int = 10, latent_dim: int = 50, hidden: Sequence[int] = (500,),
       activation: str = "softplus", classifier_weight: float = 50.0) -> LabelledVAE:
    """The semi-supervised M2 VAE of Kingma et al. (2014): p(x | y, z) p(y) p(z), q(y | x) q(z | x, y), the
    classifier term α · log q(y | x) on labelled batches (α = ``classifier_weight``)."""
    return LabelledVAE(data_dim, num_classes, latent_dim, hidden, activation, True, classifier_weight)


def cvae(data_dim: int, image_shape=None, num_classes: int = 10, latent_dim: int = 50, hidden: Sequence[int] = (500,),
         activation: str = "softplus") -> LabelledVAE:
    """The conditional VAE: p(x | z, y) p(z), q(z | x, y); y uniform where a batch has no labels."""
    return LabelledVAE(data_dim, num_classes, latent_dim, hidden, activation, False, 0.0)


__all__ = ["LabelledVAE", "cvae", "m2"]
