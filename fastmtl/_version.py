"""The version of fastmtl, in one place: setup.py reads it as text, fastmtl.__version__
imports it."""
__version__ = "0.1.0"
