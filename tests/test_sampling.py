"""Episode sampling and batch assembly: the C++ core against the numpy reference.

The numpy sampler is the documented reference algorithm; the C++ one must give the same
episodes bit for bit. Tests that need the extension skip when it is not built, the rest run
on both back ends.
"""
import numpy as np
import pytest
import torch

from fastmtl import sampling
from fastmtl.data.base import FewShotDataset
from fastmtl.sampling import EpisodeBatch, EpisodeLoader, EpisodeSampler, assemble

HAVE_CPP = sampling._cpp is not None
needs_cpp = pytest.mark.skipif(not HAVE_CPP, reason="C++ extension fastmtl._episodes not built")
BACKENDS = [pytest.param("cpp", marks=needs_cpp), "numpy"]


def _labels(sizes, values=None, seed=0):
    """Shuffled labels with the given class sizes; label values default to 0..C-1."""
    rng = np.random.default_rng(seed)
    values = np.arange(len(sizes)) if values is None else np.asarray(values)
    return rng.permutation(np.repeat(values, sizes))


def _dataset(n_classes=8, per_class=12, shape=(6, 7, 3), seed=0):
    rng = np.random.default_rng(seed)
    labels = _labels([per_class] * n_classes, seed=seed)
    images = rng.integers(0, 256, (labels.size, *shape), dtype=np.uint8)
    channels = 1 if len(shape) == 2 else shape[2]
    return FewShotDataset(images, labels, [f"c{i}" for i in range(n_classes)],
                          mean=tuple(0.3 + 0.1 * c for c in range(channels)),
                          std=tuple(0.2 + 0.05 * c for c in range(channels)))


# -- the two back ends agree ---------------------------------------------------------------

CASES = [  # (class sizes, label values, n_way, k_shot, n_query)
    ([600] * 64, None, 5, 1, 15),
    ([600] * 64, None, 5, 5, 15),
    ([20, 21, 22, 64, 65, 127, 128, 129, 300], [-7, 3, 4, 10, 11, 99, 1000, 2**40, 2**62], 4, 2,
     18),
    ([1, 1, 2, 3], None, 4, 1, 0),                  # n_way = all classes, a class of one image
    ([5, 9, 7], [2, 1, 0], 2, 3, 2),                # k + q = the smallest class: full shuffles
    ([40] * 12, None, 12, 40, 0),                   # every image of every class
    (list(range(30, 70)), None, 7, 4, 6),
]


@needs_cpp
@pytest.mark.parametrize("seed", [0, 1, 12345, 2**63 + 11, 2**64 - 1])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_cpp_matches_numpy(case, seed):
    sizes, values, n_way, k, q = CASES[case]
    labels = _labels(sizes, values, seed=case)
    cpp = EpisodeSampler(labels, n_way, k, q, seed, backend="cpp")
    ref = EpisodeSampler(labels, n_way, k, q, seed, backend="numpy")
    for name in ("classes", "counts", "offsets", "order"):
        np.testing.assert_array_equal(getattr(cpp, name), getattr(ref, name), err_msg=name)
    for start, count in [(0, 700), (2**40 + 3, 50), (2**64 - 9, 9)]:
        c1, i1 = cpp.episodes(start, count)
        c2, i2 = ref.episodes(start, count)
        assert c1.dtype == c2.dtype == i1.dtype == i2.dtype == np.int64
        np.testing.assert_array_equal(c1, c2)
        np.testing.assert_array_equal(i1, i2)


@needs_cpp
def test_label_dtypes_agree():
    labels = _labels([10, 11, 12, 13], [5, 1, 3, 2])
    want = EpisodeSampler(labels, 3, 2, 3, 9, backend="numpy").episodes(0, 100)
    for dtype in (np.int8, np.uint8, np.int32, np.uint32, np.int64, np.uint64):
        for backend in ("cpp", "numpy"):
            got = EpisodeSampler(labels.astype(dtype), 3, 2, 3, 9, backend=backend).episodes(0, 100)
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_array_equal(got[1], want[1])
    got = EpisodeSampler(torch.as_tensor(labels), 3, 2, 3, 9).episodes(0, 100)
    np.testing.assert_array_equal(got[1], want[1])


# -- what every episode must satisfy -------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_episode_invariants(backend):
    sizes, values = [16, 17, 20, 30, 16, 25, 40, 18], [9, -3, 4, 100, 7, 0, 55, 12]
    labels = _labels(sizes, values)
    n_way, k, q = 5, 3, 13
    classes, index = EpisodeSampler(labels, n_way, k, q, 4, backend=backend).episodes(10, 400)
    assert classes.shape == (400, n_way) and index.shape == (400, n_way, k + q)
    assert set(np.unique(classes)) == set(values)
    for c, idx in zip(classes, index):
        assert len(set(c.tolist())) == n_way                         # distinct classes
        for w in range(n_way):
            assert len(set(idx[w].tolist())) == k + q                # distinct images
            assert (labels[idx[w]] == c[w]).all()                    # slot w is class c[w]


@pytest.mark.parametrize("backend", BACKENDS)
def test_class_and_image_frequencies_are_uniform(backend):
    stats = pytest.importorskip("scipy.stats")
    sizes = [7, 9, 12, 7, 30, 11, 8, 10]
    labels = _labels(sizes)
    n_way, k, q = 3, 2, 5
    classes, index = EpisodeSampler(labels, n_way, k, q, 2024, backend=backend).episodes(0, 8000)
    # Each class is in an episode with probability n_way / C, in any of its slots.
    counts = np.bincount(classes.reshape(-1), minlength=len(sizes))
    assert stats.chisquare(counts).pvalue > 1e-3
    for w in range(n_way):
        assert stats.chisquare(np.bincount(classes[:, w], minlength=len(sizes))).pvalue > 1e-3
    # Given its class, every image is equally likely in every position (support or query).
    for c, m in enumerate(sizes):
        rows = index[classes == c]                                   # (appearances, k + q)
        members = np.flatnonzero(labels == c)
        rank = np.searchsorted(members, rows)
        assert stats.chisquare(np.bincount(rank.reshape(-1), minlength=m)).pvalue > 1e-3
        assert stats.chisquare(np.bincount(rank[:, 0], minlength=m)).pvalue > 1e-3
        assert stats.chisquare(np.bincount(rank[:, -1], minlength=m)).pvalue > 1e-3


# -- episodes are a pure function of (seed, number) ----------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_single_episode_and_batch_splits_agree(backend):
    labels = _labels([25] * 10 + [31] * 5)
    s = EpisodeSampler(labels, 5, 2, 7, 77, backend=backend)
    classes, index = s.episodes(100, 1500)
    for e in (100, 101, 611, 612, 1599):                             # across numpy chunks too
        c, i = s.episode(e)
        np.testing.assert_array_equal(c, classes[e - 100])
        np.testing.assert_array_equal(i, index[e - 100])
    parts = [s.episodes(100, 1), s.episodes(101, 511), s.episodes(612, 988)]
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), classes)
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), index)
    assert s.episodes(5, 0)[1].shape == (0, 5, 9)


@needs_cpp
def test_thread_count_does_not_change_episodes():
    labels = _labels([50] * 40)
    want = EpisodeSampler(labels, 5, 1, 15, 3, backend="cpp", num_threads=1).episodes(7, 20000)
    for threads in (2, 3, 8):
        got = EpisodeSampler(labels, 5, 1, 15, 3, backend="cpp",
                             num_threads=threads).episodes(7, 20000)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])


def test_seeds_and_numbers_give_different_episodes():
    labels = _labels([30] * 20)
    a = EpisodeSampler(labels, 5, 1, 5, 0).episodes(0, 50)[1]
    b = EpisodeSampler(labels, 5, 1, 5, 1).episodes(0, 50)[1]
    assert not np.array_equal(a, b)
    assert len({tuple(x.reshape(-1)) for x in a}) == 50


# -- back-end selection --------------------------------------------------------------------

def test_backend_reports_the_extension():
    assert sampling.backend() == ("cpp" if HAVE_CPP else "numpy")
    assert EpisodeSampler(_labels([5] * 5), 2, 1, 1).backend == sampling.backend()
    assert EpisodeSampler(_labels([5] * 5), 2, 1, 1, backend="numpy").backend == "numpy"
    with pytest.raises(ValueError, match="backend"):
        EpisodeSampler(_labels([5] * 5), 2, 1, 1, backend="cuda")


def test_package_works_without_the_extension(monkeypatch):
    labels = _labels([6] * 6)
    want = EpisodeSampler(labels, 3, 2, 2, 5, backend="numpy").episodes(0, 20)
    monkeypatch.setattr(sampling, "_cpp", None)
    assert sampling.backend() == "numpy"
    s = EpisodeSampler(labels, 3, 2, 2, 5)
    assert s.backend == "numpy"
    np.testing.assert_array_equal(s.episodes(0, 20)[1], want[1])
    with pytest.raises(ValueError, match="not built"):
        EpisodeSampler(labels, 3, 2, 2, 5, backend="cpp")
    ds = _dataset()
    x = assemble(ds.images, want[1], mean=ds.mean, std=ds.std)
    assert torch.equal(x, ds.tensor(want[1]))
    batch = next(iter(EpisodeLoader(ds, 3, 2, 2, 2, seed=5, batches=1)))
    assert batch.images.shape == (2, 3, 4, 3, 6, 7)


# -- errors are ValueErrors with a useful message ------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_sampler_errors(backend):
    labels = _labels([10, 4, 10], [0, 7, 2])
    with pytest.raises(ValueError, match=r"class 7, which has 4 images"):
        EpisodeSampler(labels, 2, 2, 3, 0, backend=backend)
    with pytest.raises(ValueError, match=r"n_way=4 is larger than the number of classes \(3\)"):
        EpisodeSampler(labels, 4, 1, 1, 0, backend=backend)
    with pytest.raises(ValueError, match="integers"):
        EpisodeSampler(labels.astype(np.float32), 2, 1, 1, 0, backend=backend)
    with pytest.raises(ValueError, match="1-D"):
        EpisodeSampler(labels.reshape(2, -1), 2, 1, 1, 0, backend=backend)
    for bad in (-1, 2**64, 1.5, True):
        with pytest.raises(ValueError, match="seed"):
            EpisodeSampler(labels, 2, 1, 1, bad, backend=backend)
    for kwargs in ({"n_way": 0}, {"k_shot": 0}, {"n_query": -1}, {"n_way": 2.0}):
        args = {"n_way": 2, "k_shot": 1, "n_query": 1, **kwargs}
        with pytest.raises(ValueError):
            EpisodeSampler(labels, seed=0, backend=backend, **args)
    s = EpisodeSampler(labels, 2, 1, 1, 0, backend=backend)
    for start, count in [(-1, 1), (0, -1), (2**64 - 1, 2), (0.5, 1)]:
        with pytest.raises(ValueError):
            s.episodes(start, count)
    with pytest.raises(ValueError, match="num_threads"):
        EpisodeSampler(labels, 2, 1, 1, 0, backend=backend, num_threads=0)


@needs_cpp
def test_cpp_core_validates_its_buffers():
    core = sampling._cpp
    labels = np.repeat(np.arange(4, dtype=np.int64), 5)
    for bad in (labels.astype(np.int32), labels.astype(np.float64), labels[::2],
                labels.reshape(4, 5)):
        with pytest.raises(ValueError):
            core.Sampler(bad, 2, 1, 1, 0)
    with pytest.raises(ValueError, match="seed"):
        core.Sampler(labels, 2, 1, 1, -3)
    with pytest.raises(ValueError, match="class 0, which has 5 images"):
        core.Sampler(labels, 2, 3, 3, 0)
    s = core.Sampler(labels, 2, 1, 1, 0)
    with pytest.raises(ValueError):
        s.sample(-1, 3)
    with pytest.raises(ValueError):
        s.sample(0, -3)

    images = np.zeros((6, 4, 5, 3), np.uint8)
    index = np.arange(6, dtype=np.int64).reshape(2, 3)
    out = np.zeros((2, 3, 3, 4, 5), np.float32)
    lut = np.zeros((3, 256), np.float32)
    core.assemble(images, index, out, lut)
    bad_calls = [
        (images.astype(np.float32), index, out, lut),                 # wrong image dtype
        (images[:, ::2], index, np.zeros((2, 3, 3, 2, 5), np.float32), lut),  # strided
        (images[..., 0:1].reshape(6, 4, 5), index, out, lut),         # shape mismatch
        (images, index.astype(np.int32), out, lut),                   # wrong index dtype
        (images, index.T, out, lut),                                  # non-contiguous index
        (images, index + 1, out, lut),                                # out of range
        (images, -index, out, lut),                                   # negative
        (images, index, out.astype(np.float64), lut),                 # wrong out dtype
        (images, index, out[:, :2], lut),                             # wrong out shape
        (images, index, out, None),                                   # float without lut
        (images, index, out, lut[:2]),                                # lut shape
        (images, index, out, lut.astype(np.float64)),                 # lut dtype
        (images, index, out.astype(np.uint8), lut),                   # uint8 with lut
    ]
    for args in bad_calls:
        with pytest.raises(ValueError):
            core.assemble(*args)


# -- batch assembly ------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(6, 7, 3), (5, 4), (5, 4, 1)])
def test_assemble_matches_dataset_tensor(backend, shape):
    ds = _dataset(shape=shape)
    index = EpisodeSampler(ds.labels, 4, 2, 3, 1).episodes(0, 3)[1]
    x = assemble(ds.images, index, mean=ds.mean, std=ds.std, backend=backend)
    want = ds.tensor(index)
    assert x.dtype == torch.float32 and x.shape == index.shape + ds.image_shape
    assert torch.equal(x, want)                                       # bit for bit
    u = assemble(ds.images, index, dtype=torch.uint8, backend=backend)
    raw = torch.from_numpy(ds.images[index.reshape(-1)])
    raw = raw.unsqueeze(1) if raw.dim() == 3 else raw.permute(0, 3, 1, 2)
    assert u.dtype == torch.uint8 and torch.equal(u.reshape(raw.shape), raw)
    plain = assemble(torch.from_numpy(ds.images), torch.as_tensor(index), backend=backend)
    np.testing.assert_allclose(plain.reshape(-1, *raw.shape[1:]).numpy(),
                               raw.numpy().astype(np.float32) / 255, rtol=0, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_assemble_into_out_and_any_index_shape(backend):
    ds = _dataset()
    out = torch.full((2, 2, 3, 6, 7), -1.0)
    index = np.array([[0, 5], [95, 3]])
    got = assemble(ds.images, index, out=out, mean=ds.mean, std=ds.std, backend=backend,
                   num_threads=2)
    assert got is out and torch.equal(out, ds.tensor(index))
    one = assemble(ds.images, np.int64(7), mean=ds.mean, std=ds.std, backend=backend)
    assert one.shape == (3, 6, 7) and torch.equal(one, ds.tensor(np.array([7]))[0])
    pinned = assemble(ds.images, [1, 2], pin_memory=True, backend=backend)  # no CUDA: ignored
    assert pinned.shape == (2, 3, 6, 7)
    assert assemble(ds.images, np.zeros((0, 3), np.int64), backend=backend).shape == (0, 3, 3, 6, 7)


@needs_cpp
def test_assemble_threads_and_backends_agree():
    ds = _dataset(n_classes=20, per_class=30, shape=(84, 84, 3))
    index = EpisodeSampler(ds.labels, 5, 5, 15, 0).episodes(0, 4)[1]
    want = assemble(ds.images, index, mean=ds.mean, std=ds.std, backend="numpy")
    for threads in (1, 2, 4):
        got = assemble(ds.images, index, mean=ds.mean, std=ds.std, num_threads=threads)
        assert torch.equal(got, want)
        got8 = assemble(ds.images, index, dtype=torch.uint8, num_threads=threads)
        assert torch.equal(got8, assemble(ds.images, index, dtype=torch.uint8, backend="numpy"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_assemble_errors(backend):
    ds = _dataset()
    index = np.array([0, 1])
    bad = [
        dict(images=ds.images.astype(np.float32)),
        dict(images=ds.images[:, :, ::2]),                           # non-contiguous
        dict(images=ds.images[0, 0]),                                # ndim
        dict(index=np.array([0.0, 1.0])),
        dict(index=np.array([0, len(ds)])),
        dict(index=np.array([-1, 0])),
        dict(dtype=torch.float64),
        dict(dtype=torch.uint8, mean=ds.mean),
        dict(mean=(0.1, 0.2)),
        dict(out=torch.empty(2, 3, 6, 7, dtype=torch.float64)),
        dict(out=torch.empty(2, 3, 7, 6)),
        dict(out=torch.empty(3, 2, 6, 7).transpose(0, 1)),           # non-contiguous out
        dict(out=np.empty((2, 3, 6, 7), np.float32)),
    ]
    for kwargs in bad:
        args = {"images": ds.images, "index": index, "backend": backend, **kwargs}
        with pytest.raises(ValueError):
            assemble(**args)


# -- the loader ----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("prefetch", [True, False])
def test_loader_batches(backend, prefetch):
    ds = _dataset()
    loader = EpisodeLoader(ds, 4, 2, 3, tasks_per_batch=3, seed=11, start=5, prefetch=prefetch,
                           batches=4, backend=backend)
    assert len(loader) == 4
    sampler = EpisodeSampler(ds.labels, 4, 2, 3, 11, backend="numpy")
    batches = list(loader)
    assert len(batches) == 4
    for b, batch in enumerate(batches):
        assert isinstance(batch, EpisodeBatch) and batch.k_shot == 2
        classes, index = sampler.episodes(5 + 3 * b, 3)
        assert batch.images.shape == (3, 4, 5, 3, 6, 7) and batch.images.dtype == torch.float32
        assert torch.equal(batch.images, ds.tensor(index))
        assert batch.labels.dtype == batch.tasks.dtype == batch.classes.dtype == torch.int64
        assert torch.equal(batch.labels, torch.arange(4).view(1, 4, 1).expand(3, 4, 5))
        assert torch.equal(batch.tasks, torch.arange(3).view(3, 1, 1).expand(3, 4, 5))
        assert torch.equal(batch.classes, torch.from_numpy(classes))
        assert torch.equal(batch.classes[:, :, None].expand(3, 4, 5),
                           torch.from_numpy(ds.labels[index]))
        assert batch.episodes.tolist() == [5 + 3 * b, 6 + 3 * b, 7 + 3 * b]


def test_loader_is_endless_resumable_and_works_under_dataloader():
    ds = _dataset()
    loader = EpisodeLoader(ds, 3, 1, 2, tasks_per_batch=2, seed=0)
    with pytest.raises(TypeError):
        len(loader)
    it = iter(loader)
    first = [next(it) for _ in range(3)]
    it.close()                                                       # stops the prefetcher
    resumed = EpisodeLoader(ds, 3, 1, 2, tasks_per_batch=2, seed=0, start=4)
    assert torch.equal(next(iter(resumed)).images, first[2].images)
    assert torch.equal(loader.batch(2).images, first[2].images)
    dl = torch.utils.data.DataLoader(EpisodeLoader(ds, 3, 1, 2, 2, seed=0, batches=3),
                                     batch_size=None)
    for got, want in zip(dl, first):
        assert torch.equal(got.images, want.images) and torch.equal(got.classes, want.classes)
    moved = first[0].to("cpu")
    assert torch.equal(moved.labels, first[0].labels)


def test_loader_errors_name_the_class():
    labels = np.repeat(np.arange(4), [6, 6, 3, 6])
    lopsided = FewShotDataset(np.zeros((21, 5, 5), np.uint8), labels, ["a", "b", "tiny", "d"])
    with pytest.raises(ValueError, match=r"class 2 \('tiny'\), which has 3 images"):
        EpisodeLoader(lopsided, 2, 2, 2, 1, seed=0)
    with pytest.raises(ValueError, match="n_way"):
        EpisodeLoader(lopsided, 5, 1, 1, 1, seed=0)
    with pytest.raises(ValueError, match="FewShotDataset"):
        EpisodeLoader(object(), 2, 1, 1, 1, seed=0)
    with pytest.raises(ValueError, match="tasks_per_batch"):
        EpisodeLoader(lopsided, 2, 1, 1, 0, seed=0)


def test_loader_stride_gives_each_rank_its_block_of_every_step():
    """stride = a whole step's tasks: rank r's batches are its blocks of the global ones."""
    ds = _dataset()
    whole = list(EpisodeLoader(ds, 3, 1, 2, tasks_per_batch=4, seed=2, start=8, batches=3))
    for r in range(2):
        part = list(EpisodeLoader(ds, 3, 1, 2, tasks_per_batch=2, seed=2, start=8 + 2 * r,
                                  stride=4, batches=3))
        for got, want in zip(part, whole):
            assert torch.equal(got.images, want.images[2 * r:2 * r + 2])
            assert torch.equal(got.episodes, want.episodes[2 * r:2 * r + 2])
    with pytest.raises(ValueError, match="stride"):
        EpisodeLoader(ds, 3, 1, 2, tasks_per_batch=2, seed=2, stride=0)
