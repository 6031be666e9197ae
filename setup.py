"""Build and install fastmtl.

The C++ extensions use plain pybind11 and numpy buffers (no torch C++ ABI), so they build
in pip's isolated build environment with any C++17 compiler; if a build fails the package
still installs and runs on its pure-Python fallbacks.
"""
import glob
import os
import sys

from setuptools import setup

try:
    from pybind11.setup_helpers import Pybind11Extension, build_ext
except ImportError:  # pybind11 missing: pure-Python install
    Pybind11Extension, build_ext = None, None

HERE = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    if Pybind11Extension is None:
        return []
    extra = ["-O3"]
    link = []
    if sys.platform.startswith("linux"):
        extra += ["-fopenmp"]
        link += ["-fopenmp"]
    # One module per source file (csrc/episodes.cpp -> fastmtl._episodes), so each native
    # part can fail to build, or be absent, on its own.
    return [Pybind11Extension(f"fastmtl._{os.path.splitext(os.path.basename(src))[0]}", [src],
                              cxx_std=17, extra_compile_args=extra, extra_link_args=link)
            for src in sorted(glob.glob("csrc/*.cpp"))]


class _OptionalBuild(build_ext or object):
    """A failed native build leaves the pure-Python fallbacks in place instead of failing."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any compiler failure
            print(f"fastmtl: C++ extension not built ({exc}); using the Python fallbacks")

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            print(f"fastmtl: {ext.name} not built ({exc}); using the Python fallbacks")


setup(
    name="fastmtl",
    version="0.1.0",
    description="Fast multi-task learning for few-shot classification (PyTorch)",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=["fastmtl", "fastmtl.data", "fastmtl.models", "fastmtl.ops", "fastmtl.gbml",
              "fastmtl.kernels"],
    package_dir={"fastmtl.kernels": "kernels"},
    ext_modules=_extensions(),
    cmdclass={"build_ext": _OptionalBuild} if build_ext else {},
    install_requires=[
        "torch==2.13.0",
        "numpy>=1.24",
        "pillow>=9",
        "tqdm>=4.60",
        "matplotlib>=3.7",
    ],
    extras_require={
        "test": [
            "pytest>=7",
            "pytest-benchmark>=4",
            "scikit-learn>=1.3",
            "scipy>=1.10",
            "triton==3.9.0; platform_system == 'Linux'",
        ],
    },
    entry_points={"console_scripts": ["fastmtl=fastmtl.cli:main"]},
)
