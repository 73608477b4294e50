"""Folder readers of ImageNet, COCO 2017 and ADE20K on tiny fixtures in the real formats (see conftest)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from moevit.data import ADE20K, CocoDetection, ImageNetFolder
from moevit.data.decode import decode_image
from moevit.data.errors import CorruptSampleError, DatasetLayoutError

# JPEG is lossy: solid colors come back within a few levels.
JPEG_TOLERANCE = 6


def _mean_color(image: torch.Tensor) -> np.ndarray:
    return image.float().mean(dim=(1, 2)).numpy()


# ---------------------------------------------------------------- ImageNet


def test_imagenet_labels_come_from_sorted_wnids(imagenet_fixture):
    dataset = ImageNetFolder(imagenet_fixture.root, "train")
    assert dataset.classes == imagenet_fixture.classes
    keys = [dataset[index]["key"] for index in range(len(dataset))]
    assert keys == imagenet_fixture.train_keys  # the stray notes.txt is not a sample
    for index in range(len(dataset)):
        sample = dataset[index]
        wnid = sample["key"].split("/")[1]
        assert sample["label"] == imagenet_fixture.classes.index(wnid)


def test_imagenet_decodes_every_quirk_to_uint8_rgb(imagenet_fixture):
    dataset = ImageNetFolder(imagenet_fixture.root, "train")
    samples = {dataset[index]["key"]: dataset[index] for index in range(len(dataset))}
    width, height = 24, 16
    for key, sample in samples.items():
        image = sample["image"]
        assert isinstance(image, tv_tensors.Image)
        assert image.dtype == torch.uint8 and tuple(image.shape) == (3, height, width), key
        np.testing.assert_allclose(
            _mean_color(image), imagenet_fixture.colors[key], atol=JPEG_TOLERANCE, err_msg=key
        )
    # The PNG named .JPEG decodes losslessly, which shows it was read as PNG.
    png = samples[imagenet_fixture.png_named_jpeg_key]["image"]
    png_color = torch.tensor(imagenet_fixture.colors[imagenet_fixture.png_named_jpeg_key], dtype=torch.uint8)
    assert torch.equal(png, png_color.view(3, 1, 1).expand_as(png))
    gray = samples[imagenet_fixture.gray_key]["image"]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


def test_imagenet_split_aliases_and_val(imagenet_fixture):
    val = ImageNetFolder(imagenet_fixture.root, "validation")
    assert [val[index]["key"] for index in range(len(val))] == imagenet_fixture.val_keys
    assert [val[index]["label"] for index in range(len(val))] == [0, 1, 2]
    assert len(ImageNetFolder(imagenet_fixture.root, "training")) == len(imagenet_fixture.train_keys)
    with pytest.raises(ValueError, match="unknown ImageNet split 'test'"):
        ImageNetFolder(imagenet_fixture.root, "test")


def test_imagenet_layout_errors_name_the_path(tmp_path, imagenet_fixture):
    with pytest.raises(DatasetLayoutError, match=str(tmp_path / "nowhere")):
        ImageNetFolder(tmp_path / "nowhere", "train")
    shutil.rmtree(imagenet_fixture.root / "val")
    with pytest.raises(DatasetLayoutError, match=str(imagenet_fixture.root / "val")):
        ImageNetFolder(imagenet_fixture.root, "val")
    flat = tmp_path / "flat"
    (flat / "train").mkdir(parents=True)
    (flat / "train" / "image.JPEG").write_bytes(b"")
    with pytest.raises(DatasetLayoutError, match=r"no class folders in .*flat/train.*<wnid>"):
        ImageNetFolder(flat, "train")


def test_imagenet_train_reads_while_val_is_still_flat(imagenet_fixture):
    shutil.rmtree(imagenet_fixture.root / "val")
    (imagenet_fixture.root / "val").mkdir()
    (imagenet_fixture.root / "val" / "ILSVRC2012_val_00000001.JPEG").write_bytes(b"")
    assert len(ImageNetFolder(imagenet_fixture.root, "train")) == len(imagenet_fixture.train_keys)
    with pytest.raises(DatasetLayoutError, match="imagenet_val_to_folders.py"):
        ImageNetFolder(imagenet_fixture.root, "val")


def test_imagenet_val_missing_a_class_is_rejected_unless_classes_given(imagenet_fixture):
    missing_wnid = imagenet_fixture.classes[1]
    shutil.rmtree(imagenet_fixture.root / "val" / missing_wnid)
    with pytest.raises(DatasetLayoutError, match=f"only in train: \\['{missing_wnid}'\\]"):
        ImageNetFolder(imagenet_fixture.root, "val")
    val = ImageNetFolder(imagenet_fixture.root, "val", classes=imagenet_fixture.classes)
    assert [val[index]["label"] for index in range(len(val))] == [0, 2]


def test_decode_from_bytes_equals_decode_from_path(imagenet_fixture):
    path = imagenet_fixture.root / f"{imagenet_fixture.cmyk_key}.JPEG"
    assert torch.equal(decode_image(path.read_bytes()), decode_image(path))


def test_decode_garbage_names_the_source():
    with pytest.raises(CorruptSampleError, match="shard-000/key-7: cannot decode image"):
        decode_image(b"definitely not an image", name="shard-000/key-7")


# ---------------------------------------------------------------- COCO


def test_coco_category_ids_map_to_contiguous_labels_and_back(coco_fixture):
    dataset = CocoDetection(coco_fixture.root, coco_fixture.split)
    assert dataset.label_to_cat_id == coco_fixture.cat_ids
    assert dataset.cat_id_to_label == {cat_id: label for label, cat_id in enumerate(coco_fixture.cat_ids)}
    assert dataset.classes == coco_fixture.class_names
    assert dataset.labels_to_cat_ids(torch.tensor([2, 0, 1])).tolist() == [90, 1, 3]


def test_coco_targets_are_clipped_xyxy_without_crowd_or_degenerate_boxes(coco_fixture):
    dataset = CocoDetection(coco_fixture.root, "val")
    index = dataset.image_ids.index(coco_fixture.annotated_image_id)
    sample = dataset[index]
    expected_boxes, expected_labels = coco_fixture.expected_targets[coco_fixture.annotated_image_id]
    assert isinstance(sample["boxes"], tv_tensors.BoundingBoxes)
    assert sample["boxes"].format == tv_tensors.BoundingBoxFormat.XYXY
    assert sample["boxes"].dtype == torch.float32
    assert tuple(sample["boxes"].canvas_size) == (30, 40)
    assert sample["boxes"].tolist() == expected_boxes
    assert sample["labels"].dtype == torch.int64 and sample["labels"].tolist() == expected_labels
    assert sample["image_id"] == coco_fixture.annotated_image_id
    assert sample["key"] == f"val2017/{coco_fixture.annotated_image_id:012d}"
    assert tuple(sample["image"].shape) == (3, 30, 40)


def test_coco_counts_and_keeps_crowd_for_evaluation(coco_fixture):
    dataset = CocoDetection(coco_fixture.root, "validation")
    assert dataset.num_degenerate_boxes == coco_fixture.num_degenerate
    assert dataset.num_crowd_boxes == coco_fixture.num_crowd
    assert dataset.coco.anns[coco_fixture.crowd_ann_id]["iscrowd"] == 1
    assert dataset.annotation_file == coco_fixture.root / "annotations" / "instances_val2017.json"
    assert dataset.image_ids == coco_fixture.image_ids


def test_coco_image_without_annotations_has_empty_target(coco_fixture):
    dataset = CocoDetection(coco_fixture.root, "val")
    sample = dataset[dataset.image_ids.index(coco_fixture.empty_image_id)]
    assert tuple(sample["boxes"].shape) == (0, 4)
    assert tuple(sample["labels"].shape) == (0,) and sample["labels"].dtype == torch.int64


def test_coco_missing_image_file_is_a_corrupt_sample(coco_fixture):
    dataset = CocoDetection(coco_fixture.root, "val")
    with pytest.raises(
        CorruptSampleError, match=f"{coco_fixture.missing_file_image_id:012d}.jpg: file not found"
    ):
        dataset[dataset.image_ids.index(coco_fixture.missing_file_image_id)]


def test_coco_image_of_another_size_than_its_record_is_a_corrupt_sample(coco_fixture):
    annotation_file = coco_fixture.root / "annotations" / "instances_val2017.json"
    instances = json.loads(annotation_file.read_text())
    for record in instances["images"]:
        record["width"] = 64
    annotation_file.write_text(json.dumps(instances))
    dataset = CocoDetection(coco_fixture.root, "val")
    with pytest.raises(CorruptSampleError, match="image is 40x30 but the annotation says 64x30"):
        dataset[dataset.image_ids.index(coco_fixture.empty_image_id)]


def test_coco_layout_errors_name_the_path(coco_fixture):
    with pytest.raises(DatasetLayoutError, match=f"COCO path {coco_fixture.root / 'train2017'} not found"):
        CocoDetection(coco_fixture.root, "train")
    (coco_fixture.root / "train2017").mkdir()
    with pytest.raises(DatasetLayoutError, match="annotations/instances_train2017.json not found"):
        CocoDetection(coco_fixture.root, "train")
    annotation_file = coco_fixture.root / "annotations" / "instances_val2017.json"
    instances = json.loads(annotation_file.read_text())
    instances["annotations"][0]["category_id"] = 2
    annotation_file.write_text(json.dumps(instances))
    with pytest.raises(DatasetLayoutError, match="annotation 101 has unknown category id 2"):
        CocoDetection(coco_fixture.root, "val")
    annotation_file.write_text("{not json")
    with pytest.raises(DatasetLayoutError, match="is not a COCO instances file"):
        CocoDetection(coco_fixture.root, "val")


# ---------------------------------------------------------------- ADE20K


def test_ade20k_reduce_zero_label_as_mmsegmentation(ade20k_fixture):
    dataset = ADE20K(ade20k_fixture.root, "train")
    sample = dataset[0]
    mask = sample["mask"]
    assert isinstance(mask, tv_tensors.Mask) and mask.dtype == torch.uint8
    assert tuple(mask.shape) == tuple(sample["image"].shape[-2:]) == (12, 20)
    stored = torch.from_numpy(ade20k_fixture.stored_mask)
    assert torch.all(mask[stored == 0] == 255)
    assert torch.all(mask[stored == 1] == 0)
    assert torch.all(mask[stored == 150] == 149)
    assert sample["key"] == f"images/training/{ade20k_fixture.train_names[0]}"


def test_ade20k_without_reduce_zero_label_keeps_stored_values(ade20k_fixture):
    mask = ADE20K(ade20k_fixture.root, "val", reduce_zero_label=False)[0]["mask"]
    assert torch.equal(mask.as_subclass(torch.Tensor), torch.from_numpy(ade20k_fixture.stored_mask))


def test_ade20k_accepts_parent_or_data_folder_and_split_aliases(ade20k_fixture):
    from_parent = ADE20K(ade20k_fixture.root, "training")
    from_data_root = ADE20K(ade20k_fixture.data_root, "train")
    assert (
        from_parent.image_names
        == from_data_root.image_names
        == [f"{n}.jpg" for n in ade20k_fixture.train_names]
    )
    assert len(ADE20K(ade20k_fixture.root, "validation")) == len(ade20k_fixture.val_names)


def test_ade20k_image_without_annotation_is_a_layout_error(ade20k_fixture):
    orphan = ade20k_fixture.data_root / "annotations" / "training" / f"{ade20k_fixture.train_names[1]}.png"
    orphan.unlink()
    with pytest.raises(DatasetLayoutError, match=str(orphan)):
        ADE20K(ade20k_fixture.root, "train")
    with pytest.raises(DatasetLayoutError, match="ADEChallengeData2016"):
        ADE20K(ade20k_fixture.data_root / "images", "train")


def test_ade20k_label_outside_the_classes_is_a_corrupt_sample(ade20k_fixture):
    label_path = (
        ade20k_fixture.data_root / "annotations" / "validation" / f"{ade20k_fixture.val_names[0]}.png"
    )
    stored = ade20k_fixture.stored_mask.copy()
    stored[0, 0] = 151
    Image.fromarray(stored).save(label_path)
    with pytest.raises(CorruptSampleError, match=r"label values \[151\] outside \[0, 150\]"):
        ADE20K(ade20k_fixture.root, "val")[0]
