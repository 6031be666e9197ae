"""Conv-4: the four-block convolutional backbone of MAML and Prototypical Networks."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, Self

import torch
from torch import nn

from .. import checks

__all__ = ["Conv4", "conv4"]

# Four 2x max-pools: anything smaller than 16 pixels would pool down to nothing.
_MIN_SIZE = 16


class Conv4(nn.Module):
    """Four blocks of conv3x3 (padding 1) - BatchNorm - ReLU - MaxPool(2), then flatten.

    Input (B, C, H, W) float; output (B, out_channels * (H // 16) * (W // 16)):
    64 for 28x28, 256 for 32x32, 1600 for 84x84 with the default widths.

    Two ways of computing the same function faster (both exact: the outputs and
    gradients equal the textbook form's, see tests/test_models.py): each block pools
    before its ReLU (max-pooling and ReLU commute, and the ReLU then runs on a quarter
    of the values), and on the CPU the activations are channels-last (NHWC), where
    oneDNN's convolutions and the pooling are vectorized over channels
    (``benchmarks/results/conv4_layout_cpu.json``: 1.4-1.9x a forward + backward
    on Conv-4 28x28). The weights carry the layout (a convolution with channels-last
    weights returns channels-last activations); on other devices they stay NCHW unless
    asked (not measured there).

    Args:
        in_channels: image channels (1 for Omniglot, 3 for colour).
        hidden: width of the first three blocks.
        out_channels: width of the last block.
        channels_last: run the blocks channels-last: None (default) on the CPU only,
            True or False everywhere.

    Raises:
        ValueError: a channel count below 1; in forward, an input of the wrong shape.

    Example:
        >>> import torch
        >>> Conv4(in_channels=1)(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 64])
    """

    def __init__(self, in_channels: int = 1, hidden: int = 64, out_channels: int = 64,
                 channels_last: bool | None = None):
        super().__init__()
        for name, count in (("in_channels", in_channels), ("hidden", hidden),
                            ("out_channels", out_channels)):
            checks.integer(name, count, 1)
        # Plain ints (numpy integers too), so the spec a checkpoint stores loads again.
        in_channels, hidden, out_channels = int(in_channels), int(hidden), int(out_channels)
        if channels_last not in (None, True, False):
            raise ValueError(f"channels_last must be None, True or False, got {channels_last!r}")
        self.in_channels = in_channels
        self.channels_last = channels_last
        # What the backbone is, as plain values: checkpoints store it and
        # fastmtl.registry.build_backbone(spec) rebuilds it (no pickled code).
        self.spec: dict[str, Any] = {"name": "conv4", "in_channels": in_channels,
                                     "hidden": hidden, "out_channels": out_channels}
        widths = [in_channels, hidden, hidden, hidden, out_channels]
        self.blocks = nn.Sequential(*(_block(a, b)
                                      for a, b in zip(widths[:-1], widths[1:], strict=True)))
        _init_weights(self)
        self._lay_out()

    def _channels_last(self, device: torch.device) -> bool:
        return device.type == "cpu" if self.channels_last is None else self.channels_last

    def _lay_out(self) -> None:
        """The convolutions' weights in the layout their device runs channels-last with
        (oneDNN takes the channels-last path only when the weights are channels-last too)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fmt = (torch.channels_last if self._channels_last(m.weight.device)
                       else torch.contiguous_format)
                # Compare strides: with one input channel a weight is "contiguous" in both
                # formats, yet oneDNN reads its strides (NCHW ones make the first layer's
                # output, and so every later layer, NCHW).
                if m.weight.stride() != torch.empty_like(m.weight, memory_format=fmt).stride():
                    m.weight.data = m.weight.data.to(memory_format=fmt)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], *args: Any,
               **kwargs: Any) -> Self:
        # .to(device) / .cuda() / .double(): the weights' layout follows their new device.
        super()._apply(fn, *args, **kwargs)
        self._lay_out()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.blocks(x).flatten(1)

    def check_input(self, x: torch.Tensor) -> None:
        """ValueError unless ``x`` is a (B, in_channels, H, W) float batch of images of at
        least 16x16 (what :meth:`forward` checks; for code that runs the blocks itself).

        Example:
            >>> Conv4().check_input(torch.zeros(2, 1, 28, 28))     # fine: returns None
        """
        _check_input(x, self.in_channels, _MIN_SIZE)

    def runs_channels_last(self, device: torch.device) -> bool:
        """Whether the blocks run channels-last on ``device`` (see ``channels_last``).

        Example:
            >>> Conv4(channels_last=False).runs_channels_last(torch.device("cpu"))
            False
        """
        return self._channels_last(device)


def conv4(in_channels: int = 1, hidden: int = 64, out_channels: int = 64,
          channels_last: bool | None = None) -> Conv4:
    """The MAML/ProtoNet Conv-4 backbone (see :class:`Conv4`).

    Args:
        in_channels, hidden, out_channels, channels_last: as :class:`Conv4`.

    Returns:
        a fresh :class:`Conv4`.

    Example:
        >>> conv4(in_channels=3, hidden=32, out_channels=32).in_channels
        3
    """
    return Conv4(in_channels, hidden, out_channels, channels_last)


def _block(cin: int, cout: int) -> nn.Sequential:
    # No conv bias: the BatchNorm right after it would cancel it. Pool, then ReLU: the
    # same function as ReLU then pool (both are monotone), on a quarter of the values.
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.MaxPool2d(2), nn.ReLU())


def _init_weights(net: nn.Module, negative_slope: float = 0.0) -> None:
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nonlinearity: Literal["leaky_relu", "relu"] = ("leaky_relu" if negative_slope
                                                            else "relu")
            nn.init.kaiming_normal_(m.weight, a=negative_slope, mode="fan_out",
                                    nonlinearity=nonlinearity)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _check_input(x: torch.Tensor, in_channels: int, min_size: int) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"expected images of shape (B, C, H, W), got {shape}")
    if not x.is_floating_point():
        raise ValueError(f"expected floating-point images, got {x.dtype}")
    if x.shape[1] != in_channels:
        raise ValueError(f"expected {in_channels} input channels, got {x.shape[1]} "
                         f"(images of shape {tuple(x.shape)})")
    if min(x.shape[-2:]) < min_size:
        raise ValueError(f"images must be at least {min_size}x{min_size}, got "
                         f"{x.shape[-2]}x{x.shape[-1]}")
