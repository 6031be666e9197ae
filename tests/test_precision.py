"""precision="bf16": the backbone runs under bfloat16 autocast, heads and losses in float32.

On the CPU, autocast covers the per-task loops and MTL's batched backbone; inside
``torch.func.vmap`` CPU autocast does not apply (a PyTorch limitation; on CUDA it does),
so the GBML cases here use ``vectorize=False``; MAML's stacked form (no vmap) runs under
it too. The GPU check runs the CUDA side.
"""
from __future__ import annotations

import pytest
import torch

import fastmtl
from fastmtl.compare import config_for
from fastmtl.training import backbone_autocast

SMALL = {"mtl": dict(batch_size=24),
         "maml": dict(tasks_per_step=2, n_way=5, n_query=2, vectorize=False),
         "anil": dict(tasks_per_step=2, n_way=5, n_query=2, vectorize=False),
         "r2d2": dict(tasks_per_step=1, n_way=5, n_query=2, vectorize=False),
         "protonet": dict(tasks_per_step=1, n_way=5, n_query=2, vectorize=False)}


def _step(method, precision, glyphs):
    cls, cfg = config_for(method, dict(SMALL[method], precision=precision, max_minutes=None))
    torch.manual_seed(0)
    backbone = fastmtl.models.conv4(hidden=8)
    seen = []
    backbone.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    trainer = cls(backbone, cfg)
    batch = next(iter(trainer.prepare(glyphs)))
    loss, acc, _ = trainer.train_step(batch)
    grads = [p.grad for p in backbone.parameters() if p.grad is not None]
    return loss, seen, grads, backbone


@pytest.fixture(scope="module")
def glyphs():
    return fastmtl.data.SyntheticGlyphs(12, 8, seed=0)


@pytest.mark.parametrize("method", list(SMALL))
def test_bf16_runs_the_backbone_in_bfloat16_and_keeps_fp32_weights(method, glyphs):
    loss32, seen32, _, _ = _step(method, "fp32", glyphs)
    loss16, seen16, grads, backbone = _step(method, "bf16", glyphs)
    assert set(seen32) == {torch.float32}
    assert torch.bfloat16 in seen16, seen16
    assert all(p.dtype == torch.float32 for p in backbone.parameters())
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    # The same step in bfloat16: close to the float32 loss, not equal to it.
    assert loss16 == pytest.approx(loss32, rel=5e-2, abs=5e-2)


def test_heads_leave_the_autocast(glyphs):
    from fastmtl.gbml._common import LinearHead
    head = LinearHead(8, 3)
    with backbone_autocast("bf16", torch.device("cpu")):
        out = head(torch.randn(4, 8, dtype=torch.bfloat16))
    assert out.dtype == torch.float32


@pytest.mark.parametrize("config", [fastmtl.MTLConfig, fastmtl.gbml.MAMLConfig,
                                    fastmtl.gbml.ProtoNetConfig])
def test_precision_is_checked(config):
    with pytest.raises(ValueError, match="precision"):
        config(precision="fp16").validate()


def test_bf16_reaches_maml_stacked_form(glyphs):
    """MAML's vectorized form on a Conv-4 (fastmtl.gbml._stacked, no vmap) runs its
    convolutions under the autocast as well: a different loss, close to float32's."""
    losses = {}
    for precision in ("fp32", "bf16"):
        cls, cfg = config_for("maml", dict(SMALL["maml"], vectorize=True, precision=precision,
                                           max_minutes=None))
        torch.manual_seed(0)
        trainer = cls(fastmtl.models.conv4(hidden=8), cfg)
        batch = next(iter(trainer.prepare(glyphs)))
        assert trainer._program() is not None        # the stacked form, not vmap
        losses[precision] = trainer.train_step(batch)[0]
        assert all(torch.isfinite(p.grad).all() and p.grad.dtype == torch.float32
                   for p in trainer.model.parameters())
    assert losses["bf16"] != losses["fp32"]
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=5e-2, abs=5e-2)
