"""Both C++ extensions are built and importable, unless the install opted out of them.

setup.py fails the build when a compile fails; this test catches the other way to lose the
native code: an install (or a stale source tree) that simply lacks the compiled modules,
which the rest of the suite would not notice because every native part has a
pure-Python fallback. ``FASTMTL_NO_EXTENSIONS=1`` (the same variable setup.py reads) says
the fallbacks are meant, and skips it.
"""
import importlib
import os

import pytest

OPT_OUT = "FASTMTL_NO_EXTENSIONS"


@pytest.mark.parametrize("module", ["fastmtl._episodes", "fastmtl._multihead_ce"])
def test_extension_importable(module):
    if os.environ.get(OPT_OUT, "") not in ("", "0"):
        pytest.skip(f"{OPT_OUT} is set: installed without the C++ extensions on purpose")
    try:
        importlib.import_module(module)
    except ImportError as exc:
        pytest.fail(f"{module} is not importable ({exc}): the C++ extension was not built. "
                    f"Reinstall with a C++17 compiler (pip install -e .), or set {OPT_OUT}=1 "
                    f"if the pure-Python fallbacks are meant.")
