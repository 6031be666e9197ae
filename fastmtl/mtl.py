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

import dataclasses
import math
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import checks
from . import distributed as _dist
from .config import TrainerConfig, setting
from .data.base import FewShotDataset
from .evaluate import evaluate
from .models import feature_dim
from .ops import multihead_ce
from .sampling import EpisodeLoader, assemble, check_fits
from .training import Trainer, backbone_autocast, check_val, epoch_seed, phase

__all__ = ["MTLConfig", "MTLTrainer", "MTLLearner", "RECIPES"]

# Named MTL recipes: changes from MTLConfig's defaults (which are the paper's own).
# "fast" won the ablation on the validation alphabet of Omniglot (README, "MTL recipe"):
# every step is one task over the whole head table, so every class row learns every step;
# the learning rate follows a cosine over the run (over the time budget when there is one):
# ReduceLROnPlateau on a noisy validation score cut it to 1e-7 within 4 minutes of 7-second
# epochs, and on the validation alphabet the two schedules were within noise at 5 minutes.
# The MLP projector (512 hidden, 128 out) lifted the validation plateau: after 300 s
# 92.9 / 97.3 and 92.3 / 96.7 against the recipe without it 89.2 / 95.6 and 90.9 / 96.1
# (seeds 0 and 1, 1,000 episodes; README, ablation round 6). Adam, not the paper's RAdam,
# with a 50-step linear warm-up (round 7): RAdam's rectification scales its step by about
# 0.2 at step 100, 0.3 at step 200 and 0.65 at step 1,000 (beta2 0.999), a built-in warm-up
# that held the first minute back: on the validation alphabet at 15 / 30 / 60 s (cosine
# over 10 minutes) 77.9 / 85.7 / 90.3 (1-shot) with RAdam, 87.8 / 90.4 / 92.7 with Adam.
# 64 images a step, not 128 (round 8): a step takes about half as long on a 2-core CPU, so
# twice the updates in the first seconds; on the validation alphabet at 15 / 30 s 88.7 /
# 91.1 (1-shot) against 87.2 / 90.0, level from 60 s on (94.9 / 97.7 at 300 s).
# Progressive resizing (round 10): the first 6.7% of the run (40 s of 10 minutes) on 24 x 24
# images, 1.2-1.5x the steps a second at about 0.75x a step's FLOPs; on the validation
# alphabet at 30 s +1.0 / +0.4 points over the full-size recipe (mean of 6 seed pairs, 1-shot
# ahead in all 6, 5-shot in 5), level from 60 s on.
# Adam 2e-3 with a 100-step warm-up, not 1e-3 with 50 (round 11, with the small images): on
# the validation alphabet +0.6 / +0.5 / +0.3 points 1-shot at 15 / 30 / 45 s (mean of 3 seeds),
# 5-shot level, and level at 300 and 600 s (95.3 / 97.7 both, seed 0).
RECIPES: dict[str, dict[str, Any]] = {
    "paper": {},
    "fast": dict(task_sampling="all_classes", batch_size=64, head="cosine", scale=10.0,
                 augment=True, lr_schedule="cosine", projector=512, projector_dim=128,
                 optimizer="adam", lr=2e-3, warmup_steps=100, small_images=0.86,
                 small_images_fraction=0.067),
}


@dataclass
class MTLConfig(TrainerConfig):
    """Settings of :class:`MTLTrainer`; defaults follow the paper's official code.

    The shared fields (epochs, validation, budget, precision, seed, checkpoints) are those
    of :class:`fastmtl.config.TrainerConfig`; each field's help is its metadata
    (``fastmtl.config.field_help``), which ``fastmtl train --help`` prints.

    Args:
        every field below, by keyword; each one's help is its metadata
        (``fastmtl.config.field_help(MTLConfig, name)``), and ``fastmtl train --help`` lists
        them all with their defaults.

    Raises:
        ValueError: from :meth:`validate` (the trainer calls it), naming the field.

    Example:
        >>> MTLConfig(n_way=20, tasks_per_step=2).images_per_class
        10
    """

    n_way: int = setting(5, "classes per training task (episodic task sampling)")
    images_per_class: int = setting(10, "images of each class in a task (all used for "
                                        "training)")
    tasks_per_step: int = setting(16, "tasks per optimizer step, all in one fused head call")
    task_sampling: str = setting(
        "episodic", "episodic (the paper: n_way-way tasks of images_per_class images a class, "
                    "each with its own head rows) or all_classes (every step is one task "
                    "over all training classes: batch_size random images and the whole head "
                    "table, i.e. plain supervised pre-training as RFS does; an epoch is one "
                    "pass over the images)")
    batch_size: int = setting(256, "images per step with task_sampling all_classes")
    optimizer: str = setting("radam", "radam (the paper), adam or sgd (Nesterov momentum 0.9)")
    head_lr_scale: float = setting(1.0, "the head table's learning rate is lr times this")
    lr: float = setting(1e-3, "learning rate of the optimizer (the paper: 1e-3)")
    plateau_patience: int = setting(
        4, "epochs without improvement before ReduceLROnPlateau cuts the learning rate "
           "(on validation accuracy, or on the training loss without a validation set)")
    plateau_factor: float = setting(0.1, "factor ReduceLROnPlateau multiplies the learning "
                                         "rate by")
    lr_schedule: str = setting(
        "plateau", "plateau (the paper: ReduceLROnPlateau) or cosine (every step, lr * (1 + "
                   "cos(pi f)) / 2 with f the fraction of the run done: the training clock "
                   "over max_minutes or the steps over the epochs' steps, whichever is "
                   "further; time-driven, so a run repeats only as closely as the machine's "
                   "speed does)")
    warmup_steps: int = setting(0, "with lr_schedule cosine, the learning rate rises linearly "
                                   "over this many first steps")
    normalize_features: bool = setting(True, "L2-normalize features before the head in "
                                             "training (the paper: on for all data sets but "
                                             "FC100)")
    head: str = setting(
        "linear", "linear (the paper: plain class rows, Kaiming-uniform init scaled by "
                  "sqrt(C / n)) or cosine (rows L2-normalized before use, so every logit is "
                  "scale * cos(z, w))")
    scale: float = setting(1.0, "logit scale (inverse temperature), multiplies the features "
                                "before the head")
    learn_scale: bool = setting(False, "make scale a trained parameter (log-parameterized)")
    projector: int = setting(
        0, "hidden width of an MLP projector between the backbone and the head (Linear - "
           "BatchNorm - ReLU - Linear), trained with them and dropped at test time, so the "
           "few-shot features are the backbone's, one layer before the ones the head table "
           "pulls together; 0: none (the paper)")
    projector_dim: int = setting(128, "output width of the projector: the head rows' "
                                      "dimension (with projector > 0)")
    augment: bool = setting(False, "random affine jitter of training images (rotation, "
                                   "scale, shift)")
    augment_strength: float = setting(1.0, "multiplies the jitter's ranges (1: up to 10 "
                                           "degrees, 10% scale, 10% shift)")
    small_images: float = setting(
        1.0, "progressive resizing: the side of the training images over the first "
             "small_images_fraction of the run, as a fraction of their own (0.86: 24 of 28 "
             "pixels, rounded; where the backbone's feature size would change, the nearest "
             "larger side that keeps it, e.g. 80 of 84 for Conv-4); the augmentation samples "
             "them at that size (a bilinear resize without it), so a step costs about its "
             "square of the full-size convolutions while the features form; test images keep "
             "their size; 1: full size throughout (the paper)")
    small_images_fraction: float = setting(
        0.067, "with small_images, the fraction of the run trained on small images (the "
             "cosine schedule's fraction: the clock over max_minutes or the steps over the "
             "epochs' steps)")
    chunking: str = setting("auto", "auto, task or batch: the backbone's BatchNorm batches in "
                                    "training (see the module docstring)")
    backend: str | None = setting(None, "multihead_ce backend (None: fastest for the device)")

    @classmethod
    def from_recipe(cls, recipe: str = "fast", **overrides: Any) -> MTLConfig:
        """The config of a named recipe (:data:`RECIPES`) with ``overrides``.

        Raises:
            ValueError: an unknown recipe or field.

        Example:
            >>> MTLConfig.from_recipe("paper").head
            'linear'
        """
        if recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {sorted(RECIPES)}, got {recipe!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"unknown MTLConfig field(s) {unknown}")
        cfg = cls(**dict(RECIPES[recipe], **overrides))
        # A recipe value that the overrides leave without effect (its lr_schedule changed,
        # say) goes back to the default: only what the caller set is checked for effect.
        inert = {name for name, _ in cfg.inert_fields()} - set(overrides)
        reset: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(cls)
                 if f.name in inert and f.name in RECIPES[recipe]}
        return dataclasses.replace(cfg, **reset) if reset else cfg

    def inert_fields(self) -> list[tuple[str, str]]:
        """Fields without effect under the other settings (see
        :meth:`fastmtl.config.TrainerConfig.inert_fields`)."""
        out: list[tuple[str, str]] = []
        if self.task_sampling == "all_classes":
            # one task a step: "task" and "batch" chunking are the same batch
            out += [(n, "task_sampling='all_classes'") for n in
                    ("n_way", "images_per_class", "tasks_per_step", "tasks_per_epoch",
                     "chunking")]
        else:
            out.append(("batch_size", f"task_sampling={self.task_sampling!r}"))
        if self.lr_schedule == "plateau":
            out.append(("warmup_steps", "lr_schedule='plateau'"))
        else:
            out += [(n, f"lr_schedule={self.lr_schedule!r}")
                    for n in ("plateau_patience", "plateau_factor")]
        if not self.projector:
            out.append(("projector_dim", "projector=0"))
        if not self.augment:
            out.append(("augment_strength", "augment=False"))
        if self.small_images >= 1:
            out.append(("small_images_fraction", f"small_images={self.small_images!r}"))
        return out

    def task_needs(self) -> tuple[int, int]:
        """(classes, images a class) a training task draws: all_classes, one image."""
        if self.task_sampling == "all_classes":
            return 1, 1
        return self.n_way, self.images_per_class

    def validate(self) -> None:
        """Raise ValueError naming the first field out of range, or set where it has no
        effect (:meth:`inert_fields`), before any work."""
        super().validate()
        for name in ("images_per_class", "tasks_per_step", "batch_size"):
            checks.integer(name, getattr(self, name), 1)
        checks.integer("plateau_patience", self.plateau_patience, 0)
        checks.integer("warmup_steps", self.warmup_steps, 0)
        checks.integer("projector", self.projector, 0)
        checks.integer("projector_dim", self.projector_dim, 1)
        for name in ("small_images", "small_images_fraction"):
            if checks.number(name, getattr(self, name)) > 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)!r}")
        checks.one_of("lr_schedule", self.lr_schedule, ("plateau", "cosine"))
        if not 0 < self.plateau_factor < 1:
            raise ValueError(f"plateau_factor must be in (0, 1), got {self.plateau_factor!r}")
        if self.task_sampling == "episodic" and self.tasks_per_epoch < self.tasks_per_step:
            raise ValueError(f"tasks_per_epoch ({self.tasks_per_epoch}) is smaller than "
                             f"tasks_per_step ({self.tasks_per_step}): an epoch needs a step")
        checks.one_of("head", self.head, ("linear", "cosine"))
        checks.one_of("chunking", self.chunking, ("auto", "task", "batch"))
        checks.one_of("task_sampling", self.task_sampling, ("episodic", "all_classes"))
        checks.one_of("optimizer", self.optimizer, ("radam", "adam", "sgd"))
        for name in ("lr", "head_lr_scale", "scale", "augment_strength"):
            checks.number(name, getattr(self, name))


def _random_affine(x: torch.Tensor, u: torch.Tensor, rotate: float = 10.0, scale: float = 0.1,
                   shift: float = 0.1, size: int | None = None) -> torch.Tensor:
    """Per-image random rotation (degrees), isotropic scale and shift (fraction of size).

    ``u`` (B, 4) uniform in [0, 1), one row per image: drawn for the whole step and sliced,
    so a rank's images get the numbers one process would give them. ``size``: the output's
    side (the same view sampled at ``size`` x ``size``; None: the input's).
    """
    u = u.to(x.device) * 2 - 1
    angle = u[:, 0] * math.radians(rotate)
    s = 1 + u[:, 1] * scale
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    theta = torch.stack([torch.stack([cos, -sin, u[:, 2] * shift * 2], 1),
                         torch.stack([sin, cos, u[:, 3] * shift * 2], 1)], 1)
    shape = list(x.shape) if size is None else [*x.shape[:2], size, size]
    grid = F.affine_grid(theta.to(x.dtype), shape, align_corners=False)
    # Pad with the image's own background (its min), not zero, since inputs are normalized.
    bg = x.amin(dim=(1, 2, 3), keepdim=True)
    return F.grid_sample(x - bg, grid, align_corners=False, padding_mode="zeros") + bg


class MTLLearner(nn.Module):
    """The multi-task learner as one module: backbone, per-class head table, logit scale,
    and with ``config.projector`` an MLP projector between backbone and head (``.projector``,
    trained with them; evaluation uses the backbone alone).

    Its ``state_dict()`` is the model part of an MTL checkpoint, and its forward is one
    training step's loss, so ``DistributedDataParallel`` sees one forward per backward
    however many chunks the backbone runs in.

    Args:
        backbone: the feature extractor.
        n_classes: rows of the head table (training classes).
        dim: feature dimension.
        config: the :class:`MTLConfig` (head kind, scale, normalization, chunking, backend).
        chunking: "task" or "batch" (resolved from ``config.chunking`` by the trainer).
        generator: seeds the head table's initialization.

    Example:
        >>> import torch
        >>> from fastmtl.models import conv4
        >>> learner = MTLLearner(conv4(hidden=8), n_classes=10, dim=64,
        ...                      config=MTLConfig(head="cosine", scale=10.0), chunking="batch",
        ...                      generator=torch.Generator().manual_seed(0))
        >>> tuple(learner.head.shape), sorted(learner.state_dict())[-2:]
        ((10, 64), ['head', 'log_scale'])
    """

    def __init__(self, backbone: nn.Module, n_classes: int, dim: int, config: MTLConfig,
                 chunking: str, generator: torch.Generator):
        super().__init__()
        self.backbone = backbone
        self.config, self.chunking = config, chunking
        p = next(backbone.parameters())
        self.projector: nn.Sequential | None = None
        if config.projector:
            self.projector = _projector(dim, config.projector, config.projector_dim, generator)
            self.projector.to(device=p.device, dtype=p.dtype)
            dim = config.projector_dim
        self.head = self._init_head(n_classes, dim, generator, p.device, p.dtype)
        self.log_scale = nn.Parameter(
            torch.tensor(math.log(config.scale), device=p.device, dtype=p.dtype),
            requires_grad=config.learn_scale)

    def _init_head(self, n_classes: int, dim: int, gen: torch.Generator, device: torch.device,
                   dtype: torch.dtype) -> nn.Parameter:
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
        return nn.Parameter(w.to(device=device, dtype=dtype))

    def features(self, x: torch.Tensor, n_tasks: int) -> torch.Tensor:
        """The features the head sees (the backbone's, projected where there is a
        projector) of a step's images, per task chunk or as one batch."""
        if self.chunking == "task":
            return torch.cat([self._embed(c) for c in x.chunk(n_tasks)])
        return self._embed(x)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        z = self.backbone(x)
        return z if self.projector is None else self.projector(z)

    def head_inputs(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features times the logit scale, and the head rows, as the head op takes them."""
        w = F.normalize(self.head, dim=1) if self.config.head == "cosine" else self.head
        if self.config.learn_scale:
            return z * self.log_scale.exp(), w
        return (z * self.config.scale if self.config.scale != 1.0 else z), w

    def forward(self, x: torch.Tensor, task_classes: torch.Tensor, sample_task: torch.Tensor,
                labels: torch.Tensor,
                n_tasks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One step's loss, and the scaled features and head rows it came from."""
        with phase("backbone"), backbone_autocast(self.config.precision, x.device):
            z = self.features(x, n_tasks)
        z = z.to(self.head.dtype)           # heads and losses in the learner's precision
        if self.config.normalize_features:
            z = F.normalize(z, dim=1)
        with phase("heads"):
            zs, w = self.head_inputs(z)
            loss = multihead_ce(zs, w, task_classes, sample_task, labels,
                                backend=self.config.backend)
        return loss, zs, w


def _projector(dim: int, hidden: int, out: int, gen: torch.Generator) -> nn.Sequential:
    """Linear - BatchNorm - ReLU - Linear, initialized as nn.Linear is, from ``gen``."""
    first, last = nn.Linear(dim, hidden), nn.Linear(hidden, out)
    net = nn.Sequential(first, nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), last)
    with torch.no_grad():
        for layer in (first, last):
            nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=gen)
            bound = 1.0 / math.sqrt(layer.in_features)
            nn.init.uniform_(layer.bias, -bound, bound, generator=gen)
    return net


class MTLTrainer(Trainer):
    """Trains a backbone with per-class heads, the paper's multi-task learner.

    ``MTLTrainer(backbone, config).fit(train, val=None, resume=None)`` returns the history
    (one dict per epoch). ``trainer.backbone`` is then ready for :func:`fastmtl.evaluate`.

    Under a distributed launch (``torchrun``; see :mod:`fastmtl.distributed`) the trainer
    joins the process group itself and trains data-parallel: ``tasks_per_step`` must be
    divisible by the world size; rank 0 alone shows progress and writes checkpoints.
    The backbone's dtype is used for images and head (float64 works, for exact tests).

    Args:
        backbone: the feature extractor to train, (B, C, H, W) images to (B, d) features.
        config: the settings (default ``MTLConfig()``, the paper's; see
            :meth:`MTLConfig.from_recipe` for the fast recipe).
        device: where to train (None: this rank's CUDA device if there is one, else CPU).

    Raises:
        ValueError: a backbone that is not an ``nn.Module``, or invalid settings.

    Example:
        >>> import fastmtl
        >>> data = fastmtl.data.SyntheticGlyphs(12, 8, seed=0)
        >>> cfg = fastmtl.MTLConfig(tasks_per_step=2, tasks_per_epoch=2, epochs=1,
        ...                         images_per_class=4)
        >>> history = fastmtl.MTLTrainer(fastmtl.models.conv4(hidden=8), cfg).fit(
        ...     data, progress=False)
    """

    method = "mtl"
    batchnorm = "running"
    config: MTLConfig
    learner: MTLLearner | None

    def __init__(self, backbone: nn.Module, config: MTLConfig | None = None,
                 device: torch.device | str | None = None):
        if not isinstance(backbone, nn.Module):
            raise ValueError(f"backbone must be an nn.Module, got {type(backbone).__name__}")
        self.config = config or MTLConfig()
        self.config.validate()
        _dist.check_joined()
        self.device = torch.device(device) if device is not None else _dist.default_device()
        self.backbone = backbone.to(self.device)
        self.learner = None
        self.history = []
        self.best_epoch = -1
        # steps taken on small images (config.small_images), over every fit of this
        # trainer: their FLOPs differ from a full-size step's (fastmtl.compare counts both)
        self.small_image_steps = 0

    @property
    def head(self) -> torch.Tensor | None:
        """The per-class head table (C, d), once ``fit`` has built it."""
        return None if self.learner is None else self.learner.head

    def evaluate(self, dataset: FewShotDataset, n_way: int = 5, k_shot: int = 1, n_query: int = 15,
                 episodes: int = 600, seed: int = 0, progress: bool = True) -> dict[str, Any]:
        """The paper's test protocol on the trained backbone: a logistic-regression head
        fitted per seeded episode (:func:`fastmtl.evaluate`, which this calls).

        Returns:
            :func:`fastmtl.evaluate`'s dict (``mean`` and ``ci95`` in percent, ...), plus
            ``protocol``: ``"logistic"``.

        Raises:
            ValueError: a bad data set or episode setting.

        Example:
            >>> import fastmtl
            >>> trainer = fastmtl.MTLTrainer(fastmtl.models.conv4(hidden=8))
            >>> test = fastmtl.data.SyntheticGlyphs(6, 6, seed=1)
            >>> trainer.evaluate(test, n_way=5, n_query=2, episodes=4, progress=False)["protocol"]
            'logistic'
        """
        out = evaluate(self.backbone, dataset, n_way=n_way, k_shot=k_shot, n_query=n_query,
                       episodes=episodes, seed=seed, device=self.device, progress=progress)
        out["protocol"] = "logistic"
        return out

    def supports_ways(self, n_way: int) -> bool:
        """Any number of ways (a fresh head is fitted per episode).

        Example:
            >>> import fastmtl
            >>> fastmtl.MTLTrainer(fastmtl.models.conv4(hidden=8)).supports_ways(20)
            True
        """
        return n_way >= 2

    # -- the Trainer hooks ----------------------------------------------------------------
    def _chunking(self) -> str:
        if self.config.chunking != "auto":
            return self.config.chunking
        return "batch" if self.device.type == "cuda" else "task"

    def _dtype(self) -> torch.dtype:
        return next(self.backbone.parameters()).dtype

    def _built_learner(self) -> MTLLearner:
        assert self.learner is not None, "_setup builds the learner"
        return self.learner

    def _prepare_fit(self, train: FewShotDataset, val: FewShotDataset | None) -> None:
        cfg = self.config
        self._n_train = len(train)
        self._has_val = val is not None
        if cfg.task_sampling == "all_classes":
            if cfg.batch_size > len(train):
                raise ValueError(f"batch_size={cfg.batch_size} is larger than the training set "
                                 f"({len(train)} images)")
        else:
            check_fits(train.labels, cfg.n_way, cfg.images_per_class, need_name="images_per_class",
                       where="training ", class_names=train.class_names)
        check_val(val, cfg)
        self._small_side: int | None = None
        if cfg.small_images < 1:
            self._small_side = _small_side(self.backbone, train.image_shape, cfg.small_images)

    def _setup(self, train: FewShotDataset) -> None:
        cfg = self.config
        self._offset, self._T_local = _dist.shard(cfg.tasks_per_step, "tasks_per_step")
        self._gen = torch.Generator().manual_seed(cfg.seed)
        dim = feature_dim(self.backbone, train.image_shape)
        self.learner = MTLLearner(self.backbone, train.n_classes, dim, cfg, self._chunking(),
                                  self._gen)
        shared = list(self.backbone.parameters())
        if self.learner.projector is not None:
            shared += list(self.learner.projector.parameters())
        scale = [self.learner.log_scale] if cfg.learn_scale else []
        if cfg.head_lr_scale == 1.0:      # one group, as the paper's optimizer has it
            groups: list[dict[str, Any]] = [{"params": shared + [self.learner.head] + scale}]
        else:
            groups = [{"params": shared + scale},
                      {"params": [self.learner.head], "lr": cfg.lr * cfg.head_lr_scale}]
        self._model = _dist.wrap(self.learner, self.device)
        # The backbone's running statistics are what evaluation uses; the projector's (it
        # is dropped at test time) are left per rank.
        self._bn_sync = _dist.RunningStatsSync(self.backbone)
        self.optimizer = _make_optimizer(cfg, groups)
        self._plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="max" if self._has_val else "min", factor=cfg.plateau_factor,
            patience=cfg.plateau_patience)
        self.scheduler = self._plateau
        self._base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        if cfg.task_sampling == "all_classes":
            # One task over every class: the step's images share the whole head table.
            offset, B_local = _dist.shard(cfg.batch_size, "batch_size")
            self._T_local = 1
            self._sample_task = torch.zeros(B_local, dtype=torch.long, device=self.device)
            self._all_classes = torch.arange(train.n_classes, device=self.device)[None]
            self._rows = slice(offset, offset + B_local)
            self._images_per_step = cfg.batch_size
            return
        n, k, T_local = cfg.n_way, cfg.images_per_class, self._T_local
        self._sample_task = torch.arange(T_local, device=self.device).repeat_interleave(n * k)
        self._labels = torch.arange(n, device=self.device).repeat_interleave(k).repeat(T_local)
        self._rows = slice(self._offset * n * k, (self._offset + T_local) * n * k)
        self._images_per_step = cfg.tasks_per_step * n * k

    def _steps_per_epoch(self) -> int:
        if self.config.task_sampling == "all_classes":
            return max(1, self._n_train // self.config.batch_size)
        return max(1, self.config.tasks_per_epoch // self.config.tasks_per_step)

    def _epoch_batches(self, train: FewShotDataset, epoch: int, steps: int) -> Iterable[Any]:
        cfg = self.config
        self._gen.manual_seed(epoch_seed(cfg.seed, epoch))
        if cfg.task_sampling == "all_classes":
            order = torch.randperm(len(train), generator=self._gen).numpy()
            return _supervised_batches(train, order, cfg.batch_size, self._rows, steps,
                                       self.device)
        T = cfg.tasks_per_step
        return EpisodeLoader(train, cfg.n_way, cfg.images_per_class, 0, self._T_local, cfg.seed,
                             start=epoch * steps * T + self._offset, stride=T,
                             device=self.device, batches=steps)

    def _train_step(self, batch: Any) -> tuple[float, float, int]:
        cfg = self.config
        if cfg.task_sampling == "all_classes":
            x, labels = batch
            classes = self._all_classes
        else:
            x, labels, classes = batch.images.flatten(0, 2), self._labels, batch.classes
        x = x.to(self._dtype())
        size = None
        if self._small_side and self.run_fraction() < cfg.small_images_fraction:
            size = self._small_side
            self.small_image_steps += 1
        if cfg.augment:
            with phase("data"):
                u = torch.rand(self._images_per_step, 4, generator=self._gen)[self._rows]
                a = cfg.augment_strength
                x = _random_affine(x, u, rotate=10.0 * a, scale=0.1 * a, shift=0.1 * a,
                                   size=size)
        elif size is not None:
            with phase("data"):
                x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True,
                                  align_corners=False)
        self._bn_sync.snapshot()
        loss, zs, w = self._model(x, classes, self._sample_task, labels, self._T_local)
        with phase("backward"):
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        self._apply_gradients()
        # BatchNorm forwards a step: one per task chunk, or one for the batch.
        self._bn_sync.merge(self._T_local if self._built_learner().chunking == "task" else 1)
        with torch.no_grad():
            heads = w[classes]                                               # (T, n, d)
            logits = torch.bmm(zs.view(self._T_local, x.shape[0] // self._T_local, -1),
                               heads.transpose(1, 2))
            acc = (logits.argmax(-1).view(-1) == labels).float().mean().item()
        return loss.item(), acc, x.shape[0]

    def _validate(self, val: FewShotDataset) -> dict[str, Any]:
        # Validation is the test protocol itself (split across ranks).
        cfg = self.config
        return evaluate(self.backbone, val, n_way=cfg.val_ways, k_shot=cfg.val_shots,
                        n_query=cfg.val_queries, episodes=cfg.val_episodes, seed=cfg.seed,
                        device=self.device, progress=False)

    def _before_step(self) -> None:
        cfg = self.config
        if cfg.lr_schedule != "cosine":
            return
        factor = 0.5 * (1.0 + math.cos(math.pi * self.run_fraction()))
        run = getattr(self, "_progress_of", None)
        if run is not None and run[1].step < cfg.warmup_steps:
            factor *= (run[1].step + 1) / cfg.warmup_steps
        for group, lr in zip(self.optimizer.param_groups, self._base_lrs, strict=True):
            group["lr"] = lr * factor

    def _end_epoch(self, record: dict[str, Any], score: float, has_val: bool) -> None:
        if self.config.lr_schedule == "plateau":
            self._plateau.step(score if has_val else record["train_loss"])

    def _record_extra(self) -> dict[str, Any]:
        return {"scale": float(self._built_learner().log_scale.exp())}


def _small_side(backbone: nn.Module, image_shape: Sequence[int], fraction: float) -> int | None:
    """The side of the small training images: ``fraction`` of the images' side (rounded)
    or, where the backbone's features would then have another size (Conv-4 at 84 px:
    1,024-d at 72 px, 1,600-d at 84), the nearest larger side that keeps the full size's
    features (80 px there), so one head table fits both.
    None, with a warning, where no side below the images' does (Conv-4 at 16 px): the run
    trains at full size throughout. ValueError if ``fraction`` rounds to the full size or
    gives images too small for the backbone."""
    C, H, W = image_shape
    side = max(1, round(fraction * min(H, W)))
    if side >= min(H, W):
        raise ValueError(f"small_images={fraction:g} of the training images' side "
                         f"({min(H, W)} px) rounds to the full size: no smaller images")
    full = feature_dim(backbone, image_shape)
    keeps = next((s for s in range(side, min(H, W))
                  if _features_at(backbone, C, s) == full), None)
    if keeps is None:
        warnings.warn(f"small_images={fraction:g}: no side from {side} to {min(H, W) - 1} px "
                      f"gives the backbone's {full}-d features of {H}x{W} images; training "
                      f"at full size throughout", RuntimeWarning, stacklevel=3)
        return None
    if keeps != side and _features_at(backbone, C, side) is None:
        raise ValueError(f"small_images={fraction:g}: {side}x{side} images are too small for "
                         f"the backbone; the smallest side it takes with the full size's "
                         f"features is {keeps} px (small_images >= {keeps / min(H, W):.2f})")
    return keeps


def _features_at(backbone: nn.Module, channels: int, side: int) -> int | None:
    """The backbone's feature size on ``side`` x ``side`` images; None where it cannot take
    them (too small)."""
    try:
        return feature_dim(backbone, (channels, side, side))
    except (RuntimeError, ValueError):
        return None


def _make_optimizer(cfg: MTLConfig, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, nesterov=True,
                               weight_decay=cfg.weight_decay)
    kind = torch.optim.RAdam if cfg.optimizer == "radam" else torch.optim.Adam
    return kind(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _supervised_batches(train: FewShotDataset, order: np.ndarray, batch_size: int, rows: slice,
                        steps: int,
                        device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of ``batch_size`` images in ``order`` (this rank's ``rows`` of each), labels."""
    labels = torch.as_tensor(train.labels)
    for s in range(steps):
        index = order[s * batch_size:(s + 1) * batch_size][rows]
        x = assemble(train.images, index, mean=train.mean, std=train.std)
        yield x.to(device), labels[index].to(device)
