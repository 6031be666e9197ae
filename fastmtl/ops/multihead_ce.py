"""Multi-head cross-entropy: the one primitive under MTL training, ANIL and head fitting.

Sample ``i`` belongs to task ``sample_task[i]``; task ``t`` uses the head made of the class
rows ``weight[task_classes[t]]``; logit ``j`` of sample ``i`` is
``scale * z[i] . weight[task_classes[sample_task[i], j]]``. The loss of a task is the mean
cross-entropy of its samples; ``reduction="mean"`` averages the task losses,
``"none"`` returns them, shape (T,). Every task must own at least one sample.

Backends: ``"reference"`` is plain PyTorch (the ground truth of the tests, and the only
one that is differentiable twice). ``backend=None`` picks the fastest correct backend for
the device of ``z``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["multihead_ce", "multihead_ce_reference", "available_backends"]

_BACKENDS = ("reference",)


def available_backends() -> tuple[str, ...]:
    return _BACKENDS


def _check(z, weight, task_classes, sample_task, labels, reduction):
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
    C, (T, n) = weight.shape[0], task_classes.shape
    bad = [(name, lo, hi) for name, t, lo, hi in (("task_classes", task_classes, 0, C),
                                                   ("sample_task", sample_task, 0, T),
                                                   ("labels", labels, 0, n))
           if bool(t.min() < lo) or bool(t.max() >= hi)]
    if bad:
        name, lo, hi = bad[0]
        raise ValueError(f"{name} values must lie in [{lo}, {hi})")
    if bool((torch.bincount(sample_task, minlength=T) == 0).any()):
        raise ValueError("every task in task_classes needs at least one sample in sample_task")


def multihead_ce_reference(z, weight, task_classes, sample_task, labels, scale=1.0,
                           reduction="mean"):
    """Plain PyTorch: one ``z @ weight.T``, a gather of each sample's head, log-softmax."""
    T = task_classes.shape[0]
    cols = task_classes.long()[sample_task.long()]                       # (N, n)
    logits = torch.gather(z @ weight.t(), 1, cols) * scale
    per_sample = F.cross_entropy(logits, labels.long(), reduction="none")
    st = sample_task.long()
    counts = torch.bincount(st, minlength=T).to(per_sample.dtype)
    per_task = torch.zeros(T, dtype=per_sample.dtype, device=z.device).index_add(0, st, per_sample)
    per_task = per_task / counts
    return per_task.mean() if reduction == "mean" else per_task


def multihead_ce(z, weight, task_classes, sample_task, labels, scale=1.0, reduction="mean",
                 backend=None, check=True):
    """Mean (over tasks) of each task's mean cross-entropy; see the module docstring.

    Args:
        z: (N, d) features. weight: (C, d) class rows. task_classes: (T, n) class ids of
            each task's head. sample_task: (N,) task of each sample. labels: (N,) in [0, n).
        scale: multiplies every logit (an inverse temperature); float or 0-d tensor.
        reduction: "mean" or "none" (per-task losses, shape (T,)).
        backend: None (fastest for the device), or one of :func:`available_backends`.
        check: validate shapes and index ranges (one host sync); leave on at the boundary.
    """
    if backend is not None and backend not in _BACKENDS:
        raise ValueError(f"backend must be None or one of {_BACKENDS}, got {backend!r}")
    if check:
        _check(z, weight, task_classes, sample_task, labels, reduction)
    return multihead_ce_reference(z, weight, task_classes, sample_task, labels, scale, reduction)
