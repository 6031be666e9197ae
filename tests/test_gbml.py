"""GBML baselines: the vmapped meta-gradient equals a per-task loop, the closed-form heads
equal direct computations, BatchNorm keeps tasks apart, and the trainers learn and resume."""
import copy
import dataclasses
import json
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import omniglot_root, write_runs_zip
from torch.func import functional_call

import fastmtl
from fastmtl import registry
from fastmtl.data import SyntheticGlyphs
from fastmtl.gbml import (
    ANIL,
    MAML,
    R2D2,
    ANILConfig,
    MAMLConfig,
    ProtoNet,
    ProtoNetConfig,
    R2D2Config,
    prototype_logits,
    ridge_regression,
    use_batch_stats,
)
from fastmtl.models import conv4

GBML = [m for m in registry.METHOD_NAMES if registry.METHODS[m].recipe is None]


class _TinyConv(nn.Module):
    """Conv-BN-ReLU-pool and a linear layer: small, but with BatchNorm to exercise it.

    No conv bias, as in Conv-4: BatchNorm cancels it, so its gradient is rounding noise
    and has no relative accuracy to test."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4),
                                  nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                  nn.Linear(4 * 4 * 4, 6))

    def forward(self, x):
        return self.body(x)


def _net(seed=0):
    torch.manual_seed(seed)
    net = _TinyConv().double()
    with torch.no_grad():       # non-trivial BN affine parameters
        net.body[1].weight.uniform_(0.5, 1.5)
        net.body[1].bias.uniform_(-0.5, 0.5)
    return net


def _batch(T=4, n=3, k=2, q=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(T, n * k, 1, 8, 8, generator=g, dtype=torch.float64)
    xq = torch.randn(T, n * q, 1, 8, 8, generator=g, dtype=torch.float64)
    ys = torch.arange(n).repeat_interleave(k).expand(T, -1)
    yq = torch.arange(n).repeat_interleave(q).expand(T, -1)
    return xs, ys, xq, yq


def _reference_bn(module):
    """A copy whose BatchNorms use the fused F.batch_norm with batch statistics."""
    ref = copy.deepcopy(module)
    for m in ref.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats, m.running_mean, m.running_var = False, None, None
            m.num_batches_tracked = None
    return ref


def _loop_meta_grad(net, head, xs, ys, xq, yq, steps, lr, first_order, head_only):
    """MAML/ANIL meta-gradient the textbook way: a for loop, autograd.grad(create_graph)."""
    body_params = dict(net.named_parameters())
    head_params = dict(head.named_parameters())
    total = 0
    for t in range(xs.shape[0]):
        if head_only:
            zs, zq = functional_call(net, body_params, (xs[t],)), functional_call(
                net, body_params, (xq[t],))
            fast = dict(head_params)
            for _ in range(steps):
                loss = F.cross_entropy(functional_call(head, fast, (zs,)), ys[t])
                g = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
                fast = {k: v - lr * gi for (k, v), gi in zip(fast.items(), g)}
            logits = functional_call(head, fast, (zq,))
        else:
            fast = {**{"b." + k: v for k, v in body_params.items()},
                    **{"h." + k: v for k, v in head_params.items()}}

            def forward(p, x):
                z = functional_call(net, {k[2:]: v for k, v in p.items() if k[0] == "b"}, (x,))
                return functional_call(head, {k[2:]: v for k, v in p.items() if k[0] == "h"},
                                       (z,))
            for _ in range(steps):
                loss = F.cross_entropy(forward(fast, xs[t]), ys[t])
                g = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
                fast = {k: v - lr * gi for (k, v), gi in zip(fast.items(), g)}
            logits = forward(fast, xq[t])
        total = total + F.cross_entropy(logits, yq[t]) / xs.shape[0]
    params = list(body_params.values()) + list(head_params.values())
    return total, torch.autograd.grad(total, params)


def _assert_rel(actual, expected, rtol):
    """Per-tensor relative error; gradients that vanish exactly (a bias before BatchNorm or
    under a translation-invariant head) are held to the scale of the whole gradient."""
    floor = 1e-6 * sum(e.norm() ** 2 for e in expected).sqrt().item()
    for a, e in zip(actual, expected):
        err = (a - e).norm().item()
        assert err <= rtol * max(e.norm().item(), floor), (err, e.norm().item())


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("method", ["maml", "fomaml", "anil"])
def test_vmapped_meta_gradient_equals_per_task_loop(method, steps):
    xs, ys, xq, yq = _batch()
    net = _net()
    ref_net = _reference_bn(net)          # fused BatchNorm, not the trainer's composite
    cls, config_cls, fixed = registry.method(method)
    cfg = config_cls(n_way=3, inner_steps=steps, inner_lr=0.3, vectorize=True, **fixed)
    trainer = cls(net, cfg, device="cpu").build((1, 8, 8))
    ref_head = copy.deepcopy(trainer.model.head)
    loss, _ = trainer.meta_loss(xs, ys, xq, yq)
    params = list(trainer.model.backbone.parameters()) + list(trainer.model.head.parameters())
    grads = torch.autograd.grad(loss, params)
    ref_loss, ref_grads = _loop_meta_grad(ref_net, ref_head, xs, ys, xq, yq, steps, 0.3,
                                          cfg.first_order, head_only=method == "anil")
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=0)
    _assert_rel(grads, ref_grads, 1e-6)
    # The library's own loop (vectorize=False) is the same math too.
    trainer.config.vectorize = False
    loop_loss, _ = trainer.meta_loss(xs, ys, xq, yq)
    _assert_rel(torch.autograd.grad(loop_loss, params), ref_grads, 1e-6)
    # And the trainer's meta-gradient, which the loop accumulates one task at a time.
    for p in params:
        p.grad = None
    step_loss, _ = trainer._step(xs, ys, xq, yq)
    assert step_loss == pytest.approx(ref_loss.item(), rel=1e-10)
    _assert_rel([p.grad for p in params], ref_grads, 1e-6)


def test_second_order_terms_are_present_and_meta_sgd_lrs_get_gradients():
    xs, ys, xq, yq = _batch()
    grads = {}
    for fo in (False, True):
        tr = MAML(_net(), MAMLConfig(n_way=3, inner_lr=0.3, first_order=fo)).build((1, 8, 8))
        loss, _ = tr.meta_loss(xs, ys, xq, yq)
        grads[fo] = torch.autograd.grad(loss, list(tr.model.backbone.parameters()))
    diff = sum((a - b).norm() for a, b in zip(grads[False], grads[True]))
    assert diff > 1e-4 * sum(a.norm() for a in grads[True])

    tr = MAML(_net(), MAMLConfig(n_way=3, inner_lr=0.3, inner_steps=2,
                                 learn_inner_lr=True)).build((1, 8, 8))
    loss, _ = tr.meta_loss(xs, ys, xq, yq)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tr.model.inner_lr)
    # With every step size at inner_lr, Meta-SGD is exactly MAML.
    plain = MAML(_net(), MAMLConfig(n_way=3, inner_lr=0.3, inner_steps=2)).build((1, 8, 8))
    torch.testing.assert_close(plain.meta_loss(xs, ys, xq, yq)[0], loss, rtol=1e-12, atol=0)


@pytest.mark.parametrize("S,d", [(5, 12), (12, 5)])
def test_ridge_head_equals_direct_solve(S, d):
    g = torch.Generator().manual_seed(0)
    T, n, lam = 3, 4, 0.7
    z = torch.randn(T, S, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, n, (T, S), generator=g)
    w = ridge_regression(z, y, n, lam)
    for t in range(T):
        x, onehot = z[t], F.one_hot(y[t], n).double()
        direct = torch.linalg.solve(x.T @ x + lam * torch.eye(d, dtype=x.dtype), x.T @ onehot)
        torch.testing.assert_close(w[t], direct, rtol=1e-10, atol=1e-12)
    # Differentiable in the features and in lambda (what R2D2 meta-trains through).
    lam_t = torch.tensor(lam, dtype=torch.float64, requires_grad=True)
    zr = z[:1, :4, :3].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: ridge_regression(a, y[:1, :4], n, b),
                                    (zr, lam_t), fast_mode=True)


def test_protonet_logits_equal_loop():
    g = torch.Generator().manual_seed(0)
    T, n, k, Q, d = 3, 4, 3, 5, 7
    zs = torch.randn(T, n * k, d, generator=g, dtype=torch.float64)
    ys = torch.arange(n).repeat_interleave(k)[torch.randperm(n * k, generator=g)].expand(T, -1)
    zq = torch.randn(T, Q, d, generator=g, dtype=torch.float64)
    logits = prototype_logits(zs, ys, zq, n)
    for t in range(T):
        for c in range(n):
            proto = zs[t][ys[t] == c].mean(0)
            for i in range(Q):
                expected = -((zq[t, i] - proto) ** 2).sum()
                torch.testing.assert_close(logits[t, i, c], expected, rtol=1e-10, atol=1e-12)


def test_r2d2_and_protonet_vmapped_equal_loop():
    xs, ys, xq, yq = _batch(n=3)
    for cls, cfg in ((R2D2, R2D2Config(n_way=3, vectorize=True)),
                     (ProtoNet, ProtoNetConfig(n_way=3, vectorize=True))):
        tr = cls(_net(), cfg).build((1, 8, 8))
        assert tr.vectorized()          # the stacked backbone call, against the loop below
        loss, _ = tr.meta_loss(xs, ys, xq, yq)
        grads = torch.autograd.grad(loss, list(tr.model.parameters()), allow_unused=True)
        tr.config.vectorize = False
        loop_loss, _ = tr.meta_loss(xs, ys, xq, yq)
        loop_grads = torch.autograd.grad(loop_loss, list(tr.model.parameters()), allow_unused=True)
        torch.testing.assert_close(loss, loop_loss, rtol=1e-10, atol=0)
        _assert_rel([a for a in grads if a is not None],
                    [b for b in loop_grads if b is not None], 1e-8)


@pytest.mark.parametrize("shape", [(5, 4, 6, 6), (3, 7, 5, 9), (2, 3, 1, 1)])
def test_batch_stat_norm_channels_last_equals_the_fused_op_to_second_order(shape):
    """A channels-last input (Conv-4 on the CPU) runs the batch-statistics norm as a 2-D
    batch_norm over (pixels, channels): the same values, gradients and second-order
    gradients (MAML's double backward) as the 4-D op on an NCHW input (float64)."""
    g = torch.Generator().manual_seed(shape[0] * 10 + shape[1])
    norm = use_batch_stats(nn.Sequential(nn.BatchNorm2d(shape[1]).double()))[0]
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=g)
        norm.bias.uniform_(-0.5, 0.5, generator=g)
    x = torch.randn(shape, dtype=torch.float64, generator=g)
    probe = torch.randn(shape, dtype=torch.float64, generator=g)

    def grads(fn, inp):
        inp = inp.detach().requires_grad_()
        out = fn(inp)
        params = [inp, norm.weight, norm.bias]
        first = torch.autograd.grad((out * probe).sum(), params, create_graph=True)
        second = torch.autograd.grad(sum((t * t).sum() for t in first), params,
                                     materialize_grads=True)  # the bias enters linearly
        return [out.detach(), *(t.detach() for t in first), *second]

    def fused(inp):                 # the 4-D op itself
        return F.batch_norm(inp, None, None, norm.weight, norm.bias, training=True,
                            eps=norm.eps)

    nhwc = x.contiguous(memory_format=torch.channels_last)
    assert nhwc.is_contiguous(memory_format=torch.channels_last)
    got, want = grads(norm, nhwc), grads(fused, x.contiguous())
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
    _assert_rel(got, want, 1e-10)


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("tasks,n,hw", [(3, 4, 16), (5, 3, 20), (1, 7, 16), (2, 25, 28)])
def test_stacked_features_equal_one_call_per_task(tasks, n, hw, channels_last):
    """One backbone call over stacked tasks (ANIL, ProtoNet and R2D2 vectorized) gives each
    task's features, and their gradients, as a separate call per task does (float64), in
    both activation layouts (the per-task BatchNorm has a path for each)."""
    from fastmtl.gbml._common import stacked_features
    torch.manual_seed(tasks * 100 + n)
    net = use_batch_stats(conv4(hidden=6, out_channels=5, channels_last=channels_last).double())
    for m in net.modules():         # non-trivial affine parameters
        if hasattr(m, "weight") and m.weight is not None and m.weight.dim() == 1:
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    x = torch.randn(tasks, n, 1, hw, hw, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(tasks, n, 5, dtype=torch.float64)
    z = stacked_features(net, x)
    ref = torch.stack([net(x[t]) for t in range(tasks)])
    torch.testing.assert_close(z, ref, rtol=1e-12, atol=1e-12)
    params = [x] + list(net.parameters())
    got = torch.autograd.grad((z * probe).sum(), params)
    want = torch.autograd.grad((ref * probe).sum(), params)
    _assert_rel(got, want, 1e-10)
    if tasks > 1:                   # other tasks' images do not reach task 0's features
        x2 = x.detach().clone()
        x2[1:] = 3 * x2[1:] + 1
        torch.testing.assert_close(stacked_features(net, x2)[0], z[0].detach(), rtol=1e-12,
                                   atol=1e-12)
    # and the norms are back to one batch afterwards
    torch.testing.assert_close(net(x[0].detach()), ref[0].detach(), rtol=1e-12, atol=1e-12)


def test_batchnorm_keeps_tasks_apart():
    net = _net()
    cfg = MAMLConfig(n_way=3, inner_lr=0.3, inner_steps=2, vectorize=True)
    tr = MAML(net, cfg).build((1, 8, 8))
    # No BatchNorm (hence no running statistics) is left in the trainer's backbone.
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    assert not any("running" in k for k in net.state_dict())
    xs, ys, xq, yq = _batch(T=3)
    _, logits = tr.meta_loss(xs, ys, xq, yq)
    xs2, xq2 = xs.clone(), xq.clone()
    xs2[1:] = 5 * xs2[1:] + 3      # other tasks' images change, task 0's do not
    xq2[1:] = -xq2[1:]
    _, logits2 = tr.meta_loss(xs2, ys, xq2, yq)
    torch.testing.assert_close(logits[0], logits2[0], rtol=1e-12, atol=1e-12)
    _, alone = tr.meta_loss(xs[:1], ys[:1], xq[:1], yq[:1])
    torch.testing.assert_close(logits[:1], alone, rtol=1e-12, atol=1e-12)
    # Batch statistics in eval mode too: the mode does not change the features.
    x = xs[0]
    a = net.train()(x)
    b = net.eval()(x)
    torch.testing.assert_close(a, b)
    # A fresh backbone converted by use_batch_stats loads the trainer's backbone state.
    fresh = use_batch_stats(_TinyConv().double())
    fresh.load_state_dict(net.state_dict())


def _glyphs():
    data = SyntheticGlyphs(30, 12, seed=0)
    return data.subset(range(20)), data.subset(range(20, 30))


@pytest.mark.parametrize("method", sorted(GBML))
def test_every_method_fits_checkpoints_and_evaluates(method, tmp_path):
    train, test = _glyphs()
    cls, config_cls, fixed = registry.method(method)
    extra = {"inner_steps": 1, "inner_lr": 0.1, "test_inner_steps": 1} if cls in (MAML, ANIL) \
        else {}
    cfg = config_cls(n_way=5, k_shot=1, n_query=3, tasks_per_step=4, tasks_per_epoch=8, epochs=2,
                     val_episodes=5, val_queries=5, checkpoint_dir=str(tmp_path), **extra,
                     **fixed)
    tr = cls(conv4(hidden=8, out_channels=8), cfg)
    hist = tr.fit(train, test, progress=False)
    assert [h["epoch"] for h in hist] == [1, 2]
    assert {"train_loss", "train_acc", "val_acc", "val_ci95", "lr", "elapsed_s"} <= set(hist[0])
    assert all(np.isfinite(h["train_loss"]) for h in hist)
    for name in ("last.pt", "best.pt", "history.json"):
        assert os.path.exists(tmp_path / name)
    assert json.load(open(tmp_path / "history.json"))[-1]["epoch"] == 2
    own = tr.evaluate(test, n_way=5, k_shot=1, n_query=5, episodes=8, progress=False)
    logistic = fastmtl.evaluate(tr.backbone, test, n_way=5, k_shot=1, n_query=5, episodes=8,
                                progress=False)
    for res in (own, logistic):
        assert 0 <= res["mean"] <= 100 and len(res["accuracies"]) == 8


def test_resume_repeats_an_uninterrupted_run(tmp_path):
    train, _ = _glyphs()
    cfg = ANILConfig(n_way=5, n_query=3, tasks_per_step=4, tasks_per_epoch=8, epochs=2,
                     inner_lr=0.1)

    def backbone():
        torch.manual_seed(0)
        return conv4(hidden=8, out_channels=8)
    full = ANIL(backbone(), cfg)
    full.fit(train, progress=False)
    half = ANIL(backbone(), ANILConfig(**{**cfg.__dict__, "epochs": 1,
                                          "checkpoint_dir": str(tmp_path)}))
    half.fit(train, progress=False)
    resumed = ANIL(backbone(), cfg)
    hist = resumed.fit(train, resume=str(tmp_path / "last.pt"), progress=False)
    assert [h["epoch"] for h in hist] == [1, 2]
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_vectorize_none_picks_the_measured_form_and_flags_force_one():
    """vectorize=None: on a CPU MAML/FO-MAML's stacked form on a Conv-4, the loop for the
    other methods and other backbones (benchmarks/maml_vs_l2l.py, stacked_vs_vmap.py);
    True/False force one, as --vectorize / --no-vectorize do on the command line."""
    from fastmtl.cli import build_parser
    picks = {m: cls(conv4(hidden=8), cfg_cls(**fixed), device="cpu").vectorized()
             for m in GBML for cls, cfg_cls, fixed in [registry.method(m)]}
    assert picks == {"maml": True, "fomaml": True, "anil": False, "r2d2": False,
                     "protonet": False}
    assert not MAML(_TinyConv(), MAMLConfig(), device="cpu").vectorized()   # no stacked form
    assert MAML(conv4(hidden=8), MAMLConfig(vectorize=True), device="cpu").vectorized()
    assert ANIL(conv4(hidden=8), ANILConfig(vectorize=True), device="cpu").vectorized()
    for argv, want in (([], None), (["--vectorize"], True), (["--no-vectorize"], False)):
        args = build_parser("maml").parse_args(["train", "--method", "maml", *argv])
        assert args.vectorize is want
    with pytest.raises(ValueError, match="vectorize"):
        MAMLConfig(vectorize="auto").validate()
    # the methods' own test-time adaptation: the same predictions either way
    _, test = _glyphs()
    for cls, cfg_cls in ((MAML, MAMLConfig), (ANIL, ANILConfig)):
        torch.manual_seed(0)
        tr = cls(conv4(hidden=8).double(), cfg_cls(vectorize=True), device="cpu")
        tr.build(test.image_shape)
        kwargs = dict(n_way=5, k_shot=1, n_query=3, episodes=4, progress=False)
        vectorized = tr.evaluate(test, **kwargs)["accuracies"]
        tr.config.vectorize = False
        np.testing.assert_array_equal(tr.evaluate(test, **kwargs)["accuracies"], vectorized)


def test_bad_settings_raise_value_errors():
    with pytest.raises(ValueError, match="inner_lr"):
        MAMLConfig(inner_lr=0).validate()
    with pytest.raises(ValueError, match="tasks_per_step"):
        MAML(conv4(), MAMLConfig(tasks_per_step=0))
    with pytest.raises(ValueError, match="val_protocol"):
        R2D2(conv4(), R2D2Config(val_protocol="nope"))
    with pytest.raises(ValueError, match="R2D2Config"):
        R2D2(conv4(), MAMLConfig())
    _, test = _glyphs()
    with pytest.raises(ValueError, match="5-way head"):
        MAML(conv4(hidden=8), MAMLConfig()).evaluate(test, n_way=3, episodes=2, progress=False)
    tr = ProtoNet(conv4(hidden=8), ProtoNetConfig(n_way=5)).build((1, 28, 28))
    with pytest.raises(ValueError, match="xs"):
        tr.meta_loss(torch.zeros(2, 5, 28, 28), torch.zeros(2, 5), torch.zeros(2, 5, 1, 28, 28),
                     torch.zeros(2, 5))


def test_protonet_learns_real_omniglot():
    """A short ProtoNet run on the real alphabet split beats its own untrained backbone
    on the same test episodes by a clear margin."""
    root = omniglot_root()
    from fastmtl.data import Omniglot
    train, test = Omniglot(root, split="train"), Omniglot(root, split="test")
    cfg = ProtoNetConfig(n_way=20, k_shot=1, n_query=5, tasks_per_step=2, tasks_per_epoch=80,
                         epochs=1, lr_decay_every=None)
    torch.manual_seed(0)
    tr = ProtoNet(conv4(hidden=32, out_channels=32), cfg).build(train.image_shape)
    kwargs = dict(n_way=5, k_shot=1, n_query=10, episodes=60, progress=False)
    before = tr.evaluate(test, **kwargs)["mean"]
    tr.fit(train, progress=False)
    after = tr.evaluate(test, **kwargs)["mean"]
    assert after > before + 8.0, (before, after)     # chance is 20%


def test_private_functorch_probe_still_works():
    """_BatchStatNorm picks its formulation with a private functorch call (checked against
    torch 2.13): fail loudly here, not with wrong second-order gradients, if it moves."""
    from fastmtl.gbml._common import _functorch_wrapped
    seen = []

    def f(t):
        seen.append(_functorch_wrapped(t))
        return t
    torch.func.vmap(f)(torch.zeros(2, 3))
    assert seen == [True] and not _functorch_wrapped(torch.zeros(1))


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("T,k,q,size,steps,first_order", [
    (3, 2, 3, (16, 16), 1, False),
    (1, 1, 2, (17, 20), 3, False),      # one task, odd image sizes (pooling floors them)
    (2, 2, 1, (16, 16), 2, True),       # FO-MAML
])
def test_stacked_maml_equals_textbook_loop(channels_last, T, k, q, size, steps, first_order):
    """MAML's vectorized form on a Conv-4 (tasks as channel groups, fastmtl.gbml._stacked)
    against the textbook per-task loop with the fused BatchNorm, float64, forward and the
    second-order meta-gradient; and against the library's loop and vmap, Meta-SGD's step
    sizes included."""
    from fastmtl.gbml._stacked import program
    torch.manual_seed(T + steps)
    net = conv4(hidden=4, out_channels=5, channels_last=channels_last).double()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):       # non-trivial affine parameters
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    ref_net = _reference_bn(net)
    ref_net.channels_last = False                   # the reference runs NCHW
    ref_net._lay_out()
    g = torch.Generator().manual_seed(7)
    xs = torch.randn(T, 3 * k, 1, *size, generator=g, dtype=torch.float64)
    xq = torch.randn(T, 3 * q, 1, *size, generator=g, dtype=torch.float64)
    ys = torch.arange(3).repeat_interleave(k).expand(T, -1)
    yq = torch.arange(3).repeat_interleave(q).expand(T, -1)
    cfg = MAMLConfig(n_way=3, inner_steps=steps, inner_lr=0.3, first_order=first_order,
                     vectorize=True)
    tr = MAML(net, cfg, device="cpu").build((1, *size))
    assert program(tr.model) is not None and tr.vectorized()
    params = list(tr.model.backbone.parameters()) + list(tr.model.head.parameters())
    loss, logits = tr.meta_loss(xs, ys, xq, yq)
    grads = torch.autograd.grad(loss, params)
    ref_loss, ref_grads = _loop_meta_grad(ref_net, copy.deepcopy(tr.model.head), xs, ys, xq, yq,
                                          steps, 0.3, first_order, head_only=False)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=0)
    _assert_rel(grads, ref_grads, 1e-8)
    for vectorize, stack in ((False, True), (True, False)):     # the loop, then vmap
        tr.config.vectorize, tr._stack = vectorize, stack
        other_loss, other_logits = tr.meta_loss(xs, ys, xq, yq)
        torch.testing.assert_close(other_logits, logits, rtol=1e-10, atol=1e-12)
        _assert_rel(torch.autograd.grad(other_loss, params), ref_grads, 1e-8)
    # Meta-SGD: the step sizes' meta-gradient too, against the library's loop
    torch.manual_seed(0)
    tr = MAML(conv4(hidden=4, out_channels=5, channels_last=channels_last).double(),
              dataclasses.replace(cfg, learn_inner_lr=True), device="cpu").build((1, *size))
    every = list(tr.model.parameters())
    got = torch.autograd.grad(tr.meta_loss(xs, ys, xq, yq)[0], every)
    tr.config.vectorize = False
    _assert_rel(got, torch.autograd.grad(tr.meta_loss(xs, ys, xq, yq)[0], every), 1e-8)


def test_stacked_maml_checks_its_input_and_keeps_tasks_apart():
    torch.manual_seed(0)
    tr = MAML(conv4(hidden=4).double(), MAMLConfig(n_way=3, inner_steps=2, vectorize=True),
              device="cpu").build((1, 16, 16))
    xs = torch.randn(3, 3, 1, 16, 16, dtype=torch.float64)
    xq = torch.randn(3, 6, 1, 16, 16, dtype=torch.float64)
    ys, yq = torch.arange(3).expand(3, -1), torch.arange(3).repeat_interleave(2).expand(3, -1)
    _, logits = tr.meta_loss(xs, ys, xq, yq)
    xs2, xq2 = xs.clone(), xq.clone()
    xs2[1:], xq2[1:] = 4 * xs2[1:] - 1, -xq2[1:]     # other tasks change, task 0 does not
    torch.testing.assert_close(tr.meta_loss(xs2, ys, xq2, yq)[1][0], logits[0],
                               rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="input channels"):
        tr.meta_loss(xs.expand(-1, -1, 3, -1, -1), ys, xq.expand(-1, -1, 3, -1, -1), yq)
    with pytest.raises(ValueError, match="at least 16x16"):
        tr.meta_loss(xs[..., :8, :8], ys, xq[..., :8, :8], yq)


@pytest.mark.parametrize("n,batch_size", [(37, 5), (16, 16), (9, 64)])
def test_freeze_batch_stats_uses_the_images_statistics(n, batch_size):
    """freeze_batch_stats: each norm takes the mean and biased variance its input has when
    all the images pass as ONE batch (float64 reference: hooks on the batch-statistics
    net), computed in batches (ragged ones too); the copy then normalizes any batch the
    same way (a row's output does not depend on its batch), and the original is kept."""
    from fastmtl.gbml import freeze_batch_stats, has_batch_stats
    from fastmtl.gbml._common import _BatchStatNorm
    torch.manual_seed(n)
    net = use_batch_stats(conv4(hidden=8)).double()
    x = torch.randn(n, 1, 28, 28, dtype=torch.float64)
    want = []
    hooks = [m.register_forward_pre_hook(lambda m, a: want.append(
        (a[0].mean((0, 2, 3)), a[0].var((0, 2, 3), unbiased=False))))
        for m in net.modules() if isinstance(m, _BatchStatNorm)]
    with torch.no_grad():
        ref = net(x)
    for h in hooks:
        h.remove()
    frozen = freeze_batch_stats(net, x, batch_size=batch_size)
    got = [(m.mean, m.var) for m in frozen.modules() if type(m).__name__ == "_FrozenNorm"]
    assert len(got) == len(want) == 4 and not has_batch_stats(frozen) and has_batch_stats(net)
    for (gm, gv), (wm, wv) in zip(got, want, strict=True):
        torch.testing.assert_close(gm, wm, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gv, wv, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(frozen(x), ref, rtol=1e-9, atol=1e-9)
    y = torch.randn(7, 1, 28, 28, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(frozen(y)[:3], frozen(y[:3]), rtol=1e-12, atol=1e-12)
    # backward: the input gradient equals one through an explicit normalization
    (g,) = torch.autograd.grad(frozen(y).pow(2).sum(), y)
    it = iter(want)

    def explicit(mod, args):
        mean, var = next(it)
        shape = (1, -1, 1, 1)
        return (args[0] - mean.view(shape)) / torch.sqrt(var.view(shape) + mod.eps) * \
            mod.weight.view(shape) + mod.bias.view(shape)
    hooks = [m.register_forward_hook(lambda m, a, out: explicit(m, a))
             for m in net.modules() if isinstance(m, _BatchStatNorm)]
    (g_ref,) = torch.autograd.grad(net(y).pow(2).sum(), y)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-10)


class _LateFirst(nn.Module):
    """A norm registered before the one that runs ahead of it, and a linear between."""

    def __init__(self):
        super().__init__()
        self.late, self.lin, self.early = nn.BatchNorm1d(4), nn.Linear(3, 4), nn.BatchNorm1d(3)

    def forward(self, x):
        return self.late(self.lin(self.early(x)))


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm1d(3)

    def forward(self, x):
        return self.norm(self.norm(x) * 2)


def test_freeze_batch_stats_follows_the_forward_and_bad_input():
    """The norms are frozen in the order a forward meets them, not the order they were
    registered in (with batches smaller than the images, the one-batch output comes back
    only so); a norm used at two places, and bad arguments, are ValueErrors."""
    from fastmtl.gbml import freeze_batch_stats
    torch.manual_seed(0)
    late = use_batch_stats(_LateFirst()).double()
    x = torch.randn(50, 3, dtype=torch.float64) * 3 + 1
    torch.testing.assert_close(freeze_batch_stats(late, x, batch_size=7)(x), late(x),
                               rtol=1e-9, atol=1e-9)
    net = use_batch_stats(conv4(hidden=8))
    x = torch.randn(4, 1, 28, 28)
    for args, needle in (((conv4(hidden=8), x), "no batch-statistics norm"),
                         ((net, x.long()), "images"), ((net, x[:1]), "images"),
                         ((net, x, 0), "batch_size"),
                         ((use_batch_stats(_Twice()), torch.randn(5, 3)), "several places")):
        with pytest.raises(ValueError, match=needle):
            freeze_batch_stats(*args)


def test_freeze_at_gives_back_a_frozen_copy_from_its_statistics():
    """frozen_statistics / freeze_at: what freeze_batch_stats returned, rebuilt from plain
    tensors (as FewShotClassifier saves it), without the images; bad statistics are
    ValueErrors."""
    from fastmtl.gbml import freeze_at, freeze_batch_stats, frozen_statistics, has_batch_stats
    torch.manual_seed(0)
    net = use_batch_stats(conv4(hidden=8))
    x, y = torch.randn(12, 1, 28, 28), torch.randn(3, 1, 28, 28)
    frozen = freeze_batch_stats(net, x, batch_size=5)
    stats = frozen_statistics(frozen)
    assert len(stats) == 4 and frozen_statistics(net) == {}
    again = freeze_at(net, stats)
    assert has_batch_stats(net) and not has_batch_stats(again)
    torch.testing.assert_close(again(y), frozen(y), rtol=0, atol=0)
    name = sorted(stats)[0]
    bad = [({}, "must name"), ({**stats, "extra": stats[name]}, "must name"),
           ({**stats, name: (stats[name][0][:3], stats[name][1])}, "8 values"),
           ({**stats, name: (stats[name][0], -stats[name][1] - 1)}, "non-negative"),
           ({**stats, name: stats[name][0]}, "mean and a"),
           ({**stats, name: (stats[name][0] * float("nan"), stats[name][1])}, "finite")]
    for given, needle in bad:
        with pytest.raises(ValueError, match=needle):
            freeze_at(net, given)
    with pytest.raises(ValueError, match="backbone has no batch-statistics norm"):
        freeze_at(conv4(hidden=8), stats)
    with pytest.raises(ValueError, match="backbone must be an nn.Module"):
        freeze_at("conv4", stats)
    # statistics follow the backbone's dtype (as saved: float32 on the CPU)
    wide = freeze_at(copy.deepcopy(net).double(), stats)
    torch.testing.assert_close(wide(y.double()), frozen(y).double(), rtol=1e-5, atol=1e-5)


def test_cli_evaluates_a_gbml_backbone_frozen_at_training_statistics(tmp_path):
    """`fastmtl train --method protonet` and `fastmtl eval` of its checkpoint (the
    logistic protocol and Lake's one-shot runs) run on the backbone frozen at the
    statistics of the seeded training sample (as compare does), and record it; the
    numbers are the API's on that copy."""
    from fastmtl.cli import main
    from fastmtl.compare import centre_sample
    from fastmtl.evaluate import evaluate, one_shot_runs
    from fastmtl.gbml import freeze_batch_stats
    ck, out, ev = tmp_path / "ck", tmp_path / "train.json", tmp_path / "eval.json"
    assert main(["train", "--method", "protonet", "--data", "synthetic", "--epochs", "1",
                 "--no-val", "--tasks-per-epoch", "4", "--tasks-per-step", "2", "--n-way", "5",
                 "--eval-episodes", "6", "--shots", "1", "--checkpoint-dir", str(ck),
                 "--out", str(out)]) == 0
    trained = json.loads(out.read_text())
    assert trained["batchnorm"].startswith("statistics of")
    assert main(["eval", "--checkpoint", str(ck / "final.pt"), "--episodes", "6",
                 "--shots", "1", "--out", str(ev)]) == 0
    got = json.loads(ev.read_text())
    assert got["batchnorm"] == trained["batchnorm"]
    assert got["results"][0]["mean"] == trained["results"][0]["mean"]   # the same copy
    state = fastmtl.checkpoint.load(str(ck / "final.pt"))
    net = fastmtl.classifier.backbone_from_checkpoint(state)
    run = state["run"]
    train = registry.load_dataset("synthetic", None, run.get("train_split", "train"),
                                  image_size=run.get("image_size"),
                                  seed=run.get("data_seed", 0), channels=run.get("channels", 3))
    test = registry.load_dataset("synthetic", None, "test", image_size=run.get("image_size"),
                                 seed=run.get("data_seed", 0), channels=run.get("channels", 3))
    frozen = freeze_batch_stats(net, centre_sample(train, 0).tensor())
    want = evaluate(frozen, test, n_way=5, k_shot=1, n_query=15, episodes=6, seed=0,
                    progress=False)
    assert got["results"][0]["mean"] == want["mean"]
    # Lake's one-shot runs too (their 800 images were embedded 256 a batch, each batch
    # normalized on its own, mixing runs)
    runs = write_runs_zip(tmp_path / "all_runs.zip", n_runs=2, n_way=5)
    assert main(["eval", "--checkpoint", str(ck / "final.pt"), "--omniglot-runs", str(runs),
                 "--out", str(ev)]) == 0
    got = json.loads(ev.read_text())
    assert got["batchnorm"] == trained["batchnorm"]
    want_runs = one_shot_runs(frozen, runs, image_size=run.get("image_size") or 28)
    for key in ("nn_errors", "logistic_errors"):
        assert got["results"][key] == want_runs[key]
    # FewShotClassifier.from_checkpoint with norm_images: the same frozen copy
    sample = centre_sample(train, 0).tensor()
    clf = fastmtl.FewShotClassifier.from_checkpoint(str(ck / "final.pt"), device="cpu",
                                                    norm_images=sample)
    x = test.tensor()[:9]
    torch.testing.assert_close(clf.features(x), F.normalize(frozen(x), dim=1))
