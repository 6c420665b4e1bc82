"""Networks for decoders and encoders: the MLP, and a convolutional pair for 28 × 28 single-channel images.

Every network accepts extra leading dimensions (particles): (..., in) → (..., out). Images travel
flattened, as the data do: a (1, 28, 28) image is a row of 784 values, row-major.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from pyrovae.errors import PyrovaeError
from pyrovae.nn import ACTIVATIONS, mlp

IMAGE_SHAPE = (1, 28, 28)  # what the convolutional networks take and give
_FEATURES = (64, 7, 7)  # the feature map between the convolutions and the fully connected layers


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise PyrovaeError(f"unknown activation {name!r}; known: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


class ConvEncoder(nn.Module):
    """Convolutional encoder for 28 × 28 single-channel images: (..., 784) → (..., out_dim).

    Two stride-2 convolutions (1 → 32 → 64 channels, 4 × 4 kernels: 28 → 14 → 7), then an MLP
    3136 → hidden → out_dim; the activation follows every layer but the last.
    """

    def __init__(self, out_dim: int, hidden: Sequence[int] = (400,), activation: str = "elu"):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(1, 32, 4, stride=2, padding=1), _activation(activation),
            nn.Conv2d(32, 64, 4, stride=2, padding=1), _activation(activation),
        )
        self.head = nn.Sequential(nn.Flatten(), mlp([_FEATURES[0] * _FEATURES[1] * _FEATURES[2], *hidden, out_dim], activation))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        h = self.convs(x.reshape(-1, *IMAGE_SHAPE))  # (B, 64, 7, 7), B = prod(lead)
        return self.head(h).reshape(*lead, -1)


class ConvDecoder(nn.Module):
    """Convolutional decoder for 28 × 28 images: (..., latent_dim) → (..., channels × 784).

    An MLP latent_dim → hidden → 3136, reshaped to 64 × 7 × 7, then two stride-2 transposed
    convolutions (64 → 32 → ``channels``: 7 → 14 → 28). ``channels`` is the likelihood's
    parameters per pixel; the output is channel-major (all pixels of parameter 0, then of parameter 1, …),
    as a likelihood that splits its input with ``chunk(channels, -1)`` reads it.
    """

    def __init__(self, latent_dim: int, hidden: Sequence[int] = (400,), activation: str = "elu", channels: int = 1):
        super().__init__()
        self.fc = nn.Sequential(mlp([latent_dim, *hidden, _FEATURES[0] * _FEATURES[1] * _FEATURES[2]], activation), _activation(activation))
        self.deconvs = nn.Sequential(
            nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1), _activation(activation),
            nn.ConvTranspose2d(32, channels, 4, stride=2, padding=1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        lead = z.shape[:-1]
        h = self.fc(z.reshape(-1, z.shape[-1])).reshape(-1, *_FEATURES)
        return self.deconvs(h).reshape(*lead, -1)


def _output_layer(decoder: nn.Module) -> nn.Module | None:
    """The decoder's last linear or transposed-convolution layer (the one whose bias sets the output), or None."""
    last = None
    for module in decoder.modules():
        if isinstance(module, (nn.Linear, nn.ConvTranspose2d)):
            last = module
    return last if last is not None and last.bias is not None else None


@torch.no_grad()
def initialize_output_bias(decoder: nn.Module, likelihood: nn.Module, x: torch.Tensor) -> bool:
    """Set the decoder's output bias to ``likelihood.output_bias(x)``, x (N, P) the training data:
    the output that fits each value's marginal, e.g. the logit of each pixel's mean for a Bernoulli.
    A convolutional decoder has one bias per channel: it gets the mean over pixels of that channel's
    part. False (and nothing changed) where the likelihood has no ``output_bias`` or the decoder no bias."""
    make = getattr(likelihood, "output_bias", None)
    layer = _output_layer(decoder)
    if make is None or layer is None:
        return False
    bias = make(x.reshape(-1, x.shape[-1])).to(layer.bias)
    if bias.shape != layer.bias.shape:
        bias = bias.reshape(layer.bias.shape[0], -1).mean(-1)
    layer.bias.copy_(bias)
    return True


def check_image_shape(image_shape) -> None:
    """The convolutional networks take 28 × 28 single-channel images only."""
    if image_shape is None or tuple(image_shape) != IMAGE_SHAPE:
        raise PyrovaeError(
            f"network 'conv' needs images of shape (1, 28, 28), got {'no image shape' if image_shape is None else tuple(image_shape)}: "
            "use network='mlp' for other data"
        )


__all__ = ["mlp", "ConvEncoder", "ConvDecoder", "IMAGE_SHAPE", "check_image_shape", "initialize_output_bias"]
