"""The measured peak memory of a stretch of training (``PeakMeter``), set beside the estimate."""

from __future__ import annotations

import contextlib
import resource
from pathlib import Path

import torch


class PeakMeter:
    """The peak memory of a stretch of training: the device's peak allocation on a GPU; on a CPU the process's
    peak resident memory (Linux's VmHWM, reset at the start), with the resident memory at the start."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.baseline = 0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = int(torch.cuda.memory_allocated(self.device))
            return
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
        self.baseline = _status_bytes("VmRSS") or 0

    def peak(self) -> int | None:
        """Peak bytes since ``start`` (None where it cannot be read)."""
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        peak = _status_bytes("VmHWM")
        if peak is None:
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return int(rss) * 1024 if rss else None
        return peak


def _status_bytes(key: str) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return None
