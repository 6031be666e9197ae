"""The training core: callbacks at points of training time, kept off the clock."""
from __future__ import annotations

import time

import pytest
import torch

from fastmtl import MTLConfig, MTLTrainer
from fastmtl.data import SyntheticGlyphs
from fastmtl.gbml import ProtoNet, ProtoNetConfig
from fastmtl.models import conv4
from fastmtl.training import AtTrainingSeconds, Callback, EveryTrainingSeconds


def _data():
    return SyntheticGlyphs(12, 8, seed=0)


def _mtl(**kw):
    cfg = dict(tasks_per_step=1, tasks_per_epoch=4, epochs=3, images_per_class=4, n_way=3)
    if kw.get("task_sampling") == "all_classes":     # tasks are not drawn: no task settings
        cfg = dict(epochs=3)
    cfg.update(kw)
    return MTLTrainer(conv4(hidden=8), MTLConfig(**cfg))


def _proto(**kw):
    cfg = dict(n_way=3, k_shot=1, n_query=2, tasks_per_step=1, tasks_per_epoch=4, epochs=3)
    cfg.update(kw)
    return ProtoNet(conv4(hidden=8), ProtoNetConfig(**cfg))


class _Log(Callback):
    def __init__(self, stop_at=None):
        self.steps, self.epochs, self.begun, self.ended, self.stop_at = [], [], 0, 0, stop_at

    def on_train_begin(self, trainer, state):
        self.begun += 1

    def on_step_end(self, trainer, state):
        self.steps.append((state.step, state.images, state.train_seconds))
        return self.stop_at is not None and state.step >= self.stop_at

    def on_epoch_end(self, trainer, state):
        self.epochs.append(state.record["epoch"])

    def on_train_end(self, trainer, state):
        self.ended += 1


@pytest.mark.parametrize("make", [_mtl, _proto])
def test_callbacks_see_every_step_and_epoch(make):
    log = _Log()
    hist = make().fit(_data(), progress=False, callbacks=[log])
    assert [s[0] for s in log.steps] == list(range(1, 13))
    images = [s[1] for s in log.steps]
    assert images == sorted(images) and images[0] > 0
    assert log.epochs == [1, 2, 3] and log.begun == log.ended == 1
    assert sum(h["images"] for h in hist) == images[-1]


@pytest.mark.parametrize("make", [_mtl, _proto])
def test_a_callback_can_stop_training_after_a_step(make):
    log = _Log(stop_at=6)
    hist = make().fit(_data(), progress=False, callbacks=[log])
    assert [h["steps"] for h in hist] == [4, 2]


def test_time_in_callbacks_is_kept_off_the_training_clock_and_budget():
    sleeps = []

    def slow(trainer, state):
        time.sleep(0.3)
        sleeps.append(state.train_seconds)

    t0 = time.perf_counter()
    tr = _mtl(epochs=2, tasks_per_epoch=6)
    hist = tr.fit(_data(), progress=False,
                  callbacks=[EveryTrainingSeconds(1e-6, slow)])
    wall = time.perf_counter() - t0
    assert len(sleeps) == 12       # every step passes the tiny interval; no extra final call
    assert hist[-1]["elapsed_s"] < wall - 0.9 * 0.3 * len(sleeps)
    # A budget smaller than one sleep still lets every step run: sleeping is not training.
    tr = _mtl(epochs=1, tasks_per_epoch=6, max_minutes=0.25 / 60)
    hist = tr.fit(_data(), progress=False, callbacks=[EveryTrainingSeconds(1e-6, slow)])
    assert hist[0]["steps"] >= 2


def test_every_training_seconds_fires_at_the_end_once_and_checks_its_interval():
    calls = []
    cb = EveryTrainingSeconds(3600.0, lambda tr, st: calls.append(st.extra.get("final")))
    _mtl().fit(_data(), progress=False, callbacks=[cb])
    assert calls == [True]
    with pytest.raises(ValueError, match="seconds"):
        EveryTrainingSeconds(0, print)
    with pytest.raises(ValueError, match="callbacks"):
        _mtl().fit(_data(), progress=False, callbacks=[print])


def test_all_classes_task_sampling_trains_every_row():
    data = _data()
    tr = _mtl(task_sampling="all_classes", batch_size=16, epochs=1, head="cosine", scale=10.0)

    class _Init(Callback):
        def on_train_begin(self, trainer, state):
            self.head = trainer.head.detach().clone()
    init = _Init()
    hist = tr.fit(data, progress=False, callbacks=[init])
    assert hist[0]["steps"] == len(data) // 16
    # Every step's softmax runs over the whole table: every row moves, drawn or not.
    moved = (tr.head.detach() - init.head).abs().amax(dim=1)
    assert (moved > 0).all() and torch.isfinite(tr.head).all()
    with pytest.raises(ValueError, match="batch_size"):
        _mtl(task_sampling="all_classes", batch_size=10_000).fit(data, progress=False)
    with pytest.raises(ValueError, match="task_sampling"):
        _mtl(task_sampling="sometimes")


def test_at_training_seconds_fires_once_per_passed_time_and_checks_times():
    seen = []
    cb = AtTrainingSeconds([1e-6, 2e-6, 3600.0], lambda tr, st: seen.append(
        (st.step, st.extra.get("final", False))))
    _mtl(epochs=1).fit(_data(), progress=False, callbacks=[cb])
    # The first step passes both tiny times (one call); 3600 s never comes; the end fires.
    assert seen == [(1, False), (4, True)]
    for bad in ([], [2.0, 1.0], [0.0], [float("nan")]):
        with pytest.raises(ValueError, match="times"):
            AtTrainingSeconds(bad, print)


def test_cosine_schedule_follows_the_run_with_warmup():
    """lr_schedule="cosine": each step's learning rate is lr * (1 + cos(pi f)) / 2 with f
    the steps taken over the run's steps (no time budget here), after a linear warm-up."""
    import math

    class Rates(Callback):
        def __init__(self):
            self.rates = []

        def on_step_end(self, trainer, state):
            self.rates.append(trainer.optimizer.param_groups[0]["lr"])

    data = SyntheticGlyphs(12, 8, seed=0)
    cfg = MTLConfig(tasks_per_step=2, tasks_per_epoch=8, epochs=2, images_per_class=4,
                    lr=1e-3, lr_schedule="cosine", warmup_steps=2)
    rates = Rates()
    MTLTrainer(conv4(hidden=8), cfg).fit(data, progress=False, callbacks=[rates])
    total = 8                        # 2 epochs of 4 steps
    want = [1e-3 * 0.5 * (1 + math.cos(math.pi * s / total)) * min(1.0, (s + 1) / 2)
            for s in range(total)]
    assert rates.rates == pytest.approx(want, rel=1e-12)
