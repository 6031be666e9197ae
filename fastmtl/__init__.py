"""fastmtl: multi-task learning for few-shot classification, fast.

``import fastmtl`` gives the MTL trainer, test-time adaptation and the evaluation
protocol; see README.md for the tour.

Where each concern lives, in the order the imports run (a module imports only from
modules above it; ``tests/test_architecture.py`` checks it):

- ``checks``, ``distributed``, ``checkpoint``, then ``config``: argument checks,
  torchrun/DDP, the one checkpoint format; the settings every trainer shares.
- ``data`` -> ``sampling``: images and labels (``FewShotDataset``), then episodes and
  batches of them (``EpisodeSampler``, ``EpisodeLoader``).
- ``models``, ``ops``: backbones; the fused multi-head cross-entropy and its backends.
- ``adapt`` -> ``evaluate``: a fresh logistic head per test episode; the protocol.
- ``training`` -> ``mtl``, ``gbml``: the one training loop; the methods on it.
- ``compare``, ``classifier``, ``cli``: methods side by side; a user's few-shot
  classifier; the command line (a package of one module a command; nothing imports it).

``registry`` (lowest of all) names the data sets, backbones and methods every entry point
offers.

Data flows the same way: a dataset gives images, the sampler gives tasks, a trainer
turns tasks into a backbone, and ``evaluate`` / ``adapt`` fit heads on its features.

Example:
    >>> import fastmtl
    >>> cfg = fastmtl.MTLConfig.from_recipe("fast", epochs=1)
    >>> cfg.task_sampling
    'all_classes'
"""
from . import adapt, data, distributed, gbml, models, ops, registry, sampling
from ._env import keep_freed_memory
from ._version import __version__
from .classifier import FewShotClassifier
from .evaluate import evaluate
from .mtl import MTLConfig, MTLTrainer

__all__ = ["MTLConfig", "MTLTrainer", "FewShotClassifier", "evaluate", "keep_freed_memory",
           "__version__", "adapt", "data", "distributed", "gbml", "models", "ops", "registry",
           "sampling"]
