"""Launcher detection, node-local rank, device and thread binding.

Every rank needs three facts about where it runs: its rank *on its node* (to pick a GPU), how
many ranks share the node (to share the cores) and which launcher said so (for the log). The
launcher publishes them in environment variables; each :class:`ClusterEnvironment` subclass
reads one launcher's variables, in the spirit of Lightning Fabric's cluster environments:

==================  ==========================================================================
environment         variables (world rank, world size, local rank, local size)
==================  ==========================================================================
``openmpi``         ``OMPI_COMM_WORLD_RANK``/``_SIZE``/``_LOCAL_RANK``/``_LOCAL_SIZE`` (mpirun)
``mpich``           ``PMI_RANK``, ``PMI_SIZE``, ``MPI_LOCALRANKID``, ``MPI_LOCALNRANKS``
                    (MPICH/Intel MPI Hydra mpiexec)
``pmix``            ``PMIX_RANK`` (or ``PALS_RANKID``), ``PALS_LOCAL_RANKID``,
                    ``PALS_LOCAL_SIZE`` (Cray PALS / PBS mpiexec); ``PMI_LOCAL_RANK``/
                    ``PMI_LOCAL_SIZE`` where Cray MPICH sets them
``slurm``           ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``/``SLURM_NTASKS``,
                    ``SLURM_LOCALID``, ``SLURM_STEP_TASKS_PER_NODE``/``SLURM_TASKS_PER_NODE``
                    with ``SLURM_NODEID`` (srun direct launch)
``shared-memory``   no variables: ``comm.Split_type(MPI.COMM_TYPE_SHARED)`` (any MPI)
==================  ==========================================================================

The launcher-specific variables are tried before Slurm's on purpose: ``mpirun``/``mpiexec``
started inside an ``sbatch`` allocation hand every rank the batch shell's stale
``SLURM_PROCID=0``/``SLURM_LOCALID=0`` (or those of the daemon they started with ``srun``),
while their own variables are fresh. :func:`node_local_rank` additionally checks the candidate
against the communicator (world rank and size must match ``comm``) and decides collectively, so
all ranks use the same source; stale or partial variables fall through to the shared-memory
split, which is always right.

Device and threads (:func:`select_device`, :func:`threads_per_rank`) are pure functions of
their arguments and of an ``environ`` mapping, with the GPU count injectable, so the binding
logic is tested on CPU-only machines with fake environments.
"""

import os
import re
import socket
from dataclasses import dataclass, field
from typing import Mapping, Optional, Tuple

__all__ = [
    "BindingError", "ClusterEnvironment", "VariableEnvironment", "OpenMPIEnvironment",
    "MPICHEnvironment", "PMIxEnvironment", "SlurmEnvironment", "SharedMemoryEnvironment",
    "ENVIRONMENTS",
    "Binding", "node_local_rank", "select_device", "threads_per_rank", "bind_threads",
    "describe_binding", "bind_process", "slurm_gpus", "visible_gpu_count", "parse_tasks_per_node",
]


class BindingError(ValueError):
    """The requested device or thread binding cannot be satisfied; the message names the field."""


def _int(environ, *names):
    """First of ``names`` in ``environ`` as an integer, else None (junk counts as absent)."""
    for name in names:
        value = environ.get(name)
        if value is None or str(value).strip() == "":
            continue
        try:
            return int(str(value).strip())
        except ValueError:
            continue
    return None


def parse_tasks_per_node(value):
    """Expand Slurm's compressed tasks-per-node list: ``"2(x3),1"`` -> ``[2, 2, 2, 1]``.

    Returns None when ``value`` is empty or malformed.
    """
    if not value:
        return None
    counts = []
    for part in str(value).split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not match:
            return None
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts or None


# --------------------------------------------------------------------------------------------
# Cluster environments
# --------------------------------------------------------------------------------------------

class ClusterEnvironment:
    """What one launcher says about this process: world rank/size and node-local rank/size.

    Subclasses read one launcher's variables from ``environ``; :meth:`applies` says whether
    that launcher's variables are present. ``ClusterEnvironment.detect(environ)`` returns the
    first applicable environment in :data:`ENVIRONMENTS` order, or None.
    """

    name = "unknown"

    def __init__(self, environ=None):
        self.environ = dict(os.environ if environ is None else environ)

    # -- per-launcher part -------------------------------------------------------------------
    @classmethod
    def applies(cls, environ) -> bool:
        """Are this launcher's local-rank variables present in ``environ``?"""
        raise NotImplementedError

    def world_rank(self) -> Optional[int]:
        raise NotImplementedError

    def world_size(self) -> Optional[int]:
        raise NotImplementedError

    def local_rank(self) -> Optional[int]:
        raise NotImplementedError

    def local_size(self) -> Optional[int]:
        raise NotImplementedError

    # -- shared part -------------------------------------------------------------------------
    @staticmethod
    def detect(environ=None) -> Optional["ClusterEnvironment"]:
        """The first environment of :data:`ENVIRONMENTS` whose variables are in ``environ``.

        No communicator is consulted, so stale variables are not caught here; use
        :func:`node_local_rank` under MPI, which checks the candidates against ``comm``.
        """
        environ = os.environ if environ is None else environ
        for cls in ENVIRONMENTS:
            if cls.applies(environ):
                return cls(environ)
        return None

    def is_complete(self) -> bool:
        """All four numbers are present and coherent (0 <= rank < size)."""
        values = (self.world_rank(), self.world_size(), self.local_rank(), self.local_size())
        if any(v is None for v in values):
            return False
        rank, size, local_rank, local_size = values
        return 0 <= rank < size and 0 <= local_rank < local_size <= size

    def consistent_with(self, comm) -> bool:
        """Complete, and its world rank and size are those of ``comm``."""
        return (self.is_complete() and self.world_rank() == comm.Get_rank()
                and self.world_size() == comm.Get_size())

    def __repr__(self):
        return (f"{type(self).__name__}(rank={self.world_rank()}, size={self.world_size()}, "
                f"local_rank={self.local_rank()}, local_size={self.local_size()})")


class VariableEnvironment(ClusterEnvironment):
    """A launcher that publishes the four numbers in variables: each a tuple of names, the
    first one present wins; ``markers`` are the names that must all be present to apply."""

    rank_vars = size_vars = local_rank_vars = local_size_vars = markers = ()

    @classmethod
    def applies(cls, environ):
        return all(_int(environ, *names) is not None for names in cls.markers)

    def world_rank(self):
        return _int(self.environ, *self.rank_vars)

    def world_size(self):
        return _int(self.environ, *self.size_vars)

    def local_rank(self):
        return _int(self.environ, *self.local_rank_vars)

    def local_size(self):
        return _int(self.environ, *self.local_size_vars)


class OpenMPIEnvironment(VariableEnvironment):
    """Open MPI's ``mpirun``/``mpiexec`` (ORTE/PRRTE): ``OMPI_COMM_WORLD_*``."""

    name = "openmpi"
    rank_vars, size_vars = ("OMPI_COMM_WORLD_RANK",), ("OMPI_COMM_WORLD_SIZE",)
    local_rank_vars = ("OMPI_COMM_WORLD_LOCAL_RANK",)
    local_size_vars = ("OMPI_COMM_WORLD_LOCAL_SIZE",)
    markers = (local_rank_vars,)


class MPICHEnvironment(VariableEnvironment):
    """MPICH / Intel MPI Hydra: ``PMI_RANK``, ``MPI_LOCALRANKID``/``MPI_LOCALNRANKS``."""

    name = "mpich"
    rank_vars, size_vars = ("PMI_RANK",), ("PMI_SIZE",)
    local_rank_vars, local_size_vars = ("MPI_LOCALRANKID",), ("MPI_LOCALNRANKS",)
    markers = (local_rank_vars,)


class PMIxEnvironment(VariableEnvironment):
    """PMIx launchers where the local rank is published: Cray PALS (PBS ``mpiexec``).

    World rank from ``PMIX_RANK`` (else ``PALS_RANKID``/``PMI_RANK``); local rank from
    ``PALS_LOCAL_RANKID`` (else Cray MPICH's ``PMI_LOCAL_RANK``). ``PMIX_RANK`` alone (e.g.
    ``srun --mpi=pmix``) gives no local rank, so this environment does not apply to it.
    """

    name = "pmix"
    rank_vars = ("PMIX_RANK", "PALS_RANKID", "PMI_RANK")
    size_vars = ("PMIX_SIZE", "PALS_SIZE", "PMI_SIZE")
    local_rank_vars = ("PALS_LOCAL_RANKID", "PMI_LOCAL_RANK")
    local_size_vars = ("PALS_LOCAL_SIZE", "PMI_LOCAL_SIZE")
    markers = (("PMIX_RANK", "PALS_RANKID"), local_rank_vars)


class SlurmEnvironment(VariableEnvironment):
    """``srun`` direct launch: ``SLURM_PROCID``, ``SLURM_LOCALID`` and the step's task layout."""

    name = "slurm"
    rank_vars, local_rank_vars = ("SLURM_PROCID",), ("SLURM_LOCALID",)
    size_vars = ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS")
    markers = (rank_vars, local_rank_vars)

    def local_size(self):
        for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
            counts = parse_tasks_per_node(self.environ.get(name))
            if not counts:
                continue
            if len(set(counts)) == 1:          # same on every node: no node index needed
                return counts[0]
            node = _int(self.environ, "SLURM_NODEID")
            if node is not None and 0 <= node < len(counts):
                return counts[node]
            return None
        return None


class SharedMemoryEnvironment(ClusterEnvironment):
    """Any MPI: the node-local rank/size from a shared-memory split of ``comm`` (collective)."""

    name = "shared-memory"

    def __init__(self, comm, environ=None):
        super().__init__(environ)
        from mpi4py import MPI

        self._rank, self._size = comm.Get_rank(), comm.Get_size()
        node_comm = comm.Split_type(MPI.COMM_TYPE_SHARED, key=self._rank)
        try:
            self._local_rank, self._local_size = node_comm.Get_rank(), node_comm.Get_size()
        finally:
            node_comm.Free()

    @classmethod
    def applies(cls, environ):
        return True

    def world_rank(self):
        return self._rank

    def world_size(self):
        return self._size

    def local_rank(self):
        return self._local_rank

    def local_size(self):
        return self._local_size


#: Order in which :meth:`ClusterEnvironment.detect` and :func:`node_local_rank` try launchers
#: (launcher-specific first, Slurm after them; see the module docstring).
ENVIRONMENTS = (OpenMPIEnvironment, MPICHEnvironment, PMIxEnvironment, SlurmEnvironment)


def node_local_rank(comm, environ=None) -> Tuple[int, int, str]:
    """``(local_rank, local_size, source)`` of this rank on its node.

    Collective over ``comm`` (every rank must call it). The launcher environments of
    :data:`ENVIRONMENTS` are tried in order; the first one that is complete and consistent with
    ``comm`` (same world rank and size) *on every rank* is used, so all ranks agree on the
    source. Otherwise (no launcher variables, stale ones inherited from a batch shell, or
    ``comm`` is not the world communicator) the shared-memory split of ``comm`` is used.

    ``comm=None`` means no MPI: the first complete environment of ``environ`` is trusted, or
    ``(0, 1, "single-process")``.
    """
    environ = os.environ if environ is None else environ
    if comm is None:
        for cls in ENVIRONMENTS:
            if cls.applies(environ):
                env = cls(environ)
                if env.is_complete():
                    return env.local_rank(), env.local_size(), env.name
        return 0, 1, "single-process"

    from mpi4py import MPI

    for cls in ENVIRONMENTS:
        ok = cls.applies(environ) and cls(environ).consistent_with(comm)
        if comm.allreduce(1 if ok else 0, op=MPI.MIN):
            env = cls(environ)
            return env.local_rank(), env.local_size(), env.name
    env = SharedMemoryEnvironment(comm, environ)
    return env.local_rank(), env.local_size(), env.name


# --------------------------------------------------------------------------------------------
# Device
# --------------------------------------------------------------------------------------------

def visible_gpu_count() -> int:
    """CUDA devices torch can see (``CUDA_VISIBLE_DEVICES`` respected); 0 without CUDA."""
    try:
        import torch
    except ImportError:        # pragma: no cover - torch is a dependency
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def slurm_gpus(environ=None):
    """GPU indices Slurm allocated to this step (``SLURM_STEP_GPUS``) or job
    (``SLURM_JOB_GPUS``), as a list of strings; ``[]`` when none are listed."""
    environ = os.environ if environ is None else environ
    for name in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):
        value = str(environ.get(name, "")).strip()
        if value:
            return [g.strip() for g in value.split(",") if g.strip()]
    return []


def _visible_hint(environ):
    cvd = environ.get("CUDA_VISIBLE_DEVICES")
    return f"CUDA_VISIBLE_DEVICES={cvd!r}" if cvd is not None else "CUDA_VISIBLE_DEVICES unset"


def select_device(local_rank, requested="auto", num_gpus=None, *, environ=None,
                  field="run.device", host=None):
    """The ``torch.device`` this rank computes on: ``"cpu"``, ``"auto"``, ``"cuda"`` or
    ``"cuda:N"``; the node-local rank modulo the visible GPUs (docs/architecture.md, binding).
    Raises :class:`BindingError` naming ``field``."""
    import torch

    environ = os.environ if environ is None else environ
    host = host or socket.gethostname()
    text = str(requested).strip().lower() if requested is not None else "auto"
    if num_gpus is None:
        num_gpus = visible_gpu_count() if text != "cpu" else 0
    if local_rank is None or int(local_rank) < 0:
        raise BindingError(f"config field {field!r}: invalid node-local rank {local_rank!r}")
    local_rank = int(local_rank)

    if text == "cpu":
        return torch.device("cpu")

    explicit = re.fullmatch(r"cuda:(\d+)", text)
    if text not in ("auto", "cuda") and not explicit:
        raise BindingError(f"config field {field!r}: expected 'auto', 'cpu', 'cuda' or "
                           f"'cuda:N', got {requested!r}")

    if num_gpus <= 0:
        if text == "auto":
            allocated = slurm_gpus(environ)
            if allocated:
                raise BindingError(
                    f"config field {field!r} is 'auto' and Slurm allocated GPUs "
                    f"{','.join(allocated)} on {host}, but torch sees no CUDA device "
                    f"({_visible_hint(environ)}; CPU-only torch build?). Install a CUDA build "
                    f"of torch, or set {field}=cpu to train on the CPU on purpose.")
            return torch.device("cpu")
        raise BindingError(
            f"config field {field!r} asks for {requested!r} but no CUDA device is visible on "
            f"{host} ({_visible_hint(environ)}). Submit to GPU nodes (train_gpu.sbatch) or "
            f"set {field}=cpu/auto.")

    if explicit:
        index = int(explicit.group(1))
        if index >= num_gpus:
            raise BindingError(
                f"config field {field!r} asks for {requested!r} but only {num_gpus} CUDA "
                f"device(s) are visible on {host} (valid: cuda:0..cuda:{num_gpus - 1}; "
                f"{_visible_hint(environ)})")
        return torch.device("cuda", index)

    return torch.device("cuda", local_rank % num_gpus)


# --------------------------------------------------------------------------------------------
# Threads
# --------------------------------------------------------------------------------------------

def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, else ``os.cpu_count()``)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):      # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def threads_per_rank(local_size, requested="auto", environ=None, *, cpus=None,
                     field="run.threads_per_rank") -> int:
    """Intra-op threads for one rank.

    An integer ``requested`` wins. ``"auto"``: ``SLURM_CPUS_PER_TASK`` if set, else
    ``OMP_NUM_THREADS`` if set (first entry of a nested list such as ``"4,2"``), else
    ``max(1, cpus // local_size)`` where ``cpus`` is the size of this process's affinity mask
    (:func:`available_cpus`; injectable for tests).
    """
    environ = os.environ if environ is None else environ
    if not (isinstance(requested, str) and requested.strip().lower() == "auto"):
        try:
            if isinstance(requested, bool):
                raise TypeError
            n = int(requested)
            if isinstance(requested, float) and n != requested:
                raise ValueError
        except (TypeError, ValueError):
            raise BindingError(f"config field {field!r}: an integer or 'auto', got "
                               f"{requested!r}") from None
        if n < 1:
            raise BindingError(f"config field {field!r}: must be at least 1, got {n}")
        return n

    slurm = _int(environ, "SLURM_CPUS_PER_TASK")
    if slurm is not None and slurm >= 1:
        return slurm
    omp = str(environ.get("OMP_NUM_THREADS", "")).split(",")[0].strip()
    if omp.isdigit() and int(omp) >= 1:
        return int(omp)
    cpus = available_cpus() if cpus is None else int(cpus)
    return max(1, cpus // max(1, int(local_size or 1)))


def bind_threads(n) -> int:
    """Use ``n`` intra-op threads: ``torch.set_num_threads(n)`` and ``OMP_NUM_THREADS=n``
    (the latter for libraries and child processes started afterwards). Returns ``n``."""
    import torch

    n = int(n)
    if n < 1:
        raise BindingError(f"thread count must be at least 1, got {n}")
    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)
    return n


# --------------------------------------------------------------------------------------------
# Log line and one-call binding
# --------------------------------------------------------------------------------------------

def describe_binding(world_rank, world_size, local_rank, local_size, device, threads, source,
                     host=None, environ=None) -> str:
    """One log line: host, world rank, local rank, device, threads and the local-rank source,
    plus the Slurm job id and ``CUDA_VISIBLE_DEVICES`` when set."""
    environ = os.environ if environ is None else environ
    host = host or socket.gethostname()
    parts = [f"host={host}", f"rank={world_rank}/{world_size}",
             f"local_rank={local_rank}/{local_size}", f"device={device}",
             f"threads={threads}", f"local_rank_source={source}"]
    if environ.get("SLURM_JOB_ID"):
        parts.append(f"slurm_job={environ['SLURM_JOB_ID']}")
    if environ.get("CUDA_VISIBLE_DEVICES") is not None and str(device).startswith("cuda"):
        parts.append(f"CUDA_VISIBLE_DEVICES={environ['CUDA_VISIBLE_DEVICES']}")
    return "binding: " + " ".join(parts)


@dataclass(frozen=True)
class Binding:
    """Where one rank runs; ``str(binding)`` is the :func:`describe_binding` log line."""

    host: str
    world_rank: int
    world_size: int
    local_rank: int
    local_size: int
    source: str
    device: "object"
    threads: int
    environ: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    def describe(self) -> str:
        return describe_binding(self.world_rank, self.world_size, self.local_rank,
                                self.local_size, self.device, self.threads, self.source,
                                host=self.host, environ=self.environ)

    __str__ = describe


def bind_process(group, device="auto", threads="auto", *, environ=None, num_gpus=None,
                 apply=True) -> Binding:
    """Detect, choose and (with ``apply``) set this rank's device and threads. Collective
    over ``group`` (a :class:`~ddmpi.parallel.group.Group`, or None for one process).

    ``device`` and ``threads`` are the config's ``run.device`` and ``run.threads_per_rank``.
    With ``apply``, sets the thread count (:func:`bind_threads`) and, for CUDA, the current
    CUDA device.
    """
    environ = os.environ if environ is None else environ
    comm = None if group is None else group.comm
    local_rank, local_size, source = node_local_rank(comm, environ)
    dev = select_device(local_rank, device, num_gpus, environ=environ)
    n = threads_per_rank(local_size, threads, environ)
    if apply:
        bind_threads(n)
        if dev.type == "cuda":
            import torch

            torch.cuda.set_device(dev)
    rank, size = (comm.Get_rank(), comm.Get_size()) if comm is not None else (0, 1)
    return Binding(host=socket.gethostname(), world_rank=rank, world_size=size,
                   local_rank=local_rank, local_size=local_size, source=source, device=dev,
                   threads=n, environ=dict(environ))
