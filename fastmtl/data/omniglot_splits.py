"""The Omniglot class splits, as data: which alphabets or characters each split holds.

Three families, chosen by what the data root holds (:class:`fastmtl.data.Omniglot`):

- ``"small"``: the two official "background small" archives (8 alphabets, 242
  characters), split by whole alphabets (:data:`OMNIGLOT_SPLITS`, 161 / 22 / 59).
- ``"background"``: the whole background set (30 alphabets, 964 characters), split by
  whole alphabets (:data:`OMNIGLOT_FULL_SPLITS`, 648 / 163 / 153); it contains the small
  family's split (its train alphabets in train, its val in val, its test in test).
- ``"vinyals"``: the split of Vinyals et al. (2016) over background and evaluation sets
  together, 1,028 / 172 / 423 characters (1,200 trainval), each character's rotations
  by 0, 90, 180 and 270 degrees being four classes. The character lists ship as package
  data (``vinyals_splits/*.txt``, MIT, from jakesnell/prototypical-networks; see
  ``vinyals_splits/SOURCE.md``).
"""
from __future__ import annotations

from importlib import resources
from types import MappingProxyType

__all__ = ["OMNIGLOT_SPLITS", "OMNIGLOT_FULL_SPLITS", "OMNIGLOT_BACKGROUND_ALPHABETS",
           "OMNIGLOT_EVALUATION_ALPHABETS", "VINYALS_SPLITS", "VINYALS_ANGLES",
           "vinyals_characters"]

# A fixed alphabet split of the eight alphabets in the two "background small" archives
# (242 characters): whole alphabets are held out, so test characters come from scripts the
# learner never saw. train has 161 characters, val 22, test 59.
OMNIGLOT_SPLITS: dict[str, list[str]] = {
    "train": ["Balinese", "Greek", "Japanese_(katakana)", "Korean", "Latin"],
    "val": ["Early_Aramaic"],
    "test": ["Sanskrit", "Tagalog"],
}
OMNIGLOT_SPLITS["trainval"] = OMNIGLOT_SPLITS["train"] + OMNIGLOT_SPLITS["val"]

_FULL_VAL = ("Armenian", "Braille", "Cyrillic", "Early_Aramaic", "Mkhedruli_(Georgian)")
_FULL_TEST = ("Bengali", "Futurama", "Hebrew", "Sanskrit", "Tagalog")
_FULL_TRAIN = (
    "Alphabet_of_the_Magi", "Anglo-Saxon_Futhorc", "Arcadian", "Asomtavruli_(Georgian)",
    "Balinese", "Blackfoot_(Canadian_Aboriginal_Syllabics)", "Burmese_(Myanmar)", "Grantha",
    "Greek", "Gujarati", "Inuktitut_(Canadian_Aboriginal_Syllabics)", "Japanese_(hiragana)",
    "Japanese_(katakana)", "Korean", "Latin", "Malay_(Jawi_-_Arabic)", "N_Ko",
    "Ojibwe_(Canadian_Aboriginal_Syllabics)", "Syriac_(Estrangelo)", "Tifinagh")

# The whole background set (964 characters) split by whole alphabets: train 20 alphabets
# (648 characters), val 5 (163), test 5 (153). Read-only: a split is a fact, not a setting.
OMNIGLOT_FULL_SPLITS = MappingProxyType({
    "train": _FULL_TRAIN, "val": _FULL_VAL, "test": _FULL_TEST,
    "trainval": _FULL_TRAIN + _FULL_VAL,
})

# The 30 alphabets of the official images_background archive, and the 20 of
# images_evaluation (659 characters): together the 1,623 characters of Omniglot.
OMNIGLOT_BACKGROUND_ALPHABETS = tuple(sorted(_FULL_TRAIN + _FULL_VAL + _FULL_TEST))
OMNIGLOT_EVALUATION_ALPHABETS = (
    "Angelic", "Atemayar_Qelisayer", "Atlantean", "Aurek-Besh", "Avesta", "Ge_ez",
    "Glagolitic", "Gurmukhi", "Kannada", "Keble", "Malayalam", "Manipuri", "Mongolian",
    "Old_Church_Slavonic_(Cyrillic)", "Oriya", "Sylheti", "Syriac_(Serto)", "Tengwar",
    "Tibetan", "ULOG")

# split name -> the package-data lists it joins; every character gives these rotations.
VINYALS_SPLITS = MappingProxyType({
    "vinyals-train": ("train",), "vinyals-val": ("val",), "vinyals-test": ("test",),
    "vinyals-trainval": ("train", "val"),
})
VINYALS_ANGLES = (0, 90, 180, 270)


def vinyals_characters(split: str) -> list[str]:
    """The characters (``"Alphabet/characterNN"``, sorted) of a split of Vinyals et al.

    Each character stands for four classes, its rotations :data:`VINYALS_ANGLES`.

    Args:
        split: one of :data:`VINYALS_SPLITS` (``"vinyals-train"``, ``"vinyals-val"``,
            ``"vinyals-test"``, ``"vinyals-trainval"``).

    Returns:
        The split's characters, sorted; 1,028 / 172 / 423 / 1,200 of them.

    Raises:
        ValueError: an unknown ``split``.

    Example:
        >>> [len(vinyals_characters(s)) for s in VINYALS_SPLITS]
        [1028, 172, 423, 1200]
        >>> vinyals_characters("vinyals-test")[0]
        'Gurmukhi/character42'
    """
    if split not in VINYALS_SPLITS:
        raise ValueError(f"split must be one of {list(VINYALS_SPLITS)}, got {split!r}")
    folder = resources.files(__package__) / "vinyals_splits"
    chars = []
    for part in VINYALS_SPLITS[split]:
        chars += (folder / f"{part}.txt").read_text(encoding="utf-8").split()
    return sorted(chars)
