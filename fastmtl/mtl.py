"""The multi-task learner of Wang, Zhao & Li (ICML 2021), as its official code runs it.

One shared backbone and a table of per-class head rows ``W`` (C, d), no bias. A training
task with classes (c_1..c_n) uses the head ``W[[c_1..c_n]]``; its loss is the cross-entropy
over those n logits. All of a task's images are training data (no support/query split).
A step draws ``tasks_per_step`` tasks, runs the backbone over their images and makes ONE
:func:`fastmtl.ops.multihead_ce` call for all of them (the official code loops over tasks
and accumulates gradients: same gradient, more Python).

BatchNorm convention: with ``chunking="task"`` the backbone sees each task's images as
one batch, so batch statistics (and running-statistic updates) are per task, as in the
official code's per-task loop; with ``chunking="batch"`` all of the step's images share
one set of statistics. ``"auto"`` picks ``"task"`` on CPU (measured faster on a 2-core
CPU: per-task batches of 50-100 Conv-4 images 0.56-0.72 s a step, one batch of 800
1.06-1.12 s) and ``"batch"`` on CUDA.

Distributed (``torchrun``, see :mod:`fastmtl.distributed`): the step's tasks are split
across ranks in contiguous blocks and the backbone, head table and logit scale train as
one ``DistributedDataParallel`` module, so W ranks make the update one process makes with
all the tasks. With ``"task"`` chunking that holds exactly, BatchNorm running statistics
included (they are merged across ranks after each step); with ``"batch"`` each rank
normalizes over its own share of the step's images.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import distributed as _dist
from .data.base import FewShotDataset
from .models import feature_dim
from .ops import multihead_ce
from .sampling import EpisodeLoader

__all__ = ["MTLConfig", "MTLTrainer"]


@dataclass
class MTLConfig:
    """Settings of :class:`MTLTrainer`; defaults follow the paper's official code.

    Attributes:
        n_way: classes per training task.
        images_per_class: images of each class in a task (all used for training).
        tasks_per_step: tasks per optimizer step, all in one fused head call.
        tasks_per_epoch: tasks per epoch (the paper: 1,600).
        epochs: maximum number of epochs.
        lr, weight_decay: RAdam settings (the paper: lr 1e-3).
        plateau_patience, plateau_factor: ReduceLROnPlateau on validation accuracy (or on
            the training loss without a validation set).
        normalize_features: L2-normalize features before the head in training (the
            paper: on for all data sets but FC100).
        head: "linear" (the paper: plain class rows, Kaiming-uniform init scaled by
            sqrt(C / n)) or "cosine" (rows L2-normalized before use, so every logit is
            ``scale * cos(z, w)``; with unit features this fixes the logit range).
        scale: logit scale (inverse temperature), multiplies the features before the head.
        learn_scale: make ``scale`` a trained parameter (log-parameterized).
        augment: random affine jitter of training images (rotation, scale, shift).
        chunking: "auto", "task" or "batch"; see the module docstring.
        grad_clip: max gradient norm, or None (the default: no clipping).
        val_episodes, val_ways, val_shots, val_queries: validation protocol per epoch
            (the test protocol: logistic regression on the support features).
        early_stop_patience: stop after this many epochs without a better validation
            accuracy (None: never); the best epoch's weights are restored at the end.
        max_minutes: wall-clock budget for fit (None: none): training stops at the first
            step past it; that (partial) epoch is still validated, recorded and saved.
        seed: seeds episodes, head init, augmentation and dropout (one seed, repeatable).
        backend: multihead_ce backend (None: fastest for the device).
        checkpoint_dir: where ``last.pt`` and ``best.pt`` go every epoch (None: none).
    """

    n_way: int = 5
    images_per_class: int = 10
    tasks_per_step: int = 16
    tasks_per_epoch: int = 1600
    epochs: int = 100
    lr: float = 1e-3
    weight_decay: float = 0.0
    plateau_patience: int = 4
    plateau_factor: float = 0.1
    normalize_features: bool = True
    head: str = "linear"
    scale: float = 1.0
    learn_scale: bool = False
    augment: bool = False
    chunking: str = "auto"
    grad_clip: float | None = None
    val_episodes: int = 200
    val_ways: int = 5
    val_shots: int = 1
    val_queries: int = 15
    early_stop_patience: int | None = None
    max_minutes: float | None = None
    seed: int = 0
    backend: str | None = None
    checkpoint_dir: str | None = None

    def validate(self) -> None:
        for name in ("n_way", "images_per_class", "tasks_per_step", "tasks_per_epoch",
                     "epochs", "val_ways", "val_shots"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.head not in ("linear", "cosine"):
            raise ValueError(f"head must be 'linear' or 'cosine', got {self.head!r}")
        if self.chunking not in ("auto", "task", "batch"):
            raise ValueError(f"chunking must be 'auto', 'task' or 'batch', got {self.chunking!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.scale <= 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")


def _random_affine(x: torch.Tensor, u: torch.Tensor, rotate=10.0, scale=0.1,
                   shift=0.1) -> torch.Tensor:
    """Per-image random rotation (degrees), isotropic scale and shift (fraction of size).

    ``u`` (B, 4) uniform in [0, 1), one row per image: drawn for the whole step and sliced,
    so a rank's images get the numbers one process would give them.
    """
    u = u.to(x.device) * 2 - 1
    angle = u[:, 0] * math.radians(rotate)
    s = 1 + u[:, 1] * scale
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    theta = torch.stack([torch.stack([cos, -sin, u[:, 2] * shift * 2], 1),
                         torch.stack([sin, cos, u[:, 3] * shift * 2], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    # Pad with the image's own background (its min), not zero, since inputs are normalized.
    bg = x.amin(dim=(1, 2, 3), keepdim=True)
    return F.grid_sample(x - bg, grid, align_corners=False, padding_mode="zeros") + bg


class _MTLStep(nn.Module):
    """Backbone, head table and logit scale as one module: the unit DDP wraps.

    Its forward is one training step's loss, so DDP sees one forward per backward however
    many chunks the backbone runs in.
    """

    def __init__(self, trainer: "MTLTrainer"):
        super().__init__()
        self.backbone = trainer.backbone
        self.head = trainer.head
        if trainer.config.learn_scale:
            self.log_scale = trainer.log_scale
        self._trainer = [trainer]          # a list: not registered as a submodule

    def forward(self, x, task_classes, sample_task, labels, n_tasks):
        tr = self._trainer[0]
        with _nvtx("mtl/backbone"):
            z = tr._features(x, n_tasks)
        if tr.config.normalize_features:
            z = F.normalize(z, dim=1)
        with _nvtx("mtl/heads"):
            zs, w = tr._head_inputs(z)
            loss = multihead_ce(zs, w, task_classes, sample_task, labels,
                                backend=tr.config.backend)
        return loss, zs, w


class MTLTrainer:
    """Trains a backbone with per-class heads, the paper's multi-task learner.

    ``MTLTrainer(backbone, config).fit(train, val=None, resume=None)`` returns the history
    (one dict per epoch). ``trainer.backbone`` is then ready for :func:`fastmtl.evaluate`.

    Under a distributed launch (``torchrun``; see :mod:`fastmtl.distributed`) the trainer
    joins the process group itself and trains data-parallel: ``tasks_per_step`` must be
    divisible by the world size; rank 0 alone shows progress and writes checkpoints.
    The backbone's dtype is used for images and head (float64 works, for exact tests).
    """

    def __init__(self, backbone: nn.Module, config: MTLConfig | None = None,
                 device: torch.device | str | None = None):
        self.config = config or MTLConfig()
        self.config.validate()
        _dist.init_from_env()
        self.device = torch.device(device) if device is not None else _dist.default_device()
        self.backbone = backbone.to(self.device)
        self.head: torch.Tensor | None = None
        self.history: list[dict[str, Any]] = []

    # -- public ---------------------------------------------------------------------------
    def fit(self, train: FewShotDataset, val: FewShotDataset | None = None,
            resume: str | None = None, progress: bool = True) -> list[dict[str, Any]]:
        cfg = self.config
        if not isinstance(train, FewShotDataset):
            raise ValueError(f"train must be a FewShotDataset, got {type(train).__name__}")
        if cfg.n_way > train.n_classes:
            raise ValueError(f"n_way={cfg.n_way} is larger than the number of training classes "
                             f"({train.n_classes})")
        smallest = int(train.class_sizes().min())
        if cfg.images_per_class > smallest:
            raise ValueError(f"images_per_class={cfg.images_per_class} is larger than the "
                             f"smallest training class ({smallest} images)")
        _check_val(val, cfg)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(cfg.seed)
            return self._fit(train, val, resume, progress)

    def state_dict(self) -> dict[str, Any]:
        return {"backbone": self.backbone.state_dict(), "head": self.head,
                "config": dataclasses.asdict(self.config), "history": self.history}

    # -- internals ------------------------------------------------------------------------
    def _chunking(self) -> str:
        if self.config.chunking != "auto":
            return self.config.chunking
        return "batch" if self.device.type == "cuda" else "task"

    def _init_head(self, n_classes: int, dim: int, gen: torch.Generator) -> torch.Tensor:
        # Kaiming-uniform for a (C, d) linear layer, scaled by sqrt(C / n) as the official
        # code does (its head is a C-way layer of which each task uses n rows). A cosine
        # head only uses the rows' directions.
        bound = 1.0 / math.sqrt(dim) * math.sqrt(n_classes / self.config.n_way)
        if self.config.head == "cosine":
            # Small rows: an Adam step (~lr per entry) then turns a row's direction within
            # a few updates, instead of the thousands a row of the paper's size needs when
            # each class is drawn in only a few percent of the steps.
            bound = 1e-3
        w = (torch.rand(n_classes, dim, generator=gen, dtype=torch.float32) * 2 - 1) * bound
        return nn.Parameter(w.to(device=self.device, dtype=self._dtype()))

    def _dtype(self) -> torch.dtype:
        return next(self.backbone.parameters()).dtype

    def _head_inputs(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features times the logit scale, and the head rows, as the head op takes them."""
        w = F.normalize(self.head, dim=1) if self.config.head == "cosine" else self.head
        if self.config.learn_scale:
            return z * self.log_scale.exp(), w
        return (z * self.config.scale if self.config.scale != 1.0 else z), w

    def _features(self, x: torch.Tensor, n_tasks: int) -> torch.Tensor:
        if self._chunking() == "task":
            return torch.cat([self.backbone(c) for c in x.chunk(n_tasks)])
        return self.backbone(x)

    def _fit(self, train, val, resume, progress):
        cfg = self.config
        T, n, k = cfg.tasks_per_step, cfg.n_way, cfg.images_per_class
        offset, T_local = _dist.shard(T, "tasks_per_step")
        main = _dist.is_main()
        progress = progress and main
        gen = torch.Generator().manual_seed(cfg.seed)
        dim = feature_dim(self.backbone, train.image_shape)
        self.head = self._init_head(train.n_classes, dim, gen)
        self.log_scale = nn.Parameter(
            torch.tensor(math.log(cfg.scale), device=self.device, dtype=self._dtype()),
            requires_grad=cfg.learn_scale)
        params = list(self.backbone.parameters()) + [self.head]
        if cfg.learn_scale:
            params.append(self.log_scale)
        model = _dist.wrap(_MTLStep(self), self.device)
        bn_sync = _dist.RunningStatsSync(self.backbone)
        opt = torch.optim.RAdam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="max" if val is not None else "min", factor=cfg.plateau_factor,
            patience=cfg.plateau_patience)
        start_epoch, best = 0, {"score": -math.inf, "epoch": -1, "state": None}
        self.history = []
        if resume is not None:
            start_epoch, best = self._load(resume, opt, sched)

        steps = max(1, cfg.tasks_per_epoch // T)
        sample_task = torch.arange(T_local, device=self.device).repeat_interleave(n * k)
        labels = torch.arange(n, device=self.device).repeat_interleave(k).repeat(T_local)
        rows = slice(offset * n * k, (offset + T_local) * n * k)   # this rank's images
        updates = T_local if self._chunking() == "task" else 1     # BatchNorm forwards a step
        t0 = time.perf_counter() - (self.history[-1]["elapsed_s"] if self.history else 0.0)
        stale = 0 if not self.history else self.history[-1]["epoch"] - best["epoch"]
        for epoch in range(start_epoch, cfg.epochs):
            # Every random stream restarts from (seed, epoch): a resumed run repeats an
            # uninterrupted one exactly (episodes are already a function of their number).
            gen.manual_seed(_epoch_seed(cfg.seed, epoch))
            torch.manual_seed(_epoch_seed(cfg.seed, epoch))
            self.backbone.train()
            losses, accs = [], []
            loader = EpisodeLoader(train, n, k, 0, T_local, cfg.seed,
                                   start=epoch * steps * T + offset, stride=T,
                                   device=self.device, batches=steps)
            bar = tqdm(loader, total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                       disable=not progress)
            out_of_time = False
            try:
                for batch in bar:
                    x = batch.images.flatten(0, 2).to(self._dtype())
                    if cfg.augment:
                        x = _random_affine(x, torch.rand(T * n * k, 4, generator=gen)[rows])
                    bn_sync.snapshot()
                    loss, zs, w = model(x, batch.classes, sample_task, labels, T_local)
                    with _nvtx("mtl/backward"):
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        if cfg.grad_clip is not None:
                            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                        opt.step()
                    bn_sync.merge(updates)
                    with torch.no_grad():
                        heads = w[batch.classes]                                 # (T, n, d)
                        logits = torch.bmm(zs.view(T_local, n * k, -1), heads.transpose(1, 2))
                        acc = (logits.argmax(-1).view(-1) == labels).float().mean().item()
                    late = (cfg.max_minutes is not None
                            and time.perf_counter() - t0 > 60 * cfg.max_minutes)
                    # One small all-reduce: every rank logs the global figures and all stop
                    # together when any rank's clock runs out.
                    loss_v, acc_v, late_v = _dist.average([loss.item(), acc, float(late)])
                    losses.append(loss_v)
                    accs.append(acc_v)
                    bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
                    if late_v > 0:
                        out_of_time = True
                        break
                if not losses:
                    break
                record = {"epoch": epoch + 1, "steps": len(losses),
                          "train_loss": float(np.mean(losses)),
                          "train_acc": 100.0 * float(np.mean(accs)),
                          "lr": opt.param_groups[0]["lr"], "scale": float(self.log_scale.exp())}
                if val is not None:
                    # Validation is the test protocol itself (split across ranks); imported
                    # here because evaluate sits above the trainers and never imports them.
                    from .evaluate import evaluate
                    res = evaluate(self.backbone, val, n_way=cfg.val_ways, k_shot=cfg.val_shots,
                                   n_query=cfg.val_queries, episodes=cfg.val_episodes,
                                   seed=cfg.seed, device=self.device, progress=False)
                    record.update(val_acc=res["mean"], val_ci95=res["ci95"])
                    score = res["mean"]
                    sched.step(score)
                else:
                    score = -record["train_loss"]
                    sched.step(record["train_loss"])
            except Exception as exc:
                if _dist.is_distributed() and _dist.is_comm_failure(exc):
                    raise _dist.as_distributed_error(
                        exc, f"training (epoch {epoch + 1})", cfg.checkpoint_dir) from exc
                raise
            record["elapsed_s"] = time.perf_counter() - t0
            self.history.append(record)
            if score > best["score"]:
                best = {"score": score, "epoch": epoch + 1,
                        "state": copy.deepcopy((self.backbone.state_dict(), self.head.detach().clone()))}
                stale = 0
            else:
                stale += 1
            if progress:
                tqdm.write(_format_record(record))
            if main:
                self._save(epoch + 1, opt, sched, best)
            if cfg.early_stop_patience is not None and stale >= cfg.early_stop_patience:
                break
            if out_of_time:
                break
        if val is not None and best["state"] is not None:
            self.backbone.load_state_dict(best["state"][0])
            with torch.no_grad():
                self.head.copy_(best["state"][1])
        self.best_epoch = best["epoch"]
        return self.history

    def _save(self, epoch, opt, sched, best):
        directory = self.config.checkpoint_dir
        if directory is None:
            return
        os.makedirs(directory, exist_ok=True)
        state = {"epoch": epoch, "backbone": self.backbone.state_dict(),
                 "head": self.head.detach().cpu(), "log_scale": self.log_scale.detach().cpu(),
                 "optimizer": opt.state_dict(),
                 "scheduler": sched.state_dict(), "history": self.history,
                 "config": dataclasses.asdict(self.config),
                 "best": {"score": best["score"], "epoch": best["epoch"]},
                 "best_state": best["state"],
                 "backbone_spec": getattr(self.backbone, "spec", None)}
        tmp = os.path.join(directory, "last.pt.tmp")
        torch.save(state, tmp)
        os.replace(tmp, os.path.join(directory, "last.pt"))
        if best["epoch"] == epoch:
            torch.save({k: state[k] for k in ("backbone", "head", "config", "backbone_spec",
                                              "epoch", "history")},
                       os.path.join(directory, "best.pt"))
        with open(os.path.join(directory, "history.json"), "w") as f:
            json.dump(self.history, f, indent=1)

    def _load(self, path, opt, sched):
        if not os.path.exists(path):
            raise ValueError(f"resume checkpoint {path!r} does not exist")
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.backbone.load_state_dict(state["backbone"])
        with torch.no_grad():
            self.head.copy_(state["head"].to(self.device))
            self.log_scale.copy_(state["log_scale"].to(self.device))
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        self.history = list(state["history"])
        best = dict(state["best"], state=state.get("best_state"))
        return state["epoch"], best


def _check_val(val, cfg) -> None:
    """A validation set must hold the episodes ``cfg.val_*`` describe (None: no validation)."""
    if val is None:
        return
    if not isinstance(val, FewShotDataset):
        raise ValueError(f"val must be a FewShotDataset or None, got {type(val).__name__}")
    if cfg.val_ways > val.n_classes:
        raise ValueError(f"val_ways={cfg.val_ways} is larger than the number of "
                         f"validation classes ({val.n_classes})")
    need, small = cfg.val_shots + cfg.val_queries, int(val.class_sizes().min())
    if need > small:
        raise ValueError(f"val_shots + val_queries = {need} is larger than the smallest "
                         f"validation class ({small} images)")


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919 + 1) % (2**63)


def _format_record(r: dict[str, Any]) -> str:
    s = (f"epoch {r['epoch']:3d}  loss {r['train_loss']:.4f}  train acc {r['train_acc']:.1f}%  "
         f"lr {r['lr']:.1e}  {r['elapsed_s']:.0f}s")
    if "val_acc" in r:
        s += f"  val {r['val_acc']:.2f}±{r['val_ci95']:.2f}%"
    return s


class _nvtx:
    """An NVTX range on CUDA (visible in Nsight Systems); free on CPU."""

    def __init__(self, name: str):
        self.name = name
        self.on = torch.cuda.is_available()

    def __enter__(self):
        if self.on:
            torch.cuda.nvtx.range_push(self.name)

    def __exit__(self, *exc):
        if self.on:
            torch.cuda.nvtx.range_pop()
