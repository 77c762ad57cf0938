"""Datasets, batched two-view augmentation and sharded batch loading."""

from raymix.data.augment import TwoViewAugment, ViewParams, apply_view, normalize, sample_view_params
from raymix.data.datasets import FolderData, ImageData, build_datasets
from raymix.data.loader import BatchLoader

__all__ = [
    "BatchLoader",
    "FolderData",
    "ImageData",
    "TwoViewAugment",
    "ViewParams",
    "apply_view",
    "build_datasets",
    "normalize",
    "sample_view_params",
]
