"""One checkpoint format for every method, written atomically.

A checkpoint is a dict saved with ``torch.save``:

- ``format``: :data:`FORMAT`; ``method``: ``"mtl"``, ``"maml"``, ...; ``config``: the
  trainer's config as a dict; ``backbone_spec``: how to rebuild the backbone (the
  ``spec`` every backbone of :mod:`fastmtl.models` carries, read by
  :func:`fastmtl.registry.build_backbone`; None for a user's own module);
- ``model``: the learner module's ``state_dict`` (MTL: backbone, head table, logit scale;
  GBML: backbone and the method's head); ``backbone``: the backbone's own ``state_dict``,
  all that evaluation needs; ``batchnorm``: ``"running"`` (MTL) or ``"batch-statistics"``
  (GBML: load into a backbone passed through :func:`fastmtl.gbml.use_batch_stats`);
- ``history``: one record per epoch; ``run``: what the caller recorded of the run (the
  CLI: data set, split, image size, data seed), so a checkpoint can be evaluated alone;
- training checkpoints (``last.pt``) add ``epoch``, ``optimizer``, ``scheduler``, ``best``
  and ``best_state``, everything an exact resume needs; the CLI's ``final.pt`` adds the
  data set and split settings.

``last.pt`` is written every epoch, ``best.pt`` when the epoch is the best so far, and
``history.json`` beside them; every file goes to a temporary name first and is renamed,
so a crash never leaves half a file.

Checkpoints hold tensors and plain values only, and are read with
``torch.load(..., weights_only=True)``: a shared file cannot run code when loaded.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:  # matplotlib is optional: imported where a plot is drawn
    from matplotlib.figure import Figure

__all__ = ["FORMAT", "MODEL_KEYS", "atomic_save", "atomic_write_json", "atomic_write_text",
           "atomic_savefig", "check_readable",
           "load", "load_learner", "safe_load", "model_state", "save_training"]

FORMAT = "fastmtl-checkpoint/1"
# torch.save's zip files start with the zip signature; its legacy format with a pickled
# magic number (protocol 2, LONG1 of 10 bytes: 0x1950a86a20f9469cfc6c).
_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"
MODEL_KEYS = ("format", "method", "config", "backbone_spec", "model", "backbone", "batchnorm",
              "history", "run")


class _Trainer(Protocol):
    """What a checkpoint holds of a trainer: every :class:`fastmtl.training.Trainer` has it
    (named here by its shape, as this module sits below the trainers)."""

    @property
    def method(self) -> str: ...
    @property
    def config(self) -> Any: ...
    @property
    def backbone(self) -> torch.nn.Module: ...
    @property
    def learner(self) -> torch.nn.Module | None: ...
    @property
    def batchnorm(self) -> str: ...
    @property
    def history(self) -> list[dict[str, Any]]: ...
    @property
    def run_info(self) -> dict[str, Any] | None: ...
    @property
    def optimizer(self) -> torch.optim.Optimizer: ...
    @property
    def scheduler(self) -> torch.optim.lr_scheduler.LRScheduler | None: ...


def _replace(tmp: str, path: str) -> None:
    """Rename ``tmp`` over ``path``, never over a device, pipe or socket (``/dev/null``
    renamed over is gone for every program on the machine)."""
    if os.path.exists(path) and not os.path.isfile(path):
        os.remove(tmp)
        what = "a directory" if os.path.isdir(path) else "not a regular file (a device, " \
            "pipe or socket)"
        raise ValueError(f"{path!r} is {what}; give a file path")
    os.replace(tmp, path)


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename it into place.

    A reader never sees a half-written file, and a crash leaves the old one.

    Args:
        obj: what ``torch.save`` takes.
        path: the file to (re)place.

    Example:
        >>> import os, tempfile, torch
        >>> path = os.path.join(tempfile.mkdtemp(), "x.pt")
        >>> atomic_save({"w": torch.ones(2)}, path)
        >>> torch.load(path)["w"].tolist()
        [1.0, 1.0]
    """
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    _replace(tmp, path)


def atomic_write_json(path: str, payload: Any) -> None:
    """Write ``payload`` as JSON to a temporary file beside ``path``, then rename it.

    Example:
        >>> import os, tempfile, json
        >>> path = os.path.join(tempfile.mkdtemp(), "r.json")
        >>> atomic_write_json(path, {"acc": 90.5})
        >>> json.load(open(path))
        {'acc': 90.5}
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    _replace(tmp, path)


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it.

    Example:
        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "compare.md")
        >>> atomic_write_text(path, "# table")
        >>> open(path).read()
        '# table'
    """
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    _replace(tmp, path)


def atomic_savefig(fig: Figure, path: str, dpi: int = 110) -> None:
    """Save a matplotlib figure to a temporary file beside ``path``, then rename it.

    Example:
        >>> import os, tempfile
        >>> from matplotlib.figure import Figure
        >>> fig = Figure()
        >>> path = os.path.join(tempfile.mkdtemp(), "curve.png")
        >>> atomic_savefig(fig, path)
        >>> os.path.getsize(path) > 0
        True
    """
    tmp = f"{path}.tmp{os.getpid()}.png"
    fig.savefig(tmp, dpi=dpi)
    _replace(tmp, path)


def check_readable(path: str, what: str = "checkpoint") -> None:
    """Raise ValueError naming ``what`` unless ``path`` is a readable regular file.

    Example:
        >>> check_readable("/no/such/file.pt")
        Traceback (most recent call last):
        ...
        ValueError: checkpoint '/no/such/file.pt' does not exist
    """
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"{what} must be a file path, got {type(path).__name__}")
    if not os.path.exists(path):
        raise ValueError(f"{what} {str(path)!r} does not exist")
    if not os.path.isfile(path):
        raise ValueError(f"{what} {str(path)!r} is not a file")
    if not os.access(path, os.R_OK):
        raise ValueError(f"{what} {str(path)!r} is not readable")


def model_state(trainer: _Trainer) -> dict[str, Any]:
    """The model part of a checkpoint of ``trainer`` (any fastmtl trainer).

    Example:
        >>> import fastmtl
        >>> from fastmtl.gbml import R2D2, R2D2Config
        >>> r2d2 = R2D2(fastmtl.models.conv4(hidden=8), R2D2Config(n_way=5)).build((1, 28, 28))
        >>> state = model_state(r2d2)
        >>> state["method"], state["batchnorm"]
        ('r2d2', 'batch-statistics')
    """
    return {"format": FORMAT, "method": trainer.method,
            "config": dataclasses.asdict(trainer.config),
            "backbone_spec": getattr(trainer.backbone, "spec", None),
            "model": trainer.learner.state_dict() if trainer.learner is not None else None,
            "backbone": trainer.backbone.state_dict(), "batchnorm": trainer.batchnorm,
            "history": trainer.history, "run": dict(trainer.run_info or {})}


def save_training(directory: str, trainer: _Trainer, epoch: int, best: dict[str, Any]) -> None:
    """Write ``last.pt`` (and ``best.pt`` at the best epoch) and ``history.json``.

    The trainers call it after every epoch when ``config.checkpoint_dir`` is set.

    Example:
        >>> import os, tempfile, fastmtl
        >>> run = tempfile.mkdtemp()
        >>> cfg = fastmtl.MTLConfig(tasks_per_step=2, tasks_per_epoch=2, epochs=1,
        ...                         images_per_class=4, checkpoint_dir=run)
        >>> trainer = fastmtl.MTLTrainer(fastmtl.models.conv4(hidden=8), cfg)
        >>> _ = trainer.fit(fastmtl.data.SyntheticGlyphs(12, 8), progress=False)
        >>> sorted(f for f in os.listdir(run) if not f.startswith("."))
        ['best.pt', 'history.json', 'last.pt']
    """
    os.makedirs(directory, exist_ok=True)
    sched = trainer.scheduler
    state = dict(model_state(trainer), epoch=epoch, optimizer=trainer.optimizer.state_dict(),
                 scheduler=sched.state_dict() if sched is not None else None,
                 best={"score": best["score"], "epoch": best["epoch"]},
                 best_state=best["state"])
    atomic_save(state, os.path.join(directory, "last.pt"))
    if best["epoch"] == epoch:
        atomic_save({k: state[k] for k in MODEL_KEYS + ("epoch",)},
                    os.path.join(directory, "best.pt"))
    atomic_write_json(os.path.join(directory, "history.json"), trainer.history)


def load(path: str, method: str | None = None, device: torch.device | str = "cpu",
         training: bool = False, what: str = "checkpoint") -> dict[str, Any]:
    """Read a fastmtl checkpoint, checking that it is one.

    Args:
        path: the file.
        method: the method it must hold (None: any).
        device: where its tensors go.
        training: it must hold the optimizer state an exact resume needs (a ``last.pt``).
        what: the argument's name, for error messages.

    Returns:
        The checkpoint dict.

    Raises:
        ValueError: the file is missing, unreadable, not a fastmtl checkpoint, of another
            method, or (``training``) lacks the resume state.

    Example:
        >>> import os, tempfile, fastmtl
        >>> run = tempfile.mkdtemp()
        >>> cfg = fastmtl.MTLConfig(tasks_per_step=2, tasks_per_epoch=2, epochs=1,
        ...                         images_per_class=4, checkpoint_dir=run)
        >>> trainer = fastmtl.MTLTrainer(fastmtl.models.conv4(hidden=8), cfg)
        >>> trainer.fit(fastmtl.data.SyntheticGlyphs(12, 8), progress=False)[0]["epoch"]
        1
        >>> load(os.path.join(run, "last.pt"), method="mtl", training=True)["method"]
        'mtl'
    """
    check_readable(path, what)
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_MAGIC))
    # Only hand torch.load what could be a torch file: unpickling arbitrary bytes can fail
    # deep inside pickle (MemoryError, interpreter warnings on stderr) instead of cleanly.
    if not (head.startswith(b"PK\x03\x04") or head == _LEGACY_MAGIC):
        raise ValueError(f"{what} {str(path)!r} is not a fastmtl checkpoint (not a file "
                         f"torch.save writes)")
    state = safe_load(path, what, "a fastmtl checkpoint", device)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{what} {str(path)!r} is not a fastmtl checkpoint of this version "
                         f"(expected format {FORMAT!r})")
    if method is not None and state.get("method") != method:
        raise ValueError(f"{what} {str(path)!r} holds a {state.get('method')!r} run, not "
                         f"{method!r}")
    if training and "optimizer" not in state:
        raise ValueError(f"{what} {str(path)!r} has no optimizer state (a best.pt or "
                         f"final.pt); resume from the run's last.pt")
    return state


def safe_load(path: str, what: str, kind: str, device: torch.device | str = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True``: tensors and plain values only, so the
    file cannot run code; anything else is a one-line ValueError.

    Raises:
        ValueError: "``what`` ``path`` is not ``kind``", with the reason.

    Example:
        >>> import os, pickle, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "evil.pt")
        >>> class Evil:
        ...     def __reduce__(self):
        ...         return (print, ("this must never print",))
        >>> atomic_save({"backbone": Evil()}, path)
        >>> safe_load(path, "checkpoint", "a fastmtl checkpoint")
        Traceback (most recent call last):
        ...
        ValueError: checkpoint '...evil.pt' is not a fastmtl checkpoint (it holds objects ...)
    """
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{what} {str(path)!r} is not {kind} (it holds objects other than "
                         f"tensors and plain values, which fastmtl never unpickles)") from None
    except Exception as exc:      # zip, pickle and torch errors alike
        raise ValueError(f"{what} {str(path)!r} is not {kind} (cannot be read: "
                         f"{type(exc).__name__})") from None


def load_learner(learner: torch.nn.Module, state: dict[str, Any], path: str) -> None:
    """Load a checkpoint's model state into ``learner``, or say in one line why not.

    Raises:
        ValueError: the state does not fit ``learner`` (another backbone or head size),
            naming ``path``.

    Example:
        >>> import torch
        >>> load_learner(torch.nn.Linear(2, 2), {"model": torch.nn.Linear(3, 2).state_dict()},
        ...              "old.pt")
        Traceback (most recent call last):
        ...
        ValueError: ...old.pt...
    """
    try:
        learner.load_state_dict(state["model"])
    except (RuntimeError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"checkpoint {str(path)!r} holds another model (backbone "
                         f"{state.get('backbone_spec')}): {first}") from None
