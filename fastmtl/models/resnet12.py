"""ResNet-12 as in MetaOptNet and RFS (Tian et al. 2020), with DropBlock (Ghiasi et al. 2018).

Regularization follows RFS: blocks 1-2 apply dropout (``drop_rate``) to their output,
blocks 3-4 apply DropBlock whose drop rate ramps linearly from 0 to ``drop_rate`` over
``dropblock_ramp`` training forward calls (RFS and MetaOptNet hard-code 40,000). The ramp
counter advances once per forward call in training mode (RFS also counts eval calls;
counting them would make evaluation change training). ``dropblock_ramp=0`` gives the
fixed rate from the first step. The counter is saved in ``state_dict`` so a resumed run
continues the ramp.

Under ``torch.vmap`` in training mode, dropout and DropBlock sample random masks, so call
``vmap(..., randomness="different")`` (or ``"same"``), or use ``drop_rate=0``.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import checks
from .conv4 import _check_input, _init_weights

__all__ = ["ResNet12", "resnet12"]

_SLOPE = 0.1
# Four 2x max-pools (floor mode, as RFS): 16 pixels is the least that keeps one.
_MIN_SIZE = 16


class ResNet12(nn.Module):
    """Four residual blocks (three conv3x3-BN-LeakyReLU(0.1), 1x1 conv+BN shortcut, max-pool 2).

    Output: (B, channels[-1]) after adaptive average pooling (640 with the default widths,
    for any input of at least 16x16), or with ``avg_pool=False`` the flattened last map:
    640 * 5 * 5 for 84x84, 640 * 2 * 2 for 32x32, 640 for 28x28.

    Args:
        in_channels: image channels.
        channels: widths of the four blocks.
        drop_rate: DropBlock rate (reached after ``dropblock_ramp`` training forwards).
        dropblock_size: DropBlock's block size in the last two blocks.
        avg_pool: pool the last map to one vector (else flatten it).
        dropblock_ramp: training forwards over which the drop rate ramps up.

    Raises:
        ValueError: bad widths, rates or sizes; in forward, an input of the wrong shape.

    Example:
        >>> import torch
        >>> ResNet12(channels=(8, 8, 8, 16))(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 16])
    """

    def __init__(self, in_channels: int = 3, channels: Sequence[int] = (64, 160, 320, 640),
                 drop_rate: float = 0.1, dropblock_size: int = 5, avg_pool: bool = True, *,
                 dropblock_ramp: int = 40_000):
        super().__init__()
        if isinstance(channels, (str, bytes)) or not hasattr(channels, "__len__") or \
                len(channels) != 4:
            raise ValueError(f"channels must be four widths, got {channels!r}")
        for i, c in enumerate(channels):
            checks.integer(f"channels[{i}]", c, 1)
        checks.integer("in_channels", in_channels, 1)
        checks.number("drop_rate", drop_rate, 0.0, inclusive=True)
        if not drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
        checks.integer("dropblock_size", dropblock_size, 1)
        checks.integer("dropblock_ramp", dropblock_ramp, 0)
        checks.one_of("avg_pool", avg_pool, (True, False))
        # Plain values (numpy numbers too), so the spec a checkpoint stores loads again.
        widths = tuple(int(c) for c in channels)
        in_channels, drop_rate, avg_pool = int(in_channels), float(drop_rate), bool(avg_pool)
        dropblock_size, dropblock_ramp = int(dropblock_size), int(dropblock_ramp)
        self.in_channels = in_channels
        self.avg_pool = avg_pool
        # What the backbone is, as plain values (see Conv4.spec).
        self.spec: dict[str, Any] = {
            "name": "resnet12", "in_channels": in_channels, "channels": list(widths),
            "drop_rate": drop_rate, "dropblock_size": dropblock_size, "avg_pool": avg_pool,
            "dropblock_ramp": dropblock_ramp}
        widths = (in_channels,) + widths
        self.layers = nn.Sequential(*(
            _ResBlock(widths[i], widths[i + 1], drop_rate,
                      _DropBlock(drop_rate, dropblock_size, dropblock_ramp) if i >= 2 else None)
            for i in range(4)))
        _init_weights(self, negative_slope=_SLOPE)

    @property
    def dropblock_step(self) -> int:
        """Training forward calls seen by the DropBlock ramp; settable (e.g. to resume)."""
        last = self.layers[-1]
        assert isinstance(last, _ResBlock) and last.dropblock is not None  # layers 3 and 4 drop
        return last.dropblock.step

    @dropblock_step.setter
    def dropblock_step(self, step: int) -> None:
        for m in self.modules():
            if isinstance(m, _DropBlock):
                m.step = int(step)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.in_channels, _MIN_SIZE)
        x = self.layers(x)
        if self.avg_pool:
            x = F.adaptive_avg_pool2d(x, 1)
        return x.flatten(1)


def resnet12(in_channels: int = 3, channels: Sequence[int] = (64, 160, 320, 640),
             drop_rate: float = 0.1,
             dropblock_size: int = 5, avg_pool: bool = True, *,
             dropblock_ramp: int = 40_000) -> ResNet12:
    """The RFS/MetaOptNet ResNet-12 backbone (see :class:`ResNet12` and the module notes).

    Args:
        as :class:`ResNet12`.

    Returns:
        a fresh :class:`ResNet12`.

    Example:
        >>> resnet12(in_channels=1, channels=(8, 8, 8, 16)).in_channels
        1
    """
    return ResNet12(in_channels, channels, drop_rate, dropblock_size, avg_pool,
                    dropblock_ramp=dropblock_ramp)


def _conv3x3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1, bias=False)


class _ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, drop_rate: float, dropblock: _DropBlock | None):
        super().__init__()
        self.conv1, self.bn1 = _conv3x3(cin, cout), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = _conv3x3(cout, cout), nn.BatchNorm2d(cout)
        self.conv3, self.bn3 = _conv3x3(cout, cout), nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.drop_rate = drop_rate
        self.dropblock = dropblock

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Out-of-place throughout: vmap cannot write batched values into unbatched inputs.
        out = F.leaky_relu(self.bn1(self.conv1(x)), _SLOPE)
        out = F.leaky_relu(self.bn2(self.conv2(out)), _SLOPE)
        out = self.bn3(self.conv3(out))
        out = F.max_pool2d(F.leaky_relu(out + self.shortcut(x), _SLOPE), 2)
        if self.dropblock is not None:
            return self.dropblock(out)
        if self.training and self.drop_rate > 0:
            # Guarded: even p=0 dropout draws random numbers, which vmap refuses by default.
            out = F.dropout(out, self.drop_rate, training=True)
        return out


class _DropBlock(nn.Module):
    def __init__(self, drop_rate: float, block_size: int, ramp: int):
        super().__init__()
        self.drop_rate, self.block_size, self.ramp = drop_rate, block_size, ramp
        # A Python int, not a buffer: an in-place buffer update would be a side effect
        # under torch.func; it reaches state_dict through get/set_extra_state.
        self.step = 0

    def current_rate(self) -> float:
        if self.ramp == 0:
            return self.drop_rate
        return self.drop_rate * min(1.0, self.step / self.ramp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_rate == 0:
            return x
        # Counted before use, as RFS does; frozen once the ramp is done so a compiled
        # model stops seeing a changing constant.
        if self.step < self.ramp:
            self.step += 1
        rate = self.current_rate()
        return _drop_block(x, rate, self.block_size) if rate > 0 else x

    def get_extra_state(self) -> torch.Tensor:
        # A tensor rather than a dict so state-dict idioms (v.clone(), assert_close) work.
        return torch.tensor(self.step, dtype=torch.int64)

    def set_extra_state(self, state: Any) -> None:
        self.step = int(state)

    def extra_repr(self) -> str:
        return f"drop_rate={self.drop_rate}, block_size={self.block_size}, ramp={self.ramp}"


def _drop_block(x: torch.Tensor, rate: float, block_size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    # Maps smaller than the block: shrink the block to the map, so a block drops the
    # whole channel map rather than nothing.
    bs = min(block_size, h, w)
    valid_h, valid_w = h - bs + 1, w - bs + 1
    # Seed rate so that the expected dropped fraction is `rate` (Ghiasi et al., eq. 1).
    gamma = rate * h * w / (bs * bs * valid_h * valid_w)
    seeds = (torch.rand(x.shape[0], x.shape[1], valid_h, valid_w, device=x.device)
             < gamma).to(x.dtype)
    # A seed marks a block's top-left corner (as in RFS); padding by bs - 1 and a stride-1
    # max-pool spreads every seed over its bs x bs block and restores the size h x w.
    dropped = F.max_pool2d(F.pad(seeds, (bs - 1,) * 4), bs, stride=1)
    keep = 1.0 - dropped
    # Rescale by the kept fraction of the whole batch (RFS), guarding an all-dropped mask.
    return x * keep * (keep.numel() / keep.sum().clamp_min(1.0))
