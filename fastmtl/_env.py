"""The machine a result was measured on, recorded next to every figure we write."""
from __future__ import annotations

import os
import platform
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
