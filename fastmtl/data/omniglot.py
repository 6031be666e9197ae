"""Omniglot read from its standard folder layout or straight from the .zip archives.

The layout is ``<anything>/<Alphabet>/characterNN/<id>_<drawer>.png``, as published in the
data set's own repository (brendenlake/omniglot) and read by other few-shot libraries.
Folders and archives may be mixed under one root; an image found twice (the two
"background small" archives both hold Greek and Latin) is kept once, after checking that
both copies are byte for byte the same.
"""
from __future__ import annotations

import io
import os
import re
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from .. import checks
from .base import FewShotDataset

__all__ = ["Omniglot", "OMNIGLOT_SPLITS", "OMNIGLOT_MEAN", "OMNIGLOT_STD"]

# A fixed alphabet split of the eight alphabets in the two "background small" archives
# (242 characters): whole alphabets are held out, so test characters come from scripts the
# learner never saw. train has 161 characters, val 22, test 59.
OMNIGLOT_SPLITS: dict[str, list[str]] = {
    "train": ["Balinese", "Greek", "Japanese_(katakana)", "Korean", "Latin"],
    "val": ["Early_Aramaic"],
    "test": ["Sanskrit", "Tagalog"],
}
OMNIGLOT_SPLITS["trainval"] = OMNIGLOT_SPLITS["train"] + OMNIGLOT_SPLITS["val"]

# Pixel mean/std (strokes bright, scaled to [0, 1]) of all 4,840 images at 28x28, measured
# once. Fixed constants rather than per-load statistics so that every split and subset of
# Omniglot is normalized the same way (a backbone trained on "train" sees "test" pixels on
# the same scale). They are close enough at other image sizes for normalization purposes.
OMNIGLOT_MEAN = (0.0843,)
OMNIGLOT_STD = (0.2393,)

_CHARACTER_DIR = re.compile(r"^character\d+$")


class Omniglot(FewShotDataset):
    """Omniglot characters as a :class:`FewShotDataset`, one class per (alphabet, character).

    Args:
        root: a folder searched recursively for ``.zip`` archives and for alphabet folders
            in the standard layout ``<Alphabet>/characterNN/<id>_<drawer>.png``.
        alphabets: the alphabets to load (names as in the archives, e.g.
            ``"Japanese_(katakana)"``); default all found, unless ``split`` is given.
        split: ``"train"``, ``"val"``, ``"test"`` or ``"trainval"``: the alphabets of
            :data:`OMNIGLOT_SPLITS`. Give ``alphabets`` or ``split``, not both.
        image_size: side of the square images after resizing (Lanczos, antialiased).

    Classes are named ``"Alphabet/characterNN"`` and sorted by name; labels are 0..C-1.
    Images are uint8 (N, image_size, image_size), strokes bright (255) on a dark (0)
    background; ``mean``/``std`` are :data:`OMNIGLOT_MEAN`/:data:`OMNIGLOT_STD`.
    Decoding every image takes under a second, so nothing is cached on disk.

    Raises:
        ValueError: no archives or alphabet folders under ``root``, unknown alphabets or
            split, both ``alphabets`` and ``split``, or a bad ``image_size``.

    Example:
        >>> import os
        >>> root = os.environ.get("FASTMTL_OMNIGLOT", "../shared/data/omniglot")
        >>> if os.path.isdir(root):            # the data is read where it lies
        ...     assert len(Omniglot(root, split="val").class_names) == 22
    """

    def __init__(self, root: str | os.PathLike, alphabets: Sequence[str] | None = None,
                 split: str | None = None, image_size: int = 28):
        if alphabets is not None and split is not None:
            raise ValueError("give either alphabets or split, not both")
        if split is not None and split not in OMNIGLOT_SPLITS:
            raise ValueError(f"split must be one of {sorted(OMNIGLOT_SPLITS)}, got {split!r}")
        checks.integer("image_size", image_size, 1)
        if isinstance(alphabets, str):
            alphabets = [alphabets]
        if alphabets is not None and len(alphabets) == 0:
            raise ValueError("alphabets must name at least one alphabet (or be None for all)")
        root_path = Path(root)
        if not root_path.is_dir():
            raise ValueError(f"Omniglot root {str(root)!r} is not an existing folder")

        files = _find_images(root_path)
        if not files:
            raise ValueError(f"no Omniglot images found under root {str(root)!r}: expected "
                             "<Alphabet>/characterNN/*.png in folders or .zip archives")
        available = sorted({key.split("/", 1)[0] for key in files})
        wanted = OMNIGLOT_SPLITS[split] if split is not None else alphabets
        if wanted is not None:
            wanted = list(dict.fromkeys(wanted))
            unknown = [a for a in wanted if a not in available]
            if unknown:
                raise ValueError(f"unknown alphabet(s) {unknown} under root {str(root)!r}; "
                                 f"available: {available}")
            chosen = set(wanted)
            files = {k: v for k, v in files.items() if k.split("/", 1)[0] in chosen}
        else:
            wanted = available

        keys = sorted(files)
        class_names = sorted({k.rsplit("/", 1)[0] for k in keys})
        class_index = {name: i for i, name in enumerate(class_names)}
        labels = np.fromiter((class_index[k.rsplit("/", 1)[0]] for k in keys), dtype=np.int64,
                             count=len(keys))
        images = _decode_all(keys, files, int(image_size))
        super().__init__(images, labels, class_names, OMNIGLOT_MEAN, OMNIGLOT_STD,
                         name=f"omniglot-{split}" if split else "omniglot")
        self.alphabets = sorted(wanted)


def _find_images(root: Path) -> dict[str, list[tuple[str, str]]]:
    """Map ``Alphabet/characterNN/file.png`` to every (source, member) holding it.

    ``source`` is a zip path (``member`` its entry name) or ``""`` for a plain file
    (``member`` its path). Walk order is sorted so the kept copy is deterministic.
    """
    found: dict[str, list[tuple[str, str]]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        here = Path(dirpath)
        for fname in sorted(filenames):
            if fname.startswith("._"):  # macOS resource forks, not images
                continue
            lower = fname.lower()
            if lower.endswith(".zip"):
                _scan_zip(here / fname, found)
            elif lower.endswith(".png") and _CHARACTER_DIR.match(here.name):
                key = f"{here.parent.name}/{here.name}/{fname}"
                found.setdefault(key, []).append(("", str(here / fname)))
    return found


def _scan_zip(path: Path, found: dict[str, list[tuple[str, str]]]) -> None:
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError) as err:
        raise ValueError(f"cannot read the zip archive {str(path)!r}: {err}") from None
    for name in names:
        parts = name.split("/")
        if (len(parts) < 3 or not parts[-1].lower().endswith(".png")
                or parts[-1].startswith("._") or "__MACOSX" in parts
                or not _CHARACTER_DIR.match(parts[-2])):
            continue
        found.setdefault("/".join(parts[-3:]), []).append((str(path), name))


def _decode_all(keys: list[str], files: dict[str, list[tuple[str, str]]],
                image_size: int) -> np.ndarray:
    out = np.empty((len(keys), image_size, image_size), dtype=np.uint8)
    archives: dict[str, zipfile.ZipFile] = {}

    def read(source: str, member: str) -> bytes:
        if not source:
            return Path(member).read_bytes()
        if source not in archives:
            archives[source] = zipfile.ZipFile(source)
        return archives[source].read(member)

    try:
        for i, key in enumerate(keys):
            copies = files[key]
            data = read(*copies[0])
            for other in copies[1:]:
                # A duplicate is only safe to drop if it is the very same image.
                if read(*other) != data:
                    raise ValueError(f"conflicting copies of Omniglot image {key!r}: "
                                     f"{_where(copies[0])} and {_where(other)} differ")
            out[i] = _decode(data, image_size, key)
    finally:
        for zf in archives.values():
            zf.close()
    return out


def _where(copy: tuple[str, str]) -> str:
    source, member = copy
    return f"{source}:{member}" if source else member


def _decode(data: bytes, image_size: int, key: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            grey = im.convert("L")
    except Exception as err:  # PIL raises several types for corrupt files
        raise ValueError(f"cannot decode Omniglot image {key!r}: {err}") from None
    if grey.size != (image_size, image_size):
        grey = grey.resize((image_size, image_size), Image.Resampling.LANCZOS)
    # The archives draw black strokes on white; invert so strokes are the signal (255).
    return 255 - np.asarray(grey, dtype=np.uint8)
