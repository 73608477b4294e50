"""Build a task's dataset from its config: reader -> transforms -> corrupt-sample skipping."""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from moevit.config.schema import DatasetConfig
from moevit.data.ade20k import ADE20K
from moevit.data.coco import CocoDetection
from moevit.data.imagenet import ImageNetFolder
from moevit.data.shards.indexed import IndexedShards
from moevit.data.skip import SkipCorrupt
from moevit.data.transforms import build_transforms

READERS = {"imagenet": ImageNetFolder, "coco": CocoDetection, "ade20k": ADE20K}


class TransformedDataset(Dataset):
    """Applies `transform` to every sample dict of `dataset`."""

    def __init__(self, dataset: Dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return self.transform(self.dataset[index])

    def __getattr__(self, name: str):
        # The reader's metadata (classes, shard_sizes, coco, ...) stays reachable through the wrapper.
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def open_reader(data: DatasetConfig, split: str) -> Dataset:
    """The reader of one split: the folder reader of `data.format`, or with `storage: shards` the shard
    directory `root/split` (what `moevit data shard --out root/split` wrote).

    Raises:
        DatasetLayoutError: the folder or shard directory is missing or malformed (the path named).
    """
    if data.storage == "shards":
        return IndexedShards(Path(data.root) / split, data.format)
    return READERS[data.format](data.root, split)


def build_dataset(task_type: str, data: DatasetConfig, train: bool) -> SkipCorrupt:
    """The training or evaluation split named by `data`, ready for a DataLoader.

    Layout problems raise `DatasetLayoutError` here, before any compute starts.
    """
    split = data.train_split if train else data.val_split
    reader = open_reader(data, split)
    return SkipCorrupt(
        TransformedDataset(
            reader,
            build_transforms(
                task_type, train, data.image_size, data.transform_settings(), crop_scale=data.crop_scale
            ),
        )
    )
