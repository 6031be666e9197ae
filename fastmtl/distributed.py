"""Data-parallel training on ``torch.distributed``: what the trainers and ``evaluate`` share.

fastmtl uses the standard stack, nothing home-made: ``torchrun`` (or any launcher that sets
``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``) starts one process per GPU or
CPU share; the trainers wrap their learner in :class:`~torch.nn.parallel.DistributedDataParallel`
(NCCL on CUDA, gloo on CPU), which averages gradients across ranks.

The contract: a step's T tasks are episodes ``first .. first + T - 1`` (a pure function of the
seed and the episode number); rank r of W takes the contiguous block
``first + r * T / W .. first + (r + 1) * T / W - 1``. Each rank's loss is the mean over its
tasks, DDP averages the gradients, so W ranks compute the update of one process with all T
tasks (T must be divisible by W). Checkpoints are written by rank 0 and hold nothing that
depends on the world size, so a run resumes on any number of ranks. Evaluation splits its
episodes (and the embedding of the test images) across ranks in whole chunks and gathers the
per-episode accuracies in order, so mean and CI are those of one process.

Everything here is a no-op in a plain single process.
"""
from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from types import TracebackType
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["init_from_env", "check_joined", "shutdown", "is_distributed", "rank", "world_size",
           "is_main", "default_device", "DistributedError"]

# Seconds a collective may wait for the other ranks before failing (init_process_group's
# timeout); FASTMTL_DIST_TIMEOUT overrides it. A dead peer is usually noticed at once (its
# sockets close); the timeout bounds the wait when it is not.
DEFAULT_TIMEOUT_S = 300.0


class DistributedError(RuntimeError):
    """A collective failed: another rank died, was killed, or stopped answering.

    ``what`` names the collective (and the phase of training), ``detail`` the backend's
    own error, ``checkpoint`` the folder to resume from (None: no checkpoints).

    Example:
        >>> exc = DistributedError("all-reduce of gradients", "Connection reset by peer", "runs")
        >>> "runs/last.pt" in str(exc)
        True
    """

    def __init__(self, what: str, detail: str, checkpoint: str | None = None):
        self.what, self.detail, self.checkpoint = what, detail, checkpoint
        if checkpoint:
            advice = (f"Resume from {os.path.join(checkpoint, 'last.pt')} (resume=... or "
                      "--resume) on any number of ranks.")
        else:
            advice = "Set checkpoint_dir to be able to resume such a run."
        super().__init__(f"fastmtl rank {rank()} of {world_size()}: {what} failed: another rank "
                         f"has died, was killed or stopped answering. {advice} Cause: {detail}")


def _env_world() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be an integer, got {os.environ['WORLD_SIZE']!r}") \
            from None


def check_joined(what: str = "a trainer") -> None:
    """ValueError if the environment names a multi-process launch (``WORLD_SIZE`` > 1) but
    this process has joined no process group: each rank would then train alone.

    Example:
        >>> check_joined()            # a plain process: nothing to join
    """
    if _env_world() > 1 and not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"WORLD_SIZE={_env_world()}: this is a multi-process launch, but "
                         f"no process group exists; call fastmtl.distributed.init_from_env() "
                         f"before building {what}")


def init_from_env(backend: str | None = None, timeout_s: float | None = None) -> bool:
    """Join the process group a launcher such as ``torchrun`` describes in the environment.

    Does nothing (and returns False) when the process group already exists or when the
    environment names no multi-process launch (``WORLD_SIZE`` unset or 1). ``backend``
    defaults to NCCL when CUDA is available and gloo otherwise; each rank then uses the GPU
    ``LOCAL_RANK``. ``fastmtl train`` and ``fastmtl eval`` call it; a script of one's own
    under torchrun calls it once before building a trainer (a trainer built under a
    multi-process launch without a process group refuses, see :func:`check_joined`).

    Args:
        backend: the process-group backend (None: NCCL with CUDA, else gloo).
        timeout_s: seconds a collective may wait (None: ``$FASTMTL_DIST_TIMEOUT`` or the
            default).

    Returns:
        True if this call joined a process group.

    Raises:
        ValueError: a multi-process environment that is incomplete or unusable.

    Example:
        >>> init_from_env()           # a plain process (no WORLD_SIZE): nothing to join
        False
    """
    if dist.is_available() and dist.is_initialized():
        return False
    if _env_world() <= 1:
        return False
    if not dist.is_available():
        raise ValueError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {name} is not set; "
                             "launch with torchrun (or set RANK, MASTER_ADDR, MASTER_PORT)")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if timeout_s is None:
        timeout_s = float(os.environ.get("FASTMTL_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def shutdown(sync: bool = True) -> None:
    """Leave the process group (a no-op outside one); call it before the process exits.

    With ``sync`` the ranks first meet at a barrier, so none tears its connections down
    while another still uses them (gloo can abort a process whose peer vanished at exit).
    Errors are swallowed: after a failed run the group may already be broken.

    Args:
        sync: meet the other ranks at a barrier first.

    Example:
        >>> shutdown()                # outside a process group: a no-op
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if sync and dist.get_world_size() > 1:
            dist.barrier()
    except Exception:
        pass
    try:
        dist.destroy_process_group()
    except Exception:
        pass


def is_distributed() -> bool:
    """True inside an initialized process group of more than one rank.

    Example:
        >>> is_distributed()
        False
    """
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 outside a process group).

    Example:
        >>> rank()
        0
    """
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of ranks (1 outside a process group).

    Example:
        >>> world_size()
        1
    """
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0 (or a plain process): the one that logs, shows progress and writes files.

    Example:
        >>> is_main()
        True
    """
    return rank() == 0


def default_device() -> torch.device:
    """``cuda:LOCAL_RANK`` under a launcher with CUDA, else ``cuda`` or ``cpu``.

    Example:
        >>> default_device().type in ("cuda", "cpu")
        True
    """
    if torch.cuda.is_available():
        if is_distributed() or _env_world() > 1:
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cuda")
    return torch.device("cpu")


def shard(total: int, name: str) -> tuple[int, int]:
    """(offset, count) of this rank's contiguous share of ``total`` tasks of a step."""
    w = world_size()
    if total % w:
        raise ValueError(f"{name}={total} must be divisible by the world size ({w}) so that "
                         "every rank takes an equal share of each step's tasks")
    return rank() * (total // w), total // w


def chunks(total: int, chunk: int, shrink: bool = True) -> Iterator[tuple[int, int]]:
    """(first, count) of this rank's share of ``range(total)`` cut into ``chunk``-sized pieces.

    Ranks take contiguous runs of whole chunks, so gathering in rank order restores the
    global order. With ``shrink`` and more ranks than chunks, the chunks shrink to
    ``ceil(total / W)`` so that every rank has work: only where the per-item results do not
    depend on the chunking (episodes do; embeddings by a backbone that normalizes with batch
    statistics, as the GBML ones do, would not).
    """
    w = world_size()
    if w > 1 and shrink:
        chunk = max(1, min(chunk, -(-total // w)))
    n = -(-total // chunk)
    r = rank()
    lo, hi = n * r // w, n * (r + 1) // w
    for c in range(lo, hi):
        yield c * chunk, min(chunk, total - c * chunk)


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``t`` (any number of rows, same trailing shape) in rank order."""
    if not is_distributed():
        return t
    home, dev = t.device, _comm_device()
    t = t.to(dev)
    with _collective("gather_rows"):
        counts = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(world_size())]
        dist.all_gather(counts, torch.tensor([t.shape[0]], dtype=torch.int64, device=dev))
        sizes = [int(s) for s in counts]
        most = max(sizes)
        padded = torch.zeros((most,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
        padded[:t.shape[0]] = t
        out = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(out, padded.contiguous())
    return torch.cat([o[:s] for o, s in zip(out, sizes, strict=True)]).to(home)


def _comm_device() -> torch.device:
    """Where small tensors for a collective live: NCCL takes CUDA tensors only."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def average(values: list[float]) -> list[float]:
    """The mean over ranks of each value (for logging: every rank then records the same)."""
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    with _collective("average"):
        dist.all_reduce(t)
    return (t / world_size()).tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any (a shared stop decision)."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=_comm_device())
    with _collective("any_rank"):
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def wrap(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` in DistributedDataParallel when distributed, else ``module`` itself.

    Buffers are not broadcast: the MTL trainer merges BatchNorm running statistics itself
    (:class:`RunningStatsSync`), the GBML trainers keep none.
    """
    if not is_distributed():
        return module
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids, forward_sync_buffers=False)


class RunningStatsSync:
    """Merges BatchNorm running statistics across ranks into those of one process.

    A BatchNorm with momentum m updates ``r <- (1 - m) r + m x`` once per forward. When rank
    q of W made u updates to its copy starting from the shared ``r0``, one process making
    the W * u updates in rank order would end at
    ``(1 - m)^(W u) r0 + sum_q (1 - m)^(u (W - 1 - q)) (r_q - (1 - m)^u r0)``,
    which is what :meth:`merge` computes (one all-gather per step). A BatchNorm without
    momentum (cumulative average) gets the plain mean over ranks.
    """

    def __init__(self, module: nn.Module):
        self.norms = [m for m in module.modules()
                      if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
                      and m.running_mean is not None]
        self.before: list[tuple[torch.Tensor, torch.Tensor]] = []

    def snapshot(self) -> None:
        """Keep the running statistics before the step's updates (for :meth:`merge`)."""
        if is_distributed():
            self.before = [(mean.clone(), var.clone()) for mean, var in map(_running, self.norms)]

    @torch.no_grad()
    def merge(self, updates: int) -> None:
        """Merge every rank's running statistics after ``updates`` BatchNorm updates each
        since :meth:`snapshot`, as one process making all of them would have."""
        if not is_distributed() or not self.norms:
            return
        w, deltas = world_size(), []
        for m, (mean0, var0) in zip(self.norms, self.before, strict=True):
            keep = 1.0 if m.momentum is None else (1.0 - m.momentum) ** updates
            mean, var = _running(m)
            deltas += [mean - keep * mean0, var - keep * var0]
        flat = torch.cat([d.flatten().double() for d in deltas]).to(_comm_device())
        with _collective("BatchNorm running statistics"):
            gathered = [torch.empty_like(flat) for _ in range(w)]
            dist.all_gather(gathered, flat)
        offset = 0
        for m, (mean0, var0) in zip(self.norms, self.before, strict=True):
            for buf, r0 in zip(_running(m), (mean0, var0), strict=True):
                n = buf.numel()
                parts = [g[offset:offset + n].view_as(buf).to(buf.device) for g in gathered]
                offset += n
                if m.momentum is None:
                    keep = 1.0
                    zero = torch.zeros_like(r0, dtype=torch.float64)
                    merged = sum((p + r0.double() for p in parts), zero) / w
                else:
                    keep = (1.0 - m.momentum) ** updates
                    merged = keep ** w * r0.double()
                    for q, p in enumerate(parts):
                        merged = merged + keep ** (w - 1 - q) * p
                buf.copy_(merged.to(buf.dtype))
            if m.num_batches_tracked is not None:
                # Each rank added `updates`; one process would have added W times as many.
                m.num_batches_tracked.add_((w - 1) * updates)


def _running(m: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(running_mean, running_var) of a BatchNorm that tracks them (the only kind
    :class:`RunningStatsSync` keeps)."""
    mean, var = m.running_mean, m.running_var
    assert mean is not None and var is not None
    return mean, var


class _collective:
    """Turns a failed collective into a :class:`DistributedError` that says what to do."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self) -> _collective:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> Literal[False]:
        if exc is not None and is_comm_failure(exc) and not isinstance(exc, DistributedError):
            raise as_distributed_error(exc, self.what) from exc
        return False


_COMM_WORDS = ("gloo", "nccl", "connection", "connect", "peer", "timed out", "timeout",
               "socket", "broken pipe", "closed", "unreachable")


def is_comm_failure(exc: BaseException) -> bool:
    """Whether ``exc`` looks like a failed collective rather than a bug in the step."""
    if isinstance(exc, DistributedError):
        return True
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    if not isinstance(exc, RuntimeError) or not is_distributed():
        return False
    text = str(exc).lower()
    return any(w in text for w in _COMM_WORDS)


def as_distributed_error(exc: BaseException, what: str,
                         checkpoint: str | None = None) -> DistributedError:
    """``exc`` (a failed collective) as a :class:`DistributedError` saying what to do."""
    if isinstance(exc, DistributedError):
        return DistributedError(f"{exc.what} in {what}", exc.detail,
                                checkpoint or exc.checkpoint)
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return DistributedError(what, f"{type(exc).__name__}: {first}", checkpoint)
