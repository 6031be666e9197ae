"""The 20 official one-shot classification runs of Lake et al. (2015), read from their zip.

``all_runs.zip`` (github brendenlake/omniglot, ``python/one-shot-classification``) holds
``runNN/class_labels.txt``, ``runNN/training/classJJ.png`` and ``runNN/test/itemKK.png``:
per run, 20 training images (one per class, drawn from the evaluation alphabets) and 20
test images, each line of ``class_labels.txt`` pairing a test image with the training
image of its class (``runNN/test/item01.png runNN/training/class08.png``). The runs may
sit under a leading folder. Images are decoded exactly as :class:`fastmtl.data.Omniglot`
decodes the archives (the same ink polarity, inverted, and the same resize), so a
backbone trained on those sees the same pixels here.
"""
from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .. import checks
from .base import FewShotDataset
from .omniglot import OMNIGLOT_MEAN, OMNIGLOT_STD, _decode

__all__ = ["OneShotRuns", "read_one_shot_runs"]

_LABELS = re.compile(r"^(?P<prefix>(?:.*/)?)(?P<run>run\d+)/class_labels\.txt$")
# One run: (its name, training members sorted, [(test member, its training member)] sorted).
_Run = tuple[str, list[str], list[tuple[str, str]]]


class OneShotRuns(NamedTuple):
    """The images of the one-shot runs and which test image belongs to which class.

    Attributes:
        dataset: every training and test image of every run; class ``r * W + j`` is
            training class ``j`` of run ``r`` (named ``"runNN/classJJ"``), and a test image
            carries the label of its class.
        train_index: (R, W) rows of ``dataset`` holding each run's training images, one
            per class, in file-name order.
        test_index: (R, T) rows holding each run's test images, in file-name order.
        answers: (R, T) the training class (column of ``train_index``) of each test image.
        run_names: the R run folders (``"run01"``, ...), sorted.
    """

    dataset: FewShotDataset
    train_index: np.ndarray
    test_index: np.ndarray
    answers: np.ndarray
    run_names: list[str]


def read_one_shot_runs(path: str | os.PathLike, image_size: int = 28) -> OneShotRuns:
    """Read the one-shot runs zip: the images, decoded as Omniglot's, and the answers.

    Args:
        path: ``all_runs.zip`` or a zip of the same layout.
        image_size: side of the square images after resizing (as :class:`Omniglot`).

    Returns:
        :class:`OneShotRuns`; every run must have the same number of training and of test
        images.

    Raises:
        ValueError: (naming ``path``) a path that is not a readable zip, no
            ``runNN/class_labels.txt`` in it, a label line that is not two image paths,
            an image it names that is missing or does not decode, runs of different
            shapes; or a bad ``image_size``. The layout is checked before any image is
            decoded.

    Example:
        >>> import io, zipfile, tempfile, os
        >>> from PIL import Image
        >>> png = io.BytesIO(); Image.new("1", (105, 105), 1).save(png, "PNG")
        >>> path = os.path.join(tempfile.mkdtemp(), "runs.zip")
        >>> with zipfile.ZipFile(path, "w") as zf:
        ...     for j in (1, 2):
        ...         zf.writestr(f"run01/training/class0{j}.png", png.getvalue())
        ...         zf.writestr(f"run01/test/item0{j}.png", png.getvalue())
        ...     zf.writestr("run01/class_labels.txt", "run01/test/item01.png "
        ...                 "run01/training/class02.png\\nrun01/test/item02.png "
        ...                 "run01/training/class01.png\\n")
        >>> runs = read_one_shot_runs(path)
        >>> runs.answers.tolist(), runs.dataset.images.shape
        ([[1, 0]], (4, 28, 28))
    """
    checks.integer("image_size", image_size, 1)
    path = _check_zip(path)
    with zipfile.ZipFile(path) as zf:
        runs = _layout(zf, path)
        members = [m for _, train, tests in runs for m in train + [t for t, _ in tests]]
        images = np.stack([_decode(zf.read(m), int(image_size), f"{path}:{m}")
                           for m in members])
    return _assemble(runs, images)


def _check_zip(path: Any) -> str:
    """``path`` as a string if it names a readable zip file; else a ValueError."""
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"path must be a path to the one-shot runs zip, got "
                         f"{type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"path {path!r} is not an existing file (the one-shot runs zip, "
                         "all_runs.zip)")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"path {path!r} is not a zip archive (the one-shot runs zip, "
                         "all_runs.zip)")
    return path


def _layout(zf: zipfile.ZipFile, path: str) -> list[_Run]:
    """[(run name, training members sorted, [(test member, its training member)] sorted)]
    from every ``runNN/class_labels.txt``, each named member checked to exist."""
    names = set(zf.namelist())
    found: dict[str, tuple[str, str]] = {}
    for name in sorted(names):
        match = _LABELS.match(name)
        if match and "__MACOSX" not in name.split("/"):
            if match["run"] in found:
                raise ValueError(f"path {path!r} holds run {match['run']} twice "
                                 f"({found[match['run']][1]} and {name})")
            found[match["run"]] = (match["prefix"], name)
    if not found:
        raise ValueError(f"path {path!r} holds no runNN/class_labels.txt: not the one-shot "
                         "runs zip (all_runs.zip)")
    runs = [_read_run(zf, names, run, prefix, labels, path)
            for run, (prefix, labels) in sorted(found.items())]
    shapes = {(len(train), len(tests)) for _, train, tests in runs}
    if len(shapes) != 1:
        raise ValueError(f"path {path!r}: runs differ in their numbers of (training, test) "
                         f"images: {sorted(shapes)}")
    return runs


def _read_run(zf: zipfile.ZipFile, names: set[str], run: str, prefix: str, labels: str,
              path: str) -> _Run:
    """One run's members from its ``class_labels.txt`` (paths relative to the zip's run
    folder's parent, as in the official zip, or to the run folder)."""
    text = zf.read(labels).decode("utf-8", errors="replace")
    pairs: list[tuple[str, str]] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2:
            raise ValueError(f"path {path!r}: {labels} line {number} is not "
                             f"'<test image> <training image>': {line.strip()!r}")
        test, trained = (_member(names, prefix, run, f, path, labels) for f in fields)
        pairs.append((test, trained))
    if not pairs:
        raise ValueError(f"path {path!r}: {labels} names no images")
    train = sorted({t for _, t in pairs})
    return run, train, sorted(pairs)


def _member(names: set[str], prefix: str, run: str, field: str, path: str, labels: str) -> str:
    for candidate in (prefix + field, f"{prefix}{run}/{field}"):
        if candidate in names:
            return candidate
    raise ValueError(f"path {path!r}: {labels} names {field!r}, which is not in the zip")


def _assemble(runs: list[_Run], images: np.ndarray) -> OneShotRuns:
    """The :class:`OneShotRuns` of decoded ``images`` laid out run by run, training
    images first, as :func:`read_one_shot_runs` reads them."""
    n_way, n_test = len(runs[0][1]), len(runs[0][2])
    per_run = n_way + n_test
    train_index = np.arange(len(runs))[:, None] * per_run + np.arange(n_way)
    test_index = train_index[:, :1] + n_way + np.arange(n_test)
    answers = np.array([[train.index(t) for _, t in tests] for _, train, tests in runs],
                       dtype=np.int64).reshape(len(runs), n_test)
    run_ids = np.arange(len(runs))[:, None] * n_way
    labels = np.concatenate([np.arange(n_way)[None].repeat(len(runs), 0) + run_ids,
                             answers + run_ids], axis=1).reshape(-1)
    names = [f"{run}/{Path(m).stem}" for run, train, _ in runs for m in train]
    dataset = FewShotDataset(images, labels, names, OMNIGLOT_MEAN, OMNIGLOT_STD,
                             name="omniglot-one-shot-runs")
    return OneShotRuns(dataset, train_index.astype(np.int64), test_index.astype(np.int64),
                       answers, [run for run, _, _ in runs])
