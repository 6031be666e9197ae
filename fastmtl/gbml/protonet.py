"""Prototypical Networks (Snell et al., NeurIPS 2017), batched over tasks.

A class's prototype is the mean of its support features; a query's logits are the
negative squared Euclidean distances to the prototypes. Features come from the backbone
under ``vmap``, one batch per task (support and queries together, per-task BatchNorm
statistics, as the paper's one-episode batches); prototypes and distances are batched
tensor ops over all tasks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import checks
from ..config import setting
from ._common import _check_episode, _EpisodicConfig, _FeatureHeadTrainer, _Learner

__all__ = ["ProtoNetConfig", "ProtoNet", "prototype_logits"]


def prototype_logits(z_support: torch.Tensor, y_support: torch.Tensor, z_query: torch.Tensor,
                     n_way: int) -> torch.Tensor:
    """Negative squared Euclidean distances from queries to class prototypes.

    Args:
        z_support: (T, S, d) support features; y_support: (T, S) labels in [0, n_way),
            every class present in every task.
        z_query: (T, Q, d) query features.

    Returns:
        logits (T, Q, n_way): ``-||z_query - prototype_c||^2``.

    Example:
        >>> import torch
        >>> zs = torch.tensor([[[0.0, 0.0], [4.0, 0.0]]])        # one task, 2-way 1-shot
        >>> prototype_logits(zs, torch.tensor([[0, 1]]), torch.tensor([[[1.0, 0.0]]]), 2)
        tensor([[[-1., -9.]]])
    """
    _check_episode(z_support, y_support, n_way, every_class=True)
    if not isinstance(z_query, torch.Tensor) or z_query.dim() != 3 or \
            z_query.shape[::2] != z_support.shape[::2]:
        raise ValueError(f"z_query must be (T, Q, d) to match z_support "
                         f"{tuple(z_support.shape)}, got {checks.describe(z_query)}")
    onehot = F.one_hot(y_support.long(), n_way).to(z_support.dtype)         # (T, S, n)
    protos = (onehot.transpose(1, 2) @ z_support) / onehot.sum(1).unsqueeze(-1)  # (T, n, d)
    # |q|^2 - 2 q.c + |c|^2 as one batched matmul, not a (T, Q, n, d) difference tensor.
    sq = (z_query * z_query).sum(-1, keepdim=True) + (protos * protos).sum(-1).unsqueeze(1)
    return -(sq - 2 * z_query @ protos.transpose(1, 2))


@dataclass
class ProtoNetConfig(_EpisodicConfig):
    """Settings of :class:`ProtoNet`; defaults: the paper's Omniglot training.

    The paper trains Omniglot with 60-way episodes of 5 queries per class, one episode per
    step, Adam 1e-3 halved every 2,000 episodes (mini-ImageNet: 30-way 1-shot or 20-way
    5-shot, 15 queries); the test episodes are 5- or 20-way. Training shot = test shot.

    Args:
        every field below, by keyword (``fastmtl train --method protonet --help`` lists
        them with their help and defaults).

    Example:
        >>> ProtoNetConfig().n_way, ProtoNetConfig(n_way=20, k_shot=5).k_shot
        (60, 5)
    """

    n_way: int = setting(60, None)
    n_query: int = setting(5, None)
    tasks_per_step: int = setting(1, None)
    tasks_per_epoch: int = setting(1000, None)
    epochs: int = setting(100, None)
    lr_decay_every: int | None = setting(2000, None)


class ProtoNet(_FeatureHeadTrainer):
    """Prototypical Networks: a backbone meta-trained for nearest-prototype classification.

    ``ProtoNet(backbone, ProtoNetConfig()).fit(train, val)`` returns the history;
    ``evaluate`` classifies each test episode's queries by the nearest prototype.

    Args: ``backbone``, ``config`` (default ``ProtoNetConfig()``) and ``device``, as for
    :class:`MAML`, which also lists the errors.

    Example:
        >>> import fastmtl
        >>> glyphs = fastmtl.data.SyntheticGlyphs(10, 8, seed=0)
        >>> net = ProtoNet(fastmtl.models.conv4(hidden=8), ProtoNetConfig(
        ...     n_way=5, tasks_per_step=1, tasks_per_epoch=2, epochs=1, n_query=3))
        >>> _ = net.fit(glyphs, progress=False)
        >>> own = net.evaluate(glyphs, n_query=3, episodes=4, progress=False)   # prototypes
        >>> own["episodes"], 0 <= own["mean"] <= 100
        (4, True)
    """

    method = "protonet"
    _config_class = ProtoNetConfig

    def _protocol(self) -> str:
        return f"{self.method}: nearest prototype (squared Euclidean)"

    def _make_model(self, dim: int) -> _Learner:
        return _Learner(self.backbone)

    def _head_logits(self, zs: torch.Tensor, ys: torch.Tensor, zq: torch.Tensor,
                     n_way: int) -> torch.Tensor:
        return prototype_logits(zs, ys, zq, n_way)
