"""ANIL (Raghu et al., ICLR 2020): MAML with the inner loop on the head only.

The backbone's features of a task's support and query sets are computed once (two
batches, per-task BatchNorm statistics, as in MAML); the inner loop adapts only the
linear head on the support features; the meta-gradient reaches the backbone through the
features, and, second order, through the inner steps' dependence on them. Vectorized, the
backbone (shared by the tasks) runs once for all tasks' supports and once for all their
queries (:func:`fastmtl.gbml._common.stacked_features`), and the head's inner loop is
``vmap``-ed over the meta-batch like :class:`fastmtl.gbml.MAML`'s.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from ..config import setting
from ..training import phase
from ._common import _Learner, _params, stacked_features
from .maml import MAML, MAMLConfig

__all__ = ["ANILConfig", "ANIL"]


@dataclass
class ANILConfig(MAMLConfig):
    """Settings of :class:`ANIL`: the fields and defaults of :class:`MAMLConfig` (the ANIL
    paper reuses MAML's hyperparameters), with the inner loop on the head only.

    Example:
        >>> ANILConfig().inner_lr
        0.4
    """

    inner_steps: int = setting(1, "gradient steps of the head in meta-training")
    test_inner_steps: int = setting(3, "head steps of the test-time adaptation (evaluate)")
    learn_inner_lr: bool = setting(False, "meta-learn a step size per head element "
                                          "(Meta-SGD), starting at inner_lr")


class ANIL(MAML):
    """ANIL: MAML with only the head adapted in the inner loop; same API as :class:`MAML`.

    ``ANIL(backbone, ANILConfig()).fit(train, val)`` returns the history.

    Args: ``backbone``, ``config`` (default ``ANILConfig()``) and ``device``, as for
    :class:`MAML`, which also lists the errors.

    Example:
        >>> import fastmtl
        >>> trainer = ANIL(fastmtl.models.conv4(hidden=8),
        ...                ANILConfig(tasks_per_step=2, tasks_per_epoch=2, epochs=1, n_query=3))
        >>> _ = trainer.fit(fastmtl.data.SyntheticGlyphs(10, 8, seed=0), progress=False)
        >>> sorted(trainer.model.head.state_dict())      # the weights the inner loop adapts
        ['bias', 'weight']
    """

    method = "anil"
    _config_class = ANILConfig
    _stack = False      # the backbone is shared by the tasks: stacked_features instead

    def _protocol(self) -> str:
        return f"{self.method}: {self.config.test_inner_steps} head steps per test episode"

    def _adapted(self, model: _Learner | None = None) -> dict[str, Tensor]:
        return _params(_head(model or self._built_learner()))

    def _logits(self, fast: dict[str, Tensor], inputs: Tensor) -> Tensor:
        return torch.func.functional_call(_head(self._built_learner()), fast, (inputs,))

    def _task_inputs(self, xs: Tensor, xq: Tensor, vectorized: bool,
                     detach: bool = False) -> tuple[Tensor, Tensor]:
        """Each task's support and query features (two batches, per-task statistics);
        ``detach``: computed without a graph (test-time adaptation)."""
        backbone = self._built_learner().backbone
        with phase("backbone"), torch.no_grad() if detach else contextlib.nullcontext():
            if vectorized:      # one call for all supports, one for all queries
                return stacked_features(backbone, xs), stacked_features(backbone, xq)
            return (torch.stack([backbone(x) for x in xs]),
                    torch.stack([backbone(x) for x in xq]))


def _head(learner: _Learner) -> nn.Module:
    """The learner's head, the weights ANIL adapts (its learner always has one)."""
    assert learner.head is not None
    return learner.head
