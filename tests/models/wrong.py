"""Models that keep the model/guide contract but compute the wrong thing: the broken variants that
the tests of the components must catch."""

import pyro
import torch

from pyrovae.models import TwoLayerVAE


class TopLayerIgnored(TwoLayerVAE):
    """Broken: p(z2 | z1) evaluated at z1 = 0, so the top layer can carry nothing."""

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z1 = self.prior()
            z2 = pyro.sample("z2", self.p_z2(torch.zeros_like(z1)))
            return self.likelihood(self.decoder(z2), x)
