"""Every bad input is one clear error before any work (DESIGN.md, "Every public function and
CLI command checks its arguments"): a ValueError naming the argument, or for the CLI one
line on stderr naming the flag and exit code 2, no traceback, no checkpoint written."""
from __future__ import annotations

import math
import os
import time
import warnings

import pytest
import torch

import fastmtl
from fastmtl import MTLConfig, MTLTrainer
from fastmtl.adapt import fit_logistic
from fastmtl.checkpoint import load as load_checkpoint
from fastmtl.cli import main
from fastmtl.data import SyntheticGlyphs
from fastmtl.gbml import MAMLConfig, ProtoNetConfig
from fastmtl.models import conv4
from fastmtl.ops import NonFiniteError, multihead_ce
from fastmtl.training import TrainingDiverged

TINY = ["--recipe", "paper", "--data", "synthetic", "--epochs", "1", "--tasks-per-epoch", "2",
        "--tasks-per-step", "2", "--images-per-class", "4", "--val-episodes", "5",
        "--eval-episodes", "5"]


def _cli(argv, capsys):
    t0 = time.perf_counter()
    try:
        code = main(argv)
    except SystemExit as exc:       # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    return code, err, time.perf_counter() - t0


def _assert_one_line(code, err, needle):
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert needle in lines[0], (needle, err)
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished tiny MTL run: last.pt, best.pt, final.pt."""
    d = tmp_path_factory.mktemp("run")
    assert main(["train", *TINY, "--checkpoint-dir", str(d / "ck")]) == 0
    return d / "ck"


# -- the CLI ------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, needle", [
    (["--shots", "0"], "--shots"),
    (["--shots", "-1"], "--shots"),
    (["--n-way", "1"], "n_way"),
    (["--max-minutes", "-5"], "max_minutes"),
    (["--max-minutes", "nan"], "max_minutes"),
    (["--eval-episodes", "-1"], "--eval-episodes"),
    (["--tasks-per-epoch", "1"], "tasks_per_epoch"),
    (["--ways", "1"], "--ways"),
    (["--queries", "0"], "--queries"),
    (["--lr", "0"], "lr"),
    (["--lr", "inf"], "lr"),
    (["--epochs", "0"], "epochs"),
    (["--head", "bogus"], "head"),
    (["--n-way", "abc"], "--n-way"),
    (["--val-episodes", "0"], "val_episodes"),
    (["--data", "nope"], "--data"),
    (["--small-images", "0.99"], "small_images"),
    (["--small-images", "0.15"], "small_images"),
    (["--small-images", "2"], "small_images"),
    # test episodes the test split cannot hold: refused before training, not after it
    (["--queries", "500"], "--shots + --queries = 505 is larger than test class"),
    (["--ways", "500"], "--ways=500 is larger than the number of test classes"),
])
def test_train_flag_out_of_range_or_wrong_type(tmp_path, capsys, flags, needle):
    ck = tmp_path / "ck"
    code, err, seconds = _cli(["train", *TINY, "--checkpoint-dir", str(ck), *flags], capsys)
    _assert_one_line(code, err, needle)
    assert not ck.exists() or not any(ck.iterdir())        # failed before training
    assert seconds < 10


def test_train_files_are_checked_before_training(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for flags, needle in ((["--checkpoint-dir", str(a_file)], "--checkpoint-dir"),
                          (["--out", str(tmp_path)], "--out"),
                          (["--plot", str(tmp_path)], "--plot")):
        code, err, seconds = _cli(["train", *TINY, *flags], capsys)
        _assert_one_line(code, err, needle)
        assert seconds < 10


def test_resume_with_the_wrong_file_is_one_line(tmp_path, capsys, run_dir):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(256))
    foreign = tmp_path / "foreign.pt"
    torch.save({"backbone": {}}, foreign)
    other = tmp_path / "other.pt"
    state = torch.load(run_dir / "last.pt", weights_only=True)
    state["backbone_spec"] = {"name": "resnet12", "in_channels": 1}
    torch.save(state, other)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((run_dir / "last.pt").read_bytes()[:500])
    cases = [(run_dir / "final.pt", "optimizer state"), (foreign, "not a fastmtl checkpoint"),
             (junk, "not a fastmtl checkpoint"), (truncated, "not a fastmtl checkpoint"),
             (other, "resnet12"), (tmp_path / "missing.pt", "does not exist"),
             (tmp_path, "is not a file")]
    for path, needle in cases:
        code, err, _ = _cli(["train", *TINY, "--resume", str(path)], capsys)
        _assert_one_line(code, err, needle)
        assert "--resume" in err


def test_resume_refuses_changed_settings(capsys, run_dir):
    code, err, _ = _cli(["train", *TINY, "--resume", str(run_dir / "last.pt"), "--lr", "0.01",
                         "--epochs", "2"], capsys)
    _assert_one_line(code, err, "lr: 0.001 -> 0.01")
    # What a resume may change (the epoch count) is accepted, and it continues.
    code, err, _ = _cli(["train", *TINY, "--resume", str(run_dir / "last.pt"), "--epochs", "2",
                         "--eval-episodes", "0"], capsys)
    assert code == 0, err


@pytest.mark.parametrize("flags, needle", [
    (["--data-seed", "5"], "data_seed: 0 -> 5"),
    (["--image-size", "32"], "image_size: 28 -> 32"),
])
def test_resume_refuses_other_data(capsys, run_dir, flags, needle):
    """A resumed run trains on the data of its checkpoint: another --data-seed (other
    classes) or image size is refused before any work, unless --allow-changed-settings."""
    code, err, seconds = _cli(["train", *TINY, "--resume", str(run_dir / "last.pt"),
                               "--epochs", "2", *flags], capsys)
    _assert_one_line(code, err, needle)
    assert "other data" in err and seconds < 30      # before training (which is longer)


def test_eval_refuses_data_flags_its_data_does_not_use(capsys, run_dir):
    code, err, _ = _cli(["eval", "--checkpoint", str(run_dir / "final.pt"), "--root", "x",
                         "--episodes", "5"], capsys)
    _assert_one_line(code, err, "--root has no effect with --data synthetic (the checkpoint's)")


@pytest.mark.parametrize("content", ["random", "truncated", "list", "missing", "dir"])
def test_eval_with_a_file_that_is_not_a_checkpoint(tmp_path, capsys, run_dir, content):
    path = tmp_path / "x.pt"
    if content == "random":
        path.write_bytes(os.urandom(300))
    elif content == "truncated":
        path.write_bytes((run_dir / "final.pt").read_bytes()[:400])
    elif content == "list":
        torch.save([1, 2], path)
    elif content == "dir":
        path = tmp_path
    code, err, _ = _cli(["eval", "--checkpoint", str(path), "--episodes", "5"], capsys)
    _assert_one_line(code, err, "--checkpoint")


def test_eval_of_any_checkpoint_knows_its_data(tmp_path, capsys, run_dir):
    for name in ("last.pt", "best.pt", "final.pt"):
        code, err, _ = _cli(["eval", "--checkpoint", str(run_dir / name), "--episodes", "5",
                             "--shots", "1"], capsys)
        assert code == 0, (name, err)
    bare = tmp_path / "bare.pt"
    state = torch.load(run_dir / "final.pt", weights_only=True)
    state["run"] = {}
    torch.save(state, bare)
    code, err, _ = _cli(["eval", "--checkpoint", str(bare), "--episodes", "5"], capsys)
    _assert_one_line(code, err, "pass --data")


@pytest.mark.parametrize("flags, needle", [
    (["--episodes", "0"], "--episodes"), (["--ways", "1"], "--ways"),
    (["--shots", "0"], "--shots")])
def test_eval_flags(capsys, run_dir, flags, needle):
    code, err, _ = _cli(["eval", "--checkpoint", str(run_dir / "final.pt"), *flags], capsys)
    _assert_one_line(code, err, needle)


@pytest.mark.parametrize("flags, needle", [
    (["--episodes", "0"], "--episodes"), (["--minutes", "-1"], "--minutes"),
    (["--minutes", "0"], "--minutes"), (["--minutes", "x"], "--minutes")])
def test_demo_flags_fail_before_training(tmp_path, capsys, flags, needle):
    code, err, seconds = _cli(["demo", "--out", str(tmp_path / "d.json"), *flags], capsys)
    _assert_one_line(code, err, needle)
    assert seconds < 10 and not (tmp_path / "d.json").exists()


@pytest.mark.parametrize("command", [["eval", "--checkpoint", "CK"], ["demo"]])
def test_out_that_is_not_a_regular_file_is_refused(tmp_path, capsys, run_dir, command):
    """Results are written beside --out and renamed over it: over /dev/null that replaced
    the device for the whole machine. A pipe stands in for any special file here."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    argv = [str(run_dir / "final.pt") if a == "CK" else a for a in command]
    code, err, seconds = _cli([*argv, "--out", str(fifo)], capsys)
    _assert_one_line(code, err, f"--out {str(fifo)!r} is not a regular file")
    assert seconds < 10 and fifo.is_fifo() and os.listdir(tmp_path) == ["pipe"]


def test_atomic_writes_never_replace_a_special_file(tmp_path):
    from fastmtl.checkpoint import atomic_save, atomic_write_json, atomic_write_text
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for write in (lambda p: atomic_write_json(p, {"a": 1}), lambda p: atomic_write_text(p, "x"),
                  lambda p: atomic_save({"a": 1}, p)):
        with pytest.raises(ValueError, match="not a regular file"):
            write(str(fifo))
        assert fifo.is_fifo() and os.listdir(tmp_path) == ["pipe"]
        (tmp_path / "folder").mkdir()          # said as what it is (an API audit)
        with pytest.raises(ValueError, match="is a directory"):
            write(str(tmp_path / "folder"))
        (tmp_path / "folder").rmdir()


def test_help_and_behaviour_agree_on_zero_episodes(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "0 skips" not in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "0 skips evaluation" in " ".join(capsys.readouterr().out.split())


# -- the public API ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def glyphs():
    return SyntheticGlyphs(12, 8, seed=0)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(n_way=1), "n_way"), (dict(episodes=0), "episodes"), (dict(k_shot=0), "k_shot"),
    (dict(n_query=0), "n_query"), (dict(C=0.0), "C"), (dict(episodes=2.5), "episodes"),
    (dict(n_way="5"), "n_way")])
def test_evaluate_arguments(glyphs, kwargs, needle):
    args = dict(n_way=5, k_shot=1, n_query=2, episodes=4, progress=False)
    args.update(kwargs)
    with pytest.raises(ValueError, match=needle):
        fastmtl.evaluate(conv4(hidden=8), glyphs, **args)


def test_embedding_and_data_arguments(glyphs):
    """An API audit's cases: a negative batch_size embedded nothing (feature_mean: NaN),
    a two-value mean broadcast grey images to two channels, a zero std gave -inf, and
    check_fits passed zero ways."""
    import numpy as np

    from fastmtl.data import FewShotDataset
    from fastmtl.evaluate import embed, feature_mean
    from fastmtl.sampling import check_fits
    net = conv4(hidden=8)
    for bs in (-1, 0, 2.5):
        for fn in (embed, feature_mean):
            with pytest.raises(ValueError, match="batch_size"):
                fn(net, glyphs, batch_size=bs)
    with pytest.raises(ValueError, match="dataset"):
        embed(net, np.zeros((4, 28, 28), np.uint8))
    images, labels = np.zeros((4, 8, 8), np.uint8), [0, 0, 1, 1]
    for kwargs, needle in ((dict(mean=(0.5, 0.5)), "mean"), (dict(std=(0.0,)), "std"),
                           (dict(std=(float("nan"),)), "std"), (dict(std=0.5), "std")):
        with pytest.raises(ValueError, match=needle):
            FewShotDataset(images, labels, ["a", "b"], **kwargs)
    for n_way, need, needle in ((0, 2, "n_way"), (2, 0, "k_shot"), (2, -1, "k_shot")):
        with pytest.raises(ValueError, match=needle):
            check_fits(labels, n_way=n_way, need=need)


def test_one_episode_has_no_confidence_interval(glyphs):
    res = fastmtl.evaluate(conv4(hidden=8), glyphs, n_way=5, k_shot=1, n_query=2, episodes=1,
                           progress=False)
    assert math.isnan(res["ci95"]) and "no confidence interval" in res["note"]


def test_unconverged_heads_warn_with_their_count(glyphs):
    z = torch.nn.functional.normalize(torch.randn(3, 10, 16), dim=-1)
    y = torch.arange(5).repeat(2).expand(3, -1)
    assert not fit_logistic(z, y, C=1e-12, max_iter=1).converged.all()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fastmtl.evaluate(conv4(hidden=8), glyphs, n_way=5, k_shot=1, n_query=2, episodes=4,
                         C=1e-12, progress=False)
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert any("did not converge on" in m and "of 4 episodes" in m for m in msgs), msgs


@pytest.mark.parametrize("what", ["z_nan", "z_inf", "weight_inf", "scale_nan", "scale_tensor"])
def test_multihead_ce_refuses_non_finite_inputs(what):
    z, w = torch.randn(6, 4), torch.randn(5, 4)
    tc, st, y = torch.tensor([[0, 1], [2, 3]]), torch.tensor([0, 0, 0, 1, 1, 1]), \
        torch.tensor([0, 1, 0, 1, 0, 1])
    scale = 1.0
    if what == "z_nan":
        z[2, 1] = float("nan")
    elif what == "z_inf":
        z[0, 0] = float("inf")
    elif what == "weight_inf":
        w[4, 3] = -float("inf")
    elif what == "scale_nan":
        scale = float("nan")
    else:
        scale = torch.tensor(float("nan"))
    name = what.split("_")[0]
    with pytest.raises(NonFiniteError, match=name):
        multihead_ce(z, w, tc, st, y, scale=scale)
    assert issubclass(NonFiniteError, ValueError)


@pytest.mark.parametrize("config, needle", [
    (lambda: MTLConfig(n_way=1), "n_way"), (lambda: MTLConfig(max_minutes=-5), "max_minutes"),
    (lambda: MTLConfig(tasks_per_epoch=1, tasks_per_step=2), "tasks_per_epoch"),
    (lambda: MTLConfig(lr=float("nan")), "lr"), (lambda: MTLConfig(epochs=1.5), "epochs"),
    (lambda: MTLConfig(val_ways=1), "val_ways"), (lambda: MTLConfig(batch_size=0), "batch_size"),
    (lambda: MTLConfig(projector=-1), "projector"),
    (lambda: MTLConfig(projector=8, projector_dim=0), "projector_dim"),
    (lambda: MTLConfig(small_images=-1), "small_images"),
    (lambda: MTLConfig(small_images=1.2), "small_images"),
    (lambda: MTLConfig(small_images=0.8, small_images_fraction=0), "small_images_fraction"),
    (lambda: MTLConfig(small_images=0.8, small_images_fraction=1.5), "small_images_fraction"),
    (lambda: MAMLConfig(n_way=1), "n_way"), (lambda: MAMLConfig(lr=0), "lr"),
    (lambda: MAMLConfig(max_minutes=-1), "max_minutes"),
    (lambda: ProtoNetConfig(tasks_per_epoch=1, tasks_per_step=2), "tasks_per_epoch"),
    (lambda: ProtoNetConfig(k_shot=True), "k_shot")])
def test_config_fields(config, needle):
    with pytest.raises(ValueError, match=needle):
        config().validate()


class _NaNNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = conv4(hidden=8)

    def forward(self, x):
        return self.net(x) * float("nan")


def test_a_diverged_step_stops_with_its_epoch_step_and_checkpoint(glyphs, tmp_path):
    cfg = MTLConfig(n_way=3, images_per_class=4, tasks_per_step=1, tasks_per_epoch=2,
                    epochs=2, checkpoint_dir=str(tmp_path))
    with pytest.raises(TrainingDiverged, match=r"step 1 of epoch 1.*no checkpoint"):
        MTLTrainer(_NaNNet(), cfg).fit(glyphs, progress=False)
    assert not (tmp_path / "last.pt").exists()


def test_resume_api_refuses_changed_settings_and_wrong_files(glyphs, tmp_path):
    cfg = MTLConfig(n_way=3, images_per_class=4, tasks_per_step=1, tasks_per_epoch=2,
                    epochs=1, checkpoint_dir=str(tmp_path))
    MTLTrainer(conv4(hidden=8), cfg).fit(glyphs, progress=False)
    with pytest.raises(ValueError, match="n_way: 3 -> 4"):
        MTLTrainer(conv4(hidden=8), MTLConfig(**{**cfg.__dict__, "n_way": 4, "epochs": 2})).fit(
            glyphs, resume=str(tmp_path / "last.pt"), progress=False)
    with pytest.raises(ValueError, match="another model"):
        MTLTrainer(conv4(hidden=16), MTLConfig(**{**cfg.__dict__, "epochs": 2})).fit(
            glyphs, resume=str(tmp_path / "last.pt"), progress=False)
    with pytest.raises(ValueError, match="holds a 'mtl' run"):
        load_checkpoint(str(tmp_path / "last.pt"), method="maml")


def test_renamed_fields_work_one_more_release_with_a_warning(tmp_path, capsys):
    """GBML's meta_batch / meta_lr are now tasks_per_step / lr (MTL's names): the old
    names still work as keywords, attributes, settings and CLI flags, with a warning."""
    import dataclasses

    from fastmtl.compare import config_for
    from fastmtl.gbml import MAMLConfig
    from fastmtl.training import check_same_run
    with pytest.warns(DeprecationWarning) as caught:
        cfg = MAMLConfig(meta_batch=3, meta_lr=2e-3)
    said = " ".join(str(w.message) for w in caught)
    assert "meta_batch is deprecated" in said and "use tasks_per_step" in said
    assert "meta_lr is deprecated" in said and "use lr" in said
    assert (cfg.tasks_per_step, cfg.lr) == (3, 2e-3)
    with pytest.warns(DeprecationWarning, match="use .tasks_per_step"):
        assert cfg.meta_batch == 3
    with pytest.warns(DeprecationWarning):
        assert dataclasses.replace(cfg, meta_batch=5).tasks_per_step == 5
    with pytest.warns(DeprecationWarning):
        assert config_for("maml", {"meta_batch": 2})[1].tasks_per_step == 2
    # A checkpoint written under the old names still resumes only with the same settings.
    old = {"meta_batch": 3, "meta_lr": 2e-3}
    check_same_run(old, MAMLConfig(tasks_per_step=3, lr=2e-3), "last.pt")
    with pytest.raises(ValueError, match="tasks_per_step: 3 -> 4"):
        check_same_run(old, MAMLConfig(tasks_per_step=4, lr=2e-3), "last.pt")
    from fastmtl.cli import build_parser
    args = build_parser("maml").parse_args(["train", "--method", "maml", "--meta-batch", "2"])
    assert args.tasks_per_step == 2
    assert "--meta-batch is deprecated" in capsys.readouterr().err


def test_head_functions_check_what_they_can_without_reading_values():
    """prototype_logits and ridge_regression run every step: they check shapes, dtypes,
    n_way and a float lam (an API audit found float labels, lam=-1 and lists accepted)."""
    from fastmtl.gbml import prototype_logits, ridge_regression
    zs, ys, zq = torch.randn(2, 4, 8), torch.tensor([[0, 0, 1, 1]] * 2), torch.randn(2, 3, 8)
    assert prototype_logits(zs, ys, zq, 2).shape == (2, 3, 2)
    assert ridge_regression(zs, ys, 2, 1.0).shape == (2, 8, 2)
    for args, needle in (((zs, ys.float(), zq, 2), "y_support"), ((zs.tolist(), ys, zq, 2),
                         "z_support"), ((zs, ys, zq[..., :4], 2), "z_query"),
                         ((zs, ys, zq, 0), "n_way")):
        with pytest.raises(ValueError, match=needle):
            prototype_logits(*args)
    for lam in (-1.0, float("nan"), 0.0):
        with pytest.raises(ValueError, match="lam"):
            ridge_regression(zs, ys, 2, lam)
    with pytest.raises(ValueError, match="y_support"):
        ridge_regression(zs, ys[:, :3], 2, 1.0)


def test_head_functions_check_label_values_on_cpu():
    """On CPU the labels are read too: out of [0, n_way) (one_hot used to raise a
    RuntimeError) and, for prototypes, a class with no support (its prototype was 0/0, NaN
    logits) are ValueErrors naming y_support; ridge heads allow an absent class."""
    from fastmtl.gbml import prototype_logits, ridge_regression
    zs, zq = torch.randn(2, 4, 8), torch.randn(2, 3, 8)
    for bad in ([[0, 0, 1, 2]] * 2, [[0, -1, 1, 1]] * 2):
        for fn in (lambda y: prototype_logits(zs, y, zq, 2),
                   lambda y: ridge_regression(zs, y, 2, 1.0)):
            with pytest.raises(ValueError, match=r"y_support must hold labels in \[0, n_way=2\)"):
                fn(torch.tensor(bad))
    missing = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0]])
    with pytest.raises(ValueError, match="task 1 has no support of class 1"):
        prototype_logits(zs, missing, zq, 2)
    w = ridge_regression(zs, missing, 2, 1.0)
    assert torch.isfinite(w).all() and w[1, :, 1].abs().max() == 0


def test_dataset_indices_are_checked():
    """An API audit: -1 wrapped to the last image, floats and masks failed inside numpy or
    torch, and subset([0.7, 1.9]) truncated to [0, 1]."""
    import numpy as np

    from fastmtl.data import FewShotDataset
    data = FewShotDataset(np.zeros((4, 8, 8), np.uint8), [0, 0, 1, 1], ["a", "b"])
    assert data.tensor(np.array([[3, 0]])).shape == (1, 2, 1, 8, 8)
    for index in ([4], [-1], [0.5], [True, False, True, False]):
        with pytest.raises(ValueError, match="index"):
            data.tensor(np.array(index))
    for classes in ([0.7, 1.9], [0, 0], [[0, 1]]):
        with pytest.raises(ValueError, match="classes"):
            data.subset(classes)
