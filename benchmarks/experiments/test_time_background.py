"""Test-time changes for 5-way 1-shot on the background set: shifted views, ensembles.

The documented background-set command misses its 5-way 1-shot goal by 0.15 (mean of two
seeds) while its validation accuracy stops rising after about 5 of its 30 minutes. Two
inductive test-time changes that need no new training were tried on the VALIDATION
alphabets (163 characters; never the test ones), every feature CL2N (``eval --centre``),
C = 3, 1,000 episodes, the same seeded episodes for every row:

- ``views``: each image embedded at its 9 one-pixel shifts (padding with the background),
  the support set fitted on all 9 views of each image, each query the mean of its views;
- ensembles: the CL2N features of several checkpoints concatenated (each unit-norm, so
  every member weighs the same), e.g. three 10-minute runs against one 30-minute run.

    python benchmarks/experiments/test_time_background.py \
        --single runs/background32/final.pt runs/background32_s1/final.pt \
        --ensemble runs/recipe/r1_size32/final.pt+runs/recipe/r4_size32_seed1/final.pt ...
        # -> results/test_time_background_cpu.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
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
SHIFTS = [(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (-1, -1), (1, -1), (-1, 1)]
QUERIES = 15


@torch.no_grad()
def shifted(backbone, dataset, mean: torch.Tensor) -> torch.Tensor:
    """(N, views, d) CL2N features of every image at each of SHIFTS."""
    backbone.eval()
    background = float(dataset.tensor(np.arange(1))[0, 0, 0, 0])   # the blank page
    out = []
    for lo in range(0, len(dataset), 512):
        x = dataset.tensor(np.arange(lo, min(lo + 512, len(dataset))))
        side = x.shape[-1]
        padded = F.pad(x, (1, 1, 1, 1), value=background)
        views = [backbone(padded[..., 1 + dy:1 + dy + side, 1 + dx:1 + dx + side]).float()
                 for dy, dx in SHIFTS]
        out.append(torch.stack(views, 1))
    return F.normalize(torch.cat(out) - mean, dim=-1)


def features(path: str) -> tuple[torch.Tensor, np.ndarray]:
    """A checkpoint's (N, views, d) CL2N features of the validation images, and labels."""
    state = load(path, what="checkpoint")
    run = state["run"]
    backbone = backbone_from_checkpoint(state, path)
    options = dict(image_size=run["image_size"], seed=0, channels=run.get("channels", 3))
    val = registry.load_dataset("omniglot", run["root"], "val", **options)
    train = registry.load_dataset("omniglot", run["root"], "train", **options)
    mean = embed(backbone, train, normalize=False).mean(0)
    return shifted(backbone, val, mean), val.labels


def accuracy(zs: torch.Tensor, ys: torch.Tensor, zq: torch.Tensor, n_way: int) -> float:
    heads = fit_logistic(zs, ys, C=3.0, n_classes=n_way)
    yq = torch.arange(n_way).repeat_interleave(QUERIES)
    return round(100 * float((heads.predict(zq) == yq).double().mean()), 3)


def table(feats: dict[str, torch.Tensor], labels, singles, ensembles, episodes: int) -> dict:
    out: dict[str, dict[str, float]] = {}
    for w, k in SETTINGS:
        _, picked = EpisodeSampler(labels, w, k, QUERIES, 0).episodes(0, episodes)
        index = torch.as_tensor(picked)
        s, q = index[:, :, :k].reshape(episodes, -1), index[:, :, k:].reshape(episodes, -1)
        ys = torch.arange(w).repeat_interleave(k).expand(episodes, -1)
        row = {}
        for name in singles:
            v = feats[name]
            row[name] = accuracy(v[s][:, :, 0], ys, v[q][:, :, 0], w)
            support = v[s].reshape(episodes, -1, v.shape[-1])     # every view a support row
            row[f"{name} views"] = accuracy(support, ys.repeat_interleave(len(SHIFTS), 1),
                                            F.normalize(v[q].mean(2), dim=-1), w)
        for members in ensembles:
            z = torch.cat([feats[m][:, 0] for m in members], 1) / len(members) ** 0.5
            row["+".join(members)] = accuracy(z[s], ys, z[q], w)
        out[f"{w}-way {k}-shot"] = row
        print(f"{w}-way {k}-shot", row, flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--single", nargs="+", required=True, help="checkpoints alone, and views")
    p.add_argument("--ensemble", nargs="*", default=[], help="A+B[+C]: members concatenated")
    p.add_argument("--episodes", type=int, default=1000, help="episodes per setting")
    args = p.parse_args()
    ensembles = [e.split("+") for e in args.ensemble]
    names = list(dict.fromkeys(args.single + [m for e in ensembles for m in e]))
    feats, labels = {}, None
    for name in names:
        feats[name], labels = features(name)
        print("embedded", name, flush=True)
    val = table(feats, labels, args.single, ensembles, args.episodes)
    write_result("test_time_background_cpu", {
        "split": "val", "episodes": args.episodes, "C": 3.0, "features": "CL2N",
        "shifts": SHIFTS, "single": args.single, "ensembles": ensembles, "val": val,
        "note": "validation alphabets only; 'views': support fitted on the 9 one-pixel "
                "shifts of each image, queries the mean of theirs"})


if __name__ == "__main__":
    main()
