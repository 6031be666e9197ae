"""The one list of data sets, backbones and methods: names -> what builds them.

Every entry point (the CLI, :mod:`fastmtl.compare`, :class:`fastmtl.FewShotClassifier`,
the benchmarks) reads its names and builders here, so adding a method, backbone or data
set is one entry. The module sits low in the import order: an entry names its builder
by its dotted path (``"fastmtl.mtl:MTLTrainer"``), imported when first used, so this
module imports nothing of fastmtl at import time and any layer may read it.

Every table is read-only (``types.MappingProxyType``): no module-level state changes.

Example:
    >>> from fastmtl import registry
    >>> registry.METHOD_NAMES
    ('mtl', 'maml', 'fomaml', 'anil', 'r2d2', 'protonet')
    >>> net = registry.build_backbone({"name": "conv4", "in_channels": 1, "hidden": 8,
    ...                                "out_channels": 8})
    >>> net.spec["hidden"]
    8
"""
from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for the annotations only: this module imports no torch at import time
    from torch import nn

__all__ = ["DATASETS", "DATASET_NAMES", "BACKBONES", "BACKBONE_NAMES", "METHODS",
           "METHOD_NAMES", "Method", "Dataset", "uses", "resolve", "method", "build_backbone",
           "load_dataset", "default_config", "compare_settings"]


@dataclasses.dataclass(frozen=True)
class Method:
    """One training method: its trainer and config classes (dotted paths), the config
    fields the method fixes, and the settings ``fastmtl compare`` runs it with.

    ``compare`` holds changes from the config's defaults; ``recipe`` (MTL) names the
    preset (``MTLConfig.from_recipe``) those changes start from.
    """

    trainer: str
    config: str
    fixed: Mapping[str, Any] = dataclasses.field(default_factory=lambda: MappingProxyType({}))
    compare: Mapping[str, Any] = dataclasses.field(
        default_factory=lambda: MappingProxyType({}))
    recipe: str | None = None


# The MAML paper's Omniglot inner loop (1 step of lr 0.4 in training, 3 at test) at a
# meta-batch a 2-core CPU can step often; chunk_size 10: test episodes vmapped 10 at a
# time in the method's own evaluation (1.8-2x faster than 50 on a 2-core CPU); vectorize
# None: each method's form as measured fastest on the device.
_MAML_LIKE = MappingProxyType(dict(n_way=5, k_shot=1, n_query=5, tasks_per_step=4,
                                   inner_steps=1, inner_lr=0.4, chunk_size=10,
                                   vectorize=None, test_inner_steps=3, tasks_per_epoch=80))

METHODS: Mapping[str, Method] = MappingProxyType({
    # MTL: the fast recipe, tuned on the validation alphabet (docs/mtl.md).
    "mtl": Method("fastmtl.mtl:MTLTrainer", "fastmtl.mtl:MTLConfig", recipe="fast"),
    "maml": Method("fastmtl.gbml:MAML", "fastmtl.gbml:MAMLConfig", compare=_MAML_LIKE),
    "fomaml": Method("fastmtl.gbml:MAML", "fastmtl.gbml:MAMLConfig",
                     fixed=MappingProxyType({"first_order": True}), compare=_MAML_LIKE),
    "anil": Method("fastmtl.gbml:ANIL", "fastmtl.gbml:ANILConfig", compare=_MAML_LIKE),
    # ProtoNet and R2D2: higher-way training episodes, as their papers train.
    "r2d2": Method("fastmtl.gbml:R2D2", "fastmtl.gbml:R2D2Config", compare=MappingProxyType(
        dict(n_way=20, k_shot=1, n_query=5, tasks_per_step=1, tasks_per_epoch=20,
             chunk_size=10))),
    "protonet": Method("fastmtl.gbml:ProtoNet", "fastmtl.gbml:ProtoNetConfig",
                       compare=MappingProxyType(dict(n_way=20, k_shot=1, n_query=5,
                                                     tasks_per_step=1, lr_decay_every=None,
                                                     tasks_per_epoch=20, chunk_size=10))),
})
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)

BACKBONES: Mapping[str, str] = MappingProxyType({
    "conv4": "fastmtl.models:conv4",
    "resnet12": "fastmtl.models:resnet12",
})
BACKBONE_NAMES: tuple[str, ...] = tuple(BACKBONES)

@dataclasses.dataclass(frozen=True)
class Dataset:
    """A data set: the loader of :mod:`fastmtl.data.named` that reads it, and the options
    of :func:`load_dataset` it uses (the CLI refuses the others' flags; ``"root"``: it
    reads files from a folder)."""

    loader: str
    options: frozenset[str] = frozenset({"root", "image_size", "rotations"})


_PICKLED = frozenset({"root", "rotations"})  # their pickles keep their own image size
DATASETS: Mapping[str, Dataset] = MappingProxyType({
    "synthetic": Dataset("fastmtl.data.named:synthetic",
                         frozenset({"image_size", "rotations", "seed"})),
    "omniglot": Dataset("fastmtl.data.named:omniglot"),
    "folder": Dataset("fastmtl.data.named:folder",
                      frozenset({"root", "image_size", "rotations", "seed", "channels",
                                 "skip_bad_images"})),
    "miniimagenet": Dataset("fastmtl.data.named:miniimagenet", _PICKLED),
    "tieredimagenet": Dataset("fastmtl.data.named:tieredimagenet", _PICKLED),
    "cifarfs": Dataset("fastmtl.data.named:cifarfs", _PICKLED),
    "fc100": Dataset("fastmtl.data.named:fc100", _PICKLED),
})
DATASET_NAMES: tuple[str, ...] = tuple(DATASETS)


def resolve(path: str) -> Any:
    """The object a ``"package.module:name"`` path names (imported on first use).

    Example:
        >>> resolve("fastmtl.models:conv4").__name__
        'conv4'
    """
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _known(kind: str, name: Any, names: tuple[str, ...]) -> str:
    if name not in names:
        raise ValueError(f"{kind} must be one of {', '.join(names)}; got {name!r}")
    return name


def method(name: str) -> tuple[type, type, dict[str, Any]]:
    """(trainer class, config class, fixed config fields) of method ``name``.

    Raises:
        ValueError: an unknown method.

    Example:
        >>> cls, config_cls, fixed = method("fomaml")
        >>> cls.__name__, config_cls.__name__, fixed
        ('MAML', 'MAMLConfig', {'first_order': True})
    """
    entry = METHODS[_known("method", name, METHOD_NAMES)]
    return resolve(entry.trainer), resolve(entry.config), dict(entry.fixed)


def default_config(name: str, recipe: str | None = None, **overrides: Any) -> Any:
    """The config method ``name`` trains with by default (MTL: of ``recipe``, default the
    registry's), its fixed fields applied, with ``overrides``; not yet validated.

    Raises:
        ValueError: an unknown method, recipe or field; a recipe for a method without.

    Example:
        >>> default_config("mtl").task_sampling, default_config("mtl", "paper").task_sampling
        ('all_classes', 'episodic')
    """
    _, config_cls, fixed = method(name)
    from_recipe = getattr(config_cls, "from_recipe", None)
    if from_recipe is not None:
        return from_recipe(recipe or METHODS[name].recipe, **{**overrides, **fixed})
    if recipe not in (None, "fast"):
        raise ValueError(f"recipe {recipe!r} is for MTL; method {name!r} has no recipes")
    return config_cls(**{**overrides, **fixed})


def compare_settings(name: str) -> dict[str, Any]:
    """The changes from ``default_config(name)`` that ``fastmtl compare`` runs with.

    Example:
        >>> compare_settings("protonet")["n_way"]
        20
    """
    return dict(METHODS[_known("method", name, METHOD_NAMES)].compare)


def build_backbone(spec: Mapping[str, Any] | str, in_channels: int | None = None) -> nn.Module:
    """A fresh backbone from its spec (``backbone.spec`` of a fastmtl model, as
    checkpoints store it) or from a name and ``in_channels``.

    Raises:
        ValueError: an unknown backbone or a spec its builder does not take.

    Example:
        >>> build_backbone("conv4", 3).spec
        {'name': 'conv4', 'in_channels': 3, 'hidden': 64, 'out_channels': 64}
    """
    if isinstance(spec, str):
        spec = {"name": spec} if in_channels is None else {"name": spec,
                                                           "in_channels": in_channels}
    if not isinstance(spec, Mapping):
        raise ValueError(f"backbone spec must be a dict or a name, got {type(spec).__name__}")
    name = _known("backbone", spec.get("name"), BACKBONE_NAMES)
    kwargs = {k: v for k, v in spec.items() if k != "name"}
    try:
        return resolve(BACKBONES[name])(**kwargs)
    except TypeError as exc:
        raise ValueError(f"backbone spec {dict(spec)} does not fit {name}: {exc}") from None


def load_dataset(name: str, root: str | None, split: str, **options: Any) -> Any:
    """Data set ``name`` (one of :data:`DATASET_NAMES`), ``split`` of it.

    ``options`` go to its loader in :mod:`fastmtl.data.named` (``image_size``, ``seed``,
    ``rotations``, ``channels``, ``skip_bad_images``).

    Raises:
        ValueError: an unknown data set, a missing ``root`` or a bad option.

    Example:
        >>> load_dataset("synthetic", None, "val").n_classes
        40
    """
    return resolve(DATASETS[_known("data", name, DATASET_NAMES)].loader)(root, split, **options)


def uses(name: str, option: str) -> bool:
    """Whether data set ``name`` uses :func:`load_dataset` option ``option``.

    Example:
        >>> uses("omniglot", "seed"), uses("folder", "seed")
        (False, True)
    """
    return option in DATASETS[_known("data", name, DATASET_NAMES)].options
