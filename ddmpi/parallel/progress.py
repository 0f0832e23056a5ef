"""Progress and ETA of all ranks' epochs, printed by rank 0, without blocking anyone.

Ranks other than 0 send one small non-blocking message per event on a private duplicate of the
group; rank 0 drains them after its own epochs and in :meth:`Progress.wait_all`.
"""

import time

from mpi4py import MPI

TAG = 7


def format_seconds(seconds):
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """Collective: every rank of ``group`` creates it, reports epochs, and calls ``wait_all``."""

    def __init__(self, group, total_epochs, printer=print):
        self.comm = group.comm.Dup()
        self.total = total_epochs
        self.printer = printer
        self.start = time.perf_counter()
        self.done = 0
        self.resumed = 0  # epochs finished by an earlier run: done, but not part of the rate
        self.finished_ranks = 0
        self.pending = []

    def epochs_resumed(self, count):
        """``count`` epochs were finished before this run (``--resume``)."""
        self._send(("resumed", count))

    def epoch_done(self, name, record):
        """Report one finished epoch (a ``training.loop.EpochRecord``) of CNN ``name``."""
        self._send(("epoch", name, record.epoch, record.val_accuracy, record.seconds))

    def rank_done(self, epochs_skipped=0):
        """This rank has finished (``epochs_skipped``: left out by early stopping)."""
        self._send(("done", epochs_skipped))

    def _send(self, msg):
        if self.comm.rank == 0:
            self._show(msg)
            self.poll()
        else:
            self.pending.append(self.comm.isend(msg, dest=0, tag=TAG))

    def poll(self):
        """Rank 0: print every progress message that has arrived."""
        while self.comm.iprobe(source=MPI.ANY_SOURCE, tag=TAG):
            self._show(self.comm.recv(source=MPI.ANY_SOURCE, tag=TAG))

    def wait_all(self):
        """Rank 0 drains messages until every rank is done; others complete their sends."""
        if self.comm.rank == 0:
            while self.finished_ranks < self.comm.size:
                self._show(self.comm.recv(source=MPI.ANY_SOURCE, tag=TAG))
        else:
            MPI.Request.waitall(self.pending)
        self.comm.Free()

    def _show(self, msg):
        kind = msg[0]
        if kind == "done":
            self.finished_ranks += 1
            self.total -= msg[1]
        elif kind == "resumed":
            self.done += msg[1]
            self.resumed += msg[1]
        else:
            self.done += 1
            self.printer(self.line(*msg[1:]))

    def line(self, name, epoch, val_acc, seconds):
        elapsed = time.perf_counter() - self.start
        rate = elapsed / max(1, self.done - self.resumed)
        eta = rate * max(0, self.total - self.done)
        return (f"[{self.done}/{self.total} epochs {100 * self.done / max(1, self.total):5.1f}%] "
                f"{name} epoch {epoch}: val acc {val_acc:.4f} ({seconds:.1f}s) "
                f"elapsed {format_seconds(elapsed)} ETA {format_seconds(eta)}")
