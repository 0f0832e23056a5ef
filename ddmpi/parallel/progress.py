"""Progress and ETA of all ranks' local epochs, printed by rank 0, without blocking anyone.

Ownership: :class:`Progress` duplicates the communicator it is given, so its point-to-point
messages can never match another module's. Ranks other than 0 send one small non-blocking
message per finished epoch; rank 0 drains them whenever it calls :meth:`poll` (after its own
epochs) and :meth:`wait_all` (before the gather), and prints one line per update.
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
    """Collective: every rank of ``comm`` creates it, reports epochs, and calls ``wait_all``."""

    def __init__(self, comm, total_epochs, printer=print):
        self.comm = comm.Dup()
        self.total = total_epochs  # all subdomains' epochs together
        self.printer = printer
        self.start = time.perf_counter()
        self.done = 0
        self.finished_ranks = 0
        self.pending = []

    def epoch_done(self, subdomain, record):
        """Report one finished local epoch (a ``local_training.EpochRecord``)."""
        msg = ("epoch", subdomain, record.epoch, record.val_accuracy, record.seconds)
        if self.comm.rank == 0:
            self._show(msg)
            self.poll()
        else:
            self.pending.append(self.comm.isend(msg, dest=0, tag=TAG))

    def rank_done(self, epochs_skipped=0):
        """This rank has finished its local training (``epochs_skipped``: early stopping)."""
        msg = ("done", epochs_skipped)
        if self.comm.rank == 0:
            self._show(msg)
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
        if msg[0] == "done":
            self.finished_ranks += 1
            self.total -= msg[1]
            return
        _, sub, epoch, val_acc, seconds = msg
        self.done += 1
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.done * max(0, self.total - self.done)
        self.printer(f"[local {self.done}/{self.total} epochs {100 * self.done / self.total:5.1f}%] "
                     f"subdomain {sub} epoch {epoch}: val acc {val_acc:.4f} ({seconds:.1f}s) "
                     f"elapsed {format_seconds(elapsed)} ETA {format_seconds(eta)}")
