"""The few-shot evaluation protocol of the paper (and of RFS / MetaOptNet).

Features of the frozen backbone, L2-normalized; per test episode an L2-regularized
multinomial logistic regression (the objective of scikit-learn's
``LogisticRegression(C=3, solver="lbfgs")``) fitted on the support set, accuracy on the
queries; the mean over episodes and a 95% confidence interval ``1.96 * std / sqrt(E)``.
The episodes' heads are fitted batched (:func:`fastmtl.adapt.fit_logistic`, stopping at
a gradient norm of 1e-5: ten times tighter than scikit-learn's default), and each image is
embedded once however many episodes use it.

In a distributed run (:mod:`fastmtl.distributed`) every rank embeds a share of the images
and fits a share of the episodes, in whole batches and chunks exactly as one process cuts
them; the gathered results, hence mean and CI, are those of one process.

``views=True`` (``fastmtl eval --views``) embeds every image also at its eight one-pixel
shifts (:data:`SHIFTS`): each episode's head is fitted on all nine views of each support
image, and each query's feature is the normalized mean of its nine. It stays inductive
(every view comes from the image itself) and costs nine embeddings an image.
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import checks
from . import distributed as _dist
from .adapt import fit_logistic
from .data.base import FewShotDataset
from .data.omniglot_runs import OneShotRuns, read_one_shot_runs
from .sampling import EpisodeSampler

__all__ = ["TOL", "evaluate", "embed", "feature_mean", "summary", "check_episodes", "one_shot_runs",
           "SHIFTS", "shifted_views"]

#: Where the protocol's logistic fits stop: a gradient norm of 1e-5 in scikit-learn's
#: units, ten times tighter than scikit-learn's default (:func:`fastmtl.adapt.fit_logistic`
#: defaults to 1e-7; eval_tol_cpu.json: 1.6-2.0x faster fits, 1 of 285,000 predictions
#: changed). :func:`evaluate`, the one-shot runs and :class:`fastmtl.FewShotClassifier` use it.
TOL = 1e-5

#: The (rows, columns) shifts of ``views=True``: the image itself first, then its eight
#: one-pixel neighbours.
SHIFTS: tuple[tuple[int, int], ...] = ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1),
                                       (1, 1), (-1, -1), (1, -1), (-1, 1))


def shifted_views(x: torch.Tensor) -> torch.Tensor:
    """(len(SHIFTS) * B, C, H, W): the (B, C, H, W) images ``x`` at each of
    :data:`SHIFTS`, view-major (all images at the first shift, then the next), the edge
    pixels repeated into the row or column a shift opens.

    Example:
        >>> x = torch.arange(4.0).view(1, 1, 2, 2)
        >>> shifted_views(x)[1, 0]          # shifted down by one row
        tensor([[0., 1.],
                [0., 1.]])
    """
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    return torch.cat([padded[..., 1 - dy:1 - dy + h, 1 - dx:1 - dx + w] for dy, dx in SHIFTS])


@torch.no_grad()
def embed(backbone: nn.Module, dataset: FewShotDataset, batch_size: int = 256,
          device: torch.device | str | None = None, normalize: bool = True,
          progress: bool = False, centre: torch.Tensor | None = None,
          views: bool = False) -> torch.Tensor:
    """Features (N, d) of every image of ``dataset``, the backbone in eval mode.

    Args:
        backbone: the feature extractor (its training mode is restored afterwards).
        dataset: the images, embedded in order.
        batch_size: images per backbone call.
        device: where the backbone runs (None: where its parameters are).
        normalize: L2-normalize each feature (the protocol's features).
        progress: show a tqdm bar.
        centre: a (d,) feature subtracted before the normalization, e.g. the mean
            feature of the training images (:func:`feature_mean`: SimpleShot's CL2N).
        views: also embed each image at its one-pixel shifts (:data:`SHIFTS`; batches of
            ``batch_size // len(SHIFTS)`` images, so a backbone call holds as many).

    Returns:
        (N, d) float features on ``device``; with ``views``, (N, len(SHIFTS), d), the
        unshifted image's first, each view centred and normalized on its own.

    Raises:
        ValueError: a dataset that is not a :class:`FewShotDataset`, a ``batch_size``
            below 1, or ``centre`` not a finite float (d,) tensor for the backbone's d.

    Example:
        >>> import fastmtl
        >>> z = embed(fastmtl.models.conv4(hidden=8), fastmtl.data.SyntheticGlyphs(3, 4))
        >>> z.shape
        torch.Size([12, 64])
    """
    if not isinstance(dataset, FewShotDataset):
        raise ValueError(f"dataset must be a FewShotDataset, got {type(dataset).__name__}")
    checks.integer("batch_size", batch_size, 1)
    if centre is not None:
        _check_centre(centre, None)      # before any work; its size once d is known
    if device is None:
        device = next((p.device for p in backbone.parameters()), torch.device("cpu"))
    dtype = next((p.dtype for p in backbone.parameters()), torch.float32)
    was_training = backbone.training
    backbone.eval()
    try:
        out = []
        per_call = max(1, batch_size // len(SHIFTS)) if views else batch_size
        # The same batches as one process: a batch-statistics backbone depends on them.
        mine = list(_dist.chunks(len(dataset), per_call, shrink=False))
        for lo, count in tqdm(mine, desc="embed", leave=False,
                              disable=not progress or not _dist.is_main()):
            idx = np.arange(lo, lo + count)
            out.append(_forward(backbone, dataset.tensor(idx, device=device).to(dtype), views))
        if not out:   # more ranks than batches: this rank embeds nothing, has the width
            one = dataset.tensor(np.arange(1), device=device).to(dtype)
            out.append(_forward(backbone, one, views)[:0])
        z = _dist.gather_rows(torch.cat(out))
    finally:
        backbone.train(was_training)
    if centre is not None:
        z = z - _check_centre(centre, z.shape[-1]).to(z.device)
    return F.normalize(z, dim=-1) if normalize else z


def _forward(backbone: nn.Module, x: torch.Tensor, views: bool) -> torch.Tensor:
    """Float features of the batch ``x``: (B, d), or with ``views`` (B, len(SHIFTS), d)."""
    if not views:
        return backbone(x).float()
    z = backbone(shifted_views(x)).float()
    return z.view(len(SHIFTS), x.shape[0], -1).transpose(0, 1)


def feature_mean(backbone: nn.Module, dataset: FewShotDataset, batch_size: int = 256,
                 device: torch.device | str | None = None,
                 progress: bool = False) -> torch.Tensor:
    """The mean (d,) of the backbone's features of ``dataset``, not normalized: pass the
    training images' to :func:`embed` or :func:`evaluate` as ``centre``.

    Centring on it before the L2 normalization is SimpleShot's CL2N (Wang et al. 2019):
    it uses only the training classes, so the protocol stays inductive.

    Example:
        >>> import fastmtl
        >>> net = fastmtl.models.conv4(hidden=8)
        >>> mu = feature_mean(net, fastmtl.data.SyntheticGlyphs(3, 4))
        >>> embed(net, fastmtl.data.SyntheticGlyphs(2, 4, seed=1), centre=mu).shape
        torch.Size([8, 64])
    """
    return embed(backbone, dataset, batch_size, device, normalize=False,
                 progress=progress).mean(0)


def _check_centre(centre: object, d: int | None) -> torch.Tensor:
    """``centre`` as a float32 (d,) tensor; ``d=None`` checks all but its size."""
    if not isinstance(centre, torch.Tensor) or not centre.is_floating_point() \
            or centre.dim() != 1 or (d is not None and centre.shape[0] != d):
        got = (f"{centre.dtype} {tuple(centre.shape)}" if isinstance(centre, torch.Tensor)
               else type(centre).__name__)
        size = "(d,)" if d is None else f"({d},) (the feature size)"
        raise ValueError(f"centre must be a float tensor of shape {size}, got {got}")
    if not bool(torch.isfinite(centre).all()):
        raise ValueError("centre contains NaN or infinite values")
    return centre.float()


def evaluate(backbone: nn.Module, dataset: FewShotDataset, n_way: int = 5, k_shot: int = 1,
             n_query: int = 15, episodes: int = 1000, seed: int = 0, C: float = 3.0,
             device: torch.device | str | None = None, features: torch.Tensor | None = None,
             chunk: int = 500, progress: bool = True, centre: torch.Tensor | None = None,
             views: bool = False, tol: float = TOL) -> dict[str, Any]:
    """Mean accuracy (percent) and 95% CI over ``episodes`` seeded test episodes.

    Args:
        backbone: the frozen feature extractor (put in eval mode for embedding).
        dataset: the test classes (never seen in training).
        n_way, k_shot, n_query: episode shape; each class needs k_shot + n_query images.
        episodes: number of episodes; seed: episodes are a pure function of the seed.
        C: inverse L2 strength of the logistic regression (the paper: 3).
        features: precomputed L2-normalized features of ``dataset`` (from :func:`embed`),
            to evaluate several settings without embedding again: (N, d), or (N, V, d)
            from ``embed(..., views=True)``, which fits and scores as ``views`` does.
        chunk: episodes sampled and passed to one batched fit (which may split them).
        centre: subtracted from each feature before its normalization (see
            :func:`feature_mean`); with ``features``, pass it to :func:`embed` instead.
        views: embed each image also at its one-pixel shifts (:data:`SHIFTS`): the head
            is fitted on every view of each support image, each query scored on the
            normalized mean of its views; with ``features``, pass it to :func:`embed`.
        tol: where each head's fit stops (default :data:`TOL`, 1e-5;
            :func:`fastmtl.adapt.fit_logistic`'s own default is 1e-7).

    In a distributed run every rank must call it (all return the full result).

    Returns:
        dict with ``mean`` and ``ci95`` (percent), ``std``, ``episodes``, the settings,
        and ``accuracies`` (per-episode, percent) for plots and tests.

    Raises:
        ValueError: a dataset that is not a :class:`FewShotDataset`, an episode shape its
            classes cannot hold, ``features`` without one row per image or not 2-D or 3-D,
            a bad ``chunk``, ``C``, ``tol`` or ``centre``, ``centre`` or ``views`` with them.

    Example:
        >>> import fastmtl
        >>> test = fastmtl.data.SyntheticGlyphs(6, 20, seed=1)
        >>> r = fastmtl.evaluate(fastmtl.models.conv4(hidden=8), test, k_shot=1,
        ...                      episodes=20, progress=False)
        >>> r["episodes"], r["k_shot"], len(r["accuracies"])
        (20, 1, 20)
    """
    if not isinstance(dataset, FewShotDataset):
        raise ValueError(f"dataset must be a FewShotDataset, got {type(dataset).__name__}")
    check_episodes(n_way, k_shot, n_query, episodes)
    checks.integer("chunk", chunk, 1)
    checks.number("C", C)
    checks.number("tol", tol)
    sampler = EpisodeSampler(dataset.labels, n_way, k_shot, n_query, seed)
    features = _features(backbone, dataset, features, centre, views, device, progress)
    acc, unconverged = _accuracies(features, sampler, n_way, k_shot, n_query, episodes, C,
                                   tol, chunk, progress)
    if unconverged:
        warnings.warn(f"evaluate: the logistic head did not converge on {unconverged} of "
                      f"{episodes} episodes (C={C}); their accuracies are of an unfinished "
                      f"fit", RuntimeWarning, stacklevel=2)
    return summary(acc, dict(episodes=int(episodes), n_way=n_way, k_shot=k_shot,
                             n_query=n_query, seed=seed, C=C, tol=tol))


def _features(backbone: nn.Module, dataset: FewShotDataset, features: torch.Tensor | None,
              centre: torch.Tensor | None, views: bool, device: torch.device | str | None,
              progress: bool) -> torch.Tensor:
    """The protocol's features: ``features`` checked, or the dataset embedded."""
    if features is None:
        return embed(backbone, dataset, device=device, progress=progress, centre=centre,
                     views=views)
    for name, given in (("centre", centre is not None), ("views", views)):
        if given:
            raise ValueError(f"{name} is applied when embedding: pass it to embed() for the "
                             f"features, or leave features out")
    if features.dim() not in (2, 3) or features.shape[0] != len(dataset):
        raise ValueError(f"features must be (N, d) or (N, views, d) with one row per image "
                         f"(N = {len(dataset)}), got {tuple(features.shape)}")
    return features


def _accuracies(features: torch.Tensor, sampler: EpisodeSampler, n_way: int, k_shot: int,
                n_query: int, episodes: int, C: float, tol: float, chunk: int,
                progress: bool) -> tuple[np.ndarray, int]:
    """Per-episode accuracies (percent, numpy) of this rank's episode chunks, gathered, and
    the number of episodes whose head did not converge."""
    views = features.shape[1] if features.dim() == 3 else 1
    ys = torch.arange(n_way, device=features.device).repeat_interleave(k_shot * views)
    yq = torch.arange(n_way, device=features.device).repeat_interleave(n_query)
    accs = [torch.zeros(0, dtype=torch.float64)]
    unconverged = 0
    for lo, count in tqdm(list(_dist.chunks(episodes, chunk)), desc=f"{n_way}-way {k_shot}-shot",
                          leave=False, disable=not progress or not _dist.is_main()):
        _, picked = sampler.episodes(lo, count)
        index = torch.as_tensor(picked, device=features.device)
        zs = features[index[:, :, :k_shot].reshape(count, -1)]
        zq = features[index[:, :, k_shot:].reshape(count, -1)]
        if features.dim() == 3:   # every view a support row; a query: its views' mean
            zs, zq = zs.flatten(1, 2), F.normalize(zq.mean(2), dim=-1)
        heads = fit_logistic(zs, ys.expand(count, -1), C=C, n_classes=n_way, tol=tol)
        unconverged += int((~heads.converged).sum())
        accs.append((heads.predict(zq) == yq).double().mean(1).cpu())
    acc = _dist.gather_rows(torch.cat(accs).to(features.device)).cpu().numpy() * 100.0
    return acc, unconverged


def check_episodes(n_way: int, k_shot: int, n_query: int, episodes: int) -> None:
    """ValueError naming the first of the test-episode arguments out of range.

    Example:
        >>> check_episodes(5, 1, 15, 600)         # in range: returns None
    """
    checks.integer("episodes", episodes, 1)
    # One class needs no classifier: every query would be right, 100% that says nothing.
    checks.integer("n_way", n_way, 2)
    checks.integer("k_shot", k_shot, 1)
    checks.integer("n_query", n_query, 1)


def summary(acc: np.ndarray, settings: dict[str, Any]) -> dict[str, Any]:
    """Mean, 95% CI (NaN for a single episode: one sample has no interval) and std of
    per-episode accuracies (percent), with ``settings`` and the accuracies.

    Args:
        acc: per-episode accuracies in percent.
        settings: entries copied into the result (episode shape, seed, ...).

    Returns:
        dict with ``mean``, ``ci95``, ``std``, ``accuracies`` and ``settings``' entries.

    Example:
        >>> import numpy as np
        >>> round(summary(np.array([80.0, 100.0]), {})["mean"], 1)
        90.0
    """
    std = float(acc.std())
    ci = 1.96 * std / math.sqrt(len(acc)) if len(acc) > 1 else float("nan")
    return {"mean": float(acc.mean()), "ci95": ci, "std": std, **settings,
            "accuracies": acc.tolist(), **({"note": "one episode: no confidence interval"}
                                           if len(acc) == 1 else {})}


def one_shot_runs(backbone: nn.Module, path: str | os.PathLike, image_size: int = 28,
                  device: torch.device | str | None = None, C: float = 3.0) -> dict[str, Any]:
    """Error rates (percent) on the 20 official one-shot runs of Lake et al. (2015).

    Each run is a 20-way one-shot task: 20 training images, one per class, and 20 test
    images. Two classifiers on the backbone's L2-normalized features: nearest neighbour
    by cosine similarity (how the literature scores the runs) and the logistic regression
    of :func:`evaluate` fitted on the training images. The images are decoded as
    :class:`fastmtl.data.Omniglot`'s (:func:`fastmtl.data.read_one_shot_runs`).

    Args:
        backbone: the frozen feature extractor, trained at ``image_size``.
        path: ``all_runs.zip`` of github brendenlake/omniglot
            (``python/one-shot-classification``), or a zip of the same layout.
        image_size: side the run images (105 px) are resized to.
        device: where the backbone runs (None: where its parameters are).
        C: inverse L2 strength of the logistic regression (the paper: 3).

    Returns:
        dict with ``nn_error`` and ``logistic_error`` (mean over runs, percent),
        ``nn_errors`` and ``logistic_errors`` (per run), ``runs`` (names), ``n_runs``,
        ``n_way``, ``n_test`` (test images per run), ``image_size``, ``C`` and
        ``logistic_unconverged`` (runs whose head stopped before the tolerance).

    Raises:
        ValueError: ``backbone`` not a module, ``path`` not a zip with the runs' layout
            (checked before decoding), a bad ``image_size`` or ``C``.

    Example:
        >>> import io, zipfile, tempfile, os
        >>> from PIL import Image, ImageDraw
        >>> def png(j):                        # class j: a bar at a place of its own
        ...     im = Image.new("1", (105, 105), 1)
        ...     ImageDraw.Draw(im).rectangle([10 * j, 0, 10 * j + 9, 104], fill=0)
        ...     out = io.BytesIO(); im.save(out, "PNG"); return out.getvalue()
        >>> path = os.path.join(tempfile.mkdtemp(), "runs.zip")
        >>> with zipfile.ZipFile(path, "w") as zf:
        ...     lines = []
        ...     for j in range(1, 4):
        ...         zf.writestr(f"run01/training/class0{j}.png", png(j))
        ...         zf.writestr(f"run01/test/item0{j}.png", png(4 - j))
        ...         lines.append(f"run01/test/item0{j}.png run01/training/class0{4 - j}.png")
        ...     zf.writestr("run01/class_labels.txt", "\\n".join(lines))
        >>> r = one_shot_runs(torch.nn.Flatten(), path, image_size=14)
        >>> r["nn_error"], r["logistic_error"], r["n_way"]
        (0.0, 0.0, 3)
    """
    if not isinstance(backbone, nn.Module):
        raise ValueError(f"backbone must be a torch.nn.Module, got {type(backbone).__name__}")
    checks.integer("image_size", image_size, 1)
    checks.number("C", C)
    runs = read_one_shot_runs(path, image_size)
    nn_err, lr_err, unconverged = _one_shot_errors(embed(backbone, runs.dataset, device=device),
                                                   runs, C)
    n_runs, n_way = runs.train_index.shape
    return {"nn_error": float(nn_err.mean()), "logistic_error": float(lr_err.mean()),
            "nn_errors": nn_err.tolist(), "logistic_errors": lr_err.tolist(),
            "runs": list(runs.run_names), "n_runs": n_runs, "n_way": n_way,
            "n_test": int(runs.test_index.shape[1]), "image_size": int(image_size),
            "C": C, "tol": TOL, "logistic_unconverged": unconverged}


def _one_shot_errors(z: torch.Tensor, runs: OneShotRuns,
                     C: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-run error rates (percent, numpy) of cosine nearest neighbour and of the
    logistic heads on the normalized features ``z`` of ``runs.dataset``, and the number
    of runs whose head did not converge."""
    def rows(index: np.ndarray) -> torch.Tensor:
        return z[torch.as_tensor(index, device=z.device)]
    zs, zq = rows(runs.train_index), rows(runs.test_index)
    answers = torch.as_tensor(runs.answers, device=z.device)
    n_runs, n_way = runs.train_index.shape
    nearest = torch.bmm(zq, zs.transpose(1, 2)).argmax(2)
    labels = torch.arange(n_way, device=z.device).expand(n_runs, -1)
    heads = fit_logistic(zs, labels, C=C, n_classes=n_way, tol=TOL)
    nn_err = (nearest != answers).double().mean(1).cpu().numpy() * 100.0
    lr_err = (heads.predict(zq) != answers).double().mean(1).cpu().numpy() * 100.0
    return nn_err, lr_err, int((~heads.converged).sum())
