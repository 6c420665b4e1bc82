"""Pyro's semi-supervised VAE example (``examples/vae/ss_vae_M2.py``, Kingma et al. 2014, M2), its
model and guide as written there, adapted only where pyrovae's contract asks:

1. Labels come as class indices (``pyrovae train --labelled 100`` serves ``model(x, y)`` on labelled
   batches); the example's one-hot ``ys`` are made from them on entry.
2. The classifier's loss, which the example trains as a third SVI loss (``model_classify`` with an
   empty guide), is an observed site of the model on labelled batches, ``y_aux``, scaled by
   ``aux_loss_multiplier`` as there: one (model, guide) pair, the same objective.
3. ``config_enumerate(guide, "parallel")`` becomes the mark ``infer={"enumerate": "parallel"}`` on
   the guide's ``y``: pyrovae then trains with ``TraceEnum_ELBO``, as the example does.
4. The data are binarized afresh each epoch (pyrovae's default for a Bernoulli likelihood): the
   example scores grey levels under a Bernoulli with ``validate_args=False``, which is not a
   normalized likelihood, so its log p(x) would mean nothing.
5. The example's ``MLP`` helper (``utils/custom_mlp.py``) is written out below: Softplus hidden
   layers, the inputs joined after broadcasting their leading dims (enumeration adds one).

Everything else — sizes (784-500-50), the priors, the networks' output activations (Softmax for
q(y|x), Exp for the scale of q(z|x,y), Sigmoid for the decoder), the aux multiplier 46 — is the
example's. Train and evaluate it with the command line::

    pyrovae train --dataset mnist --labelled 100 --batch-size 200 --lr 0.00042 \\
        --model examples/models/ss_vae_m2.py:ss_vae
    pyrovae evaluate RUN            # log p(x) with y summed out, and the accuracy of q(y | x)
"""

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.nn import functional as F


class Exp(nn.Module):
    def forward(self, val):
        return torch.exp(val)


class MLP(nn.Module):
    """The example's MLP: inputs joined (leading dims broadcast), Softplus hidden layers, one output
    activation per head."""

    def __init__(self, sizes, output_sizes, output_activations):
        super().__init__()
        layers = []
        for n_in, n_out in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(n_in, n_out), nn.Softplus()]
        self.hidden = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(sizes[-1], n) for n in output_sizes)
        self.activations = output_activations

    def forward(self, inputs):
        shape = torch.broadcast_shapes(*(t.shape[:-1] for t in inputs))
        h = self.hidden(torch.cat([t.expand(*shape, t.shape[-1]) for t in inputs], -1))
        out = [act(head(h)) if act is not None else head(h) for head, act in zip(self.heads, self.activations)]
        return out[0] if len(out) == 1 else out


class SSVAE(nn.Module):
    def __init__(self, output_size=10, input_size=784, z_dim=50, hidden_layers=(500,), aux_loss_multiplier=46.0):
        super().__init__()
        self.output_size, self.input_size, self.z_dim = output_size, input_size, z_dim
        self.aux_loss_multiplier = aux_loss_multiplier
        hidden = list(hidden_layers)
        self.encoder_y = MLP([input_size, *hidden], [output_size], [nn.Softmax(dim=-1)])
        self.encoder_z = MLP([input_size + output_size, *hidden], [z_dim, z_dim], [None, Exp()])
        self.decoder = MLP([z_dim + output_size, *hidden], [input_size], [nn.Sigmoid()])

    def _one_hot(self, ys, xs):
        return None if ys is None else F.one_hot(ys.long(), self.output_size).to(xs.dtype)

    def model(self, xs, ys=None):
        pyro.module("ss_vae", self)
        ys = self._one_hot(ys, xs)
        batch_size = xs.size(0)
        options = dict(dtype=xs.dtype, device=xs.device)
        with pyro.plate("data"):
            prior_loc = torch.zeros(batch_size, self.z_dim, **options)
            prior_scale = torch.ones(batch_size, self.z_dim, **options)
            zs = pyro.sample("z", dist.Normal(prior_loc, prior_scale).to_event(1))
            alpha_prior = torch.ones(batch_size, self.output_size, **options) / (1.0 * self.output_size)
            labelled = ys is not None
            ys = pyro.sample("y", dist.OneHotCategorical(alpha_prior), obs=ys)
            loc = self.decoder([zs, ys])
            pyro.sample("x", dist.Bernoulli(loc, validate_args=False).to_event(1), obs=xs)
            if labelled:  # the example's model_classify, on the same labelled batch
                alpha = self.encoder_y([xs])
                with pyro.poutine.scale(scale=self.aux_loss_multiplier):
                    pyro.sample("y_aux", dist.OneHotCategorical(alpha), obs=ys)
            return loc

    def guide(self, xs, ys=None):
        pyro.module("ss_vae", self)
        ys = self._one_hot(ys, xs)
        with pyro.plate("data"):
            if ys is None:
                alpha = self.encoder_y([xs])
                ys = pyro.sample("y", dist.OneHotCategorical(alpha), infer={"enumerate": "parallel"})
            loc, scale = self.encoder_z([xs, ys])
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))


def ss_vae(data_dim, image_shape=None, num_classes=10, z_dim=50, hidden_layers=(500,), aux_loss_multiplier=46.0):
    """The example's SSVAE for ``data_dim`` pixels and ``num_classes`` classes."""
    return SSVAE(num_classes, data_dim, z_dim, tuple(hidden_layers), aux_loss_multiplier)
