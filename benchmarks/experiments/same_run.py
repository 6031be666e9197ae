"""Same seed, same settings, two source trees: MTL (paper recipe with cosine head and
augmentation; the fast recipe; reference head op), MAML and ProtoNet histories on SyntheticGlyphs, as JSON.

Run it once per tree and compare the outputs, e.g. the tree before the trainer-core
refactoring against this one (benchmarks/results/refactor_same_run.json)::

    git worktree add /tmp/old 5bb8f5a      # the tree before issue 31
    cd /tmp && PYTHONPATH=/tmp/old python /work/main/benchmarks/experiments/same_run.py > old.json
    cd /tmp && python /work/main/benchmarks/experiments/same_run.py > new.json     # installed tree
"""
import json, torch
import fastmtl
from fastmtl import MTLConfig, MTLTrainer
from fastmtl.gbml import MAML, MAMLConfig, ProtoNet, ProtoNetConfig
from fastmtl.data import SyntheticGlyphs
from fastmtl.models import conv4
torch.set_num_threads(2)
train = SyntheticGlyphs(24, 12, seed=0)
out = {"tree": fastmtl.__file__}
torch.manual_seed(0)
cfg = MTLConfig(n_way=5, images_per_class=4, tasks_per_step=4, tasks_per_epoch=32, epochs=3,
                head="cosine", scale=10.0, augment=True, seed=3, backend="reference")
h = MTLTrainer(conv4(hidden=16), cfg).fit(train, progress=False)
out["mtl"] = [(r["train_loss"], r["train_acc"]) for r in h]
torch.manual_seed(0)
cfg = MTLConfig.from_recipe("fast", batch_size=32, epochs=3, seed=3, backend="reference")
h = MTLTrainer(conv4(hidden=16), cfg).fit(train, progress=False)
out["mtl_fast"] = [(r["train_loss"], r["train_acc"]) for r in h]
torch.manual_seed(0)
mc = MAMLConfig(n_way=5, k_shot=1, n_query=3, tasks_per_epoch=8, epochs=2, inner_lr=0.4, seed=3, tasks_per_step=2)
h = MAML(conv4(hidden=16), mc).fit(train, progress=False)
out["maml"] = [(r["train_loss"], r["train_acc"]) for r in h]
torch.manual_seed(0)
pc = ProtoNetConfig(n_way=5, k_shot=1, n_query=3, tasks_per_epoch=8, epochs=2, seed=3, tasks_per_step=2)
h = ProtoNet(conv4(hidden=16), pc).fit(train, progress=False)
out["protonet"] = [(r["train_loss"], r["train_acc"]) for r in h]
print(json.dumps(out))
