"""Public docstrings: every Example runs, and the public API keeps the structured form.

The structured form (DESIGN.md, code style): one line saying what the object does, then
``Args:`` / ``Returns:`` / ``Raises:`` where they apply, and a short ``Example:`` that
runs. The examples are run here with :mod:`doctest`, so an example that stops matching
the code fails the suite.
"""
from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil

import pytest

import fastmtl
import fastmtl.compare

MODULES = ["fastmtl"] + sorted(
    m.name for m in pkgutil.walk_packages(fastmtl.__path__, prefix="fastmtl.")
    if m.name != "fastmtl.__main__" and not m.name.startswith("fastmtl.kernels"))


def _importable(name: str):
    try:
        return importlib.import_module(name)
    except ImportError:             # a compiled extension that did not build
        return None


@pytest.mark.parametrize("name", MODULES)
def test_examples_run(name):
    module = _importable(name)
    if module is None:
        pytest.skip(f"{name} is not importable here")
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(module, name):      # each example sees its module's names
        if test.name.split(".")[-1].startswith("_") and test.name != name:
            continue
        if not test.filename or not test.filename.startswith(str(fastmtl.__path__[0])):
            continue                # objects re-exported from elsewhere
        report: list[str] = []
        result = runner.run(test, out=report.append)
        assert result.failed == 0, "".join(report)


# The user-facing API: what ``import fastmtl`` and the README's tour lead to. Each has the
# full structured form; the rest of the public names are held to a runnable example.
CORE_API = [
    fastmtl.MTLTrainer, fastmtl.MTLConfig, fastmtl.FewShotClassifier, fastmtl.evaluate,
    fastmtl.adapt.fit_logistic, fastmtl.ops.multihead_ce,
    fastmtl.gbml.MAML, fastmtl.gbml.ANIL, fastmtl.gbml.R2D2, fastmtl.gbml.ProtoNet,
    fastmtl.models.Conv4, fastmtl.models.ResNet12, fastmtl.models.conv4,
    fastmtl.models.resnet12, fastmtl.models.feature_dim,
    fastmtl.data.SyntheticGlyphs, fastmtl.data.Omniglot, fastmtl.data.with_rotations,
    fastmtl.sampling.EpisodeSampler, fastmtl.sampling.assemble,
    fastmtl.compare.config_for,
]


@pytest.mark.parametrize("obj", CORE_API, ids=lambda o: o.__qualname__)
def test_core_api_structured(obj):
    doc = inspect.getdoc(obj) or ""
    first, _, rest = doc.partition("\n")
    assert first.strip() and first.rstrip().endswith("."), f"one-line summary: {first!r}"
    sections = ["Args:", "Example:"] + ([] if inspect.isclass(obj) else ["Returns:"])
    missing = [s for s in sections if s not in rest]
    assert not missing, f"{obj.__qualname__} lacks {missing}"
