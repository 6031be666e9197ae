"""Episode sampling and batch assembly speed: C++ vs the numpy sampler vs naive Python.

    pytest benchmarks/test_bench_sampling.py            # writes results/sampling_cpu.json

Index sampling: episodes per second on a 64-class, 600-images-per-class label array
(mini-ImageNet's training split), 5-way 1+15 and 5-way 5+15, for
- ``cpp``: fastmtl's C++ sampler (default threads) and ``cpp-1thread``;
- ``numpy``: the same algorithm vectorized in numpy (the reference);
- ``naive``: a per-episode Python sampler written like learn2learn's task transforms
  (``random.sample`` of the classes, then of each class's index list, list appends).
Batch assembly: MB/s gathering a batch of 4 5-way 5+15 episodes of 84x84x3 uint8 images
into a channels-first tensor (uint8, or float32 normalized), against a plain ``memcpy`` of
the same bytes. Ratios come from the medians of one run, so machine load mostly cancels.
"""
from __future__ import annotations

import ctypes
import json
import random
import time

import numpy as np
import pytest
import torch

from fastmtl import sampling
from fastmtl.sampling import EpisodeSampler, assemble

from _results import machine_info, record, write_result  # benchmarks/_results.py

HAVE_CPP = sampling._cpp is not None
SHAPES = {"5w-1s-15q": (5, 1, 15), "5w-5s-15q": (5, 5, 15)}
EPISODES = 2000                      # per timed call
LABELS = np.repeat(np.arange(64), 600)
ROUNDS = {"cpp": 40, "cpp-1thread": 40, "numpy": 8, "naive": 4}
_RECORDS: dict[str, dict] = {}


class _NaiveSampler:
    """Per-episode sampling the way learn2learn's NWays/KShots transforms do it."""

    def __init__(self, labels, n_way, k_shot, n_query, seed):
        self.rng = random.Random(seed)
        self.by_class: dict[int, list[int]] = {}
        for i, y in enumerate(labels.tolist()):
            self.by_class.setdefault(y, []).append(i)
        self.classes = list(self.by_class)
        self.n_way, self.shots = n_way, k_shot + n_query

    def episode(self):
        images, labels = [], []
        for w, c in enumerate(self.rng.sample(self.classes, self.n_way)):
            for i in self.rng.sample(self.by_class[c], self.shots):
                images.append(i)
                labels.append(w)
        return images, labels

    def episodes(self, count):
        return np.asarray([self.episode()[0] for _ in range(count)]).reshape(
            count, self.n_way, self.shots)


def _impls(names):
    return [pytest.param(n, marks=pytest.mark.skipif(
        n.startswith("cpp") and not HAVE_CPP, reason="C++ extension not built")) for n in names]


@pytest.mark.parametrize("impl", _impls(["cpp", "cpp-1thread", "numpy", "naive"]))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_index_sampling(benchmark, shape, impl):
    n_way, k, q = SHAPES[shape]
    benchmark.group = f"index sampling {shape} ({EPISODES} episodes)"
    if impl == "naive":
        sampler = _NaiveSampler(LABELS, n_way, k, q, 0)
        run = lambda: sampler.episodes(EPISODES)  # noqa: E731
    else:
        s = EpisodeSampler(LABELS, n_way, k, q, 0, backend=impl.split("-")[0],
                           num_threads=1 if impl.endswith("1thread") else None)
        run = lambda: s.episodes(0, EPISODES)  # noqa: E731
    out = benchmark.pedantic(run, rounds=ROUNDS[impl], warmup_rounds=1, iterations=1)
    assert out[1].shape == (EPISODES, n_way, k + q) if impl != "naive" else \
        out.shape == (EPISODES, n_way, k + q)
    record(_RECORDS, f"sampling/{shape}/{impl}", benchmark, episodes=EPISODES)


# -- batch assembly ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(64), 20)            # a 27 MB pool: gathers miss the caches
    images = rng.integers(0, 256, (labels.size, 84, 84, 3), dtype=np.uint8)
    index = EpisodeSampler(labels, 5, 5, 15, 0).episodes(0, 4)[1]
    return images, index


ASSEMBLY = ["cpp-uint8", "cpp-float32", "cpp-uint8-1thread", "cpp-float32-1thread",
            "numpy-uint8", "numpy-float32", "memcpy-uint8", "memcpy-float32"]


@pytest.mark.parametrize("impl", _impls(ASSEMBLY))
def test_batch_assembly(benchmark, batch, impl):
    images, index = batch
    benchmark.group = "batch assembly 4x 5-way 5+15, 84x84x3"
    src_bytes = index.size * images[0].nbytes
    mean, std = (0.47, 0.45, 0.41), (0.28, 0.27, 0.29)
    if impl.startswith("memcpy"):
        # The same number of bytes as the assembled tensor, copied contiguously.
        n = src_bytes * (4 if impl.endswith("float32") else 1)
        src, dst = np.ones(n, np.uint8), np.empty(n, np.uint8)
        run = lambda: ctypes.memmove(dst.ctypes.data, src.ctypes.data, n)  # noqa: E731
        rounds, out_bytes = 40, n
    else:
        which, dtype = impl.split("-")[:2]
        dtype = getattr(torch, dtype)
        out = torch.empty(index.shape + (3, 84, 84), dtype=dtype)
        norm = {"mean": mean, "std": std} if dtype == torch.float32 else {}
        threads = 1 if impl.endswith("1thread") else None
        run = lambda: assemble(images, index, out=out, num_threads=threads,  # noqa: E731
                               backend=which, **norm)
        rounds, out_bytes = (40 if which == "cpp" else 8), out.numel() * out.element_size()
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=1, iterations=1)
    record(_RECORDS, f"assembly/{impl}", benchmark, source_bytes=src_bytes, output_bytes=out_bytes)


# -- the summary ---------------------------------------------------------------------------



def _summary() -> dict:
    rate = lambda key, n: n / _RECORDS[key]["median_s"]  # noqa: E731
    out: dict = {"sampling": {}, "assembly": {}}
    for shape in SHAPES:
        row = {impl: rate(f"sampling/{shape}/{impl}", EPISODES) for impl in ROUNDS
               if f"sampling/{shape}/{impl}" in _RECORDS}
        entry = {"episodes_per_s": row}
        if {"cpp", "cpp-1thread", "numpy", "naive"} <= set(row):
            entry["cpp_vs_naive"] = row["cpp"] / row["naive"]
            entry["cpp_vs_numpy"] = row["cpp"] / row["numpy"]
            entry["cpp_1thread_vs_naive"] = row["cpp-1thread"] / row["naive"]
            entry["cpp_1thread_vs_numpy"] = row["cpp-1thread"] / row["numpy"]
            entry["meets_targets"] = entry["cpp_vs_naive"] >= 50 and entry["cpp_vs_numpy"] >= 5
        out["sampling"][shape] = entry
    mbs = {impl: _RECORDS[f"assembly/{impl}"]["output_bytes"] / _RECORDS[f"assembly/{impl}"][
        "median_s"] / 1e6 for impl in ASSEMBLY if f"assembly/{impl}" in _RECORDS}
    out["assembly"]["output_MB_per_s"] = mbs
    out["assembly"]["batch"] = "4 episodes x 5 classes x 20 images of 84x84x3 = 400 images, 8.47 MB as uint8"
    if set(ASSEMBLY) <= set(mbs):
        # Fraction of memcpy speed moving the same bytes; the target is >= 0.5 (within 2x).
        for impl in ("cpp-uint8", "cpp-uint8-1thread", "numpy-uint8"):
            out["assembly"][f"{impl}_vs_memcpy"] = mbs[impl] / mbs["memcpy-uint8"]
        for impl in ("cpp-float32", "cpp-float32-1thread", "numpy-float32"):
            out["assembly"][f"{impl}_vs_memcpy"] = mbs[impl] / mbs["memcpy-float32"]
        out["assembly"]["meets_targets"] = (out["assembly"]["cpp-uint8_vs_memcpy"] >= 0.5 and
                                            out["assembly"]["cpp-float32_vs_memcpy"] >= 0.5)
    return out


@pytest.fixture(scope="module", autouse=True)
def _report():
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    load = machine_info()["load_average"]
    yield
    if not _RECORDS:
        return
    summary = _summary()
    payload = {"started": started, "load_average_at_start": load,
               "backend": sampling.backend(), "records": _RECORDS, **summary}
    write_result("sampling_cpu", payload)
    print("\n" + json.dumps(summary, indent=2))
