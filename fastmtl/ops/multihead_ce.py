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

import importlib
import math
import os

import torch
import torch.nn.functional as F

try:  # the compiled CPU kernels; absent when the C++ build failed or was skipped
    from .. import _multihead_ce as _cpu_ext
except ImportError:
    _cpu_ext = None

__all__ = ["multihead_ce", "multihead_ce_reference", "available_backends", "NonFiniteError"]

_ALL_BACKENDS = ("reference", "cpu", "triton")
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TRITON_MAX_N = 64  # kernels.multihead_ce.MAX_N, without importing triton to read it
_triton_mod = None


def _triton_kernels():
    """fastmtl.kernels.multihead_ce if triton imports, else None.

    Imported on first use, not with fastmtl.ops: triton picks compiled or interpreted
    kernels when they are defined, so TRITON_INTERPRET set by a test process must come first.
    """
    global _triton_mod
    if _triton_mod is None:
        try:
            mod = importlib.import_module("fastmtl.kernels.multihead_ce")
        except Exception:  # noqa: BLE001 - a broken triton only removes the backend
            mod = False
        _triton_mod = mod if mod and mod.HAS_TRITON else False
    return _triton_mod or None


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def available_backends() -> tuple[str, ...]:
    """The backends usable in this process (``"triton"`` needs CUDA or TRITON_INTERPRET=1)."""
    found = ["reference"]
    if _cpu_ext is not None:
        found.append("cpu")
    if (torch.cuda.is_available() or _triton_interpret()) and _triton_kernels() is not None:
        found.append("triton")
    return tuple(found)


def _resolve_backend(backend, z, n_way) -> str:
    if backend is None:
        if z.is_cuda:
            fits = z.dtype in _TRITON_DTYPES and n_way <= _TRITON_MAX_N
            return "triton" if fits and _triton_kernels() else "reference"
        if z.device.type == "cpu" and _cpu_ext is not None:
            return "cpu"
        return "reference"
    if backend not in _ALL_BACKENDS:
        raise ValueError(f"backend must be None or one of {_ALL_BACKENDS}, got {backend!r}")
    if backend == "cpu":
        if _cpu_ext is None:
            raise ValueError("backend='cpu' needs the compiled extension fastmtl._multihead_ce, "
                             "which is not built; use backend=None or 'reference'")
        if z.device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, z is on {z.device}")
    if backend == "triton":
        if _triton_kernels() is None:
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


_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def _plain(t):
    """The data under torch.func wrappers (vmapped dimensions first), for value checks:
    under ``vmap`` a data-dependent ``bool()`` on the wrapped tensor is not allowed."""
    fn = torch._C._functorch
    while fn.is_functorch_wrapped_tensor(t):
        bdim = fn.maybe_get_bdim(t) if fn.is_batchedtensor(t) else None
        t = fn.get_unwrapped(t)
        if bdim is not None:
            t = t.movedim(bdim, 0)
    return t


def _check(z, weight, task_classes, sample_task, labels, reduction):
    """Every argument check; a ValueError naming the argument."""
    _check_meta(z, weight, task_classes, sample_task, labels, reduction)
    _check_values(z, weight, task_classes, sample_task, labels)


def _check_meta(z, weight, task_classes, sample_task, labels, reduction):
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


def _check_values(z, weight, task_classes, sample_task, labels):
    """Index ranges and non-empty tasks, read back in one host sync."""
    n_samples = z.shape[0]
    C, (T, n) = weight.shape[0], task_classes.shape
    limits = (("task_classes", task_classes, C), ("sample_task", sample_task, T),
              ("labels", labels, n))
    bad = []
    for _, t, hi in limits:
        lo_hi = torch.aminmax(_plain(t))
        bad.append((lo_hi.min < 0) | (lo_hi.max >= hi))
    st = _plain(sample_task).reshape(-1, n_samples).long()
    # One bincount for every vmapped copy: copy r's tasks are the bins r*T .. r*T + T-1.
    st = st + torch.arange(st.shape[0], device=st.device).unsqueeze(1) * T
    bad.append((torch.bincount(st.reshape(-1), minlength=st.shape[0] * T) == 0).any())
    bad = torch.stack(bad).tolist()
    for (name, _, hi), b in zip(limits, bad):
        if b:
            raise ValueError(f"{name} values must lie in [0, {hi})")
    if bad[-1]:
        raise ValueError("every task in task_classes needs at least one sample in sample_task")


class NonFiniteError(ValueError):
    """An input of :func:`multihead_ce` holds NaN or infinite values."""


def _check_scale(scale):
    if isinstance(scale, torch.Tensor):
        if scale.dim() != 0 or not scale.is_floating_point():
            raise ValueError(f"scale must be a float or a 0-d floating tensor, got a "
                             f"{scale.dtype} tensor of shape {tuple(scale.shape)}")
    elif not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a float or a 0-d tensor, got {type(scale).__name__}")
    elif not math.isfinite(scale):
        raise NonFiniteError(f"scale must be finite, got {scale}")


def _check_finite(z, weight, scale):
    """NaN or inf in the features, the rows or a tensor scale: one pass, one host sync."""
    parts = [torch.isfinite(_plain(z)).all(), torch.isfinite(_plain(weight)).all()]
    if isinstance(scale, torch.Tensor):
        parts.append(torch.isfinite(_plain(scale)).all())
    ok = torch.stack(parts).tolist()
    for name, good in zip(("z", "weight", "scale"), ok):
        if not good:
            raise NonFiniteError(f"{name} holds NaN or infinite values")


def _constant_scale(scale):
    """``scale`` as a Python float, or None when it must stay a tensor (it requires grad,
    or vmap batches it): the fused kernels take it as a constant."""
    if not isinstance(scale, torch.Tensor):
        return float(scale)
    if scale.requires_grad or _wrapped(scale):
        return None
    return float(scale.item())


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


# ---- fused backends ----

def _cpu_dtype(dtype):
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _np(t, dtype):
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


def _cpu_indices(tc, st, y):
    """int64 numpy views of the index tensors: made once per call, shared by the check, the
    forward and the backward (the conversions are a visible share of a small call)."""
    return _np(tc, torch.int64), _np(st, torch.int64), _np(y, torch.int64)


def _cpu_forward(z, weight, idx, scale, mean):
    dt = _cpu_dtype(z.dtype)
    out = torch.empty(() if mean else idx[0].shape[0], dtype=dt)
    _cpu_ext.forward(_np(z, dt), _np(weight, dt), *idx, scale, out.numpy(),
                     torch.get_num_threads())
    return out if dt == z.dtype else out.to(z.dtype)


def _cpu_backward(grad, z, weight, idx, scale):
    """``grad`` is the upstream gradient: (T,) per task, or 0-d of the mean over tasks."""
    dt = _cpu_dtype(z.dtype)
    (N, d), (T, n) = z.shape, idx[0].shape
    grad_z = torch.empty((N, d), dtype=dt)
    grad_w = torch.empty(weight.shape, dtype=dt)
    # Workspace of per-chunk grad weight slabs; allocated here so torch accounts for it.
    work = torch.empty((N // _cpu_ext.CHUNK + T) * n * d, dtype=dt)
    _cpu_ext.backward(_np(z, dt), _np(weight, dt), *idx, _np(grad, dt), scale, grad_z.numpy(),
                      grad_w.numpy(), work.numpy(), torch.get_num_threads())
    if dt != z.dtype:
        grad_z, grad_w = grad_z.to(z.dtype), grad_w.to(weight.dtype)
    return grad_z, grad_w


def _fused_forward(backend, z, weight, tc, st, y, scale, mean, idx=None):
    if backend == "cpu":
        return _cpu_forward(z, weight, idx or _cpu_indices(tc, st, y), scale, mean)
    per_task = _triton_kernels().forward(z, weight, tc, st, y, scale)
    return (per_task.mean() if mean else per_task).to(z.dtype)


def _fused_backward(backend, grad, z, weight, tc, st, y, scale, idx=None):
    if backend == "cpu":
        return _cpu_backward(grad, z, weight, idx or _cpu_indices(tc, st, y), scale)
    T = tc.shape[0]
    grad_task = grad.expand(T) / T if grad.dim() == 0 else grad
    return _triton_kernels().backward(grad_task, z, weight, tc, st, y, scale)


def _fold(info, in_dims, z, weight, tc, st, y, split_weight):
    """Fold vmap's batch into the task dimension: copy b's tasks become tasks b*T .. b*T+T-1
    and, when the weight table is per copy (or ``split_weight``), its rows b*C .. b*C+C-1.

    An unbatched weight stays shared (no copy) unless ``split_weight``: the backward needs
    one gradient per copy even for a shared table.
    """
    B = info.batch_size
    z_d, w_d, tc_d, st_d, y_d = in_dims

    def lead(x, dim):
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


def _apply(fn, *args):
    """``fn.apply(*args)`` without its per-call ``inspect.signature`` binding when no
    torch.func transform is active and all arguments are given (they always are here).

    That binding (for setup_context-style Functions) took about a third of a small call's
    time; the C entry point it leads to is the same one called here.
    """
    if torch._C._are_functorch_transforms_active() or any(
            isinstance(a, torch.Tensor) and _wrapped(a) for a in args):
        return fn.apply(*args)
    return super(torch.autograd.Function, fn).apply(*args)


class _MultiheadCE(torch.autograd.Function):
    """Per-task losses (T,), or their mean (0-d) when ``mean``, from a fused backend.

    The mean is taken inside the op rather than by a following ``.mean()``: one autograd
    node less, which shows on small calls. Only the inputs are saved for the backward.
    ``idx``: the CPU backend's numpy views of the index tensors, or None.
    """

    @staticmethod
    def forward(z, weight, task_classes, sample_task, labels, scale, backend, mean, idx):
        return _fused_forward(backend, z, weight, task_classes, sample_task, labels, scale,
                              mean, idx)

    @staticmethod
    def setup_context(ctx, inputs, output):
        z, weight, task_classes, sample_task, labels, scale, backend, _, idx = inputs
        ctx.save_for_backward(z, weight, task_classes, sample_task, labels)
        ctx.scale, ctx.backend, ctx.idx = scale, backend, idx

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved_tensors  # also torch's check that no input changed in place
        if torch.is_grad_enabled() or any(map(_wrapped, saved)) or _wrapped(grad):
            # A Function of its own: it carries the vmap rule that vmap(grad(...)) needs
            # and raises if differentiated again (create_graph=True).
            T = saved[2].shape[0]
            grad_task = grad.expand(T) / T if grad.dim() == 0 else grad
            grads = _apply(_MultiheadCEGrad, grad_task, *saved, ctx.scale, ctx.backend)
        else:  # plain loss.backward(): skip a second Function's overhead
            grads = _fused_backward(ctx.backend, grad, *saved, ctx.scale, ctx.idx)
        return grads[0], grads[1], None, None, None, None, None, None, None

    @staticmethod
    def vmap(info, in_dims, z, weight, task_classes, sample_task, labels, scale, backend, mean,
             idx):
        args, (B, _, T, _) = _fold(info, in_dims[:5], z, weight, task_classes, sample_task,
                                   labels, split_weight=False)
        per_task = _MultiheadCE.apply(*args, scale, backend, False, None).view(B, T)
        return (per_task.mean(1) if mean else per_task), 0


class _MultiheadCEGrad(torch.autograd.Function):
    """(grad z, grad weight) of :class:`_MultiheadCE`; first-order only."""

    @staticmethod
    def forward(grad_task, z, weight, task_classes, sample_task, labels, scale, backend):
        return _fused_backward(backend, grad_task, z, weight, task_classes, sample_task, labels,
                               scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad_gz, grad_gw):
        raise RuntimeError("multihead_ce: the fused backends ('cpu', 'triton') are first-order "
                           "only; use backend='reference' for higher-order gradients")

    @staticmethod
    def vmap(info, in_dims, grad_task, z, weight, task_classes, sample_task, labels, scale,
             backend):
        args, (B, N, T, C) = _fold(info, in_dims[1:6], z, weight, task_classes, sample_task,
                                   labels, split_weight=True)
        g = grad_task.movedim(in_dims[0], 0) if in_dims[0] is not None else grad_task.expand(B, T)
        grad_z, grad_w = _MultiheadCEGrad.apply(g.reshape(B * T), *args, scale, backend)
        return (grad_z.view(B, N, -1), grad_w.view(B, C, -1)), (0, 0)


def multihead_ce(z, weight, task_classes, sample_task, labels, scale=1.0, reduction="mean",
                 backend=None, check=True):
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

    The fused backends are differentiable once (also under ``torch.func`` transforms and
    ``vmap``), not twice: use ``backend="reference"`` for higher-order gradients.
    """
    tensors = (z, weight, task_classes, sample_task, labels)
    if check:
        _check_meta(*tensors, reduction)
    elif reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    _check_scale(scale)
    if check:
        _check_finite(z, weight, scale)
    backend = _resolve_backend(backend, z, task_classes.shape[-1])
    const = _constant_scale(scale) if backend != "reference" else None
    if backend == "reference" or const is None:
        if check:
            _check_values(*tensors)
        return multihead_ce_reference(*tensors, scale, reduction)
    idx = None
    if backend == "cpu" and not any(map(_wrapped, tensors)):
        idx = _cpu_indices(task_classes, sample_task, labels)
        if check:  # _check_values in one C++ pass (same ValueErrors), still before any kernel
            _cpu_ext.check_indices(*idx, weight.shape[0])
    elif check:  # under vmap the checks must see every copy's indices: the torch version
        _check_values(*tensors)
    return _apply(_MultiheadCE, *tensors, const, backend, reduction == "mean", idx)
