"""Triton kernels of :func:`fastmtl.ops.multihead_ce` (CUDA; CPU tensors under TRITON_INTERPRET=1).

Layout of the work: samples are sorted by task (a stable argsort, on the device) and cut
into blocks of ``BLOCK_M`` rows that never straddle a task, so one program loads its task's
head once as an (n, d) tile and every row of the block shares it; logits are
``tl.dot(z_tile, head_tile.T)`` with n padded to ``BLOCK_N >= 16`` (``tl.dot`` needs every
block dimension >= 16) and masked, as is a ragged last column block of d.

* forward: one pass over z; log-sum-exp, cross-entropy and the block's loss sum stay in
  registers, one float per block is written. Nothing is kept for the backward beyond the
  inputs: the backward recomputes the n logits per row (cheaper than storing (N, n)).
* backward: per block, logits -> ``g = coef * (softmax - onehot)`` -> grad z rows (each
  row owned by one block: plain stores) and an (n, d) slab of grad weight partial sums.
  When d fits one column block (d <= 256) z is read once; otherwise the column loop runs
  twice over the block's rows (logits first, then gradients), the second read coming from L2.
* grad weight: **sorted segments, not atomics.** A second kernel owns one (class row,
  column block) each and adds the slabs that feed that row, found through a stable
  argsort of the slabs by class. Rows shared by several tasks (and every block of a
  task, which all hit the same n rows) thus reduce without contention, in a fixed order
  (bitwise reproducible, unlike float atomics), in float32 even for bfloat16 weights. The
  slabs cost (N / BLOCK_M + T) * n * d floats, about n / BLOCK_M of z.

Inputs may be float32, bfloat16 or float16; tiles are upcast and every product and sum is
float32 (``input_precision="ieee"``: at n <= 64 the op is memory bound, so TF32 would buy
nothing and cost accuracy). Importing this module never fails: without triton,
``HAS_TRITON`` is False and :mod:`fastmtl.ops` does not offer the backend.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - missing or broken triton: the backend is just unavailable
    triton = tl = None

HAS_TRITON = triton is not None

__all__ = ["HAS_TRITON", "forward", "backward", "block_sizes"]

MAX_N = 64


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def block_sizes(n: int, d: int, block_m: int | None = None, block_d: int | None = None):
    """(BLOCK_M, BLOCK_N, BLOCK_D) for a head of n classes over d features."""
    if not 1 <= n <= MAX_N:
        raise ValueError(f"the triton backend supports 1 <= n <= {MAX_N} classes per task, got {n}")
    block_n = max(16, _next_pow2(n))
    if block_d is None:
        # One column block (z read once) while the (BLOCK_M, BLOCK_D) tiles stay small
        # enough for registers; beyond that 128-wide blocks (640 = 5 x 128 without waste).
        block_d = max(16, _next_pow2(d)) if d <= 256 else 128
    return block_m or 32, block_n, block_d


def _plan(sample_task, T: int, block_m: int):
    """Task-sorted row order and the (task, start, end) of each block, without a host sync.

    The number of blocks is bounded by cdiv(N, BLOCK_M) + T; blocks past the real count
    are empty (start == end) and are marked invalid.
    """
    st = sample_task.long()
    N, dev = st.shape[0], st.device
    counts = torch.bincount(st, minlength=T)
    order = torch.argsort(st, stable=True)
    first = torch.cumsum(counts, 0) - counts
    nblk = (counts + block_m - 1) // block_m
    last = torch.cumsum(nblk, 0)
    n_blocks = (N + block_m - 1) // block_m + T
    b = torch.arange(n_blocks, device=dev)
    task = torch.searchsorted(last, b, right=True)
    valid = task < T
    task = task.clamp_max(T - 1)
    start = first[task] + (b - (last[task] - nblk[task])) * block_m
    end = torch.minimum(start + block_m, first[task] + counts[task])
    zero = torch.zeros((), dtype=start.dtype, device=dev)
    blocks = torch.stack([task, torch.where(valid, start, zero), torch.where(valid, end, zero)])
    return counts, order, blocks.contiguous(), valid, task, n_blocks


if HAS_TRITON:

    @triton.jit
    def _load_tiles(z_ptr, w_ptr, rows, cls, mask_m, mask_n, k0, d, BLOCK_D: tl.constexpr):
        offs_d = k0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < d
        zt = tl.load(z_ptr + rows[:, None] * d + offs_d[None, :],
                     mask=mask_m[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        wt = tl.load(w_ptr + cls[:, None] * d + offs_d[None, :],
                     mask=mask_n[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        return zt, wt, offs_d, mask_d

    @triton.jit
    def _block_header(tc_ptr, order_ptr, blocks_ptr, n_blocks, n,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid = tl.program_id(0)
        task = tl.load(blocks_ptr + pid)
        start = tl.load(blocks_ptr + n_blocks + pid)
        end = tl.load(blocks_ptr + 2 * n_blocks + pid)
        offs_m = start + tl.arange(0, BLOCK_M)
        mask_m = offs_m < end
        rows = tl.load(order_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
        offs_n = tl.arange(0, BLOCK_N)
        mask_n = offs_n < n
        cls = tl.load(tc_ptr + task * n + offs_n, mask=mask_n, other=0).to(tl.int64)
        return pid, task, rows, mask_m, offs_n, mask_n, cls

    @triton.jit
    def _lse_and_target(acc, scale, rows, mask_m, offs_n, mask_n, y_ptr):
        s = tl.where(mask_n[None, :], acc * scale, float("-inf"))
        mx = tl.max(s, axis=1)
        lse = mx + tl.log(tl.sum(tl.exp(s - mx[:, None]), axis=1))
        lab = tl.load(y_ptr + rows, mask=mask_m, other=0)
        onehot = offs_n[None, :] == lab[:, None]
        return s, lse, onehot

    @triton.jit
    def _mhce_fwd_kernel(z_ptr, w_ptr, tc_ptr, y_ptr, order_ptr, blocks_ptr, loss_ptr,
                         n_blocks, n, d, scale,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        pid, task, rows, mask_m, offs_n, mask_n, cls = _block_header(
            tc_ptr, order_ptr, blocks_ptr, n_blocks, n, BLOCK_M, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, d, BLOCK_D):
            zt, wt, offs_d, mask_d = _load_tiles(z_ptr, w_ptr, rows, cls, mask_m, mask_n, k0, d,
                                                 BLOCK_D)
            acc = tl.dot(zt, tl.trans(wt), acc, input_precision="ieee")
        s, lse, onehot = _lse_and_target(acc, scale, rows, mask_m, offs_n, mask_n, y_ptr)
        target = tl.sum(tl.where(onehot, s, 0.0), axis=1)
        tl.store(loss_ptr + pid, tl.sum(tl.where(mask_m, lse - target, 0.0), axis=0))

    @triton.jit
    def _store_grads(g, zt, wt, rows, mask_m, offs_n, mask_n, offs_d, mask_d, gz_ptr, slab_ptr, d):
        gz = tl.dot(g, wt, input_precision="ieee")                    # (BLOCK_M, BLOCK_D)
        tl.store(gz_ptr + rows[:, None] * d + offs_d[None, :], gz.to(gz_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_d[None, :])
        gw = tl.dot(tl.trans(g), zt, input_precision="ieee")          # (BLOCK_N, BLOCK_D)
        tl.store(slab_ptr + offs_n[:, None] * d + offs_d[None, :], gw,
                 mask=mask_n[:, None] & mask_d[None, :])

    @triton.jit
    def _mhce_bwd_kernel(z_ptr, w_ptr, tc_ptr, y_ptr, order_ptr, blocks_ptr, coef_ptr, gz_ptr,
                         part_ptr, n_blocks, n, d, scale,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         SINGLE: tl.constexpr):
        pid, task, rows, mask_m, offs_n, mask_n, cls = _block_header(
            tc_ptr, order_ptr, blocks_ptr, n_blocks, n, BLOCK_M, BLOCK_N)
        coef = tl.load(coef_ptr + task)
        slab_ptr = part_ptr + pid.to(tl.int64) * n * d
        if SINGLE:
            zt, wt, offs_d, mask_d = _load_tiles(z_ptr, w_ptr, rows, cls, mask_m, mask_n, 0, d,
                                                 BLOCK_D)
            acc = tl.dot(zt, tl.trans(wt), input_precision="ieee")
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, d, BLOCK_D):
                zt, wt, offs_d, mask_d = _load_tiles(z_ptr, w_ptr, rows, cls, mask_m, mask_n, k0,
                                                     d, BLOCK_D)
                acc = tl.dot(zt, tl.trans(wt), acc, input_precision="ieee")
        s, lse, onehot = _lse_and_target(acc, scale, rows, mask_m, offs_n, mask_n, y_ptr)
        g = coef * (tl.exp(s - lse[:, None]) - onehot.to(tl.float32))
        g = tl.where(mask_m[:, None] & mask_n[None, :], g, 0.0)
        if SINGLE:
            _store_grads(g, zt, wt, rows, mask_m, offs_n, mask_n, offs_d, mask_d, gz_ptr,
                         slab_ptr, d)
        else:
            for k0 in range(0, d, BLOCK_D):
                zt, wt, offs_d, mask_d = _load_tiles(z_ptr, w_ptr, rows, cls, mask_m, mask_n, k0,
                                                     d, BLOCK_D)
                _store_grads(g, zt, wt, rows, mask_m, offs_n, mask_n, offs_d, mask_d, gz_ptr,
                             slab_ptr, d)

    @triton.jit
    def _mhce_reduce_kernel(part_ptr, perm_ptr, seg_ptr, gw_ptr, d, BLOCK_D: tl.constexpr):
        row = tl.program_id(0)
        offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = offs_d < d
        lo = tl.load(seg_ptr + row)
        hi = tl.load(seg_ptr + row + 1)
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for e in range(lo, hi):
            slot = tl.load(perm_ptr + e)
            acc += tl.load(part_ptr + slot * d + offs_d, mask=mask_d, other=0.0)
        tl.store(gw_ptr + row.to(tl.int64) * d + offs_d, acc.to(gw_ptr.dtype.element_ty),
                 mask=mask_d)


def _require():
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; use backend='cpu' or 'reference'")


def forward(z, weight, task_classes, sample_task, labels, scale: float, *, block_m=None,
            block_d=None):
    """Per-task mean cross-entropy, shape (T,), float32. Inputs are trusted (checked upstream)."""
    _require()
    z, weight = z.contiguous(), weight.contiguous()
    tc, y = task_classes.long().contiguous(), labels.long().contiguous()
    (_, d), (T, n) = z.shape, tc.shape
    BM, BN, BD = block_sizes(n, d, block_m, block_d)
    counts, order, blocks, valid, task, n_blocks = _plan(sample_task, T, BM)
    loss = torch.empty(n_blocks, dtype=torch.float32, device=z.device)
    _mhce_fwd_kernel[(n_blocks,)](z, weight, tc, y, order, blocks, loss, n_blocks, n, d,
                                  float(scale), BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD)
    # Each block's loss lands in its own column: a collision-free scatter, then a plain
    # sum, keeps the task sums deterministic (index_add would use float atomics on CUDA).
    per_task = torch.zeros(T, n_blocks, dtype=torch.float32, device=z.device)
    per_task.scatter_(0, task.view(1, -1), torch.where(valid, loss, 0.0).view(1, -1))
    return per_task.sum(1) / counts


def backward(grad_task, z, weight, task_classes, sample_task, labels, scale: float, *,
             block_m=None, block_d=None):
    """(grad z, grad weight) for upstream per-task gradients ``grad_task`` (T,)."""
    _require()
    z, weight = z.contiguous(), weight.contiguous()
    tc, y = task_classes.long().contiguous(), labels.long().contiguous()
    (_, d), (T, n), C = z.shape, tc.shape, weight.shape[0]
    BM, BN, BD = block_sizes(n, d, block_m, block_d)
    counts, order, blocks, valid, task, n_blocks = _plan(sample_task, T, BM)
    coef = (grad_task.float() * float(scale) / counts).contiguous()
    grad_z = torch.empty_like(z)
    part = torch.empty(n_blocks * n * d, dtype=torch.float32, device=z.device)
    _mhce_bwd_kernel[(n_blocks,)](z, weight, tc, y, order, blocks, coef, grad_z, part, n_blocks,
                                  n, d, float(scale), BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD,
                                  SINGLE=BD >= d)
    # Slabs of empty blocks get the sentinel class C, so they sort past every real row.
    slot_class = torch.where(valid[:, None], tc[task], C).reshape(-1)
    perm = torch.argsort(slot_class, stable=True)
    seg = torch.zeros(C + 2, dtype=torch.int64, device=z.device)
    seg[1:] = torch.cumsum(torch.bincount(slot_class, minlength=C + 1), 0)
    grad_w = torch.empty_like(weight)
    block_r = min(max(16, _next_pow2(d)), 512)
    _mhce_reduce_kernel[(C, triton.cdiv(d, block_r))](part, perm, seg, grad_w, d, BLOCK_D=block_r)
    return grad_z, grad_w
