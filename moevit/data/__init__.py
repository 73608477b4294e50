"""Datasets for moevit: readers of ImageNet, COCO and ADE20K in their published on-disk formats.

The readers return sample dicts (see ``moevit.data.decode`` and each reader's docstring);
``SkipCorrupt`` replaces unreadable samples, ``transforms`` and ``collate`` turn samples into batches.
"""

from moevit.data.ade20k import ADE20K
from moevit.data.coco import CocoDetection
from moevit.data.errors import CorruptSampleError, DatasetLayoutError
from moevit.data.imagenet import ImageNetFolder
from moevit.data.skip import SkipCorrupt

__all__ = [
    "ADE20K",
    "CocoDetection",
    "CorruptSampleError",
    "DatasetLayoutError",
    "ImageNetFolder",
    "SkipCorrupt",
]
