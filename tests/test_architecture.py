"""The package's imports run one way (DESIGN.md "Data flows one way"), read from the source."""
from __future__ import annotations

import ast
import pathlib

import fastmtl

ROOT = pathlib.Path(fastmtl.__file__).parent

# Lower layers never import higher ones; within a layer only inside one package.
LAYERS = [
    ("fastmtl._env", "fastmtl.checks", "fastmtl.distributed", "fastmtl.checkpoint",
     "fastmtl._episodes",
     "fastmtl._multihead_ce", "fastmtl.kernels"),
    ("fastmtl.config",),
    ("fastmtl.data",),
    ("fastmtl.sampling",),
    ("fastmtl.models", "fastmtl.ops"),
    ("fastmtl.adapt",),
    ("fastmtl.evaluate",),
    ("fastmtl.training",),
    ("fastmtl.mtl", "fastmtl.gbml"),
    ("fastmtl.compare", "fastmtl.classifier"),
    ("fastmtl.cli",),
    ("fastmtl.__main__",),
]


def _layer(module: str) -> int:
    for i, names in enumerate(LAYERS):
        if any(module == n or module.startswith(n + ".") for n in names):
            return i
    raise AssertionError(f"{module} is in no layer of LAYERS: add it where it belongs")


def _package(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])


def _imports(path: pathlib.Path, module: str):
    """(imported module, imported names) of every fastmtl import in ``path``."""
    pkg = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[:len(pkg.split(".")) - (node.level - 1)]
                full = ".".join(base + ([node.module] if node.module else []))
            else:
                full = node.module or ""
            if not full.startswith("fastmtl"):
                continue
            names = [a.name for a in node.names]
            if node.module is None or full == "fastmtl":
                for name in names:     # `from . import x`: x is a module
                    yield f"{full}.{name}", []
            else:
                yield full, names
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("fastmtl"):
                    yield a.name, []


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        module = ".".join(rel.parts)
        if module.endswith(".__init__"):
            module = module[: -len(".__init__")]
        yield path, module


def test_imports_run_one_way():
    wrong = []
    for path, module in _modules():
        if module == "fastmtl" or module == "fastmtl.kernels":
            continue       # the package's front door re-exports from every layer
        for target, _ in _imports(path, module):
            if target == "fastmtl.__version__":
                continue
            lo, hi = _layer(target), _layer(module)
            if lo > hi or (lo == hi and _package(target) != _package(module)):
                wrong.append(f"{module} imports {target}")
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_no_private_names_cross_a_package():
    wrong = []
    for path, module in _modules():
        for target, names in _imports(path, module):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            native = target in ("fastmtl._episodes", "fastmtl._multihead_ce")
            if private and _package(target) != _package(module) and not native:
                wrong.append(f"{module} imports {private} from {target}")
    assert not wrong, "\n".join(wrong)


def test_every_module_has_a_layer():
    for _, module in _modules():
        if module != "fastmtl":
            _layer(module)
