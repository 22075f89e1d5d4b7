"""Peak memory of this process, for the reports of benchmarks and long runs (MiB)."""
from __future__ import annotations

import resource
import sys

import torch


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far."""
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return kb / 1024 if sys.platform != "darwin" else kb / (1024 * 1024)


def peak_gpu_mb(device: torch.device) -> float | None:
    """Peak GPU memory torch allocated on ``device``; None off the GPU."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20
