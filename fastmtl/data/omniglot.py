"""Omniglot read from its standard folder layout or straight from the .zip archives.

The layout is ``<anything>/<Alphabet>/characterNN/<id>_<drawer>.png``, as published in the
data set's own repository (brendenlake/omniglot) and read by other few-shot libraries.
Folders and archives may be mixed under one root; an image found twice (the two
"background small" archives both hold Greek and Latin) is kept once, after checking that
both copies are byte for byte the same.

Which split a ``split`` name selects depends on what the root holds
(:mod:`fastmtl.data.omniglot_splits`): the whole background set (``images_background``,
zip or folder) gives its 648 / 163 / 153-character alphabet split, the two small archives
the 161 / 22 / 59 one, and the ``vinyals-*`` splits need the background and evaluation
sets together. A container is recognized by its official name (the zip, or the folder
above the alphabets); one with another name counts by its alphabets.
"""
from __future__ import annotations

import io
import os
import re
import zipfile
from collections.abc import Sequence
from pathlib import Path
from types import MappingProxyType

import numpy as np
from PIL import Image

from .. import checks
from .base import FewShotDataset
from .omniglot_splits import (
    OMNIGLOT_BACKGROUND_ALPHABETS,
    OMNIGLOT_EVALUATION_ALPHABETS,
    OMNIGLOT_FULL_SPLITS,
    OMNIGLOT_SPLITS,
    VINYALS_ANGLES,
    VINYALS_SPLITS,
    vinyals_characters,
)
from .transforms import with_rotations

__all__ = ["Omniglot", "OMNIGLOT_SPLITS", "OMNIGLOT_FULL_SPLITS", "OMNIGLOT_MEAN",
           "OMNIGLOT_STD"]

# Pixel mean/std (strokes bright, scaled to [0, 1]) of all 4,840 images at 28x28, measured
# once. Fixed constants rather than per-load statistics so that every split and subset of
# Omniglot is normalized the same way (a backbone trained on "train" sees "test" pixels on
# the same scale). They are close enough at other image sizes for normalization purposes.
OMNIGLOT_MEAN = (0.0843,)
OMNIGLOT_STD = (0.2393,)

_CHARACTER_DIR = re.compile(r"^character\d+$")
# Official container names (zip stem or the folder above the alphabets) -> their family.
_NAMED_FAMILIES = MappingProxyType({
    "images_background": "background", "images_background_small1": "small",
    "images_background_small2": "small", "images_evaluation": "evaluation"})
_SMALL_ALPHABETS = frozenset(OMNIGLOT_SPLITS["trainval"] + OMNIGLOT_SPLITS["test"])
_BACKGROUND_ONLY = frozenset(OMNIGLOT_BACKGROUND_ALPHABETS) - _SMALL_ALPHABETS
_EVALUATION = frozenset(OMNIGLOT_EVALUATION_ALPHABETS)
# Image key ("Alphabet/characterNN/file.png") -> its copies as (zip or "", member or path).
_Files = dict[str, list[tuple[str, str]]]


class Omniglot(FewShotDataset):
    """Omniglot characters as a :class:`FewShotDataset`, one class per (alphabet, character).

    Args:
        root: a folder searched recursively for ``.zip`` archives and for alphabet folders
            in the standard layout ``<Alphabet>/characterNN/<id>_<drawer>.png``.
        alphabets: the alphabets to load (names as in the archives, e.g.
            ``"Japanese_(katakana)"``); default all found, unless ``split`` is given.
        split: ``"train"``, ``"val"``, ``"test"`` or ``"trainval"``: the alphabets of
            :data:`OMNIGLOT_FULL_SPLITS` when ``root`` holds the whole background set
            (``images_background``, zip or folder), else of :data:`OMNIGLOT_SPLITS` (the
            two small archives); or ``"vinyals-train"``, ``"vinyals-val"``,
            ``"vinyals-test"``, ``"vinyals-trainval"``: the characters of Vinyals et al.
            (needs ``images_background`` and ``images_evaluation``), each rotated by 0,
            90, 180 and 270 degrees as four classes. Give ``alphabets`` or ``split``, not
            both.
        image_size: side of the square images after resizing (Lanczos, antialiased).

    Classes are named ``"Alphabet/characterNN"`` (``"Alphabet/characterNN/rot090"`` in
    a Vinyals split) and sorted by name; labels are 0..C-1. Images are uint8
    (N, image_size, image_size), strokes bright (255) on a dark (0) background;
    ``mean``/``std`` are :data:`OMNIGLOT_MEAN`/:data:`OMNIGLOT_STD`. ``split_family`` says
    which table ``split`` used: ``"small"``, ``"background"`` or ``"vinyals"`` (None
    without ``split``). Decoding the 19,280 background images takes a few seconds, so
    nothing is cached on disk.

    Raises:
        ValueError: no archives or alphabet folders under ``root``, both the whole
            background set and the small archives under it, unknown alphabets or split,
            a Vinyals split without the archives it needs, both ``alphabets`` and
            ``split``, or a bad ``image_size``.

    Example:
        >>> import os
        >>> root = os.environ.get("FASTMTL_OMNIGLOT", "../shared/data/omniglot")
        >>> if os.path.isdir(root):            # the data is read where it lies
        ...     val = Omniglot(root, split="val")
        ...     assert len(val.class_names) == 22 and val.split_family == "small"
    """

    def __init__(self, root: str | os.PathLike, alphabets: Sequence[str] | None = None,
                 split: str | None = None, image_size: int = 28):
        alphabets = _check_arguments(alphabets, split, image_size)
        root_path = Path(root)
        if not root_path.is_dir():
            raise ValueError(f"Omniglot root {str(root)!r} is not an existing folder")
        files = _find_images(root_path)
        if not files:
            raise ValueError(f"no Omniglot images found under root {str(root)!r}: expected "
                             "<Alphabet>/characterNN/*.png in folders or .zip archives")
        family = _split_family(files, split, str(root))
        wanted: Sequence[str] | None
        if family == "vinyals":
            assert split is not None  # the family of a Vinyals split
            files = _vinyals_files(files, split, str(root))
            wanted = sorted({key.split("/", 1)[0] for key in files})
        else:
            table = OMNIGLOT_FULL_SPLITS if family == "background" else OMNIGLOT_SPLITS
            wanted = table[split] if split is not None else alphabets
            files, wanted = _alphabet_files(files, wanted, str(root))

        keys = sorted(files)
        class_names = sorted({k.rsplit("/", 1)[0] for k in keys})
        class_index = {name: i for i, name in enumerate(class_names)}
        labels = np.fromiter((class_index[k.rsplit("/", 1)[0]] for k in keys), dtype=np.int64,
                             count=len(keys))
        images = _decode_all(keys, files, int(image_size))
        if family == "vinyals":
            images, labels, class_names = _rotations(images, labels, class_names)
        super().__init__(images, labels, class_names, OMNIGLOT_MEAN, OMNIGLOT_STD,
                         name=f"omniglot-{split}" if split else "omniglot")
        self.alphabets = sorted(wanted)
        self.split_family = family


def _check_arguments(alphabets: Sequence[str] | None, split: str | None,
                     image_size: int) -> list[str] | None:
    """The checks of :class:`Omniglot`'s arguments, before any file is read; returns
    ``alphabets`` as a list (or None)."""
    if alphabets is not None and split is not None:
        raise ValueError("give either alphabets or split, not both")
    if split is not None and split not in OMNIGLOT_SPLITS and split not in VINYALS_SPLITS:
        raise ValueError(f"split must be one of {sorted(OMNIGLOT_SPLITS)} or "
                         f"{list(VINYALS_SPLITS)}, got {split!r}")
    checks.integer("image_size", image_size, 1)
    if isinstance(alphabets, str):
        alphabets = [alphabets]
    if alphabets is not None and len(alphabets) == 0:
        raise ValueError("alphabets must name at least one alphabet (or be None for all)")
    return None if alphabets is None else list(alphabets)


def _alphabet_files(files: _Files, wanted: Sequence[str] | None,
                    root: str) -> tuple[_Files, list[str]]:
    """``files`` of the ``wanted`` alphabets (all when None) and the alphabets kept."""
    available = sorted({key.split("/", 1)[0] for key in files})
    if wanted is None:
        return files, available
    wanted = list(dict.fromkeys(wanted))
    unknown = [a for a in wanted if a not in available]
    if unknown:
        raise ValueError(f"unknown alphabet(s) {unknown} under root {root!r}; "
                         f"available: {available}")
    chosen = set(wanted)
    return {k: v for k, v in files.items() if k.split("/", 1)[0] in chosen}, wanted


def _split_family(files: _Files, split: str | None, root: str) -> str | None:
    """Which split table ``split`` reads, from what the root holds; a ValueError when the
    root holds the whole background set and the small archives (the same images twice)."""
    found: dict[str, set[str]] = {}
    for key, copies in files.items():
        for copy in copies:
            found.setdefault(_family_of(key, copy), set()).add(_container_label(copy))
    if "background" in found and "small" in found:
        raise ValueError(f"Omniglot root {root!r} holds both the whole background set "
                         f"({', '.join(sorted(found['background']))}) and the small subsets "
                         f"({', '.join(sorted(found['small']))}), the same images twice: "
                         "keep one of them under root")
    if split is None:
        return None
    if split in VINYALS_SPLITS:
        return "vinyals"
    return "background" if "background" in found else "small"


def _container(copy: tuple[str, str]) -> str:
    """The name of what holds the alphabet folder: the folder above it, in a zip or not,
    else the zip's own name."""
    source, member = copy
    if not source:
        return Path(member).parent.parent.parent.name
    parts = member.split("/")
    return parts[-4] if len(parts) >= 4 else Path(source).stem


def _container_label(copy: tuple[str, str]) -> str:
    """How an error names a container: the zip's file name, or the folder."""
    source, member = copy
    return Path(source).name if source else str(Path(member).parent.parent.parent)


def _family_of(key: str, copy: tuple[str, str]) -> str:
    """The family of one copy of an image: by its container's official name, else by its
    alphabet (an alphabet only the whole background set has, or an evaluation one)."""
    named = _NAMED_FAMILIES.get(_container(copy))
    if named is not None:
        return named
    alphabet = key.split("/", 1)[0]
    if alphabet in _EVALUATION:
        return "evaluation"
    return "background" if alphabet in _BACKGROUND_ONLY else "other"


def _vinyals_files(files: _Files, split: str, root: str) -> _Files:
    """``files`` of the characters of a Vinyals split; a ValueError naming the archives
    that are missing when some of its characters are not under root."""
    characters = vinyals_characters(split)
    present = {key.rsplit("/", 1)[0] for key in files}
    needed: set[str] = set()
    missing: dict[str, list[str]] = {}
    for char in characters:
        archive = ("images_evaluation" if char.split("/", 1)[0] in _EVALUATION
                   else "images_background")
        needed.add(archive)
        if char not in present:
            missing.setdefault(archive, []).append(char)
    if missing:
        detail = "; ".join(f"{name} ({len(chars)} of the split's characters, e.g. "
                           f"{chars[0]!r})" for name, chars in sorted(missing.items()))
        raise ValueError(f"split {split!r} needs {' and '.join(sorted(needed))} (zip or "
                         f"folder) under root {root!r}; missing: {detail}")
    wanted = set(characters)
    return {k: v for k, v in files.items() if k.rsplit("/", 1)[0] in wanted}


def _rotations(images: np.ndarray, labels: np.ndarray,
               class_names: list[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Each character's rotations as classes of their own, named ``.../rotDDD``, through
    :func:`fastmtl.data.with_rotations`; class names stay sorted."""
    rotated = with_rotations(FewShotDataset(images, labels, class_names), VINYALS_ANGLES)
    names = []
    for name in rotated.class_names:
        char, angle = name.rsplit("@", 1)
        names.append(f"{char}/rot{int(angle):03d}")
    return rotated.images, rotated.labels, names


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
