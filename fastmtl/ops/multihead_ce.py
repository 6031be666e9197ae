"""Multi-head cross-entropy: the one primitive under MTL training, ANIL and head fitting.

Sample ``i`` belongs to task ``sample_task[i]``; task ``t`` uses the head made of the class
rows ``weight[task_classes[t]]``; logit ``j`` of sample ``i`` is
``scale * z[i] . weight[task_classes[sample_task[i], j]]``. The loss of a task is the mean
cross-entropy of its samples; ``reduction="mean"`` averages the task losses,
``"none"`` returns them, shape (T,). Every task must own at least one sample.

Backends (``backend=None`` picks the first that fits the device of ``z``):

* ``"triton"`` (CUDA; float32/bfloat16/float16 with float32 accumulation; n <= 64): fused
  kernels from :mod:`fastmtl.kernels`. On CPU tensors it runs only under
  ``TRITON_INTERPRET=1`` (tests), never by default.
* ``"cpu"``: the compiled extension ``fastmtl._multihead_ce`` (C++/OpenMP, float32 and
  float64; other floating dtypes compute in float32 and cast back). It validates index
  values in one C++ pass instead of the torch checks (same ValueErrors, still before any
  kernel runs), which matters on small calls.
* ``"reference"``: plain PyTorch (one ``z @ weight.T``, then a gather), the ground truth of
  the tests; used on other devices, for float64 on CUDA, for n > 64 on CUDA, and whenever
  ``scale`` is a tensor that requires grad (or is batched by ``vmap``): the fused backends
  take ``scale`` as a constant, so such a call gets the reference (and scale its gradient).

The fused backends are one ``torch.autograd.Function`` (``setup_context`` style, with a
``vmap`` rule that folds the vmapped dimension into the task dimension), so they work
under ``torch.func.grad`` / ``vjp`` / ``vmap`` and their compositions (ANIL's vmapped inner
loop, batched head fitting). They are **first-order only**: their backward is itself not
differentiable (it raises if you try, e.g. ``create_graph=True`` then a second backward);
use ``backend="reference"`` for second-order MAML. Gradients flow to ``z`` and ``weight``
(rows shared by several tasks accumulate), never to the index tensors. Nothing but the
inputs is saved for the backward: it recomputes the n logits per sample.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._backends import available_backends, resolve_backend
from ._checks import NonFiniteError, check_finite, check_meta, check_scale, check_values
from ._cpu import cpu_ext, cpu_indices
from ._function import MultiheadCE
from ._functorch import apply_function, is_wrapped

__all__ = ["multihead_ce", "multihead_ce_reference", "available_backends", "NonFiniteError"]


def _constant_scale(scale: float | torch.Tensor) -> float | None:
    """``scale`` as a Python float, or None when it must stay a tensor (it requires grad,
    or vmap batches it): the fused kernels take it as a constant."""
    if not isinstance(scale, torch.Tensor):
        return float(scale)
    if scale.requires_grad or is_wrapped(scale):
        return None
    return float(scale.item())


def multihead_ce_reference(z: torch.Tensor, weight: torch.Tensor, task_classes: torch.Tensor,
                           sample_task: torch.Tensor, labels: torch.Tensor,
                           scale: float | torch.Tensor = 1.0,
                           reduction: str = "mean") -> torch.Tensor:
    """Plain PyTorch: one ``z @ weight.T``, a gather of each sample's head, log-softmax.

    The float64-checkable reference every fused backend is tested against; differentiable
    to any order. Arguments and result as :func:`multihead_ce` (no checks here).

    Example:
        >>> import torch
        >>> z, w = torch.randn(4, 3), torch.randn(5, 3)
        >>> multihead_ce_reference(z, w, torch.tensor([[0, 4]]), torch.zeros(4, dtype=torch.long),
        ...                        torch.tensor([0, 1, 1, 0]), reduction="none").shape
        torch.Size([1])
    """
    T = task_classes.shape[0]
    cols = task_classes.long()[sample_task.long()]                       # (N, n)
    logits = torch.gather(z @ weight.t(), 1, cols) * scale
    per_sample = F.cross_entropy(logits, labels.long(), reduction="none")
    st = sample_task.long()
    counts = torch.bincount(st, minlength=T).to(per_sample.dtype)
    per_task = torch.zeros(T, dtype=per_sample.dtype, device=z.device).index_add(0, st, per_sample)
    per_task = per_task / counts
    return per_task.mean() if reduction == "mean" else per_task


def multihead_ce(z: torch.Tensor, weight: torch.Tensor, task_classes: torch.Tensor,
                 sample_task: torch.Tensor, labels: torch.Tensor,
                 scale: float | torch.Tensor = 1.0, reduction: str = "mean",
                 backend: str | None = None, check: bool = True) -> torch.Tensor:
    """Mean (over tasks) of each task's mean cross-entropy; see the module docstring.

    Args:
        z: (N, d) features. weight: (C, d) class rows. task_classes: (T, n) class ids of
            each task's head. sample_task: (N,) task of each sample. labels: (N,) in [0, n).
        scale: multiplies every logit (an inverse temperature); float or 0-d tensor. A
            tensor that requires grad (or is vmapped) routes to the reference backend.
        reduction: "mean" or "none" (per-task losses, shape (T,)).
        backend: None (fastest for the device), or "cpu", "triton", "reference"; see
            :func:`available_backends`.
        check: validate shapes, index ranges and that z, weight and scale are finite (a
            NaN or inf raises :class:`NonFiniteError`, a ValueError); leave on at the
            boundary.

    Returns:
        A scalar (``"mean"``) or the (T,) per-task losses, in the dtype of ``z``.

    Raises:
        ValueError: bad shapes, dtypes, index ranges, reduction or backend;
            :class:`NonFiniteError` (a ValueError) for a NaN or inf input.

    The fused backends are differentiable once (also under ``torch.func`` transforms and
    ``vmap``), not twice: use ``backend="reference"`` for higher-order gradients.

    Example:
        >>> import torch
        >>> z, w = torch.randn(6, 4), torch.randn(10, 4)      # 6 images, 10 class rows
        >>> tasks = torch.tensor([[0, 1, 2], [7, 8, 9]])      # two 3-way tasks
        >>> loss = multihead_ce(z, w, tasks, torch.tensor([0, 0, 0, 1, 1, 1]),
        ...                     torch.tensor([0, 1, 2, 2, 1, 0]), backend="reference")
        >>> loss.shape
        torch.Size([])
    """
    tensors = (z, weight, task_classes, sample_task, labels)
    if check:
        check_meta(*tensors, reduction)
    elif reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    check_scale(scale)
    if check:
        check_finite(z, weight, scale)
    backend = resolve_backend(backend, z, task_classes.shape[-1])
    const = _constant_scale(scale) if backend != "reference" else None
    if backend == "reference" or const is None:
        if check:
            check_values(*tensors)
        return multihead_ce_reference(*tensors, scale, reduction)
    idx = None
    if backend == "cpu" and not any(map(is_wrapped, tensors)):
        idx = cpu_indices(task_classes, sample_task, labels)
        if check:  # _check_values in one C++ pass (same ValueErrors), still before any kernel
            cpu_ext.check_indices(*idx, weight.shape[0])
    elif check:  # under vmap the checks must see every copy's indices: the torch version
        check_values(*tensors)
    return apply_function(MultiheadCE, *tensors, const, backend, reduction == "mean", idx)
