"""Peak memory of one run: resident set and CUDA allocation since the run started.

Every run of ``ddmpi compare`` lives in one process, whose high-water mark (``ru_maxrss``)
carries the earlier runs' peaks. On Linux, writing "5" to ``/proc/self/clear_refs`` resets the
process's peak resident set (``VmHWM`` in ``/proc/self/status``), so each run's peak is its
own: scope "run". Where that is impossible (not Linux, no permission) the peak is the
process's since start-up: scope "process".
"""

import resource
from pathlib import Path

import torch

CLEAR_REFS = Path("/proc/self/clear_refs")
STATUS = Path("/proc/self/status")


def reset_peaks(device):
    """Start counting this run's peaks; return the resident set's scope, "run" or "process"."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        CLEAR_REFS.write_text("5")
        high_water_mb()
    except (OSError, ValueError):
        return "process"
    return "run"


def peaks_mb(device, scope):
    """Peak resident set (MiB) in ``scope`` (:func:`reset_peaks`'), and peak CUDA
    allocation since :func:`reset_peaks`."""
    rss = (high_water_mb() if scope == "run"
           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    peak = {"rss": rss, "rss_scope": scope}
    if device.type == "cuda":
        peak["cuda"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return peak


def high_water_mb():
    """``VmHWM`` of this process, MiB (ValueError where the kernel reports none)."""
    for line in STATUS.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"{STATUS} has no VmHWM")
