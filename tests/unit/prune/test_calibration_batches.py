"""Calibration batches of segmentation: eval images keep their own sizes (mmseg's protocol), so a batch is
padded; calibration routes only the region every image covers, in whole patches, no padding token."""

from __future__ import annotations

from PIL import Image

from moevit.config import build_config
from moevit.config.schema import Config
from moevit.data.synth import write_synthetic_datasets
from moevit.prune.usage import calibration_batches


def test_segmentation_calibration_images_are_cut_to_the_common_extent_in_whole_patches(tmp_path):
    write_synthetic_datasets(tmp_path, size="tiny")
    folder = tmp_path / "ade20k" / "ADEChallengeData2016"
    images = sorted((folder / "images" / "validation").glob("*.jpg"))
    for index, path in enumerate(images):  # (W, H) -> eval fits (128, 32): 32 x 45 or 32 x 58 (H x W)
        size = (70, 50) if index % 2 else (90, 50)
        Image.open(path).resize(size).save(path, format="JPEG")
        mask = folder / "annotations" / "validation" / f"{path.stem}.png"
        Image.open(mask).resize(size, Image.NEAREST).save(mask)
    data = {"format": "ade20k", "root": str(tmp_path / "ade20k"), "image_size": 32, "batch_size": len(images)}
    cfg = build_config(
        Config,
        {
            "model": {"name": "moevit_debug"},
            "tasks": {"seg": {"type": "segmentation", "num_classes": 5, "data": data}},
        },
    )
    ((task, batch),) = list(calibration_batches(cfg, "seg", 1, split="val", patch_size=8))
    assert task == "seg" and tuple(batch.shape) == (
        len(images),
        3,
        32,
        40,
    )  # min (32, 45) cut to 8 px patches
