"""Backbones: Conv-4 and ResNet-12, plain ``nn.Module``s mapping (B, C, H, W) images to (B, d)."""
from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import nn

from .conv4 import Conv4, conv4
from .resnet12 import ResNet12, resnet12

__all__ = ["conv4", "resnet12", "Conv4", "ResNet12", "feature_dim"]


def feature_dim(backbone: nn.Module, image_shape: Sequence[int]) -> int:
    """Feature size d of ``backbone`` for images of shape (C, H, W), by one dummy forward.

    The forward runs in eval mode without gradients (running statistics and the DropBlock
    ramp are untouched) on the device and dtype of the backbone's parameters; the
    training mode of every submodule is restored afterwards.

    Args:
        backbone: any module mapping (B, C, H, W) images to (B, d) features.
        image_shape: (C, H, W) of one image.

    Returns:
        d, an int.

    Raises:
        ValueError: an ``image_shape`` that is not three positive sizes, or a backbone
            whose output is not (B, d).

    Example:
        >>> feature_dim(conv4(in_channels=1), (1, 28, 28))
        64
    """
    if not isinstance(backbone, nn.Module):
        raise ValueError(f"backbone must be an nn.Module, got {type(backbone).__name__}")
    ok = isinstance(image_shape, (tuple, list, torch.Size)) and len(image_shape) == 3 and all(
        isinstance(s, numbers.Integral) and not isinstance(s, bool) and int(s) >= 1
        for s in image_shape)
    if not ok:
        raise ValueError(f"image_shape must be three positive integers (C, H, W), got "
                         f"{image_shape!r}")
    shape = tuple(int(s) for s in image_shape)
    param = next(iter(backbone.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    modes = {m: m.training for m in backbone.modules()}
    backbone.eval()
    try:
        # Two images: a BatchNorm without running statistics (as under vmap) uses batch
        # statistics even in eval, which fail on a single 1x1 value per channel.
        with torch.no_grad():
            out = backbone(torch.zeros((2,) + shape, device=device, dtype=dtype))
    finally:
        for m, mode in modes.items():
            m.training = mode
    if out.dim() != 2:
        raise ValueError(f"backbone must return (B, d) features, got shape {tuple(out.shape)}")
    return int(out.shape[1])
