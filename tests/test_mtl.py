"""The MTL trainer: the fused step equals the paper's per-task loop, it learns, it resumes."""
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import omniglot_root

from fastmtl import MTLConfig, MTLTrainer, evaluate
from fastmtl.data import SyntheticGlyphs
from fastmtl.models import conv4
from fastmtl.ops import multihead_ce


class _Tiny(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 32), nn.ReLU(), nn.Linear(32, d))

    def forward(self, x):
        return self.net(x)


def _glyphs(n=30, per=12, seed=0):
    return SyntheticGlyphs(n, per, seed=seed)


def test_fused_head_call_equals_per_task_loop():
    """One multihead_ce call over all tasks = the official code's loop, averaged over tasks."""
    g = torch.Generator().manual_seed(0)
    T, n, k, d, C = 4, 5, 3, 12, 20
    z = torch.randn(T * n * k, d, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(C, d, generator=g, dtype=torch.float64, requires_grad=True)
    tc = torch.stack([torch.randperm(C, generator=g)[:n] for _ in range(T)])
    st = torch.arange(T).repeat_interleave(n * k)
    y = torch.arange(n).repeat_interleave(k).repeat(T)
    fused = multihead_ce(F.normalize(z), W, tc, st, y, scale=5.0)
    gz, gw = torch.autograd.grad(fused, (z, W))
    loop = 0
    for t in range(T):
        zt = F.normalize(z[st == t])
        loop = loop + F.cross_entropy(5.0 * zt @ W[tc[t]].T, y[st == t]) / T
    lz, lw = torch.autograd.grad(loop, (z, W))
    torch.testing.assert_close(fused, loop)
    torch.testing.assert_close(gz, lz)
    torch.testing.assert_close(gw, lw)


def test_trainer_learns_and_records_history():
    data = _glyphs()
    train, test = data.subset(range(20)), data.subset(range(20, 30))
    cfg = MTLConfig(tasks_per_step=4, tasks_per_epoch=40, epochs=3, scale=10.0,
                    images_per_class=6, val_episodes=20, val_queries=5)
    trainer = MTLTrainer(conv4(in_channels=1), cfg)
    hist = trainer.fit(train, test, progress=False)
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert {"train_acc", "val_acc", "val_ci95", "lr", "elapsed_s"} <= set(hist[0])
    res = evaluate(trainer.backbone, test, n_way=5, k_shot=1, n_query=5, episodes=50,
                   progress=False)
    assert res["mean"] > 35.0  # chance is 20%


@pytest.mark.parametrize("chunking", ["task", "batch"])
def test_chunking_modes_run(chunking):
    data = _glyphs(12, 8)
    cfg = MTLConfig(tasks_per_step=2, tasks_per_epoch=4, epochs=1, images_per_class=4,
                    chunking=chunking)
    hist = MTLTrainer(_Tiny(), cfg).fit(data, progress=False)
    assert np.isfinite(hist[0]["train_loss"])


def test_resume_repeats_an_uninterrupted_run(tmp_path):
    data = _glyphs(15, 8)
    cfg = MTLConfig(tasks_per_step=2, tasks_per_epoch=6, epochs=3, images_per_class=4,
                    augment=True, checkpoint_dir=str(tmp_path / "a"))
    torch.manual_seed(0)
    net_a = _Tiny()
    init = {k: v.clone() for k, v in net_a.state_dict().items()}
    a = MTLTrainer(net_a, cfg)
    a.fit(data, progress=False)

    net_b = _Tiny()
    net_b.load_state_dict(init)
    cfg_b = dataclasses.replace(cfg, epochs=2, checkpoint_dir=str(tmp_path / "b"))
    MTLTrainer(net_b, cfg_b).fit(data, progress=False)
    net_c = _Tiny()
    net_c.load_state_dict(init)
    c = MTLTrainer(net_c, dataclasses.replace(cfg_b, epochs=3))
    hist = c.fit(data, resume=str(tmp_path / "b" / "last.pt"), progress=False)
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    for (name, pa), pc in zip(a.backbone.state_dict().items(), c.backbone.state_dict().values()):
        torch.testing.assert_close(pa, pc, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(a.head, c.head, rtol=0, atol=0)
    assert (tmp_path / "a" / "best.pt").exists() and (tmp_path / "a" / "history.json").exists()


def test_trainer_errors(tmp_path):
    data = _glyphs(4, 6)
    with pytest.raises(ValueError, match="n_way"):
        MTLTrainer(_Tiny(), MTLConfig(n_way=5, epochs=1)).fit(data, progress=False)
    with pytest.raises(ValueError, match="images_per_class|k_shot"):
        MTLTrainer(_Tiny(), MTLConfig(n_way=3, images_per_class=7)).fit(data, progress=False)
    with pytest.raises(ValueError, match="chunking"):
        MTLTrainer(_Tiny(), MTLConfig(chunking="sometimes"))
    with pytest.raises(ValueError, match="train"):
        MTLTrainer(_Tiny(), MTLConfig()).fit(np.zeros((4, 28, 28)), progress=False)
    with pytest.raises(ValueError, match="resume"):
        MTLTrainer(_Tiny(), MTLConfig(n_way=3, epochs=1, images_per_class=2)).fit(
            data, resume=str(tmp_path / "nope.pt"), progress=False)
    # A validation set that cannot hold the validation episodes fails before training.
    small_cfg = MTLConfig(n_way=3, epochs=1, images_per_class=2)
    with pytest.raises(ValueError, match="val_ways=5"):
        MTLTrainer(_Tiny(), small_cfg).fit(data, val=_glyphs(4, 20), progress=False)
    with pytest.raises(ValueError, match="val_shots \\+ val_queries = 16"):
        MTLTrainer(_Tiny(), small_cfg).fit(data, val=_glyphs(6, 10), progress=False)
    with pytest.raises(ValueError, match="val must be"):
        MTLTrainer(_Tiny(), small_cfg).fit(data, val="val", progress=False)


def test_short_training_on_real_omniglot_is_far_above_chance():
    """A short run on the real Omniglot subset; test alphabets never seen in training."""
    root = omniglot_root()
    from fastmtl.data import Omniglot, with_rotations
    train = with_rotations(Omniglot(root, split="train"))
    test = Omniglot(root, split="test")
    cfg = MTLConfig.from_recipe("fast", epochs=1)       # the default recipe, 201 steps
    torch.manual_seed(0)
    net = conv4(in_channels=1)
    kw = dict(n_way=5, k_shot=1, n_query=15, episodes=200, progress=False)
    before = evaluate(net, test, **kw)["mean"]
    MTLTrainer(net, cfg).fit(train, progress=False)
    after = evaluate(net, test, **kw)["mean"]
    # Chance is 20%, logistic regression on raw pixels about 40%, the untrained Conv-4
    # about 45%; one epoch of the fast recipe (201 steps of 64 images) reaches about 73%.
    assert after > 60.0 and after > before + 15.0, (before, after)


def test_time_budget_stops_after_the_step_that_crosses_it():
    data = _glyphs(12, 8)
    cfg = MTLConfig(tasks_per_step=2, tasks_per_epoch=10, epochs=4, images_per_class=4,
                    max_minutes=1e-9)
    hist = MTLTrainer(_Tiny(), cfg).fit(data, progress=False)
    assert len(hist) == 1 and hist[0]["steps"] == 1


def test_float64_backbone_trains_in_float64():
    data = _glyphs(12, 8)
    cfg = MTLConfig(tasks_per_step=2, tasks_per_epoch=4, epochs=1, images_per_class=4,
                    backend="reference")
    trainer = MTLTrainer(_Tiny().double(), cfg)
    hist = trainer.fit(data, progress=False)
    assert trainer.head.dtype == torch.float64 and np.isfinite(hist[0]["train_loss"])


def test_projector_trains_behind_the_backbone_and_stays_out_of_its_features(tmp_path):
    """projector > 0: the head rows live in the projector's output space, the projector's
    weights learn with the backbone's, and the trained backbone alone (its own feature
    size) is what evaluation sees; a resumed run repeats the uninterrupted one."""
    data = _glyphs(12, 8)
    # (the plateau schedule: the cosine one spans the run's epochs, which differ below)
    cfg = MTLConfig.from_recipe("fast", projector=24, projector_dim=10, batch_size=16,
                                epochs=2, lr_schedule="plateau", small_images=1.0,
                                checkpoint_dir=str(tmp_path / "a"))
    torch.manual_seed(0)
    net = _Tiny(d=16)
    init = {k: v.clone() for k, v in net.state_dict().items()}
    a = MTLTrainer(net, cfg)
    a.fit(data, progress=False)
    proj = a.learner.projector
    assert tuple(a.head.shape) == (12, 10) and proj[0].in_features == 16
    assert a.backbone(torch.zeros(3, 1, 28, 28)).shape == (3, 16)
    assert any(k.startswith("projector.") for k in a.learner.state_dict())
    fresh = MTLTrainer(_Tiny(d=16), dataclasses.replace(cfg, epochs=1, checkpoint_dir=None))
    fresh._prepare_fit(data, None)
    fresh._setup(data)      # the projector as initialized, from the same seed
    assert not torch.equal(fresh.learner.projector[0].weight, proj[0].weight)   # it learned
    params = {id(p) for g in a.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in params for p in proj.parameters())

    net_b = _Tiny(d=16)
    net_b.load_state_dict(init)
    b = MTLTrainer(net_b, dataclasses.replace(cfg, epochs=1, checkpoint_dir=str(tmp_path / "b")))
    b.fit(data, progress=False)
    net_c = _Tiny(d=16)
    net_c.load_state_dict(init)
    c = MTLTrainer(net_c, dataclasses.replace(cfg, checkpoint_dir=str(tmp_path / "c")))
    c.fit(data, resume=str(tmp_path / "b" / "last.pt"), progress=False)
    for (name, pa), pc in zip(a.learner.state_dict().items(), c.learner.state_dict().values()):
        torch.testing.assert_close(pa, pc, rtol=0, atol=0, msg=name)


def test_projector_runs_per_task_chunk_as_the_backbone_does():
    """With task chunking each task's images meet only within their chunk, projector
    BatchNorm included: the step's features are the chunks' features side by side."""
    cfg = MTLConfig(projector=12, projector_dim=6, chunking="task", images_per_class=4)
    torch.manual_seed(0)
    learner_task = MTLTrainer(_Tiny(d=8).double(), cfg)
    learner_task._prepare_fit(_glyphs(12, 8), None)
    learner_task._setup(_glyphs(12, 8))
    lt = learner_task.learner
    x = torch.randn(3 * 10, 1, 28, 28, dtype=torch.float64)
    together = lt.features(x, n_tasks=3)
    apart = torch.cat([lt.projector(lt.backbone(c)) for c in x.chunk(3)])
    torch.testing.assert_close(together, apart, rtol=0, atol=0)
    lt.chunking = "batch"
    assert not torch.allclose(lt.features(x, n_tasks=3), apart)


def _input_sides(trainer):
    """The side of every image batch the backbone sees in training, appended as it runs."""
    sides = []

    def hook(module, args):
        if module.training:
            sides.append(args[0].shape[-1])
    trainer.backbone.register_forward_pre_hook(hook)
    return sides


@pytest.mark.parametrize("augment", [True, False])
def test_small_images_for_the_first_fraction_of_the_run_then_full_size(augment):
    """Progressive resizing: the first small_images_fraction of the steps (no time budget:
    the fraction is the steps over the epochs') see small images, the rest full-size ones,
    and the trainer counts the small steps."""
    data = _glyphs(12, 8)       # 96 images: 6 steps an epoch of 16
    cfg = MTLConfig.from_recipe("fast", projector=0, batch_size=16, epochs=2, augment=augment,
                                small_images=20 / 28, small_images_fraction=0.5)
    trainer = MTLTrainer(conv4(hidden=8), cfg)
    sides = _input_sides(trainer)
    hist = trainer.fit(data, progress=False)
    steps = sum(h["steps"] for h in hist)
    assert steps == 12 and sides == [20] * 6 + [28] * 6
    assert trainer.small_image_steps == 6
    assert all(np.isfinite(h["train_loss"]) for h in hist)
    # the features stay full-size
    assert trainer.backbone(torch.zeros(2, 1, 28, 28)).shape == (2, 64)


def test_small_images_one_trains_full_size_throughout_and_the_fast_recipe_starts_small():
    data = _glyphs(12, 8)       # 6 steps: the recipe's first 6.7% of them is the first one
    seen = {}
    for small in (1.0, None):
        cfg = MTLConfig.from_recipe("fast", projector=0, batch_size=16, epochs=1,
                                    **({} if small is None else {"small_images": small}))
        trainer = MTLTrainer(conv4(hidden=8), cfg)
        sides = _input_sides(trainer)
        trainer.fit(data, progress=False)
        seen[small] = (sides, trainer.small_image_steps)
    assert seen[1.0] == ([28] * 6, 0)
    assert seen[None] == ([24] + [28] * 5, 1)


@pytest.mark.parametrize("side", [12, 20, 27])
def test_small_affine_samples_the_same_view_as_a_bilinear_resize(side):
    """With the identity transform (u = 0.5) the augmentation's small output is a plain
    bilinear resize of the image (float64 reference: F.interpolate), background kept."""
    from fastmtl.mtl import _random_affine
    g = torch.Generator().manual_seed(side)
    x = torch.randn(3, 2, 28, 28, generator=g, dtype=torch.float64)
    u = torch.full((3, 4), 0.5, dtype=torch.float64)
    x.requires_grad_(True)
    got = _random_affine(x, u, size=side)
    want = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # backward too: the same gradient reaches the images
    up = torch.randn(got.shape, generator=g, dtype=torch.float64)
    (grad_got,) = torch.autograd.grad(got, x, up)
    (grad_want,) = torch.autograd.grad(want, x, up)
    torch.testing.assert_close(grad_got, grad_want, rtol=1e-10, atol=1e-10)
    x = x.detach()
    # and a real jitter at full size is unchanged by the new argument
    u = torch.rand(3, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(_random_affine(x, u, size=28), _random_affine(x, u))


def test_small_images_rounding_to_full_size_fails_before_training():
    data = _glyphs(12, 8)
    cfg = MTLConfig.from_recipe("fast", projector=0, batch_size=16, epochs=1,
                                small_images=0.99)
    trainer = MTLTrainer(conv4(hidden=8), cfg)
    sides = _input_sides(trainer)
    with pytest.raises(ValueError, match="small_images=.*full size"):
        trainer.fit(data, progress=False)
    assert sides == []


@pytest.mark.parametrize("shape, fraction, side", [
    ((3, 84, 84), 0.86, 80),        # 72 px would give 1,024-d features, 84 px 1,600-d
    ((1, 28, 28), 0.86, 24),        # the recipe's own case: as asked
])
def test_small_images_take_the_nearest_side_that_keeps_the_features(shape, fraction, side):
    from fastmtl.mtl import _small_side
    assert _small_side(conv4(in_channels=shape[0], hidden=8), shape, fraction) == side


def test_small_images_that_cannot_apply_warn_and_train_full_size():
    """Conv-4 at 16 px: no smaller side keeps its features, so the default recipe trains
    at full size throughout and says so (a warning), instead of failing."""
    data = SyntheticGlyphs(12, 8, seed=0, image_size=16)
    cfg = MTLConfig.from_recipe("fast", projector=0, batch_size=16, epochs=1)
    trainer = MTLTrainer(conv4(hidden=8), cfg)
    sides = _input_sides(trainer)
    with pytest.warns(RuntimeWarning, match="full size throughout"):
        trainer.fit(data, progress=False)
    assert set(sides) == {16}
