"""Data-set level augmentations that change the set of classes."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .base import FewShotDataset

__all__ = ["with_rotations"]


def with_rotations(dataset: FewShotDataset,
                   angles: Sequence[int] = (0, 90, 180, 270)) -> FewShotDataset:
    """Every (class, angle) as a class of its own: "rotations as new classes".

    The standard Omniglot few-shot augmentation: a character rotated by 90 degrees is
    treated as a different character, multiplying the number of training classes.

    Args:
        dataset: square images (H == W), grey or colour.
        angles: counter-clockwise rotations in degrees, multiples of 90, no repeats.

    Returns:
        A :class:`FewShotDataset` with ``C * len(angles)`` classes; class ``c * len(angles) + j``
        is class ``c`` rotated by ``angles[j]`` and is named ``f"{name}@{angles[j]}"``.
        Mean and std are kept (a rotation does not change pixel statistics).

    Raises:
        ValueError: non-square images, or angles empty, repeated or not multiples of 90.

    Example:
        >>> from fastmtl.data import SyntheticGlyphs
        >>> len(with_rotations(SyntheticGlyphs(3, 2, seed=0)).class_names)
        12
    """
    angles = [int(a) for a in angles]
    if not angles:
        raise ValueError("angles must not be empty")
    if any(a % 90 for a in angles):
        raise ValueError(f"angles must be multiples of 90 degrees, got {angles}")
    if len({a % 360 for a in angles}) != len(angles):
        raise ValueError(f"angles must be distinct rotations, got {angles}")
    height, width = dataset.images.shape[1:3]
    if height != width:
        raise ValueError(f"with_rotations needs square images, got {height}x{width}")
    n_angles = len(angles)
    images = np.concatenate([np.rot90(dataset.images, k=(a // 90) % 4, axes=(1, 2))
                             for a in angles])
    labels = np.concatenate([dataset.labels * n_angles + j for j in range(n_angles)])
    names = [f"{name}@{a}" for name in dataset.class_names for a in angles]
    return FewShotDataset(images, labels, names, dataset.mean, dataset.std,
                          name=f"{dataset.name}+rot")
