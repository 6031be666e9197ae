"""One training step of every method at the same images per step, and MAML against a
learn2learn-style loop.

    pytest benchmarks/test_bench_steps.py                 # -> results/steps_cpu.json

Group ``step``: one optimizer step (batch assembly excluded: the batch is drawn before
the clock starts; forward, backward and update included) of each method with the
settings ``fastmtl compare`` uses (``fastmtl.compare.config_for``) scaled to 120
images a step (MTL, the fast recipe: 120 images over the whole head table; MAML/FO-MAML/ANIL: 4 tasks of
5-way 1-shot with 5 queries a class; R2D2/ProtoNet: one 20-way 1-shot task with 5
queries a class), Conv-4 on 28x28 grey images, with the FLOPs of the step
(``torch.utils.flop_counter``) and the ratio to MTL's seconds.

Groups ``maml-vs-l2l`` / ``anil-vs-l2l``: a second-order meta-step (meta-loss, backward,
Adam) of fastmtl's MAML and ANIL, vmapped and looped, against the learn2learn pattern
written here in a few lines (per task: ``torch.autograd.grad(create_graph=True)`` on the
support loss, ``w - lr * g``, the query loss through ``functional_call``; ANIL: the
backbone features once, the head adapted; an ``nn.BatchNorm2d`` Conv-4 in the textbook
form, NCHW and ReLU before pooling, as a learn2learn user has it). Shapes: the comparison's (4 tasks, 5 queries a
class, 1 inner step) and the issue's (16 tasks, 15 queries a class, 1 and 5 inner steps).

glibc's mmap/trim thresholds are raised (``keep_freed_memory``) for every contender, as
the CLI does. Ratios come from the medians of one run; the load average is recorded.
"""
from __future__ import annotations


import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fastmtl import registry
from fastmtl.compare import config_for
from fastmtl.data import SyntheticGlyphs
from fastmtl.gbml import ANIL, MAML, ANILConfig, MAMLConfig
from fastmtl.models import conv4

from _results import keep_freed_memory, machine_info, write_result  # benchmarks/_results.py

# (MTL's fast recipe draws no tasks: an epoch is a pass over the images, so it takes no
# tasks_per_epoch; the others' epochs are made long enough not to end inside a round.)
SAME_IMAGES = {
    "mtl": dict(batch_size=120),
    "maml": dict(tasks_per_step=4, tasks_per_epoch=100_000),
    "fomaml": dict(tasks_per_step=4, tasks_per_epoch=100_000),
    "anil": dict(tasks_per_step=4, tasks_per_epoch=100_000),
    "r2d2": dict(tasks_per_step=1, tasks_per_epoch=100_000),
    "protonet": dict(tasks_per_step=1, tasks_per_epoch=100_000),
}
ROUNDS = {"mtl": 20, "maml": 10, "fomaml": 10, "anil": 15, "r2d2": 20, "protonet": 20}
# every method of the registry, no other
assert set(SAME_IMAGES) == set(ROUNDS) == set(registry.METHOD_NAMES), sorted(SAME_IMAGES)
_STEP: dict[str, dict] = {}
_L2L: dict[str, dict] = {}


@pytest.fixture(scope="module", autouse=True)
def _malloc():
    keep_freed_memory(mmap_threshold=1 << 30)
    yield
    path = Path(__file__).parent / "results" / "steps_cpu.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    # A run of one group (-k) keeps the other group's last figures.
    payload = {"step": _STEP or old.get("step", {}),
               "maml_vs_l2l": _L2L or old.get("maml_vs_l2l", {}),
               "threads": torch.get_num_threads()}
    if "mtl" in _STEP:
        for r in _STEP.values():
            r["seconds_vs_mtl"] = r["median_s"] / _STEP["mtl"]["median_s"]
            r["flops_vs_mtl"] = r["flops"] / _STEP["mtl"]["flops"]
    write_result("steps_cpu", payload)


@pytest.fixture(scope="module")
def data():
    return SyntheticGlyphs(64, 20, seed=0)


def _flops(fn) -> int:
    from fastmtl.compare import flop_counter    # grouped convolutions' backward counted right
    counter = flop_counter()
    with counter:
        fn()
    return int(counter.get_total_flops())


def _endless(trainer, data):
    """Batches of epoch after epoch (an MTL epoch is one pass over the images)."""
    batches = iter(trainer.prepare(data))
    epoch = 0
    while True:
        try:
            yield next(batches)
        except StopIteration:
            epoch += 1
            batches = iter(trainer._epoch_batches(data, epoch, trainer._steps_per_epoch()))


@pytest.mark.parametrize("method", list(SAME_IMAGES))
def test_step(benchmark, data, method):
    benchmark.group = "step"
    cls, cfg = config_for(method, SAME_IMAGES[method])
    torch.manual_seed(0)
    trainer = cls(conv4(in_channels=1), cfg)
    batches = _endless(trainer, data)
    for _ in range(2):
        trainer.train_step(next(batches))
    flops = _flops(lambda: trainer.train_step(next(batches)))
    pending = []

    def setup():
        pending.append(next(batches))
        return (), {}

    loss = benchmark.pedantic(lambda: trainer.train_step(pending.pop()), setup=setup,
                              rounds=ROUNDS[method], warmup_rounds=1)
    images = loss[2]
    assert images == 120
    _STEP[method] = {"median_s": benchmark.stats.stats.median, "flops": flops,
                     "images": images, "settings": {k: v for k, v in vars(cfg).items()
                                                    if not k.startswith("_")},
                     "machine": machine_info()}


# -- MAML against the learn2learn pattern ---------------------------------------------------
def textbook_conv4(channels_last: bool = False, pool_first: bool = False):
    """Conv-4 as learn2learn's ``ConvBase`` runs it (and fastmtl's did until 2026-12-02):
    blocks conv - BN - ReLU - pool, NCHW; ``channels_last`` / ``pool_first`` give fastmtl's
    exact speed-ups one at a time (benchmarks/experiments/conv4_layout.py). Seeded, so every form
    starts from the same weights."""
    torch.manual_seed(0)
    net = conv4(in_channels=1, channels_last=channels_last)
    if not pool_first:                  # fastmtl's blocks pool first; swap back
        for block in net.blocks:
            block[2], block[3] = block[3], block[2]
    return net


def _episodes(tasks, queries, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(tasks, 5, 1, 28, 28, generator=g)
    xq = torch.randn(tasks, 5 * queries, 1, 28, 28, generator=g)
    ys = torch.arange(5).expand(tasks, -1)
    yq = torch.arange(5).repeat_interleave(queries).expand(tasks, -1)
    return xs, ys, xq, yq


class _L2LStyle:
    """The learn2learn ``MAML(model).clone().adapt(loss)`` pattern, second order.

    The model is ``backbone`` and a 5-way linear classifier, as learn2learn's Omniglot
    models (and fastmtl's MAML learner) have it: an earlier form of this benchmark adapted
    the Conv-4 alone, its 64 features taken as logits, a step about 3% lighter than the
    method it stood for.
    """

    def __init__(self, backbone, inner_lr, steps):
        model = torch.nn.Sequential(backbone, torch.nn.Linear(64, 5))
        self.model, self.lr, self.steps = model, inner_lr, steps
        self.opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def meta_step(self, xs, ys, xq, yq):
        self.opt.zero_grad(set_to_none=True)
        names = [n for n, _ in self.model.named_parameters()]
        total = 0.0
        for t in range(xs.shape[0]):
            fast = dict(self.model.named_parameters())
            for _ in range(self.steps):
                loss = F.cross_entropy(torch.func.functional_call(self.model, fast, (xs[t],)),
                                       ys[t])
                grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
                fast = {n: w - self.lr * g for n, w, g in zip(names, fast.values(), grads)}
            q = F.cross_entropy(torch.func.functional_call(self.model, fast, (xq[t],)), yq[t])
            (q / xs.shape[0]).backward()
            total += q.item() / xs.shape[0]
        self.opt.step()
        return total


class _L2LStyleANIL:
    """learn2learn's ANIL pattern: backbone features once, ``clone().adapt()`` on the head."""

    def __init__(self, backbone, inner_lr, steps):
        self.backbone, self.lr, self.steps = backbone, inner_lr, steps
        self.head = torch.nn.Linear(64, 5)
        self.opt = torch.optim.Adam(list(backbone.parameters()) + list(self.head.parameters()),
                                    lr=1e-3)

    def meta_step(self, xs, ys, xq, yq):
        self.opt.zero_grad(set_to_none=True)
        total = 0.0
        for t in range(xs.shape[0]):
            zs, zq = self.backbone(xs[t]), self.backbone(xq[t])
            w, b = self.head.weight, self.head.bias
            for _ in range(self.steps):
                loss = F.cross_entropy(F.linear(zs, w, b), ys[t])
                gw, gb = torch.autograd.grad(loss, (w, b), create_graph=True)
                w, b = w - self.lr * gw, b - self.lr * gb
            q = F.cross_entropy(F.linear(zq, w, b), yq[t])
            (q / xs.shape[0]).backward()
            total += q.item() / xs.shape[0]
        self.opt.step()
        return total


SHAPES = {"compare-4x5q-1step": (4, 5, 1), "issue-16x15q-1step": (16, 15, 1),
          "issue-16x15q-5steps": (16, 15, 5)}


def _fastmtl_step(vectorize, tasks, steps, method="maml", stack=True):
    torch.manual_seed(0)
    cls, cfg_cls = (MAML, MAMLConfig) if method == "maml" else (ANIL, ANILConfig)
    tr = cls(conv4(in_channels=1), cfg_cls(tasks_per_step=tasks, inner_steps=steps,
                                           inner_lr=0.4, vectorize=vectorize))
    tr._stack = tr._stack and stack     # False: MAML vectorized by vmap, not stacked
    tr.build((1, 28, 28))
    opt = torch.optim.Adam(tr.model.parameters(), lr=1e-3)

    def step(xs, ys, xq, yq):
        # The trainer's own meta-gradient (the loop path backpropagates task by task).
        opt.zero_grad(set_to_none=True)
        loss, _ = tr._step(xs, ys, xq, yq)
        opt.step()
        return loss
    return step


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("contender", ["fastmtl-vectorized", "fastmtl-vmap", "fastmtl-loop",
                                       "l2l-style"])
@pytest.mark.parametrize("method", ["maml", "anil"])
def test_maml_vs_l2l(benchmark, method, shape, contender):
    """fastmtl-vectorized: MAML stacked (tasks as channel groups), ANIL's stacked backbone
    call; fastmtl-vmap: MAML under vmap (ANIL has no such form)."""
    if method == "anil" and contender == "fastmtl-vmap":
        pytest.skip("ANIL's vectorized form is its stacked backbone call")
    tasks, queries, steps = SHAPES[shape]
    benchmark.group = f"{method}-vs-l2l {shape}"
    batch = _episodes(tasks, queries)
    if contender == "l2l-style":
        torch.manual_seed(0)
        style = _L2LStyle if method == "maml" else _L2LStyleANIL
        step = style(textbook_conv4(), 0.4, steps).meta_step
    else:
        step = _fastmtl_step(contender != "fastmtl-loop", tasks, steps, method,
                             stack=contender != "fastmtl-vmap")
    rounds = 3 if (steps == 5 or tasks == 16) and method == "maml" else 8
    benchmark.pedantic(step, args=batch, rounds=rounds, warmup_rounds=1)
    _L2L.setdefault(f"{method} {shape}", {})[contender] = benchmark.stats.stats.median
    row = _L2L[f"{method} {shape}"]
    if len(row) == (4 if method == "maml" else 3):
        row["vectorized_vs_l2l"] = row["l2l-style"] / row["fastmtl-vectorized"]
        if method == "maml":
            row["vmap_vs_l2l"] = row["l2l-style"] / row["fastmtl-vmap"]
        row["loop_vs_l2l"] = row["l2l-style"] / row["fastmtl-loop"]
        row["load_average"] = machine_info()["load_average"]
