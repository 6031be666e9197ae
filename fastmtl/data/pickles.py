"""The few-shot benchmarks in the files the community distributes (MetaOptNet / RFS formats).

None of these can be downloaded by fastmtl; point ``root`` at the folder holding the files.

================  =============================================================  ========
data set          files in ``root`` (split = train / val / test)                 images
================  =============================================================  ========
mini-ImageNet     ``miniImageNet_category_split_train_phase_train.pickle``,      84x84x3
                  ``miniImageNet_category_split_val.pickle``,
                  ``miniImageNet_category_split_test.pickle``
tiered-ImageNet   ``{split}_images.npz`` (key ``images``) + ``{split}_labels.pkl``  84x84x3
                  (key ``label_specific`` or ``labels``); ``{split}_images_png.pkl``
                  (Ren et al.'s original list of PNG bytes) is read too
CIFAR-FS          ``CIFAR_FS_{split}.pickle``                                    32x32x3
FC100             ``FC100_{split}.pickle``                                       32x32x3
================  =============================================================  ========

The ``.pickle`` files are dicts with ``data`` (uint8 N, H, W, 3) and ``labels`` (ints);
images may also be stored encoded (PNG/JPEG bytes), which are decoded with PIL. Many
were written by Python 2 and are read with a ``latin1`` fallback. They are read with a
data-only unpickler (arrays, plain containers and values): a file that names anything
else is refused with a ValueError, as a pickle can run code when loaded. Labels are arbitrary
ids in the files and are remapped to 0..C-1 in sorted order. ``split="trainval"``
concatenates train and val, keeping their classes apart.

Normalization uses the fixed per-channel statistics of the RFS code (Tian et al., 2020)
rather than statistics of the loaded split, so that train and test are on one scale:
:data:`IMAGENET_MEAN`/:data:`IMAGENET_STD` for mini- and tiered-ImageNet (RFS uses the
mini-ImageNet values for both), :data:`CIFAR_MEAN`/:data:`CIFAR_STD` for CIFAR-FS and FC100.
"""
from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ._safe_pickle import safe_load
from .base import FewShotDataset

__all__ = ["MiniImageNet", "TieredImageNet", "CIFARFS", "FC100", "IMAGENET_MEAN",
           "IMAGENET_STD", "CIFAR_MEAN", "CIFAR_STD"]

IMAGENET_MEAN = (120.39586422 / 255.0, 115.59361427 / 255.0, 104.54012653 / 255.0)
IMAGENET_STD = (70.68188272 / 255.0, 68.27635443 / 255.0, 72.54505529 / 255.0)
CIFAR_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR_STD = (0.2675, 0.2565, 0.2761)

_SPLITS = ("train", "val", "test", "trainval")


class _PickleBenchmark(FewShotDataset):
    """Shared loading: validate root and split, read each part, relabel, concatenate."""

    _title = ""
    _mean: Sequence[float] = ()
    _std: Sequence[float] = ()

    def __init__(self, root: str | os.PathLike, split: str):
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
        root_path = Path(root)
        if not root_path.is_dir():
            raise ValueError(f"{self._title} root {str(root)!r} is not an existing folder")
        parts = ("train", "val") if split == "trainval" else (split,)
        images: list[np.ndarray] = []
        labels: list[np.ndarray] = []
        names: list[str] = []
        for part in parts:
            part_images, raw_labels, raw_names = self._read_part(root_path, part)
            part_labels, part_names = _relabel(raw_labels, raw_names)
            if part_images.shape[0] != part_labels.shape[0]:
                raise ValueError(f"{self._title} {part}: {part_images.shape[0]} images but "
                                 f"{part_labels.shape[0]} labels in root {str(root)!r}")
            images.append(part_images)
            labels.append(part_labels + len(names))
            # Ids of different files may collide (tiered restarts at 0 per split).
            names.extend(f"{part}/{n}" if len(parts) > 1 else n for n in part_names)
        all_images = images[0] if len(images) == 1 else np.concatenate(images)
        all_labels = labels[0] if len(labels) == 1 else np.concatenate(labels)
        super().__init__(all_images, all_labels, names, self._mean, self._std,
                         name=f"{self._title}-{split}")
        self.split = split

    def _read_part(self, root: Path, part: str) -> tuple[np.ndarray, np.ndarray, dict | None]:
        """(uint8 images (N, H, W, 3), raw labels (N,), optional {raw id: class name})."""
        raise NotImplementedError


class _DictPickleBenchmark(_PickleBenchmark):
    """One ``{'data': ..., 'labels': ...}`` pickle per split."""

    _files: dict[str, str] = {}

    def _read_part(self, root: Path, part: str) -> tuple[np.ndarray, np.ndarray, dict | None]:
        path = _require(root, [self._files[part]], self._title)
        content = _load_pickle(path)
        if not isinstance(content, dict) or "data" not in content or "labels" not in content:
            raise ValueError(f"{path} is not a {self._title} pickle: expected a dict with keys "
                             f"'data' and 'labels'")
        names = None
        if isinstance(content.get("catname2label"), dict):
            names = {int(v): str(k) for k, v in content["catname2label"].items()}
        return _as_images(content["data"], path), np.asarray(content["labels"]), names


class MiniImageNet(_DictPickleBenchmark):
    """mini-ImageNet (Vinyals et al., Ravi & Larochelle split): 64 / 16 / 20 classes of
    600 images, 84x84 colour, from MetaOptNet's or RFS's pickles.

    Args:
        root: the folder holding the ``miniImageNet_category_split_*.pickle`` files.
        split: ``"train"`` (the ``train_phase_train`` file), ``"val"``, ``"test"`` or
            ``"trainval"``.

    Raises:
        ValueError: a missing or unreadable file, or a bad split (as every loader here).

    Example:
        >>> MiniImageNet._files["val"]          # the file each split reads in ``root``
        'miniImageNet_category_split_val.pickle'
    """

    _title = "mini-ImageNet"
    _mean, _std = IMAGENET_MEAN, IMAGENET_STD
    _files = {"train": "miniImageNet_category_split_train_phase_train.pickle",
              "val": "miniImageNet_category_split_val.pickle",
              "test": "miniImageNet_category_split_test.pickle"}


class CIFARFS(_DictPickleBenchmark):
    """CIFAR-FS (Bertinetto et al.): CIFAR-100 split by class into 64 / 16 / 20, 32x32 colour,
    from MetaOptNet's or RFS's ``CIFAR_FS_{split}.pickle`` files in ``root``.

    Args:
        root: the folder holding the pickles.
        split: ``"train"``, ``"val"``, ``"test"`` or ``"trainval"``.

    Example:
        >>> import os, pickle, tempfile
        >>> import numpy as np
        >>> root = tempfile.mkdtemp()                 # a two-class file in the format
        >>> with open(os.path.join(root, "CIFAR_FS_test.pickle"), "wb") as f:
        ...     pickle.dump({"data": np.zeros((4, 32, 32, 3), np.uint8),
        ...                  "labels": [7, 7, 9, 9]}, f)
        >>> test = CIFARFS(root, "test")
        >>> test.n_classes, test.images.shape
        (2, (4, 32, 32, 3))
    """

    _title = "CIFAR-FS"
    _mean, _std = CIFAR_MEAN, CIFAR_STD
    _files = {s: f"CIFAR_FS_{s}.pickle" for s in ("train", "val", "test")}


class FC100(_DictPickleBenchmark):
    """FC100 (Oreshkin et al.): CIFAR-100 split by superclass into 60 / 20 / 20 classes,
    32x32 colour, from MetaOptNet's or RFS's ``FC100_{split}.pickle`` files in ``root``.

    Args:
        root: the folder holding the pickles (the format of :class:`CIFARFS`'s example).
        split: ``"train"``, ``"val"``, ``"test"`` or ``"trainval"``.

    Example:
        >>> sorted(FC100._files.values())
        ['FC100_test.pickle', 'FC100_train.pickle', 'FC100_val.pickle']
    """

    _title = "FC100"
    _mean, _std = CIFAR_MEAN, CIFAR_STD
    _files = {s: f"FC100_{s}.pickle" for s in ("train", "val", "test")}


class TieredImageNet(_PickleBenchmark):
    """tiered-ImageNet (Ren et al.): 351 / 97 / 160 classes, 84x84 colour.

    Reads MetaOptNet's / RFS's ``{split}_images.npz`` (key ``images``: a uint8 array
    (N, 84, 84, 3) or one encoded image per entry) with ``{split}_labels.pkl`` (key
    ``label_specific``, else ``labels``), or the original ``{split}_images_png.pkl``.

    Args:
        root, split: as for :class:`CIFARFS`, ``root`` holding the files above.

    Example:
        >>> import pathlib, pickle, tempfile
        >>> import numpy as np
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> np.savez(root / "val_images.npz", images=np.zeros((2, 84, 84, 3), np.uint8))
        >>> _ = (root / "val_labels.pkl").write_bytes(pickle.dumps({"label_specific": [3, 5]}))
        >>> TieredImageNet(root, "val").class_sizes().tolist()
        [1, 1]
    """

    _title = "tiered-ImageNet"
    _mean, _std = IMAGENET_MEAN, IMAGENET_STD

    def _read_part(self, root: Path, part: str) -> tuple[np.ndarray, np.ndarray, dict | None]:
        image_path = _require(root, [f"{part}_images.npz", f"{part}_images_png.pkl"],
                              self._title)
        label_path = _require(root, [f"{part}_labels.pkl"], self._title)
        if image_path.suffix == ".npz":
            raw = _npz_images(image_path)
        else:
            raw = _load_pickle(image_path)
        content = _load_pickle(label_path)
        key = next((k for k in ("label_specific", "labels") if isinstance(content, dict)
                    and k in content), None)
        if key is None:
            raise ValueError(f"{label_path} is not a tiered-ImageNet label file: expected a "
                             "dict with key 'label_specific' or 'labels'")
        names = None
        strings = content.get("label_specific_str") if key == "label_specific" else None
        if strings is not None and len(strings) > 0:
            names = {i: str(s) for i, s in enumerate(strings)}
        return _as_images(raw, image_path), np.asarray(content[key]), names


def _npz_images(path: Path) -> np.ndarray:
    """The ``images`` array of an .npz; encoded images are an object array, which is
    pickled inside it, and read with the data-only unpickler."""
    try:
        with zipfile.ZipFile(path) as zf:
            if "images.npy" not in zf.namelist():
                found = [n.removesuffix(".npy") for n in zf.namelist()]
                raise ValueError(f"{path} has no 'images' array (found {found})")
            with zf.open("images.npy") as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                _, _, dtype = read(f)
                if dtype.hasobject:
                    left = zf.getinfo("images.npy").file_size - f.tell()
                    return np.asarray(safe_load(f, path, left))
    except zipfile.BadZipFile:
        raise ValueError(f"{path} is not an .npz archive") from None
    with np.load(path, allow_pickle=False) as npz:
        return npz["images"]


def _require(root: Path, candidates: list[str], title: str) -> Path:
    """The first of ``candidates`` present in ``root``, else a ValueError naming them."""
    for name in candidates:
        if (root / name).is_file():
            return root / name
    wanted = " or ".join(repr(c) for c in candidates)
    raise ValueError(f"{title}: expected file {wanted} in root {str(root)!r}, not found")


def _load_pickle(path: Path) -> Any:
    with open(path, "rb") as f:
        content = safe_load(f, path, os.fstat(f.fileno()).st_size)
    if isinstance(content, dict):
        content = {k.decode("latin1") if isinstance(k, bytes) else k: v
                   for k, v in content.items()}
    return content


def _as_images(raw: Any, path: Path) -> np.ndarray:
    """uint8 (N, H, W, 3) from a decoded array or a sequence of encoded images."""
    if isinstance(raw, np.ndarray) and raw.dtype == np.uint8 and raw.ndim == 4:
        if raw.shape[3] != 3:
            raise ValueError(f"{path}: expected colour images (N, H, W, 3), got {raw.shape}")
        return raw
    if isinstance(raw, np.ndarray) and raw.dtype != object and raw.ndim != 1:
        raise ValueError(f"{path}: expected uint8 images (N, H, W, 3) or encoded images, got "
                         f"{raw.dtype} array of shape {raw.shape}")
    encoded = list(raw)
    if not encoded:
        raise ValueError(f"{path} holds no images")
    if isinstance(encoded[0], np.ndarray) and encoded[0].ndim == 3:
        # Already decoded, just stored as a list of arrays rather than one array.
        return _as_images(np.stack(encoded), path)
    first = _decode(encoded[0], path, 0)
    out = np.empty((len(encoded),) + first.shape, dtype=np.uint8)
    out[0] = first
    for i in range(1, len(encoded)):
        img = _decode(encoded[i], path, i)
        if img.shape != first.shape:
            raise ValueError(f"{path}: image {i} has shape {img.shape}, image 0 {first.shape}")
        out[i] = img
    return out


def _decode(item: Any, path: Path, index: int) -> np.ndarray:
    data = item if isinstance(item, (bytes, bytearray)) else np.asarray(item, np.uint8).tobytes()
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Exception as err:  # PIL raises several types for corrupt data
        raise ValueError(f"{path}: cannot decode image {index}: {err}") from None


def _relabel(raw: np.ndarray, names: dict | None) -> tuple[np.ndarray, list[str]]:
    """Labels 0..C-1 in sorted order of the raw ids, and one name per class."""
    raw = np.asarray(raw).reshape(-1)
    if raw.size and not np.issubdtype(raw.dtype, np.integer):
        raise ValueError(f"labels must be integers, got {raw.dtype}")
    ids, labels = np.unique(raw, return_inverse=True)
    names = names or {}
    return labels.astype(np.int64), [names.get(int(i), str(int(i))) for i in ids]
