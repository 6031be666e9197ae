"""Files users share cannot run code: every entry point that reads a checkpoint or a saved
classifier refuses a malicious pickle with one line and runs nothing; files written by
the current format (CLI or Python API) still load and rebuild their backbone."""
import json
import os
import pathlib

import pytest
import torch

import fastmtl
from fastmtl import checkpoint
from fastmtl.cli import main


class _Evil:
    """Unpickling this runs ``os.system(command)`` (when a loader lets it)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.fixture
def evil(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": checkpoint.FORMAT, "method": "mtl",
                "backbone": _Evil(f"touch {marker}")}, path)
    # the attack itself works where a loader unpickles freely (so the tests below test
    # something): loading it with weights_only=False creates the marker
    probe = tmp_path / "probe.pt"
    torch.save({"x": _Evil(f"touch {tmp_path / 'probe_ran'}")}, probe)
    torch.load(probe, weights_only=False)   # noqa: S614 - the test's own file, on purpose
    assert (tmp_path / "probe_ran").exists()
    return path, marker


def _one_line_refusal(capsys, code):
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "not a fastmtl checkpoint" in err, err


def _support(tmp_path):
    """A support folder of 2 classes of 3 PNGs, and one query image."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "support" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(
                tmp_path / "support" / c / f"{i}.png")
    return tmp_path / "support", tmp_path / "support" / "a" / "0.png"


@pytest.mark.parametrize("entry", ["eval", "train --resume", "adapt"])
def test_cli_entry_points_run_nothing(evil, entry, tmp_path, capsys):
    path, marker = evil
    if entry == "eval":
        code = main(["eval", "--checkpoint", str(path), "--episodes", "2"])
    elif entry == "adapt":
        support, query = _support(tmp_path)
        code = main(["adapt", "--checkpoint", str(path), "--support", str(support),
                     "--query", str(query), "--out", str(tmp_path / "p.csv")])
    else:
        code = main(["train", "--resume", str(path), "--epochs", "1"])
    assert not marker.exists()
    _one_line_refusal(capsys, code)


@pytest.mark.parametrize("loader", [
    lambda p: fastmtl.FewShotClassifier.load(p),
    lambda p: fastmtl.FewShotClassifier.from_checkpoint(p),
    lambda p: checkpoint.load(p),
    lambda p: fastmtl.MTLTrainer(fastmtl.models.conv4(hidden=8), fastmtl.MTLConfig(
        epochs=2, tasks_per_step=2, tasks_per_epoch=2, images_per_class=4)).fit(
        fastmtl.data.SyntheticGlyphs(12, 8), resume=p, progress=False),
], ids=["FewShotClassifier.load", "FewShotClassifier.from_checkpoint", "checkpoint.load",
        "MTLTrainer.fit(resume=)"])
def test_python_entry_points_run_nothing(evil, loader):
    path, marker = evil
    with pytest.raises(ValueError, match="not a fastmtl checkpoint") as info:
        loader(str(path))
    assert not marker.exists()
    assert "\n" not in str(info.value)


def test_no_loader_in_the_package_unpickles_freely():
    root = pathlib.Path(fastmtl.__file__).parent
    hits = [str(p) for p in root.rglob("*.py") if "weights_only=False" in p.read_text()]
    assert not hits
    # nor in the tests and benchmarks of a source tree, but for this file's one probe
    unsafe = "weights_only=" + "False"
    tree = pathlib.Path(__file__).resolve().parent.parent
    lines = [f"{p}:{i}" for folder in ("tests", "benchmarks") if (tree / folder).is_dir()
             for p in (tree / folder).rglob("*.py")
             for i, line in enumerate(p.read_text().splitlines(), 1)
             if "torch.load(" in line and unsafe in line and "on purpose" not in line]
    assert not lines


def test_a_checkpoint_of_the_python_api_rebuilds_everywhere(tmp_path, capsys):
    """A model trained through the API (no CLI) records its backbone's spec, so the CLI's
    eval and FewShotClassifier.from_checkpoint rebuild it without help."""
    run = tmp_path / "run"
    cfg = fastmtl.MTLConfig(epochs=1, tasks_per_step=2, tasks_per_epoch=2, images_per_class=4,
                            checkpoint_dir=str(run))
    train = fastmtl.data.SyntheticGlyphs(12, 8, seed=0)
    trainer = fastmtl.MTLTrainer(fastmtl.models.conv4(in_channels=1, hidden=16), cfg)
    trainer.run_info = {"data": "synthetic", "image_size": 28, "channels": 1,
                        "mean": list(train.mean), "std": list(train.std)}
    trainer.fit(train, progress=False)
    state = torch.load(run / "last.pt", weights_only=True)      # plain values only
    assert state["backbone_spec"] == {"name": "conv4", "in_channels": 1, "hidden": 16,
                                      "out_channels": 64}
    clf = fastmtl.FewShotClassifier.from_checkpoint(str(run / "best.pt"))
    assert clf.backbone.spec["hidden"] == 16
    out = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(run / "best.pt"), "--episodes", "3",
                 "--shots", "1", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["results"][0]["episodes"] == 3


def test_saved_classifier_of_a_foreign_backbone_needs_the_module(tmp_path):
    """A backbone that is not a fastmtl model is saved as weights only: loading asks for a
    fresh module of its architecture, and then round-trips."""
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 8))
    clf = fastmtl.FewShotClassifier(net, image_size=28, channels=1, mean=(0.1,), std=(0.3,),
                                    device="cpu")
    clf.fit(torch.randn(4, 1, 28, 28), [0, 0, 1, 1])
    path = str(tmp_path / "clf.pt")
    clf.save(path)
    with pytest.raises(ValueError, match="^backbone: .*not a fastmtl model"):
        fastmtl.FewShotClassifier.load(path)
    fresh = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 8))
    back = fastmtl.FewShotClassifier.load(path, backbone=fresh)
    x = torch.randn(3, 1, 28, 28)
    assert (back.predict_proba(x) == clf.predict_proba(x)).all()
    with pytest.raises(ValueError, match="labels: only str, int, float or bool"):
        clf.fit(torch.randn(4, 1, 28, 28), [(0,), (0,), (1,), (1,)]).save(path)


def test_checkpoints_of_the_previous_release_still_load(tmp_path, capsys):
    """Before backbones recorded their own spec, the CLI wrote {"name", "in_channels"}
    only: such a checkpoint rebuilds the default-width backbone and evaluates."""
    run = tmp_path / "run"
    assert main(["train", "--recipe", "paper", "--epochs", "1", "--tasks-per-epoch", "2",
                 "--tasks-per-step", "2", "--images-per-class", "4", "--val-episodes", "2",
                 "--eval-episodes", "0", "--checkpoint-dir", str(run)]) == 0
    state = torch.load(run / "best.pt", weights_only=True)
    state["backbone_spec"] = {"name": "conv4", "in_channels": 1}     # the old record
    old = tmp_path / "old.pt"
    torch.save(state, old)
    assert main(["eval", "--checkpoint", str(old), "--episodes", "3", "--shots", "1"]) == 0
    clf = fastmtl.FewShotClassifier.from_checkpoint(str(old))
    assert clf.backbone.spec["hidden"] == 64


@pytest.mark.parametrize("name", ["cifarfs", "fc100", "miniimagenet", "tiered-npz",
                                  "tiered-labels"])
def test_data_set_files_cannot_run_code(tmp_path, name):
    """The community's data files are pickles (and .npz with pickled object arrays), shared
    like checkpoints: they are read with a data-only unpickler, and one that names
    anything but arrays and plain containers is refused, naming the file, running
    nothing."""
    import pickle

    import numpy as np

    from fastmtl import registry
    marker = tmp_path / "pwned"
    evil = _Evil(f"touch {marker}")
    pickle.loads(pickle.dumps(_Evil(f"touch {tmp_path / 'probe'}")))    # the attack works
    assert (tmp_path / "probe").exists()
    images = np.zeros((2, 32, 32, 3), np.uint8)
    content = {"data": images, "labels": [0, 1], "extra": evil}
    files = {"cifarfs": "CIFAR_FS_test.pickle", "fc100": "FC100_test.pickle",
             "miniimagenet": "miniImageNet_category_split_test.pickle"}
    if name in files:
        (tmp_path / files[name]).write_bytes(pickle.dumps(content))
        data = name
    else:
        labels = {"label_specific": [0, 1]}
        if name == "tiered-labels":
            labels["extra"] = evil
            np.savez(tmp_path / "test_images.npz", images=images)
        else:
            encoded = np.empty(2, dtype=object)
            encoded[:] = [evil, b"png"]
            np.savez(tmp_path / "test_images.npz", images=encoded)
        (tmp_path / "test_labels.pkl").write_bytes(pickle.dumps(labels))
        data = "tieredimagenet"
    with pytest.raises(ValueError, match="not loaded, as a pickle can run code"):
        registry.load_dataset(data, str(tmp_path), "test")
    assert not marker.exists()


def test_data_pickles_cannot_build_arrays_over_raw_memory(tmp_path):
    """numpy.ndarray called directly with an object dtype over raw bytes makes objects of
    made-up addresses (a crash, or worse, when used): it is refused; the arrays of real
    files, at every pickle protocol, Python 2's names for builtins included, still load."""
    import pickle

    import numpy as np

    from fastmtl import registry

    class Raw:
        def __reduce__(self):
            return (np.ndarray, ((2,), np.dtype("O"), bytearray(b"A" * 16)))
    path = tmp_path / "CIFAR_FS_test.pickle"
    path.write_bytes(pickle.dumps({"data": Raw(), "labels": [0, 1]}))
    with pytest.raises(ValueError, match="calls numpy.ndarray directly"):
        registry.load_dataset("cifarfs", str(tmp_path), "test")
    images = np.arange(2 * 32 * 32 * 3, dtype=np.uint8).reshape(2, 32, 32, 3)
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        path.write_bytes(pickle.dumps({"data": images, "labels": np.array([0, 1]),
                                       "extra": {1, 2}, "raw": bytearray(b"x")}, protocol))
        got = registry.load_dataset("cifarfs", str(tmp_path), "test")
        assert np.array_equal(got.images, images), protocol


def test_data_pickles_cannot_forge_a_dtype():
    """numpy's own unpickling helpers trust their input: a dtype whose pickled state drops
    an object dtype's has-objects flag, an object array's list shorter than its shape, a
    view of another array, structured dtypes or a bare allocation made arrays over raw
    memory (segfaults, or worse) or ate memory. The data-only unpickler builds arrays
    itself and refuses each; every plain dtype, in either byte order, still loads."""
    import pickle

    import numpy as np
    core = np._core if hasattr(np, "_core") else np.core

    class Forged:
        def __reduce__(self):
            return (np.dtype, ("O8", False, True), (3, "|", None, None, None, -1, -1, 0))

    class Call:
        def __init__(self, *reduced):
            self.reduced = reduced

        def __reduce__(self):
            return self.reduced
    built = Call(core.multiarray._reconstruct, (np.ndarray, (0,), b"b"),
                 (1, (4,), np.dtype("u1"), False, b"AAAA"))
    attacks = [Call(core.numeric._frombuffer, (b"A" * 8, Forged(), (1,), "C")),
               Call(core.multiarray._reconstruct, (np.ndarray, (0,), b"b"),
                    (1, (1,), Forged(), False, b"A" * 8)),
               Call(core.multiarray._reconstruct, (np.ndarray, (0,), b"b"),   # short list
                    (1, (100000,), np.dtype("O"), False, [])),
               Call(core.numeric._frombuffer, (built, np.dtype("u1"), (4,), "C")),  # a view
               Call(np.dtype, ([("a", "<i8")], False, True)),         # fields
               Call(bytes, (1 << 31,))]                               # 2 GiB from 20 bytes
    for obj in attacks:
        for protocol in (2, 4):
            with pytest.raises(ValueError, match="not loaded, as a pickle can run code"):
                _load(pickle.dumps({"x": obj}, protocol))
    # an object scalar is its object: the forged dtype's bytes stay bytes
    got = _load(pickle.dumps(Call(core.multiarray.scalar, (Forged(), b"A" * 8))))
    assert got == b"A" * 8
    plain = {"a": np.arange(6, dtype=">i4").reshape(2, 3), "b": np.arange(3, dtype="<f8"),
             "u": np.array(["ab", "c"]), "o": np.array([b"x", b"yz"], dtype=object),
             "t": np.array([True, False])}
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        data = pickle.dumps({**plain, "s": np.float32(1.5)}, protocol)
        got = _load(data)
        assert got["s"] == np.float32(1.5) and got["s"].dtype == np.float32, protocol
        assert all(np.array_equal(got[k], v) and got[k].dtype == v.dtype
                   for k, v in plain.items()), protocol


def _load(data: bytes):
    import io

    from fastmtl.data._safe_pickle import safe_load
    return safe_load(io.BytesIO(data), pathlib.Path("x"), len(data))


def test_data_pickles_cannot_exhaust_the_machine_or_leak_addresses():
    """A fourth review's cases: tiny files that asked for huge shapes, allocations,
    reads or exponentially shared containers, an object array's pointers read through
    READONLY_BUFFER, and stand-ins reaching the caller; and a legitimate optimized pickle
    (no memo, so ids are reused) that was refused."""
    import pickle
    import pickletools
    import struct

    import numpy as np
    nested: list = [0]
    for _ in range(40):
        nested = [nested, nested]          # 2^40 elements from a few hundred bytes
    class Call:
        def __init__(self, *reduced):
            self.reduced = reduced

        def __reduce__(self):
            return self.reduced
    refused = [pickle.dumps({"x": nested}, 2),
               pickle.dumps(Call(bytes, (np.int64(1 << 28),)), 2),     # 256 MB from 70 B
               b"\x80\x05\x96" + struct.pack("<Q", 1 << 40) + b".",  # BYTEARRAY8 of 1 TB
               pickle.dumps(np.array([b"x"], dtype=object), 5)[:-1] + b"\x98.",  # pointers
               b"\x80\x02cnumpy\nndarray\nq\x00)\x81q\x01."]       # NEWOBJ on a stand-in
    for data in refused:
        with pytest.raises(ValueError):
            _load(data)
    shared = (np.arange(2),)
    got = _load(pickle.dumps([shared, shared], 2))
    assert all(type(t[0]) is np.ndarray for t in got)
    data = pickletools.optimize(pickle.dumps({"a": np.arange(3.0), "b": np.arange(4)}, 2))
    got = _load(data)
    assert got["a"].tolist() == [0.0, 1.0, 2.0] and got["b"].tolist() == [0, 1, 2, 3]
