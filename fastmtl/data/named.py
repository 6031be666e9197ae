"""The data sets the registry names, each read the same way: ``loader(root, split, ...)``.

:func:`fastmtl.registry.load_dataset` dispatches here by name; every loader takes the
same keyword options and uses those that apply to it (``channels`` and
``skip_bad_images``: a folder of images; ``seed``: the synthetic data and the class split
of a folder; ``image_size``: all but the pickled benchmarks, which keep their size).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .. import checks
from .base import FewShotDataset
from .folder import ImageFolder
from .omniglot import Omniglot
from .pickles import CIFARFS, FC100, MiniImageNet, TieredImageNet, _PickleBenchmark
from .synthetic import SYNTHETIC_MEAN, SYNTHETIC_STD, _glyph_classes
from .transforms import with_rotations

__all__ = ["SYNTHETIC_SPLITS", "synthetic", "omniglot", "folder", "miniimagenet",
           "tieredimagenet", "cifarfs", "fc100"]

# Class ranges of the built-in SyntheticGlyphs default (generated, never downloaded):
# classes are a pure function of (seed, class index), so splits are disjoint prefixes.
SYNTHETIC_SPLITS = {"train": (0, 240), "val": (240, 280), "test": (280, 400),
                    "trainval": (0, 280)}


def _finish(ds: FewShotDataset, rotations: bool) -> FewShotDataset:
    return with_rotations(ds) if rotations else ds


def _need_root(name: str, root: str | None) -> str:
    if root is None:
        raise ValueError(f"root is required for data {name!r} (the folder holding it; "
                         f"CLI: --root)")
    return root


def synthetic(root: str | None, split: str, image_size: int | None = None, seed: int = 0,
              rotations: bool = False, **_: Any) -> FewShotDataset:
    """The built-in SyntheticGlyphs, split by class ranges (:data:`SYNTHETIC_SPLITS`).

    Example:
        >>> synthetic(None, "test").n_classes
        120
    """
    if split not in SYNTHETIC_SPLITS:
        raise ValueError(f"split must be one of {sorted(SYNTHETIC_SPLITS)}, got {split!r}")
    lo, hi = SYNTHETIC_SPLITS[split]
    size = image_size or 28
    checks.integer("seed", seed, 0)
    checks.integer("image_size", size, 8)
    images, labels, names = _glyph_classes(range(lo, hi), 20, int(seed), int(size))
    return _finish(FewShotDataset(images, labels, names, SYNTHETIC_MEAN, SYNTHETIC_STD,
                                  f"synthetic-{split}"), rotations)


def omniglot(root: str | None, split: str, image_size: int | None = None,
             rotations: bool = False, **_: Any) -> FewShotDataset:
    """Omniglot under ``root`` (:class:`fastmtl.data.Omniglot`), 28 px by default."""
    if rotations and split.startswith("vinyals-"):
        raise ValueError(f"rotations: split {split!r} already holds each character's four "
                         f"rotations as classes")
    return _finish(Omniglot(_need_root("omniglot", root), split=split,
                            image_size=image_size or 28), rotations)


def folder(root: str | None, split: str, image_size: int | None = None, seed: int = 0,
           rotations: bool = False, channels: int = 3, skip_bad_images: bool = False,
           **_: Any) -> FewShotDataset:
    """A user's folder of class folders (:class:`fastmtl.data.ImageFolder`), split by class
    with ``seed``, 84 px by default."""
    return _finish(ImageFolder(_need_root("folder", root), image_size=image_size or 84,
                               channels=channels, split=split, seed=seed,
                               skip_bad_images=skip_bad_images), rotations)


def _pickled(cls: type[_PickleBenchmark], name: str) -> Callable[..., FewShotDataset]:
    def load(root: str | None, split: str, rotations: bool = False,
             **_: Any) -> FewShotDataset:
        return _finish(cls(_need_root(name, root), split), rotations)
    load.__name__ = name
    load.__doc__ = f"{cls.__name__} from its pickles under ``root`` (its own image size)."
    return load


miniimagenet = _pickled(MiniImageNet, "miniimagenet")
tieredimagenet = _pickled(TieredImageNet, "tieredimagenet")
cifarfs = _pickled(CIFARFS, "cifarfs")
fc100 = _pickled(FC100, "fc100")
