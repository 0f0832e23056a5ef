"""Downloads from a list of mirrors, md5-checked, written atomically (no partial files)."""

import hashlib
import logging
import urllib.request
from pathlib import Path

from data_prep.errors import PrepError
from ddmpi import __version__
from ddmpi.data.atomic import atomic_path

log = logging.getLogger(__name__)

TIMEOUT_S = 60
CHUNK = 1 << 20


def fetch(filename, mirrors, md5, dest_dir):
    """``dest_dir/filename``, downloaded from the first mirror that serves it with this md5.

    An existing file is kept as it is (it may be a re-compressed copy with the same content).
    """
    dest = Path(dest_dir) / filename
    if dest.exists():
        return dest
    failures = []
    for base in mirrors:
        url = base + filename
        log.info("downloading %s", url)
        try:
            with atomic_path(dest) as tmp:
                digest = _download(url, tmp)
                if digest != md5:
                    raise PrepError(f"md5 {digest}, expected {md5}")
            return dest
        except (OSError, PrepError) as err:  # urllib's URLError and HTTPError are OSErrors
            log.info("%s failed: %s", url, err)
            failures.append(f"{url}: {err}")
    raise PrepError(f"{dest}: download failed from every mirror ({'; '.join(failures)})")


def _download(url, path):
    """Stream ``url`` into ``path``; return the md5 hex digest of the bytes received."""
    digest = hashlib.md5(usedforsecurity=False)
    request = urllib.request.Request(url, headers={"User-Agent": f"ddmpi-prep/{__version__}"})
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response, open(path, "wb") as f:
        for block in iter(lambda: response.read(CHUNK), b""):
            digest.update(block)
            f.write(block)
    return digest.hexdigest()
