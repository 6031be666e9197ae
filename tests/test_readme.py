"""Every shell and Python block of README.md runs, at a tiny budget.

A test may change a command in two ways only: shrink the flags that set how long it runs
(:data:`SHRINK`: minutes, episodes, evaluation points, the training sample of compare's
shared protocols), and point it at folders it makes
in a temporary directory (the user's images) or at the Omniglot archives the tests use
(``$FASTMTL_OMNIGLOT`` or ``../shared/data/omniglot``; skipped, saying so, without them).
Everything else (the data set, the method, the default recipe, the image size) is the
README's. ``pip install`` commands are checked for their form, not run, and ``pytest`` must
be what ``.ci/run`` runs. So a default that breaks a documented workflow fails here.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCK = re.compile(r"^```(bash|sh|shell|python)[ \t]*\n(.*?)^```", re.M | re.S)

# flag -> tiny value, per fastmtl command; a flag the command lacks is added.
SHRINK = {
    "demo": {"--minutes": "0.05", "--episodes": "10"},
    "train": {"--max-minutes": "0.05", "--eval-episodes": "10", "--val-episodes": "10"},
    "compare": {"--budget-minutes": "0.03", "--eval-at": "1", "--episodes": "5",
                "--sample-images": "256"},
    "eval": {"--episodes": "10"},
    "merge": {},
    "adapt": {},
}
# keyword -> tiny value in Python blocks
SHRINK_PY = {"max_minutes": "0.05", "episodes": "10", "epochs": "1"}
TIMEOUT_S = 300


def _blocks() -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in BLOCK.finditer(README.read_text())]


def _block_id(i: int, lang: str, code: str) -> str:
    words = [w for w in re.split(r"\s+", code) if w and not w.startswith("#")]
    return f"{i}-{lang}-{'-'.join(words[:2])}"[:60]


def _commands(code: str) -> list[list[str]]:
    """The simple commands of a shell block: continuation lines joined, comments and
    blank lines dropped, ``a && b`` split."""
    joined = re.sub(r"\\\n\s*", " ", code)
    out = []
    for line in joined.splitlines():
        line = line.split(" #")[0].strip()
        if not line or line.startswith("#"):
            continue
        out += [shlex.split(part) for part in line.split("&&")]
    return out


def _set_flag(argv: list[str], flag: str, value: str) -> list[str]:
    if flag in argv:
        i = argv.index(flag)
        return argv[:i + 1] + [value] + argv[i + 2:]
    return argv + [flag, value]


def _omniglot() -> str:
    root = os.environ.get("FASTMTL_OMNIGLOT") or str(ROOT.parent / "shared" / "data" / "omniglot")
    if not Path(root).is_dir():
        pytest.skip(f"the README's Omniglot command needs the Omniglot archives; none at {root} "
                    f"(set FASTMTL_OMNIGLOT)")
    return root


def _write_pngs(folder: Path, classes: int, per_class: int, seed: int) -> None:
    """``classes`` folders of ``per_class`` 100x100 RGB PNGs, each class its own colour."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = folder / f"class{c:02d}"
        d.mkdir(parents=True)
        base = rng.integers(0, 256, (1, 1, 3))
        for i in range(per_class):
            img = np.clip(base + rng.normal(0, 40, (100, 100, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(d / f"{i}.png")


def _own_images(tmp: Path) -> None:
    # 25 classes: the 60/20/20 class split then leaves 5 validation and 5 test classes,
    # the fewest that 5-way episodes need (the README says so).
    _write_pngs(tmp / "my_images", classes=25, per_class=20, seed=0)
    _write_pngs(tmp / "new_classes", classes=3, per_class=5, seed=1)
    _write_pngs(tmp / "photos_tmp", classes=1, per_class=4, seed=2)
    (tmp / "photos_tmp" / "class00").rename(tmp / "photos")


def _check_pip(argv: list[str]) -> None:
    assert argv[:2] == ["pip", "install"], argv
    targets = [a for a in argv[2:] if not a.startswith("-")]
    assert targets, f"pip install of nothing: {argv}"
    for t in targets:
        m = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", t)
        assert m, f"the README installs {t!r}; expected . or .[extra]"
        extras = set(re.findall(r'^\s*"(\w+)":', (ROOT / "setup.py").read_text(), re.M))
        for extra in (m.group(1) or "").split(","):
            assert not extra or extra in extras, f"extra {extra!r} not in setup.py ({extras})"


def _check_pytest(argv: list[str], code: str) -> None:
    assert argv == ["pytest"], argv
    ci = (ROOT / ".ci" / "run").read_text()
    line = next(line.strip() for line in code.splitlines() if "pytest" in line)
    assert line in ci.splitlines(), f".ci/run must run the README's test command: {line!r}"


def _shared(name: str, needs: str) -> str:
    root = ROOT.parent / "shared" / "data" / name
    if not root.is_dir():
        pytest.skip(f"the README's command needs {needs}; none at {root}")
    return str(root)


def _run_fastmtl(argv: list[str], tmp: Path) -> None:
    command = argv[1]
    assert command in SHRINK, f"unknown fastmtl command in the README: {command}"
    if any("path/to/omniglot-all" in a or "all_runs.zip" in a for a in argv):
        pytest.skip("the Vinyals split and Lake's one-shot runs need the official "
                    "images_evaluation.zip and all_runs.zip, which are not in ../shared "
                    "(tests/test_omniglot_full.py runs both on archives of their layout)")
    if "path/to/omniglot-background" in argv:
        argv = _set_flag(argv, "--root", _shared("omniglot-background",
                                                 "the whole background set"))
    elif "--data" in argv and argv[argv.index("--data") + 1] == "omniglot":
        argv = _set_flag(argv, "--root", _omniglot())
    for flag, value in SHRINK[command].items():
        argv = _set_flag(argv, flag, value)
    proc = subprocess.run([sys.executable, "-m", "fastmtl", *argv[1:]], cwd=tmp,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, (f"README command failed: {' '.join(argv)}\n"
                                  f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def _run_shell(code: str, tmp: Path) -> None:
    if "--root my_images" in code:
        _own_images(tmp)
    for argv in _commands(code):
        if argv[0] == "pip":
            _check_pip(argv)
        elif argv[0] == "pytest":
            _check_pytest(argv, code)
        elif argv[0] == "fastmtl":
            _run_fastmtl(argv, tmp)
        else:
            pytest.fail(f"the README test does not know how to run {argv[0]!r}")


def _run_python(code: str, tmp: Path) -> None:
    for key, value in SHRINK_PY.items():
        code = re.sub(rf"\b{key}=[0-9.]+", f"{key}={value}", code)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp, capture_output=True,
                          text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"README Python block failed:\n{proc.stderr[-3000:]}"


BLOCKS = _blocks()


@pytest.mark.parametrize("lang, code", BLOCKS,
                         ids=[_block_id(i, lang, code) for i, (lang, code) in enumerate(BLOCKS)])
def test_readme_block_runs(lang, code, tmp_path):
    if lang == "python":
        _run_python(code, tmp_path)
    else:
        _run_shell(code, tmp_path)


def test_readme_shape():
    text = README.read_text()
    assert len(text.splitlines()) <= 300, "the README is for a five-minute read: 300 lines at most"
    python = [code for lang, code in BLOCKS if lang == "python"]
    assert python and 10 <= len(python[0].strip().splitlines()) <= 20, "a 10-20 line quickstart"
    shells = [code for lang, code in BLOCKS if lang != "python"]
    assert shells[0].strip() == "pip install . && fastmtl demo"
    assert shells[1].strip() == 'pip install ".[test]" && pytest'
