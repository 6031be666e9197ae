"""R2-D2 (Bertinetto et al., ICLR 2019), as MetaOptNet runs it: a closed-form ridge head.

Per task, the head is the ridge-regression solution on the support features ``X`` (S, d)
with one-hot targets ``Y`` (S, n): ``W = argmin ||X W - Y||^2 + lam ||W||^2``. With far
fewer support points than feature dimensions it is solved in the Woodbury form,
``W = X^T (X X^T + lam I_S)^{-1} Y``, an S x S system instead of d x d, batched over tasks
with one ``torch.linalg.solve``. The query logits are ``scale * X_q W + bias`` with the
paper's meta-learned scale, bias and ``lam`` (positive ones learned in log space). The
solve is differentiable, so the backbone is meta-trained through the head.

The paper's bias is one scalar added to every logit, to which softmax cross-entropy is
invariant: its gradient is zero and it stays at its initial value; it is kept to match
the paper's head. Features come from the backbone under ``vmap``, one batch per task
(support and queries together, per-task BatchNorm statistics).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import checks
from ..config import setting
from ._common import _check_episode, _EpisodicConfig, _FeatureHeadTrainer, _Learner

__all__ = ["R2D2Config", "R2D2", "ridge_regression"]


def ridge_regression(z_support: torch.Tensor, y_support: torch.Tensor, n_way: int,
                     lam: torch.Tensor | float) -> torch.Tensor:
    """Ridge-regression heads of many tasks at once, in the Woodbury (support-size) form.

    Args:
        z_support: (T, S, d) support features.
        y_support: (T, S) integer labels in [0, n_way); targets are their one-hot codes.
        lam: the L2 strength (> 0), a float or a scalar tensor (differentiable).

    Returns:
        W (T, d, n_way), the minimizer of ``||z W - onehot(y)||^2 + lam ||W||^2`` per task,
        computed as ``z^T (z z^T + lam I)^{-1} onehot(y)``.

    Example:
        >>> import torch
        >>> w = ridge_regression(torch.randn(2, 10, 64), torch.arange(5).repeat(2).expand(2, -1),
        ...                      5, lam=1.0)
        >>> w.shape
        torch.Size([2, 64, 5])
    """
    _check_episode(z_support, y_support, n_way)
    if not isinstance(lam, torch.Tensor):
        checks.number("lam", lam)
    T, S, _ = z_support.shape
    targets = F.one_hot(y_support.long(), n_way).to(z_support.dtype)          # (T, S, n)
    gram = z_support @ z_support.transpose(1, 2)                              # (T, S, S)
    eye = torch.eye(S, dtype=z_support.dtype, device=z_support.device)
    alpha = torch.linalg.solve(gram + lam * eye, targets)                     # (T, S, n)
    return z_support.transpose(1, 2) @ alpha


@dataclass
class R2D2Config(_EpisodicConfig):
    """Settings of :class:`R2D2`.

    Defaults: Adam 1e-3 as the paper, 5-way 1-shot episodes with 15 queries, eight
    tasks per meta-step (MetaOptNet's batch of episodes). The paper trains with more ways
    than it tests (e.g. 16-way on mini-ImageNet, 60-way on Omniglot); set ``n_way``.

    Example:
        >>> R2D2Config(n_way=20).lam_init
        1.0
    """

    tasks_per_step: int = setting(8, None)
    tasks_per_epoch: int = setting(800, None)
    lam_init: float = setting(1.0, "initial ridge strength lambda (meta-learned in log space)")
    scale_init: float = setting(10.0, "initial logit scale alpha (meta-learned in log space; "
                                      "ridge outputs lie near [0, 1], too flat for softmax "
                                      "without a scale)")
    bias_init: float = setting(0.0, "initial logit bias beta (the paper's; softmax-invariant, "
                                    "see the module)")
    learn_lam: bool = setting(True, "meta-learn lambda (the paper does)")

    def inert_fields(self) -> list[tuple[str, str]]:
        """As the episodic configs', and ``bias_init`` always: a bias common to every
        logit cancels in the softmax (its gradient is zero), so no value changes a run."""
        return [*super().inert_fields(),
                ("bias_init", "the softmax (a bias common to every logit cancels)")]

    def validate(self) -> None:
        super().validate()
        if self.lam_init <= 0 or self.scale_init <= 0:
            raise ValueError(f"lam_init and scale_init must be > 0, got {self.lam_init} and "
                             f"{self.scale_init}")


class _RidgeHead(nn.Module):
    def __init__(self, lam: float, scale: float, bias: float, learn_lam: bool):
        super().__init__()
        self.log_lam = nn.Parameter(torch.tensor(math.log(lam)), requires_grad=learn_lam)
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale)))
        self.bias = nn.Parameter(torch.tensor(float(bias)))

    def logits(self, zs: torch.Tensor, ys: torch.Tensor, zq: torch.Tensor,
               n_way: int) -> torch.Tensor:
        """(T, Q, n_way) query logits of the ridge-regression head fitted per task."""
        w = ridge_regression(zs, ys, n_way, self.log_lam.exp())
        return self.log_scale.exp() * (zq @ w) + self.bias


class R2D2(_FeatureHeadTrainer):
    """R2-D2: meta-learns a backbone through a closed-form ridge-regression head.

    ``R2D2(backbone, R2D2Config()).fit(train, val)`` returns the history; ``evaluate``
    uses the ridge head on each test episode (any ``n_way``); ``trainer.model.head``
    holds lambda, scale and bias.

    Args: ``backbone``, ``config`` (default ``R2D2Config()``) and ``device``, as for
    :class:`MAML`, which also lists the errors.

    Example:
        >>> from fastmtl.data import SyntheticGlyphs
        >>> from fastmtl.models import conv4
        >>> r2d2 = R2D2(conv4(hidden=8), R2D2Config(n_way=5, tasks_per_step=1,
        ...                                          tasks_per_epoch=2, epochs=1, n_query=3))
        >>> len(r2d2.fit(SyntheticGlyphs(10, 8, seed=0), progress=False))
        1
        >>> r2d2.model.head.log_lam.requires_grad      # lambda is meta-learned (learn_lam)
        True
    """

    method = "r2d2"
    _config_class = R2D2Config

    def _protocol(self) -> str:
        return f"{self.method}: closed-form ridge head per test episode"

    def _make_model(self, dim: int) -> _Learner:
        cfg = self.config
        head = _RidgeHead(cfg.lam_init, cfg.scale_init, cfg.bias_init, cfg.learn_lam)
        return _Learner(self.backbone, head).to(next(self.backbone.parameters()).dtype)

    def _head_logits(self, zs: torch.Tensor, ys: torch.Tensor, zq: torch.Tensor,
                     n_way: int) -> torch.Tensor:
        head = self._built_learner().head
        assert isinstance(head, _RidgeHead)  # _make_model's
        return head.logits(zs, ys, zq, n_way)
