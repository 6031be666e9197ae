"""The config base every trainer shares, with each field's help text as field metadata.

A trainer's config is a dataclass deriving from :class:`TrainerConfig`; every field is
declared with :func:`setting` (its default and its one-sentence help). The CLI builds one
flag per field from that metadata (:func:`field_help`), so code, ``--help`` and the docs
say the same thing. A subclass that changes a default redeclares the field with
:func:`setting` and may keep the base's help by passing ``help=None``.

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class MyConfig(TrainerConfig):
    ...     lr: float = setting(1e-3, "learning rate")
    >>> field_help(MyConfig, "lr")
    'learning rate'
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

from . import checks

__all__ = ["TrainerConfig", "setting", "field_help", "renamed_fields", "PRECISIONS"]

PRECISIONS = ("fp32", "bf16")


def setting(default: Any, help: str | None) -> Any:
    """A dataclass field with ``default`` and its help text (None: the base class's).

    Args:
        default: the field's default (immutable values only, as dataclasses require).
        help: one sentence for ``--help`` and :func:`field_help`.

    Returns:
        a ``dataclasses.field`` carrying the help as metadata.

    Example:
        >>> import dataclasses
        >>> @dataclasses.dataclass
        ... class Demo:
        ...     steps: int = setting(10, "optimizer steps")
        >>> field_help(Demo, "steps")
        'optimizer steps'
    """
    return dataclasses.field(default=default, metadata={} if help is None else {"help": help})


def field_help(cls: type, name: str) -> str:
    """The help text of field ``name`` of config class ``cls`` (from the nearest class in
    its MRO that gives one).

    Raises:
        ValueError: ``name`` has no help text anywhere (every field must have one).

    Example:
        >>> from fastmtl import MTLConfig
        >>> field_help(MTLConfig, "lr")[:13]
        'learning rate'
    """
    for klass in cls.__mro__:
        field = getattr(klass, "__dataclass_fields__", {}).get(name)
        if field is not None and "help" in field.metadata:
            return field.metadata["help"]
    raise ValueError(f"{cls.__name__}.{name} has no help text")


def renamed_fields(cls: type, values: dict[str, Any], what: str = "") -> dict[str, Any]:
    """``values`` with the deprecated field names of ``cls`` (its ``_renamed``, old -> new)
    replaced by the new ones, each with a DeprecationWarning (one release of grace).

    A value under the old name wins over one under the new name (``dataclasses.replace``
    passes every field by its new name beside the caller's changes).

    Args:
        cls: the config class.
        values: field values by name, old or new.
        what: where they come from, for the warning (e.g. "settings for maml").

    Returns:
        a new dict with new names only.

    Example:
        >>> import warnings
        >>> from fastmtl.gbml import MAMLConfig
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     renamed_fields(MAMLConfig, {"meta_batch": 8})
        {'tasks_per_step': 8}
    """
    renamed = getattr(cls, "_renamed", {})
    out = dict(values)
    for old, new in renamed.items():
        if old in out:
            warnings.warn(f"{what or cls.__name__}: {old} is deprecated and goes in the next "
                          f"release; use {new}", DeprecationWarning, stacklevel=4)
            out[new] = out.pop(old)
    return out


class _Renaming(type):
    """Lets a config class take its deprecated field names as keywords (``_renamed``)."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        return super().__call__(*args, **renamed_fields(cls, kwargs))


@dataclass
class TrainerConfig(metaclass=_Renaming):
    """The fields every trainer has: the training length, regularization shared by all,
    the validation protocol, the budget, precision, seed and checkpoints.

    A concept has one name in every config (``lr``, ``tasks_per_step``, ...); a subclass
    lists names it used before in ``_renamed`` (old -> new): they still work as keywords,
    attributes and CLI flags for one release, with a DeprecationWarning.

    Args:
        every field below, by keyword; ``field_help(cls, name)`` gives each one's help.

    Raises:
        ValueError: from :meth:`validate` (which every trainer calls before any work),
            naming the first field out of range; an unknown field is a TypeError.

    Example:
        >>> from fastmtl.gbml import MAMLConfig
        >>> sorted(set(f.name for f in dataclasses.fields(TrainerConfig))
        ...        & set(f.name for f in dataclasses.fields(MAMLConfig)))[:3]
        ['checkpoint_dir', 'early_stop_patience', 'epochs']
    """

    _renamed: ClassVar[dict[str, str]] = {}

    n_way: int = setting(5, "classes per training task")
    tasks_per_epoch: int = setting(1600, "tasks per epoch")
    epochs: int = setting(100, "maximum number of epochs")
    weight_decay: float = setting(0.0, "weight decay of the optimizer")
    grad_clip: float | None = setting(None, "max gradient norm (None: no clipping)")
    val_episodes: int = setting(200, "validation episodes per epoch (the test protocol)")
    val_ways: int = setting(5, "classes per validation episode")
    val_shots: int = setting(1, "support images per class in validation episodes")
    val_queries: int = setting(15, "query images per class in validation episodes")
    early_stop_patience: int | None = setting(
        None, "stop after this many epochs without a better validation accuracy (None: "
              "never); the best epoch's weights are restored at the end")
    max_minutes: float | None = setting(
        None, "training-time budget of fit (None: none), checked after every step; the "
              "partial epoch is still validated, recorded and saved")
    precision: str = setting(
        "fp32", "fp32 or bf16 (bfloat16 autocast of the backbone; heads and losses stay "
                "in float32)")
    seed: int = setting(0, "seeds episodes, initialization, augmentation and dropout (one "
                           "seed, repeatable)")
    checkpoint_dir: str | None = setting(
        None, "where last.pt, best.pt and history.json go every epoch (None: none)")

    def __getattr__(self, name: str) -> Any:
        new = type(self)._renamed.get(name)
        if new is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        warnings.warn(f"{type(self).__name__}.{name} is deprecated and goes in the next "
                      f"release; use .{new}", DeprecationWarning, stacklevel=2)
        return getattr(self, new)

    def inert_fields(self) -> list[tuple[str, str]]:
        """(field, the setting that disables it) for each field that has no effect under
        this config's other settings; :meth:`validate` refuses such a field unless it is
        at its default. A subclass lists its own.

        Example:
            >>> from fastmtl import MTLConfig
            >>> MTLConfig(lr_schedule="plateau").inert_fields()[1]
            ('warmup_steps', "lr_schedule='plateau'")
        """
        return []

    def task_needs(self) -> tuple[int, int]:
        """(classes, images a class) a training task draws from the training set."""
        return self.n_way, 1

    def _refuse_inert(self) -> None:
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name, why in self.inert_fields():
            value = getattr(self, name)
            if value != defaults[name]:
                other = f" or change {why.split('=')[0]}" if "=" in why else ""
                raise ValueError(f"{name}={value!r} has no effect with {why}; leave it at "
                                 f"its default ({defaults[name]!r}){other}")

    def validate(self) -> None:
        """Raise ValueError naming the first shared field out of range, or set where it
        has no effect (:meth:`inert_fields`), before any work."""
        self._refuse_inert()
        for name in ("tasks_per_epoch", "epochs", "val_shots", "val_queries", "val_episodes"):
            checks.integer(name, getattr(self, name), 1)
        # A 1-way task has nothing to tell apart: loss 0, zero gradients, 100% accuracy.
        checks.integer("n_way", self.n_way, 2)
        checks.integer("val_ways", self.val_ways, 2)
        checks.integer("early_stop_patience", self.early_stop_patience, 1, optional=True)
        checks.number("max_minutes", self.max_minutes, optional=True)
        checks.number("weight_decay", self.weight_decay, inclusive=True)
        checks.number("grad_clip", self.grad_clip, optional=True)
        checks.one_of("precision", self.precision, PRECISIONS)
