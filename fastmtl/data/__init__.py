"""Data sets: real few-shot benchmarks read from a folder, and a built-in procedural default."""
from .base import FewShotDataset
from .folder import IMAGE_EXTENSIONS, ImageFolder, class_folders, image_files, read_image
from .omniglot import OMNIGLOT_MEAN, OMNIGLOT_STD, Omniglot
from .omniglot_runs import OneShotRuns, read_one_shot_runs
from .omniglot_splits import (
    OMNIGLOT_BACKGROUND_ALPHABETS,
    OMNIGLOT_EVALUATION_ALPHABETS,
    OMNIGLOT_FULL_SPLITS,
    OMNIGLOT_SPLITS,
    VINYALS_SPLITS,
    vinyals_characters,
)
from .pickles import (
    CIFAR_MEAN,
    CIFAR_STD,
    CIFARFS,
    FC100,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MiniImageNet,
    TieredImageNet,
)
from .synthetic import SYNTHETIC_MEAN, SYNTHETIC_STD, SyntheticGlyphs
from .transforms import with_rotations

__all__ = ["FewShotDataset", "Omniglot", "OMNIGLOT_SPLITS", "OMNIGLOT_MEAN", "OMNIGLOT_STD",
           "OMNIGLOT_FULL_SPLITS", "OMNIGLOT_BACKGROUND_ALPHABETS",
           "OMNIGLOT_EVALUATION_ALPHABETS", "VINYALS_SPLITS", "vinyals_characters",
           "OneShotRuns", "read_one_shot_runs",
           "MiniImageNet", "TieredImageNet", "CIFARFS", "FC100", "IMAGENET_MEAN",
           "IMAGENET_STD", "CIFAR_MEAN", "CIFAR_STD", "SyntheticGlyphs", "SYNTHETIC_MEAN",
           "SYNTHETIC_STD", "with_rotations", "ImageFolder", "IMAGE_EXTENSIONS", "read_image",
           "class_folders", "image_files"]
