"""Every private torch.func (functorch) call fastmtl's ops make, in one place.

Checked against torch 2.13.0 (CPU) and written for 2.11 (the GPU machines); these are
private APIs and may move: ``tests/test_ops.py::test_private_functorch_api`` calls each one
(inside and outside ``vmap``) and fails loudly, naming the missing one, if they do.
"""
from __future__ import annotations

from typing import Any

import torch

__all__ = ["is_wrapped", "plain", "transforms_active", "apply_function"]

_fn = torch._C._functorch

#: Whether a tensor is a torch.func wrapper (batched by vmap, or a grad level's tensor).
is_wrapped = _fn.is_functorch_wrapped_tensor


def transforms_active() -> bool:
    """Whether any torch.func transform (vmap, grad, ...) is running."""
    return torch._C._are_functorch_transforms_active()


def plain(t: torch.Tensor) -> torch.Tensor:
    """The data under torch.func wrappers (vmapped dimensions first), for value checks:
    under ``vmap`` a data-dependent ``bool()`` on the wrapped tensor is not allowed."""
    while _fn.is_functorch_wrapped_tensor(t):
        bdim = _fn.maybe_get_bdim(t) if _fn.is_batchedtensor(t) else None
        t = _fn.get_unwrapped(t)
        if bdim is not None:
            t = t.movedim(bdim, 0)
    return t


def apply_function(fn: type[torch.autograd.Function], *args: Any) -> Any:
    """``fn.apply(*args)`` without its per-call ``inspect.signature`` binding when no
    torch.func transform is active and all arguments are given (they always are here).

    That binding (for setup_context-style Functions) took about a third of a small call's
    time; the C entry point it leads to is the same one called here.
    """
    if transforms_active() or any(isinstance(a, torch.Tensor) and is_wrapped(a) for a in args):
        return fn.apply(*args)
    # _C._FunctionBase.apply, the C entry point, is left out of torch's stubs.
    return super(torch.autograd.Function, fn).apply(*args)  # type: ignore[misc]
