"""WebDataset shards: written from the folder fixtures (see conftest), read back equal to the folder readers."""

from __future__ import annotations

import argparse
import json
import logging

import pytest
import torch
from torchvision import tv_tensors

from moevit.cli.shard import add_shard_parser
from moevit.data import ADE20K, CocoDetection, ImageNetFolder
from moevit.data.collate import collate_classification
from moevit.data.errors import CorruptSampleError, DatasetLayoutError
from moevit.data.shards import IndexedShards, ShardInfo, indexed, write_shards
from moevit.data.shards.layout import INFO_FILE, decode_key, encode_key
from moevit.data.skip import SkipCorrupt
from moevit.data.synth import write_synthetic_datasets


def _folder_samples(reader) -> list[dict]:
    """The folder reader's samples in order, without the unreadable ones (which shards leave out or skip)."""
    samples = []
    for index in range(len(reader)):
        try:
            samples.append(reader[index])
        except CorruptSampleError:
            continue
    return samples


def _assert_same_samples(folder: list[dict], shard: list[dict]) -> None:
    assert [s["key"] for s in shard] == [s["key"] for s in folder]
    for expected, actual in zip(folder, shard):
        assert set(actual) == set(expected), expected["key"]
        for name, value in expected.items():
            if isinstance(value, torch.Tensor):
                assert type(actual[name]) is type(value), (expected["key"], name)
                assert actual[name].dtype == value.dtype, (expected["key"], name)
                assert torch.equal(actual[name], value), (expected["key"], name)
                if isinstance(value, tv_tensors.BoundingBoxes):
                    assert actual[name].canvas_size == value.canvas_size
                    assert actual[name].format == value.format
            else:
                assert actual[name] == value, (expected["key"], name)


@pytest.fixture
def imagenet_shards(imagenet_fixture, tmp_path):
    """The ImageNet fixture's 6 train images in shards of one image."""
    write_shards("imagenet", imagenet_fixture.root, "train", tmp_path / "shards", shard_size=1)
    return tmp_path / "shards"


# ---------------------------------------------------------------- folder and shard samples are identical


def test_imagenet_shards_equal_folder_samples(imagenet_fixture, tmp_path):
    # A file name with dots (and a percent sign) checks the key encoding against webdataset's key split.
    wnid = imagenet_fixture.classes[0]
    dotted = imagenet_fixture.root / "train" / wnid / "crop.v2%5.JPEG"
    dotted.write_bytes((imagenet_fixture.root / f"{imagenet_fixture.cmyk_key}.JPEG").read_bytes())
    summary = write_shards("imagenet", imagenet_fixture.root, "train", tmp_path / "shards", shard_size=4)
    folder = ImageNetFolder(imagenet_fixture.root, "train")
    shard = IndexedShards(tmp_path / "shards", "imagenet")
    samples = _folder_samples(shard)
    _assert_same_samples(_folder_samples(folder), samples)
    keys = {s["key"] for s in samples}
    assert {imagenet_fixture.cmyk_key, imagenet_fixture.gray_key, imagenet_fixture.png_named_jpeg_key} <= keys
    assert f"train/{wnid}/crop.v2%5" in keys

    info = json.loads((tmp_path / "shards" / INFO_FILE).read_text())
    assert [entry["num_samples"] for entry in info["shards"]] == [4, 3]
    assert info["num_samples"] == summary["num_samples"] == 7 and summary["num_shards"] == 2
    assert info["dataset"] == "imagenet" and info["split"] == "train" and info["missing"] == []
    assert info["classes"] == imagenet_fixture.classes == shard.classes


def test_coco_shards_equal_folder_samples(coco_fixture, tmp_path):
    summary = write_shards("coco", coco_fixture.root, "val", tmp_path / "shards", shard_size=1)
    folder = CocoDetection(coco_fixture.root, "val")
    shard = IndexedShards(tmp_path / "shards", "coco")
    samples = _folder_samples(shard)
    _assert_same_samples(_folder_samples(folder), samples)
    by_id = {s["image_id"]: s for s in samples}
    for image_id, (boxes, labels) in coco_fixture.expected_targets.items():  # crowd and degenerate left out
        assert by_id[image_id]["boxes"].tolist() == boxes and by_id[image_id]["labels"].tolist() == labels
    assert by_id[coco_fixture.empty_image_id]["boxes"].shape == (0, 4)

    # The file of the missing image is listed, not written; the category mapping keeps int ids.
    info = ShardInfo.load(tmp_path / "shards")
    assert summary["num_missing"] == 1 and info.num_samples == 2
    assert [entry["key"] for entry in info.missing] == [f"val2017/{coco_fixture.missing_file_image_id:012d}"]
    assert shard.label_to_cat_id == coco_fixture.cat_ids == folder.label_to_cat_id
    assert shard.cat_id_to_label == folder.cat_id_to_label == {1: 0, 3: 1, 90: 2}
    assert shard.annotation_file == folder.annotation_file.resolve()
    assert json.loads((tmp_path / "shards" / INFO_FILE).read_text())["annotation_file_name"] == (
        "instances_val2017.json"
    )


def test_ade20k_shards_equal_folder_samples(ade20k_fixture, tmp_path):
    write_shards("ade20k", ade20k_fixture.root, "train", tmp_path / "shards", shard_size=1)
    folder = _folder_samples(ADE20K(ade20k_fixture.root, "train"))
    samples = _folder_samples(IndexedShards(tmp_path / "shards", "ade20k"))
    _assert_same_samples(folder, samples)
    assert set(samples[0]["mask"].unique().tolist()) == {0, 149, 255}  # stored 0 -> 255, 1 -> 0, 150 -> 149
    raw = _folder_samples(IndexedShards(tmp_path / "shards", "ade20k", reduce_zero_label=False))
    _assert_same_samples(_folder_samples(ADE20K(ade20k_fixture.root, "train", reduce_zero_label=False)), raw)


def test_synthetic_tiny_datasets_read_the_same_from_shards(tmp_path):
    write_synthetic_datasets(tmp_path / "synth", seed=0, size="tiny")
    splits = {
        "imagenet": (ImageNetFolder, "val"),
        "coco": (CocoDetection, "val"),
        "ade20k": (ADE20K, "val"),
    }
    for dataset, (reader_class, split) in splits.items():
        root, out = tmp_path / "synth" / dataset, tmp_path / "shards" / dataset
        write_shards(dataset, root, split, out, shard_size=10)
        _assert_same_samples(
            _folder_samples(reader_class(root, split)), _folder_samples(IndexedShards(out, dataset))
        )


def test_a_process_keeps_few_shards_open_and_reads_any_sample_in_any_order(
    imagenet_fixture, imagenet_shards, monkeypatch
):
    monkeypatch.setattr(indexed, "MAX_OPEN_SHARDS", 2)
    shards = IndexedShards(imagenet_shards, "imagenet")
    order = [5, 0, 3, 1, 4, 2, 0, 5]  # six shards of one sample each, revisited
    assert [shards[i]["key"] for i in order] == [imagenet_fixture.train_keys[i] for i in order]
    assert list(shards._descriptors) == [0, 5]  # the two most recently read, the others closed


# ---------------------------------------------------------------- corrupt samples and bad input


def test_corrupt_jpeg_in_shard_is_skipped_logged_once_and_counted(
    imagenet_fixture, dataset_writers, tmp_path, caplog
):
    wnid = imagenet_fixture.classes[0]
    dataset_writers.truncated_jpeg(imagenet_fixture.root / "train" / wnid / f"{wnid}_0.JPEG")  # sorted first
    write_shards("imagenet", imagenet_fixture.root, "train", tmp_path / "shards", shard_size=7)

    dataset = SkipCorrupt(IndexedShards(tmp_path / "shards", "imagenet"))  # as build_dataset wraps it
    with caplog.at_level(logging.WARNING, logger="moevit.data.skip"):
        samples = [dataset[index] for _ in range(2) for index in range(len(dataset))]  # two passes
    keys = imagenet_fixture.train_keys  # the corrupt image sorts first, before these six
    assert [s["key"] for s in samples[:7]] == [keys[0], *keys]  # replaced by its next neighbour
    assert [s["num_skipped"] for s in samples[:7]] == [1, 0, 0, 0, 0, 0, 0] and dataset.num_skipped == 2
    assert collate_classification(samples[:2])["num_skipped"] == 1
    assert len([r for r in caplog.records if f"{wnid}_0" in r.getMessage()]) == 1


def test_bad_shard_directories_are_refused(imagenet_fixture, imagenet_shards, tmp_path):
    with pytest.raises(DatasetLayoutError, match="_info.json not found"):
        IndexedShards(tmp_path, "imagenet")
    with pytest.raises(
        DatasetLayoutError, match="describes imagenet shards, but the config's data.format is coco"
    ):
        IndexedShards(imagenet_shards, "coco")
    with pytest.raises(FileExistsError, match="not an empty directory"):
        write_shards("imagenet", imagenet_fixture.root, "train", imagenet_shards)
    (imagenet_shards / "train-000003.tar").unlink()
    with pytest.raises(DatasetLayoutError, match="train-000003.tar"):
        IndexedShards(imagenet_shards, "imagenet")


def test_key_encoding_round_trips_without_dots_or_slashes():
    for key in ("train/n01440764/n01440764_10026", "a.b/c%2E.d", "images/training/x%y.z"):
        stored = encode_key(key)
        assert "." not in stored and "/" not in stored and decode_key(stored) == key


def test_writing_twice_gives_identical_bytes(imagenet_fixture, tmp_path):
    for out in ("a", "b"):
        write_shards("imagenet", imagenet_fixture.root, "val", tmp_path / out, shard_size=2)
    names = sorted(path.name for path in (tmp_path / "a").glob("*.tar"))
    assert names == ["val-000000.tar", "val-000001.tar"]
    assert all((tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes() for n in names)


def test_cli_writes_shards_and_prints_the_summary(coco_fixture, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    data = parser.add_subparsers(dest="command").add_parser("data").add_subparsers(dest="data_command")
    add_shard_parser(data)
    out = tmp_path / "shards"
    args = parser.parse_args(
        [
            "data",
            "shard",
            "--dataset",
            "coco",
            "--split",
            "val",
            "--root",
            str(coco_fixture.root),
            "--out",
            str(out),
        ]
    )
    assert args.func(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_samples"] == 2 and summary["num_shards"] == 1 and (out / INFO_FILE).is_file()
    assert args.func(args) == 2  # the directory is no longer empty
    assert "not an empty directory" in capsys.readouterr().err
