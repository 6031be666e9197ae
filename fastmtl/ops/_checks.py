"""Argument checks of :func:`fastmtl.ops.multihead_ce`: ValueErrors naming the argument,
before any kernel runs."""
from __future__ import annotations

import math

import torch

from ._functorch import plain as _plain

__all__ = ["NonFiniteError", "check_meta", "check_values", "check_scale", "check_finite"]


def check_meta(z: torch.Tensor, weight: torch.Tensor, task_classes: torch.Tensor,
               sample_task: torch.Tensor, labels: torch.Tensor, reduction: str) -> None:
    """Types, shapes, dtypes and devices: no data is read."""
    for name, t in (("z", z), ("weight", weight), ("task_classes", task_classes),
                    ("sample_task", sample_task), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if z.dim() != 2:
        raise ValueError(f"z must have shape (N, d), got {tuple(z.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape (C, d), got {tuple(weight.shape)}")
    if weight.shape[1] != z.shape[1]:
        raise ValueError(f"weight has feature size {weight.shape[1]} but z has {z.shape[1]} "
                         "(weight must be (C, d) with z (N, d))")
    if not z.is_floating_point() or weight.dtype != z.dtype:
        raise ValueError(f"z and weight must share one floating dtype, got {z.dtype} and "
                         f"{weight.dtype}")
    if weight.device != z.device:
        raise ValueError(f"weight is on {weight.device} but z is on {z.device}")
    if task_classes.dim() != 2 or task_classes.shape[1] < 1 or task_classes.shape[0] < 1:
        raise ValueError(f"task_classes must have shape (T, n) with T, n >= 1, got "
                         f"{tuple(task_classes.shape)}")
    n_samples = z.shape[0]
    if n_samples < 1:
        raise ValueError("z must hold at least one sample")
    for name, t in (("sample_task", sample_task), ("labels", labels)):
        if t.shape != (n_samples,):
            raise ValueError(f"{name} must have shape ({n_samples},) to match z, got "
                             f"{tuple(t.shape)}")
    for name, t in (("task_classes", task_classes), ("sample_task", sample_task),
                    ("labels", labels)):
        if t.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{name} must be an int64 or int32 tensor, got {t.dtype}")
        if t.device != z.device:
            raise ValueError(f"{name} is on {t.device} but z is on {z.device}")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def check_values(z: torch.Tensor, weight: torch.Tensor, task_classes: torch.Tensor,
                 sample_task: torch.Tensor, labels: torch.Tensor) -> None:
    """Index ranges and non-empty tasks, read back in one host sync."""
    n_samples = z.shape[0]
    C, (T, n) = weight.shape[0], task_classes.shape
    limits = (("task_classes", task_classes, C), ("sample_task", sample_task, T),
              ("labels", labels, n))
    bad: list[torch.Tensor] = []
    for _, t, hi in limits:
        lo_hi = torch.aminmax(_plain(t))
        bad.append((lo_hi.min < 0) | (lo_hi.max >= hi))
    st = _plain(sample_task).reshape(-1, n_samples).long()
    # One bincount for every vmapped copy: copy r's tasks are the bins r*T .. r*T + T-1.
    st = st + torch.arange(st.shape[0], device=st.device).unsqueeze(1) * T
    bad.append((torch.bincount(st.reshape(-1), minlength=st.shape[0] * T) == 0).any())
    flags = torch.stack(bad).tolist()
    # flags has one more entry than limits: the last says whether a task has no sample.
    for (name, _, hi), b in zip(limits, flags, strict=False):
        if b:
            raise ValueError(f"{name} values must lie in [0, {hi})")
    if flags[-1]:
        raise ValueError("every task in task_classes needs at least one sample in sample_task")


class NonFiniteError(ValueError):
    """An input of :func:`multihead_ce` holds NaN or infinite values.

    Example:
        >>> import torch
        >>> from fastmtl.ops import multihead_ce
        >>> z = torch.full((2, 3), float("nan"))
        >>> try:
        ...     multihead_ce(z, torch.ones(4, 3), torch.tensor([[0, 1]]),
        ...                  torch.zeros(2, dtype=torch.long), torch.tensor([0, 1]))
        ... except NonFiniteError as e:
        ...     print(type(e).__mro__[1].__name__)
        ValueError
    """


def check_scale(scale: float | torch.Tensor) -> None:
    """A float or a 0-d floating tensor; a finite one if a float."""
    if isinstance(scale, torch.Tensor):
        if scale.dim() != 0 or not scale.is_floating_point():
            raise ValueError(f"scale must be a float or a 0-d floating tensor, got a "
                             f"{scale.dtype} tensor of shape {tuple(scale.shape)}")
    elif not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a float or a 0-d tensor, got {type(scale).__name__}")
    elif not math.isfinite(scale):
        raise NonFiniteError(f"scale must be finite, got {scale}")


def check_finite(z: torch.Tensor, weight: torch.Tensor, scale: float | torch.Tensor) -> None:
    """NaN or inf in the features, the rows or a tensor scale: one sum a tensor and one
    host sync (a NaN or inf makes its tensor's sum non-finite; an element-wise test runs
    only then, to tell them from finite values so large that their sum overflows)."""
    named = [("z", _plain(z)), ("weight", _plain(weight))]
    if isinstance(scale, torch.Tensor):
        named.append(("scale", _plain(scale)))
    # Summed in float64: finite float32/bfloat16 values cannot overflow it.
    sums = torch.stack([t.sum(dtype=torch.float64) for _, t in named])
    if bool(torch.isfinite(sums).all()):
        return
    for name, t in named:
        if not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"{name} holds NaN or infinite values")
    raise NonFiniteError("z or weight holds values so large that their sum overflows float64")
