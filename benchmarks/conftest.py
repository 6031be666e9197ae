"""Shared by the benchmark suites: where results go and what machine made them.

    write_result("adapt_cpu", {...})   # -> benchmarks/results/adapt_cpu.json

Timings on a shared machine drift with its load, so every result file carries the
machine description and the load average next to the numbers.
"""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results"


def machine_info() -> dict:
    """CPU model, cores, platform and library versions, torch threads, load average."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        model = platform.processor() or "unknown"
    info = {"cpu": model, "logical_cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "torch_threads": torch.get_num_threads(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    return info


def write_result(name: str, payload: dict) -> Path:
    """Write ``results/<name>.json``: ``{"name", "machine", **payload}``; returns the path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    body = {"name": name, "machine": machine_info(), **payload}
    path.write_text(json.dumps(body, indent=2) + "\n")
    return path
