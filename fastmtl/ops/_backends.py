"""Which backend of :func:`fastmtl.ops.multihead_ce` runs a call (see its module)."""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import torch

from ._cpu import cpu_ext as _cpu_ext

__all__ = ["available_backends", "resolve_backend", "triton_kernels", "ALL_BACKENDS"]

ALL_BACKENDS = ("reference", "cpu", "triton")
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TRITON_MAX_N = 64  # kernels.multihead_ce.MAX_N, without importing triton to read it
_triton_mod: Any = None  # None: not yet imported; False: unavailable; else the module


def _mount_source_kernels() -> None:
    """In a source checkout that is not installed (e.g. the GPU check run from the tree),
    the Triton sources sit in ``kernels/`` beside the package: mount them as
    ``fastmtl.kernels``, the name an install gives them (setup.py's package_dir)."""
    if importlib.util.find_spec("fastmtl.kernels") is not None:
        return
    src = Path(__file__).resolve().parents[2] / "kernels"
    if not (src / "__init__.py").is_file():
        return
    spec = importlib.util.spec_from_file_location(
        "fastmtl.kernels", src / "__init__.py", submodule_search_locations=[str(src)])
    assert spec is not None and spec.loader is not None  # a .py file always has both
    module = importlib.util.module_from_spec(spec)
    sys.modules["fastmtl.kernels"] = module
    spec.loader.exec_module(module)


def triton_kernels() -> Any:
    """fastmtl.kernels.multihead_ce if triton imports, else None (``Any``: triton's kernels
    carry no types).

    Imported on first use, not with fastmtl.ops: triton picks compiled or interpreted
    kernels when they are defined, so TRITON_INTERPRET set by a test process must come first.
    """
    global _triton_mod
    if _triton_mod is None:
        mod: Any
        try:
            _mount_source_kernels()
            mod = importlib.import_module("fastmtl.kernels.multihead_ce")
        except Exception:  # noqa: BLE001 - a broken triton only removes the backend
            mod = False
        _triton_mod = mod if mod and mod.HAS_TRITON else False
    return _triton_mod or None


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def available_backends() -> tuple[str, ...]:
    """The backends usable in this process (``"triton"`` needs CUDA or TRITON_INTERPRET=1).

    Returns:
        a tuple of backend names, always including ``"reference"``.

    Example:
        >>> "reference" in available_backends()
        True
    """
    found = ["reference"]
    if _cpu_ext is not None:
        found.append("cpu")
    if (torch.cuda.is_available() or _triton_interpret()) and triton_kernels() is not None:
        found.append("triton")
    return tuple(found)


def resolve_backend(backend: str | None, z: torch.Tensor, n_way: int) -> str:
    """The backend a call on ``z`` with ``n_way``-way heads runs: ``backend``, checked
    (a ValueError saying why it cannot run), or the fastest that fits when None."""
    if backend is None:
        if z.is_cuda:
            fits = z.dtype in _TRITON_DTYPES and n_way <= _TRITON_MAX_N
            return "triton" if fits and triton_kernels() else "reference"
        if z.device.type == "cpu" and _cpu_ext is not None:
            return "cpu"
        return "reference"
    if backend not in ALL_BACKENDS:
        raise ValueError(f"backend must be None or one of {ALL_BACKENDS}, got {backend!r}")
    if backend == "cpu":
        if _cpu_ext is None:
            raise ValueError("backend='cpu' needs the compiled extension fastmtl._multihead_ce, "
                             "which is not built; use backend=None or 'reference'")
        if z.device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, z is on {z.device}")
    if backend == "triton":
        if triton_kernels() is None:
            raise ValueError("backend='triton' needs triton, which does not import here")
        if not (z.is_cuda or (z.device.type == "cpu" and _triton_interpret())):
            raise ValueError(f"backend='triton' needs CUDA tensors (or CPU tensors with "
                             f"TRITON_INTERPRET=1), z is on {z.device}")
        if z.dtype not in _TRITON_DTYPES:
            raise ValueError(f"backend='triton' supports {_TRITON_DTYPES}, z is {z.dtype}")
        if n_way > _TRITON_MAX_N:
            raise ValueError(f"backend='triton' supports task_classes of up to "
                             f"{_TRITON_MAX_N} classes per task, got {n_way}")
    return backend
