"""Which feature transform before the test-time logistic regression, on the background set?

Loads trained checkpoints (the README's background-set command, seeds 0 and 1) and
evaluates each on the VALIDATION alphabets (163 characters; never the test ones), 5- and
20-way, 1- and 5-shot, C = 3, the same seeded episodes for every transform:
- ``L2``: the paper's protocol, each feature L2-normalized;
- ``CL2N``: centred on the mean feature of the training images (648 characters, without
  rotations), then L2-normalized (SimpleShot; ``fastmtl eval --centre``);
- ``support-centred``: centred on the mean of each episode's support features, then
  L2-normalized (inductive too; needs no training images);
- ``PT-L2`` / ``PT-C-L2``: a square root first (the features are non-negative), then
  ``L2`` / ``CL2N`` on the square roots.

    python benchmarks/experiments/protocol_features_background.py \
        runs/background32/final.pt runs/background32_s1/final.pt
        # -> results/protocol_features_background_cpu.json
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: _results
from _results import write_result  # noqa: E402

from fastmtl import registry  # noqa: E402
from fastmtl.adapt import fit_logistic  # noqa: E402
from fastmtl.checkpoint import load  # noqa: E402
from fastmtl.classifier import backbone_from_checkpoint  # noqa: E402
from fastmtl.evaluate import embed  # noqa: E402
from fastmtl.sampling import EpisodeSampler  # noqa: E402

SETTINGS = [(5, 1), (5, 5), (20, 1), (20, 5)]
# (support, query, training mean) raw features -> (support, query) protocol features
Transform = Callable[[torch.Tensor, torch.Tensor, torch.Tensor],
                     tuple[torch.Tensor, torch.Tensor]]


def _unit(*zs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(F.normalize(z, dim=-1) for z in zs)


def _support_centred(s: torch.Tensor, q: torch.Tensor,
                     mu: torch.Tensor) -> tuple[torch.Tensor, ...]:
    m = s.mean(1, keepdim=True)
    return _unit(s - m, q - m)


TRANSFORMS: dict[str, Transform] = {
    "L2": lambda s, q, mu: _unit(s, q),
    "CL2N": lambda s, q, mu: _unit(s - mu, q - mu),
    "support-centred": _support_centred,
    "PT-L2": lambda s, q, mu: _unit(s.sqrt(), q.sqrt()),
    "PT-C-L2": lambda s, q, mu: _unit(s.sqrt() - mu.sqrt(), q.sqrt() - mu.sqrt()),
}


def accuracies(raw: torch.Tensor, labels, mean: torch.Tensor, episodes: int) -> dict:
    """{setting: {transform: mean accuracy %}} on the same episodes for every transform."""
    out: dict[str, dict[str, float]] = {}
    for w, k in SETTINGS:
        _, picked = EpisodeSampler(labels, w, k, 15, 0).episodes(0, episodes)
        index = torch.as_tensor(picked)
        s = raw[index[:, :, :k].reshape(episodes, -1)]
        q = raw[index[:, :, k:].reshape(episodes, -1)]
        ys = torch.arange(w).repeat_interleave(k).expand(episodes, -1)
        yq = torch.arange(w).repeat_interleave(15)
        row = {}
        for name, transform in TRANSFORMS.items():
            zs, zq = transform(s, q, mean)
            heads = fit_logistic(zs, ys, C=3.0, n_classes=w)
            row[name] = round(100 * float((heads.predict(zq) == yq).double().mean()), 3)
        out[f"{w}-way {k}-shot"] = row
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="+", help="final.pt files of background-set runs")
    p.add_argument("--episodes", type=int, default=1000, help="episodes per setting")
    args = p.parse_args()
    runs = []
    for path in args.checkpoints:
        state = load(path, what="checkpoint")
        run = state.get("run") or {}
        backbone = backbone_from_checkpoint(state, path)
        options = dict(image_size=run.get("image_size"), seed=0,
                       channels=run.get("channels", 3))
        val = registry.load_dataset("omniglot", run["root"], "val", **options)
        train = registry.load_dataset("omniglot", run["root"], "train", **options)
        mean = embed(backbone, train, normalize=False).mean(0)
        table = accuracies(embed(backbone, val, normalize=False), val.labels, mean,
                           args.episodes)
        print(path, table, flush=True)
        runs.append({"checkpoint": path, "image_size": run.get("image_size"),
                     "seed": (state.get("config") or {}).get("seed"), "val": table})
    write_result("protocol_features_background_cpu", {
        "split": "val", "episodes": args.episodes, "C": 3.0,
        "transforms": list(TRANSFORMS), "runs": runs,
        "note": "validation alphabets only; CL2N is fastmtl eval --centre"})


if __name__ == "__main__":
    main()
