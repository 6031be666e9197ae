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

The numpy code below is the reference implementation of that algorithm. When the extension
``fastmtl._episodes`` is built, :class:`EpisodeSampler` runs the same algorithm in C++ on
several threads (:func:`backend` says which one is in use); both give identical episodes.

Batches: :func:`assemble` gathers the images of a batch of episodes into one (optionally
pinned) channels-first tensor, normalizing on the fly; :class:`EpisodeLoader` yields ready
:class:`EpisodeBatch` es with the next one prefetched on a background thread.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import torch

from . import checks

if TYPE_CHECKING:  # for the annotations: the loader reads any object with those attributes
    from .data import FewShotDataset

try:  # this form, not `from . import`: mypy treats a missing submodule there as an attribute
    import fastmtl._episodes as _cpp
except ImportError:  # extension not built: the numpy reference does the work, slower
    _cpp = None

__all__ = ["EpisodeSampler", "EpisodeLoader", "EpisodeBatch", "assemble", "backend",
           "check_fits"]

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


def _word(keys: np.ndarray, j: int) -> np.ndarray:
    with np.errstate(over="ignore"):
        return _mix(keys + np.uint64(j) * _G)


def backend() -> str:
    """The implementation :class:`EpisodeSampler` and :func:`assemble` use by default:
    ``"cpp"`` when the extension ``fastmtl._episodes`` is built, else ``"numpy"``.

    Example:
        >>> backend() in ("cpp", "numpy")
        True"""
    return "cpp" if _cpp is not None else "numpy"


def _resolve_backend(name: str | None) -> str:
    if name is None:
        return backend()
    if name not in ("cpp", "numpy"):
        raise ValueError(f"backend must be 'cpp', 'numpy' or None, got {name!r}")
    if name == "cpp" and _cpp is None:
        raise ValueError("backend='cpp' needs the C++ extension fastmtl._episodes, which is "
                         "not built; reinstall with a C++17 compiler or use backend='numpy'")
    return name


def _resolve_threads(num_threads: int | None) -> int:
    # torch's setting governs by default, so torch.set_num_threads caps the whole program.
    if num_threads is None:
        return max(1, torch.get_num_threads())
    return _check_int("num_threads", num_threads, 1)


def check_fits(labels: npt.ArrayLike, n_way: int, need: int, ways_name: str = "n_way",
               need_name: str = "k_shot + n_query", where: str = "",
               class_names: Sequence[str] | None = None) -> None:
    """ValueError unless ``labels`` hold ``n_way`` classes of at least ``need`` images: the
    one class-size check, called by the sampler and, before any work, by the trainers,
    the validation check and ``fastmtl compare`` with the names their callers know.

    Example:
        >>> check_fits([0, 0, 1, 1, 2, 2], n_way=3, need=2)
    """
    _check_int(ways_name, n_way, 1)
    _check_int(need_name, need, 1)
    classes, counts = np.unique(np.asarray(labels), return_counts=True)
    _check_counts(classes, counts, n_way, need, ways_name, need_name, where, class_names)


def _check_counts(classes: np.ndarray, counts: np.ndarray, n_way: int, need: int,
                  ways_name: str = "n_way", need_name: str = "k_shot + n_query", where: str = "",
                  class_names: Sequence[str] | None = None) -> None:
    """:func:`check_fits` on the classes and their counts (``np.unique``'s output)."""
    if n_way > classes.size:
        raise ValueError(f"{ways_name}={n_way} is larger than the number of {where}classes "
                         f"({classes.size})")
    if counts.size and counts.min() < need:
        small = int(np.argmin(counts))
        label = int(classes[small])
        name = f" ({class_names[label]!r})" if class_names is not None and \
            0 <= label < len(class_names) else ""
        raise ValueError(f"{need_name} = {need} is larger than {where}class {label}{name}, "
                         f"which has {counts[small]} images")


def _check_int(name: str, value: Any, minimum: int) -> int:
    return int(checks.integer(name, value, minimum))


class EpisodeSampler:
    """Samples N-way K-shot episodes from a label array.

    Args:
        labels: 1-D integer array, the class label of each image (any values that fit in
            int64, any class sizes). Classes are the distinct labels, in sorted order.
        n_way, k_shot, n_query: episode shape; every class needs ``k_shot + n_query``
            images.
        seed: non-negative integer below 2**64; episodes are a pure function of
            (seed, episode index).
        backend: ``"cpp"``, ``"numpy"`` (the reference) or None for :func:`backend`.
        num_threads: threads of the C++ sampler; None follows ``torch.get_num_threads()``.
            The episodes never depend on it.
        class_names: names of the labels (``class_names[label]``), for error messages.

    ``sampler.episodes(start, count)`` returns ``(classes, index)``: the label values of
    each episode's classes, shape (count, n_way), and dataset indices of their images,
    shape (count, n_way, k_shot + n_query), supports first. Within an episode, slot ``w``
    is episode label ``w``.

    Raises:
        ValueError: bad labels, episode shape, seed or backend, or classes too small for
            ``k_shot + n_query`` (naming them).

    Example:
        >>> import numpy as np
        >>> sampler = EpisodeSampler(np.repeat(np.arange(10), 6), n_way=5, k_shot=1, n_query=2)
        >>> classes, index = sampler.episodes(0, 3)
        >>> classes.shape, index.shape
        ((3, 5), (3, 5, 3))
    """

    def __init__(self, labels: npt.ArrayLike | torch.Tensor, n_way: int, k_shot: int,
                 n_query: int, seed: int = 0,
                 backend: str | None = None, num_threads: int | None = None,
                 class_names: Sequence[str] | None = None):
        labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
        if labels.ndim != 1:
            raise ValueError(f"labels must be a 1-D array, got shape {labels.shape}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
        if labels.dtype == np.uint64 and labels.size and labels.max() > np.iinfo(np.int64).max:
            raise ValueError("labels must fit in int64")
        self.n_way = _check_int("n_way", n_way, 1)
        self.k_shot = _check_int("k_shot", k_shot, 1)
        self.n_query = _check_int("n_query", n_query, 0)
        self.seed = _check_int("seed", seed, 0)
        if self.seed >= 2**64:
            raise ValueError(f"seed must be < 2**64, got {seed}")
        self.backend = _resolve_backend(backend)
        self.num_threads = None if num_threads is None else _resolve_threads(num_threads)
        need = self.k_shot + self.n_query
        self._core: Any = None  # the C++ sampler, when that backend runs
        self.classes: np.ndarray
        self.counts: np.ndarray
        self.order: np.ndarray
        self.offsets: np.ndarray
        if self.backend == "cpp":
            try:        # the C++ core counts the classes itself and refuses small ones
                self._core = _cpp.Sampler(np.ascontiguousarray(labels, dtype=np.int64),
                                          self.n_way, self.k_shot, self.n_query, self.seed)
            except ValueError:
                # The same check again, only on failure, for a message naming the class.
                check_fits(labels, self.n_way, need, class_names=class_names)
                raise
            self.classes, self.counts = self._core.classes, self._core.counts
            self.order, self.offsets = self._core.order, self._core.offsets
            return
        self.classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
        _check_counts(self.classes, counts, self.n_way, need, class_names=class_names)
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
        """Episodes ``start .. start + count - 1``: classes (count, n_way) and image indices
        (count, n_way, k_shot + n_query), both int64."""
        start = _check_int("start", start, 0)
        count = _check_int("count", count, 0)
        if start + count > 2**64:
            raise ValueError("episode numbers must stay below 2**64")
        if self._core is not None:
            return self._core.sample(start, count, _resolve_threads(self.num_threads))
        cls = np.empty((count, self.n_way), dtype=np.int64)
        idx = np.empty((count, self.n_way, self.shots), dtype=np.int64)
        for lo in range(0, count, _CHUNK):
            hi = min(count, lo + _CHUNK)
            c, i = self._chunk(np.arange(start + lo, start + hi, dtype=np.uint64))
            cls[lo:hi], idx[lo:hi] = c, i
        return self.classes[cls].astype(np.int64, copy=False), idx

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


# -- batch assembly ------------------------------------------------------------------------

def _as_images(images: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        if images.device.type != "cpu":
            raise ValueError(f"images must be on the CPU, got device {images.device}")
        images = images.detach().numpy()
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise ValueError("images must be a uint8 array (N, H, W[, C]), got "
                         f"{getattr(images, 'dtype', type(images).__name__)} with shape "
                         f"{getattr(images, 'shape', None)}")
    # A silent copy of a whole data set would cost more than the batch itself.
    if not images.flags.c_contiguous:
        raise ValueError("images must be C-contiguous (np.ascontiguousarray it once)")
    return images


def _as_index(index: npt.ArrayLike | torch.Tensor, n_images: int) -> np.ndarray:
    if isinstance(index, torch.Tensor):
        index = index.detach().cpu().numpy()
    index = np.asarray(index)
    if index.dtype == object or not (np.issubdtype(index.dtype, np.integer) or index.size == 0):
        raise ValueError(f"index must hold integers, got dtype {index.dtype}")
    index = np.asarray(index, dtype=np.int64, order="C")  # keeps 0-d (a single image)
    if index.size and (index.min() < 0 or index.max() >= n_images):
        raise ValueError(f"index values must lie in [0, {n_images}), got range "
                         f"[{index.min()}, {index.max()}]")
    return index


def _channel_stats(value: float | Sequence[float] | torch.Tensor, channels: int,
                   name: str) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float32).reshape(-1)
    if t.numel() == 1:
        t = t.expand(channels)
    if t.numel() != channels:
        raise ValueError(f"{name} must have one value per channel ({channels}), got {t.numel()}")
    return t.contiguous()


def _lut(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    # The same float32 operations, in the same order, as FewShotDataset.tensor, applied to
    # every possible byte: the C++ lookup then yields bit-identical pixels.
    x = torch.arange(256, dtype=torch.float32).div_(255.0).view(1, 256)
    return ((x - mean.view(-1, 1)) / std.view(-1, 1)).contiguous()


def _output(out: torch.Tensor | None, dtype: torch.dtype | None, shape: tuple[int, ...],
            normalizing: bool, pin_memory: bool) -> torch.Tensor:
    """:func:`assemble`'s result tensor: ``out`` checked, or a new one of ``dtype``."""
    if out is not None and not isinstance(out, torch.Tensor):
        raise ValueError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if dtype is None:
        dtype = out.dtype if out is not None else torch.float32
    if dtype not in (torch.float32, torch.uint8):
        raise ValueError(f"dtype must be torch.float32 or torch.uint8, got {dtype}")
    if dtype == torch.uint8 and normalizing:
        raise ValueError("mean/std normalize float32 output; a uint8 result holds raw bytes")
    if out is None:
        return torch.empty(shape, dtype=dtype,
                           pin_memory=bool(pin_memory) and torch.cuda.is_available())
    if out.device.type != "cpu" or out.dtype != dtype or tuple(out.shape) != shape \
            or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous CPU {dtype} tensor of shape {shape}, got "
                         f"{'' if out.is_contiguous() else 'non-contiguous '}{out.dtype} "
                         f"{tuple(out.shape)} on {out.device}")
    return out


def assemble(images: np.ndarray | torch.Tensor, index: npt.ArrayLike | torch.Tensor,
             out: torch.Tensor | None = None, dtype: torch.dtype | None = None,
             mean: Sequence[float] | torch.Tensor | None = None,
             std: Sequence[float] | torch.Tensor | None = None,
             pin_memory: bool = False, num_threads: int | None = None,
             backend: str | None = None) -> torch.Tensor:
    """Gather ``images[index]`` into one channels-first tensor, ``index.shape + (C, H, W)``.

    Args:
        images: uint8 array or CPU tensor (N, H, W) (grey, C = 1) or (N, H, W, C),
            C-contiguous (e.g. ``FewShotDataset.images``).
        index: integer array of any shape, values in [0, N) (e.g. ``EpisodeSampler``'s).
        out: optional preallocated contiguous CPU tensor of the result's shape and dtype.
        dtype: ``torch.float32`` (default) gives ``(x / 255 - mean) / std`` exactly as
            ``FewShotDataset.tensor`` computes it; ``torch.uint8`` copies the raw bytes.
        mean, std: per-channel statistics for float32 (default 0 and 1); not for uint8.
        pin_memory: allocate the result in page-locked memory (when CUDA is available) so
            that ``.to("cuda", non_blocking=True)`` overlaps with compute.
        num_threads: C++ threads; None follows ``torch.get_num_threads()``.
        backend: ``"cpp"``, ``"numpy"`` or None for :func:`backend`.

    Returns:
        a tensor of shape ``index.shape + (C, H, W)``, float32 by default.

    Raises:
        ValueError: bad images, an index out of range, or an ``out`` of the wrong shape.

    Example:
        >>> import numpy as np
        >>> images = np.zeros((4, 28, 28), dtype=np.uint8)
        >>> assemble(images, np.array([[0, 1], [2, 3]])).shape
        torch.Size([2, 2, 1, 28, 28])
    """
    images = _as_images(images)
    index = _as_index(index, images.shape[0])
    which = _resolve_backend(backend)
    channels = 1 if images.ndim == 3 else images.shape[3]
    shape = index.shape + (channels, images.shape[1], images.shape[2])
    out = _output(out, dtype, shape, mean is not None or std is not None, pin_memory)
    dtype = out.dtype
    if dtype == torch.float32:
        mean_t = _channel_stats(0.0 if mean is None else mean, channels, "mean")
        std_t = _channel_stats(1.0 if std is None else std, channels, "std")
    if out.numel() == 0:
        return out
    if which == "cpp":
        _cpp.assemble(images, index, out.detach().numpy(),
                      _lut(mean_t, std_t).numpy() if dtype == torch.float32 else None,
                      _resolve_threads(num_threads))
        return out
    raw = torch.from_numpy(images[index.reshape(-1)])
    raw = raw.unsqueeze(1) if raw.dim() == 3 else raw.permute(0, 3, 1, 2)
    flat = out.detach().view(-1, *shape[-3:])
    flat.copy_(raw)
    if dtype == torch.float32:
        flat.div_(255.0).sub_(mean_t.view(1, -1, 1, 1)).div_(std_t.view(1, -1, 1, 1))
    return out


# -- ready batches -------------------------------------------------------------------------

@dataclasses.dataclass
class EpisodeBatch:
    """A batch of T episodes, ready for a backbone.

    Attributes:
        images: float32 (T, n_way, k_shot + n_query, C, H, W), normalized; supports first
            along dim 2.
        labels: int64 (T, n_way, k_shot + n_query), the episode label 0..n_way-1 of each
            image (its slot).
        tasks: int64 (T, n_way, k_shot + n_query), the task 0..T-1 of each image.
        classes: int64 (T, n_way), the data set label of each slot (head rows in MTL).
        episodes: int64 (T,), the episode numbers (``EpisodeSampler.episode(e)`` repeats one).
        k_shot: supports per class.

    Example:
        >>> from fastmtl.data import SyntheticGlyphs
        >>> batch = EpisodeLoader(SyntheticGlyphs(8, 5), n_way=3, k_shot=2, n_query=1,
        ...                       tasks_per_batch=2, seed=0).batch(0)
        >>> batch.labels[0].tolist(), batch.episodes.tolist()
        ([[0, 0, 0], [1, 1, 1], [2, 2, 2]], [0, 1])
    """

    images: torch.Tensor
    labels: torch.Tensor
    tasks: torch.Tensor
    classes: torch.Tensor
    episodes: torch.Tensor
    k_shot: int

    def to(self, device: torch.device | str, non_blocking: bool = False) -> EpisodeBatch:
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return EpisodeBatch(move(self.images), move(self.labels), move(self.tasks),
                            move(self.classes), move(self.episodes), self.k_shot)


class EpisodeLoader(torch.utils.data.IterableDataset):
    """Endless (or ``batches``-long) stream of :class:`EpisodeBatch` es from a data set.

    Batch ``b`` holds episodes ``start + b * stride`` onwards (``stride`` defaults to
    ``tasks_per_batch``), so a stream is a pure function of (seed, start) and resumes
    anywhere; a larger stride gives one rank of a distributed run its share of each step.
    While the caller works on one batch a background thread samples and assembles the next
    (``prefetch=True``); the C++ work runs without the GIL. With ``device`` set to a CUDA
    device the images are assembled in pinned memory and copied asynchronously.

    Iterate it directly (it prefetches by itself), or through
    ``DataLoader(loader, batch_size=None)``; with ``num_workers > 0`` each worker takes every
    n-th batch, so the stream is unchanged.

    Args:
        dataset: a :class:`fastmtl.data.FewShotDataset` (uses ``images``, ``labels``,
            ``class_names``, ``mean``, ``std``).
        n_way, k_shot, n_query, seed: as for :class:`EpisodeSampler`.
        tasks_per_batch: episodes per batch (T).
        start: the first episode number.
        device: where the batches go (None: stay on the CPU).
        prefetch: assemble the next batch in the background.
        batches: stop after this many batches (None: endless).
        stride: episode numbers between the starts of consecutive batches (None:
            ``tasks_per_batch``, i.e. consecutive episodes).
        backend, num_threads: as for :class:`EpisodeSampler` and :func:`assemble`.

    Example:
        >>> from fastmtl.data import SyntheticGlyphs
        >>> loader = EpisodeLoader(SyntheticGlyphs(10, 6), n_way=5, k_shot=1, n_query=2,
        ...                        tasks_per_batch=4, seed=0, batches=2)
        >>> [tuple(b.images.shape) for b in loader]
        [(4, 5, 3, 1, 28, 28), (4, 5, 3, 1, 28, 28)]
    """

    def __init__(self, dataset: FewShotDataset, n_way: int, k_shot: int, n_query: int,
                 tasks_per_batch: int, seed: int, start: int = 0,
                 device: torch.device | str | None = None, prefetch: bool = True,
                 batches: int | None = None, backend: str | None = None,
                 num_threads: int | None = None, stride: int | None = None):
        super().__init__()
        for attr in ("images", "labels", "mean", "std"):
            if not hasattr(dataset, attr):
                raise ValueError(f"dataset must be a FewShotDataset, got {type(dataset).__name__}")
        self.dataset = dataset
        self.tasks_per_batch = _check_int("tasks_per_batch", tasks_per_batch, 1)
        self.start = _check_int("start", start, 0)
        self.batches = None if batches is None else _check_int("batches", batches, 0)
        self.stride = self.tasks_per_batch if stride is None else _check_int("stride", stride, 1)
        self.sampler = EpisodeSampler(dataset.labels, n_way, k_shot, n_query, seed,
                                      backend=backend, num_threads=num_threads,
                                      class_names=getattr(dataset, "class_names", None))
        self.device = torch.device(device) if device is not None else None
        self.prefetch = bool(prefetch)
        self._pin = self.device is not None and self.device.type == "cuda"
        self._images = _as_images(dataset.images)
        channels = 1 if self._images.ndim == 3 else self._images.shape[3]
        self._mean = _channel_stats(dataset.mean, channels, "dataset.mean")
        self._std = _channel_stats(dataset.std, channels, "dataset.std")

    def __len__(self) -> int:
        if self.batches is None:
            raise TypeError("an endless EpisodeLoader has no length (pass batches=)")
        return self.batches

    def batch(self, b: int) -> EpisodeBatch:
        """Batch number ``b`` on the CPU (pinned when the loader's device is CUDA)."""
        b = _check_int("b", b, 0)
        T, s = self.tasks_per_batch, self.sampler
        first = self.start + b * self.stride
        classes, index = s.episodes(first, T)
        images = assemble(self._images, index, mean=self._mean, std=self._std,
                          pin_memory=self._pin, num_threads=s.num_threads, backend=s.backend)
        shape = (T, s.n_way, s.shots)
        labels = torch.arange(s.n_way).view(1, -1, 1).expand(shape).contiguous()
        tasks = torch.arange(T).view(-1, 1, 1).expand(shape).contiguous()
        return EpisodeBatch(images, labels, tasks, torch.from_numpy(classes),
                            torch.arange(first, first + T, dtype=torch.int64), s.k_shot)

    def __iter__(self) -> Iterator[EpisodeBatch]:
        info = torch.utils.data.get_worker_info()
        first, step = (0, 1) if info is None else (info.id, info.num_workers)
        numbers = range(first, self.batches if self.batches is not None else 2**62, step)
        if not self.prefetch:
            for b in numbers:
                yield self._deliver(self.batch(b))
            return
        # One batch in flight: enough to hide assembly behind a training step, and a fresh
        # tensor per batch, so batches the caller keeps are never overwritten.
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastmtl-episodes")
        todo = iter(numbers)

        def _next() -> Future[EpisodeBatch] | None:
            b = next(todo, None)
            return None if b is None else pool.submit(self.batch, b)

        try:
            pending = _next()
            while pending is not None:
                ready = pending.result()
                pending = _next()
                yield self._deliver(ready)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _deliver(self, batch: EpisodeBatch) -> EpisodeBatch:
        return batch if self.device is None else batch.to(self.device, non_blocking=self._pin)
