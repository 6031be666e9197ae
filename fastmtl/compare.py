"""Time-, FLOP- and memory-to-accuracy of MTL and the GBML baselines, side by side.

:func:`compare` trains each method on the same training classes with a fresh backbone of
the same architecture, for the same training-time budget, one method at a time. At fixed
points of *training* time (an :class:`fastmtl.training.EveryTrainingSeconds` callback,
so the evaluation is kept off the training clock) it evaluates the model on the same
seeded test episodes: the logistic-regression protocol for every method and, for GBML,
the method's own adaptation too. No model selection happens on test episodes: each curve
is what the model is at each time point.

The cost axes: training seconds (this machine), FLOPs (``torch.utils.flop_counter`` on a
real step of each method, so the axis holds on any hardware; ops it cannot count, such
as fastmtl's fused C++ head, are left out, which is a few percent of a Conv-4 step),
images seen and peak memory (the process's resident set on CPU, reset before each method
where Linux allows; ``torch.cuda.max_memory_allocated`` on CUDA).

:func:`speedup_tables` turns the curves into the two tables the README shows: how much
sooner MTL reaches each baseline's best-minus-one-point accuracy, and how much sooner
each baseline reaches MTL's.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from . import checks
from .checkpoint import atomic_savefig
from .config import renamed_fields
from .evaluate import embed, evaluate
from .gbml import METHODS as GBML_METHODS
from .mtl import RECIPES, MTLConfig, MTLTrainer
from .sampling import check_fits
from .training import AtTrainingSeconds, Callback, EveryTrainingSeconds

__all__ = ["METHODS", "DEFAULT_SETTINGS", "PAPER_MTL", "compare", "config_for",
           "speedup_tables", "merge_runs", "markdown", "plot"]

METHODS = ("mtl", "maml", "fomaml", "anil", "r2d2", "protonet")

# Each method's documented settings (README "fastmtl compare"). MTL: the fast recipe
# (tuned on the validation alphabet); MAML/FO-MAML/ANIL: the MAML paper's Omniglot inner
# loop (1 step of lr 0.4 in training, 3 at test) at a meta-batch a 2-core CPU can step
# often; ProtoNet/R2D2: higher-way training episodes, as their papers train. chunk_size 10:
# test episodes vmapped 10 at a time in the method's own evaluation (measured 1.8-2x
# faster than 50 on a 2-core CPU; with meta-batches of 1-4 it does not change training).
# vectorize None: each method's form as measured fastest on the device (on a 2-core CPU:
# MAML/FO-MAML's stacked form on the Conv-4, the per-task loop for the others, ANIL's
# stacked backbone call having fallen behind its loop with the channels-last Conv-4; R2D2
# and ProtoNet run one task a step either way; benchmarks/maml_vs_l2l.py,
# stacked_vs_vmap.py).
DEFAULT_SETTINGS: dict[str, dict[str, Any]] = {
    "mtl": dict(RECIPES["fast"]),
    "maml": dict(n_way=5, k_shot=1, n_query=5, tasks_per_step=4, inner_steps=1, inner_lr=0.4,
                 chunk_size=10, vectorize=None,
                 test_inner_steps=3, tasks_per_epoch=80),
    "fomaml": dict(n_way=5, k_shot=1, n_query=5, tasks_per_step=4, inner_steps=1, inner_lr=0.4,
                   chunk_size=10, vectorize=None,
                   test_inner_steps=3, tasks_per_epoch=80),
    "anil": dict(n_way=5, k_shot=1, n_query=5, tasks_per_step=4, inner_steps=1, inner_lr=0.4,
                 chunk_size=10, vectorize=None,
                 test_inner_steps=3, tasks_per_epoch=80),
    "r2d2": dict(n_way=20, k_shot=1, n_query=5, tasks_per_step=1, tasks_per_epoch=20,
                 chunk_size=10),
    "protonet": dict(n_way=20, k_shot=1, n_query=5, tasks_per_step=1, lr_decay_every=None,
                     tasks_per_epoch=20, chunk_size=10),
}

# The paper's recipe (its official code's settings), as `--recipe paper` names it: every
# field at MTLConfig's default.
PAPER_MTL: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(MTLConfig)
                             if f.name in RECIPES["fast"]}


def config_for(method: str, overrides: dict[str, Any] | None = None, seed: int = 0,
               budget_minutes: float | None = None):
    """(trainer class, config) of ``method`` with its documented settings and ``overrides``.

    Args:
        method: one of :data:`METHODS`.
        overrides: fields of the method's config to change (old field names work, with a
            DeprecationWarning).
        seed: the run's seed.
        budget_minutes: the training-time budget (None: none).

    Returns:
        the trainer class and its validated config (epochs unbounded, no checkpoints).

    Raises:
        ValueError: an unknown method, an override that is not a field of its config, or
            an override value out of range.

    Example:
        >>> cls, cfg = config_for("protonet", {"n_way": 30}, budget_minutes=5)
        >>> cls.__name__, cfg.n_way, cfg.max_minutes
        ('ProtoNet', 30, 5)
    """
    if method not in METHODS:
        raise ValueError(f"methods: unknown method {method!r}; choose from {', '.join(METHODS)}")
    if method == "mtl":
        cls, config_cls, fixed = MTLTrainer, MTLConfig, {}
    else:
        cls, config_cls, fixed = GBML_METHODS[method]
    overrides = renamed_fields(config_cls, overrides or {}, f"settings for {method}")
    settings = dict(DEFAULT_SETTINGS[method], **overrides)
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(settings) - names)
    if unknown:
        raise ValueError(f"settings for {method}: unknown field(s) {unknown} of "
                         f"{config_cls.__name__}")
    settings.update(fixed, seed=seed, epochs=10**9, max_minutes=budget_minutes,
                    checkpoint_dir=None)
    cfg = config_cls(**settings)
    cfg.validate()
    return cls, cfg


def check_data(method: str, cfg, train, test, shots, ways: int, queries: int) -> None:
    """ValueError unless ``train`` holds ``method``'s tasks and ``test`` the test episodes."""
    if method == "mtl" and cfg.task_sampling == "all_classes":
        need_ways, need_images = 1, 1
    elif method == "mtl":
        need_ways, need_images = cfg.n_way, cfg.images_per_class
    else:
        need_ways, need_images = cfg.n_way, cfg.k_shot + cfg.n_query
    try:
        check_fits(train.labels, need_ways, need_images, where="training ",
                   ways_name=f"{method} n_way", need_name=f"{method}'s images a class")
        check_fits(test.labels, ways, max(shots) + queries, where="test ", ways_name="ways",
                   need_name="shots + queries")
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
    def __init__(self, steps: int):
        self.steps = steps

    def on_step_end(self, trainer, state):
        return state.step >= self.steps


def flop_counter():
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

    def backward(grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation,
                 transposed, output_padding, groups, output_mask, out_shape, **kwargs):
        def part(mask):
            # torch's formula, as registered (it takes the output as out_val)
            return conv_backward_flop(grad_out_shape, x_shape, w_shape, bias, stride, padding,
                                      dilation, transposed, output_padding, groups, mask,
                                      out_val=out_shape)
        total = part([output_mask[0], False, False])
        if output_mask[1]:
            total += part([False, True, False]) // groups
        return total

    return FlopCounterMode(display=False,
                           custom_mapping={torch.ops.aten.convolution_backward: backward})


def flops_per_step(cls, cfg, make_backbone: Callable[[], torch.nn.Module], train) -> int:
    """FLOPs of one real training step of ``cls(cfg)`` (forward, backward, update), counted
    by :func:`flop_counter`."""
    torch.manual_seed(cfg.seed)
    trainer = cls(make_backbone(), dataclasses.replace(cfg, max_minutes=None))
    trainer.fit(train, progress=False, callbacks=[_StopAfter(1)])     # warm-up, builds
    counter = flop_counter()
    with counter:
        trainer.fit(train, progress=False, callbacks=[_StopAfter(1)])
    return int(counter.get_total_flops())


def _step_flops(cls, cfg, make_backbone, train) -> tuple[int, int | None]:
    """FLOPs of a full step and, for MTL with progressive resizing, of a step on small
    images (a fresh trainer's first step is one of them; None without it)."""
    flops = flops_per_step(cls, cfg, make_backbone, train)
    if getattr(cfg, "small_images", 1.0) >= 1:
        return flops, None
    full = flops_per_step(cls, dataclasses.replace(cfg, small_images=1.0), make_backbone, train)
    return full, flops


def _flops(trainer, state, flops: int, small_flops: int | None) -> int:
    """FLOPs of ``state.step`` steps: full-size steps at ``flops``, and with progressive
    resizing the trainer's ``small_image_steps`` at ``small_flops``."""
    if small_flops is None:
        return state.step * flops
    small = trainer.small_image_steps
    return small * small_flops + (state.step - small) * flops


def _evaluate_point(trainer, method, test, shots, ways, queries, episodes, seed):
    out = {}
    feats = embed(trainer.backbone, test, progress=False)
    for k in shots:
        res = {"logistic": evaluate(trainer.backbone, test, n_way=ways, k_shot=k,
                                    n_query=queries, episodes=episodes, seed=seed,
                                    features=feats, progress=False)}
        if method != "mtl" and trainer.supports_ways(ways):
            res["own"] = trainer.evaluate(test, n_way=ways, k_shot=k, n_query=queries,
                                          episodes=episodes, seed=seed, progress=False)
        out[str(k)] = {p: {"mean": r["mean"], "ci95": r["ci95"]} for p, r in res.items()}
    return out


def run_method(method: str, cfg, cls, make_backbone, train, test, *, eval_every,
               shots, ways: int, queries: int, episodes: int, seed: int,
               bar: tqdm | None = None) -> dict[str, Any]:
    """Train one method for ``cfg.max_minutes`` and evaluate it every ``eval_every`` s."""
    flops, small_flops = _step_flops(cls, cfg, make_backbone, train)
    torch.manual_seed(seed)
    trainer = cls(make_backbone(), cfg)
    device = trainer.device
    _reset_peak(device)
    points: list[dict[str, Any]] = []
    eval_seconds = [0.0]
    budget = 60.0 * cfg.max_minutes

    peak = [0]

    def at_point(tr, state):
        # The peak of training since the last evaluation; evaluation's own memory is reset
        # away after it, so the figure is training's.
        peak[0] = max(peak[0], _peak_memory(device))
        t0 = time.perf_counter()
        if bar is not None:
            bar.set_description(f"{method}: evaluating")
        acc = _evaluate_point(tr, method, test, shots, ways, queries, episodes, seed)
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

    class _Bar(Callback):
        def on_step_end(self, tr, state):
            if bar is not None and state.step % 10 == 0:
                bar.n = min(budget, state.train_seconds)
                bar.set_postfix(left=f"{max(0.0, budget - state.train_seconds):.0f}s",
                                loss=f"{state.loss:.3f}")
                bar.refresh()

    t0 = time.perf_counter()
    timer = (AtTrainingSeconds(eval_every, at_point) if isinstance(eval_every, (list, tuple))
             else EveryTrainingSeconds(eval_every, at_point))
    history = trainer.fit(train, progress=False, callbacks=[timer, _Bar()])
    wall = time.perf_counter() - t0
    return {"settings": dataclasses.asdict(cfg), "flops_per_step": flops,
            **({"flops_per_small_step": small_flops} if small_flops is not None else {}),
            "points": points,
            "train_seconds": points[-1]["train_seconds"] if points else 0.0,
            "eval_seconds": eval_seconds[0], "wall_seconds": wall,
            "steps": points[-1]["steps"] if points else 0,
            "images_per_step": (points[-1]["images"] / max(1, points[-1]["steps"]))
            if points else 0, "epochs": len(history), "history": history}


def _check_compare_args(methods, budget_minutes, eval_every, episodes, settings) -> None:
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
    unknown = sorted(set(settings or {}) - set(METHODS))
    if unknown:
        raise ValueError(f"settings: unknown method(s) {unknown}")


def compare(methods, train, test, make_backbone: Callable[[], torch.nn.Module], *,
            budget_minutes: float, eval_every: float, shots=(1, 5), ways: int = 5,
            queries: int = 15, episodes: int = 300, seed: int = 0,
            settings: dict[str, dict[str, Any]] | None = None,
            done: dict[str, Any] | None = None,
            on_method_done: Callable[[str, dict[str, Any]], None] | None = None,
            progress: bool = True) -> dict[str, Any]:
    """Train and evaluate each method; returns ``{method: result}``.

    Args:
        methods: names from :data:`METHODS`, run in this order.
        train, test: :class:`fastmtl.data.FewShotDataset` s (disjoint classes).
        make_backbone: builds a fresh backbone (the same architecture for every method).
        budget_minutes: training-time budget of each method (> 0).
        eval_every: seconds of training between evaluations (<= the budget), or a list
            of increasing training times to evaluate at; the end of training is always
            evaluated too.
        shots, ways, queries, episodes, seed: the test episodes (the same for every
            method and time point).
        settings: per-method overrides of :data:`DEFAULT_SETTINGS`.
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
    methods = list(methods)
    _check_compare_args(methods, budget_minutes, eval_every, episodes, settings)
    settings = settings or {}
    configs = {}
    for m in methods:
        cls, cfg = config_for(m, settings.get(m), seed, budget_minutes)
        check_data(m, cfg, train, test, shots, ways, queries)
        configs[m] = (cls, cfg)
    results = dict(done or {})
    for m in methods:
        if m in results:
            continue
        cls, cfg = configs[m]
        with tqdm(total=60 * budget_minutes, desc=f"{m}: training", unit="s",
                  bar_format="{desc} {bar} {n:.0f}/{total:.0f}s {postfix}",
                  disable=not progress) as bar:
            results[m] = run_method(m, cfg, cls, make_backbone, train, test,
                                    eval_every=eval_every, shots=list(shots), ways=ways,
                                    queries=queries, episodes=episodes, seed=seed, bar=bar)
        if on_method_done is not None:
            on_method_done(m, results[m])
    return results


# -- reading the curves ----------------------------------------------------------------------
def _curve(result, shot: str, protocol: str):
    pts = [p for p in result["points"] if protocol in p["accuracy"][shot]]
    return ([p["train_seconds"] for p in pts], [p["flops"] for p in pts],
            [p["accuracy"][shot][protocol]["mean"] for p in pts])


def _first_reach(result, shot, protocol, target):
    for t, f, a in zip(*_curve(result, shot, protocol)):
        if a >= target:
            return t, f
    return None


def _first_reach_interpolated(result, shot, protocol, target):
    """Like :func:`_first_reach`, the crossing placed by linear interpolation between the
    evaluation before it and the first at or above the target (at the first point, that
    point: nothing is known before it)."""
    times, flops, accs = _curve(result, shot, protocol)
    for i, a in enumerate(accs):
        if a >= target:
            if i == 0 or accs[i] == accs[i - 1]:
                return times[i], flops[i]
            f = (target - accs[i - 1]) / (accs[i] - accs[i - 1])
            return (times[i - 1] + f * (times[i] - times[i - 1]),
                    flops[i - 1] + f * (flops[i] - flops[i - 1]))
    return None


def _at_time(result, shot, protocol, seconds):
    """Accuracy at the last evaluation point at or before ``seconds`` of training."""
    best = None
    for t, _, a in zip(*_curve(result, shot, protocol)):
        if t <= seconds + 1e-9:
            best = a
    return best


def _ratio(a, b, i: int):
    """a[i] / b[i] for (seconds, FLOPs) pairs, None where either is missing or zero."""
    return a[i] / b[i] if a and b and b[i] > 0 else None


def _mtl_vs(ref, b, res, shot, protocol, ref_best):
    """How soon MTL (``ref``) reaches baseline ``b``'s best - 1 under ``protocol``."""
    times, _, accs = _curve(res, shot, protocol)
    if not accs:
        return None
    target = max(accs) - 1.0
    tb, tm = _first_reach(res, shot, protocol, target), _first_reach(ref, shot, "logistic", target)
    tbi = _first_reach_interpolated(res, shot, protocol, target)
    tmi = _first_reach_interpolated(ref, shot, "logistic", target)
    mtl_at = _at_time(ref, shot, "logistic", times[-1])
    return {"baseline": b, "protocol": protocol, "best": max(accs), "final": accs[-1],
            "target": target, "baseline_seconds": tb[0], "baseline_flops": tb[1],
            "mtl_seconds": tm[0] if tm else None, "mtl_flops": tm[1] if tm else None,
            "speedup_time": _ratio(tb, tm, 0), "speedup_flops": _ratio(tb, tm, 1),
            "speedup_time_interpolated": _ratio(tbi, tmi, 0),
            "speedup_flops_interpolated": _ratio(tbi, tmi, 1), "mtl_best": ref_best,
            "mtl_minus_baseline_at_equal_time":
                (mtl_at - accs[-1]) if mtl_at is not None else None,
            "equal_time_seconds": times[-1]}


def _baseline_vs(ref, b, res, shot, ref_best):
    """How soon baseline ``b`` reaches MTL's best - 1 (logistic protocol)."""
    target = ref_best - 1.0
    tm, tb = _first_reach(ref, shot, "logistic", target), _first_reach(res, shot, "logistic", target)
    tmi = _first_reach_interpolated(ref, shot, "logistic", target)
    tbi = _first_reach_interpolated(res, shot, "logistic", target)
    return {"baseline": b, "target": target, "mtl_seconds": tm[0], "mtl_flops": tm[1],
            "baseline_seconds": tb[0] if tb else None,
            "baseline_flops": tb[1] if tb else None,
            "baseline_speedup_time": _ratio(tm, tb, 0),
            "baseline_speedup_flops": _ratio(tm, tb, 1),
            "baseline_speedup_time_interpolated": _ratio(tmi, tbi, 0),
            "baseline_best": max(_curve(res, shot, "logistic")[2])}


def speedup_tables(results: dict[str, Any], reference: str = "mtl") -> dict[str, Any]:
    """Per shot setting: MTL's speed-up over each baseline, and each baseline's over MTL.

    For baseline b (protocol p: logistic, or b's own adaptation): target
    a_b = b's best accuracy - 1; the first time (and FLOPs) b reached a_b and MTL
    (logistic) reached a_b; the ratios; MTL minus b at b's last evaluation time. The other
    way round: target a = MTL's best - 1, and when b first reached it. Times are those
    of the first evaluation at or above the target (conservative: the crossing lies
    between it and the one before); ``*_interpolated`` place the crossing linearly
    between those two evaluations.

    Args:
        results: ``compare.json``'s ``results`` (method -> its evaluation points).
        reference: the method the others are measured against.

    Returns:
        ``{shot: {"mtl_vs_baselines": rows, "baselines_vs_mtl": rows}}``, a row per
        baseline (and per protocol).

    Example:
        >>> def curve(*points):               # (training seconds, 1-shot accuracy)
        ...     return {"points": [{"train_seconds": t, "flops": t * 1e9, "accuracy":
        ...                         {"1": {"logistic": {"mean": a, "ci95": 1.0}}}}
        ...                        for t, a in points]}
        >>> tables = speedup_tables({"mtl": curve((10, 80.0), (20, 86.0)),
        ...                          "protonet": curve((10, 70.0), (20, 80.0), (40, 85.0))})
        >>> row = tables["1"]["mtl_vs_baselines"][0]
        >>> row["target"], row["baseline_seconds"], row["mtl_seconds"], row["speedup_time"]
        (84.0, 40, 20, 2.0)
    """
    if reference not in results or not results[reference]["points"]:
        return {}
    ref = results[reference]
    tables: dict[str, Any] = {}
    for shot in ref["points"][0]["accuracy"]:
        ref_best = max(_curve(ref, shot, "logistic")[2])
        baselines = [(b, r) for b, r in results.items() if b != reference and r["points"]]
        rows = [_mtl_vs(ref, b, r, shot, p, ref_best) for b, r in baselines
                for p in ("logistic", "own")]
        tables[shot] = {"mtl_vs_baselines": [r for r in rows if r is not None],
                        "baselines_vs_mtl": [_baseline_vs(ref, b, r, shot, ref_best)
                                             for b, r in baselines]}
    return tables


# Settings that must agree for runs to be averaged point by point (the seed must not).
_MERGE_SAME = ("data", "backbone", "rotations", "budget_minutes", "eval_every", "shots",
               "ways", "queries", "episodes", "recipe", "settings_overrides")


def _mean_point(points: list[dict[str, Any]]) -> dict[str, Any]:
    """One evaluation point from the same point of several runs: costs averaged, peak
    memory the largest, each accuracy the mean of the runs' means with its seeds kept."""
    n = len(points)
    out = {k: sum(p[k] for p in points) / n
           for k in ("train_seconds", "steps", "images", "flops", "eval_seconds")}
    out["peak_memory_bytes"] = max(p["peak_memory_bytes"] for p in points)
    acc: dict[str, Any] = {}
    for shot, protocols in points[0]["accuracy"].items():
        acc[shot] = {}
        for prot in protocols:
            means = [p["accuracy"][shot][prot]["mean"] for p in points]
            cis = [p["accuracy"][shot][prot]["ci95"] for p in points]
            # The runs' test episodes are independent draws (the seed differs), so the
            # half-width of the mean of n means is sqrt(sum ci^2) / n.
            acc[shot][prot] = {"mean": sum(means) / n,
                               "ci95": float(np.sqrt(np.sum(np.square(cis)))) / n,
                               "per_seed": means}
    out["accuracy"] = acc
    return out


def _check_mergeable(payloads) -> tuple[list, list[str]]:
    """(seeds, methods) of runs :func:`merge_runs` can average; ValueError otherwise."""
    if not isinstance(payloads, (list, tuple)) or len(payloads) < 2:
        raise ValueError(f"payloads: merging needs two or more runs, got "
                         f"{len(payloads) if isinstance(payloads, (list, tuple)) else payloads!r}")
    first = payloads[0]
    seeds = [p.get("seed") for p in payloads]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"payloads: runs must differ in their seed, got seeds {seeds}")
    methods = [m for m, r in first["results"].items() if r["points"]]
    for i, p in enumerate(payloads[1:], 1):
        diff = [k for k in _MERGE_SAME if p.get(k) != first.get(k)]
        if diff:
            raise ValueError(f"payloads[{i}] differs from payloads[0] in {', '.join(diff)}")
        ms = [m for m, r in p["results"].items() if r["points"]]
        if sorted(ms) != sorted(methods):
            raise ValueError(f"payloads[{i}] holds methods {ms}, payloads[0] {methods}")
        for m in methods:
            a, b = first["results"][m]["points"], p["results"][m]["points"]
            if len(a) != len(b):
                raise ValueError(f"payloads[{i}]: {m} has {len(b)} evaluation points, "
                                 f"payloads[0] {len(a)}")
            if [sorted(x["accuracy"]) for x in a] != [sorted(x["accuracy"]) for x in b]:
                raise ValueError(f"payloads[{i}]: {m} was evaluated at other shots")
    return seeds, methods


def _mean_result(runs: list[dict[str, Any]], seeds: list) -> dict[str, Any]:
    """One method's result from its runs: the mean curve and the mean totals."""
    points = [_mean_point(list(pts)) for pts in zip(*(r["points"] for r in runs))]
    return {"settings": runs[0].get("settings"), "seeds": seeds, "points": points,
            **{k: sum(r[k] for r in runs) / len(runs)
               for k in ("flops_per_step", "images_per_step", "train_seconds",
                         "eval_seconds", "steps")},
            "steps_per_seed": [r["steps"] for r in runs],
            **({"flops_per_small_step": sum(r["flops_per_small_step"] for r in runs) / len(runs)}
               if all("flops_per_small_step" in r for r in runs) else {})}


def merge_runs(payloads: list[dict[str, Any]]) -> dict[str, Any]:
    """Average finished comparisons that differ only in their seed, point by point.

    Each method's curve becomes the mean of its runs' curves at the same evaluation
    points (training seconds, steps and FLOPs averaged too), and the speed-up tables are
    computed again on the mean curves; each run's own tables are kept beside them
    (``per_seed_tables``), so a ratio that holds on the mean but not in every run shows.

    Args:
        payloads: two or more ``compare.json`` contents, the same settings and methods
            (in any order), each with a different ``seed``.

    Returns:
        A ``compare.json``-like payload: ``seeds``, ``commands``, ``machines``, ``results``
        (mean curves, each accuracy with its ``per_seed`` values), ``tables`` and
        ``per_seed_tables``.

    Raises:
        ValueError: fewer than two runs, a repeated seed, or runs whose settings, methods
            or evaluation points differ (the message names the run and what differs).

    Example:
        >>> def run(seed, accs):
        ...     pts = [{"train_seconds": t, "steps": t, "images": t, "flops": t * 1e9,
        ...             "eval_seconds": 1.0, "peak_memory_bytes": 1,
        ...             "accuracy": {"1": {"logistic": {"mean": a, "ci95": 1.0}}}}
        ...            for t, a in zip((10, 20), accs)]
        ...     res = {"points": pts, "steps": 20, "flops_per_step": 1e9,
        ...            "images_per_step": 1.0, "train_seconds": 20, "eval_seconds": 2.0}
        ...     return {"seed": seed, "shots": [1], "eval_every": 10, "results": {"mtl": res}}
        >>> merged = merge_runs([run(0, (80.0, 90.0)), run(1, (84.0, 92.0))])
        >>> [p["accuracy"]["1"]["logistic"]["mean"] for p in merged["results"]["mtl"]["points"]]
        [82.0, 91.0]
    """
    seeds, methods = _check_mergeable(payloads)
    first = payloads[0]
    results = {m: _mean_result([p["results"][m] for p in payloads], seeds) for m in methods}
    merged = {k: v for k, v in first.items()
              if k not in ("results", "tables", "seed", "command", "machine")}
    merged.update(seeds=seeds, commands=[p.get("command") for p in payloads],
                  machine=first.get("machine", {}),
                  machines=[p.get("machine") for p in payloads], results=results,
                  tables=speedup_tables(results),
                  per_seed_tables=[speedup_tables({m: p["results"][m] for m in methods})
                                   for p in payloads])
    return merged


def _fmt(x, spec=".1f", none="-", suffix=""):
    return none if x is None else format(x, spec) + suffix


def _merge_note(payload: dict[str, Any]) -> list[str]:
    """What a merged payload's figures are (nothing for one run)."""
    if "seeds" not in payload:
        return []
    return ["", f"The mean of {len(payload['seeds'])} runs (seeds "
            f"{', '.join(map(str, payload['seeds']))}) at each evaluation point; steps and "
            "seconds are their means, the tables are computed on the mean curves, and each "
            "run's own speed-ups follow them."]


def _small_step(result: dict[str, Any]) -> str:
    """" (x small)": the GFLOPs of a step on small images, where a run had such steps."""
    small = result.get("flops_per_small_step")
    return "" if small is None else f" ({small / 1e9:.2f} small)"


def _method_rows(payload: dict[str, Any]) -> list[str]:
    """A Markdown table row per method: costs, final and best accuracy per shot."""
    lines = []
    for m, r in payload["results"].items():
        if not r["points"]:
            continue
        cells = []
        own = []
        for s in payload["shots"]:
            _, _, acc = _curve(r, str(s), "logistic")
            cells.append(f"{acc[-1]:.1f} / {max(acc):.1f}")
            _, _, oacc = _curve(r, str(s), "own")
            own.append(f"{oacc[-1]:.1f}" if oacc else "-")
        peak = max(p["peak_memory_bytes"] for p in r["points"]) / 2**20
        lines.append(f"| {m} | {r['steps']:,.0f} | {r['images_per_step']:.0f} | "
                     f"{r['flops_per_step'] / 1e9:.2f}{_small_step(r)} | "
                     f"{r['train_seconds']:.0f} | "
                     f"{r['eval_seconds']:.0f} | {peak:.0f} | " + " | ".join(cells) + " | "
                     + " | ".join(own) + " |")
    return lines


def markdown(payload: dict[str, Any]) -> str:
    """The comparison as Markdown (the text of ``compare.md``) from ``payload``, the
    contents of ``compare.json``: per-method figures, then the speed-up tables."""
    tables = payload["tables"]
    lines = [f"# fastmtl compare: {payload['data']}, {payload['backbone']}, "
             f"{payload['budget_minutes']:g} min of training each", "",
             f"Machine: {payload['machine'].get('cpu')}, {payload['machine'].get('torch_threads')} "
             f"threads{', ' + payload['machine']['cuda_device'] if 'cuda_device' in payload['machine'] else ''}. "
             f"Test: {payload['ways']}-way, {payload['queries']} queries a class, "
             f"{payload['episodes']} episodes a point (the same for every method and point), "
             f"logistic-regression protocol unless marked *own*.", "",
             "| method | steps | images/step | GFLOPs/step | train s | eval s | peak memory (MB) | "
             + " | ".join(f"{s}-shot final / best" for s in payload["shots"])
             + " | " + " | ".join(f"{s}-shot own final" for s in payload["shots"]) + " |",
             "|---" * (7 + 2 * len(payload["shots"])) + "|"]
    lines[1:1] = _merge_note(payload)
    lines += _method_rows(payload)
    for shot, t in tables.items():
        lines += ["", f"## {shot}-shot: how much sooner MTL reaches each baseline's best - 1",
                  "", "| baseline | target | baseline reached at s (TFLOPs) | MTL reached at s "
                  "(TFLOPs) | speed-up of MTL: time | FLOPs | interpolated: time / FLOPs | "
                  "MTL - baseline at equal time |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in t["mtl_vs_baselines"]:
            name = r["baseline"] + (" *own*" if r["protocol"] == "own" else "")
            mtl = (f"{r['mtl_seconds']:.0f} ({r['mtl_flops'] / 1e12:.2f})"
                   if r["mtl_seconds"] is not None else f"not reached (MTL best {r['mtl_best']:.1f})")
            lines.append(f"| {name} | {r['target']:.1f} | {r['baseline_seconds']:.0f} "
                         f"({r['baseline_flops'] / 1e12:.2f}) | {mtl} | "
                         f"{_fmt(r['speedup_time'], '.1f', suffix='x')} | "
                         f"{_fmt(r['speedup_flops'], '.1f', suffix='x')} | "
                         f"{_fmt(r['speedup_time_interpolated'], '.1f', suffix='x')} / "
                         f"{_fmt(r['speedup_flops_interpolated'], '.1f', suffix='x')} | "
                         f"{_fmt(r['mtl_minus_baseline_at_equal_time'], '+.1f')} "
                         f"(at {r['equal_time_seconds']:.0f} s) |")
        lines += ["", f"## {shot}-shot: how much sooner each baseline reaches MTL's best - 1", "",
                  "| baseline | target | MTL reached at s | baseline reached at s | speed-up of "
                  "baseline: time | FLOPs | interpolated: time |", "|---|---|---|---|---|---|---|"]
        for r in t["baselines_vs_mtl"]:
            bs = (f"{r['baseline_seconds']:.0f}" if r["baseline_seconds"] is not None
                  else f"not reached (best {r['baseline_best']:.1f})")
            lines.append(f"| {r['baseline']} | {r['target']:.1f} | {r['mtl_seconds']:.0f} | {bs} | "
                         f"{_fmt(r['baseline_speedup_time'], '.2f', suffix='x')} | "
                         f"{_fmt(r['baseline_speedup_flops'], '.2f', suffix='x')} | "
                         f"{_fmt(r['baseline_speedup_time_interpolated'], '.2f', suffix='x')} |")
    lines += _per_seed_markdown(payload)
    return "\n".join(lines) + "\n"


def _per_seed_markdown(payload: dict[str, Any]) -> list[str]:
    """Each run's speed-ups of MTL, time (FLOPs), beside those of the mean curves."""
    per_seed = payload.get("per_seed_tables")
    if not per_seed:
        return []
    lines = []
    for shot, t in payload["tables"].items():
        lines += ["", f"## {shot}-shot: MTL's speed-up in each run, time (FLOPs)", "",
                  "| baseline | mean curves | " + " | ".join(f"seed {s}" for s in payload["seeds"])
                  + " | smallest |", "|---" * (3 + len(per_seed)) + "|"]
        for i, r in enumerate(t["mtl_vs_baselines"]):
            runs = [tables[shot]["mtl_vs_baselines"][i] for tables in per_seed]
            cells = [f"{_fmt(x['speedup_time'], suffix='x')} ({_fmt(x['speedup_flops'], suffix='x')})"
                     for x in [r] + runs]
            times = [x["speedup_time"] for x in runs]
            low = "-" if None in times else f"{min(times):.1f}x"
            name = r["baseline"] + (" *own*" if r["protocol"] == "own" else "")
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {low} |")
    return lines


def plot(payload: dict[str, Any], path: str) -> None:
    """Accuracy against training seconds (top) and FLOPs (bottom), a column per shot:
    the logistic-regression protocol with its 95% CI band, and each GBML method's own
    adaptation dashed.

    Args:
        payload: the contents of ``compare.json``.
        path: the image file to write (atomically; any format matplotlib writes).
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shots = [str(s) for s in payload["shots"]]
    fig, axes = plt.subplots(2, len(shots), figsize=(5.5 * len(shots), 7.5), squeeze=False)
    colors = dict(zip(METHODS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for j, shot in enumerate(shots):
        for m, r in payload["results"].items():
            pts = r["points"]
            if not pts:
                continue
            acc = np.array([p["accuracy"][shot]["logistic"]["mean"] for p in pts])
            ci = np.array([p["accuracy"][shot]["logistic"]["ci95"] for p in pts])
            own = [p for p in pts if "own" in p["accuracy"][shot]]
            own_acc = np.array([p["accuracy"][shot]["own"]["mean"] for p in own])
            for i, key in enumerate(("train_seconds", "flops")):
                x = np.array([p[key] for p in pts], dtype=float)
                ax = axes[i][j]
                ax.plot(x, acc, "o-", ms=3, color=colors.get(m), label=m)
                ax.fill_between(x, acc - ci, acc + ci, color=colors.get(m), alpha=0.2)
                if own:       # the method's own adaptation, dashed, no band
                    ax.plot(np.array([p[key] for p in own], dtype=float), own_acc, "--",
                            lw=1, color=colors.get(m), label=f"{m}, own" if i == 0 else None)
        for i, label in enumerate(("training seconds", "training FLOPs")):
            ax = axes[i][j]
            ax.set_xlabel(label)
            ax.set_ylabel(f"5-way {shot}-shot accuracy (%)")
            ax.grid(alpha=0.3)
            if i == 1:
                ax.set_xscale("log")
        axes[0][j].set_title(f"{shot}-shot: logistic-regression protocol (dashed: own)")
    axes[0][0].legend(fontsize=8, ncol=2)
    fig.suptitle(f"fastmtl compare: {payload['data']}, {payload['backbone']}")
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)
