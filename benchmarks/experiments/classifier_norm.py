"""FewShotClassifier on a GBML checkpoint: which statistics should its norms use?

Validation alphabets only. Trains ProtoNet or R2D2 for 120 s with the tuned comparison
settings (the 10-minute schedule of ``fastmtl compare``, stopped early), then scores the
same seeded 5-way episodes through ``fastmtl.FewShotClassifier`` (logistic head, C = 3),
the backbone normalized five ways:

- ``support``: frozen at the statistics of each fit's support images (the default since
  ``fit`` freezes a batch-statistics backbone);
- ``norm_images``: frozen once at 4,096 seeded training images as trained on (with
  rotations; ``norm_images=``, as ``fastmtl compare`` freezes for its shared protocols);
- ``before, queries together``: what the classifier did before: every ``predict`` call
  normalized with its own batch (here all of an episode's queries in one call);
- ``before, one query a call``: the same, each query predicted alone;
- ``episode``: support and queries as one batch (transductive, as the baselines' own
  heads), for reference.

Every variant sees the same checkpoint, so load on the machine does not change the
comparison. Usage (cwd: the repository root)::

    python benchmarks/experiments/classifier_norm.py METHOD SEED OUT.json
"""
from __future__ import annotations

import json
import platform
import sys

import torch
import torch.nn.functional as F

from fastmtl import FewShotClassifier, registry
from fastmtl.adapt import fit_logistic
from fastmtl.compare import centre_sample, config_for
from fastmtl.sampling import EpisodeSampler
from fastmtl.training import AtTrainingSeconds

ROOT = "../shared/data/omniglot-background"
SECONDS, EPISODES, QUERIES, SAMPLE = 120, 200, 15, 4096
SETTINGS = {"protonet": {"lr": 0.003}, "r2d2": {"lr": 0.003}}


def _accuracy(pred: torch.Tensor, yq: torch.Tensor) -> float:
    return float((pred == yq).double().mean())


def score(bb, train, val, k_shot: int, seed: int) -> dict[str, float]:
    """Mean accuracy (%) of each normalization over the seeded 5-way episodes."""
    spec = dict(image_size=28, channels=1, mean=tuple(val.mean), std=tuple(val.std),
                device="cpu")
    x = val.tensor()
    fixed = FewShotClassifier(bb, **spec, norm_images=centre_sample(train, seed, SAMPLE).tensor())
    sampler = EpisodeSampler(val.labels, 5, k_shot, QUERIES, 0)
    _, picked = sampler.episodes(0, EPISODES)
    ys = torch.arange(5).repeat_interleave(k_shot)
    yq = torch.arange(5).repeat_interleave(QUERIES)
    hits: dict[str, list[float]] = {k: [] for k in (
        "support", "norm_images", "before, queries together", "before, one query a call",
        "episode")}
    for index in torch.as_tensor(picked):
        xs, xq = x[index[:, :k_shot].reshape(-1)], x[index[:, k_shot:].reshape(-1)]
        clf = FewShotClassifier(bb, **spec).fit(xs, ys.tolist())
        hits["support"].append(_accuracy(torch.as_tensor(clf.predict(xq)), yq))
        fixed.fit(xs, ys.tolist())
        hits["norm_images"].append(_accuracy(torch.as_tensor(fixed.predict(xq)), yq))
        with torch.no_grad():
            zs = F.normalize(bb(xs), dim=1)
            together = F.normalize(bb(xq), dim=1)
            alone = F.normalize(torch.cat([bb(xq[i:i + 1]) for i in range(len(xq))]), dim=1)
            z = F.normalize(bb(torch.cat([xs, xq])), dim=1)
        for name, s, q in (("before, queries together", zs, together),
                           ("before, one query a call", zs, alone),
                           ("episode", z[:len(xs)], z[len(xs):])):
            head = fit_logistic(s[None], ys[None], C=3.0, n_classes=5)
            hits[name].append(_accuracy(head.predict(q[None])[0], yq))
    return {k: round(100 * sum(v) / len(v), 2) for k, v in hits.items()}


def main(method: str, seed: int, out: str) -> None:
    torch.set_num_threads(1)
    train = registry.load_dataset("omniglot", ROOT, "train", rotations=True, image_size=None,
                                  seed=0)
    val = registry.load_dataset("omniglot", ROOT, "val", image_size=None, seed=0)
    cls, cfg = config_for(method, SETTINGS[method], seed, 10.0, None)
    torch.manual_seed(seed)
    tr = cls(registry.build_backbone("conv4", train.channels), cfg)
    state_at = {}

    def stop(t, state):
        state_at.update(seconds=round(state.train_seconds, 1), steps=state.step)
        return True

    tr.fit(train, progress=False, callbacks=[AtTrainingSeconds([SECONDS], stop)])
    bb = tr.backbone.eval()
    rows = {f"5w{k}": score(bb, train, val, k, seed) for k in (1, 5)}
    result = {"name": "classifier_norm", "method": method, "seed": seed,
              "settings": SETTINGS[method], "trained": state_at, "split": "val",
              "episodes": EPISODES, "queries": QUERIES, "norm_images": SAMPLE,
              "machine": {"cpu": platform.processor() or platform.machine(),
                          "torch": torch.__version__, "torch_threads": 1},
              "accuracy": rows}
    print(json.dumps(result["accuracy"]), flush=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
