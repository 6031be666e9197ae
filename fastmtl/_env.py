"""The machine a result was measured on, recorded next to every figure we write."""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys
from typing import Any

import numpy as np
import torch


def machine_info() -> dict[str, Any]:
    """CPU model, cores, platform and library versions, torch threads, load, GPU if any."""
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": model, "logical_cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "torch_threads": torch.get_num_threads(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    return info


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Raise glibc's mmap and trim thresholds (``mallopt``) for this process, so freed
    blocks stay in the heap for reuse instead of going back to the OS and faulting in
    again (the steady state of a long loop, or of jemalloc/tcmalloc). False where this is
    not glibc on Linux or mallopt refuses."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
        return bool(libc.mallopt(m_mmap_threshold, mmap_threshold)
                    and libc.mallopt(m_trim_threshold, trim_threshold))
    except (OSError, AttributeError):
        return False
