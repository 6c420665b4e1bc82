"""``python -m pyrovae`` (and ``torchrun -m pyrovae``): the ``pyrovae`` command."""

import sys

from pyrovae.cli.main import run

sys.exit(run())
