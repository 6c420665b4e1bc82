"""Seeds of independent random streams, one per (seed, batch, purpose), so that a result does not
depend on how the work was split into batches, chunks or processes."""

from __future__ import annotations

import numpy as np


def batch_seed(seed: int, row: int, *stream: int) -> int:
    """The seed of the draws for the batch that starts at ``row``: its ELBO pass (no ``stream``),
    its chunk c of importance samples (``stream`` = (1 + c,)), AIS (0, 1), BDMC (0, 2)."""
    return int(np.random.SeedSequence([seed, row, *stream]).generate_state(1, np.uint64)[0] >> 1)
