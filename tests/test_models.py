import copy

import pytest
import torch
from torch.func import functional_call, grad, vmap

from fastmtl.models import conv4, feature_dim, resnet12
from fastmtl.models.resnet12 import _drop_block

SHAPES = [(1, 28, 28), (3, 32, 32), (3, 84, 84)]
CONV4_DIMS = {28: 64, 32: 256, 84: 1600}
# Narrow widths keep the behavioural tests fast; the shape tests use the real widths.
NARROW = (4, 6, 8, 10)


def _images(batch, shape, seed=0):
    return torch.randn((batch,) + shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("batch", [1, 3])
def test_conv4_output_shape(shape, batch):
    net = conv4(in_channels=shape[0]).eval()
    with torch.no_grad():
        out = net(_images(batch, shape))
    assert out.shape == (batch, CONV4_DIMS[shape[1]])
    assert feature_dim(net, shape) == CONV4_DIMS[shape[1]]


def _textbook_conv4(net):
    """The same weights in the textbook Conv-4: conv - BN - ReLU - pool, NCHW, float64."""
    ref = copy.deepcopy(net)
    ref.channels_last = False
    ref = ref.double()
    for block in ref.blocks:
        block[2], block[3] = block[3], block[2]
    return ref


@pytest.mark.parametrize("channels_last", [None, True, False])
@pytest.mark.parametrize("batch,shape", [(5, (1, 28, 28)), (3, (3, 20, 20)), (2, (1, 16, 23))])
def test_conv4_fast_forms_equal_the_textbook_block(channels_last, batch, shape):
    """Pool-before-ReLU and channels-last compute the textbook Conv-4 (float64 reference):
    outputs, gradients, and second-order gradients (MAML's), on odd sizes too."""
    torch.manual_seed(batch)
    net = conv4(in_channels=shape[0], hidden=6, out_channels=5, channels_last=channels_last)
    for m in net.modules():         # non-trivial affine parameters
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    ref = _textbook_conv4(net)
    assert [b[2].__class__.__name__ for b in net.blocks] == ["MaxPool2d"] * 4
    x = _images(batch, shape, seed=batch)
    out = net(x)
    want = ref(x.double())
    assert out.is_contiguous()
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5)
    for model, inp in ((net, x), (ref, x.double())):
        params = list(model.parameters())
        loss = model(inp).square().sum()
        g = torch.autograd.grad(loss, params, create_graph=True)
        gg = torch.autograd.grad(sum((t * t).sum() for t in g), params)
        model.result = [t.detach().double() for t in (*g, *gg)]
    for got, exp in zip(net.result, ref.result):
        assert ((got - exp).abs().max() / exp.abs().max().clamp_min(1e-12)) < 1e-3


def test_conv4_weights_follow_their_device_layout():
    """Channels-last weights on the CPU where "auto" (oneDNN takes the NHWC path only when
    the weights are NHWC too, also the one-channel first layer), NCHW when told."""
    auto, nchw = conv4(), conv4(channels_last=False)
    for net, fmt in ((auto, torch.channels_last), (nchw, torch.contiguous_format)):
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                assert m.weight.stride() == torch.empty_like(m.weight, memory_format=fmt).stride()
    # a load keeps the layout; the features are the same either way
    nchw.load_state_dict(auto.state_dict())
    x = _images(4, (1, 28, 28))
    torch.testing.assert_close(auto(x), nchw(x), rtol=1e-4, atol=1e-5)
    assert auto.blocks[1][0].weight.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="channels_last"):
        conv4(channels_last="yes")


@pytest.mark.parametrize("shape", SHAPES)
def test_resnet12_output_shape(shape):
    torch.manual_seed(0)
    net = resnet12(in_channels=shape[0]).eval()
    with torch.no_grad():
        for batch in (1, 2):
            out = net(_images(batch, shape))
            assert out.shape == (batch, 640) and torch.isfinite(out).all()
    assert feature_dim(net, shape) == 640


@pytest.mark.parametrize("shape,dim", [((1, 28, 28), 10), ((3, 32, 32), 40), ((3, 84, 84), 250)])
def test_resnet12_without_avg_pool_flattens_the_last_map(shape, dim):
    net = resnet12(in_channels=shape[0], channels=NARROW, avg_pool=False)
    assert feature_dim(net, shape) == dim
    net.train()
    assert net(_images(2, shape)).shape == (2, dim)  # DropBlock on 1x1, 2x2 and 5x5 maps


def test_feature_dim_restores_modes_and_leaves_state_alone():
    net = resnet12(in_channels=1, channels=NARROW).train()
    net.layers[0].eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert feature_dim(net, (1, 28, 28)) == NARROW[-1]
    assert net.training and not net.layers[0].training and net.layers[1].training
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)
    # Batch norms without running statistics (as prepared for vmap) still work.
    bare = copy.deepcopy(conv4())
    torch.func.replace_all_batch_norm_modules_(bare)
    assert feature_dim(bare, (1, 28, 28)) == 64
    with pytest.raises(ValueError, match="image_shape"):
        feature_dim(net, (28, 28))


@pytest.mark.parametrize("make", [lambda: conv4(in_channels=3), lambda: resnet12(channels=NARROW)])
def test_input_errors(make):
    net = make()
    with pytest.raises(ValueError, match="input channels"):
        net(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="at least 16"):
        net(torch.randn(2, 3, 12, 12))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        net(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="floating"):
        net(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


def test_dropblock_only_in_training():
    torch.manual_seed(0)
    net = resnet12(channels=NARROW, dropblock_ramp=0)
    x = _images(4, (3, 32, 32))
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x), net(x), rtol=0, atol=0)
    net.train()
    with torch.no_grad():
        torch.manual_seed(1)
        a = net(x)
        torch.manual_seed(2)
        b = net(x)
        torch.manual_seed(1)
        a_again = net(x)
    assert not torch.equal(a, b)
    torch.testing.assert_close(a, a_again, rtol=0, atol=0)
    # Without any dropping, train mode is deterministic: the randomness above is the drops'.
    quiet = resnet12(channels=NARROW, drop_rate=0.0).train()
    torch.testing.assert_close(quiet(x), quiet(x), rtol=0, atol=0)


def test_drop_block_mask():
    torch.manual_seed(0)
    x = torch.ones(64, 8, 10, 10)
    out = _drop_block(x, 0.1, 5)
    dropped = out == 0
    # Kept values are rescaled so the batch mean is kept.
    assert torch.allclose(out.mean(), torch.tensor(1.0), atol=1e-5)
    # Ghiasi's seed rate ignores block overlaps, so a bit less than `rate` is dropped.
    assert 0.06 < dropped.float().mean() < 0.11
    # Drops come in whole blocks: any dropped pixel lies inside a fully dropped 5x5 window.
    windows = (torch.nn.functional.avg_pool2d(dropped.float(), 5, stride=1) == 1).float()
    covered = torch.nn.functional.max_pool2d(
        torch.nn.functional.pad(windows, (4, 4, 4, 4)), 5, stride=1) > 0
    assert torch.equal(covered, dropped)
    # Maps smaller than the block drop whole channel maps.
    small = _drop_block(torch.ones(256, 16, 2, 2), 0.1, 5)
    per_map = (small == 0).flatten(2).float().mean(-1)
    assert set(per_map.unique().tolist()) <= {0.0, 1.0}
    assert 0.07 < per_map.mean() < 0.13
    assert _drop_block(torch.ones(4, 4, 1, 1), 0.1, 5).shape == (4, 4, 1, 1)


def test_dropblock_ramp_counts_training_calls_and_is_saved():
    net = resnet12(in_channels=1, channels=NARROW, dropblock_ramp=4)
    x = _images(2, (1, 28, 28))
    net.eval()
    net(x)
    assert net.dropblock_step == 0
    net.train()
    for _ in range(6):
        net(x)
    assert net.dropblock_step == 4  # frozen at the end of the ramp
    assert net.layers[2].dropblock.current_rate() == pytest.approx(0.1)
    net.dropblock_step = 2
    assert net.layers[3].dropblock.current_rate() == pytest.approx(0.05)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    fresh = resnet12(in_channels=1, channels=NARROW, dropblock_ramp=4)
    fresh.load_state_dict(state)
    assert fresh.dropblock_step == 2


@pytest.mark.parametrize("name", ["conv4", "resnet12"])
def test_gradients_reach_every_parameter(name):
    torch.manual_seed(0)
    net = conv4() if name == "conv4" else resnet12(in_channels=1, channels=NARROW)
    net.train()
    net(_images(4, (1, 28, 28))).square().mean().backward()
    for pname, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", ["conv4", "resnet12"])
@pytest.mark.parametrize("train", [False, True])
def test_functional_call_matches_module(name, train):
    torch.manual_seed(0)
    net = conv4(in_channels=3) if name == "conv4" else resnet12(channels=NARROW, dropblock_ramp=0)
    net.train(train)
    x = _images(3, (3, 32, 32))
    params = {k: v.detach().clone().requires_grad_() for k, v in net.named_parameters()}
    torch.manual_seed(1)
    out_module = net(x)
    torch.manual_seed(1)
    out_func = functional_call(net, params, (x,))
    torch.testing.assert_close(out_func, out_module, rtol=0, atol=0)
    out_func.sum().backward()
    assert all(p.grad is not None for p in params.values())


def _for_vmap(net):
    # vmap cannot update running statistics shared by all tasks: per-task batch statistics.
    net = copy.deepcopy(net)
    torch.func.replace_all_batch_norm_modules_(net)
    return net.train()


def _vmapped_matches_loop(net, shape):
    params = {k: v.detach() for k, v in net.named_parameters()}
    tasks = torch.stack([_images(5, shape, seed=1), _images(5, shape, seed=2)])
    out = vmap(lambda x: functional_call(net, params, (x,)))(tasks)
    loop = torch.stack([functional_call(net, params, (x,)) for x in tasks])
    torch.testing.assert_close(out, loop, rtol=1e-5, atol=1e-5)
    return params, tasks


def test_vmap_over_tasks_conv4_batch_statistics():
    torch.manual_seed(0)
    net = _for_vmap(conv4())
    params, tasks = _vmapped_matches_loop(net, (1, 28, 28))
    # A MAML-style inner step: per-task gradients of per-task losses, vmapped.
    def loss(p, x):
        return functional_call(net, p, (x,)).square().mean()
    grads = vmap(grad(loss), in_dims=(None, 0))(params, tasks)
    second = grad(loss)(params, tasks[1])
    for k, g in grads.items():
        assert g.shape == (2,) + params[k].shape
        torch.testing.assert_close(g[1], second[k], rtol=1e-4, atol=1e-6)


def test_vmap_over_tasks_resnet12():
    torch.manual_seed(0)
    _vmapped_matches_loop(_for_vmap(resnet12(channels=NARROW, drop_rate=0.0)), (3, 32, 32))
    # With dropout and DropBlock on, vmap needs to be told how to draw the masks.
    net = _for_vmap(resnet12(channels=NARROW, dropblock_ramp=0))
    params = {k: v.detach() for k, v in net.named_parameters()}
    tasks = _images(2 * 5, (3, 32, 32)).view(2, 5, 3, 32, 32)
    out = vmap(lambda x: functional_call(net, params, (x,)), randomness="different")(tasks)
    assert out.shape == (2, 5, NARROW[-1]) and torch.isfinite(out).all()


def test_model_arguments_are_checked_and_specs_stay_plain(tmp_path):
    """An API audit's cases: junk widths built models ("8888" as four 8s, 8.7 as 8,
    avg_pool="no" as True), and a numpy width made a classifier file that would not load."""
    import numpy as np

    from fastmtl import FewShotClassifier
    for kwargs, needle in ((dict(hidden=True), "hidden"), (dict(in_channels="1"), "in_channels"),
                           (dict(out_channels=0), "out_channels")):
        with pytest.raises(ValueError, match=needle):
            conv4(**kwargs)
    for kwargs, needle in ((dict(channels="8888"), "channels"),
                           (dict(channels=(8.7, 8, 8, 8)), r"channels\[0\]"),
                           (dict(channels=(8, 8, 8)), "channels"),
                           (dict(avg_pool="no"), "avg_pool"), (dict(drop_rate=1.0), "drop_rate"),
                           (dict(in_channels=0), "in_channels")):
        with pytest.raises(ValueError, match=needle):
            resnet12(**kwargs)
    net = conv4(in_channels=1, hidden=8, out_channels=np.int64(16))
    assert type(net.spec["out_channels"]) is int
    for shape in ("128", (1, 28.9, 28), (1, 28)):
        with pytest.raises(ValueError, match="image_shape"):
            feature_dim(net, shape)
    with pytest.raises(ValueError, match="backbone"):
        feature_dim(None, (1, 28, 28))
    clf = FewShotClassifier(net, image_size=28, channels=1, device="cpu")
    clf.fit(torch.randn(4, 1, 28, 28), ["a", "a", "b", "b"])
    clf.save(str(tmp_path / "c.pt"))
    assert FewShotClassifier.load(str(tmp_path / "c.pt")).classes_.tolist() == ["a", "b"]
