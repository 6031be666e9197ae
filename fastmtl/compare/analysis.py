"""Reading comparison curves: speed-up tables, and the mean of runs that differ in seed.

:func:`speedup_tables` turns the curves into the two tables the README shows: how much
sooner MTL reaches each baseline's best-minus-one-point accuracy, and how much sooner
each baseline reaches MTL's. :func:`merge_runs` averages finished runs point by point.
:data:`COMPARABLE` is the one list of the settings two runs must share to be read
together; ``fastmtl compare --resume`` and ``fastmtl merge`` both check it
(:func:`differences`).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

__all__ = ["COMPARABLE", "PROTOCOL_PAIRS", "differences", "speedup_tables", "merge_runs",
           "curve", "setting", "accuracy_key", "accuracy_keys"]

# What makes two comparison runs measure the same thing (their compare.json keys; a dot
# reads inside a key: the torch threads, which set every time axis). A resumed run must
# match the saved one in these and the seed; runs merged must match in these and differ
# in the seed.
COMPARABLE = ("data", "root", "image_size", "data_seed", "channels", "skip_bad_images",
              "backbone", "rotations", "budget_minutes", "eval_every", "shots", "ways",
              "also_ways", "queries", "episodes", "eval_split", "recipe", "settings_overrides",
              "sample_images", "machine.torch_threads")
# What a key absent from a compare.json (one written before the key was recorded) means.
# sample_images: the one sample size (run.CENTRE_IMAGES) before --sample-images.
_ABSENT = {"also_ways": [], "eval_split": "test", "channels": 3, "skip_bad_images": False,
           "sample_images": 4096}

_Result = dict[str, Any]                    # one method's entry of compare.json's results
_Reach = tuple[float, float] | None         # (seconds, FLOPs) of a crossing, None: never


def differences(a: dict[str, Any], b: dict[str, Any],
                keys: Iterable[str] = COMPARABLE) -> list[str]:
    """The settings of :data:`COMPARABLE` (or ``keys``) in which payloads ``a`` and ``b``
    differ; a key absent from both (a run written before it was recorded) is equal.

    Example:
        >>> differences({"ways": 5, "shots": [1, 5]}, {"ways": 20, "shots": [1, 5]})
        ['ways']
    """
    return [k for k in keys if setting(a, k) != setting(b, k)]


def setting(payload: dict[str, Any], key: str) -> Any:
    """``payload[key]``, a dot reading inside a key (``"machine.torch_threads"``); where
    absent, what its absence means (``also_ways``: none, ``eval_split``: test,
    ``sample_images``: 4096, the folder flags their defaults) or None.

    Example:
        >>> setting({"machine": {"torch_threads": 2}}, "machine.torch_threads")
        2
        >>> setting({}, "eval_split")
        'test'
    """
    value: Any = payload
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return _ABSENT.get(key) if value is None else value


def accuracy_key(ways: int, shot: int, main_ways: int) -> str:
    """The key of an evaluation point's ``accuracy`` for ``ways``-way ``shot``-shot
    episodes: the shot (``"1"``) at the run's main ``ways``, ``"20w1"`` at other ways.

    Example:
        >>> accuracy_key(5, 1, 5), accuracy_key(20, 1, 5)
        ('1', '20w1')
    """
    return str(shot) if ways == main_ways else f"{ways}w{shot}"


def accuracy_keys(payload: dict[str, Any]) -> list[tuple[str, str]]:
    """(key, label) of each test setting of a compare.json: the main ways' shots, then
    those of each of ``also_ways``.

    Example:
        >>> [k for k, _ in accuracy_keys({"ways": 5, "shots": [1, 5], "also_ways": [20]})]
        ['1', '5', '20w1', '20w5']
        >>> accuracy_keys({"ways": 5, "shots": [1]})
        [('1', '5-way 1-shot')]
    """
    main = payload["ways"]
    return [(accuracy_key(w, s, main), f"{w}-way {s}-shot")
            for w in [main, *setting(payload, "also_ways")] for s in payload["shots"]]


def curve(result: _Result, shot: str,
          protocol: str) -> tuple[list[float], list[float], list[float]]:
    """(training seconds, FLOPs, mean accuracy) of each evaluation point of ``result`` that
    measured ``protocol`` at ``shot`` shots.

    Example:
        >>> curve({"points": [{"train_seconds": 10, "flops": 1e9,
        ...                    "accuracy": {"1": {"logistic": {"mean": 80.0}}}}]}, "1", "logistic")
        ([10], [1000000000.0], [80.0])
    """
    pts = [p for p in result["points"] if protocol in p["accuracy"][shot]]
    return ([p["train_seconds"] for p in pts], [p["flops"] for p in pts],
            [p["accuracy"][shot][protocol]["mean"] for p in pts])


def _first_reach(result: _Result, shot: str, protocol: str, target: float) -> _Reach:
    for t, f, a in zip(*curve(result, shot, protocol), strict=True):
        if a >= target:
            return t, f
    return None


def _first_reach_interpolated(result: _Result, shot: str, protocol: str,
                              target: float) -> _Reach:
    """Like :func:`_first_reach`, the crossing placed by linear interpolation between the
    evaluation before it and the first at or above the target (at the first point, that
    point: nothing is known before it)."""
    times, flops, accs = curve(result, shot, protocol)
    for i, a in enumerate(accs):
        if a >= target:
            if i == 0 or accs[i] == accs[i - 1]:
                return times[i], flops[i]
            f = (target - accs[i - 1]) / (accs[i] - accs[i - 1])
            return (times[i - 1] + f * (times[i] - times[i - 1]),
                    flops[i - 1] + f * (flops[i] - flops[i - 1]))
    return None


def _at_time(result: _Result, shot: str, protocol: str, seconds: float) -> float | None:
    """Accuracy at the last evaluation point at or before ``seconds`` of training."""
    best = None
    for t, _, a in zip(*curve(result, shot, protocol), strict=True):
        if t <= seconds + 1e-9:
            best = a
    return best


def _ratio(a: _Reach, b: _Reach, i: int) -> float | None:
    """a[i] / b[i] for (seconds, FLOPs) pairs, None where either is missing or zero."""
    return a[i] / b[i] if a and b and b[i] > 0 else None


def _mtl_vs(ref: _Result, b: str, res: _Result, shot: str, protocol: str,
            mtl_protocol: str = "logistic") -> dict[str, Any] | None:
    """How soon MTL (``ref``, by ``mtl_protocol``) reaches baseline ``b``'s best - 1 under
    ``protocol``; None where either curve was not measured."""
    times, _, accs = curve(res, shot, protocol)
    mtl_accs = curve(ref, shot, mtl_protocol)[2]
    if not accs or not mtl_accs:
        return None
    target = max(accs) - 1.0
    tb = _first_reach(res, shot, protocol, target)
    tm = _first_reach(ref, shot, mtl_protocol, target)
    assert tb is not None  # the baseline reaches its own best - 1
    tbi = _first_reach_interpolated(res, shot, protocol, target)
    tmi = _first_reach_interpolated(ref, shot, mtl_protocol, target)
    mtl_at = _at_time(ref, shot, mtl_protocol, times[-1])
    return {"baseline": b, "protocol": protocol, "mtl_protocol": mtl_protocol,
            "best": max(accs), "final": accs[-1],
            "target": target, "baseline_seconds": tb[0], "baseline_flops": tb[1],
            "mtl_seconds": tm[0] if tm else None, "mtl_flops": tm[1] if tm else None,
            "speedup_time": _ratio(tb, tm, 0), "speedup_flops": _ratio(tb, tm, 1),
            "speedup_time_interpolated": _ratio(tbi, tmi, 0),
            "speedup_flops_interpolated": _ratio(tbi, tmi, 1), "mtl_best": max(mtl_accs),
            "mtl_minus_baseline_at_equal_time":
                (mtl_at - accs[-1]) if mtl_at is not None else None,
            "equal_time_seconds": times[-1]}


def _baseline_vs(ref: _Result, b: str, res: _Result, shot: str,
                 ref_best: float) -> dict[str, Any]:
    """How soon baseline ``b`` reaches MTL's best - 1 (logistic protocol)."""
    target = ref_best - 1.0
    tm = _first_reach(ref, shot, "logistic", target)
    tb = _first_reach(res, shot, "logistic", target)
    assert tm is not None  # MTL reaches its own best - 1
    tmi = _first_reach_interpolated(ref, shot, "logistic", target)
    tbi = _first_reach_interpolated(res, shot, "logistic", target)
    return {"baseline": b, "target": target, "mtl_seconds": tm[0], "mtl_flops": tm[1],
            "baseline_seconds": tb[0] if tb else None,
            "baseline_flops": tb[1] if tb else None,
            "baseline_speedup_time": _ratio(tm, tb, 0),
            "baseline_speedup_flops": _ratio(tm, tb, 1),
            "baseline_speedup_time_interpolated": _ratio(tmi, tbi, 0),
            "baseline_best": max(curve(res, shot, "logistic")[2])}


# (MTL's protocol, the baseline's) of the rows of MTL's speed-up, where both were
# measured: the shared logistic protocol; the baseline's own adaptation against MTL's
# logistic head; with ``compare --centre`` the shared protocol on centred features, and
# the baseline's own adaptation against MTL's centred head (``fastmtl eval --centre``).
PROTOCOL_PAIRS = (("logistic", "logistic"), ("logistic", "own"), ("centred", "centred"),
                  ("centred", "own"))


def speedup_tables(results: dict[str, Any], reference: str = "mtl") -> dict[str, Any]:
    """Per shot setting: MTL's speed-up over each baseline, and each baseline's over MTL.

    For baseline b and each pair of :data:`PROTOCOL_PAIRS` both measured (MTL's protocol
    q, b's protocol p: logistic, centred, or b's own adaptation): target
    a_b = b's best accuracy under p - 1; the first time (and FLOPs) b reached a_b and MTL
    (under q) reached a_b; the ratios; MTL minus b at b's last evaluation time. The other
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
        ref_best = max(curve(ref, shot, "logistic")[2])
        baselines = [(b, r) for b, r in results.items() if b != reference and r["points"]]
        rows = [_mtl_vs(ref, b, r, shot, p, q) for b, r in baselines
                for q, p in PROTOCOL_PAIRS]
        tables[shot] = {"mtl_vs_baselines": [r for r in rows if r is not None],
                        "baselines_vs_mtl": [_baseline_vs(ref, b, r, shot, ref_best)
                                             for b, r in baselines]}
    return tables


# Settings that must agree for runs to be averaged point by point (the seed must not).
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
        # the protocols every run measured (a resumed run may lack a newer one)
        for prot in [q for q in protocols if all(q in p["accuracy"][shot] for p in points)]:
            means = [p["accuracy"][shot][prot]["mean"] for p in points]
            cis = [p["accuracy"][shot][prot]["ci95"] for p in points]
            # The runs' test episodes are independent draws (the seed differs), so the
            # half-width of the mean of n means is sqrt(sum ci^2) / n.
            acc[shot][prot] = {"mean": sum(means) / n,
                               "ci95": float(np.sqrt(np.sum(np.square(cis)))) / n,
                               "per_seed": means}
    out["accuracy"] = acc
    return out


def _check_shape(payload: Any, name: str) -> None:
    """ValueError unless ``payload`` has a compare.json's layout where merging reads it."""
    results = payload.get("results") if isinstance(payload, dict) else None
    ok = isinstance(results, dict) and all(
        isinstance(r, dict) and isinstance(r.get("points"), list)
        and all(isinstance(x, dict) and isinstance(x.get("accuracy"), dict)
                and all(isinstance(by_protocol, dict) and all(
                    isinstance(e, dict) and "mean" in e for e in by_protocol.values())
                    for by_protocol in x["accuracy"].values())
                for x in r["points"]) for r in results.values())
    if not ok:
        raise ValueError(f"{name} is not a compare run: it needs 'results' mapping each "
                         f"method to its evaluation 'points'")


def _check_mergeable(payloads: Sequence[dict[str, Any]]) -> tuple[list[Any], list[str]]:
    """(seeds, methods) of runs :func:`merge_runs` can average; ValueError otherwise."""
    if not isinstance(payloads, (list, tuple)) or len(payloads) < 2:
        raise ValueError(f"payloads: merging needs two or more runs, got "
                         f"{len(payloads) if isinstance(payloads, (list, tuple)) else payloads!r}")
    for i, p in enumerate(payloads):
        _check_shape(p, f"payloads[{i}]")
    first = payloads[0]
    seeds = [p.get("seed") for p in payloads]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"payloads: runs must differ in their seed, got seeds {seeds}")
    methods = [m for m, r in first["results"].items() if r["points"]]
    for i, p in enumerate(payloads[1:], 1):
        diff = differences(p, first)
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


def _mean_result(runs: list[dict[str, Any]], seeds: list[Any]) -> dict[str, Any]:
    """One method's result from its runs: the mean curve and the mean totals."""
    points = [_mean_point(list(pts)) for pts in zip(*(r["points"] for r in runs), strict=True)]
    return {"settings": runs[0].get("settings"), "seeds": seeds, "points": points,
            **{k: sum(r[k] for r in runs) / len(runs)
               for k in ("flops_per_step", "images_per_step", "train_seconds",
                         "eval_seconds", "steps")},
            "steps_per_seed": [r["steps"] for r in runs],
            **({"flops_per_small_step": sum(r["flops_per_small_step"] for r in runs) / len(runs)}
               if all("flops_per_small_step" in r for r in runs) else {}),
            # how the shared protocols normalized it, where every run says the same
            **({"shared_protocol_norm": runs[0]["shared_protocol_norm"]}
               if len({r.get("shared_protocol_norm") for r in runs}) == 1
               and "shared_protocol_norm" in runs[0] else {})}


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
              if k not in ("results", "tables", "seed", "command", "machine", "resumed_from",
                           "centre")}
    merged.update(seeds=seeds, commands=[p.get("command") for p in payloads],
                  machine=first.get("machine", {}),
                  machines=[p.get("machine") for p in payloads], results=results,
                  **({"resumed_from": [p.get("resumed_from") for p in payloads]}
                     if any("resumed_from" in p for p in payloads) else {}),
                  # the centred protocol is in the mean curves only where every run has it
                  **({"centre": all(p.get("centre") for p in payloads)}
                     if any("centre" in p for p in payloads) else {}),
                  tables=speedup_tables(results),
                  per_seed_tables=[speedup_tables({m: p["results"][m] for m in methods})
                                   for p in payloads])
    return merged


