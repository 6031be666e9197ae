"""MAML's vectorized inner loop without ``vmap``: every task's weights side by side.

In MAML each task adapts its own copy of every weight, so the tasks cannot share one
backbone call the way ANIL's, ProtoNet's and R2D2's do (:func:`stacked_features`). Under
``torch.func.vmap`` the per-task convolutions become grouped convolutions, but the
BatchNorms run decomposed into elementwise ops (the fused op's second-order gradients are
wrong under vmap, see :mod:`fastmtl.gbml._common`) and every op moves the task dimension
in and out of the channels: on a 2-core CPU that made the vmapped meta-step of 16 tasks of
5-way 1-shot with 15 queries a class 0.4-0.6x of a per-task loop (profile in
``benchmarks/results/maml_vmap_profile_cpu.json``: elementwise ops 53% and copies 16% of
its time).

Here the T tasks' images are laid out as T groups of channels of one batch, (N, T*C, H, W),
and stay so through the whole network:

- a convolution with per-task weights (T, C_out, C_in, k, k) is one grouped convolution
  (``groups=T``) with the weights reshaped to (T*C_out, C_in, k, k);
- a batch-statistics BatchNorm with per-task (T, C) affine weights is one fused
  ``F.batch_norm`` over T*C channels: each (task, channel) is normalized with the
  statistics of that task's images alone, exactly as T separate calls
  (:func:`batch_stat_norm`, the BatchNorm of the other methods' stacked backbone call);
- max-pooling and ReLU act per channel, so they need nothing;
- the per-task linear heads are one batched matrix product.

Every op is an ordinary differentiable op, so ``torch.autograd.grad`` with
``create_graph=True`` gives exact second-order meta-gradients (the loss summed over tasks
has the per-task gradients as its gradient with respect to the stacked weights).

Supported learners: :class:`fastmtl.models.Conv4` (the MAML backbone) under a
:class:`LinearHead`; :func:`program` returns None for anything else and MAML falls back to
``vmap``.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models.conv4 import Conv4
from ..training import full_precision
from ._common import LinearHead, _BatchStatNorm, batch_stat_norm

__all__ = ["program", "backbone_program", "stacked_logits"]


def program(model: nn.Module) -> list[tuple[str, str, nn.Module]] | None:
    """The learner (``.backbone``, ``.head``) as a list of ``(kind, parameter prefix,
    module)`` that :func:`stacked_logits` can run, or None where it cannot (use ``vmap``).

    Example:
        >>> import fastmtl
        >>> from fastmtl.gbml import MAML
        >>> tr = MAML(fastmtl.models.conv4(hidden=8), device="cpu").build((1, 28, 28))
        >>> [kind for kind, _, _ in program(tr.model)][:4]
        ['conv', 'norm', 'pool', 'relu']
    """
    if type(getattr(model, "head", None)) is not LinearHead:
        return None
    return backbone_program(getattr(model, "backbone", None))


def backbone_program(backbone: nn.Module | None) -> list[tuple[str, str, nn.Module]] | None:
    """:func:`program`'s part for the backbone: a Conv4 of plain blocks (conv without
    groups, batch-statistics norm, max-pool, ReLU), else None."""
    if type(backbone) is not Conv4:
        return None
    ops: list[tuple[str, str, nn.Module]] = []
    for i, block in enumerate(backbone.blocks):
        if not isinstance(block, nn.Sequential):
            return None
        for j, m in enumerate(block):
            prefix = f"backbone.blocks.{i}.{j}"
            if (type(m) is nn.Conv2d and m.groups == 1 and m.padding_mode == "zeros"
                    and not isinstance(m.padding, str)):
                ops.append(("conv", prefix, m))
            elif type(m) is _BatchStatNorm:
                ops.append(("norm", prefix, m))
            elif type(m) is nn.MaxPool2d:
                ops.append(("pool", prefix, m))
            elif type(m) is nn.ReLU:
                ops.append(("relu", prefix, m))
            else:
                return None
    return ops


def stacked_logits(ops: Sequence[tuple[str, str, Any]], fast: dict[str, torch.Tensor],
                   x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """(T, N, C, H, W) images, per-task weights ``fast`` (name -> (T, *shape)) ->
    (T, N, n_way) logits, each task through its own weights and batch statistics.

    Args:
        ops: :func:`program` of the learner (each module of the type its kind names).
        fast: every parameter of the learner, stacked over the T tasks.
        x: the T tasks' images, N each.
        channels_last: run the activations channels-last (as Conv4 does on the CPU).
    """
    T, N = x.shape[:2]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    h = x.transpose(0, 1).reshape(N, T * x.shape[2], *x.shape[3:]).contiguous(memory_format=fmt)
    for kind, prefix, m in ops:
        if kind == "conv":
            w = fast[prefix + ".weight"]
            w = w.reshape(T * w.shape[1], *w.shape[2:]).contiguous(memory_format=fmt)
            b = fast.get(prefix + ".bias")
            h = F.conv2d(h, w, None if b is None else b.reshape(-1), m.stride, m.padding,
                         m.dilation, groups=T)
        elif kind == "norm":
            nw, nb = fast.get(prefix + ".weight"), fast.get(prefix + ".bias")
            h = batch_stat_norm(h, None if nw is None else nw.reshape(-1),
                                None if nb is None else nb.reshape(-1), m.eps)
        elif kind == "pool":
            h = F.max_pool2d(h, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
        else:
            h = F.relu(h)
    z = h.reshape(N, T, -1).transpose(0, 1)          # (T, N, D), each task's flatten(1)
    w, b = fast["head.weight"], fast["head.bias"]     # (T, n, D), (T, n)
    if torch.is_autocast_enabled(z.device.type):      # the head in its own precision
        with full_precision(z.device.type):
            return torch.baddbmm(b.unsqueeze(1), z.to(w.dtype), w.transpose(1, 2))
    return torch.baddbmm(b.unsqueeze(1), z, w.transpose(1, 2))

