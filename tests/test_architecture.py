"""The package's imports run one way (DESIGN.md "Data flows one way"), read from the source."""
from __future__ import annotations

import ast
import pathlib

import fastmtl

ROOT = pathlib.Path(fastmtl.__file__).parent

# Lower layers never import higher ones; within a layer only inside one package.
LAYERS = [
    ("fastmtl._env", "fastmtl._version", "fastmtl.registry", "fastmtl.checks",
     "fastmtl.distributed",
     "fastmtl.checkpoint",
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


BENCHMARKS = ROOT.parent / "benchmarks"


def _fastmtl_imports(path: pathlib.Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []


def test_nothing_outside_cli_imports_from_it():
    """cli/ is the top: only the package's __main__ and cli's own modules import it (the
    benchmarks included; tests drive the CLI through ``fastmtl.cli.main`` only)."""
    wrong = []
    for path, module in _modules():
        if module.startswith("fastmtl.cli") or module == "fastmtl.__main__":
            continue
        wrong += [f"{module} imports {t}" for t, _ in _imports(path, module)
                  if t == "fastmtl.cli" or t.startswith("fastmtl.cli.")]
    for path in sorted(BENCHMARKS.rglob("*.py")):
        wrong += [f"{path.name} imports {t}" for t, _ in _fastmtl_imports(path)
                  if t == "fastmtl.cli" or t.startswith("fastmtl.cli.")]
    for path in sorted(pathlib.Path(__file__).parent.glob("*.py")):
        wrong += [f"{path.name} imports {names} from {t}" for t, names in _fastmtl_imports(path)
                  if (t == "fastmtl.cli" or t.startswith("fastmtl.cli."))
                  and set(names) - {"main", "build_parser"}]
    assert not wrong, "\n".join(wrong)


def _name_lists(path: pathlib.Path, names: set[str]):
    """Literal tuples, lists, sets and dict keys holding two or more registered names
    (``__all__``, a module's list of its own public names, aside)."""
    tree = ast.parse(path.read_text())
    exports = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Assign)
               and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets)}
    for node in ast.walk(tree):
        if id(node) in exports:
            continue
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            items = node.elts
        elif isinstance(node, ast.Dict):
            items = [k for k in node.keys if k is not None]
        else:
            continue
        found = {e.value for e in items if isinstance(e, ast.Constant) and e.value in names}
        if len(found) >= 2:
            yield node.lineno, sorted(found)


def test_only_the_registry_lists_names():
    """No module of the package but fastmtl.registry declares a list of method, backbone or
    data-set names (each kind checked on its own). Benchmarks may pick the methods they
    time; they read the names from the registry, not from the CLI."""
    from fastmtl import registry
    kinds = [set(registry.METHOD_NAMES), set(registry.BACKBONE_NAMES),
             set(registry.DATASET_NAMES)]
    wrong = []
    paths = [p for p, m in _modules() if m != "fastmtl.registry"]
    for path in paths:
        for names in kinds:
            wrong += [f"{path.relative_to(ROOT.parent)}:{line} lists {found}"
                      for line, found in _name_lists(path, names)]
    assert not wrong, "\n".join(wrong)


def _long_functions(path: pathlib.Path, limit: int = 60):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > limit:
                yield node.name, node.lineno, length


def test_no_function_over_60_lines():
    wrong = [f"{path.relative_to(ROOT.parent)}:{line} {name} is {n} lines"
             for path, _ in _modules() for name, line, n in _long_functions(path)]
    assert not wrong, "\n".join(wrong)


def test_no_module_level_mutable_state_on_the_hot_path():
    """The training hot path (ops, models, gbml, mtl, training, sampling) keeps no state in
    module-level lists, dicts or sets that it changes: none is ever subscript-assigned,
    appended to or updated at run time."""
    hot = ("fastmtl.ops", "fastmtl.models", "fastmtl.gbml", "fastmtl.mtl", "fastmtl.training",
           "fastmtl.sampling")
    wrong = []
    for path, module in _modules():
        if not module.startswith(hot):
            continue
        tree = ast.parse(path.read_text())
        mutable = {t.id for node in tree.body if isinstance(node, ast.Assign)
                   and isinstance(node.value, (ast.List, ast.Dict, ast.Set, ast.ListComp,
                                               ast.DictComp))
                   for t in node.targets if isinstance(t, ast.Name)}
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for sub in ast.walk(node):
                    target = None
                    if isinstance(sub, (ast.Assign, ast.AugAssign)):
                        targets = sub.targets if isinstance(sub, ast.Assign) else [sub.target]
                        target = next((t.value.id for t in targets if isinstance(t, ast.Subscript)
                                       and isinstance(t.value, ast.Name)), None)
                    elif (isinstance(sub, ast.Call) and isinstance(sub.func, ast.Attribute)
                          and isinstance(sub.func.value, ast.Name)
                          and sub.func.attr in ("append", "update", "add", "pop", "clear",
                                                "extend", "setdefault")):
                        target = sub.func.value.id
                    if target in mutable:
                        wrong.append(f"{module}: {node.name} changes module-level {target}")
    assert not wrong, "\n".join(wrong)


def test_no_global_side_effects_in_library_code():
    """No plotting-backend switch anywhere in the package, and no process-group join
    outside the distributed module's own init_from_env and the CLI."""
    wrong = []
    for path, module in _modules():
        text = path.read_text()
        if "matplotlib.use(" in text or "pyplot" in text.replace("no pyplot", ""):
            wrong.append(f"{module} uses pyplot or switches matplotlib's backend")
        if ("init_from_env()" in text or "init_process_group(" in text) and not (
                module.startswith("fastmtl.cli") or module == "fastmtl.distributed"):
            wrong.append(f"{module} joins a process group")
    assert not wrong, "\n".join(wrong)
