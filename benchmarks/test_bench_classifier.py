"""Your own images: ImageFolder loading (first and cached) and FewShotClassifier.predict.

    pytest benchmarks/test_bench_classifier.py            # -> results/classifier_cpu.json

A folder of 40 classes x 50 RGB PNG images, 100x100 on disk (2,000 files), read at 84x84
with 3 channels: images per second for the first load (decode with all cores, resize,
write the cache) and for a cached load (one .npz). ``predict`` of 1,000 images (uint8
arrays, 84x84 RGB) with a Conv-4 backbone after a 5-way 5-shot fit: images per second.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import fastmtl
from fastmtl.data import ImageFolder

from _results import keep_freed_memory, machine_info, write_result  # benchmarks/_results.py

CLASSES, PER_CLASS, SIZE = 40, 50, 100
_OUT: dict[str, dict] = {}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    keep_freed_memory(mmap_threshold=1 << 30)
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for c in range(CLASSES):
        (root / f"class{c:02d}").mkdir()
        base = rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
        for i in range(PER_CLASS):
            noise = rng.integers(0, 40, (SIZE, SIZE, 3), dtype=np.uint8)
            Image.fromarray(base // 2 + noise).save(root / f"class{c:02d}" / f"{i}.png")
    yield root
    write_result("classifier_cpu", {"results": _OUT, "machine": machine_info(),
                                    "images": CLASSES * PER_CLASS})


def test_first_load(benchmark, folder, tmp_path):
    benchmark.group = "imagefolder"
    caches = iter(range(100))
    ds = benchmark.pedantic(
        lambda: ImageFolder(folder, image_size=84, channels=3,
                            cache_dir=tmp_path / f"c{next(caches)}", progress=False),
        rounds=3, warmup_rounds=0)
    assert len(ds) == CLASSES * PER_CLASS
    _OUT["first_load"] = {"median_s": benchmark.stats.stats.median,
                          "images_per_s": len(ds) / benchmark.stats.stats.median}


def test_cached_load(benchmark, folder, tmp_path):
    benchmark.group = "imagefolder"
    ImageFolder(folder, image_size=84, channels=3, cache_dir=tmp_path, progress=False)
    ds = benchmark.pedantic(lambda: ImageFolder(folder, image_size=84, channels=3,
                                                cache_dir=tmp_path, progress=False),
                            rounds=5, warmup_rounds=1)
    _OUT["cached_load"] = {"median_s": benchmark.stats.stats.median,
                           "images_per_s": len(ds) / benchmark.stats.stats.median}


def test_predict_1000(benchmark, folder):
    benchmark.group = "predict"
    ds = ImageFolder(folder, image_size=84, channels=3, cache_dir=False, progress=False)
    torch.manual_seed(0)
    clf = fastmtl.FewShotClassifier(fastmtl.models.conv4(in_channels=3), image_size=84,
                                    channels=3, mean=ds.mean, std=ds.std, device="cpu")
    sup = [i for c in range(5) for i in np.flatnonzero(ds.labels == c)[:5]]
    clf.fit([ds.images[i] for i in sup], [int(ds.labels[i]) for i in sup])
    queries = [ds.images[i] for i in range(1000)]
    pred = benchmark.pedantic(lambda: clf.predict(queries), rounds=3, warmup_rounds=1)
    assert pred.shape == (1000,)
    _OUT["predict_1000"] = {"median_s": benchmark.stats.stats.median,
                            "images_per_s": 1000 / benchmark.stats.stats.median,
                            "backbone": "conv4", "image": "84x84x3",
                            "threads": torch.get_num_threads()}
