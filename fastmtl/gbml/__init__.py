"""Gradient-based and metric meta-learning baselines, vectorized with ``torch.func``.

MAML and first-order MAML (:class:`MAML`, ``MAMLConfig(first_order=True)``), ANIL
(:class:`ANIL`), MetaOptNet-style R2-D2 (:class:`R2D2`) and Prototypical Networks
(:class:`ProtoNet`). Vectorized, a meta-batch is one computation: where the tasks share
the backbone (ANIL, ProtoNet, R2D2) it runs once for all of them, stacked, each task
with its own BatchNorm statistics; MAML on a Conv-4 runs every task's own weights side by
side as channel groups of one network (grouped convolutions, one fused BatchNorm); on
other backbones a task is a pure function of the weights (``torch.func.functional_call``,
inner steps with ``torch.func.grad``) and ``torch.func.vmap`` runs it over all tasks.
``config.vectorize=False`` runs the same math as a per-task loop, and ``None`` (the
default) picks the form measured faster for the method and device
(:meth:`MAML.vectorized`). Every trainer has the shape of :class:`fastmtl.MTLTrainer`::

    trainer = fastmtl.gbml.MAML(fastmtl.models.conv4(), fastmtl.gbml.MAMLConfig())
    history = trainer.fit(train, val)                 # checkpoints, tqdm, exact resume
    trainer.evaluate(test, n_way=5, k_shot=1)         # the method's own test-time adaptation
    fastmtl.evaluate(trainer.backbone, test)          # the logistic-regression protocol

BatchNorm convention: the trainer replaces every BatchNorm of the backbone it is given
(in place) by a batch-statistics-only normalization (:func:`use_batch_stats`). In
training, each task is normalized with its own batch statistics (MAML and ANIL: support
and query sets separately, as the MAML reference code; ProtoNet and R2D2: a task's
images together); no running statistics exist, so no state passes between tasks, and
evaluation normalizes with batch statistics too (transductive BatchNorm, as the MAML
reference code does): per test episode in ``trainer.evaluate``, per embedding batch in
:func:`fastmtl.evaluate`. To reload a checkpoint's ``backbone`` state into a fresh
backbone, call :func:`use_batch_stats` on it first.
"""
from __future__ import annotations

from ._common import (
    freeze_at,
    freeze_batch_stats,
    frozen_statistics,
    has_batch_stats,
    use_batch_stats,
)
from .anil import ANIL, ANILConfig
from .maml import MAML, MAMLConfig
from .protonet import ProtoNet, ProtoNetConfig, prototype_logits
from .r2d2 import R2D2, R2D2Config, ridge_regression

__all__ = ["MAML", "MAMLConfig", "ANIL", "ANILConfig", "R2D2", "R2D2Config", "ProtoNet",
           "ProtoNetConfig", "prototype_logits", "ridge_regression",
           "use_batch_stats", "freeze_batch_stats", "has_batch_stats", "frozen_statistics",
           "freeze_at"]
