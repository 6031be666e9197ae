"""How much of the metric baselines' own-head lead is their transductive BatchNorm?

Validation alphabets only. Trains one method with its tuned comparison settings (the
10-minute schedule of ``fastmtl compare``) and, at a few early training times, scores the
same seeded 5-way episodes four ways:

- ``L2``: the shared logistic protocol (``fastmtl.evaluate``);
- ``L2 episode-BN``: the same logistic head on features normalized with each test
  episode's own batch statistics (support and queries together), i.e. transductive, as
  the baselines' own heads are; for MTL a copy of the backbone with
  ``fastmtl.gbml.use_batch_stats``;
- ``own``: the baseline's own head (``trainer.evaluate``: per-episode batch statistics);
- ``own embed-BN``: the baseline's own head on the features of ``fastmtl.evaluate``'s
  embedding (statistics of batches of 256 images of many classes, not of the episode);
- ``L2 train-BN`` and ``own train-BN`` (baselines): inductive, as an eval-mode BatchNorm
  with running statistics would be: every norm uses fixed statistics, those of 2,048
  seeded training images without rotations (``fastmtl.compare.centre_sample``) passed
  through the backbone as one batch; then the shared logistic head and the own head.

Usage (cwd: the repository root)::

    python benchmarks/experiments/tuning/transduction.py METHOD SEED OUT.json

Training stops after the last time; one torch thread.
"""
from __future__ import annotations

import copy
import json
import platform
import sys

import torch
import torch.nn.functional as F

from fastmtl import registry
from fastmtl.adapt import fit_logistic
from fastmtl.compare import centre_sample, config_for
from fastmtl.evaluate import embed, evaluate
from fastmtl.gbml import use_batch_stats
from fastmtl.gbml._common import _BatchStatNorm, _episodes, stacked_features
from fastmtl.sampling import EpisodeSampler
from fastmtl.training import AtTrainingSeconds

ROOT = "../shared/data/omniglot-background"
TIMES = [10, 30, 60, 120]
SETTINGS = {"mtl": {"lr": 0.004}, "protonet": {"lr": 0.003}, "r2d2": {"lr": 0.003}}
EPISODES, QUERIES, CHUNK = 200, 15, 50
SAMPLE = 2048


class _FixedNorm(torch.nn.Module):
    """A batch-statistics norm frozen at the statistics of one batch (eval-mode BN)."""

    def __init__(self, norm, mean, var):
        super().__init__()
        self.norm, self.mean, self.var = norm, mean, var

    def forward(self, x):
        return F.batch_norm(x, self.mean, self.var, self.norm.weight, self.norm.bias, False,
                            0.0, self.norm.eps)


def frozen_stats(bb, images):
    """A copy of ``bb`` whose every norm uses the statistics of ``images`` (one batch)."""
    bb = copy.deepcopy(bb)
    stats = {}

    def hook(mod, args):
        x = args[0]
        stats[mod] = (x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False))

    norms = [(name, m) for name, m in bb.named_modules() if isinstance(m, _BatchStatNorm)]
    handles = [m.register_forward_pre_hook(hook) for _, m in norms]
    with torch.no_grad():
        bb(images)
    for h in handles:
        h.remove()
    for name, m in norms:
        parent = bb.get_submodule(name.rpartition(".")[0]) if "." in name else bb
        setattr(parent, name.rpartition(".")[2], _FixedNorm(m, *stats[m]))
    return bb


class _Stop(Exception):
    pass


def episode_scores(tr, bb, val, feats, n_way, k_shot):
    """Accuracies (%) of the per-episode-BN logistic head and, for baselines, of the own
    head on per-episode and on embedding features, over the seeded episodes."""
    sampler = EpisodeSampler(val.labels, n_way, k_shot, QUERIES, 0)
    ys = torch.arange(n_way).repeat_interleave(k_shot)
    yq = torch.arange(n_way).repeat_interleave(QUERIES)
    hits = {"L2 episode-BN": [], "own embed-BN": []}
    for lo in range(0, EPISODES, CHUNK):
        xs, _, xq, _ = _episodes(val, sampler, lo, CHUNK, torch.device("cpu"), torch.float32)
        with torch.no_grad():
            z = stacked_features(bb, torch.cat([xs, xq], 1))
        zs, zq = z[:, :xs.shape[1]], z[:, xs.shape[1]:]
        heads = fit_logistic(F.normalize(zs, dim=-1), ys.expand(CHUNK, -1), C=3.0,
                             n_classes=n_way)
        hits["L2 episode-BN"].append((heads.predict(F.normalize(zq, dim=-1)) == yq).double())
        if tr.own_adaptation:
            _, picked = sampler.episodes(lo, CHUNK)
            index = torch.as_tensor(picked)
            es = feats[index[:, :, :k_shot].reshape(CHUNK, -1)]
            eq = feats[index[:, :, k_shot:].reshape(CHUNK, -1)]
            with torch.no_grad():
                logits = tr._full_precision_head(es, ys.expand(CHUNK, -1), eq, n_way)
            hits["own embed-BN"].append((logits.argmax(-1) == yq).double())
    return {k: round(float(torch.cat(v).mean()) * 100, 2) for k, v in hits.items() if v}


def own_on(tr, val, feats, k_shot):
    """Accuracy (%) of the trainer's own head on precomputed features, same episodes."""
    sampler = EpisodeSampler(val.labels, 5, k_shot, QUERIES, 0)
    ys = torch.arange(5).repeat_interleave(k_shot).expand(EPISODES, -1)
    yq = torch.arange(5).repeat_interleave(QUERIES)
    _, picked = sampler.episodes(0, EPISODES)
    index = torch.as_tensor(picked)
    with torch.no_grad():
        logits = tr._full_precision_head(feats[index[:, :, :k_shot].reshape(EPISODES, -1)], ys,
                                         feats[index[:, :, k_shot:].reshape(EPISODES, -1)], 5)
    return round(float((logits.argmax(-1) == yq).double().mean()) * 100, 2)


def main(method: str, seed: int, out: str) -> None:
    torch.set_num_threads(1)
    train = registry.load_dataset("omniglot", ROOT, "train", rotations=True, image_size=None,
                                  seed=0)
    val = registry.load_dataset("omniglot", ROOT, "val", image_size=None, seed=0)
    plain = registry.load_dataset("omniglot", ROOT, "train", rotations=False, image_size=None,
                                  seed=0)
    sample = centre_sample(plain, seed, SAMPLE).tensor()
    cls, cfg = config_for(method, SETTINGS[method], seed, 10.0, None)
    torch.manual_seed(seed)
    tr = cls(registry.build_backbone("conv4", train.channels), cfg)
    rows = []

    def at(t, state):
        bb = t.backbone
        bb.eval()
        ep_bb = use_batch_stats(copy.deepcopy(bb)) if method == "mtl" else bb
        feats = embed(bb, val, progress=False, normalize=False)
        row = {"t": round(state.train_seconds, 1), "steps": state.step}
        if t.own_adaptation:
            fixed = frozen_stats(bb, sample)
            ind = embed(fixed, val, progress=False, normalize=False)
        for k_shot in (1, 5):
            key = f"5w{k_shot}"
            r = evaluate(bb, val, n_way=5, k_shot=k_shot, n_query=QUERIES, episodes=EPISODES,
                         seed=0, progress=False)
            row[f"{key} L2"] = round(r["mean"], 2)
            for name, v in episode_scores(t, ep_bb, val, feats, 5, k_shot).items():
                row[f"{key} {name}"] = v
            if t.own_adaptation:
                row[f"{key} L2 train-BN"] = round(evaluate(
                    fixed, val, n_way=5, k_shot=k_shot, n_query=QUERIES, episodes=EPISODES,
                    seed=0, progress=False, features=F.normalize(ind, dim=-1))["mean"], 2)
                row[f"{key} own train-BN"] = own_on(t, val, ind, k_shot)
                row[f"{key} own"] = round(t.evaluate(val, n_way=5, k_shot=k_shot,
                                                     n_query=QUERIES, episodes=EPISODES,
                                                     seed=0, progress=False)["mean"], 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if state.train_seconds >= TIMES[-1]:
            raise _Stop
        bb.train()
        if t.learner is not None:
            t.learner.train()

    try:
        tr.fit(train, progress=False, callbacks=[AtTrainingSeconds(TIMES, at)])
    except _Stop:
        pass
    result = {"name": "tuning_omniglot_background_transduction", "method": method,
              "seed": seed, "settings": SETTINGS[method], "split": "val",
              "episodes": EPISODES, "queries": QUERIES, "times": TIMES,
              "machine": {"cpu": platform.processor() or platform.machine(),
                          "torch": torch.__version__, "torch_threads": 1},
              "rows": rows}
    with open(out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
