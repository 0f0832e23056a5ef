"""Locations the benchmark scripts share (imported by them as ``from _paths import ...``: a
script's own folder is first on ``sys.path``).

``SHARED_DATA``: the real data sets, ``$DDMPI_SHARED_DATA`` if set, else ``../shared/data``
beside the checkout (as tests/helpers.py finds them).
"""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DDMPI_SHARED_DATA", ROOT.parent / "shared" / "data"))
