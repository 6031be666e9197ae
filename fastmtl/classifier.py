"""FewShotClassifier: fit a new head on a few labelled images, then classify new ones.

The paper's test-time adaptation as a scikit-learn-style estimator over a trained
backbone: features of the frozen backbone (eval mode, L2-normalized, exactly as
:func:`fastmtl.evaluate` computes them for a backbone with running statistics), then the
logistic-regression head of :func:`fastmtl.adapt.fit_logistic` (C = 3 by default), or a
nearest-prototype head (cosine similarity to each class's mean feature). Images may be
file paths, PIL images, uint8 arrays (H, W) / (H, W, C) or float tensors (C, H, W)
already normalized; labels any hashable values.

A GBML backbone (batch-statistics BatchNorm, :mod:`fastmtl.gbml`) would normalize every
batch of images with that batch's own statistics, so a prediction would depend on which
images share its call (one image alone: its own statistics). The classifier freezes such
a backbone (:func:`fastmtl.gbml.freeze_batch_stats`) at the statistics of ``norm_images``
when given, else of the support images at each :meth:`FewShotClassifier.fit`: every image
is then normalized alike, whatever it is predicted with.
"""
from __future__ import annotations

import os
from collections.abc import Hashable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import checks, registry
from .adapt import fit_logistic
from .checkpoint import atomic_save, check_readable, safe_load
from .checkpoint import load as load_checkpoint
from .data.folder import read_image
from .evaluate import TOL

__all__ = ["FewShotClassifier", "backbone_from_checkpoint"]

_FORMAT = "fastmtl-classifier/1"


def backbone_from_checkpoint(state: dict[str, Any], path: str = "checkpoint") -> nn.Module:
    """The trained backbone of a fastmtl checkpoint dict (as :mod:`fastmtl.checkpoint`).

    The checkpoint must say which backbone it holds (``backbone_spec``: every backbone of
    :mod:`fastmtl.models` records its own, so a model trained through the CLI or the
    Python API rebuilds); a GBML checkpoint's backbone comes back with its
    batch-statistics norms.

    Raises:
        ValueError: no usable ``backbone_spec``, or a state that does not fit it.

    Example:
        >>> from fastmtl.models import conv4
        >>> net = conv4(in_channels=1)
        >>> state = {"backbone_spec": net.spec, "backbone": net.state_dict()}
        >>> type(backbone_from_checkpoint(state)).__name__
        'Conv4'
    """
    spec = state.get("backbone_spec")
    if not isinstance(spec, dict) or spec.get("name") not in registry.BACKBONE_NAMES:
        raise ValueError(f"{path!r} does not say which backbone it holds (backbone_spec "
                         f"{spec or None}); build it yourself and use FewShotClassifier(...)")
    if not isinstance(state.get("backbone"), dict):
        raise ValueError(f"{path!r} holds no backbone state; is it a fastmtl checkpoint?")
    net = registry.build_backbone(spec)
    if state.get("batchnorm") == "batch-statistics":
        from .gbml import use_batch_stats
        use_batch_stats(net)
    try:
        net.load_state_dict(state["backbone"])
    except RuntimeError as exc:
        raise ValueError(f"{path!r}: the backbone state does not fit {spec}: "
                         f"{str(exc).strip().splitlines()[0]}") from None
    return net


class FewShotClassifier:
    """Classify new images from a handful of labelled examples per class.

    Args:
        backbone: any ``nn.Module`` mapping (B, C, H, W) float images to (B, d) features.
        image_size: side of the square images the backbone takes.
        channels: 1 or 3.
        mean, std: per-channel normalization after scaling pixels to [0, 1] (as the
            backbone was trained).
        head: "logistic" (the paper's protocol) or "prototype".
        C: inverse L2 strength of the logistic head.
        device: where the backbone runs (None: CUDA when available, else CPU).
        batch_size: images per backbone call.
        norm_images: for a backbone with batch-statistics norms (a GBML checkpoint's):
            images (as :meth:`fit` takes them, at least two) whose statistics its norms
            use, e.g. a few hundred unlabelled images of the domain. None: the support
            images of each :meth:`fit` (few at 1-shot: 5 images give noisy statistics).

    Raises:
        ValueError: bad arguments; ``norm_images`` for a backbone without
            batch-statistics norms.

    Example:
        >>> import fastmtl, numpy as np
        >>> clf = fastmtl.FewShotClassifier(fastmtl.models.conv4(in_channels=1), image_size=28,
        ...                                 channels=1, mean=(0.5,), std=(0.5,))
        >>> imgs = np.random.default_rng(0).integers(0, 255, (6, 28, 28), dtype=np.uint8)
        >>> _ = clf.fit(list(imgs), ["a", "a", "a", "b", "b", "b"])
        >>> clf.predict(list(imgs[:2])).shape
        (2,)
    """

    def __init__(self, backbone: nn.Module, image_size: int, channels: int = 3,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 head: str = "logistic", C: float = 3.0,
                 device: torch.device | str | None = None, batch_size: int = 256,
                 norm_images: Sequence[Any] | None = None):
        if not isinstance(backbone, nn.Module):
            raise ValueError(f"backbone must be an nn.Module, got {type(backbone).__name__}")
        checks.integer("image_size", image_size, 1)
        checks.one_of("channels", channels, (1, 3))
        checks.one_of("head", head, ("logistic", "prototype"))
        checks.number("C", C)
        checks.integer("batch_size", batch_size, 1)
        self.mean = checks.per_channel("mean", mean, 0.0, channels)
        self.std = checks.per_channel("std", std, 1.0, channels, positive=True)
        self.device = _device(device)
        self.backbone = backbone.to(self.device).eval()
        self.image_size, self.channels, self.head, self.C = image_size, channels, head, C
        self.batch_size = batch_size
        self.classes_: np.ndarray | None = None
        self._weight: torch.Tensor | None = None
        self._bias: torch.Tensor | None = None
        # the module features() runs: the backbone, or a copy frozen at fixed statistics
        self._net: nn.Module = self.backbone
        self._fixed_norm = norm_images is not None
        if norm_images is not None:
            if not _has_batch_stats(self.backbone):
                raise ValueError("norm_images: the backbone has no batch-statistics norm "
                                 "(only a GBML backbone normalizes with given statistics)")
            self._net = _freeze(self.backbone, self._batch_tensor("norm_images", norm_images),
                                batch_size)

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path: str, head: str = "logistic", C: float = 3.0,
                        device: torch.device | str | None = None,
                        norm_images: Sequence[Any] | None = None) -> FewShotClassifier:
        """A classifier over the backbone of a fastmtl checkpoint (``final.pt``, ...).

        Image size, channels and normalization come from the checkpoint's record of its
        training data; ``norm_images`` as in the constructor (a GBML checkpoint only).

        Raises:
            ValueError: not a fastmtl checkpoint, or one that does not record them.
        """
        state = load_checkpoint(path, what="checkpoint")
        net = backbone_from_checkpoint(state, path)
        run = state.get("run") or {}
        missing = [k for k in ("image_size", "channels", "mean", "std") if run.get(k) is None]
        if missing:
            raise ValueError(f"checkpoint {path!r} does not record {missing} of its training "
                             f"data; use FewShotClassifier(backbone, image_size=..., ...)")
        return cls(net, run["image_size"], run["channels"], run["mean"], run["std"], head=head,
                   C=C, device=device, norm_images=norm_images)

    # -- the estimator ----------------------------------------------------------------------
    def fit(self, images: Sequence[Any], labels: Sequence[Hashable]) -> FewShotClassifier:
        """Fit the head on support ``images`` with ``labels`` (>= 2 classes). A backbone
        with batch-statistics norms is first frozen at the statistics of ``images`` as one
        batch (unless the classifier was given ``norm_images``).

        Returns:
            self.
        """
        values = _labels(labels)
        if len(values) != len(images):
            raise ValueError(f"labels must have one entry per image: {len(images)} images, "
                             f"{len(values)} labels")
        try:
            classes = sorted(set(values))
        except TypeError:
            classes = list(dict.fromkeys(values))
        if len(classes) < 2:
            raise ValueError(f"labels must name at least 2 classes, got {classes}")
        index = {c: i for i, c in enumerate(classes)}
        y = torch.tensor([index[v] for v in values], device=self.device)
        source: Any = images
        net = self._net
        if not self._fixed_norm and _has_batch_stats(self.backbone):
            source = self._batch_tensor("images", images)   # read once: statistics, features
            net = _freeze(self.backbone, source, self.batch_size)
        z = self._features(source, net)
        if not bool(torch.isfinite(z).all()):
            raise ValueError("images give non-finite features (NaN or infinite pixels?)")
        if self.head == "logistic":
            heads = fit_logistic(z[None], y[None], C=self.C, n_classes=len(classes),
                                 tol=TOL)
            weight, bias = heads.weight[0], heads.bias[0]
        else:
            onehot = F.one_hot(y, len(classes)).to(z.dtype)
            weight = F.normalize(onehot.T @ z, dim=1) * 10.0
            bias = torch.zeros(len(classes), device=z.device)
        # all at once, so a fit that fails leaves the classifier as it was
        self._net, self._weight, self._bias = net, weight, bias
        self.classes_ = _as_array(classes)
        return self

    def decision_function(self, images: Sequence[Any]) -> torch.Tensor:
        """Class scores (N, n_classes), columns in the order of ``classes_``."""
        if self._weight is None or self._bias is None:
            raise ValueError("call fit(support_images, labels) before predicting")
        z = self.features(images)
        if not bool(torch.isfinite(z).all()):
            raise ValueError("images give non-finite features (NaN or infinite pixels?)")
        dtype = torch.promote_types(z.dtype, self._weight.dtype)
        w, b = self._weight.to(z.device, dtype), self._bias.to(z.device, dtype)
        # The product of LogisticHeads.logits, so predictions equal fastmtl.evaluate's.
        return torch.baddbmm(b[None, :, None], w[None], z.to(dtype).T[None])[0].T

    def predict_proba(self, images: Sequence[Any]) -> np.ndarray:
        """Class probabilities (N, n_classes), columns in the order of ``classes_``."""
        return torch.softmax(self.decision_function(images).double(), 1).cpu().numpy()

    def predict(self, images: Sequence[Any]) -> np.ndarray:
        """The most probable class of each image (labels as given to ``fit``)."""
        scores = self.decision_function(images)
        classes = self.classes_
        assert classes is not None  # set with the head, by fit or load
        return classes[scores.argmax(1).cpu().numpy()]

    def features(self, images: Sequence[Any]) -> torch.Tensor:
        """L2-normalized backbone features (N, d) of ``images``, in batches, eval mode (a
        batch-statistics backbone: frozen as :meth:`fit` left it; before any fit without
        ``norm_images``, each batch normalized with its own statistics)."""
        return self._features(images, self._net)

    def _features(self, images: Sequence[Any], net: nn.Module) -> torch.Tensor:
        _check_sequence("images", images)
        out = []
        with torch.no_grad():
            for lo in range(0, len(images), self.batch_size):
                x = self._tensor(images[lo:lo + self.batch_size]).to(self.device, self._dtype)
                out.append(net(x).float())
        return F.normalize(torch.cat(out), dim=1)

    @property
    def _dtype(self) -> torch.dtype:
        return next((p.dtype for p in self.backbone.parameters()), torch.float32)

    def _batch_tensor(self, name: str, images: Sequence[Any]) -> torch.Tensor:
        """All of ``images`` as one normalized tensor on the device (ValueError naming
        ``name``), for the statistics of a batch-statistics backbone."""
        try:
            _check_sequence(name, images)
            x = torch.cat([self._tensor(images[lo:lo + self.batch_size])
                           for lo in range(0, len(images), self.batch_size)])
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}" if not str(exc).startswith(name) else str(exc)
                             ) from None
        if len(x) < 2:
            raise ValueError(f"{name}: statistics need at least two images, got {len(x)}")
        return x.to(self.device, self._dtype)

    def _tensor(self, images: Iterable[Any]) -> torch.Tensor:
        if isinstance(images, torch.Tensor) and images.dim() == 4:
            return self._checked(images)
        images = list(images)
        if all(isinstance(im, torch.Tensor) for im in images):
            bad = [tuple(im.shape) for im in images if im.dim() != 3]
            if bad:
                raise ValueError(f"image tensors must be (C, H, W), got {bad[0]}")
            return self._checked(torch.stack(images))
        want = (self.image_size, self.image_size) + (() if self.channels == 1
                                                     else (self.channels,))
        raw = np.empty((len(images),) + want, dtype=np.uint8)
        for i, im in enumerate(images):
            if isinstance(im, torch.Tensor):
                raise ValueError("give images all as tensors or all as paths/PIL/arrays")
            if isinstance(im, np.ndarray) and im.dtype == np.uint8 and im.shape == want:
                raw[i] = im                   # already converted: no Pillow round trip
            else:
                raw[i] = read_image(im, self.image_size, self.channels)
        # The arithmetic of FewShotDataset.tensor, so features equal fastmtl.evaluate's.
        x = torch.from_numpy(raw).float().div_(255.0)
        x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
        mean = torch.tensor(self.mean, dtype=x.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype).view(1, -1, 1, 1)
        return (x - mean) / std

    def _checked(self, x: torch.Tensor) -> torch.Tensor:
        """Image tensors as given: already normalized floats of this classifier's size."""
        want = (self.channels, self.image_size, self.image_size)
        if not x.is_floating_point() or tuple(x.shape[1:]) != want:
            raise ValueError(f"image tensors must be normalized floats (C, H, W) = {want}, "
                             f"got {x.dtype} {tuple(x.shape[1:])} (uint8 pixels: pass "
                             f"arrays or PIL images, which are scaled and normalized)")
        return x.float()

    # -- persistence ----------------------------------------------------------------------
    def save(self, path: str) -> None:
        """Save the backbone's weights and spec, the settings and the fitted head
        (atomically), as tensors and plain values only.

        Raises:
            ValueError: class labels that are not str, int, float or bool (only plain
                values are stored, so the file loads without running code).

        Example:
            >>> import os, tempfile, torch
            >>> from fastmtl.models import conv4
            >>> clf = FewShotClassifier(conv4(in_channels=1, hidden=8), image_size=28,
            ...                         channels=1, mean=(0.1,), std=(0.3,), device="cpu")
            >>> _ = clf.fit(torch.randn(4, 1, 28, 28), ["a", "a", "b", "b"])
            >>> path = os.path.join(tempfile.mkdtemp(), "clf.pt")
            >>> clf.save(path)
            >>> FewShotClassifier.load(path).classes_.tolist()
            ['a', 'b']
        """
        classes = None if self.classes_ is None else [_plain(c) for c in self.classes_]
        state = {"format": _FORMAT, "backbone_spec": getattr(self.backbone, "spec", None),
                 "backbone": self.backbone.state_dict(),
                 "batchnorm": "batch-statistics" if _has_batch_stats(self.backbone)
                 else "running",
                 "settings": dict(image_size=self.image_size, channels=self.channels,
                                  mean=list(self.mean), std=list(self.std), head=self.head,
                                  C=self.C),
                 "classes": classes,
                 "weight": None if self._weight is None else self._weight.cpu(),
                 "bias": None if self._bias is None else self._bias.cpu(),
                 "norm_statistics": _norm_statistics(self._net, self.backbone),
                 "fixed_norm": self._fixed_norm}
        atomic_save(state, path)

    @classmethod
    def load(cls, path: str, device: torch.device | str | None = None,
             backbone: nn.Module | None = None) -> FewShotClassifier:
        """A classifier saved by :meth:`save`, head included; read with
        ``weights_only=True``, so the file cannot run code.

        Args:
            path: the file.
            device: where the backbone runs (None: CUDA when available, else CPU).
            backbone: a fresh module of the saved backbone's architecture, needed only
                when it is not a fastmtl model (its spec was not saved); its weights are
                loaded from the file.

        Raises:
            ValueError: not a saved FewShotClassifier, or no way to rebuild its backbone.
        """
        check_readable(path, "classifier")
        state = safe_load(path, "classifier", "a fastmtl checkpoint (a saved FewShotClassifier)")
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise ValueError(f"classifier {path!r} is not a saved FewShotClassifier")
        if "module" in state and state.get("backbone") is None:
            raise ValueError(f"classifier {path!r} was saved by an older fastmtl with the "
                             f"whole backbone pickled, which is no longer loaded: re-save "
                             f"it with this version (FewShotClassifier.save)")
        _check_saved(state, path)
        if backbone is not None:
            try:
                backbone.load_state_dict(state["backbone"])
            except RuntimeError as exc:
                raise ValueError(f"backbone: does not fit the weights in {path!r}: "
                                 f"{str(exc).strip().splitlines()[0]}") from None
            net = backbone
        elif state.get("backbone_spec") is None:
            raise ValueError(f"backbone: classifier {path!r} holds a backbone that is not a "
                             f"fastmtl model; pass a fresh one of its architecture")
        else:
            net = backbone_from_checkpoint(state, path)
        clf = cls(net, device=device, **state["settings"])
        if state.get("norm_statistics") is not None:
            clf._net = _frozen_at(clf.backbone, state["norm_statistics"], path)
            clf._fixed_norm = bool(state.get("fixed_norm"))
        if state["classes"] is not None:
            clf.classes_ = _as_array(state["classes"])
            clf._weight = state["weight"].to(clf.device)
            clf._bias = state["bias"].to(clf.device)
        return clf


def _check_saved(state: dict[str, Any], path: str) -> None:
    """ValueError naming ``path`` unless the saved settings and head fit together."""
    settings, classes = state.get("settings"), state.get("classes")
    bad = not isinstance(settings, dict) or not isinstance(state.get("backbone"), dict)
    if not bad and classes is not None:
        weight, bias = state.get("weight"), state.get("bias")
        bad = not isinstance(classes, list) or not isinstance(weight, torch.Tensor) or \
            not isinstance(bias, torch.Tensor) or weight.dim() != 2 or \
            tuple(bias.shape) != (len(classes),) or weight.shape[0] != len(classes)
    if bad:
        raise ValueError(f"classifier {path!r} is damaged: its settings, weights, classes "
                         f"and head do not fit together")


def _check_sequence(name: str, images: Any) -> None:
    """ValueError naming ``name`` unless ``images`` is a non-empty sequence of images."""
    if isinstance(images, (str, os.PathLike)) or not hasattr(images, "__len__"):
        raise ValueError(f"{name} must be a sequence (a list of paths, PIL images or "
                         f"arrays, or a (N, C, H, W) tensor)")
    if len(images) == 0:
        raise ValueError(f"{name} is empty")
    if isinstance(images, np.ndarray) and (images.ndim == 2 or (
            images.ndim == 3 and images.shape[-1] in (1, 3, 4) and images.shape[1] > 4)):
        raise ValueError(f"{name}: an array of shape {images.shape} is one image; pass "
                         f"[image], or a batch (N, H, W) or (N, H, W, C)")


def _freeze(backbone: nn.Module, images: torch.Tensor, batch_size: int) -> nn.Module:
    from .gbml import freeze_batch_stats
    return freeze_batch_stats(backbone, images, batch_size=batch_size)


def _norm_statistics(net: nn.Module,
                     backbone: nn.Module) -> dict[str, list[torch.Tensor]] | None:
    """The statistics ``net`` was frozen at from the batch-statistics ``backbone``, as plain
    CPU tensors by norm name; None where ``net`` is ``backbone`` itself (not frozen here)."""
    if net is backbone:
        return None
    from .gbml import frozen_statistics
    return {k: [m.cpu(), v.cpu()] for k, (m, v) in frozen_statistics(net).items()}


def _frozen_at(backbone: nn.Module, stats: Any, path: str) -> nn.Module:
    """``backbone`` frozen at saved statistics (moved to its device by ``freeze_at``), or
    ValueError naming ``path``."""
    from .gbml import freeze_at
    try:
        return freeze_at(backbone, stats)
    except ValueError as exc:
        raise ValueError(f"classifier {path!r} is damaged: its norm statistics do not fit "
                         f"its backbone ({exc})") from None


def _device(device: torch.device | str | None) -> torch.device:
    """The device to run on (None: CUDA when available, else CPU); ValueError naming
    ``device`` for a bad name or an absent CUDA device."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        out = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda', got "
                         f"{device!r}") from None
    if out.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: no CUDA device is available")
    return out


def _labels(labels: Any) -> list[Any]:
    """Class labels as plain values (tensors and arrays unwrapped), each hashable and not
    NaN, else ValueError naming ``labels``."""
    if isinstance(labels, (torch.Tensor, np.ndarray)):
        if labels.ndim != 1:
            raise ValueError(f"labels must be 1-D, got shape {tuple(labels.shape)}")
        labels = labels.tolist()
    if labels is None or isinstance(labels, (str, bytes)) or not hasattr(labels, "__iter__"):
        raise ValueError(f"labels must be a sequence, one label an image, got {labels!r}")
    values = [v.item() if isinstance(v, np.generic) else v for v in labels]
    for v in values:
        if not isinstance(v, Hashable) or isinstance(v, torch.Tensor):
            raise ValueError(f"labels must be hashable values such as str or int, got "
                             f"{type(v).__name__} ({v!r})")
        if isinstance(v, float) and v != v:
            raise ValueError("labels: NaN is not a class label")
    return values


def _plain(label: Any) -> Any:
    """A class label as a plain Python value (numpy scalars unwrapped), or ValueError."""
    if isinstance(label, np.generic):
        label = label.item()
    if not isinstance(label, (str, int, float, bool)):
        raise ValueError(f"labels: only str, int, float or bool labels can be saved, got "
                         f"{type(label).__name__} ({label!r})")
    return label


def _as_array(classes: list) -> np.ndarray:
    out = np.empty(len(classes), dtype=object)
    out[:] = classes
    kinds = {type(c) for c in classes}
    if kinds <= {str} or kinds <= {int} or kinds <= {float}:
        return np.array(classes)
    return out


def _has_batch_stats(module: nn.Module) -> bool:
    from .gbml import has_batch_stats
    return has_batch_stats(module)
