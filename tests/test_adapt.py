"""fit_logistic against scikit-learn's LogisticRegression, its edge cases, and its errors.

The reference is scikit-learn run to a tight tolerance (tol=1e-10, max_iter=10000):
heads must match to 1e-3 relative (intercepts compared centred, as both return them),
and query predictions must agree with scikit-learn's default settings on >= 99%.
"""
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression

from fastmtl import adapt
from fastmtl.adapt import LogisticHeads, fit_logistic

TIGHT = {"tol": 1e-10, "max_iter": 10000}
DEFAULT = {"max_iter": 1000}          # the paper's protocol, scikit-learn's default tol


@pytest.fixture(autouse=True)
def _one_thread():
    # The solver makes many small calls; on a machine shared with other jobs, torch's
    # threads mostly wait on each other there (10x slower), so these tests use one.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _episodes(E, n_way, shot, d, kind="normalized", n_query=15, seed=0):
    """Support/query features of E episodes: class means plus noise.

    kind: "normalized" (L2-normalized, like backbone features), "easy" (well separated),
    "hard" (noise swamps the class means), "raw" (unnormalized Gaussian, norm ~ sqrt(d)).
    """
    g = torch.Generator().manual_seed(seed)
    noise = {"normalized": 1.5, "easy": 0.2, "hard": 10.0, "raw": 1.0}[kind]
    means = torch.randn(E, n_way, 1, d, generator=g, dtype=torch.float64)
    z = means + noise * torch.randn(E, n_way, shot + n_query, d, generator=g,
                                    dtype=torch.float64)
    if kind != "raw":
        z = F.normalize(z, dim=-1)
    support = z[:, :, :shot].reshape(E, n_way * shot, d)
    query = z[:, :, shot:].reshape(E, n_way * n_query, d)
    y_support = torch.arange(n_way).repeat_interleave(shot).expand(E, -1)
    y_query = torch.arange(n_way).repeat_interleave(n_query).expand(E, -1)
    return support, y_support, query, y_query


def _sklearn(z, y, n_classes, C=3.0, **kw):
    """scikit-learn per episode, as full heads: absent classes get zero weights and a -inf
    intercept, a binary fit becomes its symmetric two-row form, intercepts are centred."""
    E, _, d = z.shape
    weight = np.zeros((E, n_classes, d))
    bias = np.full((E, n_classes), -np.inf)
    models = []
    for e in range(E):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = LogisticRegression(C=C, solver="lbfgs", **kw).fit(z[e].numpy(),
                                                                      y[e].numpy())
        cls = model.classes_
        coef, icpt = model.coef_, model.intercept_
        if len(cls) == 2:
            coef = np.concatenate([-coef / 2, coef / 2])
            icpt = np.concatenate([-icpt / 2, icpt / 2])
        weight[e, cls] = coef
        bias[e, cls] = icpt - icpt.mean()
        models.append(model)
    return weight, bias, models


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _assert_matches(heads, weight, bias, tol=1e-3):
    W, b = heads.weight.double().numpy(), heads.bias.double().numpy()
    for e in range(W.shape[0]):
        present = np.isfinite(bias[e])
        assert np.array_equal(np.isfinite(b[e]), present)
        assert _rel(W[e], weight[e]) < tol, f"episode {e}: weights off"
        assert _rel(b[e, present], bias[e, present]) < tol, f"episode {e}: intercepts off"


CASES = [  # n_way, shot, d, kind
    (5, 1, 640, "normalized"),
    (5, 5, 640, "normalized"),
    (5, 5, 64, "easy"),
    (5, 5, 64, "hard"),
    (5, 1, 16, "normalized"),
    (5, 5, 16, "raw"),               # S = 25 > d = 16: a singular Gram matrix
    (3, 5, 640, "normalized"),
    (3, 1, 64, "raw"),
    (20, 1, 64, "normalized"),
]


# Many support rows in few features (eval --views: 900 rows of 256-d features): the Gram
# matrix is kept as its (S, d + 1) factor where S > adapt._FACTOR_ROWS (d + 1).
FACTORED = [  # n_way, shot, d, kind
    (5, 10, 8, "normalized"),
    (3, 8, 4, "raw"),
    (20, 2, 8, "hard"),
    (5, 6, 4, "easy"),
]


@pytest.mark.parametrize("n_way,shot,d,kind", CASES + FACTORED)
def test_matches_sklearn(n_way, shot, d, kind):
    zs, ys, zq, _ = _episodes(3, n_way, shot, d, kind, seed=n_way * 100 + shot * 10 + d)
    heads = fit_logistic(zs, ys, C=3.0)
    assert heads.weight.shape == (3, n_way, d) and heads.bias.shape == (3, n_way)
    assert bool(heads.converged.all())
    weight, bias, models = _sklearn(zs, ys, n_way, **TIGHT)
    _assert_matches(heads, weight, bias)
    pred = heads.predict(zq).numpy()
    ref = np.stack([m.predict(zq[e].numpy()) for e, m in enumerate(models)])
    assert (pred == ref).mean() >= 0.99


def _tight_episodes(E, seed, n_way=20, shot=5, d=256, noise=0.1):
    """Features like a well-trained backbone's: tight classes, non-negative (after a ReLU),
    L2-normalized, float32; 20-way 5-shot gives an ill-conditioned Gram matrix."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(E, n_way, 1, d, generator=g)
    z = F.normalize((means + noise * torch.randn(E, n_way, shot + 15, d, generator=g)).relu(),
                    dim=-1)
    support = z[:, :, :shot].reshape(E, n_way * shot, d)
    query = z[:, :, shot:].reshape(E, n_way * 15, d)
    return (support, torch.arange(n_way).repeat_interleave(shot).expand(E, -1), query,
            torch.arange(n_way).repeat_interleave(15).expand(E, -1))


def test_tight_classes_at_20_way_5_shot_converge_to_sklearns_heads():
    """Regression: float32 CG stalled on such episodes (3 of these 100), its recurrence then
    diverged, and the heads came back NaN (chance-level accuracy, counted as a result)."""
    zs, ys, zq, yq = _tight_episodes(100, seed=2)
    heads = fit_logistic(zs, ys, C=3.0, n_classes=20)
    assert bool(torch.isfinite(heads.weight).all()) and bool(torch.isfinite(heads.bias).all())
    assert bool(heads.converged.all())
    assert (heads.predict(zq) == yq).float().mean(1).min() > 0.8
    once_bad = [5, 55, 96]
    weight, bias, _ = _sklearn(zs[once_bad].double(), ys[once_bad], 20, **TIGHT)
    sub = LogisticHeads(heads.weight[once_bad], heads.bias[once_bad],
                        heads.n_iter[once_bad], heads.converged[once_bad])
    _assert_matches(sub, weight, bias)


def _newton_system(E):
    """A Newton system of E tight 20-way 5-shot episodes at a random point: the arguments
    of adapt._pcg before the target and the frozen mask."""
    zs, ys, _, _ = _tight_episodes(E, seed=2)
    x = zs.to(torch.float32)
    gram = (x @ x.transpose(1, 2)).double()
    rowm = gram.mean(2, keepdim=True)
    gram_aug = gram - rowm - rowm.transpose(1, 2) + rowm.mean(1, keepdim=True) + 0.01
    K, S = 20, 100
    onehot = F.one_hot(ys, K).transpose(1, 2).double()
    coef = torch.randn(E, K, S, generator=torch.Generator().manual_seed(0),
                       dtype=torch.float64)
    prob = (coef @ gram_aug).softmax(1)
    c = torch.full((E,), 3.0, dtype=torch.float64)
    k = torch.full((E,), 0.01, dtype=torch.float64)
    grad = c.view(-1, 1, 1) * (prob - onehot) + coef - coef.sum(-1, keepdim=True) / S
    grad2 = torch.stack([grad, grad @ gram_aug])
    fill = torch.full((E, K, K), 1.0 / K)
    return gram_aug.float(), gram_aug, prob, fill, c, k, grad2


def test_cg_asked_for_more_than_float32_holds_returns_a_finite_descent_step():
    """The stall path: a Newton step of tight 20-way 5-shot episodes with a target no
    float32 residual reaches (0) must come back finite, with its image, downhill and
    lowering the Newton model; the old loop ran on for K * S iterations instead."""
    E, S = 4, 100
    system = _newton_system(E)
    gram_aug, prob, c, k, grad2 = system[1], system[2], system[4], system[5], system[6]
    grad = grad2[0]
    step, step_img = adapt._pcg(*system, torch.zeros(E, dtype=torch.float64),
                                torch.zeros(E, dtype=torch.bool))
    assert bool(torch.isfinite(step).all()) and bool(torch.isfinite(step_img).all())
    torch.testing.assert_close(step_img, step @ gram_aug)
    slope = (grad * step_img).sum((1, 2))
    assert bool((slope < 0).all())                                # downhill, every episode
    # and the Newton model falls: the old loop's last iterate raised it on one of these
    shift = torch.stack([torch.full((E, 1, 1), 1.0 / S), k.float()[:, None, None]])
    h_img = adapt._hessian_product(torch.stack([step, step_img]).float(), prob.float(),
                                   c.float()[:, None, None], shift, gram_aug.float())[1]
    assert bool((slope + 0.5 * (step * h_img.double()).sum((1, 2)) < 0).all())


def test_a_short_cg_keeps_its_step_beside_a_long_one():
    """Regression: once one episode's CG ran past _CG_PLAIN iterations, every episode whose
    CG had already ended got a zero step (its answer was not kept), so on real 20-way
    5-shot batches most episodes froze and ran to max_iter unconverged (392 of 500)."""
    E = 3
    system = _newton_system(E)
    grad2 = system[6]
    r0 = (grad2[0] * grad2[1]).sum((1, 2))
    # Episode 0 is asked for little (ends in a few iterations), the others for all.
    target2 = torch.cat([0.25 * r0[:1], torch.zeros(E - 1, dtype=torch.float64)])
    frozen = torch.zeros(E, dtype=torch.bool)
    step, step_img = adapt._pcg(*system, target2, frozen)
    alone = [t[:1] if t.shape[0] == E else t[:, :1] for t in system]
    step0, step0_img = adapt._pcg(*alone, target2[:1], frozen[:1])
    assert float(step0.abs().max()) > 0
    torch.testing.assert_close(step[:1], step0)
    torch.testing.assert_close(step_img[:1], step0_img)
    assert bool((step[1:].abs().amax((1, 2)) > 0).all())


def test_an_episode_fits_alike_alone_and_beside_tight_ones():
    """Whole fits: episodes of looser classes take the same Newton iterations, and get the
    same heads, alone and batched with tight ones whose CGs run long (they took one
    more iteration, a lost step, before the fix above)."""
    tight, ys, _, _ = _tight_episodes(10, seed=2)
    loose, _, _, _ = _tight_episodes(4, seed=3, noise=0.3)
    y = ys[:1].expand(14, -1)
    batched = fit_logistic(torch.cat([loose, tight]), y, n_classes=20)
    alone = fit_logistic(loose, y[:4], n_classes=20)
    assert bool(batched.converged.all())
    assert batched.n_iter[:4].tolist() == alone.n_iter.tolist()
    torch.testing.assert_close(batched.weight[:4], alone.weight)
    torch.testing.assert_close(batched.bias[:4], alone.bias)


@pytest.mark.parametrize("C", [0.1, 1.0, 30.0])
def test_matches_sklearn_for_other_C(C):
    zs, ys, _, _ = _episodes(3, 5, 5, 64, seed=7)
    heads = fit_logistic(zs, ys, C=C)
    weight, bias, _ = _sklearn(zs, ys, 5, C=C, **TIGHT)
    _assert_matches(heads, weight, bias)


@pytest.mark.parametrize("shot", [1, 5])
def test_predictions_agree_with_default_sklearn(shot):
    zs, ys, zq, yq = _episodes(20, 5, shot, 640, seed=shot)
    pred = fit_logistic(zs, ys).predict(zq).numpy()
    _, _, models = _sklearn(zs, ys, 5, **DEFAULT)
    ref = np.stack([m.predict(zq[e].numpy()) for e, m in enumerate(models)])
    assert (pred == ref).mean() >= 0.99
    assert (pred == yq.numpy()).mean() > 0.5      # the features carry the classes


def test_solution_is_stationary():
    """Independent of scikit-learn: the gradient of the objective vanishes at the heads."""
    zs, ys, _, _ = _episodes(2, 5, 5, 64, kind="raw", seed=3)
    heads = fit_logistic(zs, ys, C=3.0, tol=1e-10)
    W = heads.weight.clone().requires_grad_()
    b = heads.bias.clone().requires_grad_()
    logits = zs @ W.transpose(1, 2) + b.unsqueeze(1)
    ce = F.cross_entropy(logits.reshape(-1, 5), ys.reshape(-1), reduction="sum")
    (3.0 * ce + 0.5 * W.square().sum()).backward()
    assert W.grad.abs().max() < 1e-7 and b.grad.abs().max() < 1e-7
    assert heads.bias.sum(1).abs().max() < 1e-10       # centred intercepts


def test_two_classes_match_sklearns_binomial_model():
    zs, ys, _, _ = _episodes(3, 2, 5, 64, seed=11)
    heads = fit_logistic(zs, ys)
    weight, bias, models = _sklearn(zs, ys, 2, **TIGHT)
    _assert_matches(heads, weight, bias)
    W = heads.weight.numpy()
    for e, m in enumerate(models):
        assert _rel(W[e, 1] - W[e, 0], m.coef_[0]) < 1e-3


def test_absent_classes_get_minus_infinity_and_the_rest_matches():
    zs, _, zq, _ = _episodes(3, 4, 3, 64, seed=5)
    ys = torch.tensor([[0, 0, 1, 1, 2, 2, 3, 3, 0, 1, 2, 3],     # 4 of 6 classes
                       [0, 0, 0, 1, 1, 1, 0, 0, 1, 1, 0, 1],     # 2 of 6: binomial
                       [5, 5, 5, 2, 2, 2, 1, 1, 1, 5, 2, 1]])    # 3 of 6
    heads = fit_logistic(zs, ys, n_classes=6)
    weight, bias, _ = _sklearn(zs, ys, 6, **TIGHT)
    _assert_matches(heads, weight, bias)
    absent = ~torch.from_numpy(np.isfinite(bias))
    assert torch.all(heads.weight[absent] == 0)
    assert torch.all(heads.bias[absent] == float("-inf"))
    pred = heads.predict(zq)
    for e in range(3):
        assert set(pred[e].tolist()) <= set(ys[e].tolist())
    assert torch.isfinite(heads.logits(zq).softmax(-1)).all()


def test_single_class_episode_predicts_it():
    zs, _, zq, _ = _episodes(2, 1, 4, 32, seed=2)
    ys = torch.full((2, 4), 2)
    heads = fit_logistic(zs, ys, n_classes=3)
    assert torch.all(heads.weight == 0)
    assert torch.all(heads.predict(zq) == 2)
    assert bool(heads.converged.all())


def test_duplicate_support_points():
    zs, ys, _, _ = _episodes(2, 5, 1, 64, seed=4)
    zs, ys = zs.repeat_interleave(3, dim=1), ys.repeat_interleave(3, dim=1)
    heads = fit_logistic(zs, ys)
    weight, bias, _ = _sklearn(zs, ys, 5, **TIGHT)
    _assert_matches(heads, weight, bias)


def test_identical_or_zero_support_points_leave_only_intercepts():
    ys = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 2, 2, 3]] * 2)
    zs = torch.stack([torch.full((10, 16), 0.3), torch.zeros(10, 16)]).double()
    heads = fit_logistic(zs, ys)
    weight, bias, _ = _sklearn(zs, ys, 4, **TIGHT)
    assert heads.weight.abs().max() < 1e-6 and np.abs(weight).max() < 1e-6
    np.testing.assert_allclose(heads.bias.numpy(), bias, rtol=1e-4)
    assert bool(heads.converged.all())


def test_one_episode_and_batching_do_not_change_the_heads():
    # Easy and hard episodes in one batch converge at different iterations.
    easy, ys, _, _ = _episodes(3, 5, 5, 64, "easy", seed=8)
    hard, _, _, _ = _episodes(3, 5, 5, 64, "raw", seed=9)
    zs = torch.cat([easy, hard])
    ys = torch.cat([ys, ys])
    batched = fit_logistic(zs, ys, tol=1e-10)
    assert batched.n_iter.unique().numel() > 1
    for e in (0, 4, 5):
        alone = fit_logistic(zs[e:e + 1], ys[e:e + 1], tol=1e-10)
        torch.testing.assert_close(alone.weight[0], batched.weight[e], rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(alone.bias[0], batched.bias[e], rtol=1e-7, atol=1e-9)


def test_chunked_fit_equals_one_fit(monkeypatch):
    zs, ys, _, _ = _episodes(5, 5, 2, 32, seed=6)
    whole = fit_logistic(zs, ys)
    monkeypatch.setattr(adapt, "_CHUNK_BYTES", 2 * 10 * 32 * 8)      # two episodes a chunk
    chunked = fit_logistic(zs, ys)
    torch.testing.assert_close(chunked.weight, whole.weight)
    torch.testing.assert_close(chunked.bias, whole.bias)


def test_float32_features():
    zs, ys, zq, _ = _episodes(4, 5, 5, 640, seed=12)
    ref = fit_logistic(zs, ys, tol=1e-10)
    heads = fit_logistic(zs.float(), ys)
    assert heads.weight.dtype == torch.float32 and heads.bias.dtype == torch.float32
    W = heads.weight.double()
    assert ((W - ref.weight).norm(dim=(1, 2)) / ref.weight.norm(dim=(1, 2))).max() < 1e-5
    assert (heads.predict(zq.float()) == ref.predict(zq)).float().mean() >= 0.99
    assert heads.logits(zq).dtype == torch.float64       # promoted to the query's dtype


def test_logits_predict_and_label_layouts():
    zs, ys, zq, _ = _episodes(3, 4, 2, 16, seed=13)
    heads = fit_logistic(zs, ys.to(torch.int32))         # int32, expanded (strided) labels
    assert isinstance(heads, LogisticHeads)
    logits = heads.logits(zq)
    torch.testing.assert_close(logits, zq @ heads.weight.transpose(1, 2) + heads.bias[:, None])
    assert torch.equal(heads.predict(zq), logits.argmax(-1))
    assert heads.predict(zq).dtype == torch.int64
    assert heads.n_iter.shape == (3,) and heads.converged.shape == (3,)


def test_n_classes_defaults_to_the_largest_label():
    zs, ys, _, _ = _episodes(2, 3, 2, 16, seed=14)
    assert fit_logistic(zs, ys).weight.shape[1] == 3
    assert fit_logistic(zs, ys, n_classes=5).weight.shape[1] == 5


def test_max_iter_caps_the_iterations():
    zs, ys, _, _ = _episodes(3, 5, 5, 64, "raw", seed=15)
    heads = fit_logistic(zs, ys, max_iter=1)
    assert int(heads.n_iter.max()) <= 1 and not bool(heads.converged.any())
    assert torch.isfinite(heads.weight).all()


def test_errors_name_the_argument():
    zs, ys, zq, _ = _episodes(2, 3, 2, 8, seed=16)
    bad = [
        (dict(z_support=zs[0]), "z_support"),
        (dict(z_support=zs.long()), "z_support"),
        (dict(z_support=zs.numpy()), "z_support"),
        (dict(z_support=zs[:, :0]), "z_support"),
        (dict(y_support=ys[:, :-1]), "y_support"),
        (dict(y_support=ys[:1]), "y_support"),
        (dict(y_support=ys.double()), "y_support"),
        (dict(y_support=ys > 0), "y_support"),
        (dict(y_support=ys.numpy()), "y_support"),
        (dict(y_support=ys - 1), "y_support"),
        (dict(y_support=ys, n_classes=2), "y_support"),
        (dict(n_classes=0), "n_classes"),
        (dict(n_classes=2.5), "n_classes"),
        (dict(C=0.0), "C"),
        (dict(C=-1.0), "C"),
        (dict(C=float("nan")), "C"),
        (dict(C=float("inf")), "C"),
        (dict(C="3"), "C"),
        (dict(tol=0.0), "tol"),
        (dict(max_iter=0), "max_iter"),
    ]
    for kwargs, name in bad:
        args = {"z_support": zs, "y_support": ys, **kwargs}
        with pytest.raises(ValueError, match=name):
            fit_logistic(**args)
    nan = zs.clone()
    nan[1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="z_support"):
        fit_logistic(nan, ys)
    heads = fit_logistic(zs, ys)
    nan_query = zq.clone()
    nan_query[0, 0, 0] = float("nan")    # was predicted as class 0
    for z_query in (zq[0], zq[:, :, :-1], zq[:1], zq.long(), zq.numpy(), nan_query):
        with pytest.raises(ValueError, match="z_query"):
            heads.predict(z_query)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("shot, d", [(5, 640), (10, 8)])     # (10, 8): a factored Gram
def test_cuda_matches_cpu(shot, d):
    zs, ys, zq, _ = _episodes(8, 5, shot, d, seed=17)
    cpu = fit_logistic(zs.float(), ys)
    gpu = fit_logistic(zs.float().cuda(), ys.cuda())
    assert gpu.weight.is_cuda and gpu.bias.is_cuda
    torch.testing.assert_close(gpu.weight.cpu(), cpu.weight, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gpu.bias.cpu(), cpu.bias, rtol=1e-4, atol=1e-6)
    assert torch.equal(gpu.predict(zq.float().cuda()).cpu(), cpu.predict(zq.float()))


def _is_factored(S, d):
    return isinstance(adapt._augmented_gram(torch.randn(1, S, d))[0], adapt._Factor)


def test_the_factor_is_taken_only_past_its_row_count():
    assert adapt._FACTOR_ROWS == 2
    assert _is_factored(19, 8) and not _is_factored(18, 8)
    assert not _is_factored(900, 640) and _is_factored(900, 256)
    for n_way, shot, d, _ in FACTORED:
        assert _is_factored(n_way * shot, d)


def _views(E, n_way, shot, d, views, seed):
    """Support sets of near-copies: each image's views differ by a little noise."""
    zs, ys, zq, _ = _episodes(E, n_way, shot, d, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    zs = zs.repeat_interleave(views, dim=1)
    zs = F.normalize(zs + 0.05 * torch.randn(zs.shape, generator=g, dtype=zs.dtype), dim=-1)
    return zs, ys.repeat_interleave(views, dim=1), zq


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_factored_and_matrix_forms_give_the_same_heads(monkeypatch, dtype):
    """Views of one image make near-duplicate rows; ragged labels leave classes absent
    and one episode with two classes (the binomial model)."""
    zs, ys, zq = _views(3, 4, 2, 8, views=9, seed=7)
    ys = ys.clone()
    ys[1] = ys[1] % 2                       # two classes present
    ys[2, ys[2] == 3] = 5                   # classes 3 and 4 absent, 5 present
    zs = zs.to(dtype)
    fits = {}
    for rows in (10**9, 0):
        monkeypatch.setattr(adapt, "_FACTOR_ROWS", rows)
        fits[rows] = fit_logistic(zs, ys, n_classes=6, tol=1e-10, max_iter=1000)
    matrix, factor = fits[10**9], fits[0]
    assert bool(matrix.converged.all()) and bool(factor.converged.all())
    assert torch.equal(torch.isfinite(matrix.bias), torch.isfinite(factor.bias))
    tol = 1e-6 if dtype == torch.float64 else 1e-4
    assert _rel(factor.weight.double().numpy(), matrix.weight.double().numpy()) < tol
    live = torch.isfinite(matrix.bias)
    assert _rel(factor.bias[live].double().numpy(), matrix.bias[live].double().numpy()) < tol
    weight, bias, _ = _sklearn(zs.double(), ys, 6, **TIGHT)
    _assert_matches(factor, weight, bias, tol=1e-3 if dtype == torch.float32 else 1e-4)


def test_factored_identical_points_and_overflow():
    ys = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 2, 2, 3]] * 2)
    zs = torch.stack([torch.full((10, 2), 0.3), torch.zeros(10, 2)]).double()
    assert _is_factored(10, 2)
    heads = fit_logistic(zs, ys)
    weight, bias, _ = _sklearn(zs, ys, 4, **TIGHT)
    assert heads.weight.abs().max() < 1e-6
    np.testing.assert_allclose(heads.bias.numpy(), bias, rtol=1e-4)
    with pytest.raises(ValueError, match="z_support contains NaN or infinite"):
        fit_logistic(torch.full((1, 10, 2), 1e20), ys[:1])


def test_cpu_chunks_bound_the_gram_entries(monkeypatch):
    """On a CPU a chunk holds at most _CHUNK_GRAM_CPU entries of Gram matrices (or of
    their factors); the heads are those of one fit."""
    zs, ys, _, _ = _episodes(5, 5, 2, 32, seed=6)           # S = 10: 100 entries each
    whole = fit_logistic(zs, ys)
    sizes = []
    fit_chunk = adapt._fit_chunk
    monkeypatch.setattr(adapt, "_fit_chunk", lambda x, *a: sizes.append(len(x)) or fit_chunk(x, *a))
    monkeypatch.setattr(adapt, "_CHUNK_GRAM_CPU", 200)
    chunked = fit_logistic(zs, ys)
    assert sizes == [2, 2, 1]
    torch.testing.assert_close(chunked.weight, whole.weight)
    torch.testing.assert_close(chunked.bias, whole.bias)
    sizes.clear()
    zs, ys, _, _ = _episodes(5, 5, 6, 4, seed=6)            # S = 30 > 2 (4 + 1): 150 each
    monkeypatch.setattr(adapt, "_CHUNK_GRAM_CPU", 360)      # (S d = 120; S^2 = 900)
    fit_logistic(zs, ys)
    assert sizes == [2, 2, 1]
    sizes.clear()
    monkeypatch.setattr(adapt, "_CHUNK_GRAM_CPU", 100)      # below one episode: one each
    fit_logistic(zs, ys)
    assert sizes == [1, 1, 1, 1, 1]
