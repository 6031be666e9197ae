"""Seconds per meta-step, the meta-batch vmapped vs a per-task loop: MAML and ANIL.

    pytest benchmarks/test_bench_gbml.py                             # -> results/gbml_cpu.json
    FASTMTL_BENCH_MALLOC=tuned FASTMTL_BENCH_THREADS=1 pytest benchmarks/test_bench_gbml.py

Each run is stored under its own key (allocator setting, threads) in the JSON, so runs
with different settings accumulate. Conv-4 (64 filters) on 28x28 one-channel images; the
MAML paper's Omniglot meta-batch (32 tasks of 5-way 1-shot with one query per class, as
its reference code) with five inner steps; float32. A meta-step is the meta-loss and its
backward (the Adam update is the same for both and left out):
- ``vmap``: the trainer's vectorized path (``config.vectorize=True``): MAML on this Conv-4
  its stacked form since 2026-12-03 (the tasks' weights side by side as channel groups,
  fastmtl.gbml._stacked; runs tagged ``stacked``), before that one ``torch.func.vmap``
  over the tasks with ``torch.func.grad`` inner steps; ANIL its backbone one stacked
  call for all tasks, its head's inner steps vmapped. The key keeps its old name so the
  runs stay comparable;
- ``loop``: the same math one task at a time with ``torch.autograd.grad(create_graph=True)``
  (``config.vectorize=False``), the way MAML is usually written.
MAML is second order through all five steps; ANIL adapts the head only, with the
backbone features of each task computed once. Both variants of a method see the same
episodes and must give the same meta-loss. Ratios come from the medians of one run, so
machine load mostly cancels (the load average is recorded with the results).

Allocator: glibc returns every freed block above its mmap threshold (at most 32 MB) to
the kernel and maps it afresh next time, with a page fault per 4 KB page. The vmapped
meta-batch's activations (tens of MB) fall above it, the loop's per-task ones below, so
with the default ``malloc`` the vmapped step spends a third of its time in the kernel.
``FASTMTL_BENCH_MALLOC=tuned`` raises the mmap and trim thresholds with ``mallopt`` (the
same as ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` in the environment, or a
caching allocator such as jemalloc) before anything is timed.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from fastmtl.gbml import ANIL, MAML, ANILConfig, MAMLConfig
from fastmtl.models import conv4

from _results import keep_freed_memory, machine_info, record, write_result  # benchmarks/_results.py

META_BATCH = 32
INNER_STEPS = 5
N_WAY, K_SHOT, N_QUERY = 5, 1, 1
ROUNDS = {"maml": 4, "anil": 8}
MALLOC = os.environ.get("FASTMTL_BENCH_MALLOC", "default")
THREADS = int(os.environ.get("FASTMTL_BENCH_THREADS") or torch.get_num_threads())
# FASTMTL_BENCH_TAG names a run apart from earlier ones with the same settings (another
# machine, say): runs accumulate in the JSON under their keys, each with its machine.
TAG = os.environ.get("FASTMTL_BENCH_TAG", "")
RUN = f"{MALLOC}-malloc/{THREADS}threads" + (f"/{TAG}" if TAG else "")
RESULT = Path(__file__).parent / "results" / "gbml_cpu.json"
_RECORDS: dict[str, dict] = {}
_LOSSES: dict[str, float] = {}
METHODS = {"maml": (MAML, MAMLConfig), "anil": (ANIL, ANILConfig)}


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(META_BATCH, N_WAY * K_SHOT, 1, 28, 28, generator=g)
    xq = torch.randn(META_BATCH, N_WAY * N_QUERY, 1, 28, 28, generator=g)
    ys = torch.arange(N_WAY).repeat_interleave(K_SHOT).expand(META_BATCH, -1)
    yq = torch.arange(N_WAY).repeat_interleave(N_QUERY).expand(META_BATCH, -1)
    return xs, ys, xq, yq


@pytest.fixture(scope="module", autouse=True)
def _settings():
    if MALLOC not in ("default", "tuned"):
        raise ValueError(f"FASTMTL_BENCH_MALLOC must be 'default' or 'tuned', got {MALLOC!r}")
    if MALLOC == "tuned" and not keep_freed_memory(mmap_threshold=1 << 30):
        raise RuntimeError("mallopt refused the thresholds")
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("impl", ["vmap", "loop"])
@pytest.mark.parametrize("method", list(METHODS))
def test_meta_step(benchmark, batch, method, impl):
    cls, config_cls = METHODS[method]
    torch.manual_seed(0)
    cfg = config_cls(n_way=N_WAY, k_shot=K_SHOT, n_query=N_QUERY, tasks_per_step=META_BATCH,
                     inner_steps=INNER_STEPS, inner_lr=0.4, vectorize=impl == "vmap")
    trainer = cls(conv4(in_channels=1), cfg, device="cpu").build((1, 28, 28))
    benchmark.group = (f"{method} meta-step, Conv-4 28x28, {META_BATCH} tasks 5-way 1-shot "
                       f"{N_QUERY}q, {INNER_STEPS} inner steps, {RUN}")

    def step():
        trainer.model.zero_grad(set_to_none=True)
        return trainer._step(*batch)[0]

    loss = benchmark.pedantic(step, rounds=ROUNDS[method], warmup_rounds=1, iterations=1)
    record(_RECORDS, f"{method}/{impl}", benchmark, loss=loss)
    _LOSSES[f"{method}/{impl}"] = loss
    other = _LOSSES.get(f"{method}/{'loop' if impl == 'vmap' else 'vmap'}")
    if other is not None:
        # float32 with five steps of 0.4 on random images amplifies rounding differences
        # to ~1e-3 relative; tests/test_gbml.py checks equality in float64 to 1e-6.
        assert abs(loss - other) <= 1e-2 * abs(other), (loss, other)




def _summary() -> dict:
    # Speedup = loop time / vmap time, from the medians and from the fastest rounds (the
    # least disturbed by other processes on a shared machine).
    out = {}
    for method in METHODS:
        v, l = _RECORDS.get(f"{method}/vmap"), _RECORDS.get(f"{method}/loop")
        if v and l:
            out[method] = {
                "vmap_s_per_step": v["median_s"], "loop_s_per_step": l["median_s"],
                "speedup_median": l["median_s"] / v["median_s"],
                "speedup_min": l["min_s"] / v["min_s"],
                "meets_target_1.5x": l["median_s"] / v["median_s"] >= 1.5}
    return out


def _merged(payload: dict) -> dict:
    """The existing result file's runs plus this one (keyed by allocator, threads and tag),
    and its notes. Runs stored before runs carried their machine get the file's."""
    runs, notes = {}, None
    if RESULT.exists():
        try:
            old = json.loads(RESULT.read_text())
            runs, notes = old.get("runs", {}), old.get("notes")
            for run in runs.values():
                run.setdefault("machine", old.get("machine"))
        except (ValueError, AttributeError):
            runs = {}
    runs[RUN] = payload
    return {"runs": runs, **({"notes": notes} if notes else {})}


@pytest.fixture(scope="module", autouse=True)
def _report():
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    load = machine_info()["load_average"]
    yield
    if not _RECORDS:
        return
    summary = _summary()
    machine = machine_info()
    run = {"started": started, "machine": machine, "load_average_at_start": load,
           "load_average_at_end": machine["load_average"], "malloc": MALLOC,
           "torch_threads": THREADS, "records": _RECORDS, **summary}
    payload = {"setting": {"backbone": "conv4(in_channels=1, hidden=64)", "image": [1, 28, 28],
                           "tasks_per_step": META_BATCH, "n_way": N_WAY, "k_shot": K_SHOT,
                           "n_query": N_QUERY, "inner_steps": INNER_STEPS,
                           "second_order": True, "dtype": "float32",
                           "timed": "meta-loss forward + backward, no optimizer step"},
               **_merged(run)}
    write_result("gbml_cpu", payload)
    print("\n" + RUN + " " + json.dumps(summary, indent=2))
