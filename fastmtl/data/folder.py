"""A user's own images: one folder per class, read once into a :class:`FewShotDataset`.

Layout: ``root/<class>/<image>`` (PNG, JPEG, BMP, WebP, GIF, TIFF through Pillow), or one
level deeper with ``nested=True`` (``root/<group>/<class>/<image>``, as Omniglot's
``<alphabet>/<character>``; the class name is then ``group/class``). Hidden files and
folders are skipped.

Conversion (documented, and what the tests check): every image is converted to
``"L"`` (grey, ``channels=1``) or ``"RGB"`` (``channels=3``) with Pillow's ``convert``
(palette and alpha images included; alpha is dropped), then resized to
``image_size x image_size`` with bilinear filtering if it is not that size already
(no crop: non-square images are squeezed). Pixels stay uint8; ``mean``/``std`` are
computed from the *training* split's images (scaled to [0, 1]) and shared by every
split, so a model sees all splits on one scale.

Split by class, seeded: ``split="train"|"val"|"test"|"all"`` with ``split_fractions``
(train, val, test) of the classes, drawn by a permutation of the sorted class names from
``seed``; every split is a disjoint set of whole classes.

Reading uses a thread pool (Pillow decodes without the GIL) with a progress bar for
large folders; the decoded arrays are cached in a ``.npz`` (``cache_dir``, default
``~/.cache/fastmtl``) keyed on the file list, sizes and modification times and the
conversion settings, so the second load reads one file.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from .base import FewShotDataset

if TYPE_CHECKING:  # Pillow is imported where an image is read
    from PIL.Image import Image as PILImage

__all__ = ["ImageFolder", "IMAGE_EXTENSIONS", "read_image", "class_folders", "image_files"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
_SPLITS = ("train", "val", "test", "trainval", "all")


def read_image(path_or_image: str | os.PathLike | PILImage | np.ndarray, image_size: int,
               channels: int) -> np.ndarray:
    """One image (a path, a PIL image or a uint8 array) converted as the module says.

    Args:
        path_or_image: a file path, a ``PIL.Image`` or a uint8 array (H, W[, C]).
        image_size: side of the square result.
        channels: 1 (grey) or 3 (RGB).

    Returns:
        uint8 array (H, W) for ``channels=1`` or (H, W, 3).

    Raises:
        ValueError: the file cannot be read or decoded.

    Example:
        >>> import numpy as np
        >>> read_image(np.zeros((50, 40, 3), np.uint8), image_size=28, channels=1).shape
        (28, 28)
    """
    from PIL import Image
    mode = "L" if channels == 1 else "RGB"
    try:
        if isinstance(path_or_image, Image.Image):
            im = path_or_image
            im.load()
        elif isinstance(path_or_image, np.ndarray):
            arr = path_or_image
            if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
                raise ValueError(f"image arrays must be uint8 (H, W) or (H, W, C), got "
                                 f"{arr.dtype} {arr.shape}")
            im = Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr)
        else:
            im = Image.open(path_or_image)
            im.load()
        im = im.convert(mode)
    except ValueError:
        raise
    except Exception as err:      # Pillow raises several types for corrupt files
        raise ValueError(f"cannot read image {str(path_or_image)!r}: "
                         f"{type(err).__name__}: {err}") from None
    if im.size != (image_size, image_size):
        im = im.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.asarray(im, dtype=np.uint8)


def _visible(p: Path) -> bool:
    return not p.name.startswith(".") and not p.name.startswith("_")


def image_files(folder: str | os.PathLike) -> list[Path]:
    """The image files directly in ``folder`` (by extension), sorted.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> for n in ("b.png", "a.JPG", "notes.txt"):
        ...     _ = (d / n).write_bytes(b"")
        >>> [p.name for p in image_files(d)]
        ['a.JPG', 'b.png']
    """
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and _visible(p)
                  and p.suffix.lower() in IMAGE_EXTENSIONS)


def class_folders(root: str | os.PathLike, nested: bool = False) -> list[tuple[str, list[Path]]]:
    """(class name, image files) of every class folder under ``root``, sorted by name.

    Args:
        root: the folder holding one sub-folder per class.
        nested: classes are two levels deep, named ``group/class``.

    Returns:
        a list of (name, sorted image paths).

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> (d / "zebra").mkdir(); _ = (d / "zebra" / "1.png").write_bytes(b"")
        >>> [(name, len(files)) for name, files in class_folders(d)]
        [('zebra', 1)]
    """
    return _list_classes(Path(root), nested)


def _list_classes(root: Path, nested: bool) -> list[tuple[str, list[Path]]]:
    visible, images = _visible, image_files
    out = []
    for first in sorted(p for p in root.iterdir() if p.is_dir() and visible(p)):
        if nested:
            for second in sorted(p for p in first.iterdir() if p.is_dir() and visible(p)):
                out.append((f"{first.name}/{second.name}", images(second)))
        else:
            out.append((first.name, images(first)))
    return out


def _cache_key(files: list[Path], image_size: int, channels: int) -> str:
    h = hashlib.sha256(json.dumps([image_size, channels, 1]).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


class ImageFolder(FewShotDataset):
    """Images in one folder per class, as a :class:`FewShotDataset`.

    Args:
        root: the folder holding one sub-folder per class.
        image_size: side of the square images after conversion (default 84).
        channels: 1 (grey) or 3 (RGB).
        classes: class names to keep (default all found; a split then applies to these).
        split: "train", "val", "test", "trainval" (a seeded split by class) or "all".
        split_fractions: the (train, val, test) shares of the classes.
        seed: seeds the class split.
        nested: classes are two levels deep (``group/class``).
        min_images: a class with fewer images is an error (names the class); 1 by default.
        skip_bad_images: leave out unreadable files (counted, with a warning) instead of
            failing on the first one.
        cache_dir: where decoded arrays are cached (None: ``$FASTMTL_CACHE`` or
            ``~/.cache/fastmtl``; False: no cache).
        num_threads: decoding threads (None: all cores).
        progress: show a progress bar when decoding more than 500 images.

    Raises:
        ValueError: a missing or empty root, no class folders, an unreadable image (named,
            with the count), a class with too few images, bad arguments.

    Example:
        >>> import os, tempfile
        >>> from PIL import Image
        >>> root = tempfile.mkdtemp()
        >>> for name in ("cat", "dog"):
        ...     os.makedirs(os.path.join(root, name))
        ...     for i in range(3):
        ...         path = os.path.join(root, name, f"{i}.png")
        ...         Image.new("RGB", (40, 30), (60 * i, 0, 0)).save(path)
        >>> data = ImageFolder(root, image_size=32, channels=3, cache_dir=False, progress=False)
        >>> data.class_names, data.images.shape
        (['cat', 'dog'], (6, 32, 32, 3))
    """

    def __init__(self, root: str | os.PathLike, image_size: int = 84, channels: int = 3,
                 classes: Sequence[str] | None = None, split: str = "all",
                 split_fractions: Sequence[float] = (0.6, 0.2, 0.2), seed: int = 0,
                 nested: bool = False, min_images: int = 1, skip_bad_images: bool = False,
                 cache_dir: str | os.PathLike | Literal[False] | None = None,
                 num_threads: int | None = None, progress: bool = True):
        from .. import checks
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"root {str(root)!r} is not a folder")
        checks.integer("image_size", image_size, 8)
        checks.one_of("channels", channels, (1, 3))
        checks.one_of("split", split, _SPLITS)
        checks.integer("min_images", min_images, 1)
        fractions = tuple(float(f) for f in split_fractions)
        if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
            raise ValueError(f"split_fractions must be three shares (train, val, test) "
                             f"summing to 1, got {split_fractions!r}")
        found = _list_classes(root, nested)
        if classes is not None:
            names = {n for n, _ in found}
            missing = [c for c in classes if c not in names]
            if missing:
                raise ValueError(f"classes not found under {str(root)!r}: {missing[:5]}")
            keep = set(classes)
            found = [(n, f) for n, f in found if n in keep]
        if not found:
            raise ValueError(f"root {str(root)!r} holds no class folders"
                             + (" two levels deep (nested=True)" if nested else ""))
        empty = [n for n, f in found if not f]
        if empty:
            raise ValueError(f"class folder(s) with no images under {str(root)!r}: "
                             f"{empty[:5]} (images: {', '.join(IMAGE_EXTENSIONS)})")
        chosen = _split_classes([n for n, _ in found], split, fractions, seed)
        train_names = _split_classes([n for n, _ in found], "train", fractions, seed) \
            if split != "all" else chosen
        by_name = dict(found)
        images, labels, kept_names = self._load(
            [(n, by_name[n]) for n in sorted(set(chosen) | set(train_names))], image_size,
            channels, skip_bad_images, cache_dir, num_threads, progress)
        small = [(n, int((labels == i).sum())) for i, n in enumerate(kept_names)
                 if (labels == i).sum() < min_images]
        if small:
            raise ValueError(f"class(es) with fewer than {min_images} images: "
                             + ", ".join(f"{n!r} ({k})" for n, k in small[:5]))
        mean, std = _stats(images[np.isin(labels, [kept_names.index(n) for n in train_names
                                                   if n in kept_names])], channels)
        index = [kept_names.index(n) for n in chosen if n in kept_names]
        remap = np.full(len(kept_names), -1, dtype=np.int64)
        remap[index] = np.arange(len(index))
        mask = remap[labels] >= 0
        super().__init__(images[mask], remap[labels[mask]], [kept_names[i] for i in index],
                         mean, std, name=f"folder:{root.name}-{split}")
        self.root, self.split, self.seed = str(root), split, seed
        self.split_fractions, self.nested = fractions, nested

    @staticmethod
    def _load(found: list[tuple[str, list[Path]]], image_size: int, channels: int,
              skip_bad: bool, cache_dir: str | os.PathLike | Literal[False] | None,
              num_threads: int | None, progress: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
        files = [f for _, fs in found for f in fs]
        labels = np.concatenate([np.full(len(fs), i, dtype=np.int64)
                                 for i, (_, fs) in enumerate(found)])
        cache = None
        if cache_dir is not False:
            folder = Path(cache_dir or os.environ.get("FASTMTL_CACHE")
                          or Path.home() / ".cache" / "fastmtl")
            cache = folder / f"imagefolder-{_cache_key(files, image_size, channels)}.npz"
            if cache.exists():
                with np.load(cache) as z:
                    return z["images"], z["labels"], list(z["names"])
        shape = (image_size, image_size) + (() if channels == 1 else (3,))
        out = np.empty((len(files),) + shape, dtype=np.uint8)
        ok = np.ones(len(files), dtype=bool)
        errors: list[str] = []

        def one(i: int) -> None:
            try:
                out[i] = read_image(files[i], image_size, channels)
            except ValueError as err:
                ok[i] = False
                errors.append(str(err))

        from tqdm.auto import tqdm
        threads = num_threads or os.cpu_count() or 1
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for _ in tqdm(pool.map(one, range(len(files))), total=len(files),
                          desc="reading images", leave=False,
                          disable=not progress or len(files) <= 500):
                pass
        if errors and not skip_bad:
            raise ValueError(f"{len(errors)} of {len(files)} images cannot be read (pass "
                             f"skip_bad_images=True / --skip-bad-images to leave them out); "
                             f"first: {sorted(errors)[0]}")
        if errors:
            import warnings
            warnings.warn(f"ImageFolder: left out {len(errors)} unreadable image(s); first: "
                          f"{sorted(errors)[0]}", RuntimeWarning, stacklevel=3)
        images, labels = out[ok], labels[ok]
        present = np.unique(labels)
        names = [found[i][0] for i in present]
        remap = np.full(len(found), -1, dtype=np.int64)
        remap[present] = np.arange(len(present))
        labels = remap[labels]
        if cache is not None and not errors:
            try:
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_suffix(f".tmp{os.getpid()}.npz")
                np.savez(tmp, images=images, labels=labels, names=np.array(names))
                os.replace(tmp, cache)
            except OSError:
                pass      # a read-only cache folder only costs the next load its time
        return images, labels, names


def _split_classes(names: list[str], split: str, fractions: Sequence[float],
                   seed: int) -> list[str]:
    if split == "all":
        return list(names)
    order = np.random.default_rng(seed).permutation(len(names))
    n_train = int(round(fractions[0] * len(names)))
    n_val = int(round(fractions[1] * len(names)))
    parts = {"train": order[:n_train], "val": order[n_train:n_train + n_val],
             "test": order[n_train + n_val:]}
    parts["trainval"] = np.concatenate([parts["train"], parts["val"]])
    chosen = sorted(parts[split].tolist())
    if not chosen:
        raise ValueError(f"split {split!r} of {len(names)} classes with split_fractions "
                         f"{tuple(fractions)} holds no class")
    return [names[i] for i in chosen]


def _stats(images: np.ndarray, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if images.size == 0:
        return (0.0,) * channels, (1.0,) * channels
    x = images.reshape(-1, channels)
    n = x.shape[0]
    # Sums in float64 without a float copy of the images (a 2,000-image 84x84x3 set:
    # 40 ms instead of 0.5 s).
    s1 = x.sum(axis=0, dtype=np.float64)
    s2 = np.einsum("ij,ij->j", x, x, dtype=np.float64, casting="unsafe")
    mean = s1 / n / 255.0
    std = np.maximum(np.sqrt(np.maximum(s2 / n / 255.0**2 - mean**2, 0.0)), 1e-3)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)
