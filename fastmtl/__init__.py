"""fastmtl: multi-task learning for few-shot classification, fast.

``import fastmtl`` gives the MTL trainer, test-time adaptation and the evaluation
protocol; see README.md for the tour.
"""
from . import adapt, data, distributed, gbml, models, ops, sampling
from .classifier import FewShotClassifier
from .evaluate import evaluate
from .mtl import MTLConfig, MTLTrainer

__version__ = "0.1.0"
__all__ = ["MTLConfig", "MTLTrainer", "FewShotClassifier", "evaluate", "adapt", "data", "distributed", "gbml", "models", "ops", "sampling"]
