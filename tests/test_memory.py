"""Peak memory per run (ddmpi.training.memory): every run of ``ddmpi compare`` shares one
process, so the resident set's peak is reset at each run's start (Linux), else reported as the
process's."""

import sys

import numpy as np
import pytest
import torch

from ddmpi.training import memory

CPU = torch.device("cpu")


def _touch(mib):
    """Allocate and touch ``mib`` MiB, then free them."""
    block = np.ones(mib * 2 ** 20, np.uint8)
    del block


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/clear_refs")
def test_a_run_does_not_carry_an_earlier_runs_peak():
    scope = memory.reset_peaks(CPU)
    assert scope == "run"
    _touch(300)
    first = memory.peaks_mb(CPU, scope)
    assert memory.reset_peaks(CPU) == "run"
    second = memory.peaks_mb(CPU, scope)
    assert first["rss_scope"] == second["rss_scope"] == "run"
    assert second["rss"] < first["rss"] - 200


def test_without_a_reset_the_peak_is_the_processs(monkeypatch, tmp_path):
    monkeypatch.setattr(memory, "CLEAR_REFS", tmp_path / "missing" / "clear_refs")
    scope = memory.reset_peaks(CPU)
    assert scope == "process"
    peak = memory.peaks_mb(CPU, scope)
    assert peak["rss_scope"] == "process" and peak["rss"] > 0 and "cuda" not in peak
