"""N-way K-shot episode sampling, a pure function of (seed, episode number).

The generator is counter-based so any episode can be regenerated alone and results do not
depend on batch boundaries or thread counts. The exact algorithm (the C++ extension in
``csrc/`` implements the same one, bit for bit):

* ``mix(x)`` is SplitMix64: ``z = x + G; z = (z ^ z>>30) * 0xBF58476D1CE4E5B9;
  z = (z ^ z>>27) * 0x94D049BB133111EB; return z ^ z>>31`` with ``G = 0x9E3779B97F4A7C15``,
  all arithmetic modulo 2**64.
* The key of episode ``e`` is ``key = mix(mix(seed) ^ e)``; its ``j``-th random word is
  ``u_j = mix(key + j * G)``.
* Classes: a partial Fisher-Yates shuffle of ``0..C-1``: for ``i < n_way`` swap positions
  ``i`` and ``i + u_i % (C - i)``; the episode's classes are the first ``n_way`` positions.
* Images: for slot ``w`` (class ``c`` with ``m`` images, listed in dataset order) a partial
  Fisher-Yates shuffle of ``0..m-1`` with words ``u_{n_way + w*(k+q) + i}``, ``i < k+q``;
  the first ``k_shot`` picks are the support, the next ``n_query`` the queries.

(The modulo bias is at most ``m / 2**64``, far below anything a test could see.)
"""
from __future__ import annotations

import numpy as np

__all__ = ["EpisodeSampler", "backend"]

_G = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_CHUNK = 512


def _mix(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + _G
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def _keys(seed: int, episodes: np.ndarray) -> np.ndarray:
    s = _mix(np.array([seed], dtype=np.uint64))
    return _mix(s ^ episodes.astype(np.uint64))


def _word(keys: np.ndarray, j) -> np.ndarray:
    with np.errstate(over="ignore"):
        return _mix(keys + np.uint64(j) * _G)


def backend() -> str:
    """Which sampler implementation :class:`EpisodeSampler` uses: ``"numpy"``."""
    return "numpy"


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


class EpisodeSampler:
    """Samples N-way K-shot episodes from a label array.

    Args:
        labels: 1-D integer array, the class label of each image (any values, any class
            sizes). Classes are the distinct labels, in sorted order.
        n_way, k_shot, n_query: episode shape; every class needs ``k_shot + n_query``
            images.
        seed: non-negative integer; episodes are a pure function of (seed, episode index).

    ``sampler.episodes(start, count)`` returns ``(classes, index)``: the label values of
    each episode's classes, shape (count, n_way), and dataset indices of their images,
    shape (count, n_way, k_shot + n_query), supports first. Within an episode, slot ``w``
    is episode label ``w``.
    """

    def __init__(self, labels, n_way: int, k_shot: int, n_query: int, seed: int = 0):
        labels = np.asarray(labels)
        if labels.ndim != 1:
            raise ValueError(f"labels must be a 1-D array, got shape {labels.shape}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
        self.n_way = _check_int("n_way", n_way, 1)
        self.k_shot = _check_int("k_shot", k_shot, 1)
        self.n_query = _check_int("n_query", n_query, 0)
        self.seed = _check_int("seed", seed, 0)
        if self.seed >= 2**64:
            raise ValueError(f"seed must be < 2**64, got {seed}")
        self.classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
        if self.n_way > self.classes.size:
            raise ValueError(f"n_way={self.n_way} is larger than the number of classes "
                             f"({self.classes.size})")
        need = self.k_shot + self.n_query
        if counts.size and counts.min() < need:
            small = int(np.argmin(counts))
            raise ValueError(f"k_shot + n_query = {need} is larger than class "
                             f"{self.classes[small]!r}, which has {counts[small]} images")
        self.order = np.argsort(inverse, kind="stable").astype(np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.counts = counts.astype(np.int64)

    @property
    def shots(self) -> int:
        return self.k_shot + self.n_query

    def episode(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        """Classes (n_way,) and indices (n_way, k_shot + n_query) of episode ``e``."""
        c, idx = self.episodes(e, 1)
        return c[0], idx[0]

    def episodes(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        start = _check_int("start", start, 0)
        count = _check_int("count", count, 0)
        cls = np.empty((count, self.n_way), dtype=np.int64)
        idx = np.empty((count, self.n_way, self.shots), dtype=np.int64)
        for lo in range(0, count, _CHUNK):
            hi = min(count, lo + _CHUNK)
            c, i = self._chunk(np.arange(start + lo, start + hi, dtype=np.uint64))
            cls[lo:hi], idx[lo:hi] = c, i
        return self.classes[cls], idx

    def _chunk(self, episode_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        E, n_way, k = episode_ids.size, self.n_way, self.shots
        keys = _keys(self.seed, episode_ids)
        rows = np.arange(E)
        perm = np.tile(np.arange(self.counts.size, dtype=np.int64), (E, 1))
        for i in range(n_way):
            j = i + (_word(keys, i) % np.uint64(self.counts.size - i)).astype(np.int64)
            pi, pj = perm[rows, i].copy(), perm[rows, j]
            perm[rows, i], perm[rows, j] = pj, pi
        cls = perm[:, :n_way]                                     # (E, n_way) class positions
        sizes = self.counts[cls].reshape(-1)                      # (E*n_way,)
        slot_keys = np.repeat(keys, n_way)
        slot = np.tile(np.arange(n_way, dtype=np.uint64), E)
        rows = np.arange(E * n_way)
        pos = np.tile(np.arange(int(sizes.max()), dtype=np.int64), (E * n_way, 1))
        with np.errstate(over="ignore"):
            base = np.uint64(n_way) + slot * np.uint64(k)
        for i in range(k):
            u = _mix(slot_keys + (base + np.uint64(i)) * _G)
            j = i + (u % (sizes - i).astype(np.uint64)).astype(np.int64)
            pi, pj = pos[rows, i].copy(), pos[rows, j]
            pos[rows, i], pos[rows, j] = pj, pi
        picks = pos[:, :k] + self.offsets[cls.reshape(-1)][:, None]
        return cls, self.order[picks].reshape(E, n_way, k)
