"""The in-memory few-shot data set every loader returns.

All data sets are small enough (Omniglot, CIFAR-FS, FC100, mini-ImageNet splits) to live
in memory as one uint8 array; episodes then index into it, and the backbone receives
float tensors built on the fly by :meth:`FewShotDataset.tensor`.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .. import checks

__all__ = ["FewShotDataset"]


class FewShotDataset:
    """Images as a uint8 array and integer labels 0..C-1: what every loader returns and
    every trainer, sampler and evaluation takes.

    Args:
        images: uint8 array (N, H, W) for grey images or (N, H, W, 3) for colour.
        labels: integer array (N,), values 0..C-1, every class non-empty (kept as int64).
        class_names: C names, ``class_names[c]`` is the name of label c.
        mean, std: per-channel statistics used by :meth:`tensor` to normalize pixels
            after scaling them to [0, 1] (default 0 and 1).
        name: shown in messages and ``repr``.

    Raises:
        ValueError: images that are not uint8 (N, H, W[, 1|3]), labels of the wrong shape
            or type or out of range, or a class without images.

    Example:
        >>> import numpy as np
        >>> data = FewShotDataset(np.zeros((4, 8, 8), np.uint8), np.array([0, 0, 1, 1]),
        ...                       ["a", "b"])
        >>> data.n_classes, data.tensor().shape
        (2, torch.Size([4, 1, 8, 8]))
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 name: str = "dataset"):
        images = np.ascontiguousarray(images)
        labels = np.ascontiguousarray(labels)
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise ValueError(f"images must be a uint8 array (N, H, W[, C]), got {images.dtype} "
                             f"with shape {images.shape}")
        if images.ndim == 4 and images.shape[3] not in (1, 3):
            raise ValueError(f"images must have 1 or 3 channels last, got shape {images.shape}")
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {labels.shape}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be integers, got {labels.dtype}")
        labels = labels.astype(np.int64, copy=False)
        n_classes = len(class_names)
        if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
            raise ValueError(f"labels must lie in [0, {n_classes}), got range "
                             f"[{labels.min()}, {labels.max()}]")
        counts = np.bincount(labels, minlength=n_classes)
        if n_classes and counts.min() == 0:
            empty = int(np.argmin(counts))
            raise ValueError(f"class {empty} ({class_names[empty]!r}) has no images")
        self.images = images
        self.labels = labels
        self.class_names = list(class_names)
        channels = 1 if images.ndim == 3 else images.shape[3]
        self.mean = checks.per_channel("mean", mean, 0.0, channels)
        self.std = checks.per_channel("std", std, 1.0, channels, positive=True)
        self.name = name

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, images={len(self)}, "
                f"classes={self.n_classes}, image_shape={self.image_shape})")

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return 1 if self.images.ndim == 3 else int(self.images.shape[3])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the tensors :meth:`tensor` returns."""
        return (self.channels, int(self.images.shape[1]), int(self.images.shape[2]))

    def class_sizes(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.n_classes)

    def subset(self, classes: Sequence[int], name: str | None = None) -> FewShotDataset:
        """The images of ``classes``, relabelled 0..len(classes)-1 in the given order."""
        given = np.asarray(classes)
        if given.ndim != 1 or (given.size and given.dtype.kind not in "iu") or \
                len(np.unique(given)) != given.size:
            raise ValueError(f"classes must be distinct integer class indices, got {classes!r}")
        picked = given.astype(np.int64)
        if picked.size and (picked.min() < 0 or picked.max() >= self.n_classes):
            raise ValueError(f"classes must lie in [0, {self.n_classes})")
        remap = np.full(self.n_classes, -1, dtype=np.int64)
        remap[picked] = np.arange(picked.size)
        keep = remap[self.labels] >= 0
        return FewShotDataset(self.images[keep], remap[self.labels[keep]],
                              [self.class_names[c] for c in picked], self.mean, self.std,
                              name or self.name)

    def tensor(self, index: np.ndarray | torch.Tensor | None = None,
               device: torch.device | str | None = None) -> torch.Tensor:
        """Float32 images (B, C, H, W), scaled to [0, 1] and normalized, for ``index``.

        ``index`` may have any shape; the result has shape ``index.shape + (C, H, W)``.
        """
        if index is None:
            raw = self.images
            shape = (len(self),)
        else:
            index = np.asarray(index.cpu() if isinstance(index, torch.Tensor) else index)
            if index.dtype.kind not in "iu" or (index.size and (
                    index.min() < 0 or index.max() >= len(self))):
                raise ValueError(f"index must hold integer image indices in [0, {len(self)}), "
                                 f"got {index.dtype} {index.ravel()[:8].tolist()}")
            shape = index.shape
            raw = self.images[index.reshape(-1)]
        x = torch.from_numpy(np.ascontiguousarray(raw))
        if device is not None:
            x = x.to(device, non_blocking=True)
        x = x.float().div_(255.0)
        if x.dim() == 3:
            x = x.unsqueeze(1)
        else:
            x = x.permute(0, 3, 1, 2)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        x = (x - mean) / std
        return x.reshape(*shape, *x.shape[1:])
