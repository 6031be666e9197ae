"""The one training loop every fastmtl trainer runs (MTL and the GBML baselines).

:class:`Trainer` owns what all methods share: seeding and the per-epoch restart of every
random stream (so a resumed run repeats an uninterrupted one bit for bit), progress bars,
the training clock and the time budget (checked after every step, on every rank
together), validation, best-epoch tracking and restore, early stopping, checkpoints and
resume (through :mod:`fastmtl.checkpoint`), and the wrapping of a failed collective into a
:class:`fastmtl.distributed.DistributedError`. A method subclasses it and supplies only
what differs: its learner module, its optimizer and scheduler, the batches of an epoch
and one training step.

Callbacks run code at points of *training* time (:class:`Callback`,
:class:`EveryTrainingSeconds`): the time spent inside a callback is kept off the training
clock and off the time budget, so a comparison can evaluate a model at fixed training
times without charging the evaluation to the method.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, NoReturn

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from . import checkpoint as _ckpt
from . import checks
from . import distributed as _dist
from .config import TrainerConfig
from .data.base import FewShotDataset
from .ops import NonFiniteError
from .sampling import check_fits

__all__ = ["Trainer", "TrainState", "TrainingInterrupted", "TrainingDiverged", "Callback",
           "AtTrainingSeconds", "EveryTrainingSeconds", "ProfileSteps", "TrainingClock",
           "check_same_run", "check_val", "epoch_seed", "format_record", "phase"]


# -- small shared pieces ---------------------------------------------------------------------
def epoch_seed(seed: int, epoch: int) -> int:
    """The seed every random stream restarts from at ``epoch`` of a run seeded ``seed``.

    Example:
        >>> epoch_seed(0, 3) == epoch_seed(0, 3) != epoch_seed(0, 4)
        True
    """
    return (seed * 1_000_003 + epoch * 7919 + 1) % (2**63)


def format_record(r: dict[str, Any]) -> str:
    """One line of an epoch's record, as the trainers print it.

    Example:
        >>> format_record({"epoch": 2, "train_loss": 1.25, "train_acc": 50.0, "lr": 1e-3,
        ...                "elapsed_s": 7.0})
        'epoch   2  loss 1.2500  train acc 50.0%  lr 1.0e-03  7s'
    """
    s = (f"epoch {r['epoch']:3d}  loss {r['train_loss']:.4f}  train acc {r['train_acc']:.1f}%  "
         f"lr {r['lr']:.1e}  {r['elapsed_s']:.0f}s")
    if "val_acc" in r:
        s += f"  val {r['val_acc']:.2f}±{r['val_ci95']:.2f}%"
    return s


def check_val(val: FewShotDataset | None, cfg: TrainerConfig) -> None:
    """A validation set must hold the episodes ``cfg.val_*`` describe (None: no validation).

    Raises:
        ValueError: ``val`` is not a data set, or has too few classes or images a class.

    Example:
        >>> from fastmtl import MTLConfig
        >>> from fastmtl.data import SyntheticGlyphs
        >>> check_val(SyntheticGlyphs(3, 20), MTLConfig(val_ways=5))
        Traceback (most recent call last):
        ...
        ValueError: ...
    """
    if val is None:
        return
    if not isinstance(val, FewShotDataset):
        raise ValueError(f"val must be a FewShotDataset or None, got {type(val).__name__}")
    check_fits(val.labels, cfg.val_ways, cfg.val_shots + cfg.val_queries, ways_name="val_ways",
               need_name="val_shots + val_queries", where="validation ",
               class_names=val.class_names)


class phase:
    """A named range around one phase of a step (``data``, ``backbone``, ``heads``, ...).

    It shows in a ``torch.profiler`` trace (``record_function``) and, on CUDA, as an NVTX
    range for Nsight Systems. Cheap when no profiler runs.

    Example:
        >>> import torch
        >>> with torch.profiler.profile() as prof:
        ...     with phase("backbone"):
        ...         _ = torch.ones(3) * 2
        >>> "backbone" in {e.key for e in prof.key_averages()}
        True
    """

    def __init__(self, name: str):
        self.name = name
        self.nvtx = torch.cuda.is_available()
        self.rf: torch.autograd.profiler.record_function | None = None

    def __enter__(self) -> None:
        if self.nvtx:
            torch.cuda.nvtx.range_push(self.name)
        # A record_function costs ~10 us even with no profiler, and a GBML per-task loop
        # enters a dozen a step: open one only while a torch profiler records.
        if torch._C._autograd._profiler_enabled():
            self.rf = torch.autograd.profiler.record_function(self.name)
            self.rf.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self.rf is not None:
            self.rf.__exit__(*exc)
            self.rf = None
        if self.nvtx:
            torch.cuda.nvtx.range_pop()




def backbone_autocast(precision: str,
                      device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """The context a trainer runs its backbone in: bfloat16 autocast for ``"bf16"`` (on
    CUDA, and on the CPU where autocast supports the ops), nothing for ``"fp32"``. Heads
    and losses leave it (:func:`full_precision`) and run in float32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def full_precision(device_type: str) -> torch.autocast:
    """Autocast off: heads and losses inside a ``"bf16"`` backbone context run as given."""
    return torch.autocast(device_type=device_type, enabled=False)


class TrainingDiverged(RuntimeError):
    """A training step's loss was NaN or infinite; training stopped before using it further.

    The message names the epoch and step and the last good checkpoint (``last.pt`` of the
    last complete epoch), from which a run with other settings (a lower learning rate,
    ``grad_clip``) can be resumed.

    Example:
        >>> try:                       # what a script around fit() can catch
        ...     raise TrainingDiverged("epoch 3, step 17: loss nan; resume from runs/last.pt")
        ... except RuntimeError as exc:
        ...     print(exc)
        epoch 3, step 17: loss nan; resume from runs/last.pt
    """


# Settings a resumed run may change: they do not alter the steps already taken or to come.
RESUMABLE_CHANGES = frozenset({"epochs", "max_minutes", "checkpoint_dir", "early_stop_patience",
                               "val_episodes", "backend"})


class TrainingInterrupted(Exception):
    """Training stopped on SIGINT (Ctrl-C) or SIGTERM at the end of a step.

    Attributes:
        signum: the signal; epoch: the epoch it came in (1-based, not saved);
        checkpoint: the ``last.pt`` holding the last complete epoch (None: no
        ``checkpoint_dir``, nothing saved); saved_epoch: that epoch (0: none yet).
    Resuming from ``checkpoint`` repeats the interrupted epoch from its start, so the
    resumed run ends exactly where an uninterrupted one ends.

    Example:
        >>> import signal
        >>> exc = TrainingInterrupted(signal.SIGINT, 4, "runs/last.pt", 3)
        >>> print(exc, exc.exit_code)
        interrupted by SIGINT in epoch 4; runs/last.pt holds epoch 3 130
    """

    def __init__(self, signum: int, epoch: int, checkpoint: str | None, saved_epoch: int):
        self.signum, self.epoch, self.checkpoint = signum, epoch, checkpoint
        self.saved_epoch = saved_epoch
        name = signal.Signals(signum).name
        where = (f"{checkpoint} holds epoch {saved_epoch}" if checkpoint and saved_epoch
                 else "nothing was saved")
        super().__init__(f"interrupted by {name} in epoch {epoch}; {where}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class _SignalStop:
    """While active (main thread only), SIGINT/SIGTERM set ``signum`` instead of raising."""

    def __init__(self) -> None:
        self.signum = 0
        self._old: dict[int, Any] = {}    # signal -> the handler it had

    def __enter__(self) -> _SignalStop:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum:        # a second Ctrl-C: stop now
            signal.signal(signum, self._old.get(signum, signal.SIG_DFL))
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def check_same_run(saved: dict[str, Any], config: TrainerConfig, path: str) -> None:
    """ValueError if ``config`` changes a setting of the checkpointed run that a resume
    cannot honour (anything but :data:`RESUMABLE_CHANGES`), naming each.

    Example:
        >>> import dataclasses
        >>> from fastmtl import MTLConfig
        >>> saved = dataclasses.asdict(MTLConfig())
        >>> check_same_run(saved, MTLConfig(epochs=200), "last.pt")   # more epochs: fine
        >>> check_same_run(saved, MTLConfig(lr=0.1), "last.pt")
        Traceback (most recent call last):
        ...
        ValueError: ...lr: 0.001 -> 0.1...
    """
    import dataclasses
    renamed = getattr(type(config), "_renamed", {})
    saved = {renamed.get(k, k): v for k, v in saved.items()}    # checkpoints of old names
    now = dataclasses.asdict(config)
    changed = [f"{k}: {saved[k]!r} -> {now[k]!r}" for k in sorted(now)
               if k in saved and k not in RESUMABLE_CHANGES and saved[k] != now[k]]
    if changed:
        raise ValueError(f"resume: {path!r} was trained with other settings ("
                         f"{'; '.join(changed)}); a resumed run keeps its settings: drop "
                         f"these, or start a new run")


# What a resumed run must train on as its checkpoint did (``Trainer.run_info``, which the
# CLI sets): the data it names, and the classes it read (the folder may have moved).
_SAME_DATA = ("data", "train_split", "rotations", "data_seed", "image_size", "channels",
              "class_names")


def _check_same_data(saved: dict[str, Any], now: dict[str, Any], path: str) -> None:
    """ValueError if a resumed run's recorded training data differs from its
    checkpoint's, naming what differs (what either side does not record is not checked)."""
    changed = [k for k in _SAME_DATA if k in saved and k in now and saved[k] != now[k]]
    if changed:
        what = "; ".join("class_names: other classes" if k == "class_names"
                         else f"{k}: {saved[k]!r} -> {now[k]!r}" for k in changed)
        raise ValueError(f"resume: {path!r} was trained on other data ({what}); a resumed "
                         f"run keeps its data: pass the same data, or allow changed "
                         f"settings (--allow-changed-settings)")


# -- the training clock and callbacks --------------------------------------------------------
class TrainingClock:
    """Seconds of training: wall time since ``start`` minus the time spent in ``paused()``.

    Args:
        already: seconds counted before (a resumed run's).

    Example:
        >>> clock = TrainingClock()
        >>> with clock.paused():          # a callback's work: off the clock
        ...     pass
        >>> clock.seconds() >= 0
        True
    """

    def __init__(self, already: float = 0.0):
        self._t0 = time.perf_counter() - already
        self._paused = 0.0

    def seconds(self) -> float:
        return time.perf_counter() - self._t0 - self._paused

    def paused(self) -> contextlib.AbstractContextManager[None]:
        """A context whose time is kept off the clock."""
        clock = self

        class _Pause:
            def __enter__(self) -> None:
                self.t = time.perf_counter()

            def __exit__(self, *exc: object) -> None:
                clock._paused += time.perf_counter() - self.t
        return _Pause()


@dataclass
class TrainState:
    """Where a run stands, as callbacks see it.

    Attributes:
        epoch: the current epoch (1-based).
        step: optimizer steps taken in the run (resumed runs count the earlier ones).
        images: training images the steps have used (summed over ranks).
        train_seconds: the training clock (validation included, callbacks excluded).
        loss, acc: the last step's training loss and accuracy (0-1).
        record: the epoch's record, at ``on_epoch_end``; else None.

    Example:
        >>> class PrintEpochs(Callback):
        ...     def on_epoch_end(self, trainer, state):
        ...         print(state.epoch, state.step, state.record["epoch"])
        >>> import fastmtl
        >>> cfg = fastmtl.MTLConfig(tasks_per_step=2, tasks_per_epoch=4, epochs=2,
        ...                         images_per_class=4)
        >>> _ = fastmtl.MTLTrainer(fastmtl.models.conv4(hidden=8), cfg).fit(
        ...     fastmtl.data.SyntheticGlyphs(12, 8), progress=False, callbacks=[PrintEpochs()])
        1 2 1
        2 4 2
    """

    epoch: int = 0
    step: int = 0
    images: int = 0
    train_seconds: float = 0.0
    loss: float = float("nan")
    acc: float = float("nan")
    record: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Callback:
    """Code run at points of training; override what you need.

    A method that returns True stops training after the current step (the epoch is then
    recorded and saved as a budget stop would be). The time a callback takes is kept off
    the training clock and the time budget.

    Example:
        >>> class Every100(Callback):
        ...     def on_step_end(self, trainer, state):
        ...         if state.step % 100 == 0:
        ...             print(state.step, state.loss)
    """

    def on_train_begin(self, trainer: Trainer, state: TrainState) -> None:
        pass

    def on_step_end(self, trainer: Trainer, state: TrainState) -> bool | None:
        return None

    def on_epoch_end(self, trainer: Trainer, state: TrainState) -> bool | None:
        return None

    def on_train_end(self, trainer: Trainer, state: TrainState) -> None:
        pass


class AtTrainingSeconds(Callback):
    """Calls ``fn(trainer, state)`` at the first step end at or past each of ``times``
    (seconds of training), and once more at the end of training (``state.extra["final"]``
    is then True) unless the last step was just handled; ``fn`` returning True stops
    training. Several times passed by one step give one call.

    Args:
        times: increasing training times in seconds (> 0).
        fn: the function to call.

    Example:
        >>> cb = AtTrainingSeconds([10, 30, 60], lambda tr, st: print(st.train_seconds))
    """

    def __init__(self, times: Iterable[float], fn: Callable[[Trainer, TrainState], Any]):
        times = [float(t) for t in times]
        if not times or any(not (math.isfinite(t) and t > 0) for t in times) \
                or any(b <= a for a, b in zip(times, times[1:], strict=False)):
            raise ValueError(f"times must be increasing positive seconds, got {times!r}")
        self.times, self.fn = times, fn
        self.last_fired_step = -1

    def _next_after(self, seconds: float) -> float:
        return next((t for t in self.times if t > seconds), math.inf)

    def on_train_begin(self, trainer: Trainer, state: TrainState) -> None:
        self.next = self._next_after(state.train_seconds)

    def on_step_end(self, trainer: Trainer, state: TrainState) -> bool | None:
        if state.train_seconds < self.next:
            return None
        self.next = self._next_after(state.train_seconds)
        return self._fire(trainer, state)

    def on_train_end(self, trainer: Trainer, state: TrainState) -> None:
        if self.last_fired_step != state.step:
            state.extra["final"] = True
            self._fire(trainer, state)
            state.extra.pop("final", None)

    def _fire(self, trainer: Trainer, state: TrainState) -> Any:
        self.last_fired_step = state.step
        return self.fn(trainer, state)


class EveryTrainingSeconds(AtTrainingSeconds):
    """:class:`AtTrainingSeconds` at every multiple of ``seconds`` (> 0).

    Example:
        >>> points = []
        >>> cb = EveryTrainingSeconds(30.0, lambda tr, st: points.append(st.train_seconds))
    """

    def __init__(self, seconds: float, fn: Callable[[Trainer, TrainState], Any]):
        checks.number("seconds", seconds)
        super().__init__([seconds], fn)
        self.seconds = float(seconds)

    def _next_after(self, seconds: float) -> float:
        return (math.floor(seconds / self.seconds) + 1) * self.seconds


class ProfileSteps(Callback):
    """Records steps ``warmup + 1 .. warmup + steps`` with ``torch.profiler`` and writes
    ``trace.json`` (Chrome trace: open in Perfetto or chrome://tracing) and
    ``top_ops.txt`` (operators by self time) into ``directory``; training then goes on.

    The phases every trainer marks (``data``, ``backbone``, ``heads``, ``backward``,
    ``optimizer``; GBML ``inner_loop``, ``outer_loss``, ``outer_backward``) appear as named
    ranges. The profiled steps' time is training time as any other (the profiler slows
    them a little).

    Example:
        >>> # trainer.fit(train, callbacks=[ProfileSteps("prof", warmup=5, steps=3)])
    """

    def __init__(self, directory: str, warmup: int = 5, steps: int = 3):
        checks.integer("warmup", warmup, 0)
        checks.integer("steps", steps, 1)
        self.directory, self.warmup, self.steps = directory, warmup, steps
        self._prof: torch.profiler.profile | None = None
        self.written: list[str] = []
        self.missed: str | None = None

    def _start(self) -> None:
        from torch.profiler import ProfilerActivity, profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA]
                                         if torch.cuda.is_available() else [])
        self._prof = profile(activities=acts, record_shapes=True)
        self._prof.__enter__()

    def on_train_begin(self, trainer: Trainer, state: TrainState) -> None:
        planned = trainer.planned_steps() - state.step
        if planned < self.warmup + self.steps:
            raise ValueError(f"profile: needs {self.warmup + self.steps} steps ({self.warmup} "
                             f"of warm-up, then {self.steps} profiled) but this run makes "
                             f"{planned}; train longer or profile fewer steps")
        self._first = state.step + self.warmup
        if self.warmup == 0:
            self._start()

    def on_step_end(self, trainer: Trainer, state: TrainState) -> bool | None:
        if self._prof is None and state.step == self._first and not self.written:
            self._start()
        elif self._prof is not None and state.step >= self._first + self.steps:
            self._finish()
        return None

    def on_train_end(self, trainer: Trainer, state: TrainState) -> None:
        if self._prof is not None:      # the run ended early: what was recorded
            self._finish()
        elif not self.written:          # ended (time budget) before profiling began
            self.missed = (f"profile: the run ended after {state.step} steps, before step "
                           f"{self._first + 1} where profiling was to begin; nothing written")

    def _finish(self) -> None:
        prof, self._prof = self._prof, None
        assert prof is not None  # called while profiling
        prof.__exit__(None, None, None)
        os.makedirs(self.directory, exist_ok=True)
        trace = os.path.join(self.directory, "trace.json")
        prof.export_chrome_trace(trace)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
        top = os.path.join(self.directory, "top_ops.txt")
        with open(top, "w") as f:
            f.write(table + "\n")
        self.written = [trace, top]


# -- the trainer base --------------------------------------------------------------------------
class Trainer:
    """Base of every fastmtl trainer: ``fit(train, val=None, resume=None, progress=True,
    callbacks=())`` returns the history (one dict per epoch).

    A subclass sets ``method`` and implements ``_prepare_fit`` (checks, model building),
    ``_setup`` (optimizer and scheduler, with ``self.learner`` the module whose state is
    the model), ``_epoch_batches``, ``_train_step`` and ``_validate``; optionally
    ``_end_epoch`` (per-epoch scheduling) and ``_record_extra``.

    Args (of the subclasses): ``backbone``, ``config`` and ``device``; see
    :class:`fastmtl.MTLTrainer` and the trainers of :mod:`fastmtl.gbml`.

    Example:
        >>> import fastmtl
        >>> seen = []
        >>> cfg = fastmtl.MTLConfig(tasks_per_step=2, tasks_per_epoch=4, epochs=1,
        ...                         images_per_class=4)
        >>> trainer = fastmtl.MTLTrainer(fastmtl.models.conv4(hidden=8), cfg)
        >>> at_once = AtTrainingSeconds([1e-6], lambda tr, st: seen.append(st.step))
        >>> _ = trainer.fit(fastmtl.data.SyntheticGlyphs(12, 8), progress=False,
        ...                 callbacks=[at_once])
        >>> seen[0] >= 1
        True
    """

    method = "trainer"
    learner: nn.Module | None = None
    # Set by every subclass's __init__ (config, device, backbone, batchnorm) or ``_setup``
    # (optimizer, scheduler), and by ``fit`` (history, best_epoch).
    config: TrainerConfig
    device: torch.device
    backbone: nn.Module
    batchnorm: str
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    history: list[dict[str, Any]]
    best_epoch: int
    _params: list[torch.Tensor]
    _progress_of: tuple[TrainingClock, TrainState, int] | None
    _signals: _SignalStop
    _allow_changed: bool
    # What the caller knows of the run (data set, split, image size), set per trainer
    # (``trainer.run_info = {...}``): stored in every checkpoint, so `fastmtl eval` can
    # rebuild the data a checkpoint was trained on. None: nothing recorded.
    run_info: dict[str, Any] | None = None
    # Whether evaluate() is an adaptation of the method's own (GBML), or the
    # logistic-regression protocol itself (MTL): compare reports the former beside it.
    own_adaptation = False

    def evaluate(self, dataset: FewShotDataset, n_way: int = 5, k_shot: int = 1,
                 n_query: int = 15, episodes: int = 600, seed: int = 0,
                 progress: bool = True) -> dict[str, Any]:
        """Accuracy of the trained model on seeded test episodes of ``dataset``, by the
        trainer's own test-time adaptation (MTL: the logistic-regression protocol,
        :func:`fastmtl.evaluate`); the result dict of :func:`fastmtl.evaluate`."""
        raise NotImplementedError

    def supports_ways(self, n_way: int) -> bool:
        """Whether :meth:`evaluate` can run ``n_way``-way episodes."""
        raise NotImplementedError

    # -- public ---------------------------------------------------------------------------
    def fit(self, train: FewShotDataset, val: FewShotDataset | None = None,
            resume: str | None = None, progress: bool = True,
            callbacks: Sequence[Callback] = (),
            allow_changed_settings: bool = False) -> list[dict[str, Any]]:
        """Train on ``train``; validate on ``val`` after each epoch; returns the history.

        Args:
            train: the training classes.
            val: validation classes (None: none; the training loss then drives scheduling
                and early stopping, and the last epoch is kept).
            resume: a ``last.pt`` of an earlier run of the same settings, continued exactly.
            progress: show tqdm bars and a line per epoch (rank 0 only).
            callbacks: :class:`Callback` s run at points of training time.
            allow_changed_settings: resume even if ``config`` differs from the
                checkpoint's settings in more than :data:`RESUMABLE_CHANGES` (the run is
                then no longer a repeat of the original).

        Returns:
            The history: one record per epoch (``epoch``, ``steps``, ``train_loss``,
            ``train_acc``, ``lr``, ``elapsed_s``, and ``val_acc``/``val_ci95`` with ``val``).

        Raises:
            ValueError: bad data sets, settings the data cannot hold, a bad checkpoint.
        """
        if not isinstance(train, FewShotDataset):
            raise ValueError(f"train must be a FewShotDataset, got {type(train).__name__}")
        for cb in callbacks:
            if not isinstance(cb, Callback):
                raise ValueError(f"callbacks must be Callback instances, got {type(cb).__name__}")
        if resume is not None:
            _ckpt.check_readable(resume, "resume")
        self._prepare_fit(train, val)
        self._allow_changed = bool(allow_changed_settings)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.config.seed)
            return self._run(train, val, resume, progress, list(callbacks))

    def prepare(self, train: FewShotDataset, epoch: int = 0) -> Iterable[Any]:
        """Set up training on ``train`` as ``fit`` does, without running it; returns the
        batches of ``epoch`` for :meth:`train_step` (for benchmarks and profiling).

        Example:
            >>> # batches = iter(trainer.prepare(train)); trainer.train_step(next(batches))
        """
        if not isinstance(train, FewShotDataset):
            raise ValueError(f"train must be a FewShotDataset, got {type(train).__name__}")
        self._prepare_fit(train, None)
        torch.manual_seed(self.config.seed)
        self.scheduler = None
        self._setup(train)
        self._params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self._built_learner().train()
        return self._epoch_batches(train, epoch, self._steps_per_epoch())

    def train_step(self, batch: Any) -> tuple[float, float, int]:
        """One optimizer step on a batch from :meth:`prepare`: (loss, accuracy, images)."""
        return self._train_step(batch)

    # -- what a method supplies -----------------------------------------------------------
    def _prepare_fit(self, train: FewShotDataset, val: FewShotDataset | None) -> None:
        raise NotImplementedError

    def _setup(self, train: FewShotDataset) -> None:
        """Create ``self.learner``'s parameters, ``self.optimizer``, ``self.scheduler``."""
        raise NotImplementedError

    def _epoch_batches(self, train: FewShotDataset, epoch: int, steps: int) -> Iterable[Any]:
        raise NotImplementedError

    def _train_step(self, batch: Any) -> tuple[float, float, int]:
        """One optimizer step: (loss, accuracy in [0, 1], images used) of this rank."""
        raise NotImplementedError

    def _validate(self, val: FewShotDataset) -> dict[str, Any]:
        raise NotImplementedError

    def _steps_per_epoch(self) -> int:
        raise NotImplementedError

    def _end_epoch(self, record: dict[str, Any], score: float, has_val: bool) -> None:
        pass

    def _record_extra(self) -> dict[str, Any]:
        return {}

    def _built_learner(self) -> nn.Module:
        """``learner``, which ``_setup`` has built by the time the loop uses it."""
        assert self.learner is not None, "_setup builds the learner"
        return self.learner

    def _before_step(self) -> None:
        """Per-step scheduling, before the optimizer step (see :meth:`run_fraction`)."""

    def planned_steps(self) -> int:
        """The steps ``fit`` plans in all (epochs times steps per epoch; a time budget may
        end it sooner); 0 outside ``fit``."""
        run = getattr(self, "_progress_of", None)
        return 0 if run is None else run[2]

    def run_fraction(self) -> float:
        """How much of this run is done, in [0, 1]: the larger of the training clock over
        ``config.max_minutes`` and the steps taken over ``config.epochs`` epochs' steps
        (0 outside ``fit``). A per-step schedule that follows it anneals over whichever
        ends the run first, the time budget or the epochs."""
        run = getattr(self, "_progress_of", None)
        if run is None:
            return 0.0
        clock, state, total = run
        done = state.step / total
        if self.config.max_minutes is not None:
            done = max(done, clock.seconds() / (60.0 * self.config.max_minutes))
        return min(1.0, done)

    # -- the loop -------------------------------------------------------------------------
    def _apply_gradients(self) -> None:
        """Clip (``config.grad_clip``), step the optimizer and any per-step scheduler."""
        if self.config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self._params, self.config.grad_clip)
        self._before_step()
        with phase("optimizer"):
            self.optimizer.step()

    def _run(self, train: FewShotDataset, val: FewShotDataset | None, resume: str | None,
             progress: bool, callbacks: list[Callback]) -> list[dict[str, Any]]:
        cfg = self.config
        main = _dist.is_main()
        progress = progress and main
        self.scheduler = None
        self._setup(train)
        self._params = [p for group in self.optimizer.param_groups for p in group["params"]]
        best: dict[str, Any] = {"score": -math.inf, "epoch": -1, "state": None}
        self.history, start_epoch = [], 0
        if resume is not None:
            start_epoch, best = self._load(resume)
        steps = self._steps_per_epoch()
        clock = TrainingClock(self.history[-1]["elapsed_s"] if self.history else 0.0)
        state = TrainState(step=sum(h.get("steps", steps) for h in self.history),
                           images=sum(h.get("images", 0) for h in self.history),
                           train_seconds=self.history[-1]["elapsed_s"] if self.history else 0.0)
        stale = 0 if not self.history else self.history[-1]["epoch"] - best["epoch"]
        self._progress_of = (clock, state, max(1, cfg.epochs * steps))
        with clock.paused():
            for cb in callbacks:
                cb.on_train_begin(self, state)
        self._signals = _SignalStop()
        try:
            self._signals.__enter__()
            for epoch in range(start_epoch, cfg.epochs):
                state.epoch = epoch + 1
                try:
                    record, stop = self._run_epoch(train, val, epoch, steps, state, clock,
                                                   callbacks, progress)
                except Exception as exc:
                    if _dist.is_distributed() and _dist.is_comm_failure(exc):
                        raise _dist.as_distributed_error(
                            exc, f"{self.method} training (epoch {epoch + 1})",
                            cfg.checkpoint_dir) from exc
                    raise
                if record is None:
                    break
                best, stale = self._keep_epoch(record, best, stale, progress and main, main)
                state.record = record
                with clock.paused():
                    stop = any([bool(cb.on_epoch_end(self, state)) for cb in callbacks]) or stop
                state.record = None
                if cfg.early_stop_patience is not None and stale >= cfg.early_stop_patience:
                    break
                if stop:
                    break
        finally:
            self._signals.__exit__()
            self._progress_of = None
            self._end_run()
        state.train_seconds = clock.seconds()
        for cb in callbacks:
            cb.on_train_end(self, state)
        if val is not None and best["state"] is not None:
            self._built_learner().load_state_dict(best["state"])
        self.best_epoch = best["epoch"]
        return self.history

    def _keep_epoch(self, record: dict[str, Any], best: dict[str, Any], stale: int, show: bool,
                    save: bool) -> tuple[dict[str, Any], int]:
        """Append the epoch's record, track the best epoch, print and checkpoint it."""
        self.history.append(record)
        if record["_score"] > best["score"]:
            best = {"score": record["_score"], "epoch": record["epoch"],
                    "state": copy.deepcopy(self._built_learner().state_dict())}
            stale = 0
        else:
            stale += 1
        del record["_score"]
        if show:
            tqdm.write(f"{self.method} " + format_record(record))
        if save:
            self._save(record["epoch"], best)
        return best, stale

    def _run_epoch(self, train: FewShotDataset, val: FewShotDataset | None, epoch: int,
                   steps: int, state: TrainState, clock: TrainingClock,
                   callbacks: list[Callback],
                   progress: bool) -> tuple[dict[str, Any] | None, bool]:
        """Trains one epoch; returns (its record or None if no step ran, stop)."""
        cfg = self.config
        # Every random stream restarts from (seed, epoch): a resumed run repeats an
        # uninterrupted one exactly (episodes are already a function of their number).
        torch.manual_seed(epoch_seed(cfg.seed, epoch))
        self._built_learner().train()
        losses: list[float] = []
        accs: list[float] = []
        images = 0
        bar = tqdm(self._epoch_batches(train, epoch, steps), total=steps, leave=False,
                   desc=f"{self.method} epoch {epoch + 1}/{cfg.epochs}", disable=not progress)
        stop = False
        for batch in bar:
            try:
                loss, acc, n_images = self._train_step(batch)
            except NonFiniteError:        # NaN features or rows reached the head op
                loss = float("nan")
            if not math.isfinite(loss):
                self._diverged(epoch, len(losses) + 1, loss)
            seconds = clock.seconds()
            late = cfg.max_minutes is not None and seconds > 60 * cfg.max_minutes
            # One small all-reduce: every rank logs the global figures, and all stop
            # together when any rank's clock runs out (rank clocks differ).
            loss, acc, late_v, images_v = _dist.average([loss, acc, float(late), n_images])
            n_images = int(round(images_v * _dist.world_size()))
            losses.append(loss)
            accs.append(acc)
            images += n_images
            state.step += 1
            state.images += n_images
            state.loss, state.acc, state.train_seconds = loss, acc, seconds
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}",
                            acc=f"{100 * np.mean(accs[-20:]):.1f}")
            if _dist.any_rank(bool(self._signals.signum)) if _dist.is_distributed() \
                    else self._signals.signum:
                self._interrupted(epoch)
            asked = False
            if callbacks:
                with clock.paused():
                    asked = any([bool(cb.on_step_end(self, state)) for cb in callbacks])
                asked = _dist.any_rank(asked)
            if late_v > 0 or asked:
                stop = True
                break
        if not losses:
            return None, True
        return self._epoch_record(epoch, losses, accs, images, val, state, clock), stop

    def _epoch_record(self, epoch: int, losses: list[float], accs: list[float], images: int,
                      val: FewShotDataset | None, state: TrainState,
                      clock: TrainingClock) -> dict[str, Any]:
        """The record of an epoch that ran steps, validated (``_score``: what the best
        epoch is chosen by), after the method's end-of-epoch scheduling."""
        record = {"epoch": epoch + 1, "steps": len(losses), "images": images,
                  "train_loss": float(np.mean(losses)), "train_acc": 100.0 * float(np.mean(accs)),
                  "lr": self.optimizer.param_groups[0]["lr"], **self._record_extra()}
        if val is not None:
            res = self._validate(val)
            record.update(val_acc=res["mean"], val_ci95=res["ci95"])
            score = res["mean"]
        else:
            score = -record["train_loss"]
        self._end_epoch(record, score, val is not None)
        record["elapsed_s"] = clock.seconds()
        state.train_seconds = record["elapsed_s"]
        record["_score"] = score
        return record

    def _end_run(self) -> None:
        pass

    def _diverged(self, epoch: int, step: int, loss: float) -> NoReturn:
        directory = self.config.checkpoint_dir
        last = os.path.join(directory, "last.pt") if directory else None
        where = (f"the last good checkpoint is {last} (epoch {self.history[-1]['epoch']})"
                 if last and self.history and os.path.exists(last)
                 else "no checkpoint of an earlier epoch exists")
        raise TrainingDiverged(f"{self.method}: the training loss became {loss} at step "
                               f"{step} of epoch {epoch + 1}; stopped. {where}; try a lower "
                               f"learning rate or grad_clip")

    def _interrupted(self, epoch: int) -> NoReturn:
        directory = self.config.checkpoint_dir
        last = os.path.join(directory, "last.pt") if directory else None
        saved = self.history[-1]["epoch"] if self.history else 0
        if last is not None and not os.path.exists(last):
            last = None
        raise TrainingInterrupted(self._signals.signum or signal.SIGINT, epoch + 1, last, saved)

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The model as one fastmtl checkpoint (see :mod:`fastmtl.checkpoint`)."""
        return _ckpt.model_state(self)

    def _save(self, epoch: int, best: dict[str, Any]) -> None:
        directory = self.config.checkpoint_dir
        if directory is None:
            return
        _ckpt.save_training(directory, self, epoch, best)

    def _load(self, path: str) -> tuple[int, dict[str, Any]]:
        state = _ckpt.load(path, method=self.method, device=self.device, training=True,
                           what="resume")
        if not getattr(self, "_allow_changed", False):
            check_same_run(state.get("config", {}), self.config, path)
            _check_same_data(state.get("run") or {}, self.run_info or {}, path)
        _ckpt.load_learner(self._built_learner(), state, path)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.history = list(state["history"])
        best = dict(state["best"], state=state.get("best_state"))
        return state["epoch"], best
