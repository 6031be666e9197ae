"""The comparison as people read it: ``compare.md`` (Markdown tables) and ``compare.png``.

Both take the contents of ``compare.json`` (one run, or :func:`fastmtl.compare.merge_runs`
of several). The plot is drawn on a matplotlib ``Figure`` of its own (no pyplot), so it
never changes the caller's plotting backend.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .. import registry
from ..checkpoint import atomic_savefig
from .analysis import accuracy_keys, curve, setting

__all__ = ["markdown", "plot"]


def _fmt(x: float | None, spec: str = ".1f", none: str = "-", suffix: str = "") -> str:
    return none if x is None else format(x, spec) + suffix


def _merge_note(payload: dict[str, Any]) -> list[str]:
    """What a merged payload's figures are (nothing for one run)."""
    if "seeds" not in payload:
        return []
    return ["", f"The mean of {len(payload['seeds'])} runs (seeds "
            f"{', '.join(map(str, payload['seeds']))}) at each evaluation point; steps and "
            "seconds are their means, the tables are computed on the mean curves, and each "
            "run's own speed-ups follow them."]


def _row_name(row: dict[str, Any]) -> str:
    """A speed-up row's label: the baseline, its protocol where not the logistic one, and
    MTL's where that is not the logistic one (rows written before MTL's was recorded:
    logistic)."""
    mtl = row.get("mtl_protocol", "logistic")
    name = row["baseline"] + ("" if row["protocol"] == "logistic" else f" *{row['protocol']}*")
    return name + (f" (MTL {mtl})" if mtl != row["protocol"] and mtl != "logistic" else "")


def _row_key(row: dict[str, Any]) -> tuple[str, str, str]:
    return row["baseline"], row["protocol"], row.get("mtl_protocol", "logistic")


def _small_step(result: dict[str, Any]) -> str:
    """" (x small)": the GFLOPs of a step on small images, where a run had such steps."""
    small = result.get("flops_per_small_step")
    return "" if small is None else f" ({small / 1e9:.2f} small)"


def _measured(payload: dict[str, Any], protocol: str) -> bool:
    """Whether any method of ``payload`` was evaluated by ``protocol`` at any point."""
    return any(protocol in by_shot for r in payload["results"].values() for p in r["points"]
               for by_shot in p["accuracy"].values())


def _method_rows(payload: dict[str, Any], extra: list[str]) -> list[str]:
    """A Markdown table row per method: costs, final and best accuracy per shot (logistic
    protocol), then the final accuracy by each protocol of ``extra`` per shot."""
    lines = []
    for m, r in payload["results"].items():
        if not r["points"]:
            continue
        cells = []
        for key, _ in accuracy_keys(payload):
            _, _, acc = curve(r, key, "logistic")
            cells.append(f"{acc[-1]:.1f} / {max(acc):.1f}")
        for protocol in extra:
            for key, _ in accuracy_keys(payload):
                _, _, other = curve(r, key, protocol)
                cells.append(f"{other[-1]:.1f}" if other else "-")
        peak = max(p["peak_memory_bytes"] for p in r["points"]) / 2**20
        lines.append(f"| {m} | {r['steps']:,.0f} | {r['images_per_step']:.0f} | "
                     f"{r['flops_per_step'] / 1e9:.2f}{_small_step(r)} | "
                     f"{r['train_seconds']:.0f} | "
                     f"{r['eval_seconds']:.0f} | {peak:.0f} | " + " | ".join(cells) + " |")
    return lines


def _frozen_note(payload: dict[str, Any]) -> str:
    """Which methods the shared protocols normalized with training statistics ("": none,
    as in runs from before that)."""
    results = payload["results"]
    frozen = [m for m, r in results.items()
              if r.get("shared_protocol_norm", "running statistics") != "running statistics"]
    if not frozen:
        return ""
    stale = [m for m, r in results.items() if "shared_protocol_norm" not in r
             and m in registry.METHODS and registry.METHODS[m].recipe is None]
    return (f" In these protocols {', '.join(frozen)} (batch-statistics BatchNorm) normalize "
            f"with the statistics of a seeded sample of training images "
            f"(`fastmtl.gbml.freeze_batch_stats`), as MTL's running statistics"
            + (f"; {', '.join(stale)}, kept from an earlier run, with each 256-image "
               f"embedding batch's own statistics" if stale else "")
            + "; their own adaptation uses each test episode's.")


def markdown(payload: dict[str, Any]) -> str:
    """The comparison as Markdown (the text of ``compare.md``) from ``payload``, the
    contents of ``compare.json``: per-method figures, then the speed-up tables."""
    tables = payload["tables"]
    machine = payload["machine"]
    keys = accuracy_keys(payload)
    labels = dict(keys)
    cuda = f", {machine['cuda_device']}" if "cuda_device" in machine else ""
    ways = "- and ".join(str(w) for w in [payload["ways"], *setting(payload, "also_ways")])
    split = setting(payload, "eval_split")
    split_note = "" if split == "test" else f" on the {split} classes (a tuning run)"
    extra = [p for p in ("centred",) if _measured(payload, p)] + ["own"]
    marks = " or ".join(f"*{p}*" for p in extra)
    centred = (" *centred*: the same protocol on features centred on the mean feature of "
               "training images (`fastmtl eval --centre`)." if "centred" in extra else "")
    centred += _frozen_note(payload)
    lines = [f"# fastmtl compare: {payload['data']}, {payload['backbone']}, "
             f"{payload['budget_minutes']:g} min of training each", "",
             f"Machine: {machine.get('cpu')}, {machine.get('torch_threads')} threads{cuda}. "
             f"Test{split_note}: {ways}-way, {payload['queries']} queries a class, "
             f"{payload['episodes']} episodes a point (the same for every method and point), "
             f"logistic-regression protocol unless marked {marks}.{centred}", "",
             "| method | steps | images/step | GFLOPs/step | train s | eval s | peak memory (MB) | "
             + " | ".join(f"{label} final / best" for _, label in keys)
             + "".join(f" | {label} {p} final" for p in extra for _, label in keys) + " |",
             "|---" * (7 + (1 + len(extra)) * len(keys)) + "|"]
    lines[1:1] = _merge_note(payload)
    lines += _method_rows(payload, extra)
    for key, t in tables.items():
        shot = labels.get(key, f"{key}-shot")
        lines += ["", f"## {shot}: how much sooner MTL reaches each baseline's best - 1",
                  "", "| baseline | target | baseline reached at s (TFLOPs) | MTL reached at s "
                  "(TFLOPs) | speed-up of MTL: time | FLOPs | interpolated: time / FLOPs | "
                  "MTL - baseline at equal time |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in t["mtl_vs_baselines"]:
            name = _row_name(r)
            mtl = (f"{r['mtl_seconds']:.0f} ({r['mtl_flops'] / 1e12:.2f})"
                   if r["mtl_seconds"] is not None
                   else f"not reached (MTL best {r['mtl_best']:.1f})")
            lines.append(f"| {name} | {r['target']:.1f} | {r['baseline_seconds']:.0f} "
                         f"({r['baseline_flops'] / 1e12:.2f}) | {mtl} | "
                         f"{_fmt(r['speedup_time'], '.1f', suffix='x')} | "
                         f"{_fmt(r['speedup_flops'], '.1f', suffix='x')} | "
                         f"{_fmt(r['speedup_time_interpolated'], '.1f', suffix='x')} / "
                         f"{_fmt(r['speedup_flops_interpolated'], '.1f', suffix='x')} | "
                         f"{_fmt(r['mtl_minus_baseline_at_equal_time'], '+.1f')} "
                         f"(at {r['equal_time_seconds']:.0f} s) |")
        lines += ["", f"## {shot}: how much sooner each baseline reaches MTL's best - 1", "",
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
    labels = dict(accuracy_keys(payload))
    for shot, t in payload["tables"].items():
        lines += ["", f"## {labels.get(shot, shot + '-shot')}: MTL's speed-up in each run, "
                  "time (FLOPs)", "",
                  "| baseline | mean curves | " + " | ".join(f"seed {s}" for s in payload["seeds"])
                  + " | smallest |", "|---" * (3 + len(per_seed)) + "|"]
        for r in t["mtl_vs_baselines"]:
            runs = [next((x for x in tables[shot]["mtl_vs_baselines"]
                          if _row_key(x) == _row_key(r)), None) for tables in per_seed]
            cells = [f"{_fmt(x['speedup_time'], suffix='x')} "
                     f"({_fmt(x['speedup_flops'], suffix='x')})" if x else "-"
                     for x in [r] + runs]
            times = [x["speedup_time"] for x in runs if x and x["speedup_time"] is not None]
            low = f"{min(times):.1f}x" if len(times) == len(runs) else "-"
            lines.append(f"| {_row_name(r)} | " + " | ".join(cells) + f" | {low} |")
    return lines


def plot(payload: dict[str, Any], path: str) -> None:
    """Accuracy against training seconds (top) and FLOPs (bottom), both on log axes (the
    race is decided early), a column per shot: the logistic-regression protocol with its
    95% CI band, each method's own adaptation dashed and the centred protocol dotted
    (where measured).

    Args:
        payload: the contents of ``compare.json``.
        path: the image file to write (atomically; any format matplotlib writes).

    Example:
        >>> # plot(json.load(open("compare/compare.json")), "compare/compare.png")
    """
    from matplotlib import rcParams
    from matplotlib.figure import Figure
    keys = accuracy_keys(payload)
    shots = [k for k, _ in keys]
    labels = dict(keys)
    centred = _measured(payload, "centred")
    fig = Figure(figsize=(5.5 * len(shots), 7.5))
    axes = fig.subplots(2, len(shots), squeeze=False)
    # the colour cycle is longer than the methods: each method its own, in registry order
    colors = dict(zip(registry.METHOD_NAMES, rcParams["axes.prop_cycle"].by_key()["color"],
                      strict=False))
    for j, shot in enumerate(shots):
        for m, r in payload["results"].items():
            if r["points"]:
                _plot_method(axes[:, j], m, r["points"], shot, colors.get(m))
        for i, label in enumerate(("training seconds", "training FLOPs")):
            ax = axes[i][j]
            ax.set_xlabel(f"{label} (log scale)")
            ax.set_ylabel(f"{labels[shot]} accuracy (%)")
            ax.grid(alpha=0.3, which="both")
            ax.set_xscale("log")
        axes[0][j].set_title(f"{labels[shot]}: logistic protocol (dashed: own"
                             + (", dotted: centred)" if centred else ")"))
    axes[0][0].legend(fontsize=8, ncol=2)
    fig.suptitle(f"fastmtl compare: {payload['data']}, {payload['backbone']}")
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)


def _plot_method(axes: Any, method: str, pts: list[dict[str, Any]], shot: str,
                 color: str | None) -> None:
    """One method's curves on the time axis and the FLOP axis of one shot column."""
    acc = np.array([p["accuracy"][shot]["logistic"]["mean"] for p in pts])
    ci = np.array([p["accuracy"][shot]["logistic"]["ci95"] for p in pts])
    for i, key in enumerate(("train_seconds", "flops")):
        x = np.array([p[key] for p in pts], dtype=float)
        ax = axes[i]
        ax.plot(x, acc, "o-", ms=3, color=color, label=method)
        ax.fill_between(x, acc - ci, acc + ci, color=color, alpha=0.2)
        for protocol, style in (("own", "--"), ("centred", ":")):   # no band
            some = [p for p in pts if protocol in p["accuracy"][shot]]
            if some:
                ax.plot(np.array([p[key] for p in some], dtype=float),
                        np.array([p["accuracy"][shot][protocol]["mean"] for p in some]),
                        style, lw=1, color=color,
                        label=f"{method}, {protocol}" if i == 0 else None)
