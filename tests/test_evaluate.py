"""The evaluation protocol: seeded, the CI formula, the logistic head, clear errors."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from fastmtl import evaluate
from fastmtl.data import FewShotDataset
from fastmtl.evaluate import embed, feature_mean


class _Pixels(nn.Module):
    def forward(self, x):
        return x.flatten(1)


def _blobs(n_classes=12, per=20, size=8, noise=0.6, seed=0):
    """Each class a random grey pattern; images are the pattern plus noise."""
    rng = np.random.default_rng(seed)
    proto = rng.uniform(0, 255, (n_classes, size, size))
    imgs = proto[:, None] + rng.normal(0, 255 * noise, (n_classes, per, size, size))
    imgs = np.clip(imgs, 0, 255).astype(np.uint8).reshape(-1, size, size)
    return FewShotDataset(imgs, np.repeat(np.arange(n_classes), per),
                          [f"c{i}" for i in range(n_classes)])


def test_evaluate_is_seeded_and_reports_the_ci():
    ds = _blobs()
    a = evaluate(_Pixels(), ds, n_way=5, k_shot=1, n_query=5, episodes=60, seed=3, progress=False)
    b = evaluate(_Pixels(), ds, n_way=5, k_shot=1, n_query=5, episodes=60, seed=3, progress=False)
    c = evaluate(_Pixels(), ds, n_way=5, k_shot=1, n_query=5, episodes=60, seed=4, progress=False)
    assert a["accuracies"] == b["accuracies"] and a["accuracies"] != c["accuracies"]
    acc = np.array(a["accuracies"])
    assert a["mean"] == pytest.approx(acc.mean())
    assert a["ci95"] == pytest.approx(1.96 * acc.std() / math.sqrt(60))
    assert a["episodes"] == 60 and a["n_way"] == 5 and a["k_shot"] == 1


def test_more_shots_and_less_noise_help():
    easy, hard = _blobs(noise=0.3), _blobs(noise=1.2)
    r = {name: evaluate(_Pixels(), ds, n_way=5, k_shot=k, n_query=5, episodes=80, progress=False)
         for name, ds, k in (("easy1", easy, 1), ("hard1", hard, 1), ("hard5", hard, 5))}
    assert r["easy1"]["mean"] > 90
    assert r["hard5"]["mean"] > r["hard1"]["mean"] + 5
    assert r["hard1"]["mean"] > 25


def test_precomputed_features_give_the_same_result():
    ds = _blobs()
    feats = embed(_Pixels(), ds)
    assert torch.allclose(feats.norm(dim=1), torch.ones(len(ds)))
    a = evaluate(_Pixels(), ds, k_shot=5, n_query=5, episodes=30, progress=False)
    b = evaluate(None, ds, k_shot=5, n_query=5, episodes=30, features=feats, progress=False)
    assert a["accuracies"] == b["accuracies"]


def test_evaluate_errors():
    ds = _blobs(n_classes=6, per=10)
    with pytest.raises(ValueError, match="k_shot \\+ n_query"):
        evaluate(_Pixels(), ds, n_way=5, k_shot=5, n_query=6, episodes=5, progress=False)
    with pytest.raises(ValueError, match="n_way"):
        evaluate(_Pixels(), ds, n_way=7, k_shot=1, n_query=5, episodes=5, progress=False)
    with pytest.raises(ValueError, match="episodes"):
        evaluate(_Pixels(), ds, episodes=0, progress=False)
    with pytest.raises(ValueError, match="n_query"):
        evaluate(_Pixels(), ds, n_query=0, episodes=3, progress=False)
    with pytest.raises(ValueError, match="features"):
        evaluate(_Pixels(), ds, n_query=5, episodes=3, features=torch.zeros(3, 4), progress=False)
    with pytest.raises(ValueError, match="dataset"):
        evaluate(_Pixels(), np.zeros((5, 8, 8)), episodes=3, progress=False)
    with pytest.raises(ValueError, match="tol"):
        evaluate(_Pixels(), ds, n_query=5, episodes=3, tol=0.0, progress=False)


def test_the_fits_stop_at_the_protocols_tolerance(monkeypatch):
    """evaluate() fits at tol 1e-5 unless told (fit_logistic's own default is 1e-7), and
    here that changes no prediction."""
    import importlib
    ev = importlib.import_module("fastmtl.evaluate")   # the module, not the function
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs["tol"])
        return fit(*args, **kwargs)
    fit = ev.fit_logistic
    monkeypatch.setattr(ev, "fit_logistic", spy)
    ds = _blobs(noise=1.0)
    loose = evaluate(_Pixels(), ds, k_shot=5, n_query=5, episodes=40, progress=False)
    tight = evaluate(_Pixels(), ds, k_shot=5, n_query=5, episodes=40, tol=1e-7, progress=False)
    assert seen == [1e-5, 1e-7] and loose["tol"] == 1e-5 and tight["tol"] == 1e-7
    assert loose["accuracies"] == tight["accuracies"]


# ----------------------------------------------------------- centring (SimpleShot's CL2N)
def test_centred_features_match_a_float64_reference():
    train, test = _blobs(seed=1), _blobs(n_classes=6, per=10, seed=2)
    mu = feature_mean(_Pixels(), train)
    raw_train = train.tensor(np.arange(len(train))).flatten(1).double()
    torch.testing.assert_close(mu.double(), raw_train.mean(0), rtol=1e-5, atol=1e-5)
    raw = test.tensor(np.arange(len(test))).flatten(1).double()
    ref = (raw - raw_train.mean(0)) / (raw - raw_train.mean(0)).norm(dim=1, keepdim=True)
    got = embed(_Pixels(), test, centre=mu)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    # evaluate(centre=) is evaluate on those features
    a = evaluate(_Pixels(), test, k_shot=1, n_query=5, episodes=30, centre=mu, progress=False)
    b = evaluate(None, test, k_shot=1, n_query=5, episodes=30, features=got, progress=False)
    assert a["accuracies"] == b["accuracies"]


def test_centred_protocol_ignores_what_every_feature_shares():
    """A feature shared by every image (training and test alike) changes the cosine
    geometry of the plain protocol, but not the centred one's: the training mean holds it."""
    shift = 3.0 * torch.rand(64, generator=torch.Generator().manual_seed(0))

    class _Shifted(nn.Module):
        def forward(self, x):
            return x.flatten(1) + shift
    train, test = _blobs(seed=1), _blobs(seed=2, noise=0.9)
    runs = {}
    for name, net in (("plain", _Pixels()), ("shifted", _Shifted())):
        for centred in (False, True):
            mu = feature_mean(net, train) if centred else None
            runs[name, centred] = evaluate(net, test, k_shot=1, n_query=5, episodes=100,
                                           centre=mu, progress=False)["accuracies"]
    assert runs["plain", False] != runs["shifted", False]
    np.testing.assert_allclose(runs["shifted", True], runs["plain", True], atol=1e-9)


def test_centre_errors_come_before_any_work():
    ds = _blobs(n_classes=6, per=10)

    class _Refuses(nn.Module):
        def forward(self, x):
            raise AssertionError("embedded before the centre was checked")
    for bad in (torch.zeros(3, 4), torch.zeros(4, dtype=torch.int64), [0.0] * 64,
                torch.full((64,), float("nan"))):
        with pytest.raises(ValueError, match="centre"):
            embed(_Refuses(), ds, centre=bad)
    with pytest.raises(ValueError, match="centre must be a float tensor of shape \\(64,\\)"):
        embed(_Pixels(), ds, centre=torch.zeros(5))
    with pytest.raises(ValueError, match="centre"):
        evaluate(None, ds, n_query=5, episodes=3, features=embed(_Pixels(), ds),
                 centre=torch.zeros(64),
                 progress=False)


# ------------------------------------------------ shifted views (fastmtl eval --views)
def _shifted_reference(imgs: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """(N, H, W) float64 images moved by (dy, dx), the edge rows / columns repeated."""
    h, w = imgs.shape[-2:]
    rows = np.clip(np.arange(h) - dy, 0, h - 1)
    cols = np.clip(np.arange(w) - dx, 0, w - 1)
    return imgs[:, rows][:, :, cols]


def test_views_match_a_float64_reference():
    from fastmtl.evaluate import SHIFTS
    train, test = _blobs(seed=1), _blobs(n_classes=6, per=10, seed=2)
    mu = feature_mean(_Pixels(), train)
    raw = test.tensor(np.arange(len(test)))[:, 0].double()
    ref = []
    for dy, dx in SHIFTS:
        z = _shifted_reference(raw, dy, dx).flatten(1) - mu.double()
        ref.append(z / z.norm(dim=1, keepdim=True))
    ref = torch.stack(ref, 1)
    for batch_size in (256, 20, 7):      # whole, ragged and one-image-a-call batches
        got = embed(_Pixels(), test, centre=mu, views=True, batch_size=batch_size)
        assert got.shape == (len(test), len(SHIFTS), 64)
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    # the first view is the plain protocol's feature
    torch.testing.assert_close(got[:, 0], embed(_Pixels(), test, centre=mu))


def test_views_protocol_fits_every_support_view_and_scores_the_query_mean():
    from fastmtl.adapt import fit_logistic
    from fastmtl.sampling import EpisodeSampler
    ds = _blobs(n_classes=8, per=12, seed=3, noise=0.9)
    z = embed(_Pixels(), ds, views=True)
    for k in (1, 3):
        got = evaluate(_Pixels(), ds, k_shot=k, n_query=4, episodes=12, seed=5, views=True,
                       progress=False)
        same = evaluate(None, ds, k_shot=k, n_query=4, episodes=12, seed=5, features=z,
                        progress=False)
        assert got["accuracies"] == same["accuracies"]
        _, picked = EpisodeSampler(ds.labels, 5, k, 4, 5).episodes(0, 12)
        for e, episode in enumerate(picked):     # one episode at a time, by hand
            rows, labels, queries, truth = [], [], [], []
            for c, images in enumerate(episode):
                for i in images[:k]:
                    rows += list(z[i])
                    labels += [c] * z.shape[1]
                for i in images[k:]:
                    queries.append(z[i].mean(0) / z[i].mean(0).norm())
                    truth.append(c)
            head = fit_logistic(torch.stack(rows)[None], torch.tensor(labels)[None], C=3.0,
                                n_classes=5)
            hit = (head.predict(torch.stack(queries)[None])[0] == torch.tensor(truth))
            assert 100 * hit.double().mean().item() == pytest.approx(got["accuracies"][e])


def test_views_errors():
    ds = _blobs(n_classes=6, per=10)
    with pytest.raises(ValueError, match="views is applied when embedding"):
        evaluate(None, ds, n_query=5, episodes=3, features=embed(_Pixels(), ds), views=True,
                 progress=False)
    with pytest.raises(ValueError, match="features must be"):
        evaluate(None, ds, n_query=5, episodes=3, features=torch.zeros(len(ds), 2, 3, 4),
                 progress=False)
