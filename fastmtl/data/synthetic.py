"""SyntheticGlyphs: procedural handwritten-looking characters, the built-in default data set.

Nothing is downloaded: each class is a random glyph of a few pen strokes, and each image is
a perturbed rendering of it (the pen wobbles, the page is rotated, scaled and sheared a
little). A class is a pure function of ``(seed, class index)``, so a larger data set
extends a smaller one and splits can be taken as disjoint class ranges.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from .. import checks
from .base import FewShotDataset

__all__ = ["SyntheticGlyphs", "SYNTHETIC_MEAN", "SYNTHETIC_STD"]

# Pixel mean/std (scaled to [0, 1]) of SyntheticGlyphs(400, 20, seed=0) at 28x28, measured
# once; fixed so every subset and size is normalized alike.
SYNTHETIC_MEAN = (0.1216,)
SYNTHETIC_STD = (0.3001,)

_MAX_STROKES = 4
_POINTS_PER_STROKE = 9          # 8 segments: a smooth enough curve at 28 px
_JITTER = 0.035                 # control-point wobble, in units of the glyph box
_ROTATION_DEG = 12.0
_SCALE = (0.85, 1.15)
_SHEAR = 0.15
_SHIFT_PX = 1.5
_RENDER_CHUNK = 256             # images per vectorized rendering pass (bounds memory)
# The last few draws of at most _KEEP_BYTES of images, by (classes, per_class, seed,
# size): the CLI and the tests load the same splits many times in one process.
_KEEP, _KEEP_BYTES = 4, 32 << 20
_kept: OrderedDict[tuple[int, ...], tuple[np.ndarray, np.ndarray]] = OrderedDict()

# Bernstein bases for a line, a quadratic and a cubic Bezier curve, sampled once.
_T = np.linspace(0.0, 1.0, _POINTS_PER_STROKE)
_BERNSTEIN = {
    2: np.stack([1 - _T, _T], axis=1),
    3: np.stack([(1 - _T) ** 2, 2 * (1 - _T) * _T, _T ** 2], axis=1),
    4: np.stack([(1 - _T) ** 3, 3 * (1 - _T) ** 2 * _T, 3 * (1 - _T) * _T ** 2, _T ** 3], axis=1),
}


class SyntheticGlyphs(FewShotDataset):
    """Procedural glyph classes, ``per_class`` perturbed drawings of each.

    Each class is a character of 2-4 strokes; a stroke is a line or a quadratic or cubic
    Bezier curve through 2-4 random control points, often starting on an earlier stroke
    (as pen strokes of real characters join), drawn with a class-specific pen width. Each
    image re-draws the class with control-point jitter, pen-width variation and a small
    random affine map (rotation within +-12 degrees, scale 0.85-1.15, shear, a shift of up
    to 1.5 px), anti-aliased, strokes bright on a dark background.

    Args:
        n_classes: number of classes C.
        per_class: images per class.
        seed: the data set's seed; class ``c`` depends only on ``(seed, c)``, so
            ``SyntheticGlyphs(200, k, seed)`` holds the first 200 classes of
            ``SyntheticGlyphs(400, k, seed)``, image for image.
        image_size: side of the square images.

    Images are uint8 (C * per_class, image_size, image_size), class-major; ``mean``/``std``
    are the fixed :data:`SYNTHETIC_MEAN`/:data:`SYNTHETIC_STD`.

    Raises:
        ValueError: a non-positive class count or images per class, an image size below
            8, or a negative seed.

    Example:
        >>> data = SyntheticGlyphs(5, 4, seed=0)
        >>> data.images.shape, len(data.class_names)
        ((20, 28, 28), 5)
    """

    def __init__(self, n_classes: int, per_class: int, seed: int = 0, image_size: int = 28):
        checks.integer("n_classes", n_classes, 1)
        checks.integer("per_class", per_class, 1)
        checks.integer("seed", seed, 0)
        checks.integer("image_size", image_size, 8)
        n_classes, per_class, seed, image_size = map(int, (n_classes, per_class, seed, image_size))
        images, labels, names = _glyph_classes(range(n_classes), per_class, seed, image_size)
        super().__init__(images, labels, names, SYNTHETIC_MEAN, SYNTHETIC_STD,
                         name="synthetic")
        self.seed = seed


def _glyph_classes(classes: range, per_class: int, seed: int,
                   image_size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images, labels 0..len(classes)-1, names) of the glyph classes ``classes`` alone:
    image for image what ``SyntheticGlyphs(classes.stop, per_class, seed,
    image_size).subset(classes)`` holds, without rendering the classes before them.
    Small draws are kept (:data:`_KEEP`) and handed out again as fresh copies."""
    key = (classes.start, classes.stop, classes.step, per_class, seed, image_size)
    names = [f"glyph{c:04d}" for c in classes]
    if key in _kept:
        _kept.move_to_end(key)
        images, labels = _kept[key]
        return images.copy(), labels.copy(), names
    images, labels = _draw(classes, per_class, seed, image_size)
    if images.nbytes <= _KEEP_BYTES:
        _kept[key] = (images.copy(), labels.copy())
        while len(_kept) > _KEEP:
            _kept.popitem(last=False)
    return images, labels, names


def _draw(classes: range, per_class: int, seed: int,
          image_size: int) -> tuple[np.ndarray, np.ndarray]:
    strokes = np.empty((len(classes), per_class, _MAX_STROKES, _POINTS_PER_STROKE, 2))
    widths = np.empty((len(classes), per_class))
    for i, c in enumerate(classes):
        shape_rng, draw_rng = (np.random.Generator(np.random.PCG64(s)) for s in
                               np.random.SeedSequence(seed, spawn_key=(c,)).spawn(2))
        glyph = _random_glyph(shape_rng)
        strokes[i], widths[i] = _draw_class(glyph, per_class, image_size, draw_rng)
    images = _render(strokes.reshape(-1, _MAX_STROKES, _POINTS_PER_STROKE, 2),
                     widths.reshape(-1), image_size)
    return images, np.repeat(np.arange(len(classes), dtype=np.int64), per_class)


def _random_glyph(rng: np.random.Generator) -> dict:
    """A class: control points per stroke, where strokes attach, and the pen width."""
    n_strokes = int(rng.integers(2, _MAX_STROKES + 1))
    controls, attach = [], []
    for s in range(n_strokes):
        n_points = int(rng.integers(2, 5))
        points = rng.uniform(0.12, 0.88, size=(n_points, 2))
        if n_points == 2:
            # Short lines look like specks; keep them long enough to read as strokes.
            while np.linalg.norm(points[1] - points[0]) < 0.35:
                points[1] = rng.uniform(0.12, 0.88, size=2)
        joined = s > 0 and rng.random() < 0.6
        attach.append((int(rng.integers(0, s)), float(rng.uniform(0.0, 1.0))) if joined else None)
        controls.append(points)
    # Centre the glyph and give it a size like a written character's: otherwise some land
    # in a corner or run off the page, which is a nuisance, not a feature of the class.
    # Bezier curves follow their control points under affine maps, so this moves the
    # drawn curves (including attached stroke starts) the same way.
    drawn = np.concatenate([_BERNSTEIN[len(p)] @ p for p in controls])
    low, high = drawn.min(axis=0), drawn.max(axis=0)
    fit = rng.uniform(0.55, 0.70) / max(float((high - low).max()), 1e-6)
    controls = [(p - (low + high) / 2) * fit + 0.5 for p in controls]
    # Half pen width as a fraction of the image side: 1.7-2.9 px wide strokes at 28 px.
    half_width = float(rng.uniform(0.03, 0.052))
    return {"controls": controls, "attach": attach, "half_width": half_width}


def _draw_class(glyph: dict, n: int, size: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` drawings of ``glyph``: stroke points (n, strokes, points, 2), half widths (n,)."""
    curves: list[np.ndarray] = []
    for points, attach in zip(glyph["controls"], glyph["attach"], strict=True):
        wobbly = points[None] + rng.normal(0.0, _JITTER, size=(n,) + points.shape)
        if attach is not None:
            # Start on the (already perturbed) earlier stroke, so joins survive the jitter.
            host, t = attach
            pos = t * (_POINTS_PER_STROKE - 1)
            lo = min(int(pos), _POINTS_PER_STROKE - 2)
            frac = pos - lo
            wobbly[:, 0] = (1 - frac) * curves[host][:, lo] + frac * curves[host][:, lo + 1]
        curves.append(np.einsum("tk,nkd->ntd", _BERNSTEIN[len(points)], wobbly))
    # Unused stroke slots repeat the first stroke: drawing it twice changes nothing.
    curves += [curves[0]] * (_MAX_STROKES - len(curves))
    pts = np.stack(curves, axis=1)

    angle = np.deg2rad(rng.uniform(-_ROTATION_DEG, _ROTATION_DEG, n))
    scale = rng.uniform(*_SCALE, n)
    shear = rng.uniform(-_SHEAR, _SHEAR, n)
    cos, sin = np.cos(angle), np.sin(angle)
    # rotation @ shear @ scale, applied about the glyph box centre.
    mat = np.empty((n, 2, 2))
    mat[:, 0, 0] = scale * cos
    mat[:, 0, 1] = scale * (cos * shear - sin)
    mat[:, 1, 0] = scale * sin
    mat[:, 1, 1] = scale * (sin * shear + cos)
    shift = rng.uniform(-_SHIFT_PX, _SHIFT_PX, size=(n, 2)) / size
    pts = np.einsum("nij,nstj->nsti", mat, pts - 0.5) + 0.5 + shift[:, None, None, :]
    widths = glyph["half_width"] * rng.uniform(0.8, 1.2, n)
    return pts, widths


def _render(strokes: np.ndarray, half_widths: np.ndarray, size: int) -> np.ndarray:
    """Anti-aliased strokes: intensity falls from 1 to 0 over one pixel at the pen edge."""
    n = strokes.shape[0]
    pts = (strokes * size).astype(np.float32)
    a = pts[:, :, :-1].reshape(n, -1, 2)
    d = (pts[:, :, 1:] - pts[:, :, :-1]).reshape(n, -1, 2)
    seg_len2 = np.maximum((d ** 2).sum(-1), 1e-12)
    centres = np.arange(size, dtype=np.float32) + 0.5
    px = np.tile(centres, size)[None, None, :]           # x varies along a row
    py = np.repeat(centres, size)[None, None, :]
    out = np.empty((n, size * size), dtype=np.uint8)
    for lo in range(0, n, _RENDER_CHUNK):
        sl = slice(lo, lo + _RENDER_CHUNK)
        ax, ay = a[sl, :, 0, None], a[sl, :, 1, None]
        dx, dy = d[sl, :, 0, None], d[sl, :, 1, None]
        rx, ry = px - ax, py - ay
        t = np.clip((rx * dx + ry * dy) / seg_len2[sl, :, None], 0.0, 1.0)
        rx -= t * dx
        ry -= t * dy
        dist = np.sqrt((rx * rx + ry * ry).min(axis=1))
        ink = np.clip(half_widths[sl, None].astype(np.float32) * size + 0.5 - dist, 0.0, 1.0)
        out[sl] = np.rint(ink * 255.0).astype(np.uint8)
    return out.reshape(n, size, size)
