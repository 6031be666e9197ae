"""Data sets: real few-shot benchmarks read from a folder, and a built-in procedural default."""
from .base import FewShotDataset

__all__ = ["FewShotDataset"]
