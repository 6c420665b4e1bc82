"""``python -m pyrovae`` (and ``torchrun -m pyrovae``): the ``pyrovae`` command."""

import sys

from pyrovae.cli.main import main

sys.exit(main())
