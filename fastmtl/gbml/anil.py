"""ANIL (Raghu et al., ICLR 2020): MAML with the inner loop on the head only.

The backbone's features of a task's support and query sets are computed once (two
batches, per-task BatchNorm statistics, as in MAML); the inner loop adapts only the
linear head on the support features; the meta-gradient reaches the backbone through the
features, and, second order, through the inner steps' dependence on them. Everything is
one function of a task, ``vmap``-ed over the meta-batch like :class:`fastmtl.gbml.MAML`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..training import phase
from ._common import _document_shared_fields, _params, _vmap
from .maml import MAML, MAMLConfig

__all__ = ["ANILConfig", "ANIL"]


@dataclass
class ANILConfig(MAMLConfig):
    """Settings of :class:`ANIL`: the fields and defaults of :class:`MAMLConfig` (the ANIL
    paper reuses MAML's hyperparameters), with the inner loop on the head only.

    Attributes:
        inner_steps: gradient steps of the head in meta-training.
        inner_lr: step size of the inner loop.
        test_inner_steps: head steps of the test-time adaptation (``evaluate``).
        first_order: drop the second-order terms.
        learn_inner_lr: meta-learn a step size per head element (Meta-SGD).
            The step sizes start at inner_lr.
    """


_document_shared_fields(ANILConfig)


class ANIL(MAML):
    """ANIL: ``ANIL(backbone, ANILConfig()).fit(train, val)``; same API as :class:`MAML`."""

    method = "anil"
    _config_class = ANILConfig

    def _protocol(self) -> str:
        return f"{self.method}: {self.config.test_inner_steps} head steps per test episode"

    def _adapted(self, model=None) -> dict[str, torch.Tensor]:
        return _params((model or self.model).head)

    def _support_loss(self, fast, zs, ys):
        return F.cross_entropy(torch.func.functional_call(self.model.head, fast, (zs,)), ys)

    def _features(self, bparams, x):
        return torch.func.functional_call(self.model.backbone, bparams, (x,))

    def _task(self, bparams, fast, lrs, xs, ys, xq, yq):
        cfg = self.config
        zs, zq = self._features(bparams, xs), self._features(bparams, xq)
        fast = self._adapt(fast, lrs, zs, ys, cfg.inner_steps, cfg.first_order)
        logits = torch.func.functional_call(self.model.head, fast, (zq,))
        return F.cross_entropy(logits, yq), logits

    def _vmapped(self, xs, ys, xq, yq):
        bparams, head = _params(self.model.backbone), self._adapted()
        with phase("inner_loop_and_outer_loss"):
            return _vmap(self._task, (None, None, None, 0, 0, 0, 0))(
                bparams, head, self._step_sizes(head), xs, ys, xq, yq)

    def _looped(self, xs, ys, xq, yq):
        cfg = self.config
        head = self._adapted()
        lrs = self._step_sizes(head)
        losses, all_logits = [], []
        for t in range(xs.shape[0]):
            zs, zq = self.model.backbone(xs[t]), self.model.backbone(xq[t])
            fast = dict(head)
            for _ in range(cfg.inner_steps):
                loss = self._support_loss(fast, zs, ys[t])
                grads = torch.autograd.grad(loss, list(fast.values()),
                                            create_graph=not cfg.first_order)
                fast = {k: w - lrs[k] * g for (k, w), g in zip(fast.items(), grads)}
            logits = torch.func.functional_call(self.model.head, fast, (zq,))
            losses.append(F.cross_entropy(logits, yq[t]))
            all_logits.append(logits)
        return torch.stack(losses), torch.stack(all_logits)

    def _predict(self, xs, ys, xq, n_way):
        bparams = {k: v.detach() for k, v in _params(self.model.backbone).items()}
        head = {k: v.detach() for k, v in self._adapted().items()}
        lrs = {k: (v.detach() if isinstance(v, torch.Tensor) else v)
               for k, v in self._step_sizes(head).items()}
        steps = self.config.test_inner_steps

        def one(bparams, fast, lrs, xs, ys, xq):
            zs, zq = self._features(bparams, xs), self._features(bparams, xq)
            fast = self._adapt(fast, lrs, zs, ys, steps, True)
            return torch.func.functional_call(self.model.head, fast, (zq,))

        if not self.config.vectorize:
            return torch.stack([one(bparams, head, lrs, xs[e], ys[e], xq[e])
                                for e in range(xs.shape[0])])
        return _vmap(one, (None, None, None, 0, 0, 0))(bparams, head, lrs, xs, ys, xq)
