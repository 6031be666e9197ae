"""Build and install fastmtl.

The C++ extensions (``csrc/<name>.cpp`` -> ``fastmtl._<name>``) use plain pybind11 over
numpy buffers (no torch C++ ABI), so they build in pip's isolated build environment with
any C++17 compiler. A failed compile fails the install: a wheel never ships without its
native code by accident. To install without them on purpose (the package then runs on its
pure-Python fallbacks), set ``FASTMTL_NO_EXTENSIONS=1``.

The version lives in ``fastmtl/_version.py``; it is read here as text, so building does
not import fastmtl (nor torch).
"""
import glob
import os
import re
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
OPT_OUT = "FASTMTL_NO_EXTENSIONS"
NO_EXTENSIONS = os.environ.get(OPT_OUT, "") not in ("", "0")


def _version() -> str:
    text = open(os.path.join(HERE, "fastmtl", "_version.py"), encoding="utf-8").read()
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


def _extensions():
    if NO_EXTENSIONS:
        print(f"fastmtl: {OPT_OUT} is set: no C++ extensions, the Python fallbacks run")
        return [], {}
    try:
        from pybind11.setup_helpers import Pybind11Extension, build_ext
    except ImportError as exc:
        raise RuntimeError(f"fastmtl: pybind11 is needed to build the C++ extensions "
                           f"({exc}); install it, or set {OPT_OUT}=1 to install without "
                           f"them") from exc
    extra, link = ["-O3"], []
    if sys.platform.startswith("linux"):
        extra += ["-fopenmp"]
        link += ["-fopenmp"]

    class _LoudBuild(build_ext):
        """Names the opt-out when a compile fails, then fails the build."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception:
                print(f"fastmtl: building {ext.name} failed (above). Fix the compiler, or "
                      f"set {OPT_OUT}=1 to install without the C++ extensions.",
                      file=sys.stderr)
                raise

    modules = [Pybind11Extension(f"fastmtl._{os.path.splitext(os.path.basename(src))[0]}",
                                 [src], cxx_std=17, extra_compile_args=extra,
                                 extra_link_args=link)
               for src in sorted(glob.glob("csrc/*.cpp"))]
    return modules, {"build_ext": _LoudBuild}


EXT_MODULES, CMDCLASS = _extensions()

TEST = [
    "pytest>=7",
    "pytest-benchmark>=4",
    "scikit-learn>=1.3",
    "scipy>=1.10",
    "triton==3.9.0; platform_system == 'Linux'",
]
DOCS = [
    "mkdocs>=1.6,<2",
    "mkdocstrings[python]>=1.0,<2",
]
LINT = [
    "ruff>=0.17,<0.18",
    "mypy>=2.4,<3",
]

setup(
    name="fastmtl",
    version=_version(),
    description="Fast multi-task learning for few-shot classification (PyTorch)",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    license_files=["LICENSE"],
    python_requires=">=3.11",
    packages=find_packages(include=["fastmtl", "fastmtl.*"]) + ["fastmtl.kernels"],
    package_dir={"fastmtl.kernels": "kernels"},
    package_data={"fastmtl": ["py.typed"],
                  "fastmtl.data": ["vinyals_splits/*.txt", "vinyals_splits/*.md"]},
    ext_modules=EXT_MODULES,
    cmdclass=CMDCLASS,
    install_requires=[
        # A range, not a pin, so installing fastmtl keeps the user's PyTorch; CI runs 2.13.0.
        "torch>=2.6,<2.14",
        "numpy>=1.24",
        "pillow>=9",
        "tqdm>=4.60",
        "matplotlib>=3.7",
    ],
    extras_require={
        # The test command also builds the docs, hence the docs tools here.
        "test": TEST + DOCS + LINT,
        "docs": DOCS,
    },
    entry_points={"console_scripts": ["fastmtl=fastmtl.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3.11",
        "Programming Language :: C++",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "Typing :: Typed",
    ],
)
