"""Nothing silently ignored or mixed: settings without effect are refused by name, a
resumed comparison must measure the same thing, --profile writes a trace or refuses up
front, and the documented own-images workflow runs with the default recipe at 84 px."""
import json
import time

import numpy as np
import pytest
from PIL import Image

import fastmtl
from fastmtl import registry
from fastmtl.cli import main


def _run(argv, capsys):
    t0 = time.perf_counter()
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    return code, lines, time.perf_counter() - t0


@pytest.mark.parametrize("flags, needle", [
    # the case: the default recipe samples all classes; task flags do nothing
    (["--tasks-per-step", "2", "--tasks-per-epoch", "1"], "task_sampling='all_classes'"),
    (["--recipe", "paper", "--warmup-steps", "100"], "lr_schedule='plateau'"),
    (["--recipe", "paper", "--batch-size", "32"], "task_sampling='episodic'"),
    (["--projector", "0", "--projector-dim", "64"], "projector=0"),
    (["--no-augment", "--augment-strength", "2"], "augment=False"),
    (["--small-images", "1", "--small-images-fraction", "0.5"], "small_images=1"),
    (["--channels", "1"], "--data synthetic"),
    (["--skip-bad-images"], "--data synthetic"),
    (["--profile-steps", "4"], "no --profile"),
    (["--allow-changed-settings"], "no --resume"),
    (["--no-val", "--val-episodes", "50"], "--no-val"),
    (["--eval-episodes", "0", "--eval-seed", "3"], "--eval-episodes 0"),
    (["--method", "maml", "--recipe", "paper"], "recipes are MTL's"),
    (["--method", "protonet", "--lr-decay-every", "0"], "lr_decay_every"),
    (["--method", "maml", "--lr-decay", "0.3"], "lr_decay_every=None"),
    (["--chunking", "task"], "task_sampling='all_classes'"),     # one task a step
    (["--eval-episodes", "0", "--ways", "20"], "--eval-episodes 0"),
    (["--eval-episodes", "0", "--shots", "5"], "--eval-episodes 0"),
    (["--root", "somewhere"], "--data synthetic"),                # generated, not read
    (["--train-split", "trainval"], "--no-val"),         # validated on training classes
])
def test_a_setting_without_effect_is_refused_by_name(tmp_path, capsys, flags, needle):
    code, lines, seconds = _run(["train", "--data", "synthetic", "--epochs", "1",
                                 "--checkpoint-dir", str(tmp_path / "ck"), *flags], capsys)
    assert code == 2 and len(lines) == 1 and needle in lines[0], lines
    assert not (tmp_path / "ck").exists()
    assert seconds < 15


def test_r2d2_bias_init_is_refused_it_cancels_in_the_softmax():
    from fastmtl.gbml import R2D2Config
    R2D2Config().validate()
    with pytest.raises(ValueError, match="bias_init.*softmax"):
        R2D2Config(bias_init=1.0).validate()


def test_a_recipe_value_made_inert_by_a_flag_is_not_the_users_fault(capsys):
    """--lr-schedule plateau with the fast recipe: the recipe's warm-up has no effect any
    more, so it goes back to its default instead of being refused."""
    cfg = fastmtl.MTLConfig.from_recipe("fast", lr_schedule="plateau")
    assert cfg.warmup_steps == 0
    cfg.validate()
    with pytest.raises(ValueError, match="warmup_steps=50 has no effect"):
        fastmtl.MTLConfig.from_recipe("fast", lr_schedule="plateau", warmup_steps=50).validate()


def test_compare_settings_for_a_method_not_run_are_refused(tmp_path, capsys):
    settings = tmp_path / "s.json"
    settings.write_text(json.dumps({"protonet": {"n_way": 10}}))
    code, lines, _ = _run(["compare", "--methods", "mtl", "--settings", str(settings),
                           "--out", str(tmp_path / "c")], capsys)
    assert code == 2 and "not in --methods" in lines[0]
    code, lines, _ = _run(["compare", "--methods", "protonet", "--recipe", "paper",
                           "--out", str(tmp_path / "c")], capsys)
    assert code == 2 and "--recipe" in lines[0]
    code, lines, _ = _run(["compare", "--eval-at", "1,2", "--eval-every", "5",
                           "--out", str(tmp_path / "c")], capsys)
    assert code == 2 and "--eval-every" in lines[0] and "--eval-at" in lines[0]
    code, lines, _ = _run(["compare", "--root", "somewhere", "--out", str(tmp_path / "c")],
                          capsys)
    assert code == 2 and "--root" in lines[0] and "--data synthetic" in lines[0]
    # --sample-images where nothing is sampled: MTL alone (running statistics), no --centre
    code, lines, _ = _run(["compare", "--methods", "mtl", "--sample-images", "64",
                           "--out", str(tmp_path / "c")], capsys)
    assert code == 2 and "--sample-images" in lines[0] and "--centre" in lines[0]


def test_resume_with_another_setting_is_refused(tmp_path, capsys):
    """One list of what makes runs comparable (fastmtl.compare.COMPARABLE) guards both
    --resume and merge: a resumed run with another --ways is refused, naming it."""
    out = tmp_path / "c"
    base = ["compare", "--methods", "protonet", "--budget-minutes", "0.02", "--eval-every",
            "0.5", "--episodes", "4", "--shots", "1", "--out", str(out), "--sample-images", "64",
            "--settings", str(tmp_path / "s.json")]
    (tmp_path / "s.json").write_text(json.dumps({"protonet": {"n_way": 5}}))
    assert main(base) == 0
    capsys.readouterr()
    for flags, needle in ((["--ways", "3"], "ways"), (["--queries", "5"], "queries"),
                          (["--seed", "1"], "seed"), (["--sample-images", "99"], "sample_images")):
        code, lines, _ = _run(base + flags + ["--resume"], capsys)
        assert code == 2 and len(lines) == 1 and needle in lines[0], lines
    (tmp_path / "s.json").write_text(json.dumps({"protonet": {"n_way": 6}}))
    code, lines, _ = _run(base + ["--resume"], capsys)
    assert code == 2 and "settings_overrides" in lines[0]
    from fastmtl import compare
    assert "ways" in compare.COMPARABLE and "recipe" in compare.COMPARABLE


def test_profile_refuses_a_run_shorter_than_it_needs(tmp_path, capsys):
    """The issue's case: one MAML step, a profile of 5 + 3 steps: refused before training
    with the number of steps it needs, instead of an empty folder and exit 0."""
    code, lines, _ = _run(["train", "--method", "maml", "--epochs", "1", "--tasks-per-epoch",
                           "32", "--no-val", "--eval-episodes", "0", "--profile",
                           str(tmp_path / "prof")], capsys)
    assert code == 2 and "needs 8 steps" in lines[-1] and "makes 1" in lines[-1], lines
    assert not (tmp_path / "prof").exists() or not any((tmp_path / "prof").iterdir())


def _images(root, classes=12, per_class=8, size=100):
    rng = np.random.default_rng(0)
    for c in range(classes):
        d = root / f"class{c:02d}"
        d.mkdir(parents=True)
        base = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        for i in range(per_class):
            noise = rng.integers(0, 40, (size, size, 3), dtype=np.uint8)
            Image.fromarray(base // 2 + noise).save(d / f"{i}.png")
    return root


def test_own_images_at_84px_rgb_with_the_default_recipe(tmp_path):
    """The README's own-images command at 84 px RGB trains with the default recipe: its
    progressive resizing picks 80 px, where Conv-4 keeps its 1,600-d features."""
    root = _images(tmp_path / "imgs", classes=30, per_class=6)
    out = tmp_path / "r.json"
    code = main(["train", "--data", "folder", "--root", str(root), "--image-size", "84",
                 "--channels", "3", "--batch-size", "16", "--max-minutes", "0.05",
                 "--epochs", "1", "--val-episodes", "2", "--val-queries", "2", "--val-ways", "2",
                 "--eval-episodes", "2", "--queries", "2", "--ways", "2", "--shots", "1",
                 "--out", str(out)])
    assert code == 0
    assert json.loads(out.read_text())["config"]["small_images"] == \
        registry.default_config("mtl").small_images


def test_small_side_keeps_the_feature_size():
    from fastmtl.models import conv4
    from fastmtl.mtl import _small_side
    assert _small_side(conv4(3), (3, 84, 84), 0.86) == 80
    assert _small_side(conv4(1), (1, 28, 28), 0.86) == 24
    # a side far below what the backbone takes is refused, not silently raised to 16 px
    with pytest.raises(ValueError, match=r"small_images=0.15: 4x4 .* 16 px"):
        _small_side(conv4(1), (1, 28, 28), 0.15)
    # where no smaller side works at all (Conv-4 at 16 px) the run trains at full size
    with pytest.warns(RuntimeWarning, match="full size throughout"):
        assert _small_side(conv4(1), (1, 16, 16), 0.86) is None


def test_runs_on_other_images_do_not_mix():
    """A resumed or merged comparison must read the images the same way (--channels,
    --skip-bad-images); a run recorded before these were is at their defaults."""
    from fastmtl import compare
    assert compare.differences({"channels": 1}, {"channels": 3}) == ["channels"]
    assert compare.differences({"skip_bad_images": True}, {}) == ["skip_bad_images"]
    assert compare.differences({}, {"channels": 3, "skip_bad_images": False}) == []


def test_runs_on_other_thread_counts_do_not_mix():
    """The torch threads set every time axis: a resumed or merged run must share them."""
    from fastmtl import compare
    a = {"ways": 5, "machine": {"torch_threads": 2, "cpu": "x"}}
    b = {"ways": 5, "machine": {"torch_threads": 8, "cpu": "x"}}
    assert compare.differences(a, b) == ["machine.torch_threads"]
    assert compare.differences(a, dict(a)) == []


def test_version_is_the_installed_distributions(capsys):
    import importlib.metadata
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == \
        f"fastmtl {importlib.metadata.version('fastmtl')}" == f"fastmtl {fastmtl.__version__}"
