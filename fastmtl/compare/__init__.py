"""Time-, FLOP- and memory-to-accuracy of MTL and the GBML baselines, side by side.

Three steps, a module each:

- :mod:`fastmtl.compare.run`: :func:`compare` trains each method for the same budget and
  evaluates it on a clock of training time (:func:`config_for`: each method's settings);
- :mod:`fastmtl.compare.analysis`: :func:`speedup_tables` (how much sooner MTL reaches
  each baseline's best - 1, and the other way round), :func:`merge_runs` (the mean of runs
  that differ in their seed) and :data:`COMPARABLE`, the settings two runs must share;
- :mod:`fastmtl.compare.report`: :func:`markdown` and :func:`plot`, what people read.

Example:
    >>> from fastmtl import compare
    >>> cls, cfg = compare.config_for("mtl", budget_minutes=1)
    >>> cls.__name__, cfg.task_sampling
    ('MTLTrainer', 'all_classes')
"""
from __future__ import annotations

from .analysis import (
    COMPARABLE,
    PROTOCOL_PAIRS,
    accuracy_key,
    accuracy_keys,
    differences,
    merge_runs,
    setting,
    speedup_tables,
)
from .report import markdown, plot
from .run import (
    CENTRE_IMAGES,
    centre_sample,
    check_data,
    compare,
    config_for,
    flop_counter,
    flops_per_step,
    run_method,
    shared_protocol_backbone,
    shared_protocol_stats,
)

__all__ = ["compare", "config_for", "check_data", "flop_counter", "flops_per_step",
           "run_method", "centre_sample", "shared_protocol_stats", "shared_protocol_backbone",
           "CENTRE_IMAGES", "COMPARABLE", "PROTOCOL_PAIRS",
           "accuracy_key", "accuracy_keys", "differences",
           "setting", "speedup_tables", "merge_runs",
           "markdown", "plot"]
