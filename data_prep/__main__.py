"""``python -m data_prep``: the same command line as ``ddmpi-prep``."""

import sys

from data_prep.cli import main

sys.exit(main())
