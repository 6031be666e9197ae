"""MAML (Finn et al., ICML 2017) and first-order MAML, vectorized over the meta-batch.

The learner is the backbone plus a linear head with ``n_way`` outputs. For each task the
inner loop takes ``inner_steps`` gradient steps on the support loss from the shared
weights; the meta-loss is the query loss of the adapted weights, averaged over tasks.
The meta-gradient flows through the inner steps by ordinary autograd (second order), or
treats the inner gradients as constants (``first_order=True``, FO-MAML).

Three forms of the same computation (tested equal in float64): on a Conv-4 the
vectorized form runs every task's weights side by side as channel groups of one network
(:mod:`fastmtl.gbml._stacked`: grouped convolutions, one fused BatchNorm); on other
backbones one task is a pure function of the weights (``torch.func.functional_call`` and
``torch.func.grad``) and ``torch.func.vmap`` runs it over the meta-batch; and the per-task
loop (``vectorize=False``), the textbook form.

``learn_inner_lr=True`` meta-learns one inner step size per weight element, initialized
to ``inner_lr`` (Meta-SGD, Li et al. 2017). BatchNorm uses per-task batch statistics,
support and query forwarded separately (see :mod:`fastmtl.gbml`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .. import checks
from ..config import setting
from ..models import Conv4
from ..training import phase
from ._common import (
    LinearHead,
    _cross_entropy,
    _EpisodicConfig,
    _EpisodicTrainer,
    _Learner,
    _params,
    _vmap,
)
from ._stacked import backbone_program, program, stacked_logits

__all__ = ["MAMLConfig", "MAML"]

_Weights = dict[str, Tensor]                # parameter name -> (stacked) weights
_Lrs = dict[str, Tensor | float]            # parameter name -> inner-loop step size
_Ops = list[tuple[str, str, nn.Module]]     # a learner as fastmtl.gbml._stacked runs it


@dataclass
class MAMLConfig(_EpisodicConfig):
    """Settings of :class:`MAML`; defaults: the MAML paper's Omniglot 5-way 1-shot run.

    The paper (Sec. 5.2 and its reference code): Omniglot 5-way, one inner step of size
    0.4, meta-batch 32, three steps at test time; mini-ImageNet, five inner steps of size
    0.01, meta-batch 4 (1-shot) or 2 (5-shot), ten steps at test time; Adam with meta
    learning rate 1e-3; 60,000 meta-steps. See :meth:`omniglot` and :meth:`mini_imagenet`.
    The reference code uses k queries per class on Omniglot and 15 on mini-ImageNet;
    fastmtl uses 15 on both (a less noisy meta-gradient, the usual choice since).

    Example:
        >>> MAMLConfig.omniglot(n_way=20).inner_steps
        5
    """

    inner_steps: int = setting(1, "gradient steps of the inner loop in meta-training")
    inner_lr: float = setting(0.4, "step size of the inner loop")
    test_inner_steps: int = setting(3, "inner steps of the test-time adaptation (evaluate)")
    first_order: bool = setting(False, "drop the second-order terms (FO-MAML)")
    learn_inner_lr: bool = setting(False, "meta-learn a step size per weight element "
                                          "(Meta-SGD), starting at inner_lr")

    def validate(self) -> None:
        super().validate()
        for name in ("inner_steps", "test_inner_steps"):
            checks.integer(name, getattr(self, name), 1)
        checks.number("inner_lr", self.inner_lr)

    @classmethod
    def omniglot(cls, n_way: int = 5, k_shot: int = 1, **overrides: Any) -> MAMLConfig:
        """The paper's Omniglot settings: 5-way as the defaults; 20-way five inner steps of
        0.1 (also at test time) and meta-batch 16."""
        base = cls(n_way=n_way, k_shot=k_shot)
        if n_way >= 20:
            base = dataclasses.replace(base, inner_steps=5, inner_lr=0.1, test_inner_steps=5,
                                       tasks_per_step=16, tasks_per_epoch=1600)
        return dataclasses.replace(base, **overrides)

    @classmethod
    def mini_imagenet(cls, k_shot: int = 1, **overrides: Any) -> MAMLConfig:
        """The paper's mini-ImageNet settings (use Conv-4 with 32 filters:
        ``conv4(in_channels=3, hidden=32, out_channels=32)``)."""
        tasks_per_step = 4 if k_shot == 1 else 2
        base = cls(n_way=5, k_shot=k_shot, n_query=15, inner_steps=5, inner_lr=0.01,
                   test_inner_steps=10, tasks_per_step=tasks_per_step,
                   tasks_per_epoch=100 * tasks_per_step)
        return dataclasses.replace(base, **overrides)


class MAML(_EpisodicTrainer):
    """MAML / FO-MAML with the whole meta-batch as one computation (stacked or ``vmap``).

    ``MAML(backbone, MAMLConfig()).fit(train, val)`` returns the history;
    ``trainer.evaluate(test)`` adapts to each test episode (``test_inner_steps`` steps)
    and ``fastmtl.evaluate(trainer.backbone, test)`` runs the logistic protocol.
    ``trainer.model`` is the learner (``.backbone``, ``.head``) and, with
    ``learn_inner_lr``, holds the step sizes in ``.inner_lr``.

    Args:
        backbone: the network to meta-train. It is changed in place: its BatchNorms
            become batch-statistics norms (:func:`use_batch_stats`: the GBML convention;
            their weights are the same tensors), so ``trainer.backbone is backbone`` and
            the trained module is the one passed in. Pass ``copy.deepcopy(net)`` to keep
            ``net`` as it was. config: default
            ``MAMLConfig()``; device: None picks this rank's CUDA device, else the CPU.

    Raises:
        ValueError: a backbone that is not an ``nn.Module``, or invalid settings.

    Example:
        >>> import fastmtl
        >>> data = fastmtl.data.SyntheticGlyphs(10, 8, seed=0)
        >>> cfg = MAMLConfig(tasks_per_step=2, tasks_per_epoch=2, epochs=1, n_query=3)
        >>> history = MAML(fastmtl.models.conv4(hidden=8), cfg).fit(data, progress=False)
        >>> len(history)
        1
    """

    method = "maml"
    _config_class = MAMLConfig
    # The vectorized form runs stacked (fastmtl.gbml._stacked) where the learner allows it.
    _stack = True
    config: MAMLConfig
    _ops: _Ops | None       # program() of _ops_of, the learner it was read from
    _ops_of: nn.Module

    def __init__(self, backbone: nn.Module, config: MAMLConfig | None = None,
                 device: torch.device | str | None = None):
        super().__init__(backbone, config, device)
        if type(self) is MAML and self.config.first_order:
            self.method = "fomaml"      # names progress bars, results and checkpoints

    def _protocol(self) -> str:
        return f"{self.method}: {self.config.test_inner_steps} inner steps per test episode"

    def _make_model(self, dim: int) -> _Learner:
        model = _Learner(self.backbone, LinearHead(dim, self.config.n_way))
        model.to(next(self.backbone.parameters()).dtype)
        if self.config.learn_inner_lr:
            model.inner_lr = nn.ParameterList(
                [nn.Parameter(torch.full_like(p, self.config.inner_lr))
                 for _, p in self._adapted(model).items()])
        return model

    def _check_eval_ways(self, n_way: int) -> None:
        if n_way != self.config.n_way:
            raise ValueError(f"{type(self).__name__} has a {self.config.n_way}-way head; its "
                             f"own evaluation needs n_way={self.config.n_way}, got {n_way} "
                             "(the logistic protocol, fastmtl.evaluate, takes any n_way)")

    # -- what is adapted, and how ------------------------------------------------------------
    def _adapted(self, model: _Learner | None = None) -> _Weights:
        """The weights the inner loop adapts (MAML: all of the learner's)."""
        model = model or self._built_learner()
        return {k: v for k, v in _params(model).items() if not k.startswith("inner_lr.")}

    def _step_sizes(self, names: Iterable[str]) -> _Lrs:
        if self.config.learn_inner_lr:
            sizes = self._built_learner().inner_lr
            assert isinstance(sizes, nn.ParameterList)   # _make_model's, one per adapted weight
            return dict(zip(names, sizes, strict=True))
        return {k: self.config.inner_lr for k in names}

    # -- one task, as pure functions of the weights --------------------------------------
    # A task's "inputs" are its images (MAML) or its backbone features (ANIL, which
    # overrides these three and _task_inputs); everything below is written once.
    def _support_loss(self, fast: _Weights, inputs: Tensor, ys: Tensor) -> Tensor:
        return F.cross_entropy(self._logits(fast, inputs), ys)

    def _logits(self, fast: _Weights, inputs: Tensor) -> Tensor:
        return torch.func.functional_call(self._built_learner(), fast, (inputs,))

    def _task_inputs(self, xs: Tensor, xq: Tensor, vectorized: bool,
                     detach: bool = False) -> tuple[Tensor, Tensor]:
        return xs, xq

    def _inner_loop(self, fast: _Weights, lrs: _Lrs, inputs: Tensor, ys: Tensor, steps: int,
                    first_order: bool, looped: bool = False) -> _Weights:
        """``steps`` SGD steps of one task on its support loss (the only inner loop).

        ``looped``: ``torch.autograd.grad`` (``create_graph`` for second order), for the
        per-task loop; else ``torch.func.grad``, which ``vmap`` batches over tasks.
        """
        for _ in range(steps):
            if looped:
                loss = self._support_loss(fast, inputs, ys)
                grads = dict(zip(fast, torch.autograd.grad(loss, list(fast.values()),
                                                           create_graph=not first_order),
                                 strict=True))
            else:
                grads = torch.func.grad(self._support_loss)(fast, inputs, ys)
                if first_order:
                    grads = {k: g.detach() for k, g in grads.items()}
            fast = {k: w - lrs[k] * grads[k] for k, w in fast.items()}
        return fast

    def _outer_loss(self, fast: _Weights, inputs: Tensor, yq: Tensor) -> tuple[Tensor, Tensor]:
        logits = self._logits(fast, inputs)
        return F.cross_entropy(logits, yq), logits

    def _adapt_and_score(self, s: Tensor, ys: Tensor, q: Tensor, yq: Tensor,
                         vectorized: bool) -> tuple[Tensor, Tensor]:
        """Per-task query losses (T,) and logits (T, Q, n) after the inner loop."""
        cfg = self.config
        params = self._adapted()
        lrs = self._step_sizes(params)

        def inner(s: Tensor, ys: Tensor) -> _Weights:
            return self._inner_loop(params, lrs, s, ys, cfg.inner_steps, cfg.first_order,
                                    looped=not vectorized)

        if vectorized:
            with phase("inner_loop"):
                fast = _vmap(inner, (0, 0))(s, ys)
            with phase("outer_loss"):
                return _vmap(self._outer_loss, (0, 0, 0))(fast, q, yq)
        losses: list[Tensor] = []
        all_logits: list[Tensor] = []
        for t in range(s.shape[0]):       # the textbook form, one task at a time
            with phase("inner_loop"):
                fast = inner(s[t], ys[t])
            with phase("outer_loss"):
                loss, logits = self._outer_loss(fast, q[t], yq[t])
            losses.append(loss)
            all_logits.append(logits)
        return torch.stack(losses), torch.stack(all_logits)

    # -- the stacked form (fastmtl.gbml._stacked): the vectorized form on a Conv-4 ----------
    def vectorized(self) -> bool:
        """As :meth:`_EpisodicTrainer.vectorized`; with ``vectorize=None`` on a CPU, the
        stacked form where the learner allows it (a Conv-4), else the per-task loop.

        Measured on a 2-core CPU (``benchmarks/results/maml_vs_l2l_cpu.json``): the stacked
        meta-step was faster than the per-task loop at every shape the benchmarks and the
        comparison use, where ``vmap`` was 0.4-1.0x of it.

        Example:
            >>> import fastmtl
            >>> MAML(fastmtl.models.conv4(hidden=8), device="cpu").vectorized()
            True
        """
        if self.config.vectorize is None and self.device.type == "cpu":
            return self._stack and backbone_program(self.backbone) is not None
        return super().vectorized()

    def _program(self) -> _Ops | None:
        """The learner as :func:`program` runs it, or None: vmap (another backbone, ANIL,
        or ``_stack`` turned off, as the tests do to check vmap)."""
        if not self._stack or self.model is None:
            return None
        if getattr(self, "_ops_of", None) is not self.model:
            self._ops, self._ops_of = program(self.model), self.model
        return self._ops

    def _stacked(self, ops: _Ops, fast: _Weights, x: Tensor) -> Tensor:
        backbone = self._built_learner().backbone
        assert isinstance(backbone, Conv4)  # program() admits no other
        backbone.check_input(x[0])
        return stacked_logits(ops, fast, x, backbone.runs_channels_last(x.device))

    def _stacked_inner(self, ops: _Ops, fast: _Weights, lrs: _Lrs, xs: Tensor, ys: Tensor,
                       steps: int, first_order: bool) -> _Weights:
        """The inner loop of all tasks at once; ``fast`` holds (T, ...) weights."""
        for _ in range(steps):
            logits = self._stacked(ops, fast, xs)
            # The sum over tasks of each task's mean support loss: its gradient with respect
            # to the stacked weights holds every task's own gradient.
            loss = F.cross_entropy(logits.flatten(0, 1), ys.flatten(), reduction="sum")
            grads = torch.autograd.grad(loss / ys.shape[1], list(fast.values()),
                                        create_graph=not first_order)
            fast = {k: w - lrs[k] * g for (k, w), g in zip(fast.items(), grads, strict=True)}
        return fast

    def _stacked_adapt_and_score(self, ops: _Ops, xs: Tensor, ys: Tensor, xq: Tensor,
                                 yq: Tensor) -> tuple[Tensor, Tensor]:
        cfg = self.config
        params = self._adapted()
        lrs = self._step_sizes(params)
        fast = {k: v.expand(xs.shape[0], *v.shape) for k, v in params.items()}
        with phase("inner_loop"):
            fast = self._stacked_inner(ops, fast, lrs, xs, ys, cfg.inner_steps, cfg.first_order)
        with phase("outer_loss"):
            logits = self._stacked(ops, fast, xq)
            return _cross_entropy(logits, yq), logits

    # -- hooks ------------------------------------------------------------------------------
    def _vmapped(self, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> tuple[Tensor, Tensor]:
        ops = self._program()
        if ops is not None:
            return self._stacked_adapt_and_score(ops, xs, ys, xq, yq)
        s, q = self._task_inputs(xs, xq, vectorized=True)
        return self._adapt_and_score(s, ys, q, yq, vectorized=True)

    def _looped(self, xs: Tensor, ys: Tensor, xq: Tensor, yq: Tensor) -> tuple[Tensor, Tensor]:
        s, q = self._task_inputs(xs, xq, vectorized=False)
        return self._adapt_and_score(s, ys, q, yq, vectorized=False)

    def _predict(self, xs: Tensor, ys: Tensor, xq: Tensor, n_way: int) -> Tensor:
        params = {k: v.detach() for k, v in self._adapted().items()}
        lrs = {k: (v.detach() if isinstance(v, torch.Tensor) else v)
               for k, v in self._step_sizes(params).items()}
        steps = self.config.test_inner_steps
        vectorized = self.vectorized()
        ops = self._program() if vectorized else None
        if ops is not None:
            with torch.enable_grad():
                fast = {k: v.expand(xs.shape[0], *v.shape).requires_grad_()
                        for k, v in params.items()}
                fast = self._stacked_inner(ops, fast, lrs, xs, ys, steps, True)
            return self._stacked(ops, {k: v.detach() for k, v in fast.items()}, xq)
        s, q = self._task_inputs(xs, xq, vectorized, detach=True)

        def one(s: Tensor, ys: Tensor, q: Tensor) -> Tensor:
            fast = self._inner_loop(params, lrs, s, ys, steps, True)
            return self._logits(fast, q)

        if not vectorized:
            return torch.stack([one(s[e], ys[e], q[e]) for e in range(s.shape[0])])
        return _vmap(one, (0, 0, 0))(s, ys, q)
