"""Data loaders: real Omniglot (folders, archives, both), community pickle formats written
here in miniature, the procedural SyntheticGlyphs, and rotations as new classes."""
import io
import pickle
import shutil
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import omniglot_root
from PIL import Image

from fastmtl.data import (
    CIFAR_MEAN,
    CIFARFS,
    FC100,
    IMAGENET_MEAN,
    OMNIGLOT_SPLITS,
    FewShotDataset,
    MiniImageNet,
    Omniglot,
    SyntheticGlyphs,
    TieredImageNet,
    with_rotations,
)

SMALL1, SMALL2 = "images_background_small1.zip", "images_background_small2.zip"
ALL_ALPHABETS = {"Balinese", "Early_Aramaic", "Greek", "Japanese_(katakana)", "Korean",
                 "Latin", "Sanskrit", "Tagalog"}


# --------------------------------------------------------------------------- Omniglot

@pytest.fixture(scope="module")
def omniglot():
    return Omniglot(omniglot_root())


def _zip_alphabets(path):
    with zipfile.ZipFile(path) as zf:
        return {n.split("/")[1] for n in zf.namelist() if n.endswith(".png")}


def test_omniglot_counts_shapes_and_names(omniglot):
    assert isinstance(omniglot, FewShotDataset)
    assert omniglot.n_classes == 242 and len(omniglot) == 4840
    assert omniglot.images.shape == (4840, 28, 28) and omniglot.images.dtype == np.uint8
    assert omniglot.labels.dtype == np.int64
    assert (omniglot.class_sizes() == 20).all()
    assert omniglot.class_names == sorted(omniglot.class_names)
    assert {n.split("/")[0] for n in omniglot.class_names} == ALL_ALPHABETS
    assert all(n.split("/")[1].startswith("character") for n in omniglot.class_names)
    assert omniglot.image_shape == (1, 28, 28)
    # Strokes are bright on a dark background: most pixels are background.
    assert omniglot.images.mean() < 50 and omniglot.images.max() == 255
    x = omniglot.tensor(np.arange(4840))
    assert abs(float(x.mean())) < 0.01 and abs(float(x.std()) - 1.0) < 0.01


def test_omniglot_deduplicates_greek_and_latin(omniglot):
    root = Path(omniglot_root())
    shared = _zip_alphabets(root / SMALL1) & _zip_alphabets(root / SMALL2)
    assert shared == {"Greek", "Latin"}
    with zipfile.ZipFile(root / SMALL1) as a, zipfile.ZipFile(root / SMALL2) as b:
        total = sum(n.endswith(".png") for z in (a, b) for n in z.namelist())
    assert total > 4840  # the archives hold duplicates, the data set must not
    both = Omniglot(root, alphabets=["Greek", "Latin"])
    assert both.n_classes == 24 + 26 and len(both) == 50 * 20
    keep = [i for i, n in enumerate(omniglot.class_names) if n.split("/")[0] in shared]
    np.testing.assert_array_equal(both.images, omniglot.subset(keep).images)


def test_omniglot_conflicting_duplicates_are_an_error(tmp_path):
    for copy, colour in (("a", 0), ("b", 255)):
        folder = tmp_path / copy / "Greek" / "character01"
        folder.mkdir(parents=True)
        Image.new("1", (105, 105), colour).save(folder / "0394_01.png")
    with pytest.raises(ValueError, match="conflicting"):
        Omniglot(tmp_path)


def test_omniglot_splits():
    root = omniglot_root()
    names = {s: set(OMNIGLOT_SPLITS[s]) for s in ("train", "val", "test")}
    assert names["test"] == {"Sanskrit", "Tagalog"} and names["val"] == {"Early_Aramaic"}
    assert not (names["train"] & names["val"] or names["train"] & names["test"]
                or names["val"] & names["test"])
    assert names["train"] | names["val"] | names["test"] == ALL_ALPHABETS
    sizes = {}
    for split in ("train", "val", "test", "trainval"):
        ds = Omniglot(root, split=split)
        assert {n.split("/")[0] for n in ds.class_names} == set(OMNIGLOT_SPLITS[split])
        assert ds.labels.max() == ds.n_classes - 1
        sizes[split] = ds.n_classes
    assert sizes["train"] == 161 and sizes["trainval"] == sizes["train"] + sizes["val"]
    assert sizes["train"] + sizes["val"] + sizes["test"] == 242


def test_omniglot_argument_errors(tmp_path):
    root = omniglot_root()
    with pytest.raises(ValueError, match="not both"):
        Omniglot(root, alphabets=["Greek"], split="train")
    with pytest.raises(ValueError, match="available.*Balinese"):
        Omniglot(root, alphabets=["Klingon"])
    with pytest.raises(ValueError, match="split"):
        Omniglot(root, split="holdout")
    with pytest.raises(ValueError, match="image_size"):
        Omniglot(root, image_size=0)


def test_omniglot_missing_or_empty_root(tmp_path):
    with pytest.raises(ValueError, match="root"):
        Omniglot(tmp_path / "nowhere")
    (tmp_path / "empty" / "notes").mkdir(parents=True)
    (tmp_path / "empty" / "notes" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no Omniglot images.*root"):
        Omniglot(tmp_path / "empty")


def test_omniglot_folders_match_archives(omniglot, tmp_path):
    real = Path(omniglot_root())
    with zipfile.ZipFile(real / SMALL2) as zf:
        zf.extractall(tmp_path / "folders")
    from_folders = Omniglot(tmp_path / "folders")
    alphabets = sorted(_zip_alphabets(real / SMALL2))
    from_zips = Omniglot(real, alphabets=alphabets)
    assert from_folders.class_names == from_zips.class_names
    np.testing.assert_array_equal(from_folders.labels, from_zips.labels)
    np.testing.assert_array_equal(from_folders.images, from_zips.images)
    # Any mix: one archive next to the other archive's extracted folders.
    shutil.copy(real / SMALL1, tmp_path / SMALL1)
    mixed = Omniglot(tmp_path)
    assert mixed.class_names == omniglot.class_names
    np.testing.assert_array_equal(mixed.images, omniglot.images)


def test_omniglot_image_size():
    ds = Omniglot(omniglot_root(), alphabets=["Latin"], image_size=105)
    assert ds.images.shape == (26 * 20, 105, 105)
    assert set(np.unique(ds.images)) == {0, 255}  # full size: the 1-bit pixels, inverted
    assert Omniglot(omniglot_root(), alphabets="Latin", image_size=40).image_shape == (1, 40, 40)


# ---------------------------------------------------------------------- with_rotations

def test_with_rotations_counts_and_pixels():
    ds = SyntheticGlyphs(3, 4, seed=1, image_size=16)
    rot = with_rotations(ds)
    assert rot.n_classes == 12 and len(rot) == 48
    assert (rot.class_sizes() == 4).all()
    assert rot.class_names[:4] == ["glyph0000@0", "glyph0000@90", "glyph0000@180",
                                   "glyph0000@270"]
    assert rot.mean == ds.mean and rot.std == ds.std
    for label in range(rot.n_classes):
        c, j = divmod(label, 4)
        expected = np.rot90(ds.images[ds.labels == c], k=j, axes=(1, 2))
        np.testing.assert_array_equal(rot.images[rot.labels == label], expected)
    two = with_rotations(ds, angles=(0, 180))
    assert two.n_classes == 6 and two.class_names[1] == "glyph0000@180"


def test_with_rotations_errors():
    ds = SyntheticGlyphs(2, 2, image_size=8)
    for angles in [(), (0, 45), (0, 360)]:
        with pytest.raises(ValueError, match="angles"):
            with_rotations(ds, angles)
    wide = FewShotDataset(np.zeros((2, 8, 10), np.uint8), np.array([0, 1]), ["a", "b"])
    with pytest.raises(ValueError, match="square"):
        with_rotations(wide)


# ------------------------------------------------------------------ community pickles

class _Py2Pickler(pickle._Pickler):
    """Writes bytes the way Python 2 wrote its str: Python 3 can only read them as latin1."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_str2(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_str2


def _dump(obj, path, py2=False):
    with open(path, "wb") as f:
        if py2:
            _Py2Pickler(f, protocol=2).dump(obj)
        else:
            pickle.dump(obj, f, protocol=4)


def _fake(n_classes, per_class, size, first_id, seed):
    rng = np.random.default_rng(seed)
    ids = first_id + 3 * np.arange(n_classes)   # arbitrary, non-contiguous ids
    labels = np.repeat(ids, per_class)
    rng.shuffle(labels)
    data = rng.integers(0, 256, (labels.size, size, size, 3), dtype=np.uint8)
    return data, labels


def _png(image):
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _check(ds, data, labels, mean):
    ids = np.unique(labels)
    assert ds.n_classes == ids.size and len(ds) == labels.size
    np.testing.assert_array_equal(ds.images, data)
    np.testing.assert_array_equal(ds.labels, np.searchsorted(ids, labels))
    assert ds.mean == mean and ds.image_shape == (3,) + data.shape[1:3]


def test_mini_imagenet(tmp_path):
    files = {"train": "miniImageNet_category_split_train_phase_train.pickle",
             "val": "miniImageNet_category_split_val.pickle",
             "test": "miniImageNet_category_split_test.pickle"}
    made = {}
    for i, (split, name) in enumerate(files.items()):
        data, labels = _fake(4, 3, 84, first_id=10 * i, seed=i)
        content = {"data": data, "labels": labels.tolist()}
        if split == "train":
            content["catname2label"] = {f"n0{k}": int(k) for k in np.unique(labels)}
            content = {k.encode(): v for k, v in content.items()}  # Python 2 str keys
        _dump(content, tmp_path / name, py2=split == "train")
        made[split] = data, labels
    with pytest.raises(UnicodeDecodeError):  # the file really needs the latin1 fallback
        pickle.load(open(tmp_path / files["train"], "rb"))
    for split, (data, labels) in made.items():
        ds = MiniImageNet(tmp_path, split)
        _check(ds, data, labels, IMAGENET_MEAN)
    assert MiniImageNet(tmp_path, "train").class_names[0] == "n00"
    both = MiniImageNet(tmp_path, "trainval")
    assert both.n_classes == 8 and len(both) == 24
    np.testing.assert_array_equal(both.labels[12:], MiniImageNet(tmp_path, "val").labels + 4)


@pytest.mark.parametrize("cls,prefix", [(CIFARFS, "CIFAR_FS"), (FC100, "FC100")])
def test_cifar_pickles(tmp_path, cls, prefix):
    made = {}
    for i, split in enumerate(("train", "val", "test")):
        data, labels = _fake(5, 2, 32, first_id=20 * i, seed=i)
        _dump({"data": data, "labels": labels.tolist()}, tmp_path / f"{prefix}_{split}.pickle",
              py2=split == "test")
        made[split] = data, labels
    for split, (data, labels) in made.items():
        _check(cls(tmp_path, split), data, labels, CIFAR_MEAN)


def test_tiered_imagenet_formats(tmp_path):
    # train: MetaOptNet's decoded array; val: PNG bytes in the npz; test: Ren's png pickle.
    made = {split: _fake(3, 2, 84, first_id=0, seed=i)
            for i, split in enumerate(("train", "val", "test"))}
    data, labels = made["train"]
    np.savez(tmp_path / "train_images.npz", images=data)
    _dump({"label_specific": labels, "label_general": labels // 2,
           "label_specific_str": ["cat", "dog", "owl", "bee", "elk", "yak", "ant"]},
          tmp_path / "train_labels.pkl", py2=True)
    data, labels = made["val"]
    encoded = np.empty(len(data), dtype=object)
    encoded[:] = [np.frombuffer(_png(img), dtype=np.uint8) for img in data]
    np.savez(tmp_path / "val_images.npz", images=encoded)
    _dump({"labels": labels.tolist()}, tmp_path / "val_labels.pkl")
    data, labels = made["test"]
    _dump([_png(img) for img in data], tmp_path / "test_images_png.pkl")
    _dump({"label_specific": labels}, tmp_path / "test_labels.pkl")
    for split, (data, labels) in made.items():
        _check(TieredImageNet(tmp_path, split), data, labels, IMAGENET_MEAN)
    assert TieredImageNet(tmp_path, "train").class_names == ["cat", "bee", "ant"]  # ids 0, 3, 6
    both = TieredImageNet(tmp_path, "trainval")  # both start at id 0: classes kept apart
    assert both.n_classes == 6 and both.class_names[3] == "val/0"


def test_pickle_loader_errors(tmp_path):
    with pytest.raises(ValueError, match="root"):
        MiniImageNet(tmp_path / "nowhere", "train")
    with pytest.raises(ValueError, match="miniImageNet_category_split_train_phase_train"):
        MiniImageNet(tmp_path, "train")
    with pytest.raises(ValueError, match="test_images.npz.*test_images_png.pkl"):
        TieredImageNet(tmp_path, "test")
    with pytest.raises(ValueError, match="split"):
        CIFARFS(tmp_path, "training")
    _dump({"images": 1}, tmp_path / "FC100_val.pickle")
    with pytest.raises(ValueError, match="'data' and 'labels'"):
        FC100(tmp_path, "val")


# ------------------------------------------------------------------- SyntheticGlyphs

def test_synthetic_shapes_and_content():
    ds = SyntheticGlyphs(6, 5, seed=0)
    assert isinstance(ds, FewShotDataset)
    assert ds.images.shape == (30, 28, 28) and ds.images.dtype == np.uint8
    np.testing.assert_array_equal(ds.labels, np.repeat(np.arange(6), 5))
    assert ds.n_classes == 6 and len(set(ds.class_names)) == 6
    ink = (ds.images > 127).mean(axis=(1, 2))
    assert (ink > 0.02).all() and (ink < 0.5).all()   # a glyph, not a blank or a blot
    assert ds.images.max() == 255 and 0 < ds.images[ds.images > 0].min() < 255  # anti-aliased
    per_class = ds.images.reshape(6, 5, -1).astype(float)
    within = np.abs(per_class - per_class.mean(1, keepdims=True)).mean()
    between = np.abs(per_class.mean(1) - per_class.mean((0, 1))).mean()
    assert within > 5 and between > 5  # drawings vary, and classes differ
    assert SyntheticGlyphs(2, 3, image_size=40).images.shape == (6, 40, 40)


def test_synthetic_is_deterministic_and_prefix_stable():
    a = SyntheticGlyphs(5, 4, seed=3)
    np.testing.assert_array_equal(a.images, SyntheticGlyphs(5, 4, seed=3).images)
    assert not np.array_equal(a.images, SyntheticGlyphs(5, 4, seed=4).images)
    bigger = SyntheticGlyphs(9, 4, seed=3)
    np.testing.assert_array_equal(bigger.subset(range(5)).images, a.images)
    assert bigger.class_names[:5] == a.class_names


def test_synthetic_splits_render_only_their_classes_and_equal_the_full_set_subset():
    """The registry's splits draw only their class range, image for image what the full
    data set's subset holds (it was so built until the range was drawn alone)."""
    from fastmtl.data.named import SYNTHETIC_SPLITS, synthetic
    full = SyntheticGlyphs(400, 20, seed=2, image_size=12)
    for split, (lo, hi) in SYNTHETIC_SPLITS.items():
        ds, ref = synthetic(None, split, image_size=12, seed=2), full.subset(range(lo, hi))
        np.testing.assert_array_equal(ds.images, ref.images)
        np.testing.assert_array_equal(ds.labels, ref.labels)
        assert ds.class_names == ref.class_names and ds.name == f"synthetic-{split}"
        assert (ds.mean, ds.std) == (ref.mean, ref.std)
    for bad, name in (({"seed": -1}, "seed"), ({"image_size": 4}, "image_size")):
        with pytest.raises(ValueError, match=name):
            synthetic(None, "val", **bad)


def test_synthetic_draws_are_kept_but_never_shared():
    """A split loaded again comes from the kept draw: equal, yet a changed copy does not
    reach the next load (nor does a changed SyntheticGlyphs reach the next one)."""
    from fastmtl.data.named import synthetic
    a = synthetic(None, "val", image_size=12, seed=5)
    a.images[:] = 0
    a.labels[:] = 0
    b = synthetic(None, "val", image_size=12, seed=5)
    assert b.images.max() == 255 and b.labels.max() == 39
    np.testing.assert_array_equal(b.images, SyntheticGlyphs(280, 20, seed=5, image_size=12)
                                  .subset(range(240, 280)).images)
    g = SyntheticGlyphs(3, 2, seed=5)
    g.images[:] = 7
    assert SyntheticGlyphs(3, 2, seed=5).images.max() == 255


def test_synthetic_normalization_constants():
    ds = SyntheticGlyphs(60, 5, seed=11)
    x = ds.tensor()
    assert abs(float(x.mean())) < 0.15 and abs(float(x.std()) - 1) < 0.15


@pytest.mark.parametrize("kwargs,name", [
    ({"n_classes": 0, "per_class": 2}, "n_classes"),
    ({"n_classes": 2.5, "per_class": 2}, "n_classes"),
    ({"n_classes": 2, "per_class": 0}, "per_class"),
    ({"n_classes": 2, "per_class": True}, "per_class"),
    ({"n_classes": 2, "per_class": 2, "seed": -1}, "seed"),
    ({"n_classes": 2, "per_class": 2, "image_size": 4}, "image_size"),
])
def test_synthetic_argument_errors(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SyntheticGlyphs(**kwargs)
