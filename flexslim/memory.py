"""Memory readings for the search: resident set on the CPU, peak allocated on CUDA.

On the CPU, ru_maxrss is the process's lifetime peak, so the search's own memory is read as the rise of
that peak over the resident set just before the search loop (a fresh process per method in the bench).
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path


def rss_mb() -> float:
    """Current resident set of this process (Linux /proc; NaN elsewhere)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """Peak resident set of this process so far (MB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


class SearchMemory:
    """Brackets the search loop: `start()` before, `stop()` after -> a dict for run.json."""

    def __init__(self, device):
        self.device = device
        self.before = 0.0

    def start(self) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
        self.before = rss_mb()

    def stop(self) -> dict:
        if self.device.type == "cuda":
            import torch

            return {
                "kind": "cuda max allocated",
                "peak_mb": torch.cuda.max_memory_allocated(self.device) / 2**20,
                "search_mb": torch.cuda.max_memory_allocated(self.device) / 2**20,
            }
        peak = peak_rss_mb()
        return {
            "kind": "peak RSS",
            "peak_mb": peak,
            "rss_before_search_mb": self.before,
            "search_mb": peak - self.before,
        }
