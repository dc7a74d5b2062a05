"""``python -m lightning_shrink.cli``: the ``lightning-shrink`` command."""

import sys

from lightning_shrink.cli import main

sys.exit(main())
