"""ImageNet (ILSVRC-2012 CLS-LOC) read from class folders: ``root/{train,val}/<wnid>/*.JPEG``.

The training set ships in this layout; the validation set ships flat and is sorted into it by
``datasets/imagenet_val_to_folders.py``. The label of a class is its position among the sorted wnids,
as in torchvision's ``ImageFolder``. Files are decoded by content (``moevit.data.decode``), which
handles ImageNet's CMYK JPEGs, grayscale JPEGs and the PNG stored as ``.JPEG``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from torch.utils.data import Dataset

from moevit.data.decode import decode_image
from moevit.data.errors import DatasetLayoutError

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
SPLIT_FOLDERS = {"train": "train", "training": "train", "val": "val", "validation": "val"}
EXPECTED_LAYOUT = "ROOT/{train,val}/<wnid>/*.JPEG (one folder per class)"


def resolve_split(split: str) -> str:
    """Maps "train"/"training" and "val"/"validation" to the folder name; anything else is a ValueError."""
    if split not in SPLIT_FOLDERS:
        raise ValueError(f"unknown ImageNet split {split!r}; expected one of {sorted(SPLIT_FOLDERS)}")
    return SPLIT_FOLDERS[split]


def _class_folders(split_dir: Path) -> list[str]:
    return sorted(
        entry.name for entry in os.scandir(split_dir) if entry.is_dir() and not entry.name.startswith(".")
    )


def _image_files(class_dir: Path) -> list[str]:
    return sorted(
        entry.name
        for entry in os.scandir(class_dir)
        if entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS)
    )


class ImageNetFolder(Dataset):
    """Classification samples ``{"image", "label", "key"}`` from ImageNet-style class folders.

    Args:
        root: folder holding ``train/`` and/or ``val/``.
        split: "train" or "val" ("training"/"validation" are accepted too).
        classes: wnids that define the label indices. Default: the sorted class folders of the split,
            which must then match the other split's folders when that split exists (a val folder
            missing a class would otherwise shift every later label silently).

    Attributes:
        classes: wnids in label order.
        class_to_idx: wnid -> label.
        samples: (relative path, label) pairs in a fixed order.

    Raises:
        DatasetLayoutError: missing root or split folder, no class folders, a folder not in ``classes``,
            or no image at all.
    """

    def __init__(self, root: str | os.PathLike, split: str, classes: Sequence[str] | None = None) -> None:
        self.root = Path(root)
        self.split = resolve_split(split)
        split_dir = self.root / self.split
        if not self.root.is_dir():
            raise DatasetLayoutError(f"ImageNet root {self.root} not found; expected {EXPECTED_LAYOUT}")
        if not split_dir.is_dir():
            raise DatasetLayoutError(
                f"ImageNet split folder {split_dir} not found; expected {EXPECTED_LAYOUT}"
            )
        folders = _class_folders(split_dir)
        if not folders:
            raise DatasetLayoutError(
                f"no class folders in {split_dir}; expected {EXPECTED_LAYOUT} "
                "(datasets/imagenet_val_to_folders.py sorts the flat official val set)"
            )
        if classes is None:
            self._check_other_split_has_same_classes(folders)
            classes = folders
        unknown = sorted(set(folders) - set(classes))
        if unknown:
            raise DatasetLayoutError(
                f"class folders {unknown[:5]} in {split_dir} are not among the given classes"
            )
        self.classes = list(classes)
        self.class_to_idx = {wnid: index for index, wnid in enumerate(self.classes)}
        self.samples = [
            (f"{self.split}/{wnid}/{file_name}", self.class_to_idx[wnid])
            for wnid in folders
            for file_name in _image_files(split_dir / wnid)
        ]
        if not self.samples:
            raise DatasetLayoutError(
                f"no images ({', '.join(IMAGE_EXTENSIONS)}) in the class folders of {split_dir}; "
                f"expected {EXPECTED_LAYOUT}"
            )

    def _check_other_split_has_same_classes(self, folders: list[str]) -> None:
        other_dir = self.root / ("val" if self.split == "train" else "train")
        if not other_dir.is_dir():
            return
        other_folders = _class_folders(other_dir)
        # A flat (not yet sorted) val folder has no class folders: reading train is still fine.
        if other_folders and other_folders != folders:
            only_here = sorted(set(folders) - set(other_folders))[:5]
            only_there = sorted(set(other_folders) - set(folders))[:5]
            raise DatasetLayoutError(
                f"class folders of {self.root / self.split} and {other_dir} differ (only in {self.split}: "
                f"{only_here}, only in {other_dir.name}: {only_there}); labels would not match between "
                "splits. Pass classes= explicitly to read a subset."
            )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        relative_path, label = self.samples[index]
        image = decode_image(self.root / relative_path)
        return {"image": image, "label": label, "key": os.path.splitext(relative_path)[0]}
