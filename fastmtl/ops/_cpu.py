"""The CPU backend's glue: numpy views of tensors for the compiled extension
``fastmtl._multihead_ce`` (C++/OpenMP), forward and backward."""
from __future__ import annotations

import numpy as np
import torch

# The compiled CPU kernels; absent when the C++ build failed or was skipped. Imported by its
# full name: mypy reads `from .. import _multihead_ce` as an attribute and would not skip it.
try:
    import fastmtl._multihead_ce as cpu_ext
except ImportError:
    cpu_ext = None

__all__ = ["cpu_ext", "cpu_indices", "cpu_forward", "cpu_backward", "CpuIndices"]

#: int64 numpy views of (task_classes, sample_task, labels), as the extension takes them.
CpuIndices = tuple[np.ndarray, np.ndarray, np.ndarray]


def _cpu_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _np(t: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """Zero-copy numpy view of a CPU tensor (a copy only to change dtype or layout).

    Written out branch by branch: on small calls these conversions are a visible share
    of the time, and the common case (right dtype, contiguous) is a single .numpy().
    """
    if t.dtype != dtype:
        t = t.to(dtype)
    if t.requires_grad:
        t = t.detach()
    if not t.is_contiguous():
        t = t.contiguous()
    return t.numpy()


def cpu_indices(tc: torch.Tensor, st: torch.Tensor, y: torch.Tensor) -> CpuIndices:
    """int64 numpy views of the index tensors: made once per call, shared by the check, the
    forward and the backward (the conversions are a visible share of a small call)."""
    return _np(tc, torch.int64), _np(st, torch.int64), _np(y, torch.int64)


def cpu_forward(z: torch.Tensor, weight: torch.Tensor, idx: CpuIndices, scale: float,
                mean: bool) -> torch.Tensor:
    """Per-task losses (T,), or their mean (0-d) when ``mean``, in the dtype of ``z``."""
    dt = _cpu_dtype(z.dtype)
    out = torch.empty(() if mean else idx[0].shape[0], dtype=dt)
    cpu_ext.forward(_np(z, dt), _np(weight, dt), *idx, scale, out.numpy(),
                     torch.get_num_threads())
    return out if dt == z.dtype else out.to(z.dtype)


def cpu_backward(grad: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, idx: CpuIndices,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``grad`` is the upstream gradient: (T,) per task, or 0-d of the mean over tasks."""
    dt = _cpu_dtype(z.dtype)
    (N, d), (T, n) = z.shape, idx[0].shape
    grad_z = torch.empty((N, d), dtype=dt)
    grad_w = torch.empty(weight.shape, dtype=dt)
    # Workspace of per-chunk grad weight slabs; allocated here so torch accounts for it.
    work = torch.empty((N // cpu_ext.CHUNK + T) * n * d, dtype=dt)
    cpu_ext.backward(_np(z, dt), _np(weight, dt), *idx, _np(grad, dt), scale, grad_z.numpy(),
                      grad_w.numpy(), work.numpy(), torch.get_num_threads())
    if dt != z.dtype:
        grad_z, grad_w = grad_z.to(z.dtype), grad_w.to(weight.dtype)
    return grad_z, grad_w
