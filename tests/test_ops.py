"""multihead_ce: every backend against the float64 reference, forward and backward.

Fresh random inputs per case (seeded by the case): ragged d, n = 1, classes shared by
several tasks, tasks of unequal sizes in shuffled order. Triton runs on CPU tensors under
TRITON_INTERPRET=1 when there is no GPU (small shapes: the interpreter is slow), compiled
on CUDA otherwise; CUDA-only cases skip without a GPU.
"""
import os

import torch

if not torch.cuda.is_available():
    # Before anything imports triton: kernels are made compiled or interpreted when defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.func import grad, vmap  # noqa: E402

from fastmtl.ops import available_backends, multihead_ce, multihead_ce_reference  # noqa: E402

_ops = sys.modules["fastmtl.ops._backends"]
DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_cpu = pytest.mark.skipif("cpu" not in available_backends(),
                               reason="fastmtl._multihead_ce (C++ CPU kernels) is not built")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _case(N, d, C, T, n, seed, dtype=torch.float64, device="cpu", shared=True, unequal=True):
    """Random inputs. shared: tasks draw their classes from an overlapping pool, so some
    rows serve several tasks. unequal: random task sizes in shuffled order."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(N, d, generator=g, dtype=torch.float64)
    w = torch.randn(C, d, generator=g, dtype=torch.float64) / d ** 0.5
    pool = min(C, n + 2) if shared else C
    tc = torch.stack([torch.randperm(pool, generator=g)[:n] for _ in range(T)])
    if not shared:
        tc = torch.randperm(C, generator=g)[:T * n].view(T, n)
    if unequal:
        st = torch.cat([torch.arange(T), torch.randint(0, T, (N - T,), generator=g)])
        st = st[torch.randperm(N, generator=g)]
    else:
        st = torch.arange(T).repeat_interleave(N // T)
    y = torch.randint(0, n, (N,), generator=g)
    gt = torch.rand(T, generator=g, dtype=torch.float64) + 0.5
    z, w = z.to(device, dtype), w.to(device, dtype)
    return z, w, tc.to(device), st.to(device), y.to(device), gt.to(device)


def _run(fn, z, w, tc, st, y, gt, reduction, **kw):
    """(loss, grad z, grad weight) for upstream gradient gt (per task) or 1 (mean)."""
    z, w = z.detach().requires_grad_(), w.detach().requires_grad_()
    loss = fn(z, w, tc, st, y, reduction=reduction, **kw)
    loss.backward(gt.to(loss.dtype) if reduction == "none" else None)
    return loss.detach(), z.grad, w.grad


def _expected(z, w, tc, st, y, gt, reduction, scale):
    """The float64 reference on the very values the backend sees (after dtype rounding)."""
    return _run(multihead_ce_reference, z.double().cpu(), w.double().cpu(), tc.cpu(), st.cpu(),
                y.cpu(), None if gt is None else gt.cpu(), reduction, scale=scale)


def _assert_close(got, want, rtol, atol):
    for name, a, b in zip(("loss", "grad z", "grad weight"), got, want):
        torch.testing.assert_close(a.double().cpu(), b, rtol=rtol, atol=atol, msg=name)


# ---- reference semantics ----

def test_reference_is_per_task_mean_then_mean_over_tasks():
    z, w, tc, st, y, _ = _case(40, 7, 6, 3, 4, seed=0)
    per_task = multihead_ce_reference(z, w, tc, st, y, scale=2.0, reduction="none")
    for t in range(3):
        m = st == t
        logits = 2.0 * z[m] @ w[tc[t]].T
        torch.testing.assert_close(per_task[t], F.cross_entropy(logits, y[m]))
    torch.testing.assert_close(multihead_ce_reference(z, w, tc, st, y, scale=2.0),
                               per_task.mean())


def test_private_functorch_api():
    """Every private torch.func call of fastmtl.ops (fastmtl/ops/_functorch.py) still
    exists and behaves; fails naming the one that moved."""
    from fastmtl.ops import _functorch as fx
    for name in ("is_functorch_wrapped_tensor", "maybe_get_bdim", "is_batchedtensor",
                 "get_unwrapped"):
        assert hasattr(torch._C._functorch, name), f"torch._C._functorch.{name} is gone"
    assert hasattr(torch._C, "_are_functorch_transforms_active"), \
        "torch._C._are_functorch_transforms_active is gone"
    x = torch.arange(6.0).view(3, 2)
    assert not fx.is_wrapped(x) and not fx.transforms_active()
    seen = {}

    def f(row):
        seen.update(wrapped=fx.is_wrapped(row), active=fx.transforms_active(),
                    plain=fx.plain(row).clone())
        return row * 2
    vmap(f, in_dims=1)(x)
    assert seen["wrapped"] and seen["active"]
    torch.testing.assert_close(seen["plain"], x.t())      # vmapped dimension first

    class Double(torch.autograd.Function):
        @staticmethod
        def forward(a):
            return 2 * a

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, g):
            return 2 * g
    a = torch.ones(3, requires_grad=True)
    fx.apply_function(Double, a).sum().backward()
    torch.testing.assert_close(a.grad, torch.full((3,), 2.0))


def test_backend_none_picks_by_device_and_trainer_uses_it():
    import fastmtl
    want = "cpu" if "cpu" in available_backends() else "reference"
    assert _ops.resolve_backend(None, torch.zeros(1, 1), 5) == want
    assert _ops.resolve_backend(None, torch.zeros(1, 1, device="meta"), 5) == "reference"
    assert fastmtl.MTLConfig().backend is None


# ---- CPU backend ----

CPU_CASES = [  # (N, d, C, T, n): ragged d, n = 1, shared rows, unequal tasks
    (60, 37, 9, 4, 5),
    (33, 1, 3, 2, 1),
    (100, 130, 40, 7, 3),
    (257, 16, 12, 5, 8),
    (90, 20, 70, 3, 64),
]


@needs_cpu
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("shape", CPU_CASES, ids=lambda s: "N{}-d{}-C{}-T{}-n{}".format(*s))
def test_cpu_float64_matches_reference(shape, reduction):
    case = _case(*shape, seed=sum(shape))
    got = _run(multihead_ce, *case, reduction, scale=1.7, backend="cpu")
    _assert_close(got, _expected(*case, reduction, 1.7), rtol=1e-10, atol=1e-12)


@needs_cpu
@pytest.mark.parametrize("shape", [(1600, 640, 351, 8, 5), (3200, 64, 64, 16, 5),
                                   (1000, 640, 64, 4, 5)],
                         ids=["paper-resnet12", "conv4", "unequal-tasks"])
def test_cpu_float32_realistic_shapes(shape):
    N, d, C, T, n = shape
    case = _case(*shape, seed=N + d, dtype=torch.float32, shared=C < T * n,
                 unequal=shape[0] == 1000)
    z = F.normalize(case[0], dim=1) * 10  # unit features, scale 10: the paper's setting
    case = (z,) + case[1:]
    for reduction in ("mean", "none"):
        got = _run(multihead_ce, *case, reduction, backend="cpu")
        _assert_close(got, _expected(*case, reduction, 1.0), rtol=1e-4, atol=1e-6)


@needs_cpu
def test_cpu_large_logits_and_bfloat16():
    # Logits of several hundred: softmax terms underflow; grads must stay finite and exact.
    case = _case(80, 24, 10, 3, 5, seed=3, dtype=torch.float32)
    z = case[0] * 60
    got = _run(multihead_ce, z, *case[1:], "none", backend="cpu")
    _assert_close(got, _expected(z, *case[1:], "none", 1.0), rtol=1e-4, atol=1e-5)
    zb, wb = case[0].bfloat16(), case[1].bfloat16()
    got = _run(multihead_ce, zb, wb, *case[2:], "mean", backend="cpu")
    assert got[0].dtype == got[1].dtype == got[2].dtype == torch.bfloat16
    _assert_close(got, _expected(zb, wb, *case[2:], "mean", 1.0), rtol=2e-2, atol=2e-3)


@needs_cpu
def test_cpu_gradcheck_float64():
    z, w, tc, st, y, _ = _case(14, 5, 6, 3, 3, seed=11)
    for reduction in ("mean", "none"):
        def f(z, w):
            return multihead_ce(z, w, tc, st, y, scale=1.3, reduction=reduction, backend="cpu")
        assert torch.autograd.gradcheck(f, (z.requires_grad_(), w.requires_grad_()))


@needs_cpu
def test_cpu_deterministic_across_thread_counts_and_index_dtypes():
    z, w, tc, st, y, gt = _case(3000, 320, 20, 6, 5, seed=5, dtype=torch.float32)  # > 1 thread
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(multihead_ce, z, w, tc, st, y, gt, "none", backend="cpu")
        torch.set_num_threads(max(2, before))
        many = _run(multihead_ce, z, w, tc.int(), st.int(), y.int(), gt, "none", backend="cpu")
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, many):
        assert torch.equal(a, b)  # the grad weight reduction order is fixed by design


@needs_cpu
def test_cpu_scale_tensor_and_non_contiguous_inputs():
    z, w, tc, st, y, _ = _case(50, 12, 8, 3, 4, seed=9)
    zt = z.T.contiguous().T  # same values, column-major
    want = _expected(z, w, tc, st, y, None, "mean", 2.5)
    got = _run(multihead_ce, zt, w, tc, st, y, None, "mean", scale=torch.tensor(2.5),
               backend="cpu")
    _assert_close(got, want, rtol=1e-10, atol=1e-12)
    # A scale that requires grad routes to the reference and gets its gradient.
    s = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    multihead_ce(z, w, tc, st, y, scale=s, backend="cpu").backward()
    s_ref = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    multihead_ce_reference(z, w, tc, st, y, scale=s_ref).backward()
    torch.testing.assert_close(s.grad, s_ref.grad)


# ---- Triton (interpreted on CPU tensors without a GPU) ----

def _triton_module():
    pytest.importorskip("triton", reason="triton is not installed")
    if "triton" not in available_backends():
        pytest.skip("triton backend unavailable (no CUDA and TRITON_INTERPRET unset)")
    mod = _ops.triton_kernels()
    if mod is None:
        pytest.skip("fastmtl.kernels.multihead_ce did not import")
    if not torch.cuda.is_available() and "Interpreted" not in type(mod._mhce_fwd_kernel).__name__:
        # Imported before TRITON_INTERPRET was set (another test module): redefine.
        mod = importlib.reload(mod)
        _ops._triton_mod = mod
    return mod


TRITON_CASES = [  # small: the interpreter runs numpy per program
    (37, 20, 9, 3, 5),      # one column block, ragged d
    (50, 300, 12, 4, 3),    # d > 256: column loop, ragged last block
    (30, 33, 7, 2, 1),      # n = 1
    (40, 40, 70, 3, 64),    # n = 64, the largest supported
    (70, 24, 6, 5, 4),      # rows shared by every task
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", TRITON_CASES, ids=lambda s: "N{}-d{}-C{}-T{}-n{}".format(*s))
def test_triton_matches_reference(shape, dtype):
    _triton_module()
    case = _case(*shape, seed=sum(shape) + 1, dtype=dtype, device=DEV)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=4e-3)
    for reduction in ("none", "mean"):
        got = _run(multihead_ce, *case, reduction, scale=1.3, backend="triton")
        assert got[1].dtype == got[2].dtype == dtype
        _assert_close(got, _expected(*case, reduction, 1.3), **tol)


def test_triton_kernels_small_blocks():
    """Both backward paths (z read once / column loop) and several row blocks per task."""
    mod = _triton_module()
    z, w, tc, st, y, gt = _case(45, 40, 8, 3, 5, seed=21, dtype=torch.float32, device=DEV)
    want = _expected(z, w, tc, st, y, gt, "none", 0.7)
    for block_d in (16, 64):
        loss = mod.forward(z, w, tc, st, y, 0.7, block_m=16, block_d=block_d)
        gz, gw = mod.backward(gt.float(), z, w, tc, st, y, 0.7, block_m=16, block_d=block_d)
        _assert_close((loss, gz, gw), want, rtol=1e-5, atol=1e-6)


@cuda
def test_triton_cuda_realistic_shapes():
    _triton_module()
    for shape in [(1600, 640, 351, 8, 5), (3200, 64, 64, 16, 5)]:
        for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
            case = _case(*shape, seed=shape[0], dtype=dtype, device="cuda", shared=False,
                         unequal=False)
            got = _run(multihead_ce, *case, "none", backend="triton")
            _assert_close(got, _expected(*case, "none", 1.0), rtol=tol, atol=tol / 10)


# ---- torch.func: vmap over head tables, vmap(grad), grad(vmap) ----

def _fused_backends():
    found = [b for b in ("cpu", "triton") if b in available_backends()]
    return found or [pytest.param("cpu", marks=pytest.mark.skip(reason="no fused backend"))]


@pytest.mark.parametrize("backend", _fused_backends())
def test_vmap_over_head_tables_equals_loop(backend):
    if backend == "triton":
        _triton_module()
    dtype = torch.float64 if backend == "cpu" else torch.float32
    tol = dict(rtol=1e-10, atol=1e-12) if backend == "cpu" else dict(rtol=1e-5, atol=1e-6)
    dev = "cpu" if backend == "cpu" else DEV
    B, N, d, C, T, n = 3, 40, 11, 8, 3, 4
    g = torch.Generator().manual_seed(7)
    heads = torch.randn(B, C, d, generator=g, dtype=dtype).to(dev)
    zs = torch.randn(B, N, d, generator=g, dtype=dtype).to(dev)
    z, w, tc, st, y, _ = _case(N, d, C, T, n, seed=8, dtype=dtype, device=dev)

    def loss(w, z, reduction="mean", b=backend):
        return multihead_ce(z, w, tc, st, y, scale=1.5, reduction=reduction, backend=b)

    def ref(w, z, reduction="mean"):
        return loss(w, z, reduction, "reference")

    def loop(f, *xs):
        return torch.stack([f(*(x[i] for x in xs)) for i in range(B)])

    # A batch of head tables over one feature set, per-task losses.
    got = vmap(lambda w: loss(w, z, "none"))(heads)
    torch.testing.assert_close(got, loop(lambda w: ref(w, z, "none"), heads), **tol)
    # ANIL's inner loop: per-copy heads and features, gradient w.r.t. the head.
    got = vmap(grad(loss))(heads, zs)
    torch.testing.assert_close(got, loop(grad(ref), heads, zs), **tol)
    # One shared head, per-copy features: one gradient per copy.
    got = vmap(grad(loss), in_dims=(None, 0))(w, zs)
    torch.testing.assert_close(got, loop(lambda z: grad(ref)(w, z), zs), **tol)
    # Differentiating through the vmap: the shared head's gradients sum.
    got = grad(lambda w: vmap(loss, in_dims=(None, 0))(w, zs).sum())(w)
    torch.testing.assert_close(got, loop(lambda z: grad(ref)(w, z), zs).sum(0), **tol)


@needs_cpu
def test_vmap_with_batched_indices_and_checks():
    B, N, d, C, T, n = 2, 30, 6, 7, 3, 3
    cases = [_case(N, d, C, T, n, seed=30 + b) for b in range(B)]
    z, w, tc, st, y = (torch.stack([c[k] for c in cases]) for k in range(5))

    def loss(z, w, tc, st, y, b="cpu"):
        return multihead_ce(z, w, tc, st, y, backend=b)

    got = vmap(grad(loss, argnums=(0, 1)))(z, w, tc, st, y)
    for b in range(B):
        want = grad(loss, argnums=(0, 1))(z[b], w[b], tc[b], st[b], y[b], "reference")
        torch.testing.assert_close(got[0][b], want[0])
        torch.testing.assert_close(got[1][b], want[1])
    bad = st.clone()
    bad[1] = 0  # copy 1 leaves tasks 1 and 2 empty
    with pytest.raises(ValueError, match="at least one sample"):
        vmap(loss)(z, w, tc, bad, y)
    bad = y.clone()
    bad[0, 0] = n
    with pytest.raises(ValueError, match="labels"):
        vmap(loss)(z, w, tc, st, bad)


@needs_cpu
def test_fused_backward_is_first_order_only():
    z, w, tc, st, y, _ = _case(20, 5, 6, 2, 3, seed=2)
    w.requires_grad_()
    (gw,) = torch.autograd.grad(multihead_ce(z, w, tc, st, y, backend="cpu"), w,
                                create_graph=True)
    with pytest.raises(RuntimeError, match="first-order"):
        gw.sum().backward()


# ---- errors: ValueError naming the argument, before any kernel runs ----

def _valid():
    z, w, tc, st, y, _ = _case(12, 4, 6, 2, 3, seed=1, dtype=torch.float32)
    return dict(z=z, weight=w, task_classes=tc, sample_task=st, labels=y)


BAD = [  # (what to change, expected message fragment)
    (lambda a: a.update(z=a["z"][:, :3]), "feature size"),
    (lambda a: a.update(z=a["z"][None]), "z must have shape"),
    (lambda a: a.update(weight=a["weight"].double()), "dtype"),
    (lambda a: a.update(labels=a["labels"][:-1]), "labels must have shape"),
    (lambda a: a.update(sample_task=a["sample_task"].float()), "sample_task must be an int"),
    (lambda a: a.update(task_classes=a["task_classes"][0]), "task_classes must have shape"),
    (lambda a: a.update(task_classes=a["task_classes"] + 6), "task_classes values"),
    (lambda a: a.update(task_classes=a["task_classes"] - 6), "task_classes values"),
    (lambda a: a.update(sample_task=a["sample_task"] + 2), "sample_task values"),
    (lambda a: a.update(labels=a["labels"] + 3), "labels values"),
    (lambda a: a.update(sample_task=torch.zeros_like(a["sample_task"])), "at least one sample"),
]


def _error_backends():
    out = ["reference"] + [b for b in ("cpu",) if b in available_backends()]
    if "triton" in available_backends():
        out.append("triton")
    return out


@pytest.mark.parametrize("backend", _error_backends())
@pytest.mark.parametrize("change,message", BAD, ids=[m for _, m in BAD])
def test_errors_name_the_argument_before_any_kernel(backend, change, message, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a kernel ran on invalid input")

    monkeypatch.setattr(sys.modules["fastmtl.ops.multihead_ce"], "multihead_ce_reference", boom)
    monkeypatch.setattr(sys.modules["fastmtl.ops._function"], "_fused_forward", boom)
    args = _valid()
    change(args)
    with pytest.raises(ValueError, match=message):
        multihead_ce(**args, backend=backend)


def test_errors_on_bad_options():
    args = _valid()
    with pytest.raises(ValueError, match="reduction"):
        multihead_ce(**args, reduction="sum")
    with pytest.raises(ValueError, match="backend"):
        multihead_ce(**args, backend="cuda")
    with pytest.raises(ValueError, match="scale"):
        multihead_ce(**args, scale=torch.ones(2))
    if "triton" in available_backends():
        a = _valid()
        a["task_classes"] = torch.arange(65).repeat(2, 1)
        a["weight"] = torch.randn(65, 4)
        with pytest.raises(ValueError, match="up to 64"):
            multihead_ce(**a, backend="triton")
