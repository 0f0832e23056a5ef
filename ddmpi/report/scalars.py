"""Per-epoch scalars as CSV (``RUN_DIR/scalars/<name>.csv``) and, optionally, TensorBoard events.

The CSV file is appended to row by row (flushed each time), so a resumed run continues it.
"""

import csv
import logging
import os
from numbers import Integral, Real

__all__ = ["ScalarWriter"]

log = logging.getLogger(__name__)


def _summary_writer_class():
    """``torch.utils.tensorboard.SummaryWriter``, imported only when TensorBoard is asked for."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise ImportError("TensorBoard scalars need the tensorboard package: "
                          "`pip install tensorboard`, or set run.tensorboard false") from error
    return SummaryWriter


def _existing_header(path):
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return None
    with open(path, newline="") as f:
        return next(csv.reader(f), None)


class ScalarWriter:
    """Append ``{name: value}`` scalars per epoch to a CSV file (and TensorBoard if asked).

    The columns are ``epoch`` plus the keys of the first row (other keys later are an error), or
    an existing file's header: a run resumed by a newer ddmpi keeps its file's columns, and
    scalars the file lacks are left out of it (with a warning).
    """

    def __init__(self, run_dir, name, tensorboard=False):
        if not name or os.sep in name or (os.altsep and os.altsep in name) or name in (".", ".."):
            raise ValueError(f"name must be a plain file name, got {name!r}")
        self.path = os.path.join(os.fspath(run_dir), "scalars", f"{name}.csv")
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.columns = _existing_header(self.path)
        self._resumed, self._left_out = self.columns is not None, set()
        self._tb = None
        if tensorboard:
            log_dir = os.path.join(os.fspath(run_dir), "tensorboard", name)
            self._tb = _summary_writer_class()(log_dir=log_dir)
        self._file = open(self.path, "a", newline="")  # noqa: SIM115 (open until close())
        self._csv = csv.writer(self._file, lineterminator="\n")

    def add(self, epoch, scalars):
        """Append one row: ``epoch`` (int) and ``scalars`` (``{name: float}``)."""
        if self._file is None:
            raise ValueError(f"ScalarWriter for {self.path} is closed")
        if isinstance(epoch, bool) or not isinstance(epoch, Integral):
            raise TypeError(f"epoch must be an int, got {epoch!r}")
        values = {key: self._number(key, value) for key, value in scalars.items()}
        if "epoch" in values:
            raise ValueError("'epoch' is a reserved column; pass it as the epoch argument")
        if self.columns is None:
            self.columns = ["epoch"] + list(values)
            self._csv.writerow(self.columns)
        new = [key for key in values if key not in self.columns and key not in self._left_out]
        if new and not self._resumed:
            raise ValueError(f"scalars {new} are not columns of {self.path} "
                             f"(columns: {self.columns[1:]})")
        if new:
            log.warning(f"{self.path} was started without the columns {new}: left out of it")
            self._left_out.update(new)
        row = {"epoch": int(epoch), **values}
        self._csv.writerow([row.get(column, "") for column in self.columns])
        self._file.flush()
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, value, global_step=int(epoch))
            self._tb.flush()

    @staticmethod
    def _number(key, value):
        if hasattr(value, "item"):  # numpy scalars, 0-d arrays and tensors
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, Real):
            raise TypeError(f"scalar {key!r} must be a number, got {value!r}")
        return float(value)

    def close(self):
        """Close the CSV file and the TensorBoard writer (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
