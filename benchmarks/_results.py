"""Where benchmark results go: ``benchmarks/results/<name>.json`` with the machine named."""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import sys
from pathlib import Path

from fastmtl._env import machine_info

RESULTS = Path(__file__).parent / "results"

__all__ = ["RESULTS", "keep_freed_memory", "machine_info", "record", "write_result"]


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


def write_result(name: str, payload: dict) -> Path:
    """Write ``results/<name>.json``: ``{"name", "machine", **payload}``; returns the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    body = {"name": name, "machine": machine_info(), **payload}
    path.write_text(json.dumps(body, indent=2) + "\n")
    return path


def record(store: dict, name: str, benchmark, **extra) -> None:
    """Put a pytest-benchmark fixture's timings (seconds) and ``extra`` in ``store[name]``."""
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is None:                # --benchmark-disable: nothing was timed
        return
    store[name] = {"median_s": stats.median, "min_s": stats.min, "mean_s": stats.mean,
                   "rounds": stats.rounds, **extra}
