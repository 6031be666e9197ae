"""The fused backends as one ``torch.autograd.Function`` with ``vmap`` rules.

:class:`MultiheadCE` gives per-task losses (or their mean); its backward is a second
Function, :class:`MultiheadCEGrad`, which carries the vmap rule ``vmap(grad(...))`` needs
and raises if differentiated again (the fused backends are first-order only). Both fold
vmap's batch into the task dimension (:func:`_fold`).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._backends import triton_kernels
from ._cpu import CpuIndices, cpu_backward, cpu_forward, cpu_indices
from ._functorch import apply_function, is_wrapped

__all__ = ["MultiheadCE", "MultiheadCEGrad"]

# vmap's in_dims of a Function's arguments: the batched dimension of each, or None.
_InDims = tuple[Any, ...]


def _fused_forward(backend: str, z: Tensor, weight: Tensor, tc: Tensor, st: Tensor, y: Tensor,
                   scale: float, mean: bool, idx: CpuIndices | None = None) -> Tensor:
    if backend == "cpu":
        return cpu_forward(z, weight, idx or cpu_indices(tc, st, y), scale, mean)
    per_task = triton_kernels().forward(z, weight, tc, st, y, scale)
    return (per_task.mean() if mean else per_task).to(z.dtype)


def _fused_backward(backend: str, grad: Tensor, z: Tensor, weight: Tensor, tc: Tensor,
                    st: Tensor, y: Tensor, scale: float,
                    idx: CpuIndices | None = None) -> tuple[Tensor, Tensor]:
    if backend == "cpu":
        return cpu_backward(grad, z, weight, idx or cpu_indices(tc, st, y), scale)
    T = tc.shape[0]
    grad_task = grad.expand(T) / T if grad.dim() == 0 else grad
    return triton_kernels().backward(grad_task, z, weight, tc, st, y, scale)


def _fold(info: Any, in_dims: _InDims, z: Tensor, weight: Tensor, tc: Tensor, st: Tensor,
          y: Tensor, split_weight: bool) -> tuple[tuple[Tensor, ...], tuple[int, int, int, int]]:
    """Fold vmap's batch into the task dimension: copy b's tasks become tasks b*T .. b*T+T-1
    and, when the weight table is per copy (or ``split_weight``), its rows b*C .. b*C+C-1.

    An unbatched weight stays shared (no copy) unless ``split_weight``: the backward needs
    one gradient per copy even for a shared table.
    """
    B = info.batch_size
    z_d, w_d, tc_d, st_d, y_d = in_dims

    def lead(x: Tensor, dim: int | None) -> Tensor:
        return x.movedim(dim, 0) if dim is not None else x.unsqueeze(0).expand(B, *x.shape)

    zb, tcb, stb, yb = lead(z, z_d), lead(tc, tc_d).long(), lead(st, st_d).long(), lead(y, y_d)
    (N, d), (T, n) = zb.shape[1:], tcb.shape[1:]
    C = weight.shape[0] if w_d is None else weight.movedim(w_d, 0).shape[1]
    if w_d is not None or split_weight:
        weight = lead(weight, w_d).reshape(B * C, d)
        tcb = tcb + torch.arange(B, device=tcb.device).view(B, 1, 1) * C
    stb = stb + torch.arange(B, device=stb.device).view(B, 1) * T
    return (zb.reshape(B * N, d), weight, tcb.reshape(B * T, n), stb.reshape(B * N),
            yb.reshape(B * N)), (B, N, T, C)


class MultiheadCE(torch.autograd.Function):
    """Per-task losses (T,), or their mean (0-d) when ``mean``, from a fused backend.

    The mean is taken inside the op rather than by a following ``.mean()``: one autograd
    node less, which shows on small calls. Only the inputs are saved for the backward.
    ``idx``: the CPU backend's numpy views of the index tensors, or None.
    """

    @staticmethod
    def forward(z: Tensor, weight: Tensor, task_classes: Tensor, sample_task: Tensor,
                labels: Tensor, scale: float, backend: str, mean: bool,
                idx: CpuIndices | None) -> Tensor:
        return _fused_forward(backend, z, weight, task_classes, sample_task, labels, scale,
                              mean, idx)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        z, weight, task_classes, sample_task, labels, scale, backend, _, idx = inputs
        ctx.save_for_backward(z, weight, task_classes, sample_task, labels)
        ctx.scale, ctx.backend, ctx.idx = scale, backend, idx

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors  # also torch's check that no input changed in place
        if torch.is_grad_enabled() or any(map(is_wrapped, saved)) or is_wrapped(grad):
            # A Function of its own: it carries the vmap rule that vmap(grad(...)) needs
            # and raises if differentiated again (create_graph=True).
            T = saved[2].shape[0]
            grad_task = grad.expand(T) / T if grad.dim() == 0 else grad
            grads = apply_function(MultiheadCEGrad, grad_task, *saved, ctx.scale, ctx.backend)
        else:  # plain loss.backward(): skip a second Function's overhead
            z, weight, task_classes, sample_task, labels = saved
            grads = _fused_backward(ctx.backend, grad, z, weight, task_classes, sample_task,
                                    labels, ctx.scale, ctx.idx)
        return grads[0], grads[1], None, None, None, None, None, None, None

    @staticmethod
    def vmap(info: Any, in_dims: _InDims, z: Tensor, weight: Tensor, task_classes: Tensor,
             sample_task: Tensor, labels: Tensor, scale: float, backend: str, mean: bool,
             idx: CpuIndices | None) -> tuple[Tensor, int]:
        args, (B, _, T, _) = _fold(info, in_dims[:5], z, weight, task_classes, sample_task,
                                   labels, split_weight=False)
        per_task = MultiheadCE.apply(*args, scale, backend, False, None).view(B, T)
        return (per_task.mean(1) if mean else per_task), 0


class MultiheadCEGrad(torch.autograd.Function):
    """(grad z, grad weight) of :class:`MultiheadCE`; first-order only."""

    @staticmethod
    def forward(grad_task: Tensor, z: Tensor, weight: Tensor, task_classes: Tensor,
                sample_task: Tensor, labels: Tensor, scale: float,
                backend: str) -> tuple[Tensor, Tensor]:
        return _fused_backward(backend, grad_task, z, weight, task_classes, sample_task, labels,
                               scale)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, grad_gz: Tensor, grad_gw: Tensor) -> tuple[Tensor | None, ...]:
        raise RuntimeError("multihead_ce: the fused backends ('cpu', 'triton') are first-order "
                           "only; use backend='reference' for higher-order gradients")

    @staticmethod
    def vmap(info: Any, in_dims: _InDims, grad_task: Tensor, z: Tensor, weight: Tensor,
             task_classes: Tensor, sample_task: Tensor, labels: Tensor, scale: float,
             backend: str) -> tuple[tuple[Tensor, Tensor], tuple[int, int]]:
        args, (B, N, T, C) = _fold(info, in_dims[1:6], z, weight, task_classes, sample_task,
                                   labels, split_weight=True)
        g = grad_task.movedim(in_dims[0], 0) if in_dims[0] is not None else grad_task.expand(B, T)
        grad_z, grad_w = MultiheadCEGrad.apply(g.reshape(B * T), *args, scale, backend)
        return (grad_z.view(B, N, -1), grad_w.view(B, C, -1)), (0, 0)
