"""The whole Omniglot background set, the Vinyals split and Lake's one-shot runs.

The evaluation archive and the runs are not in the shared data, so archives and runs of
the official layout are written here in miniature (the real alphabet and character names,
tiny PNGs); the split sizes are also checked on the real background archive when present.
"""
import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import omniglot_root, write_runs_zip
from PIL import Image

from fastmtl.data import (
    OMNIGLOT_BACKGROUND_ALPHABETS,
    OMNIGLOT_EVALUATION_ALPHABETS,
    OMNIGLOT_FULL_SPLITS,
    OMNIGLOT_SPLITS,
    VINYALS_SPLITS,
    Omniglot,
    vinyals_characters,
)
from fastmtl.data.omniglot import _alphabet_files, _find_images, _split_family
from fastmtl.data.omniglot_runs import read_one_shot_runs
from fastmtl.evaluate import one_shot_runs

SIDE = 8            # the fake images' side: read at this size, nothing is resized
DRAWERS = 2
ALL_CHARS = sorted(set(vinyals_characters("vinyals-trainval"))
                   | set(vinyals_characters("vinyals-test")))
BACKGROUND = frozenset(OMNIGLOT_BACKGROUND_ALPHABETS)


def _png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def _glyph(rng) -> np.ndarray:
    """Black strokes on white, as in the archives; random, so no two look alike."""
    return np.where(rng.random((SIDE, SIDE)) < 0.3, 0, 255).astype(np.uint8)


def _archive(path: Path, top: str, chars, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    with zipfile.ZipFile(path, "w") as zf:
        for char in chars:
            for d in range(1, DRAWERS + 1):
                zf.writestr(f"{top}/{char}/0001_{d:02d}.png", _png(_glyph(rng)))
    return path


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    """images_background.zip (964 characters), images_evaluation.zip (659) and the two
    small archives (one character of each of their alphabets), in miniature."""
    folder = tmp_path_factory.mktemp("archives")
    background = [c for c in ALL_CHARS if c.split("/")[0] in BACKGROUND]
    evaluation = [c for c in ALL_CHARS if c.split("/")[0] not in BACKGROUND]
    small = sorted(OMNIGLOT_SPLITS["trainval"] + OMNIGLOT_SPLITS["test"])
    return {
        "background": _archive(folder / "images_background.zip", "images_background",
                               background, 0),
        "evaluation": _archive(folder / "images_evaluation.zip", "images_evaluation",
                               evaluation, 1),
        "small1": _archive(folder / "images_background_small1.zip",
                           "images_background_small1", [f"{a}/character01" for a in small[:4]], 2),
        "small2": _archive(folder / "images_background_small2.zip",
                           "images_background_small2", [f"{a}/character01" for a in small[4:]], 3),
    }


def _root(tmp_path, archives, *which) -> Path:
    root = tmp_path / "_".join(which)
    root.mkdir()
    for name in which:
        (root / archives[name].name).symlink_to(archives[name])
    return root


# ------------------------------------------------------------------------ the split tables

def test_split_tables_are_consistent():
    full = {s: set(OMNIGLOT_FULL_SPLITS[s]) for s in ("train", "val", "test")}
    assert [len(full[s]) for s in ("train", "val", "test")] == [20, 5, 5]
    assert not (full["train"] & full["val"] or full["train"] & full["test"]
                or full["val"] & full["test"])
    assert full["train"] | full["val"] | full["test"] == BACKGROUND
    assert set(OMNIGLOT_FULL_SPLITS["trainval"]) == full["train"] | full["val"]
    for split in ("train", "val", "test"):       # the small split sits inside the full one
        assert set(OMNIGLOT_SPLITS[split]) <= full[split]
    assert len(OMNIGLOT_EVALUATION_ALPHABETS) == 20 and not BACKGROUND & set(
        OMNIGLOT_EVALUATION_ALPHABETS)
    vin = {s: vinyals_characters(f"vinyals-{s}") for s in ("train", "val", "test")}
    assert [len(vin[s]) for s in ("train", "val", "test")] == [1028, 172, 423]
    assert len(ALL_CHARS) == 1623 == sum(len(v) for v in vin.values())
    assert vinyals_characters("vinyals-trainval") == sorted(vin["train"] + vin["val"])
    alphabets = {c.split("/")[0] for c in ALL_CHARS}
    assert alphabets == BACKGROUND | set(OMNIGLOT_EVALUATION_ALPHABETS)
    assert sum(c.split("/")[0] in BACKGROUND for c in ALL_CHARS) == 964
    with pytest.raises(ValueError, match="split must be one of"):
        vinyals_characters("vinyals-holdout")


def test_full_split_sizes_on_the_real_archive():
    root = Path(omniglot_root()).parent / "omniglot-background"
    if not (root / "images_background.zip").is_file():
        pytest.skip(f"the whole background archive is not at {root}")
    files = _find_images(root)      # the selection, without decoding 19,280 images
    assert len(files) == 19280
    sizes = {}
    for split in ("train", "val", "test", "trainval"):
        assert _split_family(files, split, str(root)) == "background"
        chosen, _ = _alphabet_files(files, OMNIGLOT_FULL_SPLITS[split], str(root))
        sizes[split] = len({k.rsplit("/", 1)[0] for k in chosen})
    assert sizes == {"train": 648, "val": 163, "test": 153, "trainval": 811}
    test = Omniglot(root, split="test", image_size=14)    # one split decoded for real
    assert test.n_classes == 153 and len(test) == 153 * 20 and test.split_family == "background"
    assert {n.split("/")[0] for n in test.class_names} == set(OMNIGLOT_FULL_SPLITS["test"])
    assert test.images.mean() < 50     # strokes bright on dark, as the small archives


# ------------------------------------------------------------------------- split detection

def test_background_archive_gives_the_full_split(tmp_path, archives):
    root = _root(tmp_path, archives, "background")
    val = Omniglot(root, split="val", image_size=SIDE)
    assert val.split_family == "background" and val.n_classes == 163
    assert len(val) == 163 * DRAWERS and val.alphabets == sorted(OMNIGLOT_FULL_SPLITS["val"])
    assert Omniglot(root, alphabets=["Latin"], image_size=SIDE).split_family is None


def test_background_folder_gives_the_full_split(tmp_path, archives):
    with zipfile.ZipFile(archives["background"]) as zf:
        zf.extractall(tmp_path / "data")
    test = Omniglot(tmp_path / "data", split="test", image_size=SIDE)
    assert test.split_family == "background" and test.n_classes == 153
    # The folder itself as root: recognized by its name.
    assert Omniglot(tmp_path / "data" / "images_background", split="test",
                    image_size=SIDE).n_classes == 153


def test_small_archives_keep_the_small_split(tmp_path, archives):
    root = _root(tmp_path, archives, "small1", "small2")
    for split in ("train", "val", "test", "trainval"):
        ds = Omniglot(root, split=split, image_size=SIDE)
        assert ds.split_family == "small"
        assert ds.alphabets == sorted(OMNIGLOT_SPLITS[split])


def test_background_and_small_together_is_an_error(tmp_path, archives):
    root = _root(tmp_path, archives, "background", "small1", "small2")
    for split in (None, "train"):
        with pytest.raises(ValueError) as err:
            Omniglot(root, split=split, image_size=SIDE)
        message = str(err.value)
        assert "\n" not in message
        for name in ("images_background.zip", "images_background_small1.zip",
                     "images_background_small2.zip"):
            assert name in message


def test_an_unnamed_folder_counts_by_its_alphabets(tmp_path, archives):
    """A renamed copy of the background set is the background set, not the small one."""
    rng = np.random.default_rng(5)
    chars = ["Latin/character01"] + [f"{a}/character02" for a in OMNIGLOT_FULL_SPLITS["test"]]
    for char in chars:
        folder = tmp_path / "mine" / char
        folder.mkdir(parents=True)
        Image.fromarray(_glyph(rng)).save(folder / "0001_01.png")
    # The small table would take Sanskrit and Tagalog only; the full one takes all five.
    test = Omniglot(tmp_path / "mine", split="test", image_size=SIDE)
    assert test.split_family == "background"
    assert test.alphabets == sorted(OMNIGLOT_FULL_SPLITS["test"]) and test.n_classes == 5


# ---------------------------------------------------------------------------- Vinyals split

@pytest.fixture(scope="module")
def vinyals(archives, tmp_path_factory):
    root = tmp_path_factory.mktemp("vinyals")
    for name in ("background", "evaluation"):
        (root / archives[name].name).symlink_to(archives[name])
    return {s: Omniglot(root, split=s, image_size=SIDE) for s in VINYALS_SPLITS}


def test_vinyals_class_counts_and_names(vinyals):
    expected = {"vinyals-train": 1028, "vinyals-val": 172, "vinyals-test": 423,
                "vinyals-trainval": 1200}
    for split, n_chars in expected.items():
        ds = vinyals[split]
        assert ds.split_family == "vinyals" and ds.n_classes == 4 * n_chars
        assert len(ds) == 4 * n_chars * DRAWERS and (ds.class_sizes() == DRAWERS).all()
        assert ds.class_names == sorted(ds.class_names)
        assert ds.class_names[:4] == [f"{vinyals_characters(split)[0]}/rot{a:03d}"
                                      for a in (0, 90, 180, 270)]
    names = {s: set(vinyals[s].class_names) for s in expected}
    assert not (names["vinyals-train"] & names["vinyals-val"]
                or names["vinyals-train"] & names["vinyals-test"]
                or names["vinyals-val"] & names["vinyals-test"])
    assert names["vinyals-trainval"] == names["vinyals-train"] | names["vinyals-val"]
    assert "Gurmukhi/character42/rot270" in names["vinyals-test"]


def test_vinyals_rotations_are_rotated_pixels(vinyals):
    ds = vinyals["vinyals-val"]
    index = {name: i for i, name in enumerate(ds.class_names)}
    char = ds.class_names[0].rsplit("/", 1)[0]
    upright = ds.images[ds.labels == index[f"{char}/rot000"]]
    for k, angle in enumerate((0, 90, 180, 270)):
        rotated = ds.images[ds.labels == index[f"{char}/rot{angle:03d}"]]
        np.testing.assert_array_equal(rotated, np.rot90(upright, k=k, axes=(1, 2)))
    assert not np.array_equal(upright, np.rot90(upright, k=1, axes=(1, 2)))


def test_vinyals_needs_both_archives(tmp_path, archives):
    root = _root(tmp_path, archives, "background")
    with pytest.raises(ValueError) as err:
        Omniglot(root, split="vinyals-train", image_size=SIDE)
    message = str(err.value)
    assert "\n" not in message and "missing: images_evaluation (236 " in message
    assert "images_background (" not in message
    # val is background characters only: the background archive is enough.
    assert Omniglot(root, split="vinyals-val", image_size=SIDE).n_classes == 4 * 172
    small = _root(tmp_path, archives, "small1", "small2")
    with pytest.raises(ValueError, match="missing: images_background .*; images_evaluation"):
        Omniglot(small, split="vinyals-trainval", image_size=SIDE)


def test_split_argument_errors(tmp_path, archives):
    root = _root(tmp_path, archives, "background")
    with pytest.raises(ValueError, match="split must be one of.*vinyals-train"):
        Omniglot(root, split="vinyals")
    with pytest.raises(ValueError, match="not both"):
        Omniglot(root, split="vinyals-test", alphabets=["Latin"])


# ----------------------------------------------------------------------- one-shot runs

@pytest.mark.parametrize("prefix", ["", "all_runs/"])
def test_runs_nearest_neighbour_is_exact_on_identity_features(tmp_path, prefix):
    path = write_runs_zip(tmp_path / "runs.zip", prefix=prefix)
    runs = read_one_shot_runs(path, image_size=20)
    assert runs.run_names == ["run01", "run02", "run03"]
    assert runs.train_index.shape == runs.test_index.shape == runs.answers.shape == (3, 5)
    labels = runs.dataset.labels
    np.testing.assert_array_equal(labels[runs.test_index],
                                  labels[np.take_along_axis(runs.train_index,
                                                            runs.answers, 1)])
    assert runs.dataset.class_names[:2] == ["run01/class01", "run01/class02"]
    assert runs.dataset.images.mean() < 128      # ink bright, as Omniglot's archives
    r = one_shot_runs(torch.nn.Flatten(), path, image_size=20)
    assert r["nn_error"] == 0.0 and r["logistic_error"] == 0.0
    assert r["nn_errors"] == [0.0] * 3 and r["n_runs"] == 3 and r["n_way"] == 5
    assert r["runs"] == ["run01", "run02", "run03"] and r["logistic_unconverged"] == 0


def test_runs_errors_follow_the_labels(tmp_path):
    """The same images with every run's labels rotated by one class: every answer wrong."""
    path = write_runs_zip(tmp_path / "runs.zip", n_runs=2, n_way=4)
    with zipfile.ZipFile(path) as zf:
        entries = {n: zf.read(n) for n in zf.namelist()}
    wrong = tmp_path / "wrong.zip"
    with zipfile.ZipFile(wrong, "w") as zf:
        for name, data in entries.items():
            if name.endswith("class_labels.txt"):
                lines = []
                for line in data.decode().split("\n"):
                    if line:
                        test, train = line.split()
                        j = int(train[-6:-4]) % 4 + 1
                        lines.append(f"{test} {train[:-6]}{j:02d}.png")
                data = "\n".join(lines).encode()
            zf.writestr(name, data)
    r = one_shot_runs(torch.nn.Flatten(), wrong, image_size=16)
    assert r["nn_error"] == 100.0 and r["nn_errors"] == [100.0, 100.0]
    assert r["logistic_error"] == 100.0


def test_runs_bad_input(tmp_path):
    flat = torch.nn.Flatten()
    with pytest.raises(ValueError, match="path .* is not an existing file"):
        one_shot_runs(flat, tmp_path / "nowhere.zip")
    (tmp_path / "notes.zip").write_text("not a zip")
    with pytest.raises(ValueError, match="path .* is not a zip archive"):
        one_shot_runs(flat, tmp_path / "notes.zip")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as zf:
        zf.writestr("images/a.png", b"")
    with pytest.raises(ValueError, match="no runNN/class_labels.txt"):
        one_shot_runs(flat, tmp_path / "other.zip")
    bad = write_runs_zip(tmp_path / "bad.zip", n_runs=1, lines="run01/test/item01.png\n")
    with pytest.raises(ValueError, match="line 1 is not"):
        one_shot_runs(flat, bad)
    gone = write_runs_zip(tmp_path / "gone.zip", n_runs=1,
                          lines="run01/test/item01.png run01/training/class09.png\n")
    with pytest.raises(ValueError, match="class09.png'?, which is not in the zip"):
        one_shot_runs(flat, gone)
    good = write_runs_zip(tmp_path / "good.zip", n_runs=1)
    with pytest.raises(ValueError, match="image_size"):
        one_shot_runs(flat, good, image_size=0)
    with pytest.raises(ValueError, match="backbone"):
        one_shot_runs("conv4", good)
    with pytest.raises(ValueError, match="C must be"):
        one_shot_runs(flat, good, C=0)


# ------------------------------------------------------------------ the protocols by the CLI
def test_cli_trains_on_the_vinyals_split_and_scores_the_one_shot_runs(tmp_path, archives,
                                                                       capsys):
    """The README's commands for the community protocols, at a tiny budget: train on
    vinyals-train (both archives under --root), then `fastmtl eval --omniglot-runs`."""
    import json

    from fastmtl.cli import main
    root = _root(tmp_path, archives, "background", "evaluation")
    ck = tmp_path / "ck"
    assert main(["train", "--data", "omniglot", "--root", str(root), "--train-split",
                 "vinyals-train", "--image-size", "16", "--batch-size", "32",
                 "--max-minutes", "0.03", "--epochs", "1", "--val-episodes", "2",
                 "--val-queries", "1", "--eval-episodes", "2", "--queries", "1",
                 "--shots", "1", "--checkpoint-dir", str(ck)]) == 0
    capsys.readouterr()
    runs = write_runs_zip(tmp_path / "all_runs.zip", n_runs=2, n_way=5, prefix="all_runs/")
    out = tmp_path / "runs.json"
    assert main(["eval", "--checkpoint", str(ck / "final.pt"), "--omniglot-runs", str(runs),
                 "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "one-shot runs" in said and "nearest neighbour" in said
    res = json.loads(out.read_text())["results"]
    assert res["n_runs"] == 2 and 0 <= res["nn_error"] <= 100
    assert main(["eval", "--checkpoint", str(ck / "final.pt"), "--omniglot-runs", str(runs),
                 "--ways", "20"]) == 2
    assert "--ways has no effect with --omniglot-runs" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(ck / "final.pt"), "--omniglot-runs", str(runs),
                 "--centre"]) == 2
    assert "--centre has no effect with --omniglot-runs" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(ck / "final.pt"), "--omniglot-runs", str(runs),
                 "--views"]) == 2
    assert "--views has no effect with --omniglot-runs" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(ck / "final.pt"), "--omniglot-runs", str(runs),
                 "--root", str(root)]) == 2     # MTL: running statistics, nothing to find
    assert "--root has no effect with --omniglot-runs on a checkpoint with running" in \
        capsys.readouterr().err
    # --centre reads the checkpoint's training split again: here vinyals-train
    assert main(["eval", "--checkpoint", str(ck / "final.pt"), "--split", "vinyals-test",
                 "--centre", "--episodes", "2", "--queries", "1", "--shots", "1"]) == 0
    assert "the mean feature of" in capsys.readouterr().out
    # moved: --root names the same data set's new place, and the training images go with it
    moved = root.rename(tmp_path / "moved")
    assert main(["eval", "--checkpoint", str(ck / "final.pt"), "--root", str(moved), "--split",
                 "vinyals-test", "--centre", "--episodes", "2", "--queries", "1", "--shots",
                 "1"]) == 0
    capsys.readouterr()
    # another data set to test on, and the training images gone: one line, exit 2
    assert main(["eval", "--checkpoint", str(ck / "final.pt"), "--data", "synthetic",
                 "--centre", "--episodes", "2", "--queries", "1", "--shots", "1"]) == 2
    err = capsys.readouterr().err
    assert "--centre needs the checkpoint's training images" in err
    assert len(err.strip().splitlines()) == 1
