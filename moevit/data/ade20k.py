"""ADE20K SceneParsing (the MIT Scene Parsing Benchmark release, ``ADEChallengeData2016``).

Layout: ``ADEChallengeData2016/images/{training,validation}/*.jpg`` with the label map of each image
at ``ADEChallengeData2016/annotations/{training,validation}/<same name>.png``. Label PNGs hold 0 for
"other" and 1..150 for the classes; as in mmsegmentation's ``ADE20KDataset`` (``reduce_zero_label=True``)
0 becomes 255 (ignored by the loss and by mIoU) and every other label is decreased by one, leaving 150
classes in [0, 150).
"""

from __future__ import annotations

import os
from pathlib import Path

from torch.utils.data import Dataset

from moevit.data.decode import ADE20K_NUM_CLASSES, ade20k_mask_from_png, decode_image
from moevit.data.errors import CorruptSampleError, DatasetLayoutError

SPLIT_FOLDERS = {"train": "training", "training": "training", "val": "validation", "validation": "validation"}
FOLDER_NAME = "ADEChallengeData2016"
EXPECTED_LAYOUT = (
    f"ROOT/{FOLDER_NAME}/images/{{training,validation}}/*.jpg and "
    f"ROOT/{FOLDER_NAME}/annotations/{{training,validation}}/*.png (ROOT may also be {FOLDER_NAME} itself)"
)


def resolve_split(split: str) -> str:
    """Maps "train"/"training" and "val"/"validation" to ADE20K's folder name; else a ValueError."""
    if split not in SPLIT_FOLDERS:
        raise ValueError(f"unknown ADE20K split {split!r}; expected one of {sorted(SPLIT_FOLDERS)}")
    return SPLIT_FOLDERS[split]


def resolve_data_root(root: Path) -> Path:
    """Returns the ``ADEChallengeData2016`` folder, given it or its parent."""
    if (root / FOLDER_NAME).is_dir():
        return root / FOLDER_NAME
    if (root / "images").is_dir() and (root / "annotations").is_dir():
        return root
    raise DatasetLayoutError(f"no ADE20K data under {root}; expected {EXPECTED_LAYOUT}")


def _annotation_name(image_name: str) -> str:
    return f"{os.path.splitext(image_name)[0]}.png"


class ADE20K(Dataset):
    """Segmentation samples ``{"image", "mask", "key"}`` from ADE20K SceneParsing.

    Args:
        root: ``ADEChallengeData2016`` or the folder that contains it.
        split: "train" or "val" ("training"/"validation" are accepted too).
        reduce_zero_label: map label 0 to 255 and the others to label - 1 (mmsegmentation's ADE20K default,
            150 classes). Without it "other" stays class 0 and there are 151 classes.

    Attributes:
        data_root: the ``ADEChallengeData2016`` folder.
        num_classes: 150 with reduce_zero_label, else 151.
        image_names: image file names, sorted (sample order).

    Raises:
        DatasetLayoutError: missing folders, no images, or an image without its annotation PNG.
    """

    def __init__(self, root: str | os.PathLike, split: str, reduce_zero_label: bool = True) -> None:
        self.data_root = resolve_data_root(Path(root))
        self.split = resolve_split(split)
        self.reduce_zero_label = reduce_zero_label
        self.num_classes = ADE20K_NUM_CLASSES if reduce_zero_label else ADE20K_NUM_CLASSES + 1
        self.image_dir = self.data_root / "images" / self.split
        self.annotation_dir = self.data_root / "annotations" / self.split
        for required in (self.image_dir, self.annotation_dir):
            if not required.is_dir():
                raise DatasetLayoutError(f"ADE20K folder {required} not found; expected {EXPECTED_LAYOUT}")
        self.image_names = sorted(
            name for name in os.listdir(self.image_dir) if name.lower().endswith(".jpg")
        )
        if not self.image_names:
            raise DatasetLayoutError(f"no .jpg images in {self.image_dir}; expected {EXPECTED_LAYOUT}")
        # One listing instead of a stat per image: ADE20K training has 20k images.
        annotation_names = set(os.listdir(self.annotation_dir))
        for image_name in self.image_names:
            annotation_name = _annotation_name(image_name)
            if annotation_name not in annotation_names:
                raise DatasetLayoutError(
                    f"annotation {self.annotation_dir / annotation_name} for image "
                    f"{self.image_dir / image_name} not found; expected {EXPECTED_LAYOUT}"
                )

    def __len__(self) -> int:
        return len(self.image_names)

    def __getitem__(self, index: int) -> dict:
        image_name = self.image_names[index]
        image_path = self.image_dir / image_name
        mask_path = self.annotation_dir / _annotation_name(image_name)
        image = decode_image(image_path)
        mask = ade20k_mask_from_png(
            mask_path, reduce_zero_label=self.reduce_zero_label, num_classes=self.num_classes
        )
        if tuple(mask.shape) != tuple(image.shape[-2:]):
            raise CorruptSampleError(
                mask_path,
                f"mask is {tuple(mask.shape)} (H, W) but image {image_name} is {tuple(image.shape[-2:])}",
            )
        return {"image": image, "mask": mask, "key": f"images/{self.split}/{os.path.splitext(image_name)[0]}"}
