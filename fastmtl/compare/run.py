"""Running a comparison: each method trained for the same budget, evaluated on a clock.

:func:`compare` trains each method on the same training classes with a fresh backbone of
the same architecture, for the same training-time budget, one method at a time. At fixed
points of *training* time (an :class:`fastmtl.training.EveryTrainingSeconds` callback,
so the evaluation is kept off the training clock) it evaluates the model on the same
seeded test episodes: the logistic-regression protocol for every method, with
``centre_from`` the same protocol on features centred on the training images' mean (CL2N,
as ``fastmtl eval --centre``) and, where a trainer has its own adaptation, that too. No model
selection happens on test episodes: each curve is what the model is at each time point.

The cost axes: training seconds (this machine), FLOPs (``torch.utils.flop_counter`` on a
real step of each method, so the axis holds on any hardware; ops it cannot count, such
as fastmtl's fused C++ head, are left out, which is a few percent of a Conv-4 step),
images seen and peak memory (the process's resident set on CPU, reset before each method
where Linux allows; ``torch.cuda.max_memory_allocated`` on CUDA).
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import checks, registry
from ..config import TrainerConfig, renamed_fields
from ..data import FewShotDataset
from ..evaluate import embed, evaluate, feature_mean
from ..sampling import check_fits
from ..training import AtTrainingSeconds, Callback, EveryTrainingSeconds, Trainer, TrainState
from .analysis import accuracy_key

if TYPE_CHECKING:
    from torch.utils.flop_counter import FlopCounterMode

# A trainer class of the registry: built as ``cls(backbone, config)``.
TrainerClass = Callable[..., Trainer]

__all__ = ["compare", "config_for", "check_data", "flop_counter", "flops_per_step",
           "run_method", "centre_sample", "CENTRE_IMAGES"]

# Training images whose mean feature centres the "centred" protocol: a seeded sample of
# this many of the training split without rotations (all of them where there are fewer),
# drawn once per comparison, the same for every method and point. The mean of 4,096
# features is within sampling noise of the whole set's, and a point then costs the same
# on a set of 50,000 images as on 5,000. The default of ``compare(sample_images=...)``
# (``--sample-images``), which also sets the sample a batch-statistics backbone is frozen at.
CENTRE_IMAGES = 4096


def config_for(method: str, overrides: dict[str, Any] | None = None, seed: int = 0,
               budget_minutes: float | None = None,
               recipe: str | None = None) -> tuple[TrainerClass, TrainerConfig]:
    """(trainer class, config) of ``method`` with its comparison settings and ``overrides``.

    The comparison settings are the registry's (:func:`fastmtl.registry.compare_settings`;
    MTL: its recipe, the fast one unless ``recipe`` names another).

    Args:
        method: one of :data:`fastmtl.registry.METHOD_NAMES`.
        overrides: fields of the method's config to change (old field names work, with a
            DeprecationWarning).
        seed: the run's seed.
        budget_minutes: the training-time budget (None: none).
        recipe: MTL's recipe (None: the registry's).

    Returns:
        the trainer class and its validated config (epochs unbounded, no checkpoints).

    Raises:
        ValueError: an unknown method, an override that is not a field of its config, or
            an override value out of range or without effect.

    Example:
        >>> cls, cfg = config_for("protonet", {"n_way": 30}, budget_minutes=5)
        >>> cls.__name__, cfg.n_way, cfg.max_minutes
        ('ProtoNet', 30, 5)
    """
    if method not in registry.METHOD_NAMES:
        raise ValueError(f"methods: unknown method {method!r}; choose from "
                         f"{', '.join(registry.METHOD_NAMES)}")
    cls, config_cls, _ = registry.method(method)
    overrides = renamed_fields(config_cls, overrides or {}, f"settings for {method}")
    settings = dict(registry.compare_settings(method), **overrides)
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(settings) - names)
    if unknown:
        raise ValueError(f"settings for {method}: unknown field(s) {unknown} of "
                         f"{config_cls.__name__}")
    settings.update(seed=seed, epochs=10**9, max_minutes=budget_minutes, checkpoint_dir=None)
    try:
        cfg = registry.default_config(method, recipe, **settings)
        cfg.validate()
    except ValueError as exc:
        raise ValueError(f"settings for {method}: {exc}") from None
    return cls, cfg


def _ways_list(ways: int | Sequence[int]) -> list[int]:
    """``ways`` as a list (an int: one setting), checked: positive, none twice."""
    out = [ways] if isinstance(ways, int) else list(ways)
    if not out or len(set(out)) != len(out):
        raise ValueError(f"ways: give one or more different numbers of ways, got {ways!r}")
    for w in out:
        checks.integer("ways", w, 2)
    return out


def check_data(method: str, cfg: TrainerConfig, train: FewShotDataset, test: FewShotDataset,
               shots: Sequence[int], ways: int | Sequence[int], queries: int) -> None:
    """ValueError unless ``train`` holds ``method``'s tasks and ``test`` the test episodes
    (of each of ``ways``)."""
    need_ways, need_images = cfg.task_needs()
    try:
        check_fits(train.labels, need_ways, need_images, where="training ",
                   ways_name=f"{method} n_way", need_name=f"{method}'s images a class")
        check_fits(test.labels, max(_ways_list(ways)), max(shots) + queries, where="test ",
                   ways_name="ways", need_name="shots + queries")
    except ValueError as exc:
        raise ValueError(f"data: too small: {exc}") from None


# -- measuring -----------------------------------------------------------------------------
def _reset_peak_rss() -> bool:
    try:    # give the evaluation's freed heap back first, so it does not count as training's
        import ctypes
        import ctypes.util
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:    # Linux: writing 5 to clear_refs resets the peak resident set (VmHWM)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        _reset_peak_rss()


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class _StopAfter(Callback):
    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_step_end(self, trainer: Trainer, state: TrainState) -> bool:
        return state.step >= self.steps


def flop_counter() -> FlopCounterMode:
    """``torch.utils.flop_counter.FlopCounterMode`` (no display) with the weight gradient of
    grouped convolutions counted right.

    torch 2.13's formula for ``convolution_backward`` ignores ``groups`` in the weight
    gradient and counts ``groups`` times its multiplications: MAML's stacked form (its T
    tasks as one grouped convolution, :mod:`fastmtl.gbml._stacked`) read 17.5 GFLOPs a
    step where its per-task loop, the same arithmetic, read 9.26. Here that term is
    divided by ``groups``; everything else is torch's own count.

    Example:
        >>> import torch
        >>> conv = torch.nn.Conv2d(8, 8, 3, groups=4)
        >>> with flop_counter() as c:
        ...     conv(torch.randn(2, 8, 6, 6)).sum().backward()
        >>> c.get_total_flops()      # forward and weight gradient, 9,216 each (torch: 46,080)
        18432
    """
    from torch.utils.flop_counter import FlopCounterMode, conv_backward_flop

    def backward(grad_out_shape: Any, x_shape: Any, w_shape: Any, bias: Any, stride: Any,
                 padding: Any, dilation: Any, transposed: bool, output_padding: Any,
                 groups: int, output_mask: list[bool], out_shape: Any, **kwargs: Any) -> int:
        def part(mask: list[bool]) -> int:
            # torch's formula, as registered: its decorator takes the output as out_val,
            # which its own signature (out_shape) does not show
            return int(conv_backward_flop(  # type: ignore[call-arg]
                grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation,
                transposed, output_padding, groups, mask, out_val=out_shape))
        total = part([output_mask[0], False, False])
        if output_mask[1]:
            total += part([False, True, False]) // groups
        return total

    return FlopCounterMode(display=False,
                           custom_mapping={torch.ops.aten.convolution_backward: backward})


def flops_per_step(cls: TrainerClass, cfg: TrainerConfig,
                   make_backbone: Callable[[], torch.nn.Module], train: FewShotDataset) -> int:
    """FLOPs of one real training step of ``cls(cfg)`` (forward, backward, update), counted
    by :func:`flop_counter`."""
    torch.manual_seed(cfg.seed)
    trainer = cls(make_backbone(), dataclasses.replace(cfg, max_minutes=None))
    trainer.fit(train, progress=False, callbacks=[_StopAfter(1)])     # warm-up, builds
    counter = flop_counter()
    with counter:
        trainer.fit(train, progress=False, callbacks=[_StopAfter(1)])
    return int(counter.get_total_flops())


def _step_flops(cls: TrainerClass, cfg: Any,
                make_backbone: Callable[[], torch.nn.Module],
                train: FewShotDataset) -> tuple[int, int | None]:
    """FLOPs of a full step and, for MTL with progressive resizing, of a step on small
    images (a fresh trainer's first step is one of them; None without it)."""
    flops = flops_per_step(cls, cfg, make_backbone, train)
    if getattr(cfg, "small_images", 1.0) >= 1:
        return flops, None
    default = {f.name: f.default for f in dataclasses.fields(cfg)}["small_images_fraction"]
    full = flops_per_step(cls, dataclasses.replace(cfg, small_images=1.0,
                                                   small_images_fraction=default),
                          make_backbone, train)
    return full, flops


def _flops(trainer: Trainer, state: TrainState, flops: int, small_flops: int | None) -> int:
    """FLOPs of ``state.step`` steps: full-size steps at ``flops``, and with progressive
    resizing the trainer's ``small_image_steps`` at ``small_flops``."""
    if small_flops is None:
        return state.step * flops
    small = int(trainer.small_image_steps)  # type: ignore[attr-defined]  # MTLTrainer's
    return small * small_flops + (state.step - small) * flops


def centre_sample(train: FewShotDataset, seed: int = 0,
                  n: int = CENTRE_IMAGES) -> FewShotDataset:
    """The training images whose mean feature centres the "centred" protocol: ``n`` of
    ``train`` drawn without replacement by ``seed`` (all of them where there are fewer).

    Example:
        >>> import fastmtl
        >>> len(centre_sample(fastmtl.data.SyntheticGlyphs(4, 5), n=8))
        8
    """
    checks.integer("n", n, 1)
    if not isinstance(train, FewShotDataset):
        raise ValueError(f"train must be a FewShotDataset, got {type(train).__name__}")
    if len(train) == 0:
        raise ValueError("train holds no images")
    rng = np.random.default_rng(seed)
    index = np.sort(rng.permutation(len(train))[:n])
    return FewShotDataset(train.images[index], np.zeros(len(index), np.int64), ["sample"],
                          train.mean, train.std, f"{train.name} (centre sample)")


def _centre_images(centre_from: object, train: FewShotDataset, seed: int,
                   n: int = CENTRE_IMAGES) -> FewShotDataset | None:
    """:func:`compare`'s sample of ``centre_from`` (None: none); ValueError unless it is
    a data set of the training images' shape."""
    if centre_from is None:
        return None
    if not isinstance(centre_from, FewShotDataset) or \
            centre_from.image_shape != train.image_shape:
        got = (centre_from.image_shape if isinstance(centre_from, FewShotDataset)
               else type(centre_from).__name__)
        raise ValueError(f"centre_from must be a FewShotDataset of the training images' "
                         f"shape {train.image_shape}, got {got}")
    return centre_sample(centre_from, seed, n)


def shared_protocol_stats(backbone: torch.nn.Module, train: FewShotDataset,
                          seed: int = 0, n: int = CENTRE_IMAGES) -> torch.Tensor | None:
    """The images whose statistics a batch-statistics (GBML) backbone normalizes with in
    the shared logistic and centred protocols: a seeded sample of ``n`` of its training
    images (:func:`centre_sample`), as they are trained on; None for other backbones,
    which keep running statistics.

    Example:
        >>> import fastmtl
        >>> net = fastmtl.gbml.use_batch_stats(fastmtl.models.conv4())
        >>> shared_protocol_stats(net, fastmtl.data.SyntheticGlyphs(4, 5)).shape
        torch.Size([20, 1, 28, 28])
    """
    from ..gbml import has_batch_stats
    checks.integer("n", n, 2)
    return centre_sample(train, seed, n).tensor() if has_batch_stats(backbone) else None


def shared_protocol_backbone(backbone: torch.nn.Module, stats_from: torch.Tensor | None
                             ) -> tuple[torch.nn.Module, str]:
    """The backbone the shared protocols evaluate, and how it normalizes: frozen at the
    statistics of ``stats_from`` (:func:`fastmtl.gbml.freeze_batch_stats`), or as it is
    where that is None."""
    if stats_from is None:
        return backbone, _norm_label(None)
    from ..gbml import freeze_batch_stats
    device = next(backbone.parameters()).device
    return freeze_batch_stats(backbone, stats_from.to(device)), _norm_label(stats_from)


def _norm_label(stats_from: torch.Tensor | None) -> str:
    return "running statistics" if stats_from is None else \
        f"statistics of {len(stats_from)} seeded training images (freeze_batch_stats)"


def _evaluate_point(trainer: Trainer, test: FewShotDataset, shots: Sequence[int],
                    ways: Sequence[int], queries: int, episodes: int,
                    seed: int, centre_from: FewShotDataset | None = None,
                    stats_from: torch.Tensor | None = None) -> dict[str, Any]:
    """Accuracy at each (ways, shots) setting, keyed by :func:`accuracy_key`: the logistic
    protocol on features embedded once, with ``centre_from`` (training images) also on
    those features centred on its mean ("centred"), and the trainer's own adaptation where
    it has one for those ways. ``stats_from``: training images whose statistics a
    batch-statistics backbone normalizes with in the shared protocols
    (:func:`fastmtl.gbml.freeze_batch_stats`)."""
    out: dict[str, Any] = {}
    backbone, _ = shared_protocol_backbone(trainer.backbone, stats_from)
    raw = embed(backbone, test, normalize=False, progress=False)
    feats = {"logistic": torch.nn.functional.normalize(raw, dim=-1)}
    if centre_from is not None:
        mu = feature_mean(backbone, centre_from)
        feats["centred"] = torch.nn.functional.normalize(raw - mu, dim=-1)
    for w in ways:
        for k in shots:
            res: dict[str, dict[str, Any]] = {p: evaluate(
                backbone, test, n_way=w, k_shot=k, n_query=queries, episodes=episodes,
                seed=seed, features=f, progress=False) for p, f in feats.items()}
            if trainer.own_adaptation and trainer.supports_ways(w):
                res["own"] = trainer.evaluate(test, n_way=w, k_shot=k, n_query=queries,
                                              episodes=episodes, seed=seed, progress=False)
            out[accuracy_key(w, k, ways[0])] = {p: {"mean": r["mean"], "ci95": r["ci95"]}
                                                for p, r in res.items()}
    return out


class _Bar(Callback):
    """Moves the method's progress bar (training seconds of the budget) every 10 steps."""

    def __init__(self, bar: tqdm | None, budget: float) -> None:
        self.bar, self.budget = bar, budget

    def on_step_end(self, trainer: Trainer, state: TrainState) -> None:
        if self.bar is not None and state.step % 10 == 0:
            self.bar.n = min(self.budget, state.train_seconds)
            self.bar.set_postfix(left=f"{max(0.0, self.budget - state.train_seconds):.0f}s",
                                 loss=f"{state.loss:.3f}")
            self.bar.refresh()


def _timer(eval_every: float | Sequence[float],
           at_point: Callable[[Trainer, TrainState], None]) -> Callback:
    """The evaluation clock: at the listed training times, or every ``eval_every`` s."""
    if isinstance(eval_every, (list, tuple)):
        return AtTrainingSeconds(eval_every, at_point)
    return EveryTrainingSeconds(cast(float, eval_every), at_point)


def run_method(method: str, cfg: TrainerConfig, cls: TrainerClass,
               make_backbone: Callable[[], torch.nn.Module], train: FewShotDataset,
               test: FewShotDataset, *, eval_every: float | Sequence[float],
               shots: Sequence[int], ways: int | Sequence[int], queries: int, episodes: int,
               seed: int, bar: tqdm | None = None,
               centre_from: FewShotDataset | None = None,
               sample_images: int = CENTRE_IMAGES) -> dict[str, Any]:
    """Train one method for ``cfg.max_minutes`` and evaluate it every ``eval_every`` s;
    the arguments as :func:`compare`'s (``centre_from``: the sample itself, None: the
    "centred" protocol is not run)."""
    ways = _ways_list(ways)
    flops, small_flops = _step_flops(cls, cfg, make_backbone, train)
    torch.manual_seed(seed)
    trainer = cls(make_backbone(), cfg)
    stats_from = shared_protocol_stats(trainer.backbone, train, seed, sample_images)
    device = trainer.device
    _reset_peak(device)
    points: list[dict[str, Any]] = []
    eval_seconds = [0.0]
    budget = 60.0 * cfg.max_minutes if cfg.max_minutes is not None else float("inf")
    peak = [0]

    def at_point(tr: Trainer, state: TrainState) -> None:
        # The peak of training since the last evaluation; evaluation's own memory is reset
        # away after it, so the figure is training's.
        peak[0] = max(peak[0], _peak_memory(device))
        t0 = time.perf_counter()
        if bar is not None:
            bar.set_description(f"{method}: evaluating")
        acc = _evaluate_point(tr, test, shots, ways, queries, episodes, seed, centre_from,
                              stats_from)
        if tr.learner is not None:
            tr.learner.train()
        _reset_peak(device)
        spent = time.perf_counter() - t0
        eval_seconds[0] += spent
        points.append({"train_seconds": state.train_seconds, "steps": state.step,
                       "images": state.images, "flops": _flops(tr, state, flops, small_flops),
                       "peak_memory_bytes": peak[0], "eval_seconds": spent,
                       "accuracy": acc})
        if bar is not None:
            bar.set_description(f"{method}: training")
            bar.n = min(budget, state.train_seconds)
            bar.set_postfix(left=f"{max(0.0, budget - state.train_seconds):.0f}s",
                            acc=f"{acc[str(shots[0])]['logistic']['mean']:.1f}")
            bar.refresh()

    t0 = time.perf_counter()
    history = trainer.fit(train, progress=False,
                          callbacks=[_timer(eval_every, at_point), _Bar(bar, budget)])
    wall = time.perf_counter() - t0
    return {"settings": dataclasses.asdict(cfg), "flops_per_step": flops,
            "shared_protocol_norm": _norm_label(stats_from),
            **({"flops_per_small_step": small_flops} if small_flops is not None else {}),
            "points": points,
            "train_seconds": points[-1]["train_seconds"] if points else 0.0,
            "eval_seconds": eval_seconds[0], "wall_seconds": wall,
            "steps": points[-1]["steps"] if points else 0,
            "images_per_step": (points[-1]["images"] / max(1, points[-1]["steps"]))
            if points else 0, "epochs": len(history), "history": history}


def _check_compare_args(methods: Sequence[str], budget_minutes: float,
                        eval_every: float | Sequence[float], episodes: int,
                        settings: dict[str, dict[str, Any]] | None,
                        sample_images: int = CENTRE_IMAGES) -> None:
    """ValueError naming the first bad argument of :func:`compare`, before any work."""
    if not methods:
        raise ValueError("methods: name at least one method")
    checks.number("budget_minutes", budget_minutes)
    if isinstance(eval_every, (list, tuple)):
        AtTrainingSeconds(eval_every, print)          # checks the times
        first = eval_every[0]
    else:
        first = checks.number("eval_every", eval_every)
    if first > 60 * budget_minutes:
        raise ValueError(f"eval_every ({first} s) is larger than the budget "
                         f"({60 * budget_minutes:g} s)")
    checks.integer("episodes", episodes, 2)
    checks.integer("sample_images", sample_images, 2)
    unknown = sorted(set(settings or {}) - set(registry.METHOD_NAMES))
    if unknown:
        raise ValueError(f"settings: unknown method(s) {unknown}")


def _configs(methods: list[str], settings: dict[str, dict[str, Any]] | None, seed: int,
             budget_minutes: float, recipe: str | None) -> dict[str, tuple[TrainerClass, Any]]:
    """Each method's (trainer class, config) for :func:`compare`."""
    return {m: config_for(m, (settings or {}).get(m), seed, budget_minutes,
                          recipe if registry.METHODS[m].recipe else None) for m in methods}


def compare(methods: Sequence[str], train: FewShotDataset, test: FewShotDataset,
            make_backbone: Callable[[], torch.nn.Module], *, budget_minutes: float,
            eval_every: float | Sequence[float], shots: Sequence[int] = (1, 5),
            ways: int | Sequence[int] = 5, queries: int = 15, episodes: int = 300, seed: int = 0,
            settings: dict[str, dict[str, Any]] | None = None, recipe: str | None = None,
            centre_from: FewShotDataset | None = None, sample_images: int = CENTRE_IMAGES,
            done: dict[str, Any] | None = None, progress: bool = True,
            on_method_done: Callable[[str, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train and evaluate each method; returns ``{method: result}``.

    Args:
        methods: names from :data:`fastmtl.registry.METHOD_NAMES`, run in this order.
        train, test: :class:`fastmtl.data.FewShotDataset` s (disjoint classes).
        make_backbone: builds a fresh backbone (the same architecture for every method).
        budget_minutes: training-time budget of each method (> 0).
        eval_every: seconds of training between evaluations (<= the budget), or a list of
            increasing training times to evaluate at; the end of training always too.
        shots, ways, queries, episodes, seed: the test episodes (the same for every
            method and time point); ``ways`` one number or several (each evaluated at
            every point; accuracies keyed by :func:`fastmtl.compare.accuracy_key`).
        settings: per-method overrides of the registry's comparison settings.
        recipe: MTL's recipe (None: the registry's, the fast one).
        centre_from: the training images without rotations (``eval --centre``'s): also
            evaluate every method by the logistic protocol on features centred on the mean
            feature of ``sample_images`` of them (:func:`centre_sample`, drawn once, the
            same for every method and point), protocol ``"centred"``.
        sample_images: that sample's size, also that of the training images a GBML
            backbone is frozen at in the shared protocols (:func:`shared_protocol_stats`).
        done: results of methods already run (``--resume``): those are kept, not rerun.
        on_method_done: called with (method, result) after each method (to save).
        progress: show a progress bar per method.

    Returns:
        ``{method: {"settings", "flops_per_step", "points": [...], ...}}``.

    Raises:
        ValueError: any bad argument, before any training.

    Example:
        >>> # results = compare(["mtl", "protonet"], train, test, lambda: conv4(),
        >>> #                   budget_minutes=1, eval_every=20)
    """
    methods, ways = list(methods), _ways_list(ways)
    _check_compare_args(methods, budget_minutes, eval_every, episodes, settings, sample_images)
    configs = _configs(methods, settings, seed, budget_minutes, recipe)
    for m, (_, cfg) in configs.items():
        check_data(m, cfg, train, test, shots, ways, queries)
    sample = _centre_images(centre_from, train, seed, sample_images)
    results = dict(done or {})
    for m in [m for m in methods if m not in results]:
        cls, cfg = configs[m]
        with tqdm(total=60 * budget_minutes, desc=f"{m}: training", unit="s", disable=not progress,
                  bar_format="{desc} {bar} {n:.0f}/{total:.0f}s {postfix}") as bar:
            results[m] = run_method(m, cfg, cls, make_backbone, train, test,
                                    eval_every=eval_every, shots=list(shots), ways=ways,
                                    queries=queries, episodes=episodes, seed=seed, bar=bar,
                                    centre_from=sample, sample_images=sample_images)
        if on_method_done is not None:
            on_method_done(m, results[m])
    return results


