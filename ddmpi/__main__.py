"""``python -m ddmpi``: same as the ``ddmpi`` console script."""

import sys

from ddmpi.cli import main

sys.exit(main())
