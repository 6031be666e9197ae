"""A user's own images: ImageFolder, train on a folder, FewShotClassifier, `fastmtl adapt`."""
from __future__ import annotations

import csv
import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import omniglot_root
from PIL import Image

import fastmtl
from fastmtl.adapt import fit_logistic
from fastmtl.cli import main
from fastmtl.data import ImageFolder, SyntheticGlyphs
from fastmtl.evaluate import embed
from fastmtl.sampling import EpisodeSampler

N_CLASSES, PER_CLASS = 30, 12


def _save(img: np.ndarray, path, fmt: str, mode: str = "L", size: int | None = None):
    im = Image.fromarray(img)
    if mode == "RGB":
        im = Image.merge("RGB", [im, Image.fromarray(255 - img), im])
    if size is not None:
        im = im.resize((size, size), Image.Resampling.NEAREST)
    im.save(path, format=fmt)
    return im


@pytest.fixture(scope="module")
def glyphs():
    return SyntheticGlyphs(N_CLASSES, PER_CLASS, seed=0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, glyphs):
    """A class folder per glyph class: grey PNGs, RGB PNGs (c01), JPEGs (c02), 40x40
    images (c03); returns (root, {class: [written PIL images]})."""
    root = tmp_path_factory.mktemp("images")
    written = {}
    for c in range(N_CLASSES):
        name = f"c{c:02d}"
        os.makedirs(root / name)
        imgs = glyphs.images[glyphs.labels == c]
        written[name] = []
        for i, img in enumerate(imgs):
            stem = root / name / f"{i:03d}"        # sorted file order = source order
            if c == 1:
                im = _save(img, f"{stem}.png", "PNG", mode="RGB")
            elif c == 2:
                im = _save(img, f"{stem}.jpg", "JPEG")
            elif c == 3:
                im = _save(img, f"{stem}.png", "PNG", size=40)
            else:
                im = _save(img, f"{stem}.png", "PNG")
            written[name].append(im)
    (root / ".hidden").mkdir()                      # skipped
    (root / "c00" / "notes.txt").write_text("not an image")   # skipped: not an image
    return root, written


def test_loaded_arrays_equal_the_sources_after_the_documented_conversion(folder, glyphs,
                                                                          tmp_path):
    root, written = folder
    ds = ImageFolder(root, image_size=28, channels=1, cache_dir=tmp_path)
    assert ds.n_classes == N_CLASSES and len(ds) == N_CLASSES * PER_CLASS
    assert ds.class_names == [f"c{c:02d}" for c in range(N_CLASSES)]
    for name, c in (("c00", 0), ("c05", 5)):      # grey PNG at the size: byte for byte
        np.testing.assert_array_equal(ds.images[ds.labels == c], glyphs.images[glyphs.labels == c])
    rgb = ds.images[ds.labels == 1]               # RGB -> "L" with Pillow's weights
    expect = np.stack([np.asarray(im.convert("L")) for im in written["c01"]])
    np.testing.assert_array_equal(rgb, expect)
    big = ds.images[ds.labels == 3]               # 40x40 -> 28x28 bilinear
    expect = np.stack([np.asarray(im.resize((28, 28), Image.Resampling.BILINEAR))
                       for im in written["c03"]])
    np.testing.assert_array_equal(big, expect)
    jpg = ds.images[ds.labels == 2].astype(int)   # lossy, but close to the source
    assert np.abs(jpg - glyphs.images[glyphs.labels == 2]).mean() < 12
    # RGB loading of grey files repeats the grey value in each channel.
    ds3 = ImageFolder(root, image_size=28, channels=3, cache_dir=False, classes=["c00"])
    np.testing.assert_array_equal(ds3.images[..., 0], glyphs.images[glyphs.labels == 0])
    assert ds3.images.shape[1:] == (28, 28, 3)
    # The cache: a second load reads one .npz and gives the same arrays.
    assert len(list(tmp_path.glob("imagefolder-*.npz"))) == 1
    again = ImageFolder(root, image_size=28, channels=1, cache_dir=tmp_path)
    np.testing.assert_array_equal(again.images, ds.images)
    np.testing.assert_array_equal(again.labels, ds.labels)


def test_split_is_by_class_seeded_and_shares_the_training_statistics(folder):
    root, _ = folder
    parts = {s: ImageFolder(root, image_size=28, channels=1, split=s, seed=3, cache_dir=False,
                            progress=False) for s in ("train", "val", "test")}
    names = {s: set(d.class_names) for s, d in parts.items()}
    assert not (names["train"] & names["val"] or names["train"] & names["test"]
                or names["val"] & names["test"])
    assert len(names["train"] | names["val"] | names["test"]) == N_CLASSES
    assert [len(n) for n in names.values()] == [18, 6, 6]
    assert parts["test"].mean == parts["train"].mean and parts["val"].std == parts["train"].std
    same = ImageFolder(root, image_size=28, channels=1, split="test", seed=3, cache_dir=False)
    other = ImageFolder(root, image_size=28, channels=1, split="test", seed=4, cache_dir=False)
    assert same.class_names == parts["test"].class_names != other.class_names


def test_bad_folders_are_clear_errors(tmp_path, glyphs):
    root = tmp_path / "bad"
    for c in range(3):
        os.makedirs(root / f"k{c}")
        for i in range(4 if c != 2 else 2):
            _save(glyphs.images[c * PER_CLASS + i], root / f"k{c}" / f"{i}.png", "PNG")
    (root / "k0" / "broken.png").write_bytes(os.urandom(64))
    with pytest.raises(ValueError, match=r"1 of 11 images cannot be read.*broken\.png"):
        ImageFolder(root, image_size=28, channels=1, cache_dir=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = ImageFolder(root, image_size=28, channels=1, cache_dir=False, skip_bad_images=True)
    assert len(ds) == 10 and any("left out 1" in str(w.message) for w in caught)
    with pytest.raises(ValueError, match=r"fewer than 3 images: 'k2' \(2\)"):
        ImageFolder(root, image_size=28, channels=1, cache_dir=False, skip_bad_images=True,
                    min_images=3)
    os.makedirs(root / "k3")
    with pytest.raises(ValueError, match="no images.*k3"):
        ImageFolder(root, image_size=28, channels=1, cache_dir=False)
    with pytest.raises(ValueError, match="not a folder"):
        ImageFolder(tmp_path / "missing")
    with pytest.raises(ValueError, match="channels"):
        ImageFolder(root, channels=2)


@pytest.fixture(scope="module")
def trained(folder, tmp_path_factory):
    """`fastmtl train --data folder` on the training classes of the glyph folder."""
    root, _ = folder
    out = tmp_path_factory.mktemp("trained")
    assert main(["train", "--data", "folder", "--root", str(root), "--channels", "1",
                 "--image-size", "28", "--batch-size", "64", "--epochs", "8",
                 "--val-episodes", "10", "--val-queries", "5", "--eval-episodes", "20",
                 "--queries", "5", "--checkpoint-dir", str(out)]) == 0
    return out / "final.pt"


def test_checkpoint_records_what_a_user_needs(trained):
    state = torch.load(trained, weights_only=True)
    run = state["run"]
    assert run["data"] == "folder" and run["image_size"] == 28 and run["channels"] == 1
    assert len(run["mean"]) == 1 and len(run["class_names"]) == 18
    assert state["method"] == "mtl" and state["config"]["task_sampling"] == "all_classes"


def test_classifier_from_checkpoint_fits_five_shots_and_matches_evaluate(folder, trained):
    root, _ = folder
    test = ImageFolder(root, image_size=28, channels=1, split="test", seed=0, cache_dir=False)
    clf = fastmtl.FewShotClassifier.from_checkpoint(str(trained))
    # One 5-way 5-shot episode of the protocol, by the sampler evaluate uses.
    _, index = EpisodeSampler(test.labels, 5, 5, 7, seed=0).episodes(0, 1)
    index = np.asarray(index)[0]                             # (5 classes, 12 images)
    sup, qry = index[:, :5].reshape(-1), index[:, 5:].reshape(-1)
    names = [test.class_names[c] for c in test.labels]
    clf.fit([test.images[i] for i in sup], [names[i] for i in sup])
    pred = clf.predict([test.images[i] for i in qry])
    truth = np.array([names[i] for i in qry])
    assert set(pred) <= set(clf.classes_) and clf.classes_.dtype.kind == "U"
    assert (pred == truth).mean() > 0.5                      # chance is 0.2
    # fastmtl.evaluate's protocol on the same episode: same heads, same predictions.
    z = embed(clf.backbone, test)
    local = torch.arange(5).repeat_interleave(5)
    heads = fit_logistic(z[torch.as_tensor(sup)][None], local[None], C=3.0, n_classes=5)
    ref = heads.predict(z[torch.as_tensor(qry)][None])[0].numpy()
    assert list(pred) == [names[sup[5 * r]] for r in ref]   # local class r: episode row r
    # Files and tensors give the same answer as arrays; predict_proba rows sum to one.
    files = sorted((root / truth[0]).iterdir())[:2]
    assert clf.predict([str(f) for f in files]).shape == (2,)
    p = clf.predict_proba([test.images[i] for i in qry])
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-9)


def test_save_load_round_trip_and_prototype_head(folder, trained, tmp_path):
    root, _ = folder
    clf = fastmtl.FewShotClassifier.from_checkpoint(str(trained))
    sup = [str(f) for c in ("c00", "c01", "c02") for f in sorted((root / c).iterdir())[:3]]
    labels = ["zero"] * 3 + ["one"] * 3 + ["two"] * 3
    clf.fit(sup, labels)
    qry = [str(f) for c in ("c00", "c01", "c02") for f in sorted((root / c).iterdir())[3:6]]
    before = clf.predict_proba(qry)
    clf.save(str(tmp_path / "clf.pt"))
    back = fastmtl.FewShotClassifier.load(str(tmp_path / "clf.pt"))
    np.testing.assert_allclose(back.predict_proba(qry), before, rtol=1e-6, atol=1e-9)
    assert list(back.classes_) == ["one", "two", "zero"]
    proto = fastmtl.FewShotClassifier.from_checkpoint(str(trained), head="prototype")
    assert proto.fit(sup, labels).predict(qry).shape == (9,)
    with pytest.raises(ValueError, match="2 classes"):
        clf.fit(sup[:3], ["zero"] * 3)
    with pytest.raises(ValueError, match="one entry per image"):
        clf.fit(sup, labels[:-1])


def test_any_backbone_works():
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 8))
    clf = fastmtl.FewShotClassifier(net, image_size=16, channels=3, mean=(0.5,) * 3,
                                    std=(0.25,) * 3)
    rng = np.random.default_rng(0)
    imgs = [rng.integers(lo, lo + 60, (20, 24, 3), dtype=np.uint8)      # dark, then bright
            for lo in (0, 0, 0, 190, 190, 190)]
    clf.fit(imgs, [1, 1, 1, 2, 2, 2])
    assert clf.predict(imgs).tolist() == [1, 1, 1, 2, 2, 2]


def test_classifier_inputs_are_checked_not_misread():
    """An API audit's cases: tensor labels were one class per image (0-d tensors hash by
    identity), one (H, W, 3) array was read as H images, NaN pixels were predicted, and
    bad settings failed deep inside torch."""
    from fastmtl import FewShotClassifier
    from fastmtl.models import conv4
    net = conv4(in_channels=1, hidden=8)
    clf = FewShotClassifier(net, image_size=28, channels=1, device="cpu")
    x = torch.randn(4, 1, 28, 28)
    for labels in (torch.tensor([0, 0, 1, 1]), np.array([0, 0, 1, 1])):
        assert clf.fit(x, labels).classes_.tolist() == [0, 1]
        assert clf.predict(x).dtype.kind == "i"      # labels as given, not tensors
    bad_labels = [([0.0, float("nan"), 1.0, 1.0], "NaN"), ([[0], [0], [1], [1]], "hashable"),
                  (None, "labels"), (torch.zeros(2, 2), "1-D")]
    for labels, needle in bad_labels:
        with pytest.raises(ValueError, match=needle):
            clf.fit(x, labels)
    clf.fit(x, ["a", "a", "b", "b"])
    rgb = FewShotClassifier(conv4(in_channels=3, hidden=8), 28, 3, device="cpu")
    for one in (np.zeros((28, 28, 3), np.uint8), np.zeros((28, 28), np.uint8)):
        with pytest.raises(ValueError, match="is one image"):
            rgb.features(one)
    assert rgb.features([np.zeros((28, 28, 3), np.uint8)]).shape[0] == 1
    with pytest.raises(ValueError, match="non-finite"):
        clf.predict(torch.full((2, 1, 28, 28), float("nan")))
    for images, needle in ((torch.zeros(2, 1, 28, 28, dtype=torch.uint8), "normalized floats"),
                           (torch.zeros(2, 1, 50, 50), r"\(1, 28, 28\)")):
        with pytest.raises(ValueError, match=needle):
            clf.predict(images)
    for kwargs, needle in ((dict(device="gpu"), "device"), (dict(mean=0.5), "mean"),
                           (dict(std="a"), "std"), (dict(std=(float("nan"),)), "std"),
                           (dict(mean=(0.1, 0.2)), "mean"), (dict(std=(0.0,)), "std")):
        with pytest.raises(ValueError, match=needle):
            FewShotClassifier(net, image_size=28, channels=1, **kwargs)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            FewShotClassifier(net, image_size=28, channels=1, device="cuda")


def test_a_damaged_classifier_file_is_one_clear_error(tmp_path):
    """Safe to load but inconsistent (an API audit: a missing settings dict was a
    TypeError; three classes over two weight rows loaded and predicted)."""
    from fastmtl import FewShotClassifier
    from fastmtl.models import conv4
    clf = FewShotClassifier(conv4(in_channels=1, hidden=8), 28, 1, device="cpu")
    clf.fit(torch.randn(4, 1, 28, 28), ["a", "a", "b", "b"])
    path = tmp_path / "c.pt"
    clf.save(str(path))
    good = torch.load(path, weights_only=True)
    for change in (dict(settings=None), dict(weight=None), dict(classes=["a", "b", "c"]),
                   dict(bias=torch.zeros(3))):
        torch.save({**good, **change}, tmp_path / "bad.pt")
        with pytest.raises(ValueError, match="damaged"):
            FewShotClassifier.load(str(tmp_path / "bad.pt"))


def test_adapt_cli_writes_a_row_per_query_and_checks_its_inputs(folder, trained, tmp_path,
                                                                capsys):
    root, _ = folder
    support, query = tmp_path / "support", tmp_path / "query"
    for c in ("c25", "c26", "c27"):
        os.makedirs(support / c)
        os.makedirs(query / c)
        for i, f in enumerate(sorted((root / c).iterdir())):
            (support if i < 5 else query).joinpath(c, f.name).write_bytes(f.read_bytes())
    out = tmp_path / "pred.csv"
    assert main(["adapt", "--checkpoint", str(trained), "--support", str(support), "--query",
                 str(query), "--out", str(out), "--shots", "3",
                 "--plot", str(tmp_path / "cm.png")]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 3 * (PER_CLASS - 5)
    assert {"path", "predicted", "p_c25", "p_c26", "p_c27", "true"} <= set(rows[0])
    assert "accuracy" in capsys.readouterr().out and (tmp_path / "cm.png").exists()
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(100))
    bad = [({"--support": str(tmp_path / "nope")}, "--support"),
           ({"--checkpoint": str(junk)}, "not a fastmtl checkpoint"),
           ({"--shots": "9"}, "--shots 9 is larger"),
           ({"--query": str(tmp_path / "nope")}, "--query"),
           ({"--out": str(tmp_path / "pred.txt")}, "--out"),
           # flags that would do nothing: refused, not ignored
           ({"--seed": "3"}, "--seed has no effect with no --shots"),
           ({"--query": str(query / "c25"), "--plot": str(tmp_path / "cm2.png")},
            "--plot has no effect with an unlabelled --query")]
    for change, needle in bad:
        flags = {"--checkpoint": str(trained), "--support": str(support),
                 "--query": str(query), "--out": str(out), **change}
        argv = ["adapt"] + [x for kv in flags.items() for x in kv]
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2 and needle in err and "Traceback" not in err, (flags, err)
        assert len(err.strip().splitlines()) == 1
    (support / "empty").mkdir()              # a class folder with no images
    code = main(["adapt", "--checkpoint", str(trained), "--support", str(support), "--query",
                 str(query), "--out", str(out)])
    assert code == 2 and "no images" in capsys.readouterr().err


def test_omniglot_test_alphabets_as_a_folder(tmp_path, trained):
    """Real images: Omniglot test characters written as class folders read back exactly."""
    root = omniglot_root()
    from fastmtl.data import Omniglot
    omni = Omniglot(root, split="test")
    folder = tmp_path / "omni"
    keep = list(range(8))
    for c in keep:
        os.makedirs(folder / f"char{c}")
        for i, img in enumerate(omni.images[omni.labels == c]):
            Image.fromarray(img).save(folder / f"char{c}" / f"{i:03d}.png")
    ds = ImageFolder(folder, image_size=28, channels=1, cache_dir=False)
    np.testing.assert_array_equal(ds.images, omni.images[np.isin(omni.labels, keep)])
    clf = fastmtl.FewShotClassifier.from_checkpoint(str(trained))
    sup = [i for c in range(5) for i in np.flatnonzero(ds.labels == c)[:5]]
    qry = [i for c in range(5) for i in np.flatnonzero(ds.labels == c)[5:]]
    clf.fit([ds.images[i] for i in sup], [ds.class_names[ds.labels[i]] for i in sup])
    pred = clf.predict([ds.images[i] for i in qry])
    acc = np.mean(pred == np.array([ds.class_names[ds.labels[i]] for i in qry]))
    assert acc > 0.4, acc                                     # chance 0.2


def test_a_gbml_backbone_is_frozen_at_the_support_statistics(tmp_path):
    """A batch-statistics backbone normalized every predict batch with its own statistics,
    so an image's class depended on what it was predicted with (alone: its own). Now fit
    freezes it at the support images' statistics (or at norm_images, kept across fits),
    saved and loaded with the head."""
    from fastmtl import FewShotClassifier
    from fastmtl.gbml import freeze_batch_stats, frozen_statistics, use_batch_stats
    from fastmtl.models import conv4
    torch.manual_seed(0)
    net = use_batch_stats(conv4(in_channels=1, hidden=8))
    sup, qry, other = torch.randn(6, 1, 28, 28), torch.randn(7, 1, 28, 28) * 2 + 1, \
        torch.randn(5, 1, 28, 28)
    labels = ["a", "a", "a", "b", "b", "b"]
    clf = FewShotClassifier(net, 28, 1, device="cpu", batch_size=4).fit(sup, labels)
    # the support through the copy is the support as one batch of the backbone itself
    torch.testing.assert_close(clf.features(sup), F.normalize(net.eval()(sup), dim=1))
    want = F.normalize(freeze_batch_stats(net, sup)(qry), dim=1)
    torch.testing.assert_close(clf.features(qry), want)
    alone = np.concatenate([clf.predict_proba(qry[i:i + 1]) for i in range(len(qry))])
    np.testing.assert_allclose(alone, clf.predict_proba(qry), rtol=1e-5, atol=1e-6)
    clf.fit(other, labels[1:])                     # refit: the new support's statistics
    torch.testing.assert_close(clf.features(qry), F.normalize(
        freeze_batch_stats(net, other)(qry), dim=1))
    # norm_images: fixed statistics, whatever the support
    big = torch.randn(20, 1, 28, 28)
    fixed = FewShotClassifier(net, 28, 1, device="cpu", norm_images=big).fit(sup, labels)
    stats = {k: (m.clone(), v.clone()) for k, (m, v) in frozen_statistics(fixed._net).items()}
    fixed.fit(other, labels[1:])
    for k, (m, v) in frozen_statistics(fixed._net).items():
        torch.testing.assert_close((m, v), stats[k], rtol=0, atol=0)
    torch.testing.assert_close(fixed.features(qry), F.normalize(
        freeze_batch_stats(net, big)(qry), dim=1))
    # save / load keep the statistics, and whether they are fixed
    for c, name in ((clf, "support.pt"), (fixed, "fixed.pt")):
        c.save(str(tmp_path / name))
        back = FewShotClassifier.load(str(tmp_path / name))
        np.testing.assert_allclose(back.predict_proba(qry), c.predict_proba(qry), rtol=1e-5,
                                   atol=1e-6)
        back.fit(sup, labels)
        c.fit(sup, labels)
        np.testing.assert_allclose(back.predict_proba(qry), c.predict_proba(qry), rtol=1e-5,
                                   atol=1e-6)
    # a fit that fails leaves the classifier as it was (NaN support: NaN statistics)
    before = clf.predict_proba(qry)
    with pytest.raises(ValueError, match="non-finite features"):
        clf.fit(torch.full((6, 1, 28, 28), float("nan")), labels)
    np.testing.assert_array_equal(clf.predict_proba(qry), before)
    # a backbone the user froze: nothing more to freeze, saved and loaded with it
    own = FewShotClassifier(freeze_batch_stats(net, big), 28, 1, device="cpu").fit(sup, labels)
    own.save(str(tmp_path / "own.pt"))
    back = FewShotClassifier.load(str(tmp_path / "own.pt"), backbone=freeze_batch_stats(net, big))
    np.testing.assert_allclose(back.predict_proba(qry), own.predict_proba(qry), rtol=1e-5,
                               atol=1e-6)
    good = torch.load(tmp_path / "fixed.pt", weights_only=True)
    first = sorted(good["norm_statistics"])[0]
    for damaged in ({first: [torch.zeros(3), torch.ones(3)]}, {"nowhere": [1, 2]}):
        torch.save({**good, "norm_statistics": {**good["norm_statistics"], **damaged}},
                   tmp_path / "bad.pt")
        with pytest.raises(ValueError, match="damaged"):
            FewShotClassifier.load(str(tmp_path / "bad.pt"))
    with pytest.raises(ValueError, match="norm_images: the backbone has no batch-statistics"):
        FewShotClassifier(conv4(in_channels=1, hidden=8), 28, 1, device="cpu", norm_images=big)
    for images, needle in ((big[:1], "at least two"), ([], "norm_images is empty"),
                           (torch.zeros(3, 1, 9, 9), r"norm_images: image tensors")):
        with pytest.raises(ValueError, match=needle):
            FewShotClassifier(net, 28, 1, device="cpu", norm_images=images)
